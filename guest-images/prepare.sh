#!/usr/bin/env bash
# Fetches and builds everything a guest needs (QEMU, kernel, initramfs, tools
# image) into the cache and prints what it uses. A second run reuses the cache.
# Usage: prepare.sh [--kernel PATH] [--modules DIR]
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
while [ $# -gt 0 ]; do
	case $1 in
	--kernel) BERTH_GUEST_KERNEL=$2; shift 2 ;;
	--modules) BERTH_GUEST_MODULES=$2; shift 2 ;;
	-h | --help) sed -n '2,4p' "$0"; exit 0 ;;
	*) die "unknown argument $1" ;;
	esac
done
require_root
start=$(now_seconds)
prepare_guest
log "kernel:    $KERNEL_IMAGE"
log "modules:   ${KERNEL_MODULES:-none}"
log "initramfs: $BASE_INITRAMFS"
log "tools:     $TOOLS_IMAGE"
log "accel:     $GUEST_ACCEL"
log "ready in $(seconds_since "$start") s"
