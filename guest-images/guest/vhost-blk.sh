# shellcheck shell=bash
# Guest side of the vhost-user-blk checks: QEMU's vhost-user-blk-pci disks, served by
# `berth block serve-vhost` on the host and found here by their serial numbers
# (vblk-raw: a raw file, vblk-image: a lazily fetched ext4 image with an overlay).
# Sourced after checks.sh and block.sh (e2, filesystem_roundtrip, fio_verify_device).

# vblk_device SERIAL: prints the /dev/vdX whose virtio-blk serial is SERIAL.
vblk_device() {
	local sys
	for sys in /sys/block/vd*; do
		if [ "$(cat "$sys/serial" 2>/dev/null)" = "$1" ]; then
			echo "/dev/${sys##*/}"
			return 0
		fi
	done
	echo "no virtio-blk disk has serial $1"
	return 1
}

# e2fsprogs from the block tools disk, mounted once.
vblk_tools() {
	mkdir -p "$E2FS" /mnt/blk
	grep -q " $E2FS " /proc/mounts || mount -t erofs -o ro /dev/vdb "$E2FS"
}

vblk_setup() {
	vblk_tools
	local raw image name
	raw=$(vblk_device vblk-raw)
	image=$(vblk_device vblk-image)
	name=${raw#/dev/}
	echo "@@info $raw: $(cat "/sys/block/$name/size") sectors, $(ls "/sys/block/$name/mq" | wc -l) queues, discard max $(cat "/sys/block/$name/queue/discard_max_bytes") bytes; $image: $(cat "/sys/block/${image#/dev/}/size") sectors"
	# Both queues the device was given are in use.
	[ "$(ls "/sys/block/$name/mq" | wc -l)" = 2 ]
}

# mkfs, fsck, a tree written and read back with checksums across a remount.
vblk_raw_fs() {
	vblk_tools
	filesystem_roundtrip "$(vblk_device vblk-raw)"
}

# DISCARD and WRITE_ZEROES from util-linux: the ranges read back as zeros.
vblk_raw_discard() {
	local dev
	dev=$(vblk_device vblk-raw)
	dd if=/dev/urandom of="$dev" bs=1M count=8 oflag=direct status=none
	blkdiscard -o 0 -l 4M "$dev"
	cmp -n $((4 << 20)) "$dev" /dev/zero
	blkdiscard -z -o 4M -l 4M "$dev"
	cmp -n $((4 << 20)) -i $((4 << 20)):0 "$dev" /dev/zero
}

# fio random writes verified with crc32c, then 4 MiB written at 96 MiB whose sha256 the
# host checks in the file it served.
vblk_raw_fio() {
	local dev sum
	dev=$(vblk_device vblk-raw)
	fio_verify_device "$dev" 16M
	head -c 4M /dev/urandom >/tmp/vblk-payload
	dd if=/tmp/vblk-payload of="$dev" bs=1M seek=96 oflag=direct conv=fsync status=none
	sum=$(sha256sum </tmp/vblk-payload | cut -c1-64)
	echo "@@info vblk-raw-sha256 $sum"
}

# fsx in block mode over the first 16 MiB of the disk with serial $1, from seed $2 (on the
# image disk: writes go to its overlay, reads of the rest fetch the image's chunks).
vblk_exercise() {
	block_exercise "$(vblk_device "$1")" 2000 "$2"
}

# The image's ext4 tree checks out; a file written through the overlay survives a
# remount and fsck.
vblk_image_fs() {
	local dev
	vblk_tools
	dev=$(vblk_device vblk-image)
	mount -t ext4 "$dev" /mnt/blk
	(cd /mnt/blk && sha256sum -c --quiet /test/vblk-tree.sums)
	head -c 3M /dev/urandom >/mnt/blk/written-by-guest
	sha256sum </mnt/blk/written-by-guest >/tmp/written.sum
	umount /mnt/blk
	e2 e2fsck -fn "$dev" >/dev/null
	mount -t ext4 -o ro "$dev" /mnt/blk
	[ "$(sha256sum </mnt/blk/written-by-guest)" = "$(cat /tmp/written.sum)" ]
	umount /mnt/blk
}
