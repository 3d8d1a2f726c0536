#!/usr/bin/env bash
# Moves a running guest from one QEMU to another that waits for it (started with the
# same command line plus `-incoming URI`, its vhost-user devices on daemons of its own),
# over QMP; the way to upgrade berth under a running guest (see the README).
#
# Usage: live-migrate.sh [--timeout SECONDS] [--max-bandwidth BYTES_PER_S] [--keep-source]
#                        SOURCE_QMP DEST_QMP URI
#
# Turns on the return-path capability on both QEMUs (so that a destination that
# refuses the state, as virtiofsd does for a file it cannot find, fails the migration
# and the source runs the guest on), raises the bandwidth limit (default 4 GiB/s: the
# copy stays on this host), runs `migrate` and polls `query-migrate`. When it
# completes, prints "completed downtime=MS total=MS" and tells the source QEMU to quit
# (unless --keep-source); exits 0. When QEMU reports the migration failed (the guest
# still runs on the source) prints "failed: REASON" and exits 1; exits 2 when a QEMU
# cannot be reached or the migration does not end in time (it is cancelled then).
set -euo pipefail
QMP=$(dirname "${BASH_SOURCE[0]}")/qmp.py
timeout=120 bandwidth=4294967296 keep_source=0
while [ $# -gt 0 ]; do
	case $1 in
	--timeout) timeout=$2; shift 2 ;;
	--max-bandwidth) bandwidth=$2; shift 2 ;;
	--keep-source) keep_source=1; shift ;;
	-h | --help) sed -n '2,15p' "$0"; exit 0 ;;
	-*) echo "live-migrate.sh: unknown option $1" >&2; exit 2 ;;
	*) break ;;
	esac
done
[ $# -eq 3 ] || { sed -n '6,7p' "$0" >&2; exit 2; }
source_qmp=$1 dest_qmp=$2 uri=$3
qmp() { python3 "$QMP" "$@"; }

status=$(qmp --wait 60 "$dest_qmp" query-status) || exit 2
[[ $status == *'"inmigrate"'* ]] || {
	echo "live-migrate.sh: the destination QEMU is not waiting for a migration: $status" >&2
	exit 2
}
caps='{"capabilities": [{"capability": "return-path", "state": true}]}'
qmp "$dest_qmp" migrate-set-capabilities "$caps" >/dev/null || exit 2
qmp "$source_qmp" migrate-set-capabilities "$caps" >/dev/null || exit 2
qmp "$source_qmp" migrate-set-parameters "{\"max-bandwidth\": $bandwidth}" >/dev/null || exit 2
rc=0
error=$(qmp "$source_qmp" migrate "{\"uri\": \"$uri\"}" 2>&1 >/dev/null) || rc=$?
if [ "$rc" = 1 ]; then
	echo "failed: $error"
	exit 1
fi
[ "$rc" = 0 ] || { echo "live-migrate.sh: $error" >&2; exit 2; }

deadline=$((SECONDS + timeout))
while :; do
	answer=$(qmp "$source_qmp" query-migrate | python3 -c '
import json, sys
d = json.load(sys.stdin)
print(d.get("status", "none"), d.get("downtime", "-"), d.get("total-time", "-"), d.get("error-desc", ""))') || exit 2
	read -r state downtime total error <<<"$answer"
	case $state in
	completed)
		echo "completed downtime=$downtime total=$total"
		[ "$keep_source" = 1 ] || qmp "$source_qmp" quit >/dev/null 2>&1 || true
		exit 0
		;;
	failed | cancelled)
		echo "failed: ${error:-$state}"
		exit 1
		;;
	esac
	if [ $SECONDS -ge $deadline ]; then
		qmp "$source_qmp" migrate_cancel >/dev/null 2>&1 || true
		echo "live-migrate.sh: the migration is still '$state' after $timeout s; cancelled" >&2
		exit 2
	fi
	sleep 0.2
done
