#!/usr/bin/env bash
# `berth fuse` against the native filesystem and libfuse's passthrough_hp example: one tmpfs,
# served by every peer at once, and each workload run on each peer one after the other in
# every repetition (the order rotates from one repetition to the next); ratios come from the
# same repetition. Peers:
#   native       the tmpfs itself
#   hp           libfuse's passthrough_hp example (built from Debian's fuse3 sources, see
#                --libfuse) with --nocache --direct-io: timeouts 0 and files opened DIRECT_IO,
#                as berth's --cache never; no passthrough, the classic /dev/fuse transport
#   hp-pass      passthrough_hp with FUSE passthrough (--nocache, no --direct-io, which would
#                take precedence), where its libfuse has it (3.17+; not bookworm's 3.14)
#   hp-uring     passthrough_hp as hp, over io_uring (-o io_uring; libfuse 3.18+ built with
#                liburing)
#   hp-both      passthrough_hp as hp-pass, over io_uring
#   classic      berth fuse --cache never --passthrough never --io-uring never
#   passthrough  berth fuse --cache never --passthrough always --io-uring never
#   uring        berth fuse --cache never --passthrough never --io-uring always
#   both         berth fuse --cache never --passthrough always --io-uring always
# Workloads: fio psync 4 KiB random read and write at 1 and 2 jobs, 1 MiB sequential read and
# write at 1 job (on one file of --size MiB); a stat storm and a create/unlink storm at 1 and
# 2 workers (a Python loop per worker in its own directory of --files files). Prints medians,
# the per-repetition ratios' median and spread, and each of issue 17's goals against its
# ratio: passthrough data I/O >= 0.8x native, io_uring metadata >= 1.3x classic, every berth
# mode >= 1.2x passthrough_hp in the same mode class. Ratios never fail the script; a peer
# that does not mount, or does not serve the way it was asked to, does.
#
# Usage: benches/fuse-compare.sh [--runtime S] [--size MIB] [--files N] [--reps R]
#                                [--targets LIST] [--workloads LIST] [--libfuse FROM]
#                                [--json FILE] [--quick]
#   --runtime S       seconds per run (default 5; fio runs have a 1 s ramp before)
#   --size MIB        the data file's size (default 1024)
#   --files N         files per storm worker (default 1000)
#   --reps R          repetitions (default 3)
#   --targets LIST    comma-separated peers (default: all; io_uring ones only where the
#                     kernel has FUSE over io_uring)
#   --workloads LIST  comma-separated, of randread-4k-1 randread-4k-2 randwrite-4k-1
#                     randwrite-4k-2 read-1m-1 write-1m-1 stat-1 stat-2 create-1 create-2
#   --libfuse FROM    host (default): the example of the host's own libfuse3 (bookworm: 3.14,
#                     patched with benches/patches/ for --direct-io), compiled against its
#                     libfuse3-dev; or a Debian suite (sid): that suite's fuse3 source,
#                     library and example built with meson (static, not installed)
#   --quick           1 s runs, 1 repetition, a 128 MiB file, 300 files (a smoke run for CI)
# Needs root (mounts; the fuse module's enable_uring parameter, set to Y for the run and
# restored), fio, python3; passthrough_hp's build dependencies (libfuse3-dev; with a suite
# meson, ninja-build, liburing-dev, libnuma-dev) are installed if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
bench=fuse-compare
# shellcheck source=benches/lib-fuse.sh
. benches/lib-fuse.sh

runtime=5 size=1024 files=1000 reps=3 json="" targets="" workloads="" libfuse=host
while [ $# -gt 0 ]; do
	case $1 in
	--runtime) runtime=$2; shift 2 ;;
	--size) size=$2; shift 2 ;;
	--files) files=$2; shift 2 ;;
	--reps) reps=$2; shift 2 ;;
	--targets) targets=$2; shift 2 ;;
	--workloads) workloads=$2; shift 2 ;;
	--libfuse) libfuse=$2; shift 2 ;;
	--json) json=$2; shift 2 ;;
	--quick) runtime=1 reps=1 size=128 files=300; shift ;;
	-h | --help) sed -n '2,46p' "$0"; exit 0 ;;
	*) echo "fuse-compare.sh: unknown argument $1" >&2; exit 2 ;;
	esac
done
fuse_bench_require fio python3
FUSE_BENCH_RUNTIME=$runtime FUSE_BENCH_SIZE=$size FUSE_BENCH_FILES=$files

all_workloads=(randread-4k-1 randread-4k-2 randwrite-4k-1 randwrite-4k-2 read-1m-1 write-1m-1
	stat-1 stat-2 create-1 create-2)
if [ -n "$workloads" ]; then
	IFS=, read -r -a workload_list <<<"$workloads"
	for w in "${workload_list[@]}"; do
		case " ${all_workloads[*]} " in
		*" $w "*) ;;
		*) fuse_bench_die "unknown workload $w" ;;
		esac
	done
else
	workload_list=("${all_workloads[@]}")
fi

build_passthrough_hp "$libfuse"
# passthrough_hp's options per peer: like berth's --cache never (timeouts 0; files DIRECT_IO
# unless passthrough serves them).
hp_options=(--foreground --nocache)
passthrough_hp_has direct-io ||
	fuse_bench_die "passthrough_hp of libfuse $LIBFUSE_VERSION has no --direct-io option"
hp_pass="" hp_uring=""
if passthrough_hp_has nopassthrough; then
	# Passthrough is its default from 3.17 on.
	hp_pass=1
	hp_options+=(--nopassthrough)
fi
if [ "$libfuse" != host ] && ! version_lt "$LIBFUSE_VERSION" 3.18; then hp_uring=1; fi
uring=""
[ -e $FUSE_URING_PARAMETER ] && uring=1
if [ -n "$targets" ]; then
	IFS=, read -r -a target_list <<<"$targets"
else
	target_list=(native hp)
	if [ -n "$hp_pass" ]; then target_list+=(hp-pass); fi
	if [ -n "$hp_uring" ] && [ -n "$uring" ]; then target_list+=(hp-uring); fi
	if [ -n "$hp_pass" ] && [ -n "$hp_uring" ] && [ -n "$uring" ]; then target_list+=(hp-both); fi
	target_list+=(classic passthrough)
	if [ -n "$uring" ]; then
		target_list+=(uring both)
	else
		echo "no FUSE over io_uring in this kernel ($FUSE_URING_PARAMETER is missing): the io_uring peers left out"
	fi
fi
[ -n "$hp_pass" ] || echo "passthrough_hp of libfuse $LIBFUSE_VERSION has no FUSE passthrough: no hp-pass peer"
[ -n "$hp_uring" ] || echo "passthrough_hp of libfuse $LIBFUSE_VERSION (from $libfuse) has no FUSE over io_uring: no hp-uring peer"

fuse_bench_setup $((size * 2 + files * 2 * 4 * 2 / 1024 + 128))
case " ${target_list[*]} " in *uring* | *both*) fuse_bench_enable_uring ;; esac
dd if=/dev/urandom of="$WORK/src/data" bs=1M count="$size" status=none
fuse_bench_storm_files "$files" 2

berth_mount() { # NAME PASSTHROUGH IO_URING
	fuse_bench_mount "$WORK/$1" "$WORK/$1.log" "$BERTH" fuse --shared-dir "$WORK/src" \
		--mountpoint "$WORK/$1" --cache never --passthrough "$2" --io-uring "$3"
}
hp_mount() { # NAME OPTION...
	local name=$1
	shift
	fuse_bench_mount "$WORK/$name" "$WORK/$name.log" "$PASSTHROUGH_HP" "$@" "$WORK/src" "$WORK/$name"
	hp_pids[$name]=${FUSE_BENCH_PIDS[-1]}
	hp_used[$name]="$*"
}
declare -A hp_pids=() hp_used=()
for target in "${target_list[@]}"; do
	case $target in
	native) ;;
	hp) hp_mount hp "${hp_options[@]}" --direct-io ;;
	hp-pass)
		[ -n "$hp_pass" ] || fuse_bench_die "passthrough_hp of libfuse $LIBFUSE_VERSION has no passthrough"
		hp_mount hp-pass --foreground --nocache ;;
	hp-uring)
		[ -n "$hp_uring" ] || fuse_bench_die "passthrough_hp of libfuse $LIBFUSE_VERSION has no io_uring"
		hp_mount hp-uring "${hp_options[@]}" --direct-io -o io_uring ;;
	hp-both)
		if [ -z "$hp_pass" ] || [ -z "$hp_uring" ]; then
			fuse_bench_die "passthrough_hp of libfuse $LIBFUSE_VERSION lacks passthrough or io_uring"
		fi
		hp_mount hp-both --foreground --nocache -o io_uring ;;
	classic) berth_mount classic never never ;;
	passthrough) berth_mount passthrough always never ;;
	uring) berth_mount uring never always ;;
	both) berth_mount both always always ;;
	*) fuse_bench_die "unknown target $target" ;;
	esac
done
for target in uring both; do
	[ -e "$WORK/$target.log" ] || continue
	stat -c %s "$WORK/$target/data" >/dev/null
	grep -q "FUSE transport: io_uring" "$WORK/$target.log" ||
		{ cat "$WORK/$target.log" >&2; fuse_bench_die "the $target mount does not serve over io_uring"; }
done
# passthrough_hp says nothing when its io_uring does not start: its descriptors do.
for target in hp-uring hp-both; do
	[ -n "${hp_pids[$target]:-}" ] || continue
	stat -c %s "$WORK/$target/data" >/dev/null
	find "/proc/${hp_pids[$target]}/fd" -lname 'anon_inode:\[io_uring\]' 2>/dev/null | grep -q . ||
		{ cat "$WORK/$target.log" >&2; fuse_bench_die "the $target mount does not serve over io_uring"; }
done

echo "peers: ${target_list[*]}; workloads: ${workload_list[*]}; $reps repetitions of $runtime s"
results=()
count=${#target_list[@]}
for workload in "${workload_list[@]}"; do
	for rep in $(seq 1 "$reps"); do
		for i in $(seq 0 $((count - 1))); do
			target=${target_list[$(((i + rep - 1) % count))]}
			case $target in
			native) dir=$WORK/src ;;
			*) dir=$WORK/$target ;;
			esac
			value=$(fuse_bench_run "$dir" "$workload") ||
				fuse_bench_die "$workload on $target failed"
			results+=("{\"workload\":\"$workload\",\"rep\":$rep,\"target\":\"$target\",\"value\":$value}")
		done
	done
	echo "  $workload done ($(date +%H:%M:%S))"
done

fuse_bench_stop_mounts
for target in classic passthrough uring both; do
	log=$WORK/$target.log
	[ -e "$log" ] || continue
	printf '%-12s served: %s\n' "$target" "$(sed -n 's/.*FUSE requests served: \(.*\)\./\1/p' "$log")"
	sed -n 's/.*FUSE requests by transport: \(.*\)\./             by transport: \1/p' "$log"
	sed -n 's/.*FUSE passthrough backing files: \(.*\)\./             backing files: \1/p' "$log"
done
for target in passthrough both; do
	log=$WORK/$target.log
	[ -e "$log" ] || continue
	# The data of a passthrough mount never reaches berth.
	if sed -n 's/.*FUSE requests served: \(.*\)\./\1/p' "$log" | grep -Eq '(^| )(READ|WRITE)='; then
		fuse_bench_die "the $target mount served READ or WRITE requests itself"
	fi
done
for target in hp-pass hp-both; do
	log=$WORK/$target.log
	[ -e "$log" ] || continue
	if grep -q "disabling rw passthrough" "$log"; then
		cat "$log" >&2
		fuse_bench_die "the $target mount turned its passthrough off"
	fi
done
hp_desc=""
for target in "${!hp_used[@]}"; do hp_desc+="$target: ${hp_used[$target]}; "; done

meta=$(printf '{"runtime":%s,"size_mib":%s,"files":%s,"reps":%s,"kernel":"%s","libfuse":"%s","berth":"%s","hp_options":"%s"}' \
	"$runtime" "$size" "$files" "$reps" "$(uname -r)" "$LIBFUSE_VERSION" \
	"$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" "${hp_desc%; }")
printf '%s\n' "${results[@]}" | python3 benches/fuse-table.py "$meta" "${json:-}"
