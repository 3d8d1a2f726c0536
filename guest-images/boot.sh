#!/usr/bin/env bash
# Boots a guest that runs a shell script and exits with the script's exit code.
# Usage: boot.sh [--kernel PATH] [--modules DIR] [--qemu bookworm|sid]
#                [--fs TAG=SOCKET[,queues=N][,queue-size=Q][,device=fs|generic]]...
#                [--qmp SOCKET] [--incoming URI] [--qemu-arg ARG]...
#                [--console FILE] [--timeout SECONDS] [--quiet] [SCRIPT]
# Without SCRIPT the guest just reports its kernel and exits. --qemu sid runs
# Debian sid's QEMU (fetched into the cache) instead of the host's 7.2. Each
# --fs adds a device connected to a vhost-user daemon already listening on
# SOCKET: vhost-user-fs-pci, or with device=generic (sid only) QEMU's generic
# vhost-user-test-device-pci as virtio-fs (the daemon supplies the tag: start
# it with --tag TAG). The script mounts it with `mount -t virtiofs TAG /mnt`.
# --qmp opens a QMP socket (guest-images/qmp.py sends commands to it);
# --incoming URI starts an instance that waits for a migration.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
boot_args=() script="" show=--show-console
while [ $# -gt 0 ]; do
	case $1 in
	--kernel) BERTH_GUEST_KERNEL=$2; shift 2 ;;
	--modules) BERTH_GUEST_MODULES=$2; shift 2 ;;
	--qemu | --fs | --qmp | --incoming | --qemu-arg | --console | --timeout) boot_args+=("$1" "$2"); shift 2 ;;
	--quiet) show=""; shift ;;
	-h | --help) sed -n '2,14p' "$0"; exit 0 ;;
	-*) die "unknown argument $1" ;;
	*) script=$1; shift ;;
	esac
done
require_root
prepare_guest
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if [ -z "$script" ]; then
	script=$tmp/run.sh
	echo 'uname -a; cat /proc/cmdline' >"$script"
fi
start=$(now_seconds)
rc=0
guest_boot --script "$script" ${show:+"$show"} "${boot_args[@]}" || rc=$?
log "guest exited with $rc after $(seconds_since "$start") s"
exit "$rc"
