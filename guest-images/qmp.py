#!/usr/bin/env python3
"""Sends one QMP command to a QEMU and prints its answer.

Usage: qmp.py [--wait SECONDS] SOCKET COMMAND [ARGUMENTS-JSON]

Waits up to SECONDS (default 30) for QEMU to accept on SOCKET (a guest started
with guest_boot --qmp SOCKET), negotiates capabilities and runs COMMAND with the
JSON object ARGUMENTS-JSON. Exits 0 and prints the command's return value as
JSON, or exits 1 and prints the error's description on stderr (e.g. a refused
`migrate`); exits 2 when QEMU cannot be reached or breaks the protocol.
Asynchronous events that arrive meanwhile are ignored.

  qmp.py /tmp/src.qmp migrate '{"uri": "unix:/tmp/migrate.sock"}'
  qmp.py /tmp/src.qmp query-status
  qmp.py /tmp/dst.qmp quit
"""
import json
import socket
import sys
import time


def fail(message):
    print(f"qmp.py: {message}", file=sys.stderr)
    sys.exit(2)


def connect(path, wait):
    deadline = time.monotonic() + wait
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return sock
        except OSError as err:
            sock.close()
            if time.monotonic() >= deadline:
                fail(f"cannot connect to {path}: {err.strerror}")
            time.sleep(0.1)


def messages(sock):
    """Yields the JSON messages QEMU sends, one per line."""
    buffered = b""
    while True:
        while b"\n" not in buffered:
            chunk = sock.recv(65536)
            if not chunk:
                fail("QEMU closed the connection before answering")
            buffered += chunk
        line, buffered = buffered.split(b"\n", 1)
        if line.strip():
            try:
                yield json.loads(line)
            except json.JSONDecodeError as err:
                fail(f"QEMU sent something that is not JSON ({err}): {line[:200]!r}")


def execute(sock, stream, command, arguments=None):
    request = {"execute": command}
    if arguments is not None:
        request["arguments"] = arguments
    sock.sendall(json.dumps(request).encode() + b"\n")
    for message in stream:
        if "return" in message or "error" in message:
            return message
    return None


def main(argv):
    wait = 30.0
    if len(argv) >= 2 and argv[0] == "--wait":
        try:
            wait = float(argv[1])
        except ValueError:
            fail(f"--wait wants seconds, not {argv[1]!r}")
        argv = argv[2:]
    if len(argv) not in (2, 3):
        print(__doc__.strip(), file=sys.stderr)
        sys.exit(2)
    path, command = argv[0], argv[1]
    arguments = None
    if len(argv) == 3:
        try:
            arguments = json.loads(argv[2])
        except json.JSONDecodeError as err:
            fail(f"the arguments are not JSON ({err}): {argv[2]}")
        if not isinstance(arguments, dict):
            fail("the arguments must be a JSON object")
    sock = connect(path, wait)
    sock.settimeout(max(wait, 30.0))
    stream = messages(sock)
    greeting = next(stream)
    if "QMP" not in greeting:
        fail(f"no QMP greeting on {path}: {greeting}")
    answer = execute(sock, stream, "qmp_capabilities")
    if answer is None or "error" in answer:
        fail(f"qmp_capabilities was refused: {answer}")
    answer = execute(sock, stream, command, arguments)
    if "error" in answer:
        error = answer["error"]
        print(error.get("desc", json.dumps(error)), file=sys.stderr)
        return 1
    print(json.dumps(answer["return"]))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except socket.timeout:
        fail("QEMU did not answer in time")
