#!/usr/bin/env bash
# berth's whole test run, as CI runs it: installs what the tests need (idempotent), then runs
# formatting and lint checks, the workspace's unit and integration tests (host /dev/fuse
# mounts, vhost-user protocol, cache engine), the fuzz smoke run, the load-generator smoke run
# and the QEMU guest tier.
#
# Usage: tests/run-all.sh [--skip-guest] [--skip-fuzz] [--soak-seconds N]
#   --soak-seconds N  how long the volume soaks run (BERTH_VOLUME_SOAK_SECONDS; default 10,
#                     as in CI: the soak of three served volumes and the engine's GC soak)
# Needs root for the mount, fanotify and guest tiers; without root those tests skip and say so.
set -euo pipefail
cd "$(dirname "$0")/.."

skip_guest=0 skip_fuzz=0
while [ $# -gt 0 ]; do
	case $1 in
	--skip-guest) skip_guest=1; shift ;;
	--skip-fuzz) skip_fuzz=1; shift ;;
	--soak-seconds)
		[[ ${2:-} =~ ^[1-9][0-9]*$ ]] || { echo "run-all.sh: --soak-seconds takes a whole number of seconds" >&2; exit 2; }
		export BERTH_VOLUME_SOAK_SECONDS=$2
		shift 2 ;;
	*) echo "run-all.sh: unknown argument $1" >&2; exit 2 ;;
	esac
done

section() { printf '\n==== %s (%s)\n' "$1" "$(date +%H:%M:%S)"; }
started=$(date +%s)

section "installing test dependencies"
packages=(build-essential pkg-config fuse3 fio attr acl cpio zstd erofs-utils busybox-static
	qemu-system-x86 python3 python3-pip python3-venv strace uidmap git bc bison flex libelf-dev libclang-dev
	libfuse3-dev meson ninja-build liburing-dev libnuma-dev ca-certificates)
missing=()
for p in "${packages[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	if [ "$(id -u)" -ne 0 ]; then
		echo "missing Debian packages (${missing[*]}) and not root: tests that need them will skip"
	else
		export DEBIAN_FRONTEND=noninteractive
		apt-get update -qq
		apt-get install -y -qq --no-install-recommends "${missing[@]}"
	fi
fi
# The S3-compatible server the cache tests talk to, in a venv outside the repository.
venv="${XDG_CACHE_HOME:-$HOME/.cache}/berth/venv"
if [ ! -x "$venv/bin/moto_server" ]; then
	python3 -m venv "$venv"
	"$venv/bin/pip" install -q 'moto[server]'
fi
export PATH="$venv/bin:$PATH"
# pjdfstest (the POSIX filesystem suite) and fsx (the file system exerciser), which
# tests/fuse_pjdfstest.rs, tests/fuse_fsx.rs and the guest tier run, built once into the cache.
BERTH_PJDFSTEST=$(bash -c 'source guest-images/lib.sh && crate_tool pjdfstest 0.2.2')
BERTH_FSX=$(bash -c 'source guest-images/lib.sh && crate_tool fsx 0.3.2')
export BERTH_PJDFSTEST BERTH_FSX

# The guest kernels the guest tier builds from source (about 12 CPU-minutes each, cached) are
# built in the background, niced, while the workspace compiles and its tests run: much of that
# time leaves a core idle. The tiers that boot them later call the same scripts, which wait on
# the build's lock and then find the result in the cache (or build it, if this failed).
kernel_prebuild_pid=""
if [ $skip_guest -eq 0 ] && [ "$(id -u)" -eq 0 ]; then
	prebuild_log="${XDG_CACHE_HOME:-$HOME/.cache}/berth/kernels/prebuild.log"
	mkdir -p "$(dirname "$prebuild_log")"
	echo "building the guest kernels in the background (log: $prebuild_log)"
	# Its own process group, so that an early exit stops the whole build.
	setsid nice -n 10 bash -c 'guest-images/kernel/shared-versions/check.sh --build-only;
		guest-images/kernel/ondemand-6.12.sh' >"$prebuild_log" 2>&1 &
	kernel_prebuild_pid=$!
	trap 'kill -- "-$kernel_prebuild_pid" 2>/dev/null || true' EXIT
fi

# As root every test has what it needs here: one that would skip fails instead, so that a
# missing kernel feature or tool cannot turn a tier green by not running it.
if [ "$(id -u)" -eq 0 ]; then
	export BERTH_TESTS_NO_SKIP=1
fi

section "cargo fmt --check"
cargo fmt --all --check

section "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --release -- -D warnings

section "cargo test (workspace, release)"
cargo test --workspace --release --no-fail-fast

# The workspace run above mounts with berth's default, FUSE passthrough where the kernel has
# it (and tests/fuse_passthrough.rs proves it on); the host /dev/fuse suites run once more on
# the classic path, where every byte goes through berth. Built already: only the run costs.
section "host /dev/fuse suites again, classic path (--passthrough never)"
BERTH_FUSE_TEST_PASSTHROUGH=never cargo test --release --test fuse_ops --test fuse_semantics \
	--test fuse_stress --test fuse_xattrmap --test fuse_lifecycle --test fuse_confinement \
	--test fuse_pjdfstest --test fuse_fsx

# And once more over FUSE over io_uring, where the kernel has it (the fuse module's
# enable_uring parameter, set for the run and restored after).
uring_parameter=/sys/module/fuse/parameters/enable_uring
if [ "$(id -u)" -eq 0 ] && [ -e $uring_parameter ]; then
	section "host /dev/fuse suites again, over io_uring (--io-uring always)"
	uring_saved=$(cat $uring_parameter)
	echo Y >$uring_parameter
	uring_status=0
	BERTH_FUSE_TEST_IO_URING=always cargo test --release --test fuse_ops --test fuse_semantics \
		--test fuse_stress --test fuse_xattrmap --test fuse_lifecycle --test fuse_confinement \
		--test fuse_passthrough --test fuse_pjdfstest --test fuse_fsx || uring_status=$?
	echo "$uring_saved" >$uring_parameter
	[ $uring_status -eq 0 ] || exit $uring_status
fi

section "volume: kill -9 at every crash point, injected errors (failpoints build)"
cargo test -p berth-volume --release --features failpoints --test crash_points --test evict_failure

if [ $skip_fuzz -eq 0 ]; then
	section "fuzz corpus and regression replay"
	# The harness crate is outside the workspace: its lints run here.
	(cd fuzz && cargo clippy --all-targets --release -- -D warnings)
	(cd fuzz && cargo test --release)
	section "fuzz smoke run (60 s per target)"
	fuzz/run.sh 60 fuse_request vhost_user_message vhost_blk_request cli_options manifest_parse xattrmap_parse dax_window
fi

if [ -x benches/compare.sh ]; then
	section "load generator smoke run"
	benches/compare.sh --quick
fi

if [ -x benches/blk-compare.sh ]; then
	section "vhost-user-blk load generator smoke run (berth vs qemu-storage-daemon vs a volume)"
	benches/blk-compare.sh --quick
fi

if [ -x benches/volume-flush.sh ]; then
	section "volume flush against raw PUTs to the S3 server, smoke run"
	benches/volume-flush.sh --quick
fi

if [ "$(id -u)" -eq 0 ]; then
	# Native, libfuse's passthrough_hp (Debian sid's fuse3 source built once into the cache:
	# classic, passthrough, io_uring and both) and berth in the same four modes (the io_uring
	# ones where the kernel has FUSE over io_uring).
	section "berth fuse against native and passthrough_hp, every mode (quick)"
	benches/fuse-compare.sh --quick --libfuse sid
fi

if [ $skip_guest -eq 0 ]; then
	section "guest tier (QEMU)"
	if [ "$(id -u)" -ne 0 ]; then
		echo "SKIP guest tier: needs root"
	else
		guest-images/test.sh --daemon berth
	fi
	# The reference for live migration: the same migration boots with virtiofsd 1.14.
	section "guest tier: live migration with virtiofsd 1.14 (reference)"
	# test.sh builds virtiofsd into the cache if the load generator's run has not.
	if [ "$(id -u)" -ne 0 ]; then
		echo "SKIP virtiofsd migration reference: needs root"
	else
		guest-images/test.sh --daemon virtiofsd --only "$(guest-images/test.sh --list | grep '^mig-' | paste -sd,)"
	fi
	section "shared-versions guest kernel: build (cached) and boot against berth"
	if [ "$(id -u)" -ne 0 ]; then
		echo "SKIP shared-versions guest kernel: needs root"
	else
		guest-images/kernel/shared-versions/check.sh
	fi
	section "shared caching in the guest: shared vs auto vs never (quick)"
	if [ "$(id -u)" -ne 0 ]; then
		echo "SKIP guest shared-caching benchmark: needs root"
	else
		benches/guest-shared-cache.sh --quick
	fi
	section "ublk in the guest: transports against the loop device, and density (quick)"
	if [ "$(id -u)" -ne 0 ]; then
		echo "SKIP guest ublk benchmark: needs root"
	else
		benches/guest-block.sh --quick --json "${TMPDIR:-/tmp}/berth-guest-block-quick.json"
	fi
fi

section "done in $(($(date +%s) - started)) s"
