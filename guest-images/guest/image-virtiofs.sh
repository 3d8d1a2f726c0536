# shellcheck shell=bash
# Guest side of the image tier (Linux 7.2 guest): a lazily fetched image mounted on the
# host by `berth mount` reaches the guest through berth's virtio-fs, read-only (share
# "img") and as a Kata-style container rootfs (share "rootfs": an overlay whose lower
# layer is that image). Share "meta" (cache=never) holds the host mount's metrics file
# and the host's expectations. BOOT (1 or 2) in /test/env says which boot this is.
echo "@@boot $(cut -d' ' -f1 /proc/uptime)"
# shellcheck disable=SC1091
. /test/checks.sh

fetched() {
	# The host's `berth mount` rewrites its metrics every second.
	sleep 2.2
	local n
	n=$(awk '$1 == "berth_cache_chunks_fetched_total" { print $2 }' /mnt/meta/metrics.prom)
	echo "${n:-0}"
}

setup() {
	mount_shares img rootfs meta
}

one_file() {
	local before after
	before=$(fetched)
	[ "$(sha256sum "/mnt/img/$ONE_FILE" | cut -c1-64)" = "$ONE_DIGEST" ]
	after=$(fetched)
	echo "@@info reading $ONE_FILE fetched $((after - before)) chunks on the host; it has $ONE_CHUNKS"
	[ $((after - before)) -eq "$ONE_CHUNKS" ]
}

all_files() {
	(cd /mnt/img && sha256sum -c --quiet /mnt/meta/image.sha256)
	echo "@@info $(wc -l </mnt/meta/image.sha256) files match; $(fetched) chunks fetched on the host so far (the blob has $BLOB_CHUNKS)"
}

warm_boot() {
	local before after
	before=$(fetched)
	(cd /mnt/img && sha256sum -c --quiet /mnt/meta/image.sha256)
	after=$(fetched)
	echo "@@info second boot read every file: $((after - before)) chunks fetched on the host"
	[ "$after" -eq "$before" ]
}

kata_rootfs() {
	# The container's view: the image as its root, a writable layer on top.
	[ "$(chroot /mnt/rootfs /bin/sh /etc/hello.sh)" = "hello from a lazily fetched image" ]
	chroot /mnt/rootfs /bin/sh -c 'echo written in the container > /tmp/from-container; mkdir -p /var/log; date > /var/log/run'
	[ "$(cat /mnt/rootfs/tmp/from-container)" = "written in the container" ]
	# The image itself stays read-only.
	! touch /mnt/img/should-fail 2>/dev/null
	# And the lower layer's data reads the same through the overlay.
	[ "$(sha256sum "/mnt/rootfs/$ONE_FILE" | cut -c1-64)" = "$ONE_DIGEST" ]
}

load_expectations() {
	# Read outside the checks' subshells, so that every check sees them.
	# shellcheck disable=SC1091
	[ -f /mnt/meta/expect.env ] && . /mnt/meta/expect.env
}

if [ "$BOOT" = 1 ]; then
	check img-setup setup
	load_expectations
	check img-one-file one_file
	check img-all-files all_files
	check kata-rootfs kata_rootfs
	check img-umount unmount_shares img rootfs meta
else
	check img-warm-setup setup
	load_expectations
	check img-warm-boot warm_boot
	check img-warm-umount unmount_shares img rootfs meta
fi
[ "$CHECK_FAILURES" = 0 ]
