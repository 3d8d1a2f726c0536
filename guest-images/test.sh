#!/usr/bin/env bash
# Guest test tier: boots Linux guests under QEMU that mount virtio-fs shares
# served by berth (or virtiofsd, for comparison) and checks that they behave
# like local filesystems.
#
# Usage: test.sh [--daemon berth|virtiofsd] [--kernel PATH] [--modules DIR]
#                [--only NAME[,NAME...]] [--list] [--keep]
#
# Every check prints its name, PASS/FAIL and its duration; the exit status is
# non-zero when any check fails. Logs (daemon logs, guest consoles) are kept,
# and their directory printed, when a check fails or with --keep.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
source "$(dirname "${BASH_SOURCE[0]}")/block-lib.sh"
# shellcheck source=ondemand-tier.sh
source "$(dirname "${BASH_SOURCE[0]}")/ondemand-tier.sh"
# shellcheck source=dax-tier.sh
source "$(dirname "${BASH_SOURCE[0]}")/dax-tier.sh"
# shellcheck source=migrate-tier.sh
source "$(dirname "${BASH_SOURCE[0]}")/migrate-tier.sh"
# shellcheck source=dax-reclaim-tier.sh
source "$(dirname "${BASH_SOURCE[0]}")/dax-reclaim-tier.sh"
# shellcheck source=vhost-blk-tier.sh
source "$(dirname "${BASH_SOURCE[0]}")/vhost-blk-tier.sh"
# shellcheck source=vroot-tier.sh
source "$(dirname "${BASH_SOURCE[0]}")/vroot-tier.sh"
# shellcheck source=shared-versions-tier.sh
source "$(dirname "${BASH_SOURCE[0]}")/shared-versions-tier.sh"

# Checks of each boot; "mount" and "umount" always run in a boot that runs.
MAIN_GUEST_CHECKS=(mount file-ops xattr flock flock-local posix-locks posix-locks-local posix-locks-host sha256-host-to-guest sha256-guest-write fio-verify
	posix-suite fsx fsx-never exec-busy tree-5000 cache-never cache-auto kata-fd3 umount umount-quiet)
MAIN_HOST_CHECKS=(daemons-confined sha256-guest-to-host tree-5000-host-diff kata-fd3-host daemons-exit-0 no-stray)
MQ_GUEST_CHECKS=(mq-mount mq-load mq-umount)
MQ_HOST_CHECKS=(mq-queues-used mq-daemon-exit-0 mq-no-stray)
# A guest that resets the machine without unmounting, boots again and mounts the
# share on the same daemon.
REBOOT_GUEST_CHECKS=(reboot-first-mount reboot-first-boot reboot-remount reboot-after reboot-umount reboot-umount-quiet)
REBOOT_HOST_CHECKS=(reboot-host-sees reboot-new-session reboot-daemon-exit-0)
BLOCK_GUEST_CHECKS=(block-setup block-zero-copy block-user-copy block-copy block-reg-fallback
	block-discard-zeroes block-readonly block-seccomp block-recovery block-volume block-volume-sigterm block-volume-fsx block-power-cut
	block-lazy-image
	block-read-overtakes-fetch
	block-lazy-fetch-ratio)
BLOCK_HOST_CHECKS=(block-store-exit-0)
# Debian sid's QEMU: one boot with the share on the generic vhost-user device,
# one on vhost-user-fs-pci; the live-migration boots are in migrate-tier.sh.
SID_CHECKS=(sid-qemu-version)
SID_GENERIC_GUEST_CHECKS=(sid-generic-mount sid-generic-io sid-generic-umount)
SID_GENERIC_HOST_CHECKS=(sid-generic-host sid-generic-daemon-exit-0)
# berth's DAX window on the generic device: a dax=always mount, data through it.
SID_DAX_GUEST_CHECKS=(sid-dax-mount sid-dax-io sid-dax-umount)
SID_DAX_HOST_CHECKS=(sid-dax-daemon-exit-0 sid-dax-host)
SID_FS_GUEST_CHECKS=(sid-fs-mount sid-fs-io sid-fs-umount)
SID_FS_HOST_CHECKS=(sid-fs-host sid-fs-daemons-exit-0 sid-no-stray)

daemon_kind=berth only="" keep=0
# Longest a boot may take; the host helpers that serve a boot wait as long.
GUEST_TIMEOUT=${GUEST_TIMEOUT:-900}
while [ $# -gt 0 ]; do
	case $1 in
	--daemon) daemon_kind=$2; shift 2 ;;
	--kernel) BERTH_GUEST_KERNEL=$2; shift 2 ;;
	--modules) BERTH_GUEST_MODULES=$2; shift 2 ;;
	--only) only=$2; shift 2 ;;
	--keep) keep=1; shift ;;
	--list)
		printf '%s\n' "${MAIN_GUEST_CHECKS[@]}" "${MAIN_HOST_CHECKS[@]}" "${MQ_GUEST_CHECKS[@]}" "${MQ_HOST_CHECKS[@]}" \
			"${REBOOT_GUEST_CHECKS[@]}" "${REBOOT_HOST_CHECKS[@]}" \
			"${BLOCK_GUEST_CHECKS[@]}" "${BLOCK_HOST_CHECKS[@]}" \
			"${VBLK_GUEST_CHECKS[@]}" "${VBLK_HOST_CHECKS[@]}" \
			"${VROOT_GUEST_CHECKS[@]}" "${VROOT_HOST_CHECKS[@]}" \
			"${SID_CHECKS[@]}" "${SID_GENERIC_GUEST_CHECKS[@]}" "${SID_GENERIC_HOST_CHECKS[@]}" \
			"${SID_DAX_GUEST_CHECKS[@]}" "${SID_DAX_HOST_CHECKS[@]}" \
			"${SID_DAX_TIER_CHECKS[@]}" "${SV_TIER_CHECKS[@]}" \
			"${DAX_RECLAIM_GUEST_CHECKS[@]}" "${DAX_RECLAIM_HOST_CHECKS[@]}" \
			"${SID_FS_GUEST_CHECKS[@]}" "${SID_FS_HOST_CHECKS[@]}" "${MIGRATE_CHECKS[@]}" \
			"${IMAGE_GUEST_CHECKS[@]}" "${IMAGE_HOST_CHECKS[@]}" "${FSCACHE_GUEST_CHECKS[@]}" "${FSCACHE_HOST_CHECKS[@]}"
		exit 0
		;;
	-h | --help) sed -n '2,11p' "$0"; exit 0 ;;
	*) die "unknown argument $1" ;;
	esac
done
case $daemon_kind in berth | virtiofsd) ;; *) die "--daemon must be berth or virtiofsd" ;; esac
# Both daemons run with their defaults (namespace sandbox, seccomp kill), as a
# host would run them. Host-side locks (--posix-lock, --flock) are berth's own
# flags; virtiofsd 1.14 always leaves locks to the guest.
if [ "$daemon_kind" = virtiofsd ]; then
	HOST_LOCK_FLAGS=()
else
	# No request pool, as berth starts by default: a guest waiting in F_SETLKW waits on one
	# of berth's lock-waiter threads, not on its queue's thread.
	HOST_LOCK_FLAGS=(--posix-lock --flock)
fi
require_root

selected() { [ -z "$only" ] || [[ ",$only," == *",$1,"* ]]; }
any_selected() {
	local name
	for name in "$@"; do selected "$name" && return 0; done
	return 1
}

tier_start=$(now_seconds)
RESULTS=()
record() { # record NAME PASS|FAIL SECONDS [DETAIL...]
	local name=$1 status=$2 took=$3
	shift 3
	printf '%-24s %s %7s s\n' "$name" "$status" "$took"
	local line
	for line in "$@"; do printf '    %s\n' "$line"; done
	RESULTS+=("$name $status")
}

# --- workspace and cleanup -------------------------------------------------------

WORK=$(mktemp -d "${TMPDIR:-/tmp}/berth-guest-test.XXXXXX")
TRASH=$(mktemp -d "${TMPDIR:-/tmp}/berth-guest-trash.XXXXXX")
LOGS=$WORK/logs
mkdir -p "$LOGS"
declare -A DAEMON_PID=()
BACKGROUND_PIDS=()

# shellcheck disable=SC2317 # called from the EXIT trap
cleanup() {
	local name pid
	for pid in "${BACKGROUND_PIDS[@]}" "${DAEMON_PID[@]}"; do
		kill "$pid" 2>/dev/null || true
	done
	for pid in "${BACKGROUND_PIDS[@]}" "${DAEMON_PID[@]}"; do
		wait "$pid" 2>/dev/null || true
	done
	if [ "$keep" = 1 ]; then
		log "kept $WORK"
	else
		finish_discards
		for name in "$WORK"/share-*; do
			if [ -e "$name" ]; then mv "$name" "$TRASH/"; fi
		done
		rm -rf "$TRASH"
		rm -f "$WORK"/*.sock
	fi
	rm -rf "$TRASH"
}
trap cleanup EXIT

# Deleting the share trees can take tens of seconds on disks that discard
# freed blocks; it runs beside the next guest boot, outside the work directory
# (so the stray-process check does not see it), and finish_discards waits for it.
DISCARD_PID=""
discard_in_background() {
	finish_discards
	local dir
	for dir in "$@"; do
		if [ -e "$dir" ]; then mv "$dir" "$TRASH/"; fi
	done
	rm -rf "$TRASH" &
	DISCARD_PID=$!
}
finish_discards() {
	[ -z "$DISCARD_PID" ] || wait "$DISCARD_PID" 2>/dev/null || true
	DISCARD_PID=""
	mkdir -p "$TRASH"
}

# start_daemon NAME SHARE_DIR [ARGS...]: serves SHARE_DIR on $WORK/NAME.sock.
start_daemon() {
	local name=$1 share=$2
	shift 2
	local sock=$WORK/$name.sock
	"$DAEMON" --socket-path "$sock" --shared-dir "$share" \
		"$@" >"$LOGS/$name.log" 2>&1 &
	DAEMON_PID[$name]=$!
	wait_for_socket "$name" "$sock"
}

# start_kata_daemon NAME SHARE_DIR: the way Kata's Go runtime starts virtiofsd,
# with a listening socket it created itself passed as fd 3.
start_kata_daemon() {
	local name=$1 share=$2 sock=$WORK/$1.sock
	# shellcheck disable=SC2016
	perl -e '
		use strict; use Socket; use POSIX ();
		$^F = 3;    # fds up to 3 stay open across exec
		my $path = shift @ARGV;
		socket(my $listener, AF_UNIX, SOCK_STREAM, 0) or die "socket: $!\n";
		unlink $path;
		bind($listener, pack_sockaddr_un($path)) or die "bind $path: $!\n";
		listen($listener, 16) or die "listen: $!\n";
		if (fileno($listener) != 3) { POSIX::dup2(fileno($listener), 3) or die "dup2: $!\n" }
		exec { $ARGV[0] } @ARGV or die "exec $ARGV[0]: $!\n";
	' "$sock" "$DAEMON" --syslog --cache=auto --shared-dir="$share" --fd=3 \
		--thread-pool-size=1 --announce-submounts \
		>"$LOGS/$name.log" 2>&1 &
	DAEMON_PID[$name]=$!
	wait_for_socket "$name" "$sock"
}

wait_for_socket() {
	local name=$1 sock=$2
	for _ in $(seq 100); do
		[ -S "$sock" ] && return 0
		kill -0 "${DAEMON_PID[$name]}" 2>/dev/null || break
		sleep 0.1
	done
	sed 's/^/    /' "$LOGS/$name.log" >&2
	die "daemon $name did not create $sock"
}

# reap_daemons NAME...: waits up to 15 s for each named daemon to exit (ending it
# then) and forgets it; sets REAP_PROBLEMS to what went wrong.
reap_daemons() {
	local name pid rc
	REAP_PROBLEMS=()
	for name in "$@"; do
		pid=${DAEMON_PID[$name]}
		for _ in $(seq 150); do
			kill -0 "$pid" 2>/dev/null || break
			sleep 0.1
		done
		if kill -0 "$pid" 2>/dev/null; then
			REAP_PROBLEMS+=("$name is still running 15 s after QEMU quit")
			kill "$pid" 2>/dev/null || true
		fi
		rc=0
		wait "$pid" 2>/dev/null || rc=$?
		unset "DAEMON_PID[$name]"
		[ "$rc" = 0 ] || REAP_PROBLEMS+=("$name exited with status $rc; last log lines:" "$(tail -n 5 "$LOGS/$name.log")")
	done
}

# Waits up to 15 s for the named daemons to exit; records one check.
check_daemons_exit() {
	local check=$1 start
	shift
	start=$(now_seconds)
	reap_daemons "$@"
	record_problems "$check" "$start" "${REAP_PROBLEMS[@]}"
}

# Every named daemon serves from a process confined the way berth and virtiofsd
# confine themselves by default: seccomp filter in force, own mount, pid and net
# namespaces, no CAP_SYS_ADMIN. (Both fork in namespace mode; the serving
# process is the started process's child.)
check_confined() {
	local check=$1
	shift
	local start name pid server problems=()
	start=$(now_seconds)
	for name in "$@"; do
		pid=${DAEMON_PID[$name]}
		server=""
		for _ in $(seq 100); do
			server=$(cat "/proc/$pid/task/$pid/children" 2>/dev/null | awk '{ print $1 }')
			if [ -n "$server" ] && grep -q '^Seccomp:[[:space:]]*2' "/proc/$server/status" 2>/dev/null; then
				break
			fi
			sleep 0.05
		done
		if [ -z "$server" ]; then
			problems+=("$name: no serving child process under pid $pid")
			continue
		fi
		grep -q '^Seccomp:[[:space:]]*2' "/proc/$server/status" ||
			problems+=("$name: pid $server runs without a seccomp filter")
		local ns
		for ns in mnt pid net; do
			[ "$(readlink "/proc/$server/ns/$ns")" != "$(readlink "/proc/self/ns/$ns")" ] ||
				problems+=("$name: pid $server shares the host's $ns namespace")
		done
		local caps
		caps=$(awk '/^CapEff:/ { print $2 }' "/proc/$server/status")
		# CAP_SYS_ADMIN (bit 21) must be gone.
		[ $((0x$caps >> 21 & 1)) = 0 ] || problems+=("$name: pid $server keeps CAP_SYS_ADMIN (CapEff $caps)")
	done
	if [ ${#problems[@]} -eq 0 ]; then
		record "$check" PASS "$(seconds_since "$start")"
	else
		record "$check" FAIL "$(seconds_since "$start")" "${problems[@]}"
	fi
}

# No process started for this run and no mount below the work directory remain.
check_no_stray() {
	local check=$1 start problems=() pid
	start=$(now_seconds)
	local entry
	for entry in /proc/[0-9]*; do
		pid=${entry#/proc/}
		[ "$pid" = $$ ] && continue
		local cmdline
		cmdline=$({ tr '\0' ' ' <"/proc/$pid/cmdline"; } 2>/dev/null || true)
		if [[ $cmdline == *"$WORK/"* ]]; then problems+=("process $pid: $cmdline"); fi
	done
	if grep -q -- "$WORK" /proc/self/mountinfo; then
		problems+=("mounts remain: $(grep -- "$WORK" /proc/self/mountinfo)")
	fi
	if [ ${#problems[@]} -eq 0 ]; then
		record "$check" PASS "$(seconds_since "$start")"
	else
		record "$check" FAIL "$(seconds_since "$start")" "${problems[@]}"
	fi
}

# Host side of the cache checks: once the guest signals SHARE/ready, replace
# SHARE/value by rename (a new inode) and create SIGNAL. Arguments are
# SHARE=SIGNAL pairs; the signals live on the cache=never share, so the guest
# sees them as soon as they exist, whatever the share under test caches.
serve_cache_changes() {
	local pair share signal pending=("$@") deadline=$((SECONDS + GUEST_TIMEOUT))
	while [ ${#pending[@]} -gt 0 ] && [ $SECONDS -lt $deadline ]; do
		local still=()
		for pair in "${pending[@]}"; do
			share=${pair%%=*}
			signal=${pair#*=}
			if [ -e "$share/ready" ]; then
				# Another link keeps the old inode alive, so a guest that still
				# holds it reads the old content instead of failing with ESTALE.
				ln "$share/value" "$share/.value.old"
				printf v2 >"$share/.value.new"
				mv "$share/.value.new" "$share/value"
				touch "$signal"
			else
				still+=("$pair")
			fi
		done
		pending=("${still[@]}")
		sleep 0.01
	done
}

# Host side of the posix-locks-host check on SHARE (served with --posix-lock):
# takes a write lock when the guest asks, releases it when told, then reports
# whether a lock the guest holds blocks the host.
serve_host_locks() {
	local share=$1 pl=$GUEST_IMAGES_DIR/guest/posix-lock.pl deadline=$((SECONDS + GUEST_TIMEOUT))
	until [ -e "$share/host-lock-request" ]; do
		[ $SECONDS -lt $deadline ] || return 0
		sleep 0.02
	done
	: >"$share/host-locked"
	perl "$pl" hold "$share/host-locked" w 0 0 "$share/host-lock-held" "$share/host-lock-release" || return 0
	until [ -e "$share/guest-lock-held" ]; do
		[ $SECONDS -lt $deadline ] || return 0
		sleep 0.02
	done
	local rc=0
	perl "$pl" try "$share/host-locked" w 0 0 || rc=$?
	case $rc in
	1) touch "$share/host-saw-conflict" ;;
	*) echo "host lock attempt exited $rc" >"$share/host-saw-no-conflict" ;;
	esac
}

# record_problems NAME START [PROBLEM...]: PASS when no problem was found.
record_problems() {
	local check=$1 start=$2
	shift 2
	if [ $# -eq 0 ]; then
		record "$check" PASS "$(seconds_since "$start")"
	else
		record "$check" FAIL "$(seconds_since "$start")" "$@"
	fi
}

# check_round_trip NAME SHARE: the 4 MiB file the guest wrote (share_round_trip
# in checks.sh) reads back on the host with the sha256 the guest computed.
check_round_trip() {
	local check=$1 share=$2 start want got problems=()
	start=$(now_seconds)
	want=$(cat "$share/from-guest.sha256" 2>/dev/null || echo none)
	got=$(sha256sum <"$share/from-guest" 2>/dev/null | cut -c1-64 || true)
	[ "$want" = "$got" ] || problems+=("the guest wrote sha256 $want, the host reads ${got:-no file}")
	record_problems "$check" "$start" "${problems[@]}"
}

# guest_extra NAME: writes the files boot NAME's guest finds beside its script
# (the check library, the env it reads) into $WORK/NAME-extra; prints the path.
# The checks a boot cannot do without (mounts, unmounts, setups) run
# even when --only leaves them out.
guest_extra() {
	local extra=$WORK/$1-extra
	mkdir -p "$extra"
	cp "$GUEST_IMAGES_DIR/guest/checks.sh" "$GUEST_IMAGES_DIR/guest/posix-lock.pl" "$extra/"
	# RUN_GUEST_EXTRA: a directory of further files for the guest's /test.
	[ -z "${RUN_GUEST_EXTRA:-}" ] || cp -a "$RUN_GUEST_EXTRA/." "$extra/"
	local guest_only=$only
	[ -z "$only" ] || guest_only="$only,mount,umount,mq-mount,mq-umount,reboot-first-mount,reboot-remount,sid-generic-mount,sid-generic-umount,sid-dax-mount,sid-dax-umount,sid-daxr-mount,sid-daxr-umount,sid-fs-mount,sid-fs-umount,fscache-setup,img-setup,img-warm-setup"
	printf 'ONLY=%q\nHOST_LOCKS=%q\nDAEMON_KIND=%q\n' "$guest_only" "${#HOST_LOCK_FLAGS[@]}" "$daemon_kind" >"$extra/env"
	echo "$extra"
}

# run_guest NAME SCRIPT GUEST_CHECKS... -- BOOT_ARGS...: boots a guest running
# SCRIPT, prints its check lines as they arrive and records them; checks that
# never reported are failures.
run_guest() {
	local name=$1 script=$2
	shift 2
	local expected=()
	while [ "$1" != -- ]; do
		selected "$1" && expected+=("$1")
		shift
	done
	shift
	local console=$LOGS/$name-console.log extra
	extra=$(guest_extra "$name")
	: >"$console"
	log "booting guest '$name' (console: $console)"
	local start rc=0
	start=$(now_seconds)
	guest_boot --script "$script" --extra "$extra" --console "$console" --timeout "$GUEST_TIMEOUT" "$@" &
	local boot_pid=$!
	BACKGROUND_PIDS+=("$boot_pid")
	local reported=" " line check status took
	while IFS= read -r line; do
		line=${line%$'\r'}
		# Drop firmware or kernel output that shares the line with a marker.
		[[ $line == *@@* ]] && line=@@${line#*@@}
		case $line in
		"@@check "*)
			read -r _ check status took <<<"$line"
			record "$check" "$status" "$took"
			reported+="$check "
			;;
		"@@detail "* | "@@info "*) printf '    %s\n' "${line#@@* }" ;;
		*"Kernel panic"* | *"BUG:"* | *"Oops"* | *"WARNING:"* | *"virtio_fs"* | *"virtiofs"* | *"fuse:"* | init:*)
			printf '    guest: %s\n' "$line"
			;;
		esac
	done < <(tail -n +1 -F --pid="$boot_pid" "$console" 2>/dev/null)
	wait "$boot_pid" || rc=$?
	local kept=() pid
	for pid in "${BACKGROUND_PIDS[@]}"; do
		[ "$pid" = "$boot_pid" ] || kept+=("$pid")
	done
	BACKGROUND_PIDS=("${kept[@]}")
	log "guest '$name' finished with status $rc after $(seconds_since "$start") s (boot to first check: $(boot_seconds "$console") s)"
	for check in "${expected[@]}"; do
		[[ $reported == *" $check "* ]] || record "$check" FAIL 0 "no result from the guest (guest status $rc, console $console)"
	done
}

# Guest uptime at the first check line, i.e. what booting cost.
boot_seconds() {
	local up
	up=$(tr -d '\r' <"$1" | grep -a -m1 -o '@@boot [0-9.]*' | cut -d' ' -f2)
	echo "${up:-?}"
}

# --- the tier --------------------------------------------------------------------

prepare_start=$(now_seconds)
prepare_guest
SID_SELECTED=0
if any_selected "${SID_CHECKS[@]}" "${SID_GENERIC_GUEST_CHECKS[@]}" "${SID_GENERIC_HOST_CHECKS[@]}" \
	"${SID_DAX_GUEST_CHECKS[@]}" "${SID_DAX_HOST_CHECKS[@]}" \
	"${SID_DAX_TIER_CHECKS[@]}" "${SV_TIER_CHECKS[@]}" \
	"${DAX_RECLAIM_GUEST_CHECKS[@]}" "${DAX_RECLAIM_HOST_CHECKS[@]}" \
	"${SID_FS_GUEST_CHECKS[@]}" "${SID_FS_HOST_CHECKS[@]}" "${MIGRATE_CHECKS[@]}"; then
	SID_SELECTED=1
	ensure_host_packages python3 # for qmp.py
	QMP=$GUEST_IMAGES_DIR/qmp.py
	fetch_qemu_sid
fi
daemon_binary "$daemon_kind"
log "guest ready and $daemon_kind at $DAEMON after $(seconds_since "$prepare_start") s"

if any_selected "${MAIN_GUEST_CHECKS[@]}" "${MAIN_HOST_CHECKS[@]}"; then
	mkdir -p "$WORK"/share-{main,never,auto,kata}
	if selected sha256-host-to-guest; then
		head -c 256M /dev/urandom >"$WORK/share-main/host-256M"
		sha256sum <"$WORK/share-main/host-256M" | cut -c1-64 >"$WORK/share-main/host-256M.sha256"
	fi
	if selected tree-5000 || selected tree-5000-host-diff; then
		# 50 directories of 100 files each, sizes differing per directory.
		for dir in $(seq -w 0 49); do
			mkdir -p "$WORK/share-main/tree-src/d$dir"
			head -c $((100 * (37 * 10#$dir + 1))) /dev/urandom |
				(cd "$WORK/share-main/tree-src/d$dir" && split -a 3 -b $((37 * 10#$dir + 1)) - f)
		done
	fi
	printf v1 >"$WORK/share-never/value"
	printf v1 >"$WORK/share-auto/value"
	echo "kata host file" >"$WORK/share-kata/from-host"

	# main takes locks on the host (berth's --posix-lock and --flock); the
	# other shares leave them to the guest kernel, as virtiofsd does.
	start_daemon main "$WORK/share-main" --xattr "${HOST_LOCK_FLAGS[@]}"
	start_daemon never "$WORK/share-never" --cache=never
	start_daemon auto "$WORK/share-auto" --cache=auto
	start_kata_daemon kata "$WORK/share-kata"
	selected daemons-confined && check_confined daemons-confined main never auto kata
	serve_cache_changes "$WORK/share-never=$WORK/share-never/changed" \
		"$WORK/share-auto=$WORK/share-never/auto-changed" &
	BACKGROUND_PIDS+=("$!")
	serve_host_locks "$WORK/share-main" &
	BACKGROUND_PIDS+=("$!")

	cat >"$WORK/main.sh" <<'EOF'
echo "@@boot $(cut -d' ' -f1 /proc/uptime)"
. /test/checks.sh
check mount mount_shares main never auto kata
check file-ops file_operations
check xattr extended_attributes
check flock lock_conflict /mnt/main
check flock-local lock_conflict /mnt/auto
if [ "$HOST_LOCKS" != 0 ]; then
	check posix-locks posix_locks /mnt/main host
	check posix-locks-host posix_locks_host /mnt/main
else
	skip posix-locks "the daemon has no host-side locks; the guest kernel keeps them (posix-locks-local)"
	skip posix-locks-host "the daemon has no host-side locks"
fi
check posix-locks-local posix_locks /mnt/auto guest
check sha256-host-to-guest host_file_hash
check sha256-guest-write guest_file_write
check fio-verify fio_verify
check posix-suite posix_suite /mnt/main
check fsx exerciser /mnt/main 4000 1
check fsx-never exerciser /mnt/never 4000 2 nomap
check exec-busy running_program_kept /mnt/main
check tree-5000 tree_copy
check cache-never cache_never
check cache-auto cache_auto
check kata-fd3 kata_fd3
check umount unmount_shares main never auto kata
if [ "$DAEMON_KIND" = berth ]; then
	check umount-quiet no_short_replies
else
	skip umount-quiet "berth's answer to FUSE_DESTROY; not checked for $DAEMON_KIND"
fi
[ "$CHECK_FAILURES" = 0 ]
EOF
	# pjdfstest, fsx and their configurations ride in the initramfs.
	main_extra=$WORK/main-tools
	mkdir -p "$main_extra"
	if selected posix-suite; then
		pjdfstest_binary
		objcopy --strip-debug "$PJDFSTEST" "$main_extra/pjdfstest"
		cp "$REPO_ROOT/tests/pjdfstest/berth.toml" "$main_extra/pjdfstest.toml"
	fi
	if any_selected fsx fsx-never; then
		fsx_binary
		objcopy --strip-debug "$FSX" "$main_extra/fsx"
		cp "$REPO_ROOT/tests/fsx/berth.toml" "$main_extra/fsx.toml"
	fi
	RUN_GUEST_EXTRA=$main_extra run_guest main "$WORK/main.sh" "${MAIN_GUEST_CHECKS[@]}" -- \
		--fs "main=$WORK/main.sock" --fs "never=$WORK/never.sock" \
		--fs "auto=$WORK/auto.sock" --fs "kata=$WORK/kata.sock"

	if selected sha256-guest-to-host; then
		start=$(now_seconds)
		want=$(cat "$WORK/share-main/guest-256M.sha256" 2>/dev/null || echo none)
		got=$(sha256sum <"$WORK/share-main/guest-256M" 2>/dev/null | cut -c1-64 || true)
		if [ "$want" = "$got" ]; then
			record sha256-guest-to-host PASS "$(seconds_since "$start")"
		else
			record sha256-guest-to-host FAIL "$(seconds_since "$start")" "guest wrote $want, host reads ${got:-nothing}"
		fi
	fi
	if selected tree-5000-host-diff; then
		start=$(now_seconds)
		if out=$(diff -r "$WORK/share-main/tree-src" "$WORK/share-main/tree-copy" 2>&1); then
			record tree-5000-host-diff PASS "$(seconds_since "$start")"
		else
			record tree-5000-host-diff FAIL "$(seconds_since "$start")" "$(head -n 10 <<<"$out")"
		fi
	fi
	if selected kata-fd3-host; then
		start=$(now_seconds)
		if [ "$(cat "$WORK/share-kata/dir/from-guest" 2>/dev/null)" = "kata guest file" ]; then
			record kata-fd3-host PASS "$(seconds_since "$start")"
		else
			record kata-fd3-host FAIL "$(seconds_since "$start")" "the file the guest wrote through the fd-3 daemon is missing on the host"
		fi
	fi
	selected daemons-exit-0 && check_daemons_exit daemons-exit-0 main never auto kata
	for pid in "${BACKGROUND_PIDS[@]}"; do
		kill "$pid" 2>/dev/null || true
		wait "$pid" 2>/dev/null || true
	done
	BACKGROUND_PIDS=()
	discard_in_background "$WORK"/share-{main,never,auto,kata}
	selected no-stray && check_no_stray no-stray
fi

if [ "$daemon_kind" = virtiofsd ] && [ -z "${BERTH_TEST_FORCE_MQ:-}" ]; then
	# QEMU refuses the device: "Failed to initialize virtqueue 2".
	for check in "${MQ_GUEST_CHECKS[@]}" "${MQ_HOST_CHECKS[@]}"; do
		selected "$check" && record "$check" SKIP 0 "virtiofsd 1.14 serves a single request queue"
	done
elif any_selected "${MQ_GUEST_CHECKS[@]}" "${MQ_HOST_CHECKS[@]}"; then
	mkdir -p "$WORK/share-mq"
	# berth logs the queue that served each batch of requests at debug level.
	start_daemon mq "$WORK/share-mq" --log-level debug
	cat >"$WORK/mq.sh" <<'EOF'
echo "@@boot $(cut -d' ' -f1 /proc/uptime)"
. /test/checks.sh
check mq-mount mount_shares mq
check mq-load multi_queue_load
check mq-umount unmount_shares mq
[ "$CHECK_FAILURES" = 0 ]
EOF
	run_guest mq "$WORK/mq.sh" "${MQ_GUEST_CHECKS[@]}" -- --fs "mq=$WORK/mq.sock,queues=4"
	if selected mq-queues-used; then
		start=$(now_seconds)
		# Distinct queue indices named on the daemon's log lines about serving
		# or handling requests (e.g. "served requests queue=2 handled=7").
		queues=$(grep -iE 'serv|handl' "$LOGS/mq.log" | grep -ioE '(queue|vring|vq)[ _-]?(index|idx)?[ =:#]*[0-9]+' |
			grep -oE '[0-9]+$' | sort -un | tr '\n' ' ' || true)
		count=$(wc -w <<<"$queues")
		# Queue 0 is the high-priority queue; request queues are 1..4.
		requests=$(tr ' ' '\n' <<<"$queues" | awk '$1 >= 1' | wc -l)
		if [ "$requests" -ge 2 ]; then
			record mq-queues-used PASS "$(seconds_since "$start")" "queue indices in the daemon log: $queues"
		elif [ "$count" -eq 0 ]; then
			record mq-queues-used FAIL "$(seconds_since "$start")" "no daemon log line about served requests names a queue index ($LOGS/mq.log)"
		else
			record mq-queues-used FAIL "$(seconds_since "$start")" "only queue indices $queues appear in $LOGS/mq.log"
		fi
	fi
	selected mq-daemon-exit-0 && check_daemons_exit mq-daemon-exit-0 mq
	discard_in_background "$WORK/share-mq"
	finish_discards
	selected mq-no-stray && check_no_stray mq-no-stray
fi
if any_selected "${REBOOT_GUEST_CHECKS[@]}" "${REBOOT_HOST_CHECKS[@]}"; then
	mkdir -p "$WORK/share-reboot"
	start_daemon reboot "$WORK/share-reboot"
	cat >"$WORK/reboot.sh" <<'EOF'
echo "@@boot $(cut -d' ' -f1 /proc/uptime)"
. /test/checks.sh
mkdir -p /mnt/reboot
mount -t virtiofs reboot /mnt/reboot
if [ ! -e /mnt/reboot/first-boot-done ]; then
	umount /mnt/reboot
	check reboot-first-mount mount_shares reboot
	check reboot-first-boot reboot_first_boot
	# Reset the machine now: no unmount, a file held open.
	echo b >/proc/sysrq-trigger
	sleep 30
	exit 1
fi
umount /mnt/reboot
check reboot-remount mount_shares reboot
check reboot-after reboot_second_boot
check reboot-umount unmount_shares reboot
if [ "$DAEMON_KIND" = berth ]; then
	check reboot-umount-quiet no_short_replies
else
	skip reboot-umount-quiet "berth's answer to FUSE_DESTROY; not checked for $DAEMON_KIND"
fi
[ "$CHECK_FAILURES" = 0 ]
EOF
	run_guest reboot "$WORK/reboot.sh" "${REBOOT_GUEST_CHECKS[@]}" -- --allow-reboot --fs "reboot=$WORK/reboot.sock"
	if selected reboot-host-sees; then
		start=$(now_seconds)
		if [ "$(cat "$WORK/share-reboot/after" 2>/dev/null)" = "written after the reboot" ]; then
			record reboot-host-sees PASS "$(seconds_since "$start")"
		else
			record reboot-host-sees FAIL "$(seconds_since "$start")" "the file the rebooted guest wrote is not on the host"
		fi
	fi
	if selected reboot-new-session; then
		start=$(now_seconds)
		if [ "$daemon_kind" != berth ]; then
			record reboot-new-session SKIP 0 "berth's log line"
		elif grep -q 'started a new FUSE session' "$LOGS/reboot.log"; then
			record reboot-new-session PASS "$(seconds_since "$start")"
		else
			record reboot-new-session FAIL "$(seconds_since "$start")" "the daemon did not see the guest start over ($LOGS/reboot.log)"
		fi
	fi
	selected reboot-daemon-exit-0 && check_daemons_exit reboot-daemon-exit-0 reboot
	discard_in_background "$WORK/share-reboot"
fi

if [ "$SID_SELECTED" = 1 ]; then
	if selected sid-qemu-version; then
		start=$(now_seconds)
		version=$("${QEMU_SID_CMD[@]}" --version 2>&1 | head -n1 || true)
		case $version in
		"QEMU emulator version $BERTH_QEMU_SID_SERIES."*) record sid-qemu-version PASS "$(seconds_since "$start")" "$version" ;;
		*) record sid-qemu-version FAIL "$(seconds_since "$start")" "expected QEMU $BERTH_QEMU_SID_SERIES.x from $QEMU_SID_DIR, it says: $version" ;;
		esac
	fi

	if any_selected "${SID_GENERIC_GUEST_CHECKS[@]}" "${SID_GENERIC_HOST_CHECKS[@]}"; then
		mkdir -p "$WORK/share-generic"
		echo "host file for generic" >"$WORK/share-generic/from-host"
		# The generic device takes the config space from the daemon: the tag, and
		# the number of request queues the guest will use, which must match the
		# device's queues (berth reports --max-request-queues there; virtiofsd 1).
		generic_flags=(--tag generic)
		[ "$daemon_kind" = virtiofsd ] || generic_flags+=(--max-request-queues 1)
		start_daemon generic "$WORK/share-generic" "${generic_flags[@]}"
		cat >"$WORK/sid-generic.sh" <<'GUEST'
echo "@@boot $(cut -d' ' -f1 /proc/uptime)"
. /test/checks.sh
check sid-generic-mount mount_generic_share generic
check sid-generic-io share_round_trip /mnt/generic
check sid-generic-umount unmount_shares generic
[ "$CHECK_FAILURES" = 0 ]
GUEST
		run_guest sid-generic "$WORK/sid-generic.sh" "${SID_GENERIC_GUEST_CHECKS[@]}" -- \
			--qemu sid --timeout 300 --fs "generic=$WORK/generic.sock,device=generic"
		selected sid-generic-host && check_round_trip sid-generic-host "$WORK/share-generic"
		selected sid-generic-daemon-exit-0 && check_daemons_exit sid-generic-daemon-exit-0 generic
		discard_in_background "$WORK/share-generic"
	fi

	if any_selected "${SID_DAX_GUEST_CHECKS[@]}" "${SID_DAX_HOST_CHECKS[@]}"; then
		if [ "$daemon_kind" != berth ]; then
			for check in "${SID_DAX_GUEST_CHECKS[@]}" "${SID_DAX_HOST_CHECKS[@]}"; do
				selected "$check" && record "$check" SKIP 0 "virtiofsd offers no DAX window"
			done
		else
			mkdir -p "$WORK/share-dax"
			head -c 64M /dev/urandom >"$WORK/share-dax/from-host-64M"
			host_sum=$(sha256sum <"$WORK/share-dax/from-host-64M" | cut -c1-64)
			start_daemon dax "$WORK/share-dax" --tag dax --max-request-queues 1 --dax-window 1G
			# The checksum travels in the script: a small file on the share cannot be
			# read through QEMU 11.1's window (see dax_round_trip).
			{
				echo 'echo "@@boot $(cut -d" " -f1 /proc/uptime)"'
				echo '. /test/checks.sh'
				echo 'check sid-dax-mount mount_dax_share dax'
				echo "check sid-dax-io dax_round_trip /mnt/dax $host_sum"
				echo 'check sid-dax-umount unmount_shares dax'
				echo '[ "$CHECK_FAILURES" = 0 ]'
			} >"$WORK/sid-dax.sh"
			run_guest sid-dax "$WORK/sid-dax.sh" "${SID_DAX_GUEST_CHECKS[@]}" -- \
				--qemu sid --timeout 300 --fs "dax=$WORK/dax.sock,device=generic"
			# The daemon logs the window's counters as it exits.
			selected sid-dax-daemon-exit-0 && check_daemons_exit sid-dax-daemon-exit-0 dax
			if selected sid-dax-host; then
				start=$(now_seconds)
				problems=()
				want=$(cat "$WORK/share-dax/dax-file.sha256" 2>/dev/null || echo none)
				got=$(sha256sum <"$WORK/share-dax/dax-file" 2>/dev/null | cut -c1-64 || true)
				[ "$want" = "$got" ] || problems+=("the guest wrote sha256 $want through the window, the host reads ${got:-no file}")
				grep -a 'Cache len: 0x40000000' "$LOGS/sid-dax-console.log" >/dev/null ||
					problems+=("the guest did not log a 1 GiB DAX window ($LOGS/sid-dax-console.log)")
				maps=$(sed -n 's/.*DAX window at exit: .* maps=\([0-9]*\) .*/\1/p' "$LOGS/dax.log")
				[ "${maps:-0}" -gt 0 ] || problems+=("berth mapped nothing into the window ($LOGS/dax.log)")
				if grep -E 'did not (map|unmap)|Cannot unmap' "$LOGS/dax.log" >/dev/null; then
					problems+=("the VMM failed window requests: $(grep -E 'did not (map|unmap)|Cannot unmap' "$LOGS/dax.log" | sed -n 1,3p)")
				fi
				record_problems sid-dax-host "$start" "${problems[@]}"
			fi
			discard_in_background "$WORK/share-dax"
		fi
	fi
	sid_dax_tiers
	sv_tier

	dax_reclaim_tier

	if any_selected "${SID_FS_GUEST_CHECKS[@]}" "${SID_FS_HOST_CHECKS[@]}"; then
		mkdir -p "$WORK/share-fs"
		echo "host file for fs" >"$WORK/share-fs/from-host"
		cat >"$WORK/sid-fs.sh" <<'GUEST'
echo "@@boot $(cut -d' ' -f1 /proc/uptime)"
. /test/checks.sh
check sid-fs-mount mount_shares fs
check sid-fs-io share_round_trip /mnt/fs
check sid-fs-umount unmount_shares fs
[ "$CHECK_FAILURES" = 0 ]
GUEST
		start_daemon fs "$WORK/share-fs"
		run_guest sid-fs "$WORK/sid-fs.sh" "${SID_FS_GUEST_CHECKS[@]}" -- \
			--qemu sid --timeout 300 --fs "fs=$WORK/fs.sock"
		selected sid-fs-host && check_round_trip sid-fs-host "$WORK/share-fs"
		selected sid-fs-daemons-exit-0 && check_daemons_exit sid-fs-daemons-exit-0 fs
		discard_in_background "$WORK/share-fs"
		finish_discards
		selected sid-no-stray && check_no_stray sid-no-stray
	fi
	migrate_tier
fi
finish_discards

# Block devices: berth runs inside the guest and exports files through ublk (the 7.2
# guest kernel has zero-copy with AUTO_BUF_REG, USER_COPY and recovery). virtiofsd has
# no block side, so these run only for berth.
if [ "$daemon_kind" = berth ] && any_selected "${BLOCK_GUEST_CHECKS[@]}" "${BLOCK_HOST_CHECKS[@]}"; then
	prepare_block_guest
	mkdir -p "$WORK/block-extra"
	cp "$GUEST_IMAGES_DIR/guest/block.sh" "$GUEST_IMAGES_DIR/guest/slow-http.pl" "$WORK/block-extra/"
	fsx_binary
	objcopy --strip-debug "$FSX" "$WORK/block-extra/fsx"
	cp "$REPO_ROOT/tests/fsx/block.toml" "$WORK/block-extra/fsx-block.toml"
	# For the S3 client of block-volume-sigterm (it will not start without trusted roots).
	cp /etc/ssl/certs/ca-certificates.crt "$WORK/block-extra/"
	# Without debug information the binary is a fraction of the size in the initramfs.
	objcopy --strip-debug "$DAEMON" "$WORK/block-extra/berth"
	cat >"$WORK/block.sh" <<'EOF'
echo "@@boot $(cut -d' ' -f1 /proc/uptime)"
. /test/checks.sh
. /test/block.sh
check block-setup block_setup
check block-zero-copy block_transport zero-copy 11
check block-user-copy block_transport user-copy 12
check block-copy block_transport copy 13
check block-reg-fallback block_registration_fallback
check block-discard-zeroes block_discard_zeroes
check block-readonly block_readonly
check block-seccomp block_seccomp
check block-recovery block_recovery
check block-volume block_volume
check block-volume-sigterm block_volume_sigterm
check block-volume-fsx block_volume_exercise
if have_dm_flakey; then
	check block-power-cut block_power_cut
else
	skip block-power-cut "the guest kernel has no dm-flakey"
fi
check block-lazy-image block_lazy_image
check block-read-overtakes-fetch block_read_overtakes_fetch
check block-lazy-fetch-ratio block_lazy_fetch_ratio
[ "$CHECK_FAILURES" = 0 ]
EOF
	# The lazily fetched image: 100 MiB of files in a 4 GiB ext4 image, built here and
	# served to the guest from a virtio-fs share of this host's berth (no network stack
	# in the guest; the engine reads the blob object with range reads as from any
	# backend).
	mkdir -p "$WORK/share-store" "$WORK/block-src/tree"
	for i in $(seq 1 20); do head -c 5M /dev/urandom >"$WORK/block-src/big-$i"; done
	for i in $(seq 1 200); do head -c $((i * 331)) /dev/urandom >"$WORK/block-src/tree/f$i"; done
	(cd "$WORK/block-src" && find . -type f -print0 | sort -z | xargs -0 sha256sum) >"$WORK/block-extra/tree.sums"
	"$DAEMON" image build --block "$WORK/block-src" --out "$WORK/share-store/img" --size 4G \
		--compression zstd >"$LOGS/block-image-build.log" 2>&1 ||
		die "berth image build --block failed: $(tail -n 5 "$LOGS/block-image-build.log")"
	start_daemon store "$WORK/share-store" --readonly
	run_guest block "$WORK/block.sh" "${BLOCK_GUEST_CHECKS[@]}" -- \
		--disk "$BLOCK_TOOLS_IMAGE,ro" --initrd-append "$BLOCK_MODULES_CPIO" \
		--fs "store=$WORK/store.sock"
	selected block-store-exit-0 && check_daemons_exit block-store-exit-0 store
fi

if [ "$daemon_kind" = berth ]; then
	vhost_blk_tier
	vroot_tier
else
	for check in "${VBLK_GUEST_CHECKS[@]}" "${VBLK_HOST_CHECKS[@]}" "${VROOT_GUEST_CHECKS[@]}" "${VROOT_HOST_CHECKS[@]}"; do
		selected "$check" && record "$check" SKIP 0 "vhost-user-blk is berth's block side; run it with --daemon berth"
	done
fi

if [ "$daemon_kind" = virtiofsd ]; then
	for check in "${IMAGE_GUEST_CHECKS[@]}" "${IMAGE_HOST_CHECKS[@]}" "${FSCACHE_GUEST_CHECKS[@]}" "${FSCACHE_HOST_CHECKS[@]}"; do
		selected "$check" && record "$check" SKIP 0 "berth's image tiers need berth (image build, mount); run them with --daemon berth"
	done
else
	image_virtiofs_tier
	finish_discards
	fscache_tier
	finish_discards
fi

passed=0 failed=0 skipped=0
for result in "${RESULTS[@]}"; do
	case $result in
	*" PASS") passed=$((passed + 1)) ;;
	*" SKIP") skipped=$((skipped + 1)) ;;
	*) failed=$((failed + 1)) ;;
	esac
done
if [ "$failed" = 0 ] && [ "$passed" -gt 0 ]; then
	log "$daemon_kind: $passed passed, $failed failed, $skipped skipped in $(seconds_since "$tier_start") s"
	[ "$keep" = 1 ] || rm -rf "$WORK"
	exit 0
fi
log "$daemon_kind: $passed passed, $failed failed, $skipped skipped in $(seconds_since "$tier_start") s; logs in $LOGS"
exit 1
