# shellcheck shell=bash
# The DAX reclaim checks of test.sh (sourced by it; uses its record/run_guest/
# start_daemon helpers and $WORK, $LOGS, $DAEMON): one sid QEMU boot on the
# generic vhost-user device with a 64 MiB window.
#
# - sid-daxr-working-set: 512 MiB of files checksummed through the 64 MiB
#   window, so the guest reclaims ranges (REMOVEMAPPING) under load.
# - sid-daxr-truncate-loop (only with BERTH_DAX_TRUNCATE_RACE=1, SKIP
#   otherwise): a host process truncates the file the guest is reading through
#   the window to random page-aligned sizes and rewrites it, in a loop; QEMU
#   must keep running (berth re-points window ranges past the new end at its
#   placeholder), the guest must never read a byte that was never in the file,
#   and the file must read back right at its final size. It runs last: measured
#   here, QEMU 11.1.3 under TCG dies of SIGBUS within the first few rounds, in
#   the race the README describes (the vCPU touches a page past the new end
#   before berth's re-pointing reaches QEMU, ~4 ms per round trip under TCG).

DAX_RECLAIM_GUEST_CHECKS=(sid-daxr-mount sid-daxr-truncate-loop sid-daxr-working-set sid-daxr-umount)
DAX_RECLAIM_HOST_CHECKS=(sid-daxr-host sid-daxr-daemon-exit-0)
# How often the host truncates and rewrites the file the guest reads.
DAX_RECLAIM_ROUNDS=${DAX_RECLAIM_ROUNDS:-40}

# The host half of the loop: waits for the guest to start reading, then
# truncates loop-file to a random page-aligned size and writes the pattern back
# over its whole length, DAX_RECLAIM_ROUNDS times; leaves it truncated to a last
# random size, which it reports in loop-done.
dax_reclaim_host_loop() {
	local share=$1 pattern=$2 deadline=$((SECONDS + GUEST_TIMEOUT)) round size pages
	until [ -e "$share/loop-start" ]; do
		[ $SECONDS -lt $deadline ] || return 0
		sleep 0.05
	done
	pages=$(($(stat -c %s "$pattern") / 4096))
	for round in $(seq "$DAX_RECLAIM_ROUNDS"); do
		size=$(((RANDOM * 32768 + RANDOM) % pages * 4096))
		truncate -s "$size" "$share/loop-file"
		sleep 0.1
		dd if="$pattern" of="$share/loop-file" bs=1M conv=notrunc status=none
		sleep 0.1
	done
	size=$(((RANDOM * 32768 + RANDOM) % pages * 4096))
	truncate -s "$size" "$share/loop-file"
	# Padded to a whole page, which QEMU 11.1 can map (the guest reads it through
	# the window too).
	printf '%-4095s\n' "$size" >"$share/loop-done.tmp"
	mv "$share/loop-done.tmp" "$share/loop-done"
}

dax_reclaim_tier() {
	if ! any_selected "${DAX_RECLAIM_GUEST_CHECKS[@]}" "${DAX_RECLAIM_HOST_CHECKS[@]}"; then
		return 0
	fi
	local check
	if [ "$daemon_kind" != berth ]; then
		for check in "${DAX_RECLAIM_GUEST_CHECKS[@]}" "${DAX_RECLAIM_HOST_CHECKS[@]}"; do
			selected "$check" && record "$check" SKIP 0 "virtiofsd offers no DAX window"
		done
		return 0
	fi
	local share=$WORK/share-daxr extra=$WORK/daxr-files i
	mkdir -p "$share/ws" "$extra"
	# The pattern has no zero byte: a zero read back can only be past an end.
	head -c 8M /dev/urandom | tr '\000' '\001' >"$WORK/dax-pattern"
	cp "$WORK/dax-pattern" "$share/dax-pattern"
	cp "$WORK/dax-pattern" "$share/loop-file"
	for i in $(seq 16); do
		head -c 32M /dev/urandom >"$share/ws/f$i"
	done
	(cd "$share/ws" && sha256sum -- *) >"$extra/ws.sha256"
	cp "$GUEST_IMAGES_DIR/guest/dax-reclaim.sh" "$GUEST_IMAGES_DIR/guest/dax-reclaim-read.pl" "$extra/"
	start_daemon daxr "$share" --tag daxr --max-request-queues 1 --dax-window 64M
	local race=${BERTH_DAX_TRUNCATE_RACE:-0} guest_checks=()
	{
		echo 'echo "@@boot $(cut -d" " -f1 /proc/uptime)"'
		echo '. /test/checks.sh'
		echo '. /test/dax-reclaim.sh'
		echo 'check sid-daxr-mount mount_dax_share daxr'
		echo 'check sid-daxr-working-set dax_working_set /mnt/daxr'
		[ "$race" != 1 ] || echo 'check sid-daxr-truncate-loop dax_truncate_loop /mnt/daxr'
		echo 'check sid-daxr-umount unmount_shares daxr'
		echo '[ "$CHECK_FAILURES" = 0 ]'
	} >"$WORK/sid-daxr.sh"
	for check in "${DAX_RECLAIM_GUEST_CHECKS[@]}"; do
		if [ "$check" = sid-daxr-truncate-loop ] && [ "$race" != 1 ]; then
			selected "$check" && record "$check" SKIP 0 "QEMU 11.1.3 dies of SIGBUS in the race between a host truncation and berth's re-pointing (README, DAX); BERTH_DAX_TRUNCATE_RACE=1 runs it"
			continue
		fi
		guest_checks+=("$check")
	done
	if [ "$race" = 1 ]; then
		dax_reclaim_host_loop "$share" "$WORK/dax-pattern" &
		BACKGROUND_PIDS+=("$!")
	fi
	RUN_GUEST_EXTRA=$extra run_guest sid-daxr "$WORK/sid-daxr.sh" "${guest_checks[@]}" -- \
		--qemu sid --timeout 300 --fs "daxr=$WORK/daxr.sock,device=generic"
	selected sid-daxr-daemon-exit-0 && check_daemons_exit sid-daxr-daemon-exit-0 daxr
	if selected sid-daxr-host; then
		local start problems=() counter value
		start=$(now_seconds)
		grep -a 'Cache len: 0x4000000 ' "$LOGS/sid-daxr-console.log" >/dev/null ||
			problems+=("the guest did not log a 64 MiB DAX window ($LOGS/sid-daxr-console.log)")
		# The window's counters at exit: ranges were unmapped (the guest
		# reclaiming its window) and, with the truncation loop, re-pointed.
		local counters=(unmaps)
		[ "$race" != 1 ] || counters+=(repoints)
		for counter in "${counters[@]}"; do
			value=$(sed -n "s/.*DAX window at exit: .* $counter=\([0-9]*\).*/\1/p" "$LOGS/daxr.log")
			[ "${value:-0}" -gt 0 ] || problems+=("no $counter in berth's window counters ($LOGS/daxr.log)")
		done
		if grep -E 'did not (map|unmap)|Cannot unmap|Cannot re-point' "$LOGS/daxr.log" >/dev/null; then
			problems+=("window requests failed: $(grep -E 'did not (map|unmap)|Cannot unmap|Cannot re-point' "$LOGS/daxr.log" | sed -n 1,3p)")
		fi
		grep 'DAX window at exit' "$LOGS/daxr.log" | sed 's/^/    /' || true
		record_problems sid-daxr-host "$start" "${problems[@]}"
	fi
	discard_in_background "$share"
}
