# shellcheck shell=bash
# The on-demand image tiers of test.sh (sourced by it; uses its record/run_guest/
# start_daemon helpers and $WORK, $LOGS, $DAEMON):
#
# - fscache: a Linux 6.12 guest built by kernel/build.sh with CONFIG_CACHEFILES_ONDEMAND
#   runs berth itself (`berth fscache` under berth-service-harness, `berth mount`
#   clients) serving erofs images through cachefiles; the images' blobs stay on the
#   host, in a directory the host's berth shares over virtio-fs (a LocalDir backend in
#   the guest: no network stack needed in the guest kernel, and the blob store is an
#   ordinary host directory the host can corrupt on purpose).

FSCACHE_GUEST_CHECKS=(fscache-setup fscache-one-file fscache-16-readers fscache-worker-kill
	fscache-full-restart fscache-restart-held-fd fscache-all-files fscache-shared-blob fscache-corrupt-chunk
	fscache-unmount fscache-autostart)
FSCACHE_HOST_CHECKS=(fscache-daemon-exit-0)

# The test tree: 2 000 files, five of them large (64, 32, 16, 8 and 4 MiB), the rest
# small; names d<N%40>/f<N>.
fscache_tree() {
	local root=$1 i size
	for i in $(seq 0 1999); do
		case $i in
		0) size=$((64 << 20)) ;;
		500) size=$((32 << 20)) ;;
		1200) size=$((8 << 20)) ;;
		1000) size=$((16 << 20)) ;;
		1500) size=$((4 << 20)) ;;
		*) size=$(((i * 7919) % 24000)) ;;
		esac
		mkdir -p "$root/d$((i % 40))"
		head -c "$size" /dev/urandom >"$root/d$((i % 40))/f$i"
	done
}

fscache_tier() {
	if ! any_selected "${FSCACHE_GUEST_CHECKS[@]}" "${FSCACHE_HOST_CHECKS[@]}"; then
		return 0
	fi
	local tier_started kernel_dir
	tier_started=$(now_seconds)
	log "fscache tier: building (or finding) the 6.12 guest kernel"
	kernel_dir=$("$GUEST_IMAGES_DIR/kernel/ondemand-6.12.sh") ||
		die "the 6.12 guest kernel does not build"
	ensure_host_packages e2fsprogs
	local share=$WORK/share-images extra=$WORK/fscache-files
	mkdir -p "$share" "$extra"
	log "fscache tier: building the test images"
	fscache_tree "$WORK/fscache-src"
	"$DAEMON" image build "$WORK/fscache-src" --out "$share/a" --log-level warn >/dev/null
	(cd "$WORK/fscache-src" && find . -type f | LC_ALL=C sort | xargs sha256sum) >"$share/a.sha256"
	# Image b: its blob is corrupted in the store (one byte of chunk 2).
	mkdir -p "$WORK/fscache-src-b"
	head -c $((4 << 20)) /dev/urandom >"$WORK/fscache-src-b/big"
	head -c 1000 /dev/urandom >"$WORK/fscache-src-b/small"
	"$DAEMON" image build "$WORK/fscache-src-b" --out "$share/b" --log-level warn >/dev/null
	local bad_blob bad_chunk=2 object
	bad_blob=$("$DAEMON" image inspect --log-level error "$share/b" | awk '$1 == "blob" { print $2 }')
	object=$("$DAEMON" image inspect --log-level error "$share/b" | awk '$1 == "object" { print $2 }')
	printf '\xff' | dd of="$share/b/$object" bs=1 seek=$(((bad_chunk << 20) + 100)) conv=notrunc status=none
	chunks_of() { "$DAEMON" image inspect --log-level error "$share/a" "$1" | cut -f2; }
	{
		echo "F_SMALL=d20/f1500 F_SMALL_CHUNKS=$(chunks_of d20/f1500)"
		echo "F_SHARED=d0/f1000 F_SHARED_CHUNKS=$(chunks_of d0/f1000)"
		echo "F_BIG=d0/f0 F_RESTART=d20/f500 F_RESTART_CHUNKS=$(chunks_of d20/f500)"
		echo "F_HELD=d0/f1200"
		echo "BAD_FILE=big BAD_BLOB=$bad_blob BAD_CHUNK=$bad_chunk"
		echo "GOOD_FILE=small GOOD_DIGEST=$(sha256sum <"$WORK/fscache-src-b/small" | cut -c1-64)"
	} >"$share/expect.env"
	# The guest's cachefiles directory: ext4 (cachefiles cannot bind on tmpfs).
	local disk=$WORK/fscache-cache.ext4
	truncate -s 2G "$disk"
	mkfs.ext4 -q -F -E lazy_itable_init=1,lazy_journal_init=1 "$disk"
	# berth and the harness, without debug info, ride in the initramfs.
	local bin_dir
	bin_dir=$(dirname "$DAEMON")
	(cd "$REPO_ROOT" && cargo build --release --quiet -p berth-ondemand --bin berth-service-harness) >&2 ||
		die "berth-service-harness does not build"
	objcopy --strip-debug "$DAEMON" "$extra/berth"
	objcopy --strip-debug "$bin_dir/berth-service-harness" "$extra/berth-service-harness"
	cp "$GUEST_IMAGES_DIR/guest/fscache.sh" "$GUEST_IMAGES_DIR/guest/hold-fd.pl" "$extra/"

	start_daemon images "$share" --readonly
	# Boot the 6.12 kernel: module-less, so its own initramfs; the 7.2 one is put back.
	local saved_kernel=$KERNEL_IMAGE saved_modules=${KERNEL_MODULES:-} saved_base=$BASE_INITRAMFS
	KERNEL_IMAGE=$kernel_dir/vmlinux
	KERNEL_MODULES=""
	build_base_initramfs
	cat >"$WORK/fscache.sh" <<'EOF'
. /test/fscache.sh
EOF
	log "fscache tier ready after $(seconds_since "$tier_started") s (kernel $(cat "$kernel_dir/source-version"))"
	RUN_GUEST_EXTRA=$extra GUEST_TIMEOUT=${FSCACHE_GUEST_TIMEOUT:-900} run_guest fscache "$WORK/fscache.sh" \
		"${FSCACHE_GUEST_CHECKS[@]}" -- --fs "images=$WORK/images.sock" --disk "$disk"
	KERNEL_IMAGE=$saved_kernel KERNEL_MODULES=$saved_modules BASE_INITRAMFS=$saved_base
	selected fscache-daemon-exit-0 && check_daemons_exit fscache-daemon-exit-0 images
	rm -f "$disk"
	discard_in_background "$share" "$WORK/fscache-src" "$WORK/fscache-src-b" "$extra"
}

# - image: the Kata rootfs path in the 7.2 guest. On the host, `berth mount` (fanotify)
#   serves a lazily fetched image; berth's virtio-fs shares it read-only ("img") and as
#   the lower layer of an overlay with a writable upper ("rootfs"), which is how a Kata
#   host hands a container its root filesystem. The guest checks every file, that
#   reading one file fetched only its chunks (the host mount's metrics, shared as
#   "meta"), chroots into the rootfs and runs a program of the image, writes into it;
#   a second boot, after the host mount restarted on its cache, fetches nothing.
IMAGE_GUEST_CHECKS=(img-setup img-one-file img-all-files kata-rootfs img-umount
	img-warm-setup img-warm-boot img-warm-umount)
IMAGE_HOST_CHECKS=(kata-upper img-mount-exit-0 img-daemons-exit-0)

# image_mount_start: `berth mount` of the test image plus the overlay on it.
image_mount_start() {
	"$DAEMON" mount "$IMG_DIR" "$IMG_LOWER" --mode fanotify --cache-dir "$WORK/img-cache" \
		--metrics-file "$IMG_META/metrics.prom" --metrics-interval 1 --readahead 0 --prefetch none \
		>>"$LOGS/img-mount.log" 2>&1 &
	IMG_MOUNT_PID=$!
	local _
	for _ in $(seq 300); do
		grep -q " $IMG_LOWER erofs " /proc/self/mounts && break
		kill -0 "$IMG_MOUNT_PID" 2>/dev/null || break
		sleep 0.1
	done
	grep -q " $IMG_LOWER erofs " /proc/self/mounts || {
		sed 's/^/    /' "$LOGS/img-mount.log" >&2
		die "berth mount did not mount the test image"
	}
	mount -t overlay overlay -o "lowerdir=$IMG_LOWER,upperdir=$WORK/img-upper,workdir=$WORK/img-work" "$IMG_ROOTFS"
}

# image_mount_stop: overlay down, then SIGTERM to `berth mount`; its exit status goes
# to IMG_MOUNT_RC.
image_mount_stop() {
	umount "$IMG_ROOTFS"
	kill -TERM "$IMG_MOUNT_PID"
	IMG_MOUNT_RC=0
	wait "$IMG_MOUNT_PID" || IMG_MOUNT_RC=$?
}

image_virtiofs_tier() {
	if ! any_selected "${IMAGE_GUEST_CHECKS[@]}" "${IMAGE_HOST_CHECKS[@]}"; then
		return 0
	fi
	local src=$WORK/img-src
	IMG_DIR=$WORK/img-image IMG_LOWER=$WORK/img-lower IMG_ROOTFS=$WORK/img-rootfs IMG_META=$WORK/share-img-meta
	mkdir -p "$src"/{bin,etc,tmp,data} "$IMG_LOWER" "$IMG_ROOTFS" "$IMG_META" "$WORK/img-upper" "$WORK/img-work"
	# A container image: busybox, a program, and data.
	cp "$BUSYBOX" "$src/bin/busybox"
	local applet
	for applet in sh cat date mkdir ls echo; do ln -s busybox "$src/bin/$applet"; done
	printf '#!/bin/sh\necho "hello from a lazily fetched image"\n' >"$src/etc/hello.sh"
	head -c $((32 << 20)) /dev/urandom >"$src/data/big"
	local i
	for i in $(seq 300); do head -c $(((i * 4099) % 50000)) /dev/urandom >"$src/data/f$i"; done
	"$DAEMON" image build "$src" --out "$IMG_DIR" --log-level warn >/dev/null
	(cd "$src" && find . -type f | LC_ALL=C sort | xargs sha256sum) >"$IMG_META/image.sha256"
	{
		echo "ONE_FILE=data/big ONE_DIGEST=$(sha256sum <"$src/data/big" | cut -c1-64)"
		echo "ONE_CHUNKS=$("$DAEMON" image inspect --log-level error "$IMG_DIR" data/big | cut -f2)"
		echo "BLOB_CHUNKS=$("$DAEMON" image inspect --log-level error "$IMG_DIR" | awk '$1 == "chunks" { print $2 }')"
	} >"$IMG_META/expect.env"

	local boot
	for boot in 1 2; do
		local checks=()
		if [ "$boot" = 1 ]; then
			checks=(img-setup img-one-file img-all-files kata-rootfs img-umount)
		else
			# Cold host page cache, the mount restarted on its cache directory.
			sync
			echo 3 >/proc/sys/vm/drop_caches
			checks=(img-warm-setup img-warm-boot img-warm-umount)
		fi
		image_mount_start
		start_daemon img "$IMG_LOWER" --readonly
		start_daemon rootfs "$IMG_ROOTFS"
		start_daemon meta "$IMG_META" --cache=never
		printf 'BOOT=%s\n. /test/image-virtiofs.sh\n' "$boot" >"$WORK/img$boot.sh"
		local extra=$WORK/img-extra
		mkdir -p "$extra"
		cp "$GUEST_IMAGES_DIR/guest/image-virtiofs.sh" "$extra/"
		RUN_GUEST_EXTRA=$extra run_guest "img$boot" "$WORK/img$boot.sh" "${checks[@]}" -- \
			--fs "img=$WORK/img.sock" --fs "rootfs=$WORK/rootfs.sock" --fs "meta=$WORK/meta.sock"
		selected img-daemons-exit-0 && [ "$boot" = 2 ] && check_daemons_exit img-daemons-exit-0 img rootfs meta
		[ "$boot" = 1 ] && for name in img rootfs meta; do
			kill "${DAEMON_PID[$name]}" 2>/dev/null || true
			wait "${DAEMON_PID[$name]}" 2>/dev/null || true
			unset "DAEMON_PID[$name]"
		done
		local start rc
		start=$(now_seconds)
		image_mount_stop
		rc=$IMG_MOUNT_RC
		if [ "$boot" = 2 ] && selected img-mount-exit-0; then
			if [ "$rc" = 0 ]; then
				record img-mount-exit-0 PASS "$(seconds_since "$start")"
			else
				record img-mount-exit-0 FAIL "$(seconds_since "$start")" "berth mount exited with $rc" "$(tail -n 5 "$LOGS/img-mount.log")"
			fi
		fi
		if [ "$boot" = 1 ] && selected kata-upper; then
			start=$(now_seconds)
			if [ "$(cat "$WORK/img-upper/tmp/from-container" 2>/dev/null)" = "written in the container" ] &&
				[ -f "$WORK/img-upper/var/log/run" ] && [ ! -e "$src/tmp/from-container" ]; then
				record kata-upper PASS "$(seconds_since "$start")"
			else
				record kata-upper FAIL "$(seconds_since "$start")" "the container's writes are not in the overlay's upper layer on the host"
			fi
		fi
	done
	discard_in_background "$src" "$IMG_DIR" "$WORK/img-cache" "$WORK/img-upper" "$WORK/img-work" "$IMG_META" "$WORK/img-extra"
}
