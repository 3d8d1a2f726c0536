# shellcheck shell=bash
# Guest artifacts of the block checks (sourced by test.sh after lib.sh): the modules a
# filesystem on a ublk or vhost-user-blk disk needs (ext4 and its dependencies, and
# device-mapper's flakey target for the power-cut check), appended to the shared initramfs
# as a second cpio, and e2fsprogs for mkfs/fsck (and dmsetup) as an erofs disk.
# Both live in $BERTH_GUEST_CACHE/block, built once per kernel and suite, under a lock, so
# the shared guest cache itself is never rebuilt.

BLOCK_GUEST_MODULES=(crc16 mbcache jbd2 ext4 dm_mod dm_flakey)
BLOCK_TOOL_PACKAGES=(e2fsprogs strace dmsetup)

# Sets BLOCK_MODULES_CPIO.
build_block_modules_cpio() {
	local dir=$BERTH_GUEST_CACHE/block key
	mkdir -p "$dir"
	key=$( (
		echo "${BLOCK_GUEST_MODULES[*]} $KERNEL_MODULES $KERNEL_IMAGE"
		sha256sum <"$BASE_INITRAMFS"
	) | sha256sum | cut -c1-16)
	BLOCK_MODULES_CPIO=$dir/modules-$key.cpio
	[ -f "$BLOCK_MODULES_CPIO" ] && return 0
	[ -n "${KERNEL_MODULES:-}" ] || die "the block checks need the kernel's module tree (ext4)"
	(
		flock 9
		[ -f "$BLOCK_MODULES_CPIO" ] && exit 0
		log "building the block checks' module cpio (ext4)"
		local stage rel name
		stage=$(mktemp -d)
		mkdir -p "$stage/modules" "$stage/etc"
		# The base's own list first, then what it lacks, dependencies first.
		(cd "$stage" && cpio -i --quiet --to-stdout etc/modules.order <"$BASE_INITRAMFS") >"$stage/etc/modules.order"
		for rel in $(GUEST_MODULES=("${BLOCK_GUEST_MODULES[@]}"); resolve_module_order "$KERNEL_MODULES"); do
			name=${rel##*/}
			name=${name%.xz}
			name=${name%.zst}
			name=${name%.gz}
			grep -qx "$name" "$stage/etc/modules.order" && continue
			decompress_module "$KERNEL_MODULES/$rel" >"$stage/modules/$name"
			echo "$name" >>"$stage/etc/modules.order"
		done
		(cd "$stage" && find . | LC_ALL=C sort | cpio -o -H newc --owner=0:0 --quiet) >"$BLOCK_MODULES_CPIO.tmp"
		mv "$BLOCK_MODULES_CPIO.tmp" "$BLOCK_MODULES_CPIO"
		rm -rf "$stage"
	) 9>"$dir/.lock"
}

# Sets BLOCK_TOOLS_IMAGE: e2fsprogs and the libraries it needs, mounted at /opt/e2fs.
build_block_tools_image() {
	local dir=$BERTH_GUEST_CACHE/block key
	mkdir -p "$dir"
	key=$(echo "$BERTH_GUEST_SUITE ${BLOCK_TOOL_PACKAGES[*]}" | sha256sum | cut -c1-16)
	BLOCK_TOOLS_IMAGE=$dir/e2fs-$key.erofs
	[ -f "$BLOCK_TOOLS_IMAGE" ] && [ -z "${BERTH_GUEST_REFRESH:-}" ] && return 0
	(
		flock 9
		[ -f "$BLOCK_TOOLS_IMAGE" ] && [ -z "${BERTH_GUEST_REFRESH:-}" ] && exit 0
		setup_private_apt
		private_apt_update
		log "downloading ${BLOCK_TOOL_PACKAGES[*]} for the block checks"
		local debs=$dir/debs stage deb
		rm -rf "$debs"
		mkdir -p "$debs/partial"
		apt-get "${APT_OPTS[@]}" -o "Dir::Cache::archives=$debs" "$(apt_quiet)" -y --no-install-recommends \
			install --download-only "${BLOCK_TOOL_PACKAGES[@]}" >&2
		stage=$(mktemp -d)
		for deb in "$debs"/*.deb; do dpkg-deb -x "$deb" "$stage"; done
		merge_usr "$stage"
		rm -rf "$stage"/usr/share/{doc,man,info,locale,lintian,bug,zoneinfo}
		mkfs.erofs -zlz4 "$BLOCK_TOOLS_IMAGE.tmp" "$stage/usr" >/dev/null
		mv "$BLOCK_TOOLS_IMAGE.tmp" "$BLOCK_TOOLS_IMAGE"
		rm -rf "$stage" "$debs"
	) 9>"$dir/.lock"
}

prepare_block_guest() {
	build_block_modules_cpio
	build_block_tools_image
}
