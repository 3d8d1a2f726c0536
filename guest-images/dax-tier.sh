# shellcheck shell=bash
# The per-file DAX boot of test.sh (sourced by it; uses its record/run_guest/
# start_daemon helpers and $WORK, $LOGS, $DAEMON): Debian sid's QEMU on the
# generic vhost-user device, berth with --dax-window 1G --dax-policy size:2M
# (and a second share with --dax-policy xattr), `dax=inode` mounts. The guest
# checks that exactly the policies' files are DAX (statx), writes through a MAP_SHARED mapping and msyncs, runs fio with crc32c
# verification over a DAX file, and writes 256 MiB through the window; the host
# compares the checksums with what it reads from its own files.

SID_DAXINODE_GUEST_CHECKS=(sid-daxinode-mount sid-daxinode-policy sid-daxinode-xattr
	sid-daxinode-mmap sid-daxinode-fio sid-daxinode-256M sid-daxinode-umount)
SID_DAXINODE_HOST_CHECKS=(sid-daxinode-host sid-daxinode-daemon-exit-0)
# Two guests, two berth daemons, one host directory, both with DAX: a write
# through guest A's MAP_SHARED mapping shows in guest B's without any sync.
SID_DAXPAIR_GUEST_CHECKS=(sid-daxpair-mount sid-daxpair-seen sid-daxpair-umount)
SID_DAXPAIR_HOST_CHECKS=(sid-daxpair-poke sid-daxpair-host sid-daxpair-daemons-exit-0)
# Everything here, for test.sh's --list and its choice of QEMUs to fetch.
SID_DAX_TIER_CHECKS=("${SID_DAXINODE_GUEST_CHECKS[@]}" "${SID_DAXINODE_HOST_CHECKS[@]}"
	"${SID_DAXPAIR_GUEST_CHECKS[@]}" "${SID_DAXPAIR_HOST_CHECKS[@]}")

# Runs this file's boots (test.sh calls it with sid's QEMU fetched).
sid_dax_tiers() {
	dax_inode_tier
	dax_pair_tier
}

# The second share, served with --dax-policy xattr: two 4 MiB files, one marked.
dax_xattr_share() {
	local share=$1
	mkdir -p "$share"
	head -c 4M /dev/urandom >"$share/marked-4M"
	head -c 4M /dev/urandom >"$share/unmarked-4M"
	python3 -c 'import os, sys; os.setxattr(sys.argv[1], "user.berth.dax", b"1")' "$share/marked-4M"
	(cd "$share" && sha256sum marked-4M unmarked-4M >host.sums)
}

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
	dax_xattr_share "$WORK/share-daxattr"
	mkdir -p "$extra"
	cp "$GUEST_IMAGES_DIR/guest/dax.pl" "$GUEST_IMAGES_DIR/guest/dax.sh" "$extra/"
	start_daemon daxinode "$share" --tag daxinode --max-request-queues 1 \
		--dax-window 1G --dax-policy size:2M
	start_daemon daxattr "$WORK/share-daxattr" --tag daxattr --max-request-queues 1 \
		--dax-window 64M --dax-policy xattr
	cat >"$WORK/sid-daxinode.sh" <<'GUEST'
echo "@@boot $(cut -d' ' -f1 /proc/uptime)"
. /test/checks.sh
. /test/dax.sh
# The mounts and unmounts run whatever --only picked.
[ -z "$ONLY" ] || ONLY="$ONLY,sid-daxinode-mount,sid-daxinode-xattr,sid-daxinode-umount"
check sid-daxinode-mount mount_dax_inode_share daxinode
check sid-daxinode-policy dax_policy_files /mnt/daxinode
check sid-daxinode-xattr dax_xattr_files daxattr
check sid-daxinode-mmap dax_mmap_write /mnt/daxinode
check sid-daxinode-fio dax_fio_verify /mnt/daxinode
check sid-daxinode-256M dax_write_256m /mnt/daxinode
check sid-daxinode-umount unmount_shares daxinode daxattr
[ "$CHECK_FAILURES" = 0 ]
GUEST
	RUN_GUEST_EXTRA=$extra run_guest sid-daxinode "$WORK/sid-daxinode.sh" "${SID_DAXINODE_GUEST_CHECKS[@]}" -- \
		--qemu sid --timeout 600 --fs "daxinode=$WORK/daxinode.sock,device=generic" \
		--fs "daxattr=$WORK/daxattr.sock,device=generic"
	selected sid-daxinode-daemon-exit-0 && check_daemons_exit sid-daxinode-daemon-exit-0 daxinode daxattr
	if selected sid-daxinode-host; then
		local start problems=() name want got maps
		start=$(now_seconds)
		for name in mmap:big-8M 256M:big-256M; do
			selected "sid-daxinode-${name%%:*}" || continue
			want=$(cat "$share/${name%%:*}.sha256" 2>/dev/null || echo none)
			got=$(sha256sum <"$share/${name#*:}" | cut -c1-64)
			[ "$want" = "$got" ] ||
				problems+=("the guest wrote sha256 $want into ${name#*:} through the window, the host reads $got")
		done
		maps=$(sed -n 's/.*DAX window at exit: .* maps=\([0-9]*\) .*/\1/p' "$LOGS/daxinode.log")
		[ "${maps:-0}" -gt 0 ] || problems+=("berth mapped nothing into the window ($LOGS/daxinode.log)")
		# The marked file of the xattr share was read through its window.
		local xattr_maps
		xattr_maps=$(sed -n 's/.*DAX window at exit: .* maps=\([0-9]*\) .*/\1/p' "$LOGS/daxattr.log")
		[ "${xattr_maps:-0}" -gt 0 ] || problems+=("berth mapped nothing for the file marked user.berth.dax ($LOGS/daxattr.log)")
		# 256 MiB written through the window is at least 128 mappings of 2 MiB.
		if selected sid-daxinode-256M && [ "${maps:-0}" -lt 128 ]; then
			problems+=("only ${maps:-0} window mappings for a 256 MiB file written through DAX")
		fi
		if grep -E 'did not (map|unmap)|Cannot unmap' "$LOGS/daxinode.log" >/dev/null; then
			problems+=("the VMM failed window requests: $(grep -E 'did not (map|unmap)|Cannot unmap' "$LOGS/daxinode.log" | sed -n 1,3p)")
		fi
		record_problems sid-daxinode-host "$start" "${problems[@]}"
	fi
	discard_in_background "$share" "$WORK/share-daxattr"
}

dax_pair_tier() {
	if ! any_selected "${SID_DAXPAIR_GUEST_CHECKS[@]}" "${SID_DAXPAIR_HOST_CHECKS[@]}"; then
		return 0
	fi
	if [ "$daemon_kind" != berth ]; then
		local check
		for check in "${SID_DAXPAIR_GUEST_CHECKS[@]}" "${SID_DAXPAIR_HOST_CHECKS[@]}"; do
			selected "$check" && record "$check" SKIP 0 "virtiofsd offers no DAX window"
		done
		return 0
	fi
	local share=$WORK/share-daxpair extra=$WORK/daxpair-files side
	mkdir -p "$share" "$extra"
	# A whole 2 MiB range of zeros: QEMU 11.1 maps nothing past a file's end.
	head -c 2M /dev/zero >"$share/pair-2M"
	cp "$GUEST_IMAGES_DIR/guest/dax.pl" "$GUEST_IMAGES_DIR/guest/dax.sh" "$extra/"
	for side in a b; do
		start_daemon "daxpair-$side" "$share" --tag daxpair --max-request-queues 1 --dax-window 256M
	done
	local mount='[ -z "$ONLY" ] || ONLY="$ONLY,sid-daxpair-mount,sid-daxpair-umount"
check sid-daxpair-mount mount_dax_share daxpair'
	printf '%s\n' 'echo "@@boot $(cut -d" " -f1 /proc/uptime)"' '. /test/checks.sh' '. /test/dax.sh' \
		"$mount" '[ -z "$ONLY" ] || ONLY="$ONLY,sid-daxpair-poke"' \
		'check sid-daxpair-poke dax_pair_poke /mnt/daxpair' \
		'umount /mnt/daxpair' '[ "$CHECK_FAILURES" = 0 ]' >"$WORK/sid-daxpair-a.sh"
	printf '%s\n' 'echo "@@boot $(cut -d" " -f1 /proc/uptime)"' '. /test/checks.sh' '. /test/dax.sh' \
		"$mount" 'check sid-daxpair-seen dax_pair_watch /mnt/daxpair' \
		'check sid-daxpair-umount unmount_shares daxpair' '[ "$CHECK_FAILURES" = 0 ]' >"$WORK/sid-daxpair-b.sh"
	# Guest A boots in the background (its one check is read from its console
	# afterwards), guest B in the foreground like every other boot.
	local console_a=$LOGS/sid-daxpair-a-console.log extra_a rc_a=0 pid_a start
	extra_a=$(RUN_GUEST_EXTRA=$extra guest_extra sid-daxpair-a)
	start=$(now_seconds)
	guest_boot --qemu sid --script "$WORK/sid-daxpair-a.sh" --extra "$extra_a" --console "$console_a" \
		--timeout 300 --fs "daxpair=$WORK/daxpair-a.sock,device=generic" >/dev/null 2>&1 &
	pid_a=$!
	BACKGROUND_PIDS+=("$pid_a")
	RUN_GUEST_EXTRA=$extra run_guest sid-daxpair-b "$WORK/sid-daxpair-b.sh" "${SID_DAXPAIR_GUEST_CHECKS[@]}" -- \
		--qemu sid --timeout 300 --fs "daxpair=$WORK/daxpair-b.sock,device=generic"
	wait "$pid_a" || rc_a=$?
	local kept=() pid
	for pid in "${BACKGROUND_PIDS[@]}"; do
		[ "$pid" = "$pid_a" ] || kept+=("$pid")
	done
	BACKGROUND_PIDS=("${kept[@]}")
	if selected sid-daxpair-poke; then
		local line
		line=$(tr -d '\r' <"$console_a" | grep -a -o '@@check sid-daxpair-poke [A-Z]*' || true)
		case $line in
		*PASS) record sid-daxpair-poke PASS "$(seconds_since "$start")" ;;
		*) record sid-daxpair-poke FAIL "$(seconds_since "$start")" "guest A (status $rc_a) did not store through its mapping: ${line:-no result} ($console_a)" ;;
		esac
	fi
	selected sid-daxpair-daemons-exit-0 && check_daemons_exit sid-daxpair-daemons-exit-0 daxpair-a daxpair-b
	if selected sid-daxpair-host; then
		local problems=() got
		start=$(now_seconds)
		# One copy of the data: the host file itself holds A's unsynced store.
		got=$(dd if="$share/pair-2M" bs=1 skip=4096 count=18 status=none)
		[ "$got" = "written by guest A" ] || problems+=("the host file holds '$got' where guest A stored its text")
		for side in a b; do
			if grep -E 'did not (map|unmap)|Cannot unmap' "$LOGS/daxpair-$side.log" >/dev/null; then
				problems+=("guest $side's VMM failed window requests ($LOGS/daxpair-$side.log)")
			fi
		done
		record_problems sid-daxpair-host "$start" "${problems[@]}"
	fi
	discard_in_background "$share"
}
