#!/usr/bin/env bash
# Builds a small guest kernel from Debian's linux-source-SERIES package: `allnoconfig` plus a
# configuration fragment plus a patch series, cached by a hash of all three and of the source
# package's version, so a second run costs nothing.
#
# Usage: guest-images/kernel/build.sh --name NAME --config FRAGMENT [--series 7.2] [--patches DIR]
#
# Prints the directory holding the result: `vmlinux` (QEMU boots it through its PVH entry),
# `bzImage`, `config` (the full .config) and `source-version`. Inputs:
#   --name NAME        names the cache entry (kernels/NAME-<key> under the berth cache)
#   --config FRAGMENT  CONFIG_X=y / =n / ="..." lines applied on top of allnoconfig; every
#                      line is checked afterwards, so an unmet dependency fails the build
#   --series SERIES    the linux-source-SERIES package (default 7.2)
#   --patches DIR      *.patch files applied in name order with `patch -p1`
#
# The source package comes through guest-images/lib.sh's private apt configuration (the
# machine's own apt sources are only read). Concurrent builds of the same kernel wait for each
# other (flock); BERTH_KERNEL_KEEP_BUILD=1 keeps the build tree for incremental work.
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

name="" fragment="" series=7.2 patches=""
while [ $# -gt 0 ]; do
	case $1 in
	--name) name=$2; shift 2 ;;
	--config) fragment=$2; shift 2 ;;
	--series) series=$2; shift 2 ;;
	--patches) patches=$2; shift 2 ;;
	-h | --help) sed -n '2,17p' "$0"; exit 0 ;;
	*) die "build.sh: unknown argument $1" ;;
	esac
done
[ -n "$name" ] || die "build.sh: --name is required"
[ -f "$fragment" ] || die "build.sh: the configuration fragment '$fragment' does not exist"
[ -z "$patches" ] || [ -d "$patches" ] || die "build.sh: the patch directory '$patches' does not exist"
fragment=$(readlink -f "$fragment")

kernels=${XDG_CACHE_HOME:-$HOME/.cache}/berth/kernels
mkdir -p "$kernels"
exec {lock}>"$kernels/$name.lock"
flock "$lock"

setup_private_apt
private_apt_update
package=linux-source-$series
version=$(apt-cache "${APT_OPTS[@]}" show --no-all-versions "$package" 2>/dev/null | awk '/^Version:/ { print $2; exit }')
[ -n "$version" ] || die "Debian $BERTH_GUEST_SUITE has no $package package"

patch_files=()
if [ -n "$patches" ]; then
	mapfile -t patch_files < <(find "$patches" -maxdepth 1 -name '*.patch' | LC_ALL=C sort)
fi
key=$( (
	echo "$package $version"
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
	deb=$(private_apt_download "$package")
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

log "configuring: allnoconfig + $(basename "$(dirname "$fragment")")/$(basename "$fragment")"
make -C "$build" -s allnoconfig KCONFIG_ALLCONFIG="$fragment" >&2
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
log "building $package $version (make -j$(nproc))"
make -C "$build" -s -j"$(nproc)" KBUILD_BUILD_USER=berth KBUILD_BUILD_HOST=berth vmlinux bzImage >&2 ||
	die "the kernel does not build; the tree is kept at $build"
mkdir -p "$out.tmp"
cp "$build/vmlinux" "$build/arch/x86/boot/bzImage" "$out.tmp/"
cp "$build/.config" "$out.tmp/config"
echo "$package $version" >"$out.tmp/source-version"
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
