# shellcheck shell=bash
# The shared-versions guest boot of test.sh (sourced by it; uses its
# record/run_guest/start_daemon helpers and $WORK, $LOGS, $DAEMON): Debian sid's
# QEMU on the generic vhost-user device, berth with --shared-cache (the version
# table as shared memory region 1), a guest kernel with berth's shared-versions
# patches (test.sh --kernel; guest-images/kernel/shared-versions/check.sh runs
# these checks). The guest caches the share, a host process changes it, and the
# guest sees every change at its next access; a stat storm over unchanged
# files costs no FUSE requests (counted in berth's exit log).

SV_GUEST_CHECKS=(sv-mount sv-host-changes sv-stat-storm sv-umount)
SV_HOST_CHECKS=(sv-storm-requests sv-daemons-exit-0)
# Two guests on two berth daemons sharing one directory and one table: guest A
# changes, guest B sees every change at its next access; then a host process
# changes what both cache, and both see it (sv-pair-host-changes in B,
# sv-pair-a-host-changes in A, read from its console).
SV_PAIR_GUEST_CHECKS=(sv-pair-mount sv-pair-seen sv-pair-host-changes sv-pair-umount)
SV_PAIR_HOST_CHECKS=(sv-pair-change sv-pair-a-host-changes sv-pair-daemons-exit-0)
SV_TIER_CHECKS=("${SV_GUEST_CHECKS[@]}" "${SV_HOST_CHECKS[@]}"
	"${SV_PAIR_GUEST_CHECKS[@]}" "${SV_PAIR_HOST_CHECKS[@]}")
# Files of the stat storm, and the most LOOKUP + GETATTR requests the whole boot
# may cost: the storm alone would be 20 times its file count without the table.
SV_STORM_FILES=200
SV_MAX_METADATA_REQUESTS=800

# sv_host_files DIR: the files a host process changes in sv_serve_host_changes.
sv_host_files() {
	local d=$1 i
	mkdir -p "$d"
	echo one >"$d/grow-me"
	for i in chmod-me link-me rename-me unlink-me; do echo "$i" >"$d/$i"; done
	chmod 644 "$d/chmod-me"
}

# The host's part of sv-host-changes and the sv-pair-*host-changes checks:
# sv_serve_host_changes DIR DONE READY...: once every guest has cached everything
# (each READY file exists), change DIR as a host process would and say so (DONE).
sv_serve_host_changes() {
	local d=$1 done=$2 deadline=$((SECONDS + GUEST_TIMEOUT)) ready
	shift 2
	for ready in "$@"; do
		until [ -e "$ready" ]; do
			[ $SECONDS -lt $deadline ] || return 0
			sleep 0.02
		done
	done
	chmod 600 "$d/chmod-me"
	echo two >>"$d/grow-me"
	ln "$d/link-me" "$d/link-me-too"
	echo new >"$d/created"
	mv "$d/rename-me" "$d/renamed"
	rm "$d/unlink-me"
	touch "$done"
}

# The checks need a guest kernel with the shared-versions patches, which
# guest-images/kernel/shared-versions/check.sh builds and passes (with
# BERTH_SHARED_VERSIONS_KERNEL=1); other runs of test.sh skip them.
sv_tier() {
	if [ -z "${BERTH_SHARED_VERSIONS_KERNEL:-}" ]; then
		local check
		for check in "${SV_TIER_CHECKS[@]}"; do
			selected "$check" && record "$check" SKIP 0 \
				"needs the shared-versions guest kernel: guest-images/kernel/shared-versions/check.sh runs it"
		done
		return 0
	fi
	sv_single_tier
	sv_pair_tier
}

sv_single_tier() {
	if ! any_selected "${SV_GUEST_CHECKS[@]}" "${SV_HOST_CHECKS[@]}"; then
		return 0
	fi
	if [ "$daemon_kind" != berth ]; then
		local check
		for check in "${SV_GUEST_CHECKS[@]}" "${SV_HOST_CHECKS[@]}"; do
			selected "$check" && record "$check" SKIP 0 "virtiofsd has no version table"
		done
		return 0
	fi
	local share=$WORK/share-sv sig=$WORK/share-svsig extra=$WORK/sv-files i
	mkdir -p "$share/storm" "$sig" "$extra"
	sv_host_files "$share/host"
	for i in $(seq "$SV_STORM_FILES"); do : >"$share/storm/f$i"; done
	cp "$GUEST_IMAGES_DIR/guest/shared-versions.sh" "$extra/"
	start_daemon sv "$share" --tag sv --max-request-queues 1 \
		--shared-cache --version-table "$WORK/sv.table" --version-slots 65536
	start_daemon svsig "$sig" --tag svsig --max-request-queues 1 --cache never
	cat >"$WORK/sv.sh" <<'GUEST'
echo "@@boot $(cut -d' ' -f1 /proc/uptime)"
. /test/checks.sh
. /test/shared-versions.sh
[ -z "$ONLY" ] || ONLY="$ONLY,sv-mount,sv-umount"
check sv-mount sv_mount sv
mount_shares svsig
check sv-host-changes sv_host_changes /mnt/sv/host /mnt/svsig/host-go /mnt/svsig/host-done
check sv-stat-storm sv_stat_storm /mnt/sv /mnt/svsig
umount /mnt/svsig
check sv-umount unmount_shares sv
[ "$CHECK_FAILURES" = 0 ]
GUEST
	sv_serve_host_changes "$share/host" "$sig/host-done" "$sig/host-go" &
	BACKGROUND_PIDS+=($!)
	RUN_GUEST_EXTRA=$extra run_guest sv "$WORK/sv.sh" "${SV_GUEST_CHECKS[@]}" -- \
		--qemu sid --timeout 300 --fs "sv=$WORK/sv.sock,device=generic" \
		--fs "svsig=$WORK/svsig.sock,device=generic"
	selected sv-daemons-exit-0 && check_daemons_exit sv-daemons-exit-0 sv svsig
	if selected sv-storm-requests; then
		local start problems=() counts lookups getattrs
		start=$(now_seconds)
		counts=$(sed -n 's/.*FUSE requests served: \(total=.*\)\./\1/p' "$LOGS/sv.log")
		lookups=$(sed -n 's/.* LOOKUP=\([0-9]*\).*/\1/p' <<<"$counts")
		getattrs=$(sed -n 's/.* GETATTR=\([0-9]*\).*/\1/p' <<<"$counts")
		printf '    %s\n' "berth served: ${counts:-nothing logged}"
		if [ ! -e "$sig/storm-done" ]; then
			problems+=("the guest did not finish the stat storm")
		elif [ -z "$counts" ]; then
			problems+=("berth logged no request counts ($LOGS/sv.log)")
		elif [ $((${lookups:-0} + ${getattrs:-0})) -gt "$SV_MAX_METADATA_REQUESTS" ]; then
			problems+=("$((${lookups:-0} + ${getattrs:-0})) LOOKUP + GETATTR requests for $((20 * SV_STORM_FILES)) stats of unchanged files")
		fi
		record_problems sv-storm-requests "$start" "${problems[@]}"
	fi
	discard_in_background "$share" "$sig"
}

sv_pair_tier() {
	if ! any_selected "${SV_PAIR_GUEST_CHECKS[@]}" "${SV_PAIR_HOST_CHECKS[@]}"; then
		return 0
	fi
	if [ "$daemon_kind" != berth ]; then
		local check
		for check in "${SV_PAIR_GUEST_CHECKS[@]}" "${SV_PAIR_HOST_CHECKS[@]}"; do
			selected "$check" && record "$check" SKIP 0 "virtiofsd has no version table"
		done
		return 0
	fi
	local share=$WORK/share-svpair sig=$WORK/share-svpairsig extra=$WORK/svpair-files side
	mkdir -p "$sig" "$extra"
	sv_host_files "$share/pair"
	sv_host_files "$share/pair-host"
	cp "$GUEST_IMAGES_DIR/guest/shared-versions.sh" "$extra/"
	for side in a b; do
		start_daemon "svpair-$side" "$share" --tag svpair --max-request-queues 1 \
			--shared-cache --version-table "$WORK/svpair.table" --version-slots 65536
		start_daemon "svpairsig-$side" "$sig" --tag svpairsig --max-request-queues 1 --cache never
	done
	local head='echo "@@boot $(cut -d" " -f1 /proc/uptime)"
. /test/checks.sh
. /test/shared-versions.sh
[ -z "$ONLY" ] || ONLY="$ONLY,sv-pair-mount,sv-pair-umount,sv-pair-change,sv-pair-a-host-changes"
check sv-pair-mount sv_mount svpair
mount_shares svpairsig'
	local host_changes='sv_host_changes /mnt/svpair/pair-host'
	printf '%s\n' "$head" 'check sv-pair-change sv_pair_change /mnt/svpair /mnt/svpairsig' \
		"check sv-pair-a-host-changes $host_changes /mnt/svpairsig/a-host-ready /mnt/svpairsig/host-done" \
		'umount /mnt/svpairsig' 'umount /mnt/svpair' '[ "$CHECK_FAILURES" = 0 ]' >"$WORK/sv-pair-a.sh"
	printf '%s\n' "$head" 'check sv-pair-seen sv_pair_seen /mnt/svpair /mnt/svpairsig' \
		"check sv-pair-host-changes $host_changes /mnt/svpairsig/b-host-ready /mnt/svpairsig/host-done" \
		'umount /mnt/svpairsig' 'check sv-pair-umount unmount_shares svpair' \
		'[ "$CHECK_FAILURES" = 0 ]' >"$WORK/sv-pair-b.sh"
	# The host process changes pair-host once both guests cached it (guest A always
	# takes part, guest B when its check is selected).
	local readies=("$sig/a-host-ready")
	selected sv-pair-host-changes && readies+=("$sig/b-host-ready")
	sv_serve_host_changes "$share/pair-host" "$sig/host-done" "${readies[@]}" &
	BACKGROUND_PIDS+=($!)
	# Guest A boots in the background (its check is read from its console
	# afterwards), guest B in the foreground like every other boot.
	local console_a=$LOGS/sv-pair-a-console.log extra_a rc_a=0 pid_a start
	extra_a=$(RUN_GUEST_EXTRA=$extra guest_extra sv-pair-a)
	start=$(now_seconds)
	guest_boot --qemu sid --script "$WORK/sv-pair-a.sh" --extra "$extra_a" --console "$console_a" \
		--timeout 300 --fs "svpair=$WORK/svpair-a.sock,device=generic" \
		--fs "svpairsig=$WORK/svpairsig-a.sock,device=generic" >/dev/null 2>&1 &
	pid_a=$!
	BACKGROUND_PIDS+=("$pid_a")
	RUN_GUEST_EXTRA=$extra run_guest sv-pair-b "$WORK/sv-pair-b.sh" "${SV_PAIR_GUEST_CHECKS[@]}" -- \
		--qemu sid --timeout 300 --fs "svpair=$WORK/svpair-b.sock,device=generic" \
		--fs "svpairsig=$WORK/svpairsig-b.sock,device=generic"
	wait "$pid_a" || rc_a=$?
	local kept=() pid
	for pid in "${BACKGROUND_PIDS[@]}"; do
		[ "$pid" = "$pid_a" ] || kept+=("$pid")
	done
	BACKGROUND_PIDS=("${kept[@]}")
	local check what line
	for check in sv-pair-change sv-pair-a-host-changes; do
		selected "$check" || continue
		what="make its changes"
		[ "$check" = sv-pair-change ] || what="see the host process's changes"
		line=$(tr -d '\r' <"$console_a" | grep -a -o "@@check $check [A-Z]*" || true)
		case $line in
		*PASS) record "$check" PASS "$(seconds_since "$start")" ;;
		*)
			local details=()
			mapfile -t details < <(tr -d '\r' <"$console_a" | sed -n "s/^.*@@detail $check: //p")
			record "$check" FAIL "$(seconds_since "$start")" \
				"guest A (status $rc_a) did not $what: ${line:-no result} ($console_a)" "${details[@]}"
			;;
		esac
	done
	selected sv-pair-daemons-exit-0 &&
		check_daemons_exit sv-pair-daemons-exit-0 svpair-a svpair-b svpairsig-a svpairsig-b
	discard_in_background "$share" "$sig"
}
