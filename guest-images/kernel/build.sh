#!/usr/bin/env bash
# Builds a small guest kernel from a Debian linux-source package, once: the result is
# cached under ${XDG_CACHE_HOME:-~/.cache}/berth/kernels/<name>-<key>, keyed by a hash
# of the source package's version, the base config, the fragment, the patches and this
# script, so any change rebuilds and nothing else does. Prints that directory (holding
# `vmlinux`, the ELF QEMU boots through its PVH entry, `bzImage` and `config`) on stdout.
#
# Usage: build.sh --fragment FILE [--package linux-source-6.12] [--suite trixie]
#                 [--patches DIR] [--base allnoconfig|tinyconfig|defconfig]
#                 [--name NAME] [--jobs N]
#
# The config is `make <base>` plus the fragment (merge_config.sh), completed by
# olddefconfig; every option the fragment sets must survive that, or the build stops
# naming it (a dependency is missing from the fragment). Patches (DIR/*.patch, in name
# order) are applied with `patch -p1` before configuring. The source comes through the
# private apt configuration of ../lib.sh (never the machine's apt sources), for the
# given Debian suite. Concurrent runs for the same key wait for each other (flock).
set -euo pipefail
KERNEL_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

package=linux-source-6.12 suite=trixie fragment="" patches="" base=allnoconfig name="" jobs=$(nproc)
while [ $# -gt 0 ]; do
	case $1 in
	--package) package=$2; shift 2 ;;
	--suite) suite=$2; shift 2 ;;
	--fragment) fragment=$2; shift 2 ;;
	--patches) patches=$2; shift 2 ;;
	--base) base=$2; shift 2 ;;
	--name) name=$2; shift 2 ;;
	--jobs) jobs=$2; shift 2 ;;
	-h | --help) sed -n '2,17p' "$0"; exit 0 ;;
	*) echo "build.sh: unknown argument $1" >&2; exit 2 ;;
	esac
done
[ -n "$fragment" ] && [ -f "$fragment" ] || { echo "build.sh: --fragment FILE is required" >&2; exit 2; }
[ -z "$patches" ] || [ -d "$patches" ] || { echo "build.sh: $patches is not a directory" >&2; exit 2; }
case $base in allnoconfig | tinyconfig | defconfig) ;; *) echo "build.sh: unknown --base $base" >&2; exit 2 ;; esac
fragment=$(readlink -f "$fragment")
[ -z "$patches" ] || patches=$(readlink -f "$patches")
[ -n "$name" ] || name=${package#linux-source-}

KERNELS=${XDG_CACHE_HOME:-$HOME/.cache}/berth/kernels
# The private apt state lives beside the kernels, one per suite.
export BERTH_GUEST_CACHE=$KERNELS/apt-$suite BERTH_GUEST_SUITE=$suite
# shellcheck source=../lib.sh
source "$KERNEL_DIR/../lib.sh"
mkdir -p "$KERNELS"

setup_private_apt
private_apt_update
version=$(apt-cache "${APT_OPTS[@]}" show --no-all-versions "$package" 2>/dev/null | awk '/^Version:/ { print $2; exit }')
[ -n "$version" ] || die "Debian $suite has no package $package"

patch_files=()
if [ -n "$patches" ]; then
	mapfile -t patch_files < <(find "$patches" -maxdepth 1 -name '*.patch' | LC_ALL=C sort)
fi
key=$( (
	echo "$package $version $base"
	cat "$fragment" "$KERNEL_DIR/build.sh"
	for p in "${patch_files[@]}"; do
		echo "patch ${p##*/}"
		cat "$p"
	done
) | sha256sum | cut -c1-16)
out=$KERNELS/$name-$key

exec 9>"$KERNELS/.lock-$name-$key"
flock 9
if [ -f "$out/vmlinux" ] && [ -f "$out/.done" ]; then
	echo "$out"
	exit 0
fi

ensure_host_packages build-essential bc flex bison libelf-dev libssl-dev cpio xz-utils
log "building the $name guest kernel ($package $version, $base + ${fragment##*/}${patches:+ + ${#patch_files[@]} patches}) with $jobs jobs"
started=$(date +%s)
deb=$(private_apt_download "$package")
build=$KERNELS/build-$name-$key
rm -rf "$build" "$out"
mkdir -p "$build" "$out"
# The package holds the source as a tarball: unpack only that.
dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$build" --wildcards './usr/src/linux-source-*.tar.xz'
tar -xJf "$build"/usr/src/linux-source-*.tar.xz -C "$build"
rm -rf "$build/usr"
src=$(find "$build" -mindepth 1 -maxdepth 1 -type d -name 'linux-source-*' | head -n1)
[ -n "$src" ] || die "no source tree in $deb"
unpacked=$(date +%s)
for p in "${patch_files[@]}"; do
	log "applying ${p##*/}"
	patch -d "$src" -p1 --forward --batch <"$p" >&2 || die "${p##*/} does not apply to $package $version"
done

make -C "$src" -s "$base" >&2
"$src/scripts/kconfig/merge_config.sh" -m -O "$src" "$src/.config" "$fragment" >/dev/null
make -C "$src" -s olddefconfig >&2
# Every option the fragment sets must have survived olddefconfig.
dropped=()
while IFS= read -r line; do
	case $line in
	CONFIG_*=n) opt=${line%%=*}; grep -qx "$opt=[ym]" "$src/.config" && dropped+=("$line (is set)") ;;
	CONFIG_*=*) grep -qxF "$line" "$src/.config" || dropped+=("$line (is: $(grep -E "^(# )?${line%%=*}[= ]" "$src/.config" || echo unset))") ;;
	esac
done < <(sed -e 's/[[:space:]]*#.*//' -e '/^$/d' "$fragment")
[ ${#dropped[@]} -eq 0 ] || die "options of ${fragment##*/} that olddefconfig did not keep: ${dropped[*]}"

make -C "$src" -s -j"$jobs" bzImage >&2 || die "the kernel does not build; see above"
finished=$(date +%s)
cp "$src/vmlinux" "$out/vmlinux"
cp "$src/arch/x86/boot/bzImage" "$out/bzImage"
cp "$src/.config" "$out/config"
printf 'package=%s\nversion=%s\nbase=%s\nunpack_seconds=%s\nbuild_seconds=%s\njobs=%s\n' \
	"$package" "$version" "$base" $((unpacked - started)) $((finished - unpacked)) "$jobs" >"$out/build-info"
rm -rf "$build"
touch "$out/.done"
log "built $out in $((finished - started)) s (unpacking $((unpacked - started)) s, compiling $((finished - unpacked)) s)"
echo "$out"
