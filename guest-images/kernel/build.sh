#!/usr/bin/env bash
# Builds a small guest kernel from a Debian linux-source package: `allnoconfig` (or
# --base) plus a configuration fragment plus a patch series, cached by a hash of all of them,
# the source package's version and the compiler, so a second run costs nothing.
#
# Usage: build.sh --fragment FILE [--package linux-source-7.2] [--suite sid]
#                 [--patches DIR] [--base allnoconfig|tinyconfig|defconfig] [--name NAME]
#                 [--jobs N]
#
# Prints the directory holding the result (kernels/NAME-<key> under the berth cache):
# `vmlinux` (QEMU boots it through its PVH entry), `bzImage`, `config` (the full .config) and
# `source-version`. Every CONFIG_X=... line of the fragment is checked after configuring: one
# that did not stick (an unmet dependency) fails the build, naming it. Patches (DIR/*.patch,
# in name order) are applied with `patch -p1`. The source comes through guest-images/lib.sh's
# private apt configuration, one per suite beside the kernels (the machine's own apt sources
# are only read). Concurrent builds of the same kernel wait for each other (flock);
# BERTH_KERNEL_KEEP_BUILD=1 keeps the build tree for incremental work.
# (The same interface as the 6.12 cachefiles kernel's script, so the two can be one.)
set -euo pipefail
KERNEL_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

package=linux-source-7.2 suite=sid fragment="" patches="" base=allnoconfig name="" jobs=$(nproc)
while [ $# -gt 0 ]; do
	case $1 in
	--package) package=$2; shift 2 ;;
	--suite) suite=$2; shift 2 ;;
	--fragment | --config) fragment=$2; shift 2 ;;
	--patches) patches=$2; shift 2 ;;
	--base) base=$2; shift 2 ;;
	--name) name=$2; shift 2 ;;
	--jobs) jobs=$2; shift 2 ;;
	-h | --help) sed -n '2,18p' "$0"; exit 0 ;;
	*) echo "build.sh: unknown argument $1" >&2; exit 2 ;;
	esac
done
[ -n "$fragment" ] && [ -f "$fragment" ] || { echo "build.sh: --fragment FILE is required" >&2; exit 2; }
[ -z "$patches" ] || [ -d "$patches" ] || { echo "build.sh: $patches is not a directory" >&2; exit 2; }
case $base in allnoconfig | tinyconfig | defconfig) ;; *) echo "build.sh: unknown --base $base" >&2; exit 2 ;; esac
fragment=$(readlink -f "$fragment")
[ -n "$name" ] || name=${package#linux-source-}

KERNELS=${XDG_CACHE_HOME:-$HOME/.cache}/berth/kernels
# The private apt state lives beside the kernels, one per suite.
export BERTH_GUEST_CACHE=$KERNELS/apt-$suite BERTH_GUEST_SUITE=$suite
# shellcheck source=../lib.sh
source "$KERNEL_DIR/../lib.sh"

kernels=$KERNELS
mkdir -p "$kernels"
exec {lock}>"$kernels/$name.lock"
flock "$lock"

setup_private_apt
private_apt_update
version=$(apt-cache "${APT_OPTS[@]}" show --no-all-versions "$package" 2>/dev/null | awk '/^Version:/ { print $2; exit }')
[ -n "$version" ] || die "Debian $BERTH_GUEST_SUITE has no $package package"

patch_files=()
if [ -n "$patches" ]; then
	mapfile -t patch_files < <(find "$patches" -maxdepth 1 -name '*.patch' | LC_ALL=C sort)
fi
key=$( (
	echo "$package $version $base"
	cat "$fragment"
	for p in "${patch_files[@]}"; do
		basename "$p"
		cat "$p"
	done
	gcc --version | head -n1
) | sha256sum | cut -c1-16)
out=$kernels/$name-$key
if [ -f "$out/.done" ]; then
	echo "$out"
	exit 0
fi

ensure_host_packages build-essential bc bison flex libelf-dev xz-utils
deb=$BERTH_GUEST_CACHE/apt/debs/${package}_${version}_all.deb
if [ ! -f "$deb" ]; then
	log "downloading $package $version"
	deb=$(private_apt_download "$(dirname "$deb")" "$package")
fi
build=$kernels/$name-$key.build
rm -rf "$build" "$out"
mkdir -p "$build"
log "unpacking $package $version"
dpkg-deb --fsys-tarfile "$deb" | tar -xO "./usr/src/$package.tar.xz" | xz -dcT0 | tar -x -C "$build" --strip-components=1
for p in "${patch_files[@]}"; do
	log "applying $(basename "$p")"
	patch -d "$build" -p1 --quiet --forward <"$p" || die "$(basename "$p") does not apply to $package $version"
done

log "configuring: $base + $(basename "$(dirname "$fragment")")/$(basename "$fragment")"
make -C "$build" -s "$base" KCONFIG_ALLCONFIG="$fragment" >&2
missing=$(grep -E '^CONFIG_[A-Za-z0-9_]+=' "$fragment" | while IFS= read -r line; do
	sym=${line%%=*}
	want=${line#*=}
	have=$(grep -E "^$sym=" "$build/.config" | cut -d= -f2- || true)
	if [ "$want" = n ]; then
		[ -z "$have" ] || echo "$sym is set to $have, wanted off"
	elif [ "$have" != "$want" ]; then
		echo "$sym is ${have:-off}, wanted $want"
	fi
done)
[ -z "$missing" ] || die "the configuration did not take (unmet dependencies?): $missing"

started=$(now_seconds)
unpacked_at=$(date +%s)
log "building $package $version (make -j$jobs)"
make -C "$build" -s -j"$jobs" KBUILD_BUILD_USER=berth KBUILD_BUILD_HOST=berth vmlinux bzImage >&2 ||
	die "the kernel does not build; the tree is kept at $build"
mkdir -p "$out.tmp"
cp "$build/vmlinux" "$build/arch/x86/boot/bzImage" "$out.tmp/"
cp "$build/.config" "$out.tmp/config"
echo "$package $version" >"$out.tmp/source-version"
# What the build cost, for the record (the machine's load changes it a lot).
printf 'jobs=%s\ncompile_seconds=%s\nload_average=%s\n' "$jobs" $(($(date +%s) - unpacked_at)) \
	"$(cut -d' ' -f1-3 /proc/loadavg)" >"$out.tmp/build-info"
touch "$out.tmp/.done"
mv "$out.tmp" "$out"
log "built in $(seconds_since "$started") s"
if [ -z "${BERTH_KERNEL_KEEP_BUILD:-}" ]; then
	rm -rf "$build"
fi
# Older builds of the same name are no longer wanted.
for old in "$kernels/$name"-*; do
	[ "$old" = "$out" ] || [ "$old" = "$build" ] || [ "$old" = "$kernels/$name.lock" ] || rm -rf "$old"
done
echo "$out"
