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

set -euo pipefail

GUEST_IMAGES_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$GUEST_IMAGES_DIR/.." && pwd)
BERTH_GUEST_CACHE=${BERTH_GUEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/berth/guest}
BERTH_GUEST_SERIES=${BERTH_GUEST_SERIES:-7.2}
BERTH_GUEST_SUITE=${BERTH_GUEST_SUITE:-sid}

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
# sources stay untouched. Sets APT_OPTS.
APT_OPTS=()
setup_private_apt() {
	local dir=$BERTH_GUEST_CACHE/apt mirror
	mirror=$(debian_mirror)
	mkdir -p "$dir/etc/parts" "$dir/etc/preferences.d" "$dir/state/lists/partial" \
		"$dir/cache/archives/partial" "$dir/debs"
	local want="deb $mirror $BERTH_GUEST_SUITE main"
	if [ "$(cat "$dir/etc/sources.list" 2>/dev/null)" != "$want" ]; then
		echo "$want" >"$dir/etc/sources.list"
		rm -f "$dir/state/updated"
	fi
	: >"$dir/state/status.empty"
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
		-o "Debug::NoLocking=true"
		# Files are written by root into the cache; the _apt sandbox user may not reach it.
		-o "APT::Sandbox::User=root"
	)
}

# apt's download progress lines are shown with BERTH_GUEST_VERBOSE=1.
apt_quiet() { if [ -n "${BERTH_GUEST_VERBOSE:-}" ]; then echo -q; else echo -qq; fi; }

private_apt_update() {
	local stamp=$BERTH_GUEST_CACHE/apt/state/updated
	if [ -f "$stamp" ] && [ -z "${BERTH_GUEST_REFRESH:-}" ] &&
		[ -n "$(find "$stamp" -mmin -1440 2>/dev/null)" ]; then
		return 0
	fi
	log "fetching package lists of Debian $BERTH_GUEST_SUITE from $(debian_mirror)"
	apt-get "${APT_OPTS[@]}" "$(apt_quiet)" update >&2
	touch "$stamp"
}

# Downloads the named packages (no dependencies) into the cache; prints the .deb paths.
private_apt_download() {
	local debs=$BERTH_GUEST_CACHE/apt/debs
	(cd "$debs" && apt-get "${APT_OPTS[@]}" "$(apt_quiet)" download "$@" >&2)
	local p
	for p in "$@"; do
		ls -t "$debs/${p}_"*.deb | head -n1
	done
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

# Fetches Debian's newest linux-image-$BERTH_GUEST_SERIES*-amd64 and unpacks it.
# Sets KERNEL_IMAGE (bootable image) and KERNEL_MODULES (lib/modules/<version>).
fetch_debian_kernel() {
	local kdir=$BERTH_GUEST_CACHE/kernel cached=""
	mkdir -p "$kdir"
	if [ -z "${BERTH_GUEST_REFRESH:-}" ]; then
		cached=$(ls -d "$kdir"/linux-image-"$BERTH_GUEST_SERIES"*/.done 2>/dev/null | sort -V | tail -n1 || true)
	fi
	if [ -z "$cached" ]; then
		setup_private_apt
		private_apt_update
		local pkg deps=()
		pkg=$(apt-cache "${APT_OPTS[@]}" pkgnames "linux-image-$BERTH_GUEST_SERIES" |
			grep -E "^linux-image-${BERTH_GUEST_SERIES//./\\.}[.0-9]*(\+[a-z0-9]+)?-amd64$" | sort -V | tail -n1 || true)
		[ -n "$pkg" ] || die "Debian $BERTH_GUEST_SUITE has no linux-image-$BERTH_GUEST_SERIES*-amd64 package"
		# The image package may be a small one that depends on linux-binary-* and
		# linux-modules-* packages that carry the kernel and its modules.
		mapfile -t deps < <(apt-cache "${APT_OPTS[@]}" depends "$pkg" | awk '/Depends: linux-(binary|modules)-/ { print $2 }' | sort -u)
		local megabytes
		megabytes=$(apt-cache "${APT_OPTS[@]}" show --no-all-versions "$pkg" "${deps[@]}" | awk '/^Size:/ { s += $2 } END { printf "%d", s / 1e6 }')
		log "downloading $pkg ${deps[*]} ($megabytes MB)"
		local root=$kdir/$pkg/root deb
		rm -rf "${kdir:?}/$pkg"
		mkdir -p "$root"
		for deb in $(private_apt_download "$pkg" "${deps[@]}"); do
			dpkg-deb -x "$deb" "$root"
			rm -f "$deb"
		done
		merge_usr "$root"
		touch "$kdir/$pkg/.done"
		cached=$kdir/$pkg/.done
	fi
	local pdir
	pdir=$(dirname "$cached")
	KERNEL_MODULES=$(ls -d "$pdir"/root/usr/lib/modules/*/ | head -n1)
	KERNEL_MODULES=${KERNEL_MODULES%/}
	local vmlinuz
	vmlinuz=$(ls "$KERNEL_MODULES"/vmlinuz "$pdir"/root/boot/vmlinuz-* 2>/dev/null | head -n1 || true)
	[ -n "$vmlinuz" ] || die "no vmlinuz in $pdir"
	KERNEL_IMAGE=$vmlinuz
	# The uncompressed ELF boots ~2 s faster under TCG (PVH entry, no decompressor).
	if [ ! -f "$pdir/vmlinux" ]; then
		if extract_vmlinux "$vmlinuz" "$pdir/vmlinux.tmp"; then
			mv "$pdir/vmlinux.tmp" "$pdir/vmlinux"
		else
			rm -f "$pdir/vmlinux.tmp"
		fi
	fi
	[ -f "$pdir/vmlinux" ] && KERNEL_IMAGE=$pdir/vmlinux
	return 0
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
	local dir=$BERTH_GUEST_CACHE/busybox
	if [ ! -x "$dir/busybox" ] || [ -n "${BERTH_GUEST_REFRESH:-}" ]; then
		setup_private_apt
		private_apt_update
		log "downloading busybox-static"
		local deb
		deb=$(private_apt_download busybox-static)
		rm -rf "$dir"
		mkdir -p "$dir/root"
		dpkg-deb -x "$deb" "$dir/root"
		merge_usr "$dir/root"
		cp "$dir/root/usr/bin/busybox" "$dir/busybox"
		rm -rf "${dir:?}/root" "$deb"
	fi
	BUSYBOX=$dir/busybox
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
	# One per kernel: tiers booting different kernels keep theirs side by side.
	local kernel_key
	kernel_key=$(echo "$KERNEL_IMAGE" | sha256sum | cut -c1-8)
	BASE_INITRAMFS=$dir/base-$kernel_key-$key.cpio
	if [ -f "$BASE_INITRAMFS" ] && [ -z "${BERTH_GUEST_REFRESH:-}" ]; then
		return 0
	fi
	log "building initramfs"
	mkdir -p "$dir"
	rm -f "$dir"/base-"$kernel_key"-*.cpio "$dir"/base-"$key".cpio
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
	local dir=$BERTH_GUEST_CACHE/tools key
	key=$(echo "$BERTH_GUEST_SUITE ${GUEST_TOOL_PACKAGES[*]}" | sha256sum | cut -c1-16)
	TOOLS_IMAGE=$dir/tools-$key.erofs
	if [ -f "$TOOLS_IMAGE" ] && [ -z "${BERTH_GUEST_REFRESH:-}" ]; then
		return 0
	fi
	setup_private_apt
	private_apt_update
	log "downloading guest tools: ${GUEST_TOOL_PACKAGES[*]} and their dependencies"
	local debs=$dir/debs
	rm -rf "$debs"
	mkdir -p "$debs/partial"
	# Against the empty status file, apt resolves the full dependency closure.
	apt-get "${APT_OPTS[@]}" -o "Dir::Cache::archives=$debs" "$(apt_quiet)" -y --no-install-recommends \
		install --download-only "${GUEST_TOOL_PACKAGES[@]}" >&2
	log "unpacking $(ls "$debs"/*.deb | wc -l) packages ($(du -sm "$debs" | cut -f1) MB)"
	local stage deb
	stage=$(mktemp -d)
	for deb in "$debs"/*.deb; do
		dpkg-deb -x "$deb" "$stage"
	done
	merge_usr "$stage"
	rm -rf "$stage"/usr/share/{doc,man,info,locale,lintian,bug,zoneinfo,bash-completion}
	mkdir -p "$dir"
	log "packing tools image"
	mkfs.erofs -zlz4 "$TOOLS_IMAGE.tmp" "$stage/usr" >/dev/null
	mv "$TOOLS_IMAGE.tmp" "$TOOLS_IMAGE"
	rm -rf "$stage" "$debs"
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
			ensure_host_packages libseccomp-dev libcap-ng-dev pkg-config
			command -v cargo >/dev/null || die "cargo is needed to build virtiofsd"
			log "building virtiofsd 1.14.0 (a few minutes)"
			cargo install --locked virtiofsd --version 1.14.0 --root "$VIRTIOFSD_ROOT" >&2
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
		log "probing KVM (up to 20 s)"
		local tmp
		tmp=$(mktemp -d)
		echo 'exit 0' >"$tmp/run.sh"
		if GUEST_ACCEL=kvm guest_boot --script "$tmp/run.sh" --timeout 20 --console "$tmp/console" >/dev/null 2>&1; then
			echo kvm >"$stamp"
		else
			echo tcg >"$stamp"
		fi
		rm -rf "$tmp"
	fi
	GUEST_ACCEL=$(cat "$stamp")
}

# guest_boot --script FILE [--extra DIR] [--fs TAG=SOCKET[,queues=N]]... [--timeout S]
#            [--console FILE] [--show-console] [--disk FILE]...
# (--disk: a writable raw virtio-blk disk, /dev/vdb, /dev/vdc… after the tools image)
# Boots a guest that runs FILE as /test/run.sh (with DIR's files beside it) and
# returns the script's exit code, read from the console marker. 124 when the
# guest timed out, 125 when it ended without a marker.
guest_boot() {
	local script="" extra="" timeout=600 console="" show=0 fs_args=() n=0 extra_disks=()
	while [ $# -gt 0 ]; do
		case $1 in
		--script) script=$2; shift 2 ;;
		--extra) extra=$2; shift 2 ;;
		--timeout) timeout=$2; shift 2 ;;
		--console) console=$2; shift 2 ;;
		--show-console) show=1; shift ;;
		--disk)
			# shellcheck disable=SC2054 # the commas belong to QEMU's option syntax
			extra_disks+=(-drive "file=$2,if=none,id=disk$n,format=raw"
				-device "virtio-blk-pci,drive=disk$n")
			n=$((n + 1))
			shift 2
			;;
		--fs)
			local spec=$2 tag sock queues=1
			tag=${spec%%=*}
			sock=${spec#*=}
			case $sock in *,queues=*) queues=${sock##*,queues=}; sock=${sock%%,queues=*} ;; esac
			fs_args+=(-chardev "socket,id=fs$n,path=$sock"
				-device "vhost-user-fs-pci,chardev=fs$n,tag=$tag,num-request-queues=$queues")
			n=$((n + 1))
			shift 2
			;;
		*) die "guest_boot: unknown argument $1" ;;
		esac
	done
	[ -n "$script" ] || die "guest_boot: --script is required"
	local tmp
	tmp=$(mktemp -d)
	[ -n "$console" ] || console=$tmp/console
	mkdir -p "$tmp/extra/test"
	[ -z "$extra" ] || cp -a "$extra/." "$tmp/extra/test/"
	cp "$script" "$tmp/extra/test/run.sh"
	(cd "$tmp/extra" && find . | LC_ALL=C sort | cpio -o -H newc --owner=0:0 --quiet) >"$tmp/extra.cpio"
	cat "$BASE_INITRAMFS" "$tmp/extra.cpio" >"$tmp/initrd"
	local disk_args=()
	if [ -n "${TOOLS_IMAGE:-}" ]; then
		# shellcheck disable=SC2054 # the commas belong to QEMU's option syntax
		disk_args=(-drive "file=$TOOLS_IMAGE,if=none,id=tools,format=raw,readonly=on"
			-device virtio-blk-pci,drive=tools)
	fi
	local accel=${GUEST_ACCEL:-tcg} cpu=max
	[ "$accel" = kvm ] && cpu=host
	# shellcheck disable=SC2054 # the commas belong to QEMU's option syntax
	local qemu=(qemu-system-x86_64 -accel "$accel" -machine q35 -cpu "$cpu" -smp 2 -m 1G
		-object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem
		-nographic -no-reboot -nodefaults -serial stdio
		-kernel "$KERNEL_IMAGE" -initrd "$tmp/initrd"
		-append "console=ttyS0 panic=-1 quiet loglevel=4 rdinit=/init"
		"${disk_args[@]}" "${extra_disks[@]}" "${fs_args[@]}")
	local rc=0 tail_pid="" attempt
	for attempt in 1 2; do
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
		# Under TCG the guest kernel very rarely dies while booting (seen once: an
		# exception in sched_clock_cpu before init ran). Nothing of the test ran
		# then, so boot it once more rather than report a failure of the daemon.
		if [ "$attempt" = 1 ] && ! grep -q '@@berth-guest-start@@' "$console" &&
			grep -q 'Kernel panic' "$console"; then
			log "the guest kernel panicked before init started; booting it again. Console:"
			tr -d '\r' <"$console" | grep -E 'RIP|panic|Oops|BUG' | head -n 5 >&2
			cp "$console" "$console.first-boot"
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
