# shellcheck shell=bash
# Shared functions of the guest-images scripts: fetch and cache a Debian guest
# kernel, busybox and userland tools, build the initramfs, and boot QEMU guests
# that mount virtio-fs shares. Sourced by prepare.sh, boot.sh, test.sh, demo.sh.
#
# Everything downloaded or built lives under $BERTH_GUEST_CACHE; the machine's
# own apt configuration is only read (to find its Debian mirror), never changed.
#
# Environment knobs:
#   BERTH_GUEST_CACHE        cache directory (default ${XDG_CACHE_HOME:-$HOME/.cache}/berth/guest)
#   BERTH_GUEST_KERNEL       kernel image to boot instead of Debian's (bzImage or vmlinux)
#   BERTH_GUEST_MODULES      module tree of that kernel (the lib/modules/<version> directory)
#   BERTH_GUEST_SERIES       Debian kernel series to fetch (default 7.2)
#   BERTH_GUEST_SUITE        Debian suite for kernel and tools (default sid)
#   BERTH_DEBIAN_MIRROR      Debian archive URI, instead of the one in the apt sources
#   BERTH_GUEST_ACCEL        tcg or kvm, instead of probing
#   BERTH_GUEST_REFRESH=1    refetch package lists and rebuild cached artifacts
#   BERTH_GUEST_QEMU         bookworm (the host's QEMU 7.2, default) or sid (Debian sid's QEMU)
#   BERTH_QEMU_SID_SERIES    QEMU release series expected from sid (default 11.1)
#
# The cache may be shared by concurrent runs (CI, other developers' test runs):
# every step that writes it holds an exclusive flock on locks/<step>.lock in the
# cache, builds under a temporary name and renames the finished artifact into
# place. A run that finds a finished artifact uses it without taking the lock.

set -euo pipefail

GUEST_IMAGES_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$GUEST_IMAGES_DIR/.." && pwd)
BERTH_GUEST_CACHE=${BERTH_GUEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/berth/guest}
BERTH_GUEST_SERIES=${BERTH_GUEST_SERIES:-7.2}
BERTH_GUEST_SUITE=${BERTH_GUEST_SUITE:-sid}
BERTH_QEMU_SID_SERIES=${BERTH_QEMU_SID_SERIES:-11.1}

# Modules the guests may need; any that are built in or absent are skipped.
GUEST_MODULES=(virtio virtio_ring virtio_pci virtio_pci_modern_dev virtio_pci_legacy_dev
	virtio_blk fuse virtiofs erofs netfs cachefiles ublk_drv loop)

# Userland packages unpacked into the tools image mounted at /usr in the guest.
GUEST_TOOL_PACKAGES=(bash fio libaio1t64 coreutils diffutils attr util-linux perl-base)

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
	log "error: $*"
	exit 1
}

require_root() {
	[ "$(id -u)" -eq 0 ] || die "run this as root (it installs packages and boots QEMU)"
}

# Seconds since the epoch with millisecond precision, for check durations.
now_seconds() { date +%s.%3N; }
seconds_since() { awk -v a="$1" -v b="$(now_seconds)" 'BEGIN { printf "%.2f", b - a }'; }

# --- cache locking -------------------------------------------------------------

# with_cache_lock NAME|LOCKFILE COMMAND [ARGS...]: runs COMMAND in this shell
# while holding an exclusive flock on $BERTH_GUEST_CACHE/locks/NAME.lock (or on
# LOCKFILE, when it contains a slash). Re-entrant: a lock this process already
# holds is not taken again. Locks are always taken in the same order (a cached
# artifact's lock, then the private apt's), so two runs cannot deadlock. A run
# that dies releases its locks with its file descriptors.
declare -A CACHE_LOCK_FDS=()
with_cache_lock() {
	local name=$1 file
	shift
	case $name in
	*/*) file=$name ;;
	*) file=$BERTH_GUEST_CACHE/locks/$name.lock ;;
	esac
	if [ -n "${CACHE_LOCK_FDS[$file]:-}" ]; then
		"$@"
		return
	fi
	local fd
	mkdir -p "$(dirname "$file")"
	exec {fd}>>"$file"
	if ! flock -n "$fd"; then
		log "waiting for another run that is writing '$(basename "$file" .lock)' into the cache"
		flock "$fd"
	fi
	CACHE_LOCK_FDS[$file]=$fd
	# Under errexit a failure ends the script (and so releases the lock) here.
	"$@"
	local rc=$?
	unset "CACHE_LOCK_FDS[$file]"
	exec {fd}>&-
	return "$rc"
}

# replace_dir NEW DEST: moves the finished directory NEW to DEST, replacing an
# older DEST; a process still reading the old one keeps its open files.
replace_dir() {
	local new=$1 dest=$2
	if [ -e "$dest" ]; then
		mv -T "$dest" "$dest.old.$$"
		mv -T "$new" "$dest"
		rm -rf "$dest.old.$$"
	else
		mv -T "$new" "$dest"
	fi
}

# Installs Debian packages on the host with the machine's own apt, only when missing.
ensure_host_packages() {
	local missing=() pkg
	for pkg in "$@"; do
		if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
			missing+=("$pkg")
		fi
	done
	[ ${#missing[@]} -eq 0 ] && return 0
	log "installing host packages: ${missing[*]}"
	if ! DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >&2; then
		DEBIAN_FRONTEND=noninteractive apt-get update >&2
		DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >&2
	fi
}

ensure_host_tools() {
	ensure_host_packages qemu-system-x86 erofs-utils cpio xz-utils zstd
}

# Prints "URI<TAB>suite<TAB>components" for each deb entry of the machine's apt
# sources, in the order apt reads them (one-line .list files and deb822 .sources).
apt_source_entries() {
	local f etc=${BERTH_APT_ETC:-/etc/apt}
	for f in "$etc/sources.list" "$etc"/sources.list.d/*.list; do
		[ -r "$f" ] || continue
		awk '
			/^[ \t]*#/ { next }
			$1 == "deb" {
				i = 2
				if ($i ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
				uri = $i; suite = $(i + 1); comps = ""
				for (j = i + 2; j <= NF; j++) comps = comps " " $j
				print uri "\t" suite "\t" comps
			}' "$f"
	done
	for f in "$etc"/sources.list.d/*.sources; do
		[ -r "$f" ] || continue
		awk '
			function flush(   n, u, s, i, j, us, ss) {
				if (types ~ /(^| )deb( |$)/ && enabled !~ /^(no|false)$/) {
					n = split(uris, us, " "); m = split(suites, ss, " ")
					for (i = 1; i <= n; i++) for (j = 1; j <= m; j++) print us[i] "\t" ss[j] "\t " comps
				}
				types = uris = suites = comps = enabled = ""
			}
			/^[ \t]*#/ { next }
			/^[ \t]*$/ { flush(); next }
			{
				key = tolower($1); sub(/:$/, "", key); $1 = ""; sub(/^ +/, "")
				if (key == "types") types = $0
				else if (key == "uris") uris = $0
				else if (key == "suites") suites = $0
				else if (key == "components") comps = $0
				else if (key == "enabled") enabled = tolower($0)
			}
			END { flush() }' "$f"
	done
}

# The Debian archive URI of this machine: the first source with a Debian suite
# name and the main component that is not the security archive.
debian_mirror() {
	if [ -n "${BERTH_DEBIAN_MIRROR:-}" ]; then
		echo "$BERTH_DEBIAN_MIRROR"
		return
	fi
	local uri
	uri=$(apt_source_entries | awk -F'\t' '
		$2 ~ /-security$/ || $1 ~ /-security\/?$/ { next }
		$2 !~ /^(sid|unstable|testing|stable|oldstable|oldoldstable|experimental|buster|bullseye|bookworm|trixie|forky|duke)(-updates|-backports|-proposed-updates)?$/ { next }
		(" " $3 " ") ~ / main / { print $1; exit }')
	[ -n "$uri" ] || die "no Debian archive with 'main' found in the apt sources; set BERTH_DEBIAN_MIRROR"
	echo "${uri%/}"
}

# Private apt configuration under the cache, so the machine's apt state and
# sources stay untouched: apt/ for $BERTH_GUEST_SUITE, apt-SUITE/ for another
# suite, apt-SUITE-src/ for a suite's source packages as well (`apt-get source`).
# setup_private_apt [SUITE [src]] sets APT_OPTS and APT_LOCK (the lock every
# apt run on that configuration holds: apt's own locking is off, as the state
# lives in the cache).
APT_OPTS=()
APT_LOCK=apt
APT_SUITE=$BERTH_GUEST_SUITE
APT_WITH_SOURCES=""
setup_private_apt() {
	APT_SUITE=${1:-$BERTH_GUEST_SUITE}
	APT_WITH_SOURCES=${2:-}
	APT_LOCK=apt
	[ "$APT_SUITE" = "$BERTH_GUEST_SUITE" ] || APT_LOCK=apt-$APT_SUITE
	[ -z "$APT_WITH_SOURCES" ] || APT_LOCK=apt-$APT_SUITE-src
	with_cache_lock "$APT_LOCK" write_private_apt_config
}

write_private_apt_config() {
	local dir=$BERTH_GUEST_CACHE/$APT_LOCK mirror
	mirror=$(debian_mirror)
	mkdir -p "$dir/etc/parts" "$dir/etc/preferences.d" "$dir/state/lists/partial" \
		"$dir/cache/archives/partial"
	local want="deb $mirror $APT_SUITE main"
	[ -z "$APT_WITH_SOURCES" ] || want+=$'\n'"deb-src $mirror $APT_SUITE main"
	if [ "$(cat "$dir/etc/sources.list" 2>/dev/null)" != "$want" ]; then
		echo "$want" >"$dir/etc/sources.list.tmp"
		mv "$dir/etc/sources.list.tmp" "$dir/etc/sources.list"
		rm -f "$dir/state/updated"
	fi
	[ -f "$dir/state/status.empty" ] || : >"$dir/state/status.empty"
	APT_OPTS=(
		-o "Dir::Etc::SourceList=$dir/etc/sources.list"
		-o "Dir::Etc::SourceParts=$dir/etc/parts"
		-o "Dir::Etc::Preferences=$dir/etc/preferences"
		-o "Dir::Etc::PreferencesParts=$dir/etc/preferences.d"
		-o "Dir::State=$dir/state"
		-o "Dir::State::status=$dir/state/status.empty"
		-o "Dir::Cache=$dir/cache"
		-o "APT::Architecture=amd64"
		-o "APT::Architectures::=amd64"
		-o "Acquire::Languages=none"
		-o "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false"
		-o "Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false"
		-o "Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled=false"
		-o "Acquire::IndexTargets::deb::Contents-deb::DefaultEnabled=false"
		# Frozen mirrors serve Release files past their Valid-Until date.
		-o "Acquire::Check-Valid-Until=false"
		# Runs on one configuration are serialised by APT_LOCK instead.
		-o "Debug::NoLocking=true"
		# Files are written by root into the cache; the _apt sandbox user may not reach it.
		-o "APT::Sandbox::User=root"
	)
}

# private_apt apt-get|apt-cache ARGS...: runs apt on the private configuration
# set up last, holding its lock.
private_apt() {
	local tool=$1
	shift
	with_cache_lock "$APT_LOCK" "$tool" "${APT_OPTS[@]}" "$@"
}

# apt's download progress lines are shown with BERTH_GUEST_VERBOSE=1.
apt_quiet() { if [ -n "${BERTH_GUEST_VERBOSE:-}" ]; then echo -q; else echo -qq; fi; }

private_apt_update() {
	with_cache_lock "$APT_LOCK" update_private_apt_lists
}

update_private_apt_lists() {
	local stamp=$BERTH_GUEST_CACHE/$APT_LOCK/state/updated
	if [ -f "$stamp" ] && [ -z "${BERTH_GUEST_REFRESH:-}" ] &&
		[ -n "$(find "$stamp" -mmin -1440 2>/dev/null)" ]; then
		return 0
	fi
	log "fetching package lists of Debian $APT_SUITE from $(debian_mirror)"
	apt-get "${APT_OPTS[@]}" "$(apt_quiet)" update >&2
	touch "$stamp"
}

# private_apt_download DIR PACKAGE...: downloads the named packages (no
# dependencies) into DIR, a directory of the calling step; prints the .deb paths.
private_apt_download() {
	local dir=$1
	shift
	mkdir -p "$dir"
	(cd "$dir" && private_apt apt-get "$(apt_quiet)" download "$@" >&2)
	local p
	for p in "$@"; do
		ls -t "$dir/${p%%=*}_"*.deb | head -n1
	done
}

# Prints the total download size of the named packages in MB.
private_apt_megabytes() {
	private_apt apt-cache show --no-all-versions "$@" | awk '/^Size:/ { s += $2 } END { printf "%d", s / 1e6 }'
}

# Moves the top-level bin/sbin/lib* directories of an unpacked root into usr/,
# so packages from before and after the /usr merge land in one tree.
merge_usr() {
	local root=$1 d
	for d in bin sbin lib lib32 lib64 libx32; do
		if [ -d "$root/$d" ] && [ ! -L "$root/$d" ]; then
			mkdir -p "$root/usr/$d"
			cp -a "$root/$d/." "$root/usr/$d/"
			rm -rf "${root:?}/$d"
		fi
	done
}

# --- kernel -----------------------------------------------------------------

# Fetches Debian's newest linux-image-$BERTH_GUEST_SERIES*-amd64 and unpacks it
# into kernel/<package>/ (complete when it holds .done). Sets KERNEL_IMAGE
# (bootable image) and KERNEL_MODULES (lib/modules/<version>).
fetch_debian_kernel() {
	local pdir
	pdir=$(cached_debian_kernel)
	if [ -z "$pdir" ] || [ -n "${BERTH_GUEST_REFRESH:-}" ]; then
		with_cache_lock kernel build_debian_kernel
		pdir=$(cached_debian_kernel)
		[ -n "$pdir" ] || die "no unpacked kernel in $BERTH_GUEST_CACHE/kernel"
	elif [ ! -f "$pdir/vmlinux" ] && [ ! -f "$pdir/.no-vmlinux" ]; then
		# Unpacked by an older version of these scripts.
		with_cache_lock kernel extract_cached_vmlinux "$pdir"
	fi
	KERNEL_MODULES=$(ls -d "$pdir"/root/usr/lib/modules/*/ | head -n1)
	KERNEL_MODULES=${KERNEL_MODULES%/}
	local vmlinuz
	vmlinuz=$(ls "$KERNEL_MODULES"/vmlinuz "$pdir"/root/boot/vmlinuz-* 2>/dev/null | head -n1 || true)
	[ -n "$vmlinuz" ] || die "no vmlinuz in $pdir"
	KERNEL_IMAGE=$vmlinuz
	# The uncompressed ELF boots ~2 s faster under TCG (PVH entry, no decompressor).
	[ -f "$pdir/vmlinux" ] && KERNEL_IMAGE=$pdir/vmlinux
	return 0
}

# Prints the newest complete kernel directory in the cache (nothing when none).
cached_debian_kernel() {
	local marker
	marker=$(ls -d "$BERTH_GUEST_CACHE"/kernel/linux-image-"$BERTH_GUEST_SERIES"*/.done 2>/dev/null | sort -V | tail -n1 || true)
	[ -z "$marker" ] || dirname "$marker"
}

# Runs under the kernel lock: downloads and unpacks into kernel/.stage-<package>,
# extracts vmlinux, then renames the directory into place.
build_debian_kernel() {
	if [ -z "${BERTH_GUEST_REFRESH:-}" ] && [ -n "$(cached_debian_kernel)" ]; then
		return 0 # another run finished it while this one waited
	fi
	local kdir=$BERTH_GUEST_CACHE/kernel
	setup_private_apt
	private_apt_update
	local pkg deps=()
	pkg=$(private_apt apt-cache pkgnames "linux-image-$BERTH_GUEST_SERIES" |
		grep -E "^linux-image-${BERTH_GUEST_SERIES//./\\.}[.0-9]*(\+[a-z0-9]+)?-amd64$" | sort -V | tail -n1 || true)
	[ -n "$pkg" ] || die "Debian $BERTH_GUEST_SUITE has no linux-image-$BERTH_GUEST_SERIES*-amd64 package"
	# The image package may be a small one that depends on linux-binary-* and
	# linux-modules-* packages that carry the kernel and its modules.
	mapfile -t deps < <(private_apt apt-cache depends "$pkg" | awk '/Depends: linux-(binary|modules)-/ { print $2 }' | sort -u)
	log "downloading $pkg ${deps[*]} ($(private_apt_megabytes "$pkg" "${deps[@]}") MB)"
	local stage=$kdir/.stage-$pkg deb
	rm -rf "$stage"
	mkdir -p "$stage/root"
	for deb in $(private_apt_download "$stage/debs" "$pkg" "${deps[@]}"); do
		dpkg-deb -x "$deb" "$stage/root"
		rm -f "$deb"
	done
	rm -rf "$stage/debs"
	merge_usr "$stage/root"
	extract_cached_vmlinux "$stage"
	touch "$stage/.done"
	replace_dir "$stage" "$kdir/$pkg"
}

# extract_cached_vmlinux DIR: writes DIR/vmlinux from the bzImage under DIR/root
# (or DIR/.no-vmlinux when that fails, so later runs do not retry).
extract_cached_vmlinux() {
	local dir=$1 vmlinuz
	[ ! -f "$dir/vmlinux" ] || return 0
	vmlinuz=$(ls "$dir"/root/usr/lib/modules/*/vmlinuz "$dir"/root/boot/vmlinuz-* 2>/dev/null | head -n1 || true)
	if [ -n "$vmlinuz" ] && extract_vmlinux "$vmlinuz" "$dir/vmlinux.tmp"; then
		mv "$dir/vmlinux.tmp" "$dir/vmlinux"
	else
		rm -f "$dir/vmlinux.tmp"
		touch "$dir/.no-vmlinux"
	fi
}

# True when $1 is an ELF file whose section headers lie within the file, i.e. it
# was decompressed completely.
elf_complete() {
	local f=$1 size shoff shentsize shnum
	[ "$(head -c4 "$f" | od -An -c | tr -d ' ')" = '177ELF' ] || return 1
	size=$(stat -c %s "$f")
	shoff=$(od -An -t u8 -j 40 -N 8 "$f" | tr -d ' ')
	shentsize=$(od -An -t u2 -j 58 -N 2 "$f" | tr -d ' ')
	shnum=$(od -An -t u2 -j 60 -N 2 "$f" | tr -d ' ')
	[ $((shoff + shentsize * shnum)) -le "$size" ]
}

# Finds the compressed kernel payload inside a bzImage and decompresses it.
extract_vmlinux() {
	local image=$1 out=$2 magic tool offset
	for magic in '\x28\xb5\x2f\xfd:zstd -dcq' '\xfd7zXZ\x00:xz -dcq' '\x1f\x8b\x08:gzip -dcq'; do
		tool=${magic#*:}
		command -v "${tool%% *}" >/dev/null || continue
		for offset in $(LC_ALL=C grep -obUaP "${magic%%:*}" "$image" | cut -d: -f1 | head -n4); do
			tail -c +$((offset + 1)) "$image" | $tool >"$out" 2>/dev/null || true
			if elf_complete "$out"; then
				return 0
			fi
		done
	done
	return 1
}

# Chooses the kernel: BERTH_GUEST_KERNEL/BERTH_GUEST_MODULES, or Debian's.
resolve_kernel() {
	if [ -n "${BERTH_GUEST_KERNEL:-}" ]; then
		[ -f "$BERTH_GUEST_KERNEL" ] || die "kernel image $BERTH_GUEST_KERNEL does not exist"
		KERNEL_IMAGE=$(readlink -f "$BERTH_GUEST_KERNEL")
		KERNEL_MODULES=${BERTH_GUEST_MODULES:-}
		[ -z "$KERNEL_MODULES" ] || [ -d "$KERNEL_MODULES" ] || die "module tree $KERNEL_MODULES does not exist"
		[ -n "$KERNEL_MODULES" ] ||
			log "no module tree given (--modules / BERTH_GUEST_MODULES): the guest loads no modules, so everything it needs must be built in"
	else
		fetch_debian_kernel
	fi
}

# --- initramfs ---------------------------------------------------------------

fetch_busybox() {
	BUSYBOX=$BERTH_GUEST_CACHE/busybox/busybox
	if [ ! -x "$BUSYBOX" ] || [ -n "${BERTH_GUEST_REFRESH:-}" ]; then
		with_cache_lock busybox build_busybox
	fi
}

build_busybox() {
	[ -n "${BERTH_GUEST_REFRESH:-}" ] || [ ! -x "$BUSYBOX" ] || return 0
	setup_private_apt
	private_apt_update
	log "downloading busybox-static"
	local dir=$BERTH_GUEST_CACHE/busybox deb
	local stage=$dir/.stage
	rm -rf "$stage"
	mkdir -p "$stage/root"
	deb=$(private_apt_download "$stage/debs" busybox-static)
	dpkg-deb -x "$deb" "$stage/root"
	merge_usr "$stage/root"
	cp "$stage/root/usr/bin/busybox" "$dir/busybox.tmp"
	mv "$dir/busybox.tmp" "$BUSYBOX"
	rm -rf "$stage"
}

# Prints the module paths (relative to the tree) needed for GUEST_MODULES, each
# after its dependencies. Uses modules.dep when the tree has one; otherwise the
# "depends=" entries embedded in each module stand in for it.
resolve_module_order() {
	local tree=$1
	local index depfile
	index=$(mktemp)
	depfile=$(mktemp)
	(cd "$tree" && find . -name '*.ko' -o -name '*.ko.xz' -o -name '*.ko.zst' -o -name '*.ko.gz') |
		sed 's|^\./||' | awk '{ n = $0; sub(/.*\//, "", n); sub(/\.ko(\.(xz|zst|gz))?$/, "", n); gsub(/-/, "_", n); print n "\t" $0 }' >"$index"
	if [ -s "$tree/modules.dep" ]; then
		cp "$tree/modules.dep" "$depfile"
	else
		local pending=("${GUEST_MODULES[@]}") seen=" " name path deps dep
		while [ ${#pending[@]} -gt 0 ]; do
			name=${pending[0]}
			pending=("${pending[@]:1}")
			case $seen in *" $name "*) continue ;; esac
			seen="$seen$name "
			path=$(awk -F'\t' -v n="$name" '$1 == n { print $2; exit }' "$index")
			[ -n "$path" ] || continue
			deps=$(decompress_module "$tree/$path" | tr '\0' '\n' | sed -n 's/^depends=//p' | head -n1 | tr ',' ' ')
			local dep_paths=""
			for dep in $deps; do
				dep=${dep//-/_}
				dep_paths="$dep_paths $(awk -F'\t' -v n="$dep" '$1 == n { print $2; exit }' "$index")"
				pending+=("$dep")
			done
			echo "$path:$dep_paths" >>"$depfile"
		done
		# modules.dep lists the full closure; expand the direct lists into it.
		awk -F: '
			{ d[$1] = $2; order[++n] = $1 }
			function closure(m,   k, parts, i, out) {
				if (m in done) return done[m]
				done[m] = ""; out = ""
				k = split(d[m], parts, " ")
				for (i = 1; i <= k; i++) out = out " " parts[i] closure(parts[i])
				return done[m] = out
			}
			END { for (i = 1; i <= n; i++) print order[i] ":" closure(order[i]) }' "$depfile" >"$depfile.full"
		mv "$depfile.full" "$depfile"
	fi
	local wanted
	for wanted in "${GUEST_MODULES[@]}"; do
		awk -F'\t' -v n="$wanted" '$1 == n { print $2; exit }' "$index"
	done | awk -v depfile="$depfile" '
		BEGIN { while ((getline line < depfile) > 0) { split(line, kv, ":"); deps[kv[1]] = kv[2] } }
		{
			k = split(deps[$0], list, " ")
			# modules.dep lists dependencies so that the last one is loaded first.
			for (i = k; i >= 1; i--) if (!(list[i] in emitted)) { emitted[list[i]] = 1; print list[i] }
			if (!($0 in emitted)) { emitted[$0] = 1; print $0 }
		}'
	rm -f "$index" "$depfile"
}

decompress_module() {
	case $1 in
	*.xz) xz -dc "$1" ;;
	*.zst) zstd -dcq "$1" ;;
	*.gz) gzip -dc "$1" ;;
	*) cat "$1" ;;
	esac
}

# Builds the shared part of the initramfs (busybox, /init, modules). Sets
# BASE_INITRAMFS. Rebuilt when the init script, busybox or the kernel changes.
build_base_initramfs() {
	fetch_busybox
	local key dir
	key=$( (
		cat "$GUEST_IMAGES_DIR/guest/init"
		echo "${GUEST_MODULES[*]} $KERNEL_MODULES $KERNEL_IMAGE"
		stat -c '%s %Y' "$BUSYBOX" "$KERNEL_IMAGE"
	) | sha256sum | cut -c1-16)
	dir=$BERTH_GUEST_CACHE/initramfs
	BASE_INITRAMFS=$dir/base-$key.cpio
	if [ ! -f "$BASE_INITRAMFS" ] || [ -n "${BERTH_GUEST_REFRESH:-}" ]; then
		with_cache_lock initramfs write_base_initramfs "$dir"
	fi
}

write_base_initramfs() {
	local dir=$1
	[ -n "${BERTH_GUEST_REFRESH:-}" ] || [ ! -f "$BASE_INITRAMFS" ] || return 0
	log "building initramfs"
	mkdir -p "$dir"
	# Keep a few older ones: a concurrent run with another kernel may still use them.
	find "$dir" -maxdepth 1 -name 'base-*.cpio' ! -path "$BASE_INITRAMFS" -printf '%T@ %p\n' |
		sort -rn | tail -n +4 | cut -d' ' -f2- | xargs -r rm -f
	local stage
	stage=$(mktemp -d)
	mkdir -p "$stage"/{bin,sbin,dev,proc,sys,tmp,mnt,run,etc,usr,modules,test}
	cp "$BUSYBOX" "$stage/bin/busybox"
	local applet
	for applet in $("$BUSYBOX" --list); do
		[ "$applet" = busybox ] || ln -sf busybox "$stage/bin/$applet"
	done
	# The tools image mounts at /usr; these links make its dynamic loader and
	# libraries reachable at their usual paths.
	ln -s usr/lib "$stage/lib"
	ln -s usr/lib64 "$stage/lib64"
	cp "$GUEST_IMAGES_DIR/guest/init" "$stage/init"
	chmod 755 "$stage/init"
	: >"$stage/etc/modules.order"
	if [ -n "${KERNEL_MODULES:-}" ]; then
		local rel
		for rel in $(resolve_module_order "$KERNEL_MODULES"); do
			local name=${rel##*/}
			name=${name%.xz}
			name=${name%.zst}
			name=${name%.gz}
			decompress_module "$KERNEL_MODULES/$rel" >"$stage/modules/$name"
			echo "$name" >>"$stage/etc/modules.order"
		done
	fi
	(cd "$stage" && find . | LC_ALL=C sort | cpio -o -H newc --owner=0:0 --quiet) >"$BASE_INITRAMFS.tmp"
	# A cpio appended later must start at a 512-byte boundary.
	truncate -s %512 "$BASE_INITRAMFS.tmp"
	mv "$BASE_INITRAMFS.tmp" "$BASE_INITRAMFS"
	rm -rf "$stage"
}

# --- userland tools image ----------------------------------------------------

# Builds an erofs image of the guest tools' /usr (fio, coreutils, diffutils, attr,
# util-linux and their libraries). Sets TOOLS_IMAGE.
build_tools_image() {
	local key
	key=$(echo "$BERTH_GUEST_SUITE ${GUEST_TOOL_PACKAGES[*]}" | sha256sum | cut -c1-16)
	TOOLS_IMAGE=$BERTH_GUEST_CACHE/tools/tools-$key.erofs
	if [ ! -f "$TOOLS_IMAGE" ] || [ -n "${BERTH_GUEST_REFRESH:-}" ]; then
		with_cache_lock tools write_tools_image
	fi
}

write_tools_image() {
	[ -n "${BERTH_GUEST_REFRESH:-}" ] || [ ! -f "$TOOLS_IMAGE" ] || return 0
	local dir=$BERTH_GUEST_CACHE/tools
	setup_private_apt
	private_apt_update
	log "downloading guest tools: ${GUEST_TOOL_PACKAGES[*]} and their dependencies"
	local stage=$dir/.stage
	rm -rf "$stage"
	mkdir -p "$stage/debs/partial" "$stage/root"
	# Against the empty status file, apt resolves the full dependency closure.
	private_apt apt-get -o "Dir::Cache::archives=$stage/debs" "$(apt_quiet)" -y --no-install-recommends \
		install --download-only "${GUEST_TOOL_PACKAGES[@]}" >&2
	log "unpacking $(ls "$stage"/debs/*.deb | wc -l) packages ($(du -sm "$stage/debs" | cut -f1) MB)"
	local deb
	for deb in "$stage"/debs/*.deb; do
		dpkg-deb -x "$deb" "$stage/root"
	done
	merge_usr "$stage/root"
	rm -rf "$stage"/root/usr/share/{doc,man,info,locale,lintian,bug,zoneinfo,bash-completion}
	log "packing tools image"
	mkfs.erofs -zlz4 "$TOOLS_IMAGE.tmp" "$stage/root/usr" >/dev/null
	mv "$TOOLS_IMAGE.tmp" "$TOOLS_IMAGE"
	rm -rf "$stage"
}

# --- Debian sid's QEMU ---------------------------------------------------------

# sid's QEMU (11.1 when this was written) runs on this host without being
# installed: qemu-system-x86 and its dependency closure, resolved with a private
# apt configuration for sid and unpacked into one root, started through that
# root's own dynamic loader and libraries. Its guest-visible features the host's
# QEMU 7.2 lacks: the generic vhost-user device (the only way it offers a
# virtio-fs DAX window) and virtio-fs back-end state for migration.
QEMU_SID_SUITE=${BERTH_QEMU_SID_SUITE:-sid}
# Not needed to run QEMU, and systemd alone is a third of the download.
QEMU_SID_LEAVE_OUT=(systemd libsystemd-shared)
# The module directory compiled into Debian's QEMU; the host's QEMU keeps its own
# modules there, which a QEMU of another build refuses to load ("Only modules
# from the same build can be loaded").
QEMU_MODULE_PATH=/usr/lib/x86_64-linux-gnu/qemu

# Fetches sid's QEMU into qemu-sid/<Debian version>/ (complete once renamed into
# place) and sets QEMU_SID_DIR, QEMU_SID_VERSION and QEMU_SID_CMD, the command
# that starts it (arguments follow).
fetch_qemu_sid() {
	QEMU_SID_DIR=$(cached_qemu_sid)
	if [ -z "$QEMU_SID_DIR" ] || [ -n "${BERTH_GUEST_REFRESH:-}" ]; then
		with_cache_lock qemu-sid build_qemu_sid
		QEMU_SID_DIR=$(cached_qemu_sid)
		[ -n "$QEMU_SID_DIR" ] || die "no unpacked QEMU in $BERTH_GUEST_CACHE/qemu-sid"
	fi
	# shellcheck disable=SC2034 # for the scripts that source this file
	QEMU_SID_VERSION=$(cat "$QEMU_SID_DIR/version")
	qemu_sid_command "$QEMU_SID_DIR/root"
}

# Prints the newest complete qemu-sid/<version> of the expected series.
cached_qemu_sid() {
	local version
	version=$(ls -d "$BERTH_GUEST_CACHE"/qemu-sid/"$BERTH_QEMU_SID_SERIES".*/version 2>/dev/null | sort -V | tail -n1 || true)
	[ -z "$version" ] || dirname "$version"
}

# qemu_sid_command ROOT: sets QEMU_SID_CMD. The loader finds libraries in ROOT
# only (one missing there would come from the host: build_qemu_sid checks that
# none does); -L points at ROOT's firmware, the firmware packages' directories
# first. QEMU loads modules from the directory compiled into it, where the
# host's QEMU keeps its own: it runs in a private mount namespace in which
# ROOT's module directory covers the host's. (QEMU_MODULE_DIR is not enough:
# QEMU still falls back to that directory for a module sid's packages lack, and
# aborts.) Without a host QEMU there is nothing to cover.
qemu_sid_command() {
	local root=$1
	local qemu=("$root/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" --library-path "$root/usr/lib/x86_64-linux-gnu"
		"$root/usr/bin/qemu-system-x86_64"
		-L "$root/usr/share/seabios" -L "$root/usr/lib/ipxe/qemu" -L "$root/usr/share/qemu")
	if [ -d "$QEMU_MODULE_PATH" ]; then
		# shellcheck disable=SC2016 # expanded by the inner shell
		QEMU_SID_CMD=(unshare --mount --propagation private --
			sh -c 'mount --bind "$1" "$2" && shift 2 && exec "$@"' qemu-sid
			"$root$QEMU_MODULE_PATH" "$QEMU_MODULE_PATH" "${qemu[@]}")
	else
		QEMU_SID_CMD=(env "QEMU_MODULE_DIR=$root$QEMU_MODULE_PATH" "${qemu[@]}")
	fi
}

# Runs under the qemu-sid lock: resolves, downloads and unpacks into
# qemu-sid/.stage, checks the result, then renames it into place.
build_qemu_sid() {
	if [ -z "${BERTH_GUEST_REFRESH:-}" ] && [ -n "$(cached_qemu_sid)" ]; then
		return 0 # another run finished it while this one waited
	fi
	local dir=$BERTH_GUEST_CACHE/qemu-sid start
	start=$(now_seconds)
	setup_private_apt "$QEMU_SID_SUITE"
	private_apt_update
	local version upstream
	version=$(private_apt apt-cache show --no-all-versions qemu-system-x86 | awk '/^Version:/ { print $2; exit }')
	[ -n "$version" ] || die "Debian $QEMU_SID_SUITE has no qemu-system-x86"
	upstream=${version#*:}
	upstream=${upstream%%[+~-]*}
	case $upstream in
	"$BERTH_QEMU_SID_SERIES".*) ;;
	*) die "Debian $QEMU_SID_SUITE has QEMU $upstream, not $BERTH_QEMU_SID_SERIES.x; set BERTH_QEMU_SID_SERIES=${upstream%.*} to use it (the guest checks were written against $BERTH_QEMU_SID_SERIES)" ;;
	esac
	# The closure apt would install on an empty system, less what QEMU does not need.
	local packages=()
	mapfile -t packages < <(private_apt apt-get -s --no-install-recommends install qemu-system-x86 |
		awk '$1 == "Inst" { print $2 }' | grep -vxF "${QEMU_SID_LEAVE_OUT[@]/#/-e}")
	[ ${#packages[@]} -gt 0 ] || die "apt resolved no packages for qemu-system-x86"
	local stage=$dir/.stage
	rm -rf "$stage"
	mkdir -p "$stage/root"
	log "downloading QEMU $version from Debian $QEMU_SID_SUITE: ${#packages[@]} packages ($(private_apt_megabytes "${packages[@]}") MB)"
	local deb
	for deb in $(private_apt_download "$stage/debs" "${packages[@]}"); do
		dpkg-deb -x "$deb" "$stage/root"
	done
	(cd "$stage/debs" && du -sb -- *.deb) | awk '{ sub(/\.deb$/, "", $2); print $2, $1 }' >"$stage/packages"
	rm -rf "$stage/debs"
	merge_usr "$stage/root"
	rm -rf "$stage"/root/usr/share/{doc,man,info,locale,lintian,bug-report,bash-completion}
	# One system emulator is enough.
	rm -f "$stage"/root/usr/bin/qemu-system-i386 "$stage"/root/usr/bin/qemu-system-x86_64-microvm
	relative_symlinks "$stage/root"
	check_qemu_sid_root "$stage/root"
	qemu_sid_command "$stage/root"
	local line
	line=$("${QEMU_SID_CMD[@]}" --version | head -n1)
	case $line in
	"QEMU emulator version $BERTH_QEMU_SID_SERIES."*) ;;
	*) die "sid's QEMU reports '$line', expected version $BERTH_QEMU_SID_SERIES.x" ;;
	esac
	echo "$line" >"$stage/version"
	mkdir -p "$dir"
	replace_dir "$stage" "$dir/${version#*:}"
	log "$line unpacked in $dir/${version#*:} ($(du -sm "$dir/${version#*:}" | cut -f1) MB) in $(seconds_since "$start") s"
}

# Rewrites the absolute symbolic links inside ROOT as relative ones, so they
# point into ROOT rather than at the host's files.
relative_symlinks() {
	local root=$1 link target
	while IFS= read -r -d '' link; do
		target=$(readlink "$link")
		ln -sfn "$(realpath -m --relative-to="$(dirname "$link")" "$root$target")" "$link"
	done < <(find "$root" -type l -lname '/*' -print0)
}

# Checks that ROOT holds what qemu_sid_command starts and that every library
# QEMU links resolves inside ROOT.
check_qemu_sid_root() {
	local root=$1 f
	for f in usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 usr/bin/qemu-system-x86_64 \
		"${QEMU_MODULE_PATH#/}" usr/share/seabios/bios-256k.bin usr/share/qemu/pvh.bin; do
		[ -e "$root/$f" ] || die "sid's QEMU is incomplete: no $f in $root"
	done
	local outside
	outside=$("$root/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" --library-path "$root/usr/lib/x86_64-linux-gnu" \
		--list "$root/usr/bin/qemu-system-x86_64" | awk -v root="$root/" '/=>/ && index($3, root) != 1 { print }')
	[ -z "$outside" ] || die "sid's QEMU would load libraries from outside its root: $outside"
}

prepare_guest() {
	ensure_host_tools
	resolve_kernel
	build_base_initramfs
	build_tools_image
	choose_accel
}

# --- daemons -------------------------------------------------------------------

VIRTIOFSD_ROOT=${XDG_CACHE_HOME:-$HOME/.cache}/berth/virtiofsd-1.14.0

# daemon_binary berth|virtiofsd: builds berth (cargo build --release in the
# repository) or installs virtiofsd 1.14.0 into the cache; sets DAEMON.
daemon_binary() {
	if [ "$1" = virtiofsd ]; then
		if [ ! -x "$VIRTIOFSD_ROOT/bin/virtiofsd" ]; then
			with_cache_lock "$VIRTIOFSD_ROOT.lock" build_virtiofsd
		fi
		DAEMON=$VIRTIOFSD_ROOT/bin/virtiofsd
	else
		command -v cargo >/dev/null || die "cargo is needed to build berth"
		# C compilers for the -sys crates (zstd, the TLS stack of the S3 client).
		ensure_host_packages build-essential pkg-config
		local quiet=--quiet
		[ -z "${BERTH_GUEST_VERBOSE:-}" ] || quiet=""
		log "building berth (cargo build --release; a first build takes a few minutes)"
		(cd "$REPO_ROOT" && cargo build --release $quiet --bin berth) >&2 || die "berth does not build"
		DAEMON=${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release/berth
		[ -x "$DAEMON" ] || die "no berth binary at $DAEMON"
	fi
}

build_virtiofsd() {
	[ ! -x "$VIRTIOFSD_ROOT/bin/virtiofsd" ] || return 0
	ensure_host_packages libseccomp-dev libcap-ng-dev pkg-config
	command -v cargo >/dev/null || die "cargo is needed to build virtiofsd"
	log "building virtiofsd 1.14.0 (a few minutes)"
	rm -rf "$VIRTIOFSD_ROOT.stage"
	cargo install --locked virtiofsd --version 1.14.0 --root "$VIRTIOFSD_ROOT.stage" >&2
	replace_dir "$VIRTIOFSD_ROOT.stage" "$VIRTIOFSD_ROOT"
}

# Third-party test programs from crates.io, each built once into the cache
# (${XDG_CACHE_HOME:-$HOME/.cache}/berth/CRATE-VERSION): pjdfstest (the POSIX filesystem suite)
# and fsx (the file system exerciser), run by the guest tier and by tests/fuse_pjdfstest.rs
# and tests/fuse_fsx.rs. pjdfstest_binary sets PJDFSTEST, fsx_binary FSX.
TOOLS_CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/berth
pjdfstest_binary() { PJDFSTEST=$(crate_tool pjdfstest 0.2.2); }
fsx_binary() { FSX=$(crate_tool fsx 0.3.2); }

# crate_tool CRATE VERSION: prints the path of the crate's binary of that name, building it
# into the cache first if it is not there.
crate_tool() {
	local root=$TOOLS_CACHE/$1-$2
	if [ ! -x "$root/bin/$1" ]; then
		with_cache_lock "$root.lock" build_crate_tool "$1" "$2" "$root"
	fi
	echo "$root/bin/$1"
}

build_crate_tool() {
	local name=$1 version=$2 root=$3
	[ ! -x "$root/bin/$name" ] || return 0
	command -v cargo >/dev/null || die "cargo is needed to build $name"
	log "building $name $version from crates.io (about a minute)"
	rm -rf "$root.stage"
	cargo install --locked --quiet "$name" --version "$version" --root "$root.stage" >&2
	replace_dir "$root.stage" "$root"
}

# --- booting -----------------------------------------------------------------

# Uses KVM only when a guest really boots with it (some hosts expose a /dev/kvm
# that cannot run a stock kernel); the answer is cached per host kernel.
choose_accel() {
	if [ -n "${BERTH_GUEST_ACCEL:-}" ]; then
		GUEST_ACCEL=$BERTH_GUEST_ACCEL
		return
	fi
	GUEST_ACCEL=tcg
	[ -c /dev/kvm ] || return 0
	local stamp
	stamp=$BERTH_GUEST_CACHE/kvm-probe-$(uname -r)-$(stat -c %Y "$KERNEL_IMAGE")
	if [ ! -f "$stamp" ]; then
		with_cache_lock kvm-probe probe_kvm "$stamp"
	fi
	GUEST_ACCEL=$(cat "$stamp")
}

probe_kvm() {
	local stamp=$1
	[ ! -f "$stamp" ] || return 0
	log "probing KVM (up to 20 s)"
	local tmp answer=tcg
	tmp=$(mktemp -d)
	echo 'exit 0' >"$tmp/run.sh"
	if GUEST_ACCEL=kvm guest_boot --qemu bookworm --script "$tmp/run.sh" --timeout 20 --console "$tmp/console" >/dev/null 2>&1; then
		answer=kvm
	fi
	echo "$answer" >"$stamp.tmp"
	mv "$stamp.tmp" "$stamp"
	rm -rf "$tmp"
}

# guest_boot --script FILE [--extra DIR] [--qemu bookworm|sid]
#            [--fs TAG=SOCKET[,queues=N][,queue-size=Q][,device=fs|generic]]...
#            [--qmp SOCKET] [--incoming URI] [--qemu-arg ARG]... [--timeout S]
#            [--console FILE] [--show-console] [--disk FILE[,ro]]...
#            [--initrd-append CPIO] [--append KERNEL-ARGS] [--allow-reboot]
# Boots a guest that runs FILE as /test/run.sh (with DIR's files beside it) and
# returns the script's exit code, read from the console marker. 124 when the
# guest timed out, 125 when it ended without a marker.
#
# --qemu picks the VMM: bookworm (the host's QEMU 7.2, default, or
# $BERTH_GUEST_QEMU) or sid (Debian sid's QEMU, fetched into the cache). Each
# --fs attaches a vhost-user daemon listening on SOCKET: device=fs (default) as
# vhost-user-fs-pci with TAG; device=generic (sid only) as QEMU's generic
# vhost-user-test-device-pci with virtio-id 26 (virtio-fs), N+1 queues and the
# 40-byte virtio-fs config space, which the daemon fills: start it with --tag TAG,
# and have it report N request queues (berth: --max-request-queues N), or the
# guest asks for queues the device does not have and its driver fails (EINVAL). --qmp opens a QMP socket (server, no wait) for migrate, system_reset,
# quit...; --incoming starts an instance that waits for a migration (same
# script, same devices as the source); --qemu-arg passes an argument through.
guest_boot() {
	local script="" extra="" timeout=600 console="" show=0 fs_specs=() qmp="" incoming="" reboot=-no-reboot
	local qemu_kind=${BERTH_GUEST_QEMU:-bookworm} passthrough=() more_disks=() disk_n=0 appended="" cmdline_extra=""
	while [ $# -gt 0 ]; do
		case $1 in
		--script) script=$2; shift 2 ;;
		# The guest may reset the machine (and boots again from the same kernel and
		# initramfs); by default a reset ends QEMU.
		--allow-reboot) reboot=""; shift ;;
		--extra) extra=$2; shift 2 ;;
		--timeout) timeout=$2; shift 2 ;;
		--console) console=$2; shift 2 ;;
		--show-console) show=1; shift ;;
		--disk)
			# Extra virtio-blk disks follow the tools image: /dev/vdb, /dev/vdc, ...
			local disk=$2 ro=off
			case $disk in *,ro) ro=on; disk=${disk%,ro} ;; esac
			more_disks+=(-drive "file=$disk,if=none,id=disk$disk_n,format=raw,readonly=$ro"
				-device "virtio-blk-pci,drive=disk$disk_n")
			disk_n=$((disk_n + 1))
			shift 2
			;;
		--initrd-append) appended=$2; shift 2 ;;
		--append) cmdline_extra="$cmdline_extra $2"; shift 2 ;;
		--qemu) qemu_kind=$2; shift 2 ;;
		--fs) fs_specs+=("$2"); shift 2 ;;
		--qmp) qmp=$2; shift 2 ;;
		--incoming) incoming=$2; shift 2 ;;
		--qemu-arg) passthrough+=("$2"); shift 2 ;;
		*) die "guest_boot: unknown argument $1" ;;
		esac
	done
	[ -n "$script" ] || die "guest_boot: --script is required"
	local qemu_cmd=()
	case $qemu_kind in
	bookworm) qemu_cmd=(qemu-system-x86_64) ;;
	sid)
		fetch_qemu_sid
		qemu_cmd=("${QEMU_SID_CMD[@]}")
		;;
	*) die "guest_boot: --qemu must be bookworm or sid, not '$qemu_kind'" ;;
	esac
	local fs_args=() n=0 spec
	for spec in "${fs_specs[@]}"; do
		local tag=${spec%%=*} rest=${spec#*=} sock opt options=() queues=1 queue_size="" device=fs
		sock=${rest%%,*}
		if [ -z "$tag" ] || [ "$tag" = "$spec" ] || [ -z "$sock" ]; then
			die "guest_boot: --fs wants TAG=SOCKET[,OPTION=VALUE...], not '$spec'"
		fi
		IFS=, read -ra options <<<"${rest#"$sock"}"
		for opt in "${options[@]}"; do
			case $opt in
			"") ;;
			queues=*) queues=${opt#queues=} ;;
			queue-size=*) queue_size=${opt#queue-size=} ;;
			device=fs | device=generic) device=${opt#device=} ;;
			*) die "guest_boot: unknown --fs option '$opt' in '$spec'" ;;
			esac
		done
		fs_args+=(-chardev "socket,id=fs$n,path=$sock")
		if [ "$device" = generic ]; then
			[ "$qemu_kind" = sid ] || die "guest_boot: device=generic needs --qemu sid (QEMU 7.2 has no vhost-user-test-device-pci)"
			# The device knows nothing of virtio-fs: 26 is its virtio device id,
			# queue 0 the high-priority queue, and the 40-byte config space (a
			# 36-byte tag, the number of request queues) comes from the daemon.
			fs_args+=(-device "vhost-user-test-device-pci,chardev=fs$n,virtio-id=26,num_vqs=$((queues + 1)),vq_size=${queue_size:-128},config_size=40")
		else
			fs_args+=(-device "vhost-user-fs-pci,chardev=fs$n,tag=$tag,num-request-queues=$queues${queue_size:+,queue-size=$queue_size}")
		fi
		n=$((n + 1))
	done
	local tmp
	tmp=$(mktemp -d)
	[ -n "$console" ] || console=$tmp/console
	mkdir -p "$tmp/extra/test"
	[ -z "$extra" ] || cp -a "$extra/." "$tmp/extra/test/"
	cp "$script" "$tmp/extra/test/run.sh"
	(cd "$tmp/extra" && find . | LC_ALL=C sort | cpio -o -H newc --owner=0:0 --quiet) >"$tmp/extra.cpio"
	if [ ! -f "$BASE_INITRAMFS" ]; then
		# Another run pruned it since this one prepared (older versions of these
		# scripts removed every other initramfs): build it again.
		log "$BASE_INITRAMFS disappeared from the cache; building it again"
		build_base_initramfs
	fi
	if [ -n "$appended" ]; then
		# Each cpio starts on a 512-byte boundary.
		cp "$appended" "$tmp/appended.cpio"
		truncate -s %512 "$tmp/appended.cpio"
		cat "$BASE_INITRAMFS" "$tmp/appended.cpio" "$tmp/extra.cpio" >"$tmp/initrd"
	else
		cat "$BASE_INITRAMFS" "$tmp/extra.cpio" >"$tmp/initrd"
	fi
	local disk_args=()
	if [ -n "${TOOLS_IMAGE:-}" ]; then
		# shellcheck disable=SC2054 # the commas belong to QEMU's option syntax
		disk_args=(-drive "file=$TOOLS_IMAGE,if=none,id=tools,format=raw,readonly=on"
			-device virtio-blk-pci,drive=tools)
	fi
	local control_args=()
	[ -z "$qmp" ] || control_args+=(-qmp "unix:$qmp,server=on,wait=off")
	[ -z "$incoming" ] || control_args+=(-incoming "$incoming")
	local accel=${GUEST_ACCEL:-tcg} cpu=max
	[ "$accel" = kvm ] && cpu=host
	# Under TCG the clocksource watchdog soon finds the TSC unstable, and the kernel then
	# live-patches the scheduler clock's static key while the other vCPU runs it (an int3
	# oops in sched_clock_cpu before init). Declaring it unstable at boot settles the key
	# before the second vCPU starts.
	[ "$accel" = tcg ] && cmdline_extra="$cmdline_extra tsc=unstable"
	# shellcheck disable=SC2054 # the commas belong to QEMU's option syntax
	local qemu=("${qemu_cmd[@]}" -accel "$accel" -machine q35 -cpu "$cpu" -smp 2 -m 1G
		-object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem
		-nographic ${reboot:+"$reboot"} -nodefaults -serial stdio
		-kernel "$KERNEL_IMAGE" -initrd "$tmp/initrd"
		-append "console=ttyS0 panic=-1 quiet loglevel=4 rdinit=/init$cmdline_extra"
		"${disk_args[@]}" "${more_disks[@]}" "${fs_args[@]}" "${control_args[@]}" "${passthrough[@]}")
	local rc=0 tail_pid="" attempt
	for attempt in 1 2 3; do
		rc=0
		: >"$console"
		if [ "$show" = 1 ]; then
			tail -n +1 -f "$console" &
			tail_pid=$!
		fi
		timeout --kill-after=10 "$timeout" "${qemu[@]}" </dev/null >"$console" 2>&1 || rc=$?
		if [ -n "$tail_pid" ]; then
			sleep 0.2
			kill "$tail_pid" 2>/dev/null || true
			wait "$tail_pid" 2>/dev/null || true
		fi
		# Under TCG the guest kernel now and then dies while booting (an int3 oops in
		# sched_clock_cpu before init ran, twice in a row once). Nothing of the test
		# ran then, so boot it again, up to three times, rather than report a failure
		# of the daemon.
		if [ "$attempt" -lt 3 ] && ! grep -q '@@berth-guest-start@@' "$console" &&
			grep -q 'Kernel panic' "$console"; then
			log "the guest kernel panicked before init started; booting it again. Console:"
			tr -d '\r' <"$console" | grep -E 'RIP|panic|Oops|BUG' | head -n 5 >&2
			cp "$console" "$console.boot-$attempt"
			continue
		fi
		break
	done
	local marker
	marker=$(tr -d '\r' <"$console" | sed -n 's/^@@berth-guest-exit rc=\([0-9]*\)@@$/\1/p' | tail -n1)
	rm -rf "$tmp"
	if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
		log "guest timed out after ${timeout}s"
		return 124
	fi
	if [ -z "$marker" ]; then
		log "guest ended without reporting an exit code (qemu exit $rc); console: $console"
		return 125
	fi
	return "$marker"
}
