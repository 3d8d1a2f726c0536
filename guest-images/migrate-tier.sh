# shellcheck shell=bash
# The live-migration tier of test.sh (sourced by it; uses its record/start_daemon/
# check_daemons_exit helpers and $WORK, $LOGS, $DAEMON, $QMP). Debian sid's QEMU
# 11.1 with the share on vhost-user-fs-pci; every hop starts a second QEMU with
# -incoming and its own daemon (same shared directory, own socket) on this host and
# migrates the running guest to it over a unix socket, driven by QMP. While it
# moves, the guest holds files open, a writer appends numbered lines to a log and
# fio writes and verifies (guest/migrate.sh).
#
# One boot per --migration-mode, the same chain in both:
#   A -> B, with a POSIX and a flock lock held in the guest (berth) and a guest process
#   waiting for each: the host sees both held by B, the holders let go, the waiters get
#   the locks from B (their requests moved with the guest), the guest locks again;
#   something the source cannot describe is deleted on the host; B -> X refused
#   (--migration-on-error abort: the guest stays on B and keeps working); the guest lets
#   go of it; B -> A' (A' runs a copy of the daemon binary at another path: the
#   same-host upgrade); another such deletion; A' -> C with --migration-on-error
#   guest-error: the migration goes through, that inode fails in the guest, the others
#   work. Held files renamed and deleted on the host move with the guest in both modes.
# What the source cannot describe:
#   find-paths   a file the guest holds open (it has no path any more); the held files
#                are renamed and deleted before the refused hop.
#   file-handles an inode the guest looked up but did not open (its file handle is
#                stale: nothing keeps the inode alive); the held files are renamed and
#                deleted before B -> A', and file handles carry both over.
# Each hop prints QEMU's downtime and total migration time.

MIGRATE_MODES=(fp fh)
MIGRATE_FP_GUEST_CHECKS=(mig-fp-mount mig-fp-start mig-fp-hop1 mig-fp-locks-kept mig-fp-abort-kept mig-fp-hop2
	mig-fp-renamed mig-fp-guest-error mig-fp-finish mig-fp-umount mig-fp-kernel-quiet)
MIGRATE_FP_HOST_CHECKS=(mig-fp-migrate1 mig-fp-locks-host mig-fp-abort mig-fp-migrate2 mig-fp-migrate3
	mig-fp-log-host mig-fp-daemons-exit-0 mig-fp-no-stray)
MIGRATE_FH_GUEST_CHECKS=(mig-fh-mount mig-fh-start mig-fh-hop1 mig-fh-locks-kept mig-fh-abort-kept mig-fh-hop2
	mig-fh-renamed mig-fh-guest-error mig-fh-finish mig-fh-umount mig-fh-kernel-quiet)
MIGRATE_FH_HOST_CHECKS=(mig-fh-migrate1 mig-fh-locks-host mig-fh-abort mig-fh-migrate2 mig-fh-migrate3
	mig-fh-log-host mig-fh-daemons-exit-0 mig-fh-no-stray)
MIGRATE_CHECKS=("${MIGRATE_FP_GUEST_CHECKS[@]}" "${MIGRATE_FP_HOST_CHECKS[@]}"
	"${MIGRATE_FH_GUEST_CHECKS[@]}" "${MIGRATE_FH_HOST_CHECKS[@]}")

# How long the host waits for the guest to reach a hop, and for one migration.
MIGRATE_STEP_TIMEOUT=${MIGRATE_STEP_TIMEOUT:-300}
MIGRATE_TIMEOUT=${MIGRATE_TIMEOUT:-120}

qmp() { python3 "$QMP" "$@"; }

# mig_qemu NAME DAEMON_NAME [--incoming]: starts a sid QEMU guest named NAME (console
# $LOGS/NAME-console.log, QMP $WORK/NAME.qmp) on daemon DAEMON_NAME's socket; with
# --incoming it waits for a migration on $WORK/NAME.in. Sets MIG_QEMU_PID[NAME].
declare -A MIG_QEMU_PID=()
mig_qemu() {
	local name=$1 daemon=$2 incoming=()
	[ "${3:-}" != --incoming ] || incoming=(--incoming "unix:$WORK/$name.in")
	guest_boot --qemu sid --script "$WORK/$MIG_BOOT.sh" --extra "$MIG_EXTRA" \
		--console "$LOGS/$name-console.log" --timeout "$GUEST_TIMEOUT" \
		--fs "fs=$WORK/$daemon.sock" --qmp "$WORK/$name.qmp" "${incoming[@]}" \
		2>>"$LOGS/$name-boot.log" &
	MIG_QEMU_PID[$name]=$!
	BACKGROUND_PIDS+=("$!")
}

# mig_daemon NAME MODE ON_ERROR [BINARY]: a daemon for one QEMU of the chain.
mig_daemon() {
	local name=$1 mode=$2 on_error=$3 binary=${4:-$DAEMON}
	DAEMON=$binary start_daemon "$name" "$WORK/share-mig" \
		--migration-mode "$mode" --migration-on-error "$on_error" "${HOST_LOCK_FLAGS[@]}"
}

# mig_probe_locks CHECK SOURCE DESTINATION: once the guest asks (mig/locks-probe), checks
# from the host that the locks the guest took before the hop are held: the source daemon
# has exited (its own copies are gone), the destination logged taking both again, and a
# host process is refused them. Answers in mig/locks-probed ("held" or what is wrong).
mig_probe_locks() {
	local check=$1 source=$2 destination=$3 share=$WORK/share-mig start problems=()
	local pl=$GUEST_IMAGES_DIR/guest/posix-lock.pl deadline=$((SECONDS + MIGRATE_STEP_TIMEOUT))
	start=$(now_seconds)
	until [ -e "$share/mig/locks-probe" ]; do
		if [ $SECONDS -ge $deadline ]; then
			! selected "$check" || record "$check" FAIL "$(seconds_since "$start")" "the guest never asked for the probe"
			return 1
		fi
		sleep 0.1
	done
	local pid=${DAEMON_PID[$source]:-} taken=0 log=$LOGS/$destination.log
	for _ in $(seq 150); do
		[ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || break
		sleep 0.1
	done
	[ -z "$pid" ] || ! kill -0 "$pid" 2>/dev/null || problems+=("the source daemon $source still runs")
	# The destination retries what the source held every 50 ms.
	for _ in $(seq 100); do
		taken=$(grep -c "Took the guest's" "$log" || true)
		[ "$taken" -lt 2 ] || break
		sleep 0.1
	done
	[ "$taken" -ge 2 ] || problems+=("$destination logged taking $taken of the 2 locks again")
	if grep "Lost the guest's" "$log"; then problems+=("$destination lost a lock"); fi
	local rc=0
	perl "$pl" try "$share/mig-locked.txt" w 10 1 || rc=$?
	[ "$rc" = 1 ] || problems+=("a host process's F_SETLK on the guest's POSIX range exited $rc (1: refused)")
	if flock -n -s "$share/mig-flocked.txt" true; then
		problems+=("a host process got a shared flock on the file the guest holds exclusively")
	fi
	if [ ${#problems[@]} -eq 0 ]; then
		echo held >"$share/mig/locks-probed.tmp"
	else
		printf '%s; ' "${problems[@]}" >"$share/mig/locks-probed.tmp"
	fi
	mv "$share/mig/locks-probed.tmp" "$share/mig/locks-probed"
	! selected "$check" || record_problems "$check" "$start" "${problems[@]}"
}

# Waits for the guest to create mig/ready-HOP on the share; false on timeout.
mig_wait_ready() {
	local hop=$1 deadline=$((SECONDS + MIGRATE_STEP_TIMEOUT))
	until [ -e "$WORK/share-mig/mig/ready-$hop" ]; do
		[ $SECONDS -lt $deadline ] || return 1
		# A guest that died early never gets there.
		kill -0 "${MIG_QEMU_PID[$MIG_CURRENT]}" 2>/dev/null || return 1
		sleep 0.1
	done
}

# mig_hop CHECK HOP FROM TO EXPECT: once the guest is ready for HOP, migrates it with
# live-migrate.sh from QEMU FROM to QEMU TO (already started with --incoming); EXPECT
# is completed or failed. Records CHECK with the times QEMU measured; on success TO
# becomes the current QEMU and FROM has been told to quit.
MIG_TIMES=()
mig_hop() {
	local check=$1 hop=$2 from=$3 to=$4 expect=$5 start problems=() status total downtime error=""
	start=$(now_seconds)
	if ! mig_wait_ready "$hop"; then
		record "$check" FAIL "$(seconds_since "$start")" "the guest did not reach hop $hop (console $LOGS/$from-console.log)"
		return 1
	fi
	# Something to change on the host before the hop (rename, delete).
	[ -z "${MIG_BEFORE_HOP:-}" ] || $MIG_BEFORE_HOP
	MIG_BEFORE_HOP=""
	start=$(now_seconds)
	# QEMU creates the incoming socket while it starts.
	for _ in $(seq 100); do
		[ -S "$WORK/$to.in" ] && break
		sleep 0.1
	done
	local out rc=0
	out=$("$GUEST_IMAGES_DIR/live-migrate.sh" --timeout "$MIGRATE_TIMEOUT" \
		"$WORK/$from.qmp" "$WORK/$to.qmp" "unix:$WORK/$to.in" 2>&1) || rc=$?
	case $rc:$out in
	0:"completed downtime="*)
		status=completed
		downtime=${out#*downtime=} downtime=${downtime%% *}
		total=${out##*total=}
		;;
	1:"failed: "*) status=failed error=${out#failed: } ;;
	*) status=unknown problems+=("live-migrate.sh exited $rc: $out") ;;
	esac
	local took
	took=$(seconds_since "$start")
	if [ "$expect" = completed ]; then
		if [ "$status" = completed ] && [ ${#problems[@]} -eq 0 ]; then
			MIG_TIMES+=("$check $MIG_DAEMON_KIND $MIG_MODE_NAME: downtime $downtime ms, total $total ms")
			# The destination runs the guest now; live-migrate.sh told the source to quit.
			wait "${MIG_QEMU_PID[$from]}" 2>/dev/null || true
			MIG_CURRENT=$to
			touch "$WORK/share-mig/mig/done-$hop"
			record "$check" PASS "$took" "$from -> $to: downtime $downtime ms, total $total ms (QEMU's query-migrate)"
			return 0
		fi
		problems+=("$from -> $to ended '$status': $error")
		touch "$WORK/share-mig/mig/failed-$hop"
		record "$check" FAIL "$took" "${problems[@]}"
		return 1
	fi
	# A refused hop: QEMU reports the failure, the source goes on running the guest, the
	# incoming QEMU gives up and exits.
	[ "$status" = failed ] || problems+=("$from -> $to ended '$status', expected the migration to fail")
	local run_state
	run_state=$(qmp "$WORK/$from.qmp" query-status 2>&1 || true)
	[[ $run_state == *'"running": true'* ]] || problems+=("the source QEMU is not running the guest after the refusal: $run_state")
	local pid=${MIG_QEMU_PID[$to]}
	for _ in $(seq 150); do
		kill -0 "$pid" 2>/dev/null || break
		sleep 0.1
	done
	if kill -0 "$pid" 2>/dev/null; then
		qmp "$WORK/$to.qmp" quit >/dev/null 2>&1 || true
	fi
	wait "$pid" 2>/dev/null || true
	touch "$WORK/share-mig/mig/failed-$hop"
	record_problems "$check" "$start" "${problems[@]}"
	[ ${#problems[@]} -eq 0 ] || return 1
	printf '    %s\n' "refused as expected: ${error:-no reason given}"
}

# mig_record_guest CONSOLE...: records the @@check lines the guest printed on the
# consoles of the chain, and shows kernel complaints.
mig_record_guest() {
	local console line check status took
	for console in "$@"; do
		[ -e "$console" ] || continue
		while IFS= read -r line; do
			line=${line%$'\r'}
			[[ $line == *@@* ]] && line=@@${line#*@@}
			case $line in
			"@@check "*)
				read -r _ check status took <<<"$line"
				record "$check" "$status" "$took"
				MIG_REPORTED+="$check "
				;;
			"@@detail "* | "@@info "*) printf '    %s\n' "${line#@@* }" ;;
			*"Kernel panic"* | *"BUG:"* | *"Oops"* | *"WARNING:"* | *"virtio_fs"* | *"virtiofs"* | *"fuse:"*)
				printf '    guest: %s\n' "$line"
				;;
			esac
		done <"$console"
	done
}

# The log the guest wrote reads back on the host with the guest's checksum and lines.
mig_log_host() {
	local check=$1 start problems=() want got lines
	start=$(now_seconds)
	want=$(cat "$WORK/share-mig/log.sha256" 2>/dev/null || echo none)
	got=$(sha256sum <"$WORK/share-mig/log.txt" 2>/dev/null | cut -c1-64 || true)
	[ "$want" = "$got" ] || problems+=("the guest's log has sha256 $want, the host reads ${got:-no file}")
	lines=$(cat "$WORK/share-mig/log.lines" 2>/dev/null || echo 0)
	if ! seq 1 "$lines" | sed 's/^/line /' | cmp -s - "$WORK/share-mig/log.txt"; then
		problems+=("the host's log.txt is not lines 1..$lines in order")
	fi
	record_problems "$check" "$start" "${problems[@]}"
}

# Host-side changes before a hop: rename one held file and delete another; delete
# files of the share.
mig_rename_and_delete() {
	mv "$WORK/share-mig/rename-me.txt" "$WORK/share-mig/renamed.txt"
	mig_delete delete-me.txt
}
mig_delete() {
	local name
	for name in "$@"; do rm "$WORK/share-mig/$name"; done
}

# Guest script of one boot, from its steps: "check NAME FUNCTION ARGS" lines, "setup",
# "hop HOP" (hand over to the host; expect done or failed).
mig_guest_script() {
	local boot=$1
	shift
	# shellcheck disable=SC2016 # expanded in the guest
	{
		echo 'echo "@@boot $(cut -d" " -f1 /proc/uptime)"'
		echo '. /test/checks.sh'
		echo '. /test/migrate.sh'
		local step
		for step in "$@"; do
			case $step in
			setup) echo 'mig_setup' ;;
			"hop "*)
				local hop expect
				read -r _ hop expect <<<"$step"
				printf 'outcome=$(mig_handover %s); [ "$outcome" = %s ] || { echo "@@detail hop %s: the host reports $outcome"; CHECK_FAILURES=$((CHECK_FAILURES + 1)); }\n' "$hop" "$expect" "$hop"
				;;
			*) echo "$step" ;;
			esac
		done
		echo '[ "$CHECK_FAILURES" = 0 ]'
	} >"$WORK/$boot.sh"
}

# mig_boot MODE: the boot of one migration mode (fp: find-paths, fh: file-handles).
mig_boot() {
	local mode_short=$1 mode
	case $mode_short in
	fp) mode=find-paths ;;
	fh) mode=file-handles ;;
	esac
	local guest_checks host_checks
	if [ "$mode_short" = fp ]; then
		guest_checks=("${MIGRATE_FP_GUEST_CHECKS[@]}") host_checks=("${MIGRATE_FP_HOST_CHECKS[@]}")
	else
		guest_checks=("${MIGRATE_FH_GUEST_CHECKS[@]}") host_checks=("${MIGRATE_FH_HOST_CHECKS[@]}")
	fi
	any_selected "${guest_checks[@]}" "${host_checks[@]}" || return 0
	# shellcheck disable=SC2154 # test.sh's --daemon
	MIG_MODE_NAME=$mode MIG_DAEMON_KIND=$daemon_kind MIG_BOOT=mig-$mode_short MIG_REPORTED=" "
	local p=mig-$mode_short
	rm -rf "$WORK/share-mig"
	mkdir -p "$WORK/share-mig/mig"
	# The same-host upgrade: the guest moves to a daemon started from another copy of
	# the binary.
	local upgraded
	upgraded=$WORK/$p-upgraded-$(basename "$DAEMON")
	cp "$DAEMON" "$upgraded"
	MIG_EXTRA=$WORK/$p-extra
	mkdir -p "$MIG_EXTRA"
	cp "$GUEST_IMAGES_DIR/guest/checks.sh" "$GUEST_IMAGES_DIR/guest/migrate.sh" \
		"$GUEST_IMAGES_DIR/guest/posix-lock.pl" "$GUEST_IMAGES_DIR/guest/hold-path.pl" "$MIG_EXTRA/"
	# Every check of the boot runs: each depends on the ones before.
	printf 'ONLY=\nHOST_LOCKS=0\nDAEMON_KIND=%q\n' "$daemon_kind" >"$MIG_EXTRA/env"
	# The locks the guest holds move with it (berth's host-side locks only: virtiofsd 1.14
	# leaves them to the guest kernel, which loses them with the old QEMU).
	local lock_setup=: lock_check="skip $p-locks-kept 'the daemon has no host-side locks'"
	if [ ${#HOST_LOCK_FLAGS[@]} -gt 0 ]; then
		lock_setup=mig_lock_setup lock_check="check $p-locks-kept mig_locks_kept"
	fi
	# What the mode's source cannot describe (see the top): the guest's step before the
	# refused hop and the host's change just before it, the guest's step after it; the
	# same before the guest-error hop and the guest's check after it; the host's change
	# before B -> A' and the held descriptors that must read after it (find-paths: the
	# deleted file's was closed).
	local pin_abort=: before_abort forget_abort before_upgrade="" upgrade_fds pin_lost=: before_lost lost_check
	if [ "$mode_short" = fp ]; then
		before_abort=mig_rename_and_delete forget_abort=mig_forget_deleted upgrade_fds=8
		before_lost="mig_delete lose-me.txt" lost_check=mig_lost_handle
	else
		pin_abort="mig_pin_unopened unopened-abort.txt" before_abort="mig_delete unopened-abort.txt"
		forget_abort="mig_unpin unopened-abort.txt"
		before_upgrade=mig_rename_and_delete upgrade_fds="8 9"
		pin_lost="mig_pin_unopened unopened-lost.txt" before_lost="mig_delete unopened-lost.txt"
		lost_check="mig_lost_inode unopened-lost.txt"
	fi
	mig_guest_script "$MIG_BOOT" \
		"check $p-mount mount_shares fs" setup "check $p-start mig_started" "$lock_setup" \
		"hop 1 done" "check $p-hop1 mig_after_hop 1 8 9" "$lock_check" "$pin_abort" \
		"hop 2 failed" "check $p-abort-kept mig_after_hop 2 8 9" "$forget_abort" \
		"hop 3 done" "check $p-hop2 mig_after_hop 3 $upgrade_fds" "check $p-renamed mig_renamed_visible" "$pin_lost" \
		"hop 4 done" "check $p-guest-error $lost_check" \
		mig_stop "check $p-finish mig_finish" mig_release \
		"check $p-umount mig_unmount" "check $p-kernel-quiet mig_quiet_kernel"
	local daemons=() consoles=()
	log "migration tier ($mode): booting the guest on $p-a"
	mig_daemon "$p-a" "$mode" abort
	daemons+=("$p-a")
	mig_qemu "$p-qa" "$p-a"
	consoles+=("$LOGS/$p-qa-console.log")
	MIG_CURRENT=$p-qa
	local ok=1
	mig_daemon "$p-b" "$mode" abort
	daemons+=("$p-b")
	mig_qemu "$p-qb" "$p-b" --incoming
	consoles+=("$LOGS/$p-qb-console.log")
	mig_hop "$p-migrate1" 1 "$p-qa" "$p-qb" completed || ok=0
	# The guest waits for the probe's answer: it runs whichever checks are selected.
	if [ ${#HOST_LOCK_FLAGS[@]} -eq 0 ]; then
		! selected "$p-locks-host" || record "$p-locks-host" SKIP 0 "the daemon has no host-side locks"
	elif [ "$ok" = 1 ]; then
		mig_probe_locks "$p-locks-host" "$p-a" "$p-b" || true
	fi
	if [ "$ok" = 1 ]; then
		mig_daemon "$p-x" "$mode" abort
		daemons+=("$p-x")
		mig_qemu "$p-qx" "$p-x" --incoming
		MIG_BEFORE_HOP=$before_abort
		mig_hop "$p-abort" 2 "$p-qb" "$p-qx" failed || ok=0
	fi
	if [ "$ok" = 1 ]; then
		mig_daemon "$p-a2" "$mode" guest-error "$upgraded"
		daemons+=("$p-a2")
		mig_qemu "$p-qa2" "$p-a2" --incoming
		consoles+=("$LOGS/$p-qa2-console.log")
		MIG_BEFORE_HOP=$before_upgrade
		mig_hop "$p-migrate2" 3 "$p-qb" "$p-qa2" completed || ok=0
	fi
	if [ "$ok" = 1 ]; then
		mig_daemon "$p-c" "$mode" guest-error
		daemons+=("$p-c")
		mig_qemu "$p-qc" "$p-c" --incoming
		consoles+=("$LOGS/$p-qc-console.log")
		MIG_BEFORE_HOP=$before_lost
		mig_hop "$p-migrate3" 4 "$p-qa2" "$p-qc" completed || ok=0
	fi
	# A broken chain: the guest stops waiting for the hops that will not come.
	[ "$ok" = 1 ] || touch "$WORK/share-mig/mig/abandon"
	# The last QEMU powers off when the guest script ends; the others quit or
	# failed. Anything left (a failed chain) is stopped.
	local name pid deadline=$((SECONDS + MIGRATE_STEP_TIMEOUT))
	[ "$ok" = 1 ] || deadline=$((SECONDS + 30))
	pid=${MIG_QEMU_PID[$MIG_CURRENT]}
	while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
	for name in "${!MIG_QEMU_PID[@]}"; do
		pid=${MIG_QEMU_PID[$name]}
		if kill -0 "$pid" 2>/dev/null; then
			qmp --wait 2 "$WORK/$name.qmp" quit >/dev/null 2>&1 || kill "$pid" 2>/dev/null || true
		fi
		wait "$pid" 2>/dev/null || true
	done
	# Only this boot's QEMUs leave the list of background jobs.
	local kept=() job
	for job in "${BACKGROUND_PIDS[@]}"; do
		[[ " ${MIG_QEMU_PID[*]} " == *" $job "* ]] || kept+=("$job")
	done
	BACKGROUND_PIDS=("${kept[@]}")
	MIG_QEMU_PID=()
	mig_record_guest "${consoles[@]}"
	local check
	for check in "${guest_checks[@]}"; do
		selected "$check" || continue
		[[ $MIG_REPORTED == *" $check "* ]] || record "$check" FAIL 0 "no result from the guest (consoles: ${consoles[*]})"
	done
	selected "$p-log-host" && mig_log_host "$p-log-host"
	selected "$p-daemons-exit-0" && check_daemons_exit "$p-daemons-exit-0" "${daemons[@]}"
	for name in "${daemons[@]}"; do
		[ -z "${DAEMON_PID[$name]:-}" ] || check_daemons_exit "$p-daemon-$name-exit" "$name"
	done
	rm -f "$upgraded"
	discard_in_background "$WORK/share-mig"
	finish_discards
	selected "$p-no-stray" && check_no_stray "$p-no-stray"
	return 0
}

migrate_tier() {
	any_selected "${MIGRATE_CHECKS[@]}" || return 0
	MIG_TIMES=()
	local mode
	for mode in "${MIGRATE_MODES[@]}"; do
		mig_boot "$mode"
	done
	if [ ${#MIG_TIMES[@]} -gt 0 ]; then
		log "migration times ($daemon_kind, QEMU $BERTH_QEMU_SID_SERIES, TCG, 1 GiB guest):"
		printf '    %s\n' "${MIG_TIMES[@]}" >&2
	fi
}
