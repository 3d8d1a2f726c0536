# shellcheck shell=bash
# The per-file DAX boot of test.sh (sourced by it; uses its record/run_guest/
# start_daemon helpers and $WORK, $LOGS, $DAEMON): Debian sid's QEMU on the
# generic vhost-user device, berth with --dax-window 1G --dax-policy size:2M, a
# `dax=inode` mount. The guest checks that exactly the policy's files are DAX
# (statx), writes through a MAP_SHARED mapping and msyncs, runs fio with crc32c
# verification over a DAX file, and writes 256 MiB through the window; the host
# compares the checksums with what it reads from its own files.

SID_DAXINODE_GUEST_CHECKS=(sid-daxinode-mount sid-daxinode-policy sid-daxinode-mmap
	sid-daxinode-fio sid-daxinode-256M sid-daxinode-umount)
SID_DAXINODE_HOST_CHECKS=(sid-daxinode-host sid-daxinode-daemon-exit-0)

# The share: files on both sides of the policy's 2 MiB. The DAX ones are whole
# 2 MiB ranges and preallocated (sparse), so the guest's writes stay inside
# their size and go through the window.
dax_inode_share() {
	local share=$1
	mkdir -p "$share"
	head -c 4K /dev/urandom >"$share/small-4k"
	head -c 1M /dev/urandom >"$share/mid-1M"
	head -c $(((2 << 20) - 4096)) /dev/urandom >"$share/below-2M"
	head -c 2M /dev/urandom >"$share/exact-2M"
	truncate -s 8M "$share/big-8M"
	truncate -s 256M "$share/big-256M"
	truncate -s 64M "$share/fio-64M"
	(cd "$share" && sha256sum small-4k mid-1M below-2M exact-2M >host.sums)
}

dax_inode_tier() {
	if ! any_selected "${SID_DAXINODE_GUEST_CHECKS[@]}" "${SID_DAXINODE_HOST_CHECKS[@]}"; then
		return 0
	fi
	if [ "$daemon_kind" != berth ]; then
		local check
		for check in "${SID_DAXINODE_GUEST_CHECKS[@]}" "${SID_DAXINODE_HOST_CHECKS[@]}"; do
			selected "$check" && record "$check" SKIP 0 "virtiofsd offers no DAX window"
		done
		return 0
	fi
	local share=$WORK/share-daxinode extra=$WORK/daxinode-files
	dax_inode_share "$share"
	mkdir -p "$extra"
	cp "$GUEST_IMAGES_DIR/guest/dax.pl" "$GUEST_IMAGES_DIR/guest/dax.sh" "$extra/"
	start_daemon daxinode "$share" --tag daxinode --max-request-queues 1 \
		--dax-window 1G --dax-policy size:2M
	cat >"$WORK/sid-daxinode.sh" <<'GUEST'
echo "@@boot $(cut -d' ' -f1 /proc/uptime)"
. /test/checks.sh
. /test/dax.sh
# The mount and unmount run whatever --only picked.
[ -z "$ONLY" ] || ONLY="$ONLY,sid-daxinode-mount,sid-daxinode-umount"
check sid-daxinode-mount mount_dax_inode_share daxinode
check sid-daxinode-policy dax_policy_files /mnt/daxinode
check sid-daxinode-mmap dax_mmap_write /mnt/daxinode
check sid-daxinode-fio dax_fio_verify /mnt/daxinode
check sid-daxinode-256M dax_write_256m /mnt/daxinode
check sid-daxinode-umount unmount_shares daxinode
[ "$CHECK_FAILURES" = 0 ]
GUEST
	RUN_GUEST_EXTRA=$extra run_guest sid-daxinode "$WORK/sid-daxinode.sh" "${SID_DAXINODE_GUEST_CHECKS[@]}" -- \
		--qemu sid --timeout 300 --fs "daxinode=$WORK/daxinode.sock,device=generic"
	selected sid-daxinode-daemon-exit-0 && check_daemons_exit sid-daxinode-daemon-exit-0 daxinode
	if selected sid-daxinode-host; then
		local start problems=() name want got maps
		start=$(now_seconds)
		for name in mmap:big-8M 256M:big-256M; do
			want=$(cat "$share/${name%%:*}.sha256" 2>/dev/null || echo none)
			got=$(sha256sum <"$share/${name#*:}" | cut -c1-64)
			[ "$want" = "$got" ] ||
				problems+=("the guest wrote sha256 $want into ${name#*:} through the window, the host reads $got")
		done
		maps=$(sed -n 's/.*DAX window at exit: .* maps=\([0-9]*\) .*/\1/p' "$LOGS/daxinode.log")
		[ "${maps:-0}" -gt 0 ] || problems+=("berth mapped nothing into the window ($LOGS/daxinode.log)")
		# 256 MiB written through the window is at least 128 mappings of 2 MiB.
		if selected sid-daxinode-256M && [ "${maps:-0}" -lt 128 ]; then
			problems+=("only ${maps:-0} window mappings for a 256 MiB file written through DAX")
		fi
		if grep -E 'did not (map|unmap)|Cannot unmap' "$LOGS/daxinode.log" >/dev/null; then
			problems+=("the VMM failed window requests: $(grep -E 'did not (map|unmap)|Cannot unmap' "$LOGS/daxinode.log" | sed -n 1,3p)")
		fi
		record_problems sid-daxinode-host "$start" "${problems[@]}"
	fi
	discard_in_background "$share"
}
