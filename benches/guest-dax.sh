#!/usr/bin/env bash
# DAX against no DAX inside one guest: boots Debian sid's QEMU 11.1 (the generic
# vhost-user device, the only one that offers a window) once, with one berth
# serving one directory with --dax-window 1G, and runs fio on the same host
# file through a `dax=always` mount and a `dax=never` mount of the same share,
# alternating mount by mount: 4 KiB random read and 1 MiB sequential read, with
# psync (O_DIRECT: no guest page cache, as with cache=none) and fio's mmap
# engine (MAP_SHARED, buffered: without DAX the guest's page cache, warmed by a
# read of the whole file before each job, serves it). The file is in the host's
# page cache throughout (written just before). Prints IOPS, MiB/s
# and the DAX/no-DAX ratio per job (medians over the repetitions) and writes
# the table and raw numbers as JSON.
#
# Under QEMU TCG the guest's CPU time dominates: the ratios show how much FUSE
# round trips cost against loads from the window, not absolute speed.
#
# Usage: benches/guest-dax.sh [--quick] [--reps N] [--runtime SECONDS] [--json FILE]
#        (as root; builds berth, fetches sid's QEMU into the guest cache)
source "$(dirname "${BASH_SOURCE[0]}")/../guest-images/lib.sh"

reps=2 runtime=8 size=256M json=""
while [ $# -gt 0 ]; do
	case $1 in
	--quick) reps=1 runtime=3 size=64M; shift ;;
	--reps) reps=$2; shift 2 ;;
	--runtime) runtime=$2; shift 2 ;;
	--json) json=$2; shift 2 ;;
	-h | --help) sed -n '2,16p' "$0"; exit 0 ;;
	*) die "unknown argument $1" ;;
	esac
done
require_root
[ -n "$json" ] || json=$REPO_ROOT/benches/results/guest-dax.json

prepare_guest
fetch_qemu_sid
daemon_binary berth
BERTH=$DAEMON

work=$(mktemp -d /tmp/berth-guest-dax.XXXXXX)
daemon_pid=""
cleanup() {
	if [ -n "$daemon_pid" ]; then
		kill "$daemon_pid" 2>/dev/null || true
		wait "$daemon_pid" 2>/dev/null || true
	fi
	rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/share" "$work/results"
# A whole number of 2 MiB ranges: QEMU 11.1 refuses to map past a file's end.
log "writing the $size data file"
head -c "$size" /dev/urandom >"$work/share/data"

# The guest runs each job on a fresh mount per mode, the modes alternating (and
# their order swapping every repetition); results collect in the guest's /tmp
# and go to the share at the end, through a dax=never mount.
cat >"$work/guest.sh" <<EOF
set -e
mkdir -p /mnt/share /tmp/out
# The kernel's line about the window, for the host to check.
dmesg | grep -o 'virtiofs virtio[0-9]*: Cache len: .*' || true
run_job() { # MODE NAME REP FIO_ARGS...
	local mode=\$1 name=\$2 rep=\$3
	shift 3
	mount -t virtiofs share /mnt/share -o dax=\$mode
	# Fill the guest's view first (mappings, or its page cache for buffered
	# mmap), then measure.
	cat /mnt/share/data >/dev/null
	fio --name="\$name" --filename=/mnt/share/data --size=$size --runtime=$runtime --time_based \\
		--invalidate=0 --output-format=json --output="/tmp/out/\$mode-\$rep-\$name.json" "\$@" >/dev/null
	umount /mnt/share
	echo "guest| \$mode \$name rep \$rep done"
}
for rep in \$(seq $reps); do
	order="always never"
	[ \$((rep % 2)) = 1 ] || order="never always"
	for job in psync-randread-4k psync-read-1m mmap-randread-4k mmap-read-1m; do
		engine=\${job%%-*} rest=\${job#*-}
		rw=\${rest%-*} bs=\${rest#*-}
		direct=1
		[ "\$engine" = psync ] || direct=0
		for mode in \$order; do
			run_job "\$mode" "\$job" "\$rep" --ioengine="\$engine" --rw="\$rw" --bs="\$bs" --direct=\$direct
		done
	done
done
mount -t virtiofs share /mnt/share -o dax=never
mkdir -p /mnt/share/out
cp /tmp/out/*.json /mnt/share/out/
umount /mnt/share
EOF

log "starting berth with a 1 GiB window"
"$BERTH" --socket-path "$work/fs.sock" --shared-dir "$work/share" --tag share \
	--max-request-queues 1 --dax-window 1G >"$work/berth.log" 2>&1 &
daemon_pid=$!
for _ in $(seq 100); do
	[ -S "$work/fs.sock" ] && break
	sleep 0.1
done
[ -S "$work/fs.sock" ] || die "berth did not create its socket: $(cat "$work/berth.log")"
rc=0
guest_boot --qemu sid --script "$work/guest.sh" --console "$work/console.log" --timeout 1800 \
	--fs "share=$work/fs.sock,device=generic" || rc=$?
wait "$daemon_pid" || true
daemon_pid=""
[ "$rc" = 0 ] || die "the guest failed (status $rc); console: $(tail -n 20 "$work/console.log")"
grep -a 'Cache len: 0x40000000' "$work/console.log" >/dev/null ||
	die "the guest saw no 1 GiB DAX window; console: $work/console.log"
window=$(sed -n 's/.*DAX window at exit: \(.*\)\./\1/p' "$work/berth.log")
log "berth's window at exit: $window"

mkdir -p "$(dirname "$json")"
python3 - "$work/share/out" "$json" "$runtime" "$size" "$reps" "$window" <<'EOF'
import json, os, statistics, sys
results, out, runtime, size, reps, window = sys.argv[1:7]
rows = {}
for name in sorted(os.listdir(results)):
    mode, rep, job = name[:-5].split("-", 2)
    with open(os.path.join(results, name)) as f:
        side = json.load(f)["jobs"][0]["read"]
    rows.setdefault(job, {}).setdefault(mode, []).append(
        {"rep": int(rep), "iops": side["iops"], "bw_bytes": side["bw_bytes"],
         "p99_us": side["clat_ns"]["percentile"].get("99.000000", 0) / 1000})
print(f"{'job':<20} {'DAX IOPS':>10} {'no-DAX IOPS':>12} {'ratio':>7} {'DAX MiB/s':>10} {'no-DAX MiB/s':>13}")
table = []
for job in ["psync-randread-4k", "psync-read-1m", "mmap-randread-4k", "mmap-read-1m"]:
    modes = rows.get(job, {})
    def med(mode, key):
        values = [r[key] for r in modes.get(mode, [])]
        return statistics.median(values) if values else float("nan")
    dax, plain = med("always", "iops"), med("never", "iops")
    ratio = dax / plain if plain else float("nan")
    print(f"{job:<20} {dax:>10.0f} {plain:>12.0f} {ratio:>6.2f}x {med('always', 'bw_bytes') / 2**20:>10.1f} {med('never', 'bw_bytes') / 2**20:>13.1f}")
    table.append({"job": job, "dax_iops": dax, "nodax_iops": plain, "ratio": ratio,
                  "dax_mib_s": med("always", "bw_bytes") / 2**20,
                  "nodax_mib_s": med("never", "bw_bytes") / 2**20})
with open(out, "w") as f:
    json.dump({"runtime_s": int(runtime), "file_size": size, "repetitions": int(reps),
               "window_at_exit": window, "table": table, "runs": rows}, f, indent=1)
print(f"(medians of {reps} run(s) per mode, {runtime} s per job; JSON in {out})")
EOF
