#!/usr/bin/env bash
# DAX against no DAX, and against virtiofsd, inside one guest: boots Debian sid's
# QEMU 11.1 once with two virtio-fs devices on the same host directory: berth
# with --dax-window 1G on the generic vhost-user device (the only one that
# offers a window), tag `share`, and virtiofsd 1.14 (which has no window) on
# vhost-user-fs-pci, tag `vfsd`, both with --cache auto and their default
# confinement. fio runs on the same host file through a berth `dax=always`
# mount, a berth `dax=never` mount and a virtiofsd mount, alternating mount by
# mount: 4 KiB random read and 1 MiB sequential read, with psync (O_DIRECT: no
# guest page cache, as with cache=none) and fio's mmap engine (MAP_SHARED,
# buffered: without DAX the guest's page cache, warmed by a read of the whole
# file before each job, serves it). The file is in the host's page cache
# throughout (written just before). Prints IOPS, MiB/s and the ratios berth
# DAX/no DAX, berth DAX/virtiofsd and berth no DAX/virtiofsd per job (medians
# over the repetitions) and writes the table and raw numbers as JSON.
#
# Under QEMU TCG the guest's CPU time dominates: the ratios show how much FUSE
# round trips cost against loads from the window, not absolute speed.
#
# Usage: benches/guest-dax.sh [--quick] [--reps N] [--runtime SECONDS] [--json FILE]
#        (as root; builds berth, installs virtiofsd 1.14.0 and fetches sid's
#        QEMU into the cache)
source "$(dirname "${BASH_SOURCE[0]}")/../guest-images/lib.sh"

reps=2 runtime=8 size=256M json=""
while [ $# -gt 0 ]; do
	case $1 in
	--quick) reps=1 runtime=3 size=64M; shift ;;
	--reps) reps=$2; shift 2 ;;
	--runtime) runtime=$2; shift 2 ;;
	--json) json=$2; shift 2 ;;
	-h | --help) sed -n '2,22p' "$0"; exit 0 ;;
	*) die "unknown argument $1" ;;
	esac
done
require_root
[ -n "$json" ] || json=$REPO_ROOT/benches/results/guest-dax.json

prepare_guest
fetch_qemu_sid
daemon_binary virtiofsd
VIRTIOFSD=$DAEMON
daemon_binary berth
BERTH=$DAEMON

work=$(mktemp -d /tmp/berth-guest-dax.XXXXXX)
berth_pid="" virtiofsd_pid=""
# stop_daemon PID: ends one daemon (if it still runs) and reaps it.
stop_daemon() {
	[ -n "$1" ] || return 0
	kill "$1" 2>/dev/null || true
	wait "$1" 2>/dev/null || true
}
cleanup() {
	stop_daemon "$berth_pid"
	stop_daemon "$virtiofsd_pid"
	rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/share" "$work/results"
# A whole number of 2 MiB ranges: QEMU 11.1 refuses to map past a file's end.
log "writing the $size data file"
head -c "$size" /dev/urandom >"$work/share/data"

# The guest runs each job on a fresh mount per mode, the modes alternating (and
# their order rotating every repetition); results collect in the guest's /tmp
# and go to the share at the end, through a berth dax=never mount. Modes:
# always and never (berth, tag share), virtiofsd (tag vfsd).
cat >"$work/guest.sh" <<EOF
set -e
mkdir -p /mnt/share /tmp/out
# The kernel's line about the window, for the host to check.
dmesg | grep -o 'virtiofs virtio[0-9]*: Cache len: .*' || true
run_job() { # MODE NAME REP FIO_ARGS...
	local mode=\$1 name=\$2 rep=\$3
	shift 3
	case \$mode in
	virtiofsd) mount -t virtiofs vfsd /mnt/share -o dax=never ;;
	*) mount -t virtiofs share /mnt/share -o dax=\$mode ;;
	esac
	# Fill the guest's view first (mappings, or its page cache for buffered
	# mmap), then measure.
	cat /mnt/share/data >/dev/null
	fio --name="\$name" --filename=/mnt/share/data --size=$size --runtime=$runtime --time_based \\
		--invalidate=0 --output-format=json --output="/tmp/out/\$mode-\$rep-\$name.json" "\$@" >/dev/null
	umount /mnt/share
	echo "guest| \$mode \$name rep \$rep done"
}
for rep in \$(seq $reps); do
	case \$((rep % 3)) in
	1) order="always never virtiofsd" ;;
	2) order="never virtiofsd always" ;;
	0) order="virtiofsd always never" ;;
	esac
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

# wait_socket NAME SOCKET LOG: waits up to 10 s for a daemon's socket.
wait_socket() {
	for _ in $(seq 100); do
		[ -S "$2" ] && return 0
		sleep 0.1
	done
	die "$1 did not create its socket: $(cat "$3")"
}

log "starting berth with a 1 GiB window and virtiofsd on the same directory"
# Both with their default confinement (namespace sandbox, seccomp kill).
"$BERTH" --socket-path "$work/berth.sock" --shared-dir "$work/share" --tag share \
	--max-request-queues 1 --dax-window 1G --cache auto >"$work/berth.log" 2>&1 &
berth_pid=$!
"$VIRTIOFSD" --socket-path "$work/virtiofsd.sock" --shared-dir "$work/share" --cache auto \
	>"$work/virtiofsd.log" 2>&1 &
virtiofsd_pid=$!
wait_socket berth "$work/berth.sock" "$work/berth.log"
wait_socket virtiofsd "$work/virtiofsd.sock" "$work/virtiofsd.log"
rc=0
guest_boot --qemu sid --script "$work/guest.sh" --console "$work/console.log" --timeout 2700 \
	--fs "share=$work/berth.sock,device=generic,queue-size=128" \
	--fs "vfsd=$work/virtiofsd.sock,queue-size=128" || rc=$?
# Both end when QEMU disconnects.
wait "$berth_pid" || true
berth_pid=""
wait "$virtiofsd_pid" || true
virtiofsd_pid=""
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
def ratio(a, b):
    return a / b if b else float("nan")
print(f"{'':<20} {'IOPS':^29} {'MiB/s':^29} {'ratios (IOPS)':^26}")
print(f"{'job':<20} {'DAX':>9} {'no DAX':>9} {'vfsd':>9} {'DAX':>9} {'no DAX':>9} {'vfsd':>9}"
      f" {'DAX/noDAX':>9} {'DAX/vfsd':>8} {'noDAX/vfsd':>10}")
table = []
for job in ["psync-randread-4k", "psync-read-1m", "mmap-randread-4k", "mmap-read-1m"]:
    modes = rows.get(job, {})
    def med(mode, key):
        values = [r[key] for r in modes.get(mode, [])]
        return statistics.median(values) if values else float("nan")
    dax, plain, vfsd = med("always", "iops"), med("never", "iops"), med("virtiofsd", "iops")
    mib = {mode: med(mode, "bw_bytes") / 2**20 for mode in ("always", "never", "virtiofsd")}
    row = {"job": job, "dax_iops": dax, "nodax_iops": plain, "ratio": ratio(dax, plain),
           "dax_mib_s": mib["always"], "nodax_mib_s": mib["never"],
           "virtiofsd_iops": vfsd, "virtiofsd_mib_s": mib["virtiofsd"],
           "dax_over_virtiofsd": ratio(dax, vfsd), "nodax_over_virtiofsd": ratio(plain, vfsd)}
    print(f"{job:<20} {dax:>9.0f} {plain:>9.0f} {vfsd:>9.0f} {mib['always']:>9.1f} {mib['never']:>9.1f}"
          f" {mib['virtiofsd']:>9.1f} {row['ratio']:>8.2f}x {row['dax_over_virtiofsd']:>7.2f}x"
          f" {row['nodax_over_virtiofsd']:>9.2f}x")
    table.append(row)
with open(out, "w") as f:
    json.dump({"runtime_s": int(runtime), "file_size": size, "repetitions": int(reps),
               "virtiofsd": "1.14.0", "window_at_exit": window, "table": table, "runs": rows},
              f, indent=1)
print(f"(medians of {reps} run(s) per mode, {runtime} s per job; DAX and no DAX are berth's"
      f" dax=always and dax=never mounts, vfsd virtiofsd's; JSON in {out})")
EOF
