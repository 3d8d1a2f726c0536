#!/usr/bin/env bash
# Boots a guest that runs a shell script and exits with the script's exit code.
# Usage: boot.sh [--kernel PATH] [--modules DIR] [--fs TAG=SOCKET[,queues=N]]...
#                [--timeout SECONDS] [--quiet] [SCRIPT]
# Without SCRIPT the guest just reports its kernel and exits. Each --fs adds a
# vhost-user-fs device connected to a daemon already listening on SOCKET; the
# script can mount it with `mount -t virtiofs TAG /mnt`.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
boot_args=() script="" show=--show-console
while [ $# -gt 0 ]; do
	case $1 in
	--kernel) BERTH_GUEST_KERNEL=$2; shift 2 ;;
	--modules) BERTH_GUEST_MODULES=$2; shift 2 ;;
	--fs) boot_args+=(--fs "$2"); shift 2 ;;
	--timeout) boot_args+=(--timeout "$2"); shift 2 ;;
	--quiet) show=""; shift ;;
	-h | --help) sed -n '2,7p' "$0"; exit 0 ;;
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
