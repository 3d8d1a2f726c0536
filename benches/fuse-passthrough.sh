#!/usr/bin/env bash
# `berth fuse` data I/O against the native filesystem: the same file on a tmpfs, read and
# written with fio (psync) directly, through `berth fuse --passthrough never` (classic: every
# byte goes through berth) and through `berth fuse --passthrough always` (the kernel serves the
# data from the host file), both with --cache never. Workloads: 4 KiB random read and random
# write at 1 and 2 jobs, 1 MiB sequential read at 1 job; for each, the three targets run one
# after the other (alternating, per repetition) and the ratios to native come from the same
# repetition. It also prints the READ and WRITE requests each mount served (from berth's exit
# log): passthrough must show none.
#
# Usage: benches/fuse-passthrough.sh [--runtime S] [--size MIB] [--reps R] [--json FILE] [--quick]
#   --runtime S  seconds per fio run (default 10)
#   --size MIB   the file's size (default 1024)
#   --reps R     repetitions; medians are reported, ratios as the median of each repetition's
#                ratio (default 1)
#   --quick      2 s runs on a 128 MiB file (a smoke run for CI)
# Needs root (mounts) and fio, python3.
set -euo pipefail
cd "$(dirname "$0")/.."

runtime=10 size=1024 reps=1 json=""
while [ $# -gt 0 ]; do
	case $1 in
	--runtime) runtime=$2; shift 2 ;;
	--size) size=$2; shift 2 ;;
	--reps) reps=$2; shift 2 ;;
	--json) json=$2; shift 2 ;;
	--quick) runtime=2; size=128; shift ;;
	-h | --help) sed -n '2,18p' "$0"; exit 0 ;;
	*) echo "fuse-passthrough.sh: unknown argument $1" >&2; exit 2 ;;
	esac
done
[ "$(id -u)" -eq 0 ] || { echo "fuse-passthrough.sh: needs root (it mounts)" >&2; exit 1; }
for tool in fio python3; do
	command -v $tool >/dev/null || { echo "fuse-passthrough.sh: needs $tool" >&2; exit 1; }
done

cargo build --release --quiet --bin berth
berth=${CARGO_TARGET_DIR:-$PWD/target}/release/berth
work=$(mktemp -d /var/tmp/berth-fuse-passthrough.XXXXXX)
mounts=() pids=()
cleanup() {
	for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
	for m in "${mounts[@]}"; do umount -l "$m" 2>/dev/null || true; done
	umount -l "$work/src" 2>/dev/null || true
	rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/src" "$work/classic" "$work/passthrough"
mount -t tmpfs -o size=$((size * 2 + 64))m berth-bench "$work/src"
dd if=/dev/urandom of="$work/src/data" bs=1M count="$size" status=none

# start_mount DIR MODE LOG: berth fuse of the tmpfs on DIR with --passthrough MODE.
start_mount() {
	local dir=$1 mode=$2 log=$3 i
	"$berth" fuse --shared-dir "$work/src" --mountpoint "$dir" --cache never \
		--passthrough "$mode" >"$log" 2>&1 &
	pids+=($!)
	for i in $(seq 1 200); do
		mountpoint -q "$dir" && break
		sleep 0.05
	done
	mountpoint -q "$dir" || { cat "$log" >&2; echo "mount failed" >&2; exit 1; }
	mounts+=("$dir")
}
start_mount "$work/classic" never "$work/classic.log"
start_mount "$work/passthrough" always "$work/passthrough.log"

# run_fio DIR RW BS JOBS: prints the IOPS and the bytes per second of one fio run.
cat >"$work/fio-result.py" <<'EOF'
import json, sys
job = json.load(sys.stdin)["jobs"][0]
side = job["read"] if job["read"]["io_bytes"] > 0 else job["write"]
iops, bw = side["iops"], side["bw_bytes"]
print(f"{iops:.0f} {bw:.0f}")
EOF
run_fio() {
	local out
	out=$(fio --name=b --filename="$1/data" --rw="$2" --bs="$3" --numjobs="$4" --ioengine=psync \
		--size="${size}m" --time_based --runtime="$runtime" --ramp_time=1 \
		--group_reporting --output-format=json)
	python3 "$work/fio-result.py" <<<"$out"
}

workloads=("randread 4k 1" "randread 4k 2" "randwrite 4k 1" "randwrite 4k 2" "read 1m 1")
results=()
for workload in "${workloads[@]}"; do
	read -r rw bs jobs <<<"$workload"
	for rep in $(seq 1 "$reps"); do
		for target in native classic passthrough; do
			case $target in
			native) dir=$work/src ;;
			*) dir=$work/$target ;;
			esac
			result=$(run_fio "$dir" "$rw" "$bs" "$jobs")
			read -r iops bw <<<"$result"
			results+=("{\"workload\":\"$rw $bs x$jobs\",\"rep\":$rep,\"target\":\"$target\",\"iops\":$iops,\"bytes_per_s\":$bw}")
		done
	done
done

for i in "${!pids[@]}"; do
	kill -TERM "${pids[$i]}"
	wait "${pids[$i]}" 2>/dev/null || true
done
pids=() mounts=()
served() { sed -n 's/.*FUSE requests served: \(.*\)\./\1/p' "$1"; }
printf 'classic mount served:     %s\n' "$(served "$work/classic.log")"
printf 'passthrough mount served: %s\n' "$(served "$work/passthrough.log")"
sed -n 's/.*FUSE passthrough backing files: \(.*\)\./passthrough backing files: \1/p' \
	"$work/passthrough.log"

cat >"$work/table.py" <<'EOF'
import json, statistics, sys
rows = [json.loads(line) for line in sys.stdin]
runtime, size = sys.argv[1], sys.argv[2]
by = {}
for r in rows:
    by.setdefault(r["workload"], {}).setdefault(r["target"], []).append(r)
print(f"\nfio psync, {runtime} s per run, a {size} MiB file on tmpfs, berth with --cache never")
header = ("workload", "native", "classic", "passthrough", "classic/n", "pass/n")
print("%-18s %12s %12s %12s %10s %8s" % header)
for workload, targets in by.items():
    sequential = workload.startswith("read 1m")
    key = "bytes_per_s" if sequential else "iops"
    n, c, p = (statistics.median(s[key] for s in targets[t]) for t in ("native", "classic", "passthrough"))
    # Ratios within each repetition (the three ran back to back), then their median: the
    # machine's load drifts between repetitions more than within one.
    native = {s["rep"]: s[key] for s in targets["native"]}
    def ratio(target):
        return statistics.median(s[key] / native[s["rep"]] for s in targets[target])
    unit = (lambda v: "%.2f GB/s" % (v / 1e9)) if sequential else (lambda v: "%.0f k/s" % (v / 1e3))
    print("%-18s %12s %12s %12s %9.2fx %7.2fx" % (workload, unit(n), unit(c), unit(p), ratio("classic"), ratio("passthrough")))
EOF
printf '%s\n' "${results[@]}" | python3 "$work/table.py" "$runtime" "$size"

if [ -n "$json" ]; then
	printf '%s\n' "${results[@]}" >"$json"
	echo "raw results: $json"
fi
