#!/usr/bin/env bash
# Shared caching on the host: two `berth fuse` mounts of one directory, with --shared-cache,
# --cache auto and --cache never, on metadata-heavy workloads. For each mode and workload it
# prints the wall time, the FUSE requests mount A served (from berth's exit log) and the
# staleness window: how long after a change through mount A (or by a host process) mount B
# first shows it.
#
# Usage: benches/shared-cache.sh [--files N] [--reps R] [--json FILE] [--quick]
#   --files N   files in the stat-storm tree (default 100000)
#   --reps R    staleness samples per mode and source (default 20)
#   --quick     10 000 files, 5 samples (a smoke run)
# Needs root (mounts) and git, tar, python3.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=benches/metadata-trees.sh
. benches/metadata-trees.sh

files=100000 reps=20 json=""
while [ $# -gt 0 ]; do
	case $1 in
	--files) files=$2; shift 2 ;;
	--reps) reps=$2; shift 2 ;;
	--json) json=$2; shift 2 ;;
	--quick) files=10000; reps=5; shift ;;
	-h | --help) sed -n '2,12p' "$0"; exit 0 ;;
	*) echo "shared-cache.sh: unknown argument $1" >&2; exit 2 ;;
	esac
done
[ "$(id -u)" -eq 0 ] || { echo "shared-cache.sh: needs root (it mounts)" >&2; exit 1; }
for tool in git tar python3; do
	command -v $tool >/dev/null || { echo "shared-cache.sh: needs $tool" >&2; exit 1; }
done

cargo build --release --quiet --bin berth
berth=${CARGO_TARGET_DIR:-$PWD/target}/release/berth
work=$(mktemp -d /var/tmp/berth-shared-cache.XXXXXX)
mounts=()
cleanup() {
	for m in "${mounts[@]}"; do umount -l "$m" 2>/dev/null || true; done
	rm -rf "$work"
}
trap cleanup EXIT
share=$work/share
mkdir -p "$share" "$work/a" "$work/b"

echo "preparing: a $files-file tree, a git checkout, a tarball" >&2
stat_tree "$share/tree" "$files"
repo_files=$((files / 20))
git_checkout "$work/repo-src" "$share/repo" "$work/untar.tar" "$repo_files"

# start_mount DIR MODE LOG: one berth fuse mount of $share on DIR; its pid in $mount_pid.
mount_pid=""
start_mount() {
	local dir=$1 mode=$2 log=$3 flags=()
	case $mode in
	shared) flags=(--shared-cache --version-table "$work/versions.table") ;;
	auto) flags=(--cache auto) ;;
	never) flags=(--cache never) ;;
	esac
	"$berth" fuse --shared-dir "$share" --mountpoint "$dir" "${flags[@]}" >"$log" 2>&1 &
	mount_pid=$!
	local i
	for i in $(seq 1 200); do
		mountpoint -q "$dir" && break
		sleep 0.05
	done
	mountpoint -q "$dir" || { cat "$log" >&2; echo "mount failed" >&2; exit 1; }
	mounts+=("$dir")
}

# stop_mount PID: SIGTERM, and wait until it has unmounted and logged its request counts.
stop_mount() {
	kill -TERM "$1"
	wait "$1" 2>/dev/null || true
}

count_of() {
	local v
	v=$(sed -n "s/.*FUSE requests served: .*\b$2=\([0-9]*\).*/\1/p" "$1" | tail -n1)
	echo "${v:-0}"
}
requests() { count_of "$1" total; }
lookups() { count_of "$1" LOOKUP; }

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.3f", b - a }'; }

stat_storm() {
	python3 - "$1" <<'EOF'
import os, sys
n = 0
for dirpath, dirnames, filenames in os.walk(sys.argv[1]):
    for f in filenames:
        os.lstat(os.path.join(dirpath, f))
        n += 1
EOF
}

results=()
record() { results+=("$1"); printf '%s\n' "$1"; }

for mode in shared auto never; do
	# Workloads through mount A while mount B is mounted too (as two guests would be).
	for workload in stat-storm git-status untar; do
		# The warm pass's requests: a run with it minus a run without it.
		for pass in cold warm; do
			rm -f "$work/versions.table"
			start_mount "$work/a" "$mode" "$work/a.log"
			pa=$mount_pid
			start_mount "$work/b" "$mode" "$work/b.log"
			pb=$mount_pid
			secs=0
			case $workload in
			stat-storm)
				stat_storm "$work/a/tree"
				if [ $pass = warm ]; then
					t=$(now)
					stat_storm "$work/a/tree"
					secs=$(since "$t")
				fi
				;;
			git-status)
				git -C "$work/a/repo" status --porcelain >/dev/null
				if [ $pass = warm ]; then
					t=$(now)
					git -C "$work/a/repo" status --porcelain >/dev/null
					secs=$(since "$t")
				fi
				;;
			untar)
				if [ $pass = warm ]; then
					dest=$work/a/untar-$mode
					mkdir "$dest"
					t=$(now)
					tar -C "$dest" -xf "$work/untar.tar"
					secs=$(since "$t")
				fi
				;;
			esac
			stop_mount "$pb"
			stop_mount "$pa"
			mounts=()
			if [ $pass = cold ]; then
				cold_requests=$(requests "$work/a.log")
				cold_lookups=$(lookups "$work/a.log")
			fi
		done
		record "{\"mode\":\"$mode\",\"workload\":\"$workload\",\"seconds\":$secs,\"requests\":$(($(requests "$work/a.log") - cold_requests)),\"lookups\":$(($(lookups "$work/a.log") - cold_lookups))}"
	done

	# Staleness: B has the file's attributes cached; A (or a host process) chmods it; how
	# long until B's stat shows the new mode.
	start_mount "$work/a" "$mode" "$work/a.log"
	pa=$mount_pid
	start_mount "$work/b" "$mode" "$work/b.log"
	pb=$mount_pid
	for source in mount host; do
		out=$(python3 - "$work/a/stale" "$work/b/stale" "$share/stale" "$source" "$reps" <<'EOF'
import os, sys, time, statistics
via_a, via_b, on_host, source, reps = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
with open(via_a, "w") as f:
    f.write("x")
changer = via_a if source == "mount" else on_host
samples = []
mode = 0o600
for i in range(reps):
    os.stat(via_b)
    time.sleep(0.05)
    os.stat(via_b)  # cached now (for the caching modes)
    mode = 0o644 if mode == 0o600 else 0o600
    t0 = time.perf_counter()
    os.chmod(changer, mode)
    while (os.stat(via_b).st_mode & 0o777) != mode:
        if time.perf_counter() - t0 > 5:
            break
    samples.append(time.perf_counter() - t0)
    time.sleep(0.05)
samples.sort()
print(f"{statistics.median(samples) * 1000:.3f} {samples[-1] * 1000:.3f}")
EOF
)
		read -r median worst <<<"$out"
		record "{\"mode\":\"$mode\",\"workload\":\"staleness-$source\",\"median_ms\":$median,\"max_ms\":$worst}"
	done
	stop_mount "$pb"
	stop_mount "$pa"
	mounts=()
done

if [ -n "$json" ]; then
	printf '%s\n' "${results[@]}" | python3 -c 'import json,sys; print(json.dumps([json.loads(l) for l in sys.stdin], indent=1))' >"$json"
fi
