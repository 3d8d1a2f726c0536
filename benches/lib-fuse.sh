# shellcheck shell=bash
# Shared pieces of the `berth fuse` benchmarks (sourced by benches/fuse-compare.sh): the
# root and tool checks, a tmpfs source in a work directory cleaned up at exit, mounts started
# in the background and stopped with SIGTERM, the fuse module's enable_uring parameter (set
# for the run and restored), libfuse's passthrough_hp example built into the cache, and the
# workload runners (fio for data I/O, a small Python storm for metadata).
#
# The sourcing script sets `bench` (its name, for messages) and cds to the repository root.
# Globals it reads after the calls below: BERTH, WORK, PASSTHROUGH_HP, LIBFUSE_VERSION.
# shellcheck disable=SC2034

: "${bench:?set bench before sourcing lib-fuse.sh}"

fuse_bench_die() {
	echo "$bench: $*" >&2
	exit 1
}

# fuse_bench_require TOOL...: root (the benchmarks mount) and the named tools.
fuse_bench_require() {
	[ "$(id -u)" -eq 0 ] || fuse_bench_die "needs root (it mounts)"
	local tool
	for tool in "$@"; do
		command -v "$tool" >/dev/null || fuse_bench_die "needs $tool"
	done
}

FUSE_BENCH_MOUNTS=() FUSE_BENCH_PIDS=() FUSE_BENCH_URING_SAVED="" FUSE_BENCH_WORK=""
FUSE_URING_PARAMETER=/sys/module/fuse/parameters/enable_uring

fuse_bench_cleanup() {
	local p m
	for p in "${FUSE_BENCH_PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
	for m in "${FUSE_BENCH_MOUNTS[@]}"; do umount -l "$m" 2>/dev/null || true; done
	if [ -n "$FUSE_BENCH_WORK" ]; then
		umount -l "$FUSE_BENCH_WORK/src" 2>/dev/null || true
		rm -rf "$FUSE_BENCH_WORK"
	fi
	[ -z "$FUSE_BENCH_URING_SAVED" ] || echo "$FUSE_BENCH_URING_SAVED" >$FUSE_URING_PARAMETER
}

# fuse_bench_setup TMPFS_MIB: builds berth (sets BERTH), makes the work directory (sets
# WORK) with a tmpfs of TMPFS_MIB on WORK/src, writes the workload helpers into it and
# installs the exit trap.
fuse_bench_setup() {
	cargo build --release --quiet --bin berth
	BERTH=${CARGO_TARGET_DIR:-$PWD/target}/release/berth
	WORK=$(mktemp -d "/var/tmp/berth-$bench.XXXXXX")
	FUSE_BENCH_WORK=$WORK
	trap fuse_bench_cleanup EXIT
	mkdir -p "$WORK/src"
	mount -t tmpfs -o size="$1"m berth-bench "$WORK/src"
	fuse_bench_write_helpers
}

# fuse_bench_enable_uring: sets enable_uring to Y until exit; fails without the parameter.
fuse_bench_enable_uring() {
	[ -e $FUSE_URING_PARAMETER ] ||
		fuse_bench_die "this kernel has no FUSE over io_uring ($FUSE_URING_PARAMETER is missing)"
	FUSE_BENCH_URING_SAVED=$(cat $FUSE_URING_PARAMETER)
	echo Y >$FUSE_URING_PARAMETER
}

# fuse_bench_mount DIR LOG COMMAND...: runs COMMAND (a FUSE server that mounts on DIR and
# stays in the foreground) in the background with its output in LOG, and waits for the mount.
fuse_bench_mount() {
	local dir=$1 log=$2 tries=200
	shift 2
	mkdir -p "$dir"
	"$@" >"$log" 2>&1 &
	FUSE_BENCH_PIDS+=($!)
	while [ $tries -gt 0 ] && ! mountpoint -q "$dir"; do
		sleep 0.05
		tries=$((tries - 1))
	done
	mountpoint -q "$dir" || { cat "$log" >&2; fuse_bench_die "mount on $dir failed: $*"; }
	FUSE_BENCH_MOUNTS+=("$dir")
}

# fuse_bench_stop_mounts: SIGTERM to every server, waiting for each (their exit logs are
# complete afterwards).
fuse_bench_stop_mounts() {
	local p
	for p in "${FUSE_BENCH_PIDS[@]}"; do
		kill -TERM "$p" 2>/dev/null || true
		wait "$p" 2>/dev/null || true
	done
	FUSE_BENCH_PIDS=() FUSE_BENCH_MOUNTS=()
}

# fuse_bench_apt_install PACKAGE...: installs the missing ones with the machine's own apt.
fuse_bench_apt_install() {
	local missing=() p
	for p in "$@"; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
	done
	[ ${#missing[@]} -gt 0 ] || return 0
	echo "$bench: installing ${missing[*]}" >&2
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2 || {
		DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
	}
}

# build_passthrough_hp [host|SUITE]: libfuse's passthrough_hp example from a Debian fuse3
# source package, fetched through a private apt configuration with a deb-src line (see
# guest-images/lib.sh; the machine's apt sources are not touched) and built once into
# ${XDG_CACHE_HOME:-$HOME/.cache}/berth/passthrough_hp-FROM-VERSION. `host` (default): the
# source of the libfuse3 the host has, the example alone compiled against the host's
# libfuse3-dev, with benches/patches/passthrough_hp-UPSTREAM-*.patch applied. A suite (e.g.
# sid): that suite's newest fuse3 source, library and example built with meson (the library
# static, with FUSE over io_uring where liburing allows), nothing installed. Sets
# PASSTHROUGH_HP and LIBFUSE_VERSION.
build_passthrough_hp() {
	local from=${1:-host} version suite dir
	if [ "$from" = host ]; then
		fuse_bench_apt_install libfuse3-dev g++ pkg-config
		version=$(dpkg-query -W -f='${Version}' libfuse3-dev)
		# shellcheck source=/dev/null
		suite=$(. /etc/os-release && echo "${VERSION_CODENAME:?no VERSION_CODENAME in /etc/os-release}")
	else
		fuse_bench_apt_install g++ pkg-config meson ninja-build liburing-dev libnuma-dev
		suite=$from
		version=$(
			# shellcheck source=guest-images/lib.sh
			. guest-images/lib.sh
			setup_private_apt "$suite" src
			private_apt_update
			private_apt apt-cache showsrc --only-source fuse3 | awk '/^Version:/ { print $2 }' | sort -V | tail -n1
		)
		[ -n "$version" ] || fuse_bench_die "no fuse3 source package in Debian $suite"
	fi
	LIBFUSE_VERSION=${version%-*}
	LIBFUSE_VERSION=${LIBFUSE_VERSION#*:}
	dir=${XDG_CACHE_HOME:-$HOME/.cache}/berth/passthrough_hp-$from-$version
	PASSTHROUGH_HP=$dir/passthrough_hp
	[ -x "$PASSTHROUGH_HP" ] && return 0
	echo "$bench: building passthrough_hp from Debian $suite's fuse3 $version sources" >&2
	(
		# shellcheck source=guest-images/lib.sh
		. guest-images/lib.sh
		setup_private_apt "$suite" src
		private_apt_update
		with_cache_lock "passthrough_hp-$from-$version" build_passthrough_hp_locked "$dir" "$version" "$from"
	)
}

# build_passthrough_hp_locked DIR VERSION FROM: in the subshell of build_passthrough_hp
# (guest-images/lib.sh sourced), holding the cache lock.
build_passthrough_hp_locked() {
	local dir=$1 version=$2 from=$3 upstream stage tarball flags patch_file
	[ -x "$dir/passthrough_hp" ] && return 0
	upstream=${version%-*}
	upstream=${upstream#*:}
	stage=$dir.stage
	rm -rf "$stage"
	mkdir -p "$stage"
	(cd "$stage" && private_apt apt-get -qq --download-only source "fuse3=$version" >&2)
	for tarball in "$stage"/fuse3_"$upstream".orig.tar.*; do
		case $tarball in *.asc) ;; *) tar -xf "$tarball" -C "$stage" ;; esac
	done
	local src=$stage/fuse-$upstream
	[ -f "$src/example/passthrough_hp.cc" ] || die "no example/passthrough_hp.cc in fuse3 $version"
	mkdir -p "$dir.new"
	if [ "$from" = host ]; then
		for patch_file in "$PWD"/benches/patches/passthrough_hp-"$upstream"-*.patch; do
			[ -f "$patch_file" ] || continue
			patch -s -d "$src" -p1 <"$patch_file"
			cp "$patch_file" "$dir.new/"
		done
		read -r -a flags < <(pkg-config --cflags --libs fuse3)
		g++ -O2 -std=c++17 -o "$dir.new/passthrough_hp" "$src/example/passthrough_hp.cc" \
			"${flags[@]}" -lpthread >&2
	else
		(cd "$src" && meson setup "$stage/build" --buildtype=release -Ddefault_library=static \
			-Dexamples=true -Dutils=false -Dtests=false -Duseroot=false >"$stage/meson.log" 2>&1) ||
			{ cat "$stage/meson.log" >&2; die "meson setup of fuse3 $version failed"; }
		grep -E 'liburing|numa' "$stage/meson.log" >&2 || true
		ninja -C "$stage/build" example/passthrough_hp >"$stage/ninja.log" 2>&1 ||
			{ tail -n 40 "$stage/ninja.log" >&2; die "building passthrough_hp of fuse3 $version failed"; }
		cp "$stage/build/example/passthrough_hp" "$dir.new/"
	fi
	cp "$stage"/fuse3_"$version".dsc "$dir.new/"
	replace_dir "$dir.new" "$dir"
	rm -rf "$stage"
}

# passthrough_hp_has OPTION: whether the built passthrough_hp knows --OPTION.
passthrough_hp_has() {
	"$PASSTHROUGH_HP" --help 2>/dev/null | grep -q -- "--$1\b"
}

fuse_bench_write_helpers() {
	cat >"$WORK/fio-result.py" <<'EOF'
import json, sys
job = json.load(sys.stdin)["jobs"][0]
side = job["read"] if job["read"]["io_bytes"] > 0 else job["write"]
print(f"{side['iops']:.0f} {side['bw_bytes']:.0f}")
EOF
	# The metadata storm: WORKERS processes, each in its own directory (opened once, so that
	# every operation is relative to it and one path component deep). `stat`: stat each of
	# the directory's files in turn; `create`: create (O_CREAT|O_WRONLY) and close FILES files,
	# then unlink them, again and again. Counts operations (a stat; a create+close; an
	# unlink), and prints the sum of each worker's rate. The workers start together.
	cat >"$WORK/storm.py" <<'EOF'
import os, sys, time
mode, root, workers, files, runtime = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
go_r, go_w = os.pipe()
results = []
for w in range(workers):
    out_r, out_w = os.pipe()
    if os.fork() == 0:
        os.close(go_w)
        d = os.open(os.path.join(root, "w%d" % w), os.O_RDONLY | os.O_DIRECTORY)
        names = ["f%d" % i for i in range(files)]
        os.read(go_r, 1)
        ops, start = 0, time.monotonic()
        while time.monotonic() - start < runtime:
            if mode == "stat":
                for name in names:
                    os.stat(name, dir_fd=d)
                ops += files
            else:
                for name in names:
                    os.close(os.open(name, os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=d))
                for name in names:
                    os.unlink(name, dir_fd=d)
                ops += 2 * files
        os.write(out_w, b"%f" % (ops / (time.monotonic() - start)))
        os._exit(0)
    os.close(out_w)
    results.append(out_r)
os.write(go_w, b"x" * workers)
rate = 0.0
for r in results:
    rate += float(os.read(r, 64) or b"nan")
for _ in range(workers):
    _, status = os.wait()
    if status != 0:
        sys.exit("a storm worker failed")
print("%.0f" % rate)
EOF
}

# fuse_bench_storm_files FILES WORKERS: lays out WORK/src/stat/wI/f0..f(FILES-1) (4 KiB each)
# and the empty WORK/src/create/wI for I < WORKERS.
fuse_bench_storm_files() {
	local files=$1 workers=$2 w
	for w in $(seq 0 $((workers - 1))); do
		mkdir -p "$WORK/src/stat/w$w" "$WORK/src/create/w$w"
		python3 -c '
import os, sys
d, n = sys.argv[1], int(sys.argv[2])
block = b"\0" * 4096
for i in range(n):
    with open(os.path.join(d, "f%d" % i), "wb") as f:
        f.write(block)' "$WORK/src/stat/w$w" "$files"
	done
}

# fuse_bench_run DIR WORKLOAD: one run on the mount (or native directory) DIR; prints one
# number: IOPS for 4 KiB fio workloads, bytes per second for 1 MiB ones, operations per
# second for the storms. Workloads: RW-BS-JOBS for fio (randread-4k-1, read-1m-1, ...) with
# the file DIR/data of FUSE_BENCH_SIZE MiB; stat-N and create-N for the storms with N workers.
# Uses FUSE_BENCH_RUNTIME and FUSE_BENCH_FILES.
fuse_bench_run() {
	local dir=$1 workload=$2 rw bs jobs out iops bw
	case $workload in
	stat-* | create-*)
		python3 "$WORK/storm.py" "${workload%-*}" "$dir/${workload%-*}" "${workload#*-}" \
			"$FUSE_BENCH_FILES" "$FUSE_BENCH_RUNTIME"
		;;
	*)
		IFS=- read -r rw bs jobs <<<"$workload"
		out=$(fio --name=b --filename="$dir/data" --rw="$rw" --bs="$bs" --numjobs="$jobs" \
			--ioengine=psync --size="${FUSE_BENCH_SIZE}m" --time_based \
			--runtime="$FUSE_BENCH_RUNTIME" --ramp_time=1 --group_reporting --output-format=json)
		read -r iops bw < <(python3 "$WORK/fio-result.py" <<<"$out")
		case $bs in
		4k) echo "$iops" ;;
		*) echo "$bw" ;;
		esac
		;;
	esac
}

# version_lt A B: whether Debian version A sorts before B.
version_lt() {
	dpkg --compare-versions "$1" lt "$2"
}
