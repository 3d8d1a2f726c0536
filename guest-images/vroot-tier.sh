# shellcheck shell=bash
# The guest-rootfs tier of test.sh (sourced by it; uses its record/run_guest/
# check_daemons_exit helpers and $WORK, $LOGS, $DAEMON). bookworm's QEMU 7.2 boots the
# test guest with its root filesystem on a vhost-user-blk disk that `berth block
# serve-vhost` serves on this host, everything in an S3-compatible bucket (moto, as the
# cache and volume tests use):
#   1. the root is a lazily fetched ext4 image whose blob is in the bucket, writes go
#      to an overlay (the Kata rootfs path); beside it a blank berth volume gets a
#      filesystem and a tree, and berth serving it is killed with SIGKILL once the
#      guest has synced and released it;
#   2. berth serves that volume again from its local log: fsck is clean and every file
#      checks out; the root is a volume made from the root image;
#   3. that root volume, snapshotted and cloned, boots as the clone, which sees the
#      snapshot and writes its own; the origin keeps what it had; the killed volume
#      opens from the bucket alone (its local state thrown away).
# Stage one of each boot is guest/root-init: it mounts the disk named by berth.root=
# and hands over to the disk's own /init.

VROOT_GUEST_CHECKS=(vroot-root vroot-tree vroot-write vol-fill vol-after-kill vol-root-boot
	vol-clone-boot vol-bucket-only vol-origin-kept)
VROOT_HOST_CHECKS=(vroot-image-host vroot-daemons-exit-0 vol-killed vol-recover-daemons-exit-0
	vol-snapshot-clone vol-clone-daemons-exit-0)

VROOT_BUCKET=berth-vroot
VROOT_S3_ENV=()
VROOT_MOTO_PID=""

# Starts moto on a free loopback port with the tier's bucket; sets VROOT_S3_ENV. Fails
# when moto is not installed.
vroot_start_bucket() {
	local moto port
	moto=$(command -v moto_server || echo "${XDG_CACHE_HOME:-$HOME/.cache}/berth/venv/bin/moto_server")
	[ -x "$moto" ] || return 1
	port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
	"$moto" -H 127.0.0.1 -p "$port" >"$LOGS/moto.log" 2>&1 &
	VROOT_MOTO_PID=$!
	BACKGROUND_PIDS+=("$VROOT_MOTO_PID")
	local status=""
	for _ in $(seq 300); do
		status=$(python3 - "$port" "$VROOT_BUCKET" 2>/dev/null <<'EOF' || true
import sys, urllib.request
port, bucket = sys.argv[1], sys.argv[2]
request = urllib.request.Request(f"http://127.0.0.1:{port}/{bucket}", method="PUT")
print(urllib.request.urlopen(request, timeout=2).status)
EOF
		)
		[ "$status" = 200 ] && break
		sleep 0.1
	done
	[ "$status" = 200 ] || die "moto did not start on port $port: $(tail -n 5 "$LOGS/moto.log")"
	VROOT_S3_ENV=(AWS_ENDPOINT="http://127.0.0.1:$port" AWS_ALLOW_HTTP=true AWS_REGION=us-east-1
		AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing)
}

# vroot_berth ARGS...: berth with the bucket's settings.
vroot_berth() { env "${VROOT_S3_ENV[@]}" "$DAEMON" "$@"; }

# vroot_serve NAME ARGS...: `berth block serve-vhost --socket-path $WORK/NAME.sock ARGS`
# in the background, as DAEMON_PID[NAME].
vroot_serve() {
	local name=$1
	shift
	rm -f "$WORK/$name.sock"
	env "${VROOT_S3_ENV[@]}" "$DAEMON" block serve-vhost --socket-path "$WORK/$name.sock" \
		"$@" >"$LOGS/$name.log" 2>&1 &
	DAEMON_PID[$name]=$!
	wait_for_socket "$name" "$WORK/$name.sock"
}

# vroot_disk NAME...: QEMU arguments for vhost-user-blk disks on $WORK/NAME.sock.
vroot_disks() {
	local name
	for name in "$@"; do
		printf '%s\n' --qemu-arg -chardev --qemu-arg "socket,id=$name,path=$WORK/$name.sock" \
			--qemu-arg -device --qemu-arg "vhost-user-blk-pci,chardev=$name,num-queues=1"
	done
}

# vroot_files NAME COUNT SIZE_STEP: a directory $WORK/NAME of four 2 MiB files and COUNT
# small ones, with its checksums in $WORK/NAME.sums (relative paths).
vroot_files() {
	local dir=$WORK/$1 i
	mkdir -p "$dir/small"
	for i in 1 2 3 4; do head -c 2M /dev/urandom >"$dir/big-$i"; done
	for i in $(seq 1 "$2"); do head -c $((i * $3)) /dev/urandom >"$dir/small/f$i"; done
	(cd "$dir" && find . -type f -print0 | sort -z | xargs -0 sha256sum) >"$WORK/$1.sums"
}

# The guest says `vol-data released` once its filesystem on the volume is synced and
# unmounted; berth serving the volume is then killed with SIGKILL, before anything
# else the guest does (its upload interval is long, so the tree is only in the local
# log). Runs in the background during the first boot.
vroot_kill_when_released() {
	local console=$1 pid=$2
	for _ in $(seq 6000); do
		if grep -aq 'vol-data released' "$console" 2>/dev/null; then
			kill -9 "$pid" 2>/dev/null || true
			return 0
		fi
		kill -0 "$pid" 2>/dev/null || return 0
		sleep 0.1
	done
}

# vroot_daemons_exit CHECK NAME...: the daemons' exit, recorded as CHECK when it is
# selected; waited for (and ended after 15 s) either way, as the next boot reuses names.
vroot_daemons_exit() {
	local check=$1
	shift
	if selected "$check"; then
		check_daemons_exit "$check" "$@"
	else
		reap_daemons "$@"
	fi
}

# vroot_guest_script NAME CHECK FUNCTION [ARGS] [-- CHECK FUNCTION [ARGS]]...: writes
# $WORK/NAME.sh, the guest's script running those checks.
vroot_guest_script() {
	local script=$WORK/$1.sh
	shift
	{
		echo 'echo "@@boot $(cut -d" " -f1 /proc/uptime)"'
		echo '. /test/checks.sh; . /test/block.sh; . /test/vhost-blk.sh; . /test/vroot.sh'
		local line="check"
		while [ $# -gt 0 ]; do
			if [ "$1" = -- ]; then
				echo "$line"
				line="check"
			else
				line+=" $1"
			fi
			shift
		done
		echo "$line"
		echo '[ "$CHECK_FAILURES" = 0 ]'
	} >"$script"
}

vroot_tier() {
	if ! any_selected "${VROOT_GUEST_CHECKS[@]}" "${VROOT_HOST_CHECKS[@]}"; then
		return 0
	fi
	if ! vroot_start_bucket; then
		local check
		for check in "${VROOT_GUEST_CHECKS[@]}" "${VROOT_HOST_CHECKS[@]}"; do
			selected "$check" && record "$check" SKIP 0 "moto (the S3-compatible test server) is not installed: pip install 'moto[server]'"
		done
		return 0
	fi
	prepare_block_guest
	local extra=$WORK/vroot-files
	mkdir -p "$extra"
	cp "$GUEST_IMAGES_DIR/guest/block.sh" "$GUEST_IMAGES_DIR/guest/vhost-blk.sh" \
		"$GUEST_IMAGES_DIR/guest/vroot.sh" "$extra/"

	# The root filesystem: the guest's own initramfs (busybox, init, modules) and a tree
	# of files, as a 192 MiB ext4 block image whose blob is uploaded to the bucket (the raw
	# disk, kept by --keep-raw-blob as disk.img, is what a volume is made from).
	local root=$WORK/vroot-tree
	mkdir -p "$root"
	(cd "$root" && cpio -idmu --quiet <"$BASE_INITRAMFS" && cpio -idmu --quiet <"$BLOCK_MODULES_CPIO")
	vroot_files vroot-data 80 997
	mv "$WORK/vroot-data" "$root/data"
	mv "$WORK/vroot-data.sums" "$root/data.sums"
	vroot_berth image build --block "$root" --out "$WORK/vroot-img" --size 192M --chunk-size 256K \
		--backend "s3://$VROOT_BUCKET/images" --keep-raw-blob >"$LOGS/vroot-image-build.log" 2>&1 ||
		die "berth image build --block failed: $(tail -n 5 "$LOGS/vroot-image-build.log")"
	# Stage one: the block modules (ext4) and root-init as /init, after the base initramfs.
	local stage1=$WORK/vroot-stage1
	mkdir -p "$stage1"
	cp "$GUEST_IMAGES_DIR/guest/root-init" "$stage1/init"
	chmod 755 "$stage1/init"
	cp "$BLOCK_MODULES_CPIO" "$WORK/vroot-append.cpio"
	truncate -s %512 "$WORK/vroot-append.cpio"
	(cd "$stage1" && echo init | cpio -o -H newc --owner=0:0 --quiet) >>"$WORK/vroot-append.cpio"

	# The volumes: a blank one for the filesystem the guest makes, one made from the root
	# image's raw disk.
	vroot_files voltree 60 523
	mv "$WORK/voltree" "$WORK/voltree.sums" "$extra/"
	local vol_data=s3://$VROOT_BUCKET/vol-data vol_root=s3://$VROOT_BUCKET/vol-root
	local vol_clone=s3://$VROOT_BUCKET/vol-clone
	vroot_berth volume create "$vol_data" --size 128M >"$LOGS/vol-create.log" 2>&1 ||
		die "berth volume create failed: $(tail -n 5 "$LOGS/vol-create.log")"
	vroot_berth volume create "$vol_root" --from "$WORK/vroot-img/disk.img" >>"$LOGS/vol-create.log" 2>&1 ||
		die "berth volume create --from failed: $(tail -n 5 "$LOGS/vol-create.log")"
	# Served from the bucket only: the raw disk the build kept goes.
	rm -f "$WORK/vroot-img/disk.img"
	local boot_args=(--disk "$BLOCK_TOOLS_IMAGE,ro" --initrd-append "$WORK/vroot-append.cpio")

	# Boot 1: the image as the root; the blank volume filled, released, berth killed.
	vroot_serve vroot-image "$WORK/vroot-img" --backend "s3://$VROOT_BUCKET/images" \
		--overlay "$WORK/vroot-overlay" --cache-dir "$WORK/vroot-cache" --serial vroot
	vroot_serve vol-data "volume:$vol_data" --volume-dir "$WORK/vol-data-local" \
		--upload-interval 3600 --serial vol-data
	vroot_guest_script vroot vol-fill volume_fill vol-data -- vroot-root root_is vroot -- \
		vroot-tree root_tree -- vroot-write root_write
	vroot_kill_when_released "$LOGS/vroot-console.log" "${DAEMON_PID[vol-data]}" &
	local killer=$!
	local disks=()
	mapfile -t disks < <(vroot_disks vroot-image vol-data)
	RUN_GUEST_EXTRA=$extra run_guest vroot "$WORK/vroot.sh" \
		vol-fill vroot-root vroot-tree vroot-write -- \
		"${boot_args[@]}" --append berth.root=vroot "${disks[@]}"
	wait "$killer" 2>/dev/null || true
	vroot_daemons_exit vroot-daemons-exit-0 vroot-image
	local start problems=() rc=0
	if selected vol-killed; then
		start=$(now_seconds)
		# (Quietly: bash would report the kill.)
		wait "${DAEMON_PID[vol-data]}" 2>/dev/null || rc=$?
		[ "$rc" = 137 ] || problems+=("berth serving vol-data ended with status $rc, not by the SIGKILL sent once the guest released the disk")
		printf '    the bucket before recovery: %s\n' "$(vroot_berth volume info "$vol_data" 2>&1 | grep -i 'manifest' | head -n 1)"
		record_problems vol-killed "$start" "${problems[@]}"
	else
		kill -9 "${DAEMON_PID[vol-data]}" 2>/dev/null || true
		wait "${DAEMON_PID[vol-data]}" 2>/dev/null || true
	fi
	unset "DAEMON_PID[vol-data]"
	# The root's writes went to the overlay; of the 192 MiB image only what the boot read
	# was fetched.
	if selected vroot-image-host; then
		check_overlay_and_fetch vroot-image-host "$WORK/vroot-overlay" "$WORK/vroot-cache" 192
	fi


	# Boot 2: the killed volume served again from its local log; the root volume boots.
	vroot_serve vol-data "volume:$vol_data" --volume-dir "$WORK/vol-data-local" --serial vol-data
	vroot_serve vol-root "volume:$vol_root" --volume-dir "$WORK/vol-root-local" --serial vol-root
	vroot_guest_script vol-recover vol-after-kill volume_verify vol-data -- \
		vol-root-boot root_generation vol-root 1
	mapfile -t disks < <(vroot_disks vol-root vol-data)
	RUN_GUEST_EXTRA=$extra run_guest vol-recover "$WORK/vol-recover.sh" vol-after-kill vol-root-boot -- \
		"${boot_args[@]}" --append berth.root=vol-root "${disks[@]}"
	vroot_daemons_exit vol-recover-daemons-exit-0 vol-data vol-root

	# The root volume's state (closed: everything is in the bucket) snapshotted and cloned.
	start=$(now_seconds)
	problems=()
	vroot_berth volume snapshot "$vol_root" generation-1 >"$LOGS/vol-snapshot.log" 2>&1 ||
		problems+=("berth volume snapshot failed: $(tail -n 3 "$LOGS/vol-snapshot.log")")
	vroot_berth volume clone "$vol_root" "$vol_clone" --snapshot generation-1 >>"$LOGS/vol-snapshot.log" 2>&1 ||
		problems+=("berth volume clone failed: $(tail -n 3 "$LOGS/vol-snapshot.log")")
	vroot_berth volume info "$vol_root" >"$LOGS/vol-root-info.log" 2>&1 || true
	grep -q 'generation-1' "$LOGS/vol-root-info.log" ||
		problems+=("berth volume info does not list the snapshot: $(head -n 20 "$LOGS/vol-root-info.log")")
	selected vol-snapshot-clone && record_problems vol-snapshot-clone "$start" "${problems[@]}"

	# Boot 3: the clone as the root (no local state), the origin beside it, and the killed
	# volume from the bucket alone.
	vroot_serve vol-clone "volume:$vol_clone" --volume-dir "$WORK/vol-clone-local" --serial vol-clone
	vroot_serve vol-root "volume:$vol_root" --volume-dir "$WORK/vol-root-local" --serial vol-root
	vroot_serve vol-data "volume:$vol_data" --volume-dir "$WORK/vol-data-fresh" --serial vol-data
	vroot_guest_script vol-clone vol-clone-boot root_generation vol-clone 2 -- \
		vol-origin-kept origin_generation vol-root 1 -- vol-bucket-only volume_verify vol-data
	mapfile -t disks < <(vroot_disks vol-clone vol-root vol-data)
	RUN_GUEST_EXTRA=$extra run_guest vol-clone "$WORK/vol-clone.sh" \
		vol-clone-boot vol-origin-kept vol-bucket-only -- \
		"${boot_args[@]}" --append berth.root=vol-clone "${disks[@]}"
	vroot_daemons_exit vol-clone-daemons-exit-0 vol-clone vol-root vol-data
	kill "$VROOT_MOTO_PID" 2>/dev/null || true
	wait "$VROOT_MOTO_PID" 2>/dev/null || true
}
