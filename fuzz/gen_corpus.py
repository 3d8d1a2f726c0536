#!/usr/bin/env python3
"""Writes the seed corpus: well-formed inputs each target starts mutating from."""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def save(target, name, data):
    path = os.path.join(HERE, "corpus", target)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, name), "wb") as f:
        f.write(data)


# Upper bits of the control byte: how the harness bends the descriptor chain (fuse.rs Shape).
REPLY_READABLE, REPLY_FIRST, REPLY_OUTSIDE, LOOP, NEXT_OUT_OF_RANGE, SHORT_REPLY = (
    0x04, 0x08, 0x10, 0x20, 0x40, 0x80)


def fuse(opcode, nodeid, body, unique=1, parts=1, shape=0, uid=0):
    header = struct.pack("<IIQQIIIHH", 40 + len(body), opcode, unique, nodeid, uid, uid, 1, 0, 0)
    # The control byte's low bits tell the harness over how many descriptors to spread the
    # request; its upper bits how to bend the chain.
    return bytes([(parts - 1) | shape]) + header + body


def read_in(fh, offset, size):
    return struct.pack("<QQIIQII", fh, offset, size, 0, 0, 0, 0)


fuse_seeds = {
    "init": fuse(26, 0, struct.pack("<IIII", 7, 38, 131072, 0x3FFFFFFF) + struct.pack("<I44x", 0)),
    "lookup": fuse(1, 1, b"file\0"),
    "lookup_dir": fuse(1, 1, b"dir\0"),
    "getattr": fuse(3, 1, struct.pack("<IIQ", 0, 0, 0)),
    "open": fuse(14, 2, struct.pack("<II", os.O_RDWR, 0)),
    "read": fuse(15, 2, read_in(1, 0, 4096)),
    "write": fuse(16, 2, struct.pack("<QQIIQII", 1, 0, 5, 0, 0, 0, 0) + b"hello"),
    "write_split": fuse(16, 2, struct.pack("<QQIIQII", 1, 6, 12, 0, 0, 0, 0) + b"split across", parts=2),
    "mkdir": fuse(9, 1, struct.pack("<II", 0o755, 0o022) + b"newdir\0"),
    "create": fuse(35, 1, struct.pack("<IIII", os.O_RDWR | os.O_CREAT, 0o644, 0o022, 0) + b"created\0"),
    "opendir": fuse(27, 1, struct.pack("<II", os.O_RDONLY, 0)),
    "readdir": fuse(28, 1, read_in(1, 0, 4096)),
    "readdirplus": fuse(44, 1, read_in(1, 0, 4096)),
    "statfs": fuse(17, 1, b""),
    "setattr_size": fuse(4, 2, struct.pack("<IIQQQQQQIIIIIIII", 1 << 3, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)),
    "unlink": fuse(10, 1, b"created\0"),
    "rename": fuse(12, 1, struct.pack("<Q", 1) + b"file\0moved\0"),
    "symlink": fuse(6, 1, b"link\0file\0"),
    "readlink": fuse(5, 3, b""),
    "getxattr": fuse(22, 1, struct.pack("<II", 64, 0) + b"user.test\0"),
    "flush": fuse(25, 2, struct.pack("<QIIQ", 1, 0, 0, 0)),
    "release": fuse(18, 2, struct.pack("<QIIQ", 1, 0, 0, 0)),
    "forget": fuse(2, 2, struct.pack("<Q", 1)),
    "lseek": fuse(46, 2, struct.pack("<QQII", 1, 0, 3, 0)),
    "fallocate": fuse(43, 2, struct.pack("<QQQII", 1, 0, 4096, 0, 0)),
    "copy_file_range": fuse(47, 2, struct.pack("<QQQQQQQ", 1, 0, 2, 1, 100, 10, 0)),
    "syncfs": fuse(50, 1, struct.pack("<Q", 0)),
    "tmpfile": fuse(51, 1, struct.pack("<IIII", os.O_RDWR, 0o600, 0o022, 0) + b"\0"),
    "destroy": fuse(38, 0, b""),
    "setxattr": fuse(21, 1, struct.pack("<II", 2, 0) + b"user.fuzz\0v1"),
    "listxattr": fuse(23, 1, struct.pack("<II", 256, 0)),
    "removexattr": fuse(24, 1, b"user.fuzz\0"),
    "getxattr_huge": fuse(22, 1, struct.pack("<II", 0xFFFFFFFF, 0) + b"user.fuzz\0"),
    "create_as_user": fuse(35, 1, struct.pack("<IIII", os.O_RDWR | os.O_CREAT, 0o644, 0o022, 0)
                           + b"users\0", uid=1000),
    "lookup_dotdot": fuse(1, 1, b"..\0"),
    "shape_reply_readable": fuse(3, 1, struct.pack("<IIQ", 0, 0, 0), shape=REPLY_READABLE),
    "shape_reply_first": fuse(3, 1, struct.pack("<IIQ", 0, 0, 0), shape=REPLY_FIRST),
    "shape_reply_outside": fuse(3, 1, struct.pack("<IIQ", 0, 0, 0), shape=REPLY_OUTSIDE),
    "shape_loop": fuse(3, 1, struct.pack("<IIQ", 0, 0, 0), parts=2, shape=LOOP),
    "shape_next_out_of_range": fuse(3, 1, struct.pack("<IIQ", 0, 0, 0), shape=NEXT_OUT_OF_RANGE),
    "shape_short_reply": fuse(15, 2, read_in(1, 0, 4096), shape=SHORT_REPLY),
}
for name, data in fuse_seeds.items():
    save("fuse_request", name, data)


def vu(request, body=b"", flags=1):
    return struct.pack("<III", request, flags, len(body)) + body


u64 = lambda v: struct.pack("<Q", v)
state = lambda index, num: struct.pack("<II", index, num)
handshake = b"".join([
    vu(3),  # SET_OWNER
    vu(1),  # GET_FEATURES
    vu(15),  # GET_PROTOCOL_FEATURES
    vu(16, u64(0x1 | 0x8 | 0x200)),  # SET_PROTOCOL_FEATURES (MQ, REPLY_ACK, CONFIG)
    vu(17),  # GET_QUEUE_NUM
    vu(2, u64((1 << 32) | (1 << 30))),  # SET_FEATURES
    vu(8, state(0, 256)),  # SET_VRING_NUM
    vu(10, state(0, 0)),  # SET_VRING_BASE
    vu(18, state(0, 1)),  # SET_VRING_ENABLE
    vu(11, state(0, 0)),  # GET_VRING_BASE
])
vhost_seeds = {
    "handshake": handshake,
    "get_features": vu(1),
    "get_config": vu(24, struct.pack("<III", 0, 40, 0) + bytes(40)),
    "reply_ack": vu(16, u64(0x8)) + vu(3, flags=1 | 0x8),
    "max_mem_slots": vu(16, u64(0x8000)) + vu(36),
    "vring_addr": vu(9, struct.pack("<IIQQQQ", 0, 0, 0x1000, 0x2000, 0x3000, 0)),
    # berth's device: config space writes are refused, odd reads padded.
    "set_config": vu(16, u64(0x200)) + vu(25, struct.pack("<III", 0, 4, 0) + b"abcd"),
    "get_config_odd": vu(16, u64(0x200)) + vu(24, struct.pack("<III", 30, 40, 0) + bytes(40)),
    "reset_device": vu(3) + vu(2, u64(1 << 32)) + vu(34),
    "kick_nofd": vu(3) + vu(8, state(1, 64)) + vu(12, u64(0x100 | 1)) + vu(13, u64(0x100 | 1)),
    # Device lifecycle: every queue stopped (GET_VRING_BASE), started again, then a reset
    # with RESET_DEVICE acknowledged (protocol feature bit 13).
    "stop_restart_reset": b"".join([
        vu(3),
        vu(1),
        vu(16, u64(0x8 | 0x2000)),
        vu(2, u64((1 << 32) | (1 << 30))),
        vu(8, state(1, 64)),
        vu(10, state(1, 0)),
        vu(18, state(1, 1)),
        vu(11, state(0, 0)),
        vu(11, state(1, 0)),
        vu(11, state(2, 0)),
        vu(10, state(1, 7)),
        vu(18, state(1, 1)),
        vu(34, flags=1 | 0x8),
        vu(2, u64((1 << 32) | (1 << 30))),
        vu(11, state(1, 0)),
    ]),
}
for name, data in vhost_seeds.items():
    save("vhost_user_message", name, data)

cli_seeds = {
    "legacy_kata": b"\x00source=/srv,cache=none,sandbox=none,xattr,no_posix_lock",
    "legacy_timeouts": b"\x00cache=always,writeback,flock,posix_acl,timeout=5,announce_submounts",
    "legacy_bad": b"\x00modcaps=+sys_admin,log_level=debug,allow_direct_io",
    "flags": b"\x01--cache\x00never\x00--seccomp\x00none\x00--thread-pool-size\x004",
    "flags_modern": b"\x01--inode-file-handles=prefer\x00--xattr\x00--rlimit-nofile=4096\x00--log-level\x00debug",
}
for name, data in cli_seeds.items():
    save("cli_options", name, data)

# --xattrmap: the map text, a NUL, then NUL-separated names to match (fuzz/src/xattrmap.rs).
xattrmap_seeds = {
    "doc_prefix_client": ":prefix:client:trusted.:user.virtiofs.:",
    "doc_prefix_server": ":prefix:server::user.virtiofs.:",
    "doc_prefix_all": ":prefix:all:trusted.:user.virtiofs.:",
    "doc_ok_client": ":ok:client:user.::",
    "doc_ok_server": ":ok:server::security.:",
    "doc_ok_all": ":ok:all:::",
    "doc_bad_server": ":bad:server::security.:",
    "example1": ":prefix:all::user.virtiofs.::bad:all:::",
    "example1_map": ":map::user.virtiofs.:",
    "example2": "/prefix/all/trusted./user.virtiofs./\n            /bad/server//trusted./\n"
                "            /bad/client/user.virtiofs.//\n            /ok/all///",
    "example2_map": "/map/trusted./user.virtiofs./",
    "example3": "/bad/all/security./security./\n            /ok/all///",
    "unsupported_selinux": "/unsupported/all/security.selinux/security.selinux//ok/all///",
    "incomplete": ":prefix:client:hi",
    "map_not_last": ":map:trusted.:virtiofs.user.::map:trusted.:virtiofs.user.:",
    "bad_type": ":TOMATOPIRATE:trusted.:virtiofs.user.:",
    "bad_scope": "/prefix/helloworld///",
    "multibyte_separator": "\u00a7ok\u00a7client\u00a7a:b/c\u00a7\u00a7  |bad|all|||",
}
xattr_names = (b"\0user.foo\0user.virtiofs.user.foo\0trusted.overlay.opaque\0security.selinux"
               b"\0security.capability\0system.posix_acl_access\0user.virtiofs.\0")
for name, text in xattrmap_seeds.items():
    save("xattrmap_parse", name, text.encode() + xattr_names)
cli_xattrmap_seeds = {
    "legacy_xattrmap": b"\x00xattrmap=:map::user.virtiofs.:,cache=auto",
    "flags_xattrmap": b"\x01--xattrmap\x00/prefix/all/trusted./user.virtiofs./ /ok/all///",
}
for name, data in cli_xattrmap_seeds.items():
    save("cli_options", name, data)


# dax_window: 4-byte operations (fuzz/src/dax.rs): [op, a, b, c]; op & 7 = 0 setup, 1 remove,
# 2 resize seen after the fact, 3 resize announced first, 4 recheck all, 5 clear (a == 0);
# op bits 6-7: 1 misaligned, 2 unknown flag; bits 3-5: sub-page bytes of a size.
def dax(*ops):
    return b"".join(bytes(op) for op in ops)


SETUP, REMOVE, RESIZED, RESIZING, RECHECK, CLEAR = range(6)
RW = 3 << 5
dax_seeds = {
    # Map 4 slots of file 0, cut it to 100 KiB (announced), grow it back, remove the middle.
    "truncate_then_grow": dax((SETUP, RW, 0, 3), (RESIZING, 0, 0, 100), (RESIZED, 0, 255, 255),
                              (REMOVE, 0, 1, 1)),
    # Two files side by side, a host truncation of each, a recheck, an overlap, a clear.
    "two_files": dax((SETUP, RW | 0, 0, 1), (SETUP, RW | 1, 2, 1), (RESIZED, 1, 0, 0),
                     (RESIZED, 0, 1, 0), (RECHECK, 0, 0, 0), (SETUP, RW | 2, 1, 2),
                     (CLEAR, 0, 0, 0)),
    # File offsets with extra pages, sub-page sizes, refusals (misaligned, past the end, flags).
    "odd_offsets": dax((SETUP, RW | 4, 3, 13), (RESIZING | 8, 0, 2, 7), (SETUP | 0x40, RW, 1, 0),
                       (SETUP, RW, 15, 3), (SETUP, 0, 0, 0), (SETUP | 0x80, RW, 0, 0),
                       (REMOVE | 0x40, 0, 3, 0), (REMOVE, 0, 17, 0)),
}
for name, data in dax_seeds.items():
    save("dax_window", name, data)
# vhost_blk_request: a control byte (low bits: readable descriptors; upper bits: the chain's
# shape, fuzz/src/blk_request.rs Shape), two bytes of device-writable room in 512-byte units,
# then the readable bytes (a virtio-blk header and its payload). The device is 1 MiB of
# 512-byte blocks.
SPLIT_ROOM, NO_STATUS, STATUS_OUTSIDE, READABLE_LAST, BLK_LOOP, READ_ONLY = (
    0x04, 0x08, 0x10, 0x20, 0x40, 0x80)
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13


def blk(kind, sector=0, payload=b"", room=0, parts=1, shape=0):
    return (bytes([(parts - 1) | shape]) + struct.pack("<H", room)
            + struct.pack("<IIQ", kind, 0, sector) + payload)


def ranges(*segments):
    return b"".join(struct.pack("<QII", s, n, f) for s, n, f in segments)


blk_seeds = {
    "read": blk(T_IN, 8, room=8),
    "read_split_room": blk(T_IN, 16, room=64, shape=SPLIT_ROOM),
    "read_header_split": blk(T_IN, 0, room=1, parts=2),
    "write": blk(T_OUT, 8, bytes(range(256)) * 16),
    "write_three_parts": blk(T_OUT, 64, b"\xa5" * 8192, parts=3),
    "flush": blk(T_FLUSH),
    "get_id": blk(T_GET_ID, room=1),
    "discard": blk(T_DISCARD, payload=ranges((16, 8, 0), (64, 16, 0))),
    "write_zeroes_unmap": blk(T_WRITE_ZEROES, payload=ranges((32, 8, 1))),
    "discard_with_unmap": blk(T_DISCARD, payload=ranges((16, 8, 1))),
    "write_read_only": blk(T_OUT, 0, b"\x01" * 512, shape=READ_ONLY),
    "read_out_of_range": blk(T_IN, 2048, room=8),
    "read_overflowing_sector": blk(T_IN, (1 << 64) - 1, room=1),
    "unknown_type": blk(99),
    "short_header": bytes([0]) + struct.pack("<H", 0) + b"\x00" * 8,
    "no_status": blk(T_IN, 0, shape=NO_STATUS),
    "status_outside_memory": blk(T_IN, 0, room=1, shape=STATUS_OUTSIDE),
    "readable_after_writable": blk(T_IN, 0, room=1, shape=READABLE_LAST),
    "loop": blk(T_FLUSH, shape=BLK_LOOP),
}
for name, data in blk_seeds.items():
    save("vhost_blk_request", name, data)
