# shellcheck shell=bash
# The vhost-user-blk tier of test.sh (sourced by it; uses its record/run_guest/
# check_daemons_exit helpers and $WORK, $LOGS, $DAEMON): bookworm's QEMU 7.2 gets two
# vhost-user-blk-pci disks served by `berth block serve-vhost` on this host, a raw file
# (two queues) and a lazily fetched ext4 image with an overlay; the guest puts a
# filesystem and fio on the first and reads and writes the second's files.

VBLK_GUEST_CHECKS=(vblk-setup vblk-raw-fs vblk-raw-discard vblk-raw-fio vblk-raw-fsx vblk-image-fs vblk-image-fsx)
VBLK_HOST_CHECKS=(vblk-daemons-exit-0 vblk-raw-host vblk-image-host)

# start_vblk NAME ARGS...: `berth block serve-vhost --socket-path $WORK/NAME.sock ARGS`
# in the background, as DAEMON_PID[NAME].
start_vblk() {
	local name=$1
	shift
	"$DAEMON" block serve-vhost --socket-path "$WORK/$name.sock" "$@" >"$LOGS/$name.log" 2>&1 &
	DAEMON_PID[$name]=$!
	wait_for_socket "$name" "$WORK/$name.sock"
}

# check_overlay_and_fetch CHECK OVERLAY CACHE_DIR IMAGE_MIB: records CHECK, which passes
# when the overlay holds the guest's 3 MiB write and less than half of the image was
# fetched into the cache.
check_overlay_and_fetch() {
	local check=$1 overlay_file=$2 cache_dir=$3 image_mib=$4 start overlay cached problems=()
	start=$(now_seconds)
	overlay=$(du -k "$overlay_file" | cut -f1)
	cached=$(du -sk "$cache_dir" | cut -f1)
	[ "$overlay" -ge 3072 ] || problems+=("the overlay holds only ${overlay} KiB after a 3 MiB write")
	[ "$cached" -lt $((image_mib << 9)) ] || problems+=("${cached} KiB of a ${image_mib} MiB image were fetched")
	printf '    overlay %s KiB, fetched %s KiB of the %s MiB image\n' "$overlay" "$cached" "$image_mib"
	record_problems "$check" "$start" "${problems[@]}"
}

vhost_blk_tier() {
	if ! any_selected "${VBLK_GUEST_CHECKS[@]}" "${VBLK_HOST_CHECKS[@]}"; then
		return 0
	fi
	prepare_block_guest
	local extra=$WORK/vblk-files
	mkdir -p "$extra" "$WORK/vblk-src/tree"
	cp "$GUEST_IMAGES_DIR/guest/block.sh" "$GUEST_IMAGES_DIR/guest/vhost-blk.sh" "$extra/"
	fsx_binary
	objcopy --strip-debug "$FSX" "$extra/fsx"
	cp "$REPO_ROOT/tests/fsx/block.toml" "$extra/fsx-block.toml"
	# The image: 24 MiB of files in a 128 MiB ext4 filesystem.
	local i
	for i in $(seq 1 6); do head -c 4M /dev/urandom >"$WORK/vblk-src/big-$i"; done
	for i in $(seq 1 60); do head -c $((i * 523)) /dev/urandom >"$WORK/vblk-src/tree/f$i"; done
	(cd "$WORK/vblk-src" && find . -type f -print0 | sort -z | xargs -0 sha256sum) >"$extra/vblk-tree.sums"
	"$DAEMON" image build --block "$WORK/vblk-src" --out "$WORK/vblk-img" --size 128M \
		--chunk-size 256K >"$LOGS/vblk-image-build.log" 2>&1 ||
		die "berth image build --block failed: $(tail -n 5 "$LOGS/vblk-image-build.log")"
	truncate -s 128M "$WORK/vblk-raw.img"
	start_vblk vblk-raw "$WORK/vblk-raw.img" --queues 2 --serial vblk-raw
	start_vblk vblk-image "$WORK/vblk-img" --overlay "$WORK/vblk-overlay" \
		--cache-dir "$WORK/vblk-cache" --readahead 0 --serial vblk-image
	cat >"$WORK/vblk.sh" <<'GUEST'
echo "@@boot $(cut -d' ' -f1 /proc/uptime)"
. /test/checks.sh
. /test/block.sh
. /test/vhost-blk.sh
check vblk-setup vblk_setup
check vblk-raw-fs vblk_raw_fs
check vblk-raw-discard vblk_raw_discard
check vblk-raw-fio vblk_raw_fio
check vblk-raw-fsx vblk_exercise vblk-raw 31
check vblk-image-fs vblk_image_fs
check vblk-image-fsx vblk_exercise vblk-image 32
[ "$CHECK_FAILURES" = 0 ]
GUEST
	RUN_GUEST_EXTRA=$extra run_guest vblk "$WORK/vblk.sh" "${VBLK_GUEST_CHECKS[@]}" -- \
		--disk "$BLOCK_TOOLS_IMAGE,ro" --initrd-append "$BLOCK_MODULES_CPIO" \
		--qemu-arg -chardev --qemu-arg "socket,id=vblk0,path=$WORK/vblk-raw.sock" \
		--qemu-arg -device --qemu-arg "vhost-user-blk-pci,chardev=vblk0,num-queues=2" \
		--qemu-arg -chardev --qemu-arg "socket,id=vblk1,path=$WORK/vblk-image.sock" \
		--qemu-arg -device --qemu-arg "vhost-user-blk-pci,chardev=vblk1,num-queues=1"
	selected vblk-daemons-exit-0 && check_daemons_exit vblk-daemons-exit-0 vblk-raw vblk-image
	local start want got problems=()
	if selected vblk-raw-host; then
		start=$(now_seconds)
		want=$(tr -d '\r' <"$LOGS/vblk-console.log" | sed -n 's/.*vblk-raw-sha256 \([0-9a-f]\{64\}\).*/\1/p' | tail -n1)
		got=$(dd if="$WORK/vblk-raw.img" bs=1M skip=96 count=4 status=none | sha256sum | cut -c1-64)
		[ -n "$want" ] && [ "$want" = "$got" ] ||
			problems+=("the guest wrote sha256 ${want:-nothing} at 96 MiB, the served file holds $got")
		record_problems vblk-raw-host "$start" "${problems[@]}"
	fi
	# The guest's writes went to the overlay; of the image only what was read was fetched
	# (the tree is 24 MiB of 128 MiB).
	if selected vblk-image-host; then
		check_overlay_and_fetch vblk-image-host "$WORK/vblk-overlay" "$WORK/vblk-cache" 128
	fi
}
