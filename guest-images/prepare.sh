#!/usr/bin/env bash
# Fetches and builds everything a guest needs (QEMU, kernel, initramfs, tools
# image, and Debian sid's QEMU for the test tier's sid checks) into the cache
# and prints what it uses. A second run reuses the cache.
# Usage: prepare.sh [--kernel PATH] [--modules DIR] [--qemu bookworm|sid|both]
# --qemu bookworm skips sid's QEMU; sid and both (the default) fetch it too.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
qemu_kinds=both
while [ $# -gt 0 ]; do
	case $1 in
	--kernel) BERTH_GUEST_KERNEL=$2; shift 2 ;;
	--modules) BERTH_GUEST_MODULES=$2; shift 2 ;;
	--qemu) qemu_kinds=$2; shift 2 ;;
	-h | --help) sed -n '2,6p' "$0"; exit 0 ;;
	*) die "unknown argument $1" ;;
	esac
done
case $qemu_kinds in bookworm | sid | both) ;; *) die "--qemu must be bookworm, sid or both" ;; esac
require_root
start=$(now_seconds)
prepare_guest
log "kernel:    $KERNEL_IMAGE"
log "modules:   ${KERNEL_MODULES:-none}"
log "initramfs: $BASE_INITRAMFS"
log "tools:     $TOOLS_IMAGE"
log "accel:     $GUEST_ACCEL"
if [ "$qemu_kinds" != bookworm ]; then
	fetch_qemu_sid
	log "sid QEMU:  $QEMU_SID_VERSION ($QEMU_SID_DIR)"
fi
log "ready in $(seconds_since "$start") s"
