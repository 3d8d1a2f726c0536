#!/usr/bin/env bash
# Demo: boots a Linux guest whose shared directory is served by berth, has the
# guest write a file, reads it on the host and shuts everything down cleanly.
# On a bare Debian machine it first installs QEMU and downloads the guest
# kernel and tools (cached for later runs), showing progress.
# Usage: demo.sh [--daemon berth|virtiofsd] [--kernel PATH] [--modules DIR]
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
daemon_kind=berth
while [ $# -gt 0 ]; do
	case $1 in
	--daemon) daemon_kind=$2; shift 2 ;;
	--kernel) BERTH_GUEST_KERNEL=$2; shift 2 ;;
	--modules) BERTH_GUEST_MODULES=$2; shift 2 ;;
	-h | --help) sed -n '2,6p' "$0"; exit 0 ;;
	*) die "unknown argument $1" ;;
	esac
done
require_root
export BERTH_GUEST_VERBOSE=${BERTH_GUEST_VERBOSE:-1}

log "step 1/4: preparing the guest (QEMU, kernel, initramfs, tools)"
prepare_guest
log "step 2/4: building the daemon ($daemon_kind)"
daemon_binary "$daemon_kind"

work=$(mktemp -d /tmp/berth-demo.XXXXXX)
daemon_pid=""
cleanup() {
	if [ -n "$daemon_pid" ] && kill -0 "$daemon_pid" 2>/dev/null; then
		kill "$daemon_pid" 2>/dev/null || true
		wait "$daemon_pid" 2>/dev/null || true
	fi
	rm -rf "$work"
}
trap cleanup EXIT
mkdir "$work/share"
echo "hello from the host" >"$work/share/from-host.txt"

log "step 3/4: serving $work/share with $(basename "$DAEMON")"
"$DAEMON" --socket-path "$work/fs.sock" --shared-dir "$work/share" \
	>"$work/daemon.log" 2>&1 &
daemon_pid=$!
for _ in $(seq 100); do
	[ -S "$work/fs.sock" ] && break
	kill -0 "$daemon_pid" 2>/dev/null || break
	sleep 0.1
done
[ -S "$work/fs.sock" ] || {
	cat "$work/daemon.log" >&2
	die "the daemon did not create its socket"
}

cat >"$work/guest.sh" <<'GUEST'
set -e
echo "guest| kernel $(uname -r), mounting the share"
mkdir -p /mnt/share
mount -t virtiofs share /mnt/share
echo "guest| the host left: $(cat /mnt/share/from-host.txt)"
echo "hello from the guest, kernel $(uname -r)" >/mnt/share/from-guest.txt
echo "guest| wrote /mnt/share/from-guest.txt"
ls -l /mnt/share | sed 's/^/guest| /'
umount /mnt/share
echo "guest| unmounted, powering off"
GUEST

log "step 4/4: booting the guest (QEMU $GUEST_ACCEL; about 5 s without KVM)"
start=$(now_seconds)
rc=0
guest_boot --script "$work/guest.sh" --console "$work/console" --timeout 120 \
	--fs "share=$work/fs.sock" >/dev/null &
boot_pid=$!
tail -n +1 -F --pid="$boot_pid" "$work/console" 2>/dev/null | sed -un 's/\r$//; s/.*\(guest| .*\)/\1/p' || true
wait "$boot_pid" || rc=$?
[ "$rc" = 0 ] || {
	tr -d '\r' <"$work/console" | tail -n 30 >&2
	die "the guest failed (status $rc)"
}
log "guest finished after $(seconds_since "$start") s"

log "host reads: $(cat "$work/share/from-guest.txt")"
for _ in $(seq 100); do
	kill -0 "$daemon_pid" 2>/dev/null || break
	sleep 0.1
done
daemon_rc=0
wait "$daemon_pid" || daemon_rc=$?
daemon_pid=""
log "the daemon exited with status $daemon_rc after QEMU quit"
[ "$daemon_rc" = 0 ] || exit 1
log "demo complete"
