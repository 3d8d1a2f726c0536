# shellcheck shell=bash
# Guest side of the guest-rootfs checks (vroot-tier.sh). This guest's root filesystem
# is a vhost-user-blk disk that berth serves on the host, mounted by root-init, whose
# own /init runs these checks. Other disks are berth volumes. Disks are found by their
# serial numbers. Sourced after checks.sh, block.sh (e2) and vhost-blk.sh (vblk_device,
# vblk_tools).

# root_is SERIAL: / is the ext4 filesystem of the disk with that serial.
root_is() {
	local dev mounted
	dev=$(vblk_device "$1")
	# The last entry for / is the filesystem switch_root moved to (the first is the
	# initramfs).
	mounted=$(awk '$2 == "/" { print $1, $3 }' /proc/mounts | tail -n1)
	echo "@@info root: $mounted ($1)"
	[ "$mounted" = "$dev ext4" ]
	# Read-write: the image's writes go to its overlay, a volume's to its log.
	awk '$2 == "/" { print $4 }' /proc/mounts | tail -n1 | grep -q '^rw'
}

# The tree built into the root image reads back with the host's checksums.
root_tree() {
	(cd /data && sha256sum -c --quiet /data.sums)
	echo "@@info $(wc -l </data.sums) files of the root image's tree verified"
}

# A file written on the root filesystem, synced, reads back after the page cache is
# dropped; its checksum goes to the console for the host.
root_write() {
	head -c 3M /dev/urandom >/written-by-guest
	sync
	echo 3 >/proc/sys/vm/drop_caches
	local sum
	sum=$(sha256sum </written-by-guest | cut -c1-64)
	echo "@@info vroot-written-sha256 $sum"
	[ ${#sum} = 64 ]
}

# volume_fill SERIAL: a filesystem on the blank volume, the host's tree copied in,
# synced, checked, unmounted. The host kills berth once the guest says the disk is
# released.
volume_fill() {
	local dev
	vblk_tools
	dev=$(vblk_device "$1")
	e2 mkfs.ext4 -q -F "$dev"
	mount -t ext4 "$dev" /mnt/blk
	cp -a /test/voltree /mnt/blk/tree
	sync
	(cd /mnt/blk/tree && sha256sum -c --quiet /test/voltree.sums)
	umount /mnt/blk
	echo "@@info $(wc -l </test/voltree.sums) files written and synced"
	# The host kills berth serving the volume on this line (printed as the check ends).
	echo "@@info $1 released"
}

# volume_verify SERIAL: the filesystem is clean and every file of the tree checks out.
volume_verify() {
	local dev
	vblk_tools
	dev=$(vblk_device "$1")
	e2 e2fsck -fn "$dev" >/tmp/fsck.out 2>&1 || {
		cat /tmp/fsck.out
		return 1
	}
	mount -t ext4 -o ro "$dev" /mnt/blk
	(cd /mnt/blk/tree && sha256sum -c --quiet /test/voltree.sums)
	umount /mnt/blk
	echo "@@info fsck clean, $(wc -l </test/voltree.sums) files verified"
}

# root_generation SERIAL N: the root is the disk SERIAL, holds generation N-1 (none for
# N=1), and is moved on to generation N.
root_generation() {
	local serial=$1 next=$2 have=none
	root_is "$serial"
	root_tree
	[ ! -f /generation ] || have=$(cat /generation)
	echo "@@info generation on the root: $have"
	if [ "$next" = 1 ]; then
		[ "$have" = none ]
	else
		[ "$have" = $((next - 1)) ]
	fi
	echo "$next" >/generation
	sync
}

# origin_generation SERIAL N: the disk SERIAL (a volume another was cloned from) still
# holds generation N, whatever the clone wrote.
origin_generation() {
	local dev have
	dev=$(vblk_device "$1")
	mkdir -p /mnt/origin
	mount -t ext4 -o ro "$dev" /mnt/origin
	have=$(cat /mnt/origin/generation)
	umount /mnt/origin
	echo "@@info generation on the origin: $have"
	[ "$have" = "$2" ]
}
