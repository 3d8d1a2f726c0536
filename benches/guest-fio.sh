#!/usr/bin/env bash
# In-guest fio matrix, berth against virtiofsd in one run: boots the guest
# harness's Linux guest (guest-images/) once per daemon and repetition, each
# time on a fresh daemon serving the same directory, and runs fio inside:
# psync and libaio (QD 16) x 4 KiB random read/write and 1 MiB sequential
# read/write, O_DIRECT, on a 256 MiB file the host wrote. Prints IOPS, MiB/s
# and the berth/virtiofsd ratio per job (medians over the repetitions) and
# writes the table and raw fio results as JSON.
#
# Under QEMU TCG the guest's CPU time dominates these numbers: they show
# whether a daemon holds the guest back, not what the daemon can do (for that,
# see benches/compare.sh and its load generator).
#
# Usage: benches/guest-fio.sh [--quick] [--reps N] [--runtime SECONDS] [--json FILE]
#        (as root; builds berth, installs virtiofsd 1.14.0 into the cache)
source "$(dirname "${BASH_SOURCE[0]}")/../guest-images/lib.sh"

reps=2 runtime=10 size=256M json=""
while [ $# -gt 0 ]; do
	case $1 in
	--quick) reps=1 runtime=3 size=64M; shift ;;
	--reps) reps=$2; shift 2 ;;
	--runtime) runtime=$2; shift 2 ;;
	--json) json=$2; shift 2 ;;
	-h | --help) sed -n '2,15p' "$0"; exit 0 ;;
	*) die "unknown argument $1" ;;
	esac
done
require_root
[ -n "$json" ] || json=$REPO_ROOT/benches/results/guest-fio.json

prepare_guest
daemon_binary virtiofsd
VIRTIOFSD=$DAEMON
daemon_binary berth
BERTH=$DAEMON

work=$(mktemp -d /tmp/berth-guest-fio.XXXXXX)
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
log "writing the $size data file"
head -c "$size" /dev/urandom >"$work/share/data"

# The guest runs every job of the matrix and leaves fio's JSON in the share.
cat >"$work/guest.sh" <<EOF
set -e
mkdir -p /mnt/share
mount -t virtiofs share /mnt/share
out=/mnt/share/out
mkdir -p "\$out"
for engine in psync libaio; do
	depth=1
	[ "\$engine" = libaio ] && depth=16
	for job in randread:4k randwrite:4k read:1m write:1m; do
		rw=\${job%%:*} bs=\${job#*:}
		name=\$engine-\$rw-\$bs
		echo "guest| \$name"
		fio --name="\$name" --filename=/mnt/share/data --size=$size --bs="\$bs" --rw="\$rw" \\
			--ioengine="\$engine" --iodepth="\$depth" --direct=1 --runtime=$runtime --time_based \\
			--output-format=json --output="/tmp/\$name.json" >/dev/null
		cp "/tmp/\$name.json" "\$out/\$name.json"
	done
done
umount /mnt/share
EOF

# run_once DAEMON_KIND REP: one guest boot against a fresh daemon.
run_once() {
	local kind=$1 rep=$2 binary=$BERTH
	[ "$kind" = berth ] || binary=$VIRTIOFSD
	rm -rf "$work/share/out" "$work/fs.sock"
	# Both with their default confinement (namespace sandbox, seccomp kill).
	"$binary" --socket-path "$work/fs.sock" --shared-dir "$work/share" --cache auto \
		>"$work/$kind-$rep.log" 2>&1 &
	daemon_pid=$!
	for _ in $(seq 100); do
		[ -S "$work/fs.sock" ] && break
		sleep 0.1
	done
	[ -S "$work/fs.sock" ] || die "$kind did not create its socket: $(cat "$work/$kind-$rep.log")"
	log "$kind, repetition $rep: booting the guest"
	local rc=0
	guest_boot --script "$work/guest.sh" --console "$work/$kind-$rep.console" --timeout 1200 \
		--fs "share=$work/fs.sock" || rc=$?
	wait "$daemon_pid" || true
	daemon_pid=""
	[ "$rc" = 0 ] || die "the guest failed with $kind (status $rc); console: $(tail -n 20 "$work/$kind-$rep.console")"
	mkdir -p "$work/results/$kind-$rep"
	cp "$work/share/out"/*.json "$work/results/$kind-$rep/"
}

for rep in $(seq "$reps"); do
	# Alternate the order so that neither daemon always runs on a warmer host.
	if [ $((rep % 2)) = 1 ]; then order=(berth virtiofsd); else order=(virtiofsd berth); fi
	for kind in "${order[@]}"; do run_once "$kind" "$rep"; done
done

mkdir -p "$(dirname "$json")"
python3 - "$work/results" "$json" "$runtime" "$size" "$reps" <<'EOF'
import json, os, statistics, sys
results, out, runtime, size, reps = sys.argv[1:6]
rows = {}
raw = {}
for run in sorted(os.listdir(results)):
    kind = run.rsplit("-", 1)[0]
    for name in sorted(os.listdir(os.path.join(results, run))):
        with open(os.path.join(results, run, name)) as f:
            job = json.load(f)["jobs"][0]
        side = job["read"] if job["read"]["io_bytes"] > 0 else job["write"]
        entry = rows.setdefault(name[:-5], {}).setdefault(kind, [])
        entry.append((side["iops"], side["bw_bytes"] / 2**20, side["clat_ns"]["percentile"].get("99.000000", 0) / 1000))
        raw.setdefault(run, {})[name[:-5]] = {"iops": side["iops"], "bw_bytes": side["bw_bytes"], "clat_ns": side["clat_ns"]}
print(f"{'job':<24} {'berth IOPS':>11} {'virtiofsd IOPS':>15} {'ratio':>7} {'berth MiB/s':>12} {'vfsd MiB/s':>11} {'p99 µs berth/vfsd':>19}")
table = []
for name, kinds in rows.items():
    def med(kind, i):
        values = [v[i] for v in kinds.get(kind, [])]
        return statistics.median(values) if values else float("nan")
    b, v = med("berth", 0), med("virtiofsd", 0)
    ratio = b / v if v else float("nan")
    print(f"{name:<24} {b:>11.0f} {v:>15.0f} {ratio:>6.2f}x {med('berth', 1):>12.1f} {med('virtiofsd', 1):>11.1f} {med('berth', 2):>9.0f}/{med('virtiofsd', 2):<9.0f}")
    table.append({"job": name, "berth_iops": b, "virtiofsd_iops": v, "ratio": ratio,
                  "berth_mib_s": med("berth", 1), "virtiofsd_mib_s": med("virtiofsd", 1),
                  "berth_p99_us": med("berth", 2), "virtiofsd_p99_us": med("virtiofsd", 2)})
with open(out, "w") as f:
    json.dump({"runtime_s": int(runtime), "file_size": size, "repetitions": int(reps), "table": table, "runs": raw}, f, indent=1)
print(f"(medians of {reps} run(s) per daemon, {runtime} s per job; JSON in {out})")
EOF
