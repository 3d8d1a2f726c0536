# shellcheck shell=bash
# Guest side of the test tier (runs under the guest's bash). Each check prints
#   @@check NAME PASS|FAIL SECONDS
# followed, on failure, by "@@detail NAME: ..." lines with the command output.
# /test/env (written by the host) sets ONLY (comma-separated check names, empty
# for all) and the share tags.

# shellcheck disable=SC1091
. /test/env
CHECK_FAILURES=0

selected() { [ -z "${ONLY:-}" ] || [[ ",$ONLY," == *",$1,"* ]]; }

micros() { local t=${EPOCHREALTIME/./}; echo "${t#0}"; }
format_seconds() { printf '%d.%02d' $(($1 / 1000000)) $((($1 % 1000000) / 10000)); }

# check NAME FUNCTION [ARGS...]: runs FUNCTION in a subshell that stops at the
# first failing command and reports which one failed.
check() {
	local name=$1
	shift
	selected "$name" || return 0
	local start out rc
	start=$(micros)
	out=$(
		set -eE -o pipefail
		shopt -s inherit_errexit
		trap 'echo "failed (exit $?) at line $LINENO: $BASH_COMMAND"' ERR
		# A check that fails while a helper it started in the background still
		# waits (a lock holder waiting for its "go" file) would otherwise keep
		# this command substitution open until the guest times out. Only then:
		# helpers a passing check leaves running (a daemon and the shell that
		# records its exit status) belong to later checks.
		trap 'status=$?; [ "$status" = 0 ] || kill $(jobs -p) 2>/dev/null || true' EXIT
		"$@"
	) 2>&1
	rc=$?
	local took
	took=$(format_seconds $(($(micros) - start)))
	if [ $rc -eq 0 ]; then
		echo "@@check $name PASS $took"
	else
		echo "@@check $name FAIL $took"
		CHECK_FAILURES=$((CHECK_FAILURES + 1))
		printf '%s\n' "$out" | tail -n 40 | sed "s|^|@@detail $name: |"
	fi
	printf '%s\n' "$out" | sed -n "s|^@@info |@@info $name: |p"
}

# skip NAME REASON: reports a check that does not apply to this run.
skip() {
	selected "$1" || return 0
	echo "@@check $1 SKIP 0.00"
	echo "@@detail $1: $2"
}

# Waits up to $2 seconds for file $1 to exist.
wait_for_file() {
	local deadline=$(($(micros) + $2 * 1000000))
	until [ -e "$1" ]; do
		[ "$(micros)" -lt "$deadline" ] || {
			echo "timed out waiting for $1"
			return 1
		}
		sleep 0.02
	done
}

# --- checks ------------------------------------------------------------------

mount_shares() {
	local tag
	for tag in "$@"; do
		mkdir -p "/mnt/$tag"
		mount -t virtiofs "$tag" "/mnt/$tag"
		grep -q " /mnt/$tag virtiofs " /proc/mounts
		ls "/mnt/$tag" >/dev/null
	done
}

file_operations() {
	local d=/mnt/main/ops
	rm -rf "$d"
	mkdir "$d"
	[ -d "$d" ]
	# create, read, append, overwrite in the middle, truncate
	echo hello >"$d/a"
	[ "$(cat "$d/a")" = hello ]
	echo world >>"$d/a"
	[ "$(cat "$d/a")" = $'hello\nworld' ]
	printf XY | dd of="$d/a" bs=1 seek=2 conv=notrunc status=none
	[ "$(cat "$d/a")" = $'heXYo\nworld' ]
	truncate -s 3 "$d/a"
	[ "$(stat -c %s "$d/a")" = 3 ]
	[ "$(cat "$d/a")" = heX ]
	# rename, also over an existing file
	mv "$d/a" "$d/b"
	[ ! -e "$d/a" ]
	[ "$(cat "$d/b")" = heX ]
	echo replaced >"$d/c"
	mv -f "$d/c" "$d/b"
	[ "$(cat "$d/b")" = replaced ]
	[ ! -e "$d/c" ]
	# directories
	mkdir -p "$d/sub/deeper"
	echo x >"$d/sub/deeper/f"
	if rmdir "$d/sub" 2>/dev/null; then false; fi
	mv "$d/sub/deeper" "$d/moved"
	[ "$(cat "$d/moved/f")" = x ]
	rmdir "$d/sub"
	[ ! -e "$d/sub" ]
	# symbolic and hard links
	ln -s b "$d/link"
	[ "$(readlink "$d/link")" = b ]
	[ "$(cat "$d/link")" = replaced ]
	[ -L "$d/link" ]
	ln "$d/b" "$d/hard"
	[ "$(stat -c %h "$d/b")" = 2 ]
	[ "$(stat -c %i "$d/b")" = "$(stat -c %i "$d/hard")" ]
	echo via-hard >"$d/hard"
	[ "$(cat "$d/b")" = via-hard ]
	rm "$d/hard"
	[ "$(stat -c %h "$d/b")" = 1 ]
	# permissions, ownership, times
	chmod 640 "$d/b"
	[ "$(stat -c %a "$d/b")" = 640 ]
	chmod u+x,g-r "$d/b"
	[ "$(stat -c %a "$d/b")" = 700 ]
	chown 1234:5678 "$d/b"
	[ "$(stat -c %u:%g "$d/b")" = 1234:5678 ]
	touch -m -d @1000000000 "$d/b"
	[ "$(stat -c %Y "$d/b")" = 1000000000 ]
	# an unlinked file stays readable through an open descriptor
	echo still-here >"$d/gone"
	exec 7<"$d/gone"
	rm "$d/gone"
	[ ! -e "$d/gone" ]
	[ "$(cat <&7)" = still-here ]
	exec 7<&-
	# unlink and listing
	rm "$d/b" "$d/link"
	rm -r "$d/moved"
	[ -z "$(ls -A "$d")" ]
	rmdir "$d"
}

extended_attributes() {
	local f=/mnt/main/xattr-file
	echo data >"$f"
	setfattr -n user.berth -v hello "$f"
	[ "$(getfattr --only-values -n user.berth "$f")" = hello ]
	setfattr -n user.second -v 2 "$f"
	[ "$(getfattr -d --absolute-names "$f" | grep -c '^user\.')" = 2 ]
	setfattr -n user.berth -v changed "$f"
	[ "$(getfattr --only-values -n user.berth "$f")" = changed ]
	setfattr -x user.berth "$f"
	if getfattr -n user.berth "$f" >/dev/null 2>&1; then false; fi
	[ "$(getfattr -d --absolute-names "$f" | grep -c '^user\.')" = 1 ]
	rm "$f"
}

# pjdfstest (/test/pjdfstest, with /test/pjdfstest.toml) on share $1: about 400 POSIX tests
# of error codes, permissions as other users and timestamps. None may fail; the suite's own
# skips (no remount, no LINK_MAX from FUSE) are reported.
posix_suite() {
	local dir=$1/pjdfstest second=/tmp/pjdfstest-second log=/tmp/pjdfstest-${1##*/}.log
	# The suite acts as these users; the initramfs has no account database of its own.
	touch /etc/passwd /etc/group
	grep -q '^root:' /etc/passwd || echo 'root:x:0:0:root:/root:/bin/sh' >>/etc/passwd
	grep -q '^daemon:' /etc/passwd || echo 'daemon:x:1:1:daemon:/:/bin/false' >>/etc/passwd
	grep -q '^nobody:' /etc/passwd || echo 'nobody:x:65534:65534:nobody:/:/bin/false' >>/etc/passwd
	grep -q '^root:' /etc/group || echo 'root:x:0:' >>/etc/group
	grep -q '^daemon:' /etc/group || echo 'daemon:x:1:' >>/etc/group
	grep -q '^nogroup:' /etc/group || echo 'nogroup:x:65534:' >>/etc/group
	mkdir -p "$dir" "$second"
	local rc=0
	/test/pjdfstest -c /test/pjdfstest.toml -p "$dir" -s "$second" >"$log" 2>&1 || rc=$?
	local summary
	summary=$(grep -a 'Summary:' "$log" | tail -n 1)
	echo "@@info ${summary:-no summary (exit $rc)}"
	if [ "$rc" != 0 ] || [[ $summary != "Summary: 0 failed,"* ]]; then
		grep -a -A 3 'FAILED' "$log" | head -n 30
		tail -n 5 "$log"
		false
	fi
	rm -rf "$dir" "$second"
}

# fsx (/test/fsx, with /test/fsx.toml) on a file of share $1: $2 random operations (reads,
# writes, mapped reads and writes, truncations, fallocate, hole punching, sendfile,
# copy_file_range, syncs, reopenings) from seed $3, every byte read checked against fsx's
# model of the file. With $4 = nomap, no mapped operations (a cache=never share maps no file
# unless the daemon runs with --allow-mmap).
exerciser() {
	local file=$1/fsx-exercised config=/test/fsx.toml
	if [ "${4:-}" = nomap ]; then
		config=/tmp/fsx-nomap.toml
		sed -E 's/^(mapread|mapwrite|invalidate) = .*/\1 = 0/' /test/fsx.toml >"$config"
	fi
	run_fsx "$config" "$file" "$2" "$3"
	echo "@@info $2 operations from seed $3: A-OK"
	rm -f "$file"
}

# run_fsx CONFIG TARGET OPERATIONS SEED: runs /test/fsx; fails, with the end of its log,
# unless it completed every operation.
run_fsx() {
	local log=/tmp/fsx-${2##*/}.log rc=0
	mkdir -p /tmp/fsx-artifacts
	/test/fsx -f "$1" -N "$3" -S "$4" -P /tmp/fsx-artifacts "$2" >"$log" 2>&1 || rc=$?
	if [ "$rc" != 0 ] || ! grep -q 'All operations completed A-OK!' "$log"; then
		echo "fsx exited with status $rc; its log ends:"
		tail -n 30 "$log"
		return 1
	fi
}

# A program running from share $1 keeps its file, as on a local filesystem: every open that
# would write it fails with ETXTBSY, O_RDONLY | O_TRUNC included (which FUSE's atomic
# O_TRUNC would hand to the daemon before the guest kernel checks), and its bytes stay.
running_program_kept() {
	local program=$1/sleeper
	cp /usr/bin/sleep "$program"
	chmod 755 "$program"
	"$program" 60 &
	local pid=$! _
	for _ in $(seq 100); do
		[ "$(readlink "/proc/$pid/exe" 2>/dev/null)" = "$program" ] && break
		sleep 0.05
	done
	[ "$(readlink "/proc/$pid/exe")" = "$program" ]
	# shellcheck disable=SC2016
	perl -MFcntl -e '
		my $bad = 0;
		for my $f ([O_WRONLY, "O_WRONLY"], [O_RDWR, "O_RDWR"],
			[O_RDONLY | O_TRUNC, "O_RDONLY | O_TRUNC"], [O_WRONLY | O_TRUNC, "O_WRONLY | O_TRUNC"]) {
			if (sysopen(my $fh, $ARGV[0], $f->[0])) { print "open($f->[1]) succeeded\n"; $bad = 1 }
			elsif (!$!{ETXTBSY}) { print "open($f->[1]): $!\n"; $bad = 1 }
		}
		exit $bad' "$program"
	kill -0 "$pid" || { echo "the program died while others tried to open it"; false; }
	kill "$pid"
	wait "$pid" || true
	cmp /usr/bin/sleep "$program"
	rm "$program"
}

# flock(2) semantics on a file of share $1.
lock_conflict() {
	local f=$1/lock-file held=/tmp/lock-held-${1##*/}
	: >"$f"
	rm -f "$held"
	flock -x "$f" -c "touch $held; sleep 3" &
	local holder=$!
	wait_for_file "$held" 10
	if flock -n -x "$f" true; then
		echo "a second exclusive lock was granted while the first was held"
		false
	fi
	if flock -n -s "$f" true; then
		echo "a shared lock was granted while an exclusive lock was held"
		false
	fi
	# a blocking lock waits for the holder, then succeeds
	flock -w 20 -x "$f" true
	wait "$holder"
	flock -n -x "$f" true
	# shared locks coexist
	flock -s "$f" -c "flock -n -s '$f' true"
}

# posix_lock_try FILE r|w START LEN granted|conflict: one F_SETLK attempt.
posix_lock_try() {
	local rc=0
	perl /test/posix-lock.pl try "$1" "$2" "$3" "$4" || rc=$?
	case "$5:$rc" in
	granted:0 | conflict:1) ;;
	*)
		echo "F_SETLK $2 [$3, +$4) on $1: expected $5, got exit status $rc"
		return 1
		;;
	esac
}

# POSIX record locks (fcntl F_SETLK/F_SETLKW/F_GETLK) between guest processes
# on a file of share $1. $2 says who keeps the locks: "guest" (the guest
# kernel, berth's default) or "host" (berth with --posix-lock).
posix_locks() {
	local f=$1/posix-lock-file keeper=$2 tag=${1##*/}
	local pl="perl /test/posix-lock.pl" ready=/tmp/pl-ready-$tag go=/tmp/pl-go-$tag
	: >"$f"
	rm -f "$ready" "$go"
	$pl hold "$f" w 0 100 "$ready" "$go" &
	local holder=$!
	wait_for_file "$ready" 10
	# Overlapping write and read locks conflict; a disjoint range does not.
	posix_lock_try "$f" w 0 100 conflict
	posix_lock_try "$f" r 50 10 conflict
	posix_lock_try "$f" w 99 1 conflict
	posix_lock_try "$f" w 100 100 granted
	# F_GETLK names the conflicting lock.
	local info
	info=$($pl test "$f" w 10 10)
	echo "@@info F_GETLK while held: $info"
	case $info in
	"w 0 100 "*) ;;
	*)
		echo "F_GETLK reported '$info', expected the write lock on [0, 100)"
		false
		;;
	esac
	if [ "$keeper" = guest ] && [ "$info" != "w 0 100 $holder" ]; then
		echo "F_GETLK names pid ${info##* }, the holder is $holder"
		false
	fi
	# F_SETLKW waits for the holder, then gets the lock.
	local granted=/tmp/pl-granted-$tag
	rm -f "$granted"
	$pl wait "$f" w 0 100 30 && touch "$granted" &
	local waiter=$!
	sleep 0.5
	if [ -e "$granted" ]; then
		echo "F_SETLKW was granted while the conflicting lock was held"
		false
	fi
	touch "$go"
	wait "$waiter"
	[ -e "$granted" ]
	wait "$holder"
	[ "$($pl test "$f" w 0 0)" = unlocked ]
	# Six processes wait for the range at once, more than a request pool would have
	# threads: the share still answers meanwhile (the holder's unlock comes through the
	# same queue), and each waiter gets the lock in turn.
	rm -f "$ready" "$go"
	$pl hold "$f" w 0 100 "$ready" "$go" &
	holder=$!
	wait_for_file "$ready" 10
	local waiters=() w
	for w in 1 2 3 4 5 6; do
		$pl wait "$f" w 0 100 60 &
		waiters+=($!)
	done
	sleep 0.5
	posix_lock_try "$f" w 100 100 granted
	touch "$go"
	wait "$holder"
	for w in "${waiters[@]}"; do
		wait "$w" || {
			echo "a waiter was not granted the lock"
			false
		}
	done
	[ "$($pl test "$f" w 0 0)" = unlocked ]
	# Read locks are shared; a write lock is refused while they are held.
	rm -f "$ready" "$go"
	$pl hold "$f" r 0 0 "$ready" "$go" &
	holder=$!
	wait_for_file "$ready" 10
	posix_lock_try "$f" r 0 0 granted
	posix_lock_try "$f" w 0 1 conflict
	touch "$go"
	wait "$holder"
	# Locks go away with their process.
	posix_lock_try "$f" w 0 0 granted
	rm -f "$f" "$ready" "$go" "$granted"
}

# Locks berth keeps on the host (--posix-lock) conflict with host processes:
# a lock a host process holds blocks the guest, and a guest's lock blocks the
# host. The host side is serve_host_locks in test.sh.
posix_locks_host() {
	local d=$1 pl="perl /test/posix-lock.pl"
	touch "$d/host-lock-request"
	wait_for_file "$d/host-lock-held" 30
	posix_lock_try "$d/host-locked" w 0 0 conflict
	posix_lock_try "$d/host-locked" r 0 10 conflict
	touch "$d/host-lock-release"
	$pl wait "$d/host-locked" w 0 0 30
	rm -f /tmp/hl-ready /tmp/hl-go
	$pl hold "$d/host-locked" w 0 0 /tmp/hl-ready /tmp/hl-go &
	local holder=$!
	wait_for_file /tmp/hl-ready 10
	touch "$d/guest-lock-held"
	local waited=0
	until [ -e "$d/host-saw-conflict" ] || [ -e "$d/host-saw-no-conflict" ]; do
		waited=$((waited + 1))
		[ $waited -lt 1500 ] || {
			echo "the host never reported its lock attempt"
			return 1
		}
		sleep 0.02
	done
	touch /tmp/hl-go
	wait "$holder"
	if [ -e "$d/host-saw-no-conflict" ]; then
		echo "a host process got a write lock while the guest held one: $(cat "$d/host-saw-no-conflict")"
		false
	fi
	rm -f "$d"/host-lock* "$d/guest-lock-held" "$d"/host-saw-*
}

host_file_hash() {
	local want got
	want=$(cat /mnt/main/host-256M.sha256)
	got=$(sha256sum </mnt/main/host-256M | cut -c1-64)
	echo "host $want guest $got"
	[ "$want" = "$got" ]
}

guest_file_write() {
	# The reference digest comes from the guest's own copy in tmpfs; the host
	# compares it with what it finds in the share.
	head -c 256M /dev/urandom >/tmp/guest-256M
	sha256sum </tmp/guest-256M | cut -c1-64 >/tmp/guest-256M.sha256
	cp /tmp/guest-256M /mnt/main/guest-256M
	rm /tmp/guest-256M
	[ "$(stat -c %s /mnt/main/guest-256M)" = 268435456 ]
	cp /tmp/guest-256M.sha256 /mnt/main/guest-256M.sha256
}

fio_verify() {
	fio --name=randwrite-verify --filename=/mnt/main/fio.dat --size=64M --bs=4k \
		--rw=randwrite --ioengine=libaio --iodepth=16 --direct=1 \
		--verify=crc32c --do_verify=1 --verify_fatal=1 --verify_backlog=1024 >/tmp/fio.out 2>&1 ||
		{
			cat /tmp/fio.out
			false
		}
	grep -E 'IOPS|err=' /tmp/fio.out | sed 's/^/@@info /'
	if grep -q 'verify: bad' /tmp/fio.out; then false; fi
	rm -f /mnt/main/fio.dat
}

tree_copy() {
	local src=/mnt/main/tree-src copy=/mnt/main/tree-copy
	rm -rf /tmp/tree "$copy"
	# in through the share, out to it again, then compare what the share returns
	cp -a "$src" /tmp/tree
	[ "$(find /tmp/tree -type f | wc -l)" = 5000 ]
	cp -a /tmp/tree "$copy"
	diff -r /tmp/tree "$copy"
	rm -rf /tmp/tree
}

# The host replaces $1/value (v1 -> v2, by rename) once $1/ready appears, then
# creates $2 (on a share that caches nothing, so the guest sees it at once).
# Prints how long the guest kept seeing v1 after that and, as its last line,
# whether the first read after the change was "fresh" or "stale" (or "late"
# when that read came too long after the lookup to tell). Fails when v2 has
# not shown up $3 seconds after the change.
host_change_visibility() {
	local share=$1 signal=$2 limit=$3
	# Let any cached entry for "value" expire, so that the next access looks
	# it up afresh and the cache timeout starts now.
	sleep 1.5
	[ "$(cat "$share/value")" = v1 ]
	local looked_up
	looked_up=$(micros)
	touch "$share/ready"
	wait_for_file "$signal" 30
	local seen first
	seen=$(micros)
	first=$(cat "$share/value")
	local first_at
	first_at=$(micros)
	local value=$first
	until [ "$value" = v2 ]; do
		if [ $(($(micros) - seen)) -gt $((limit * 1000000)) ]; then
			echo "still reading '$value' ${limit}s after the host changed the file"
			return 1
		fi
		sleep 0.05
		value=$(cat "$share/value")
	done
	local now
	now=$(micros)
	echo "@@info first read after the change ($(format_seconds $((first_at - looked_up))) s after the lookup): $first; v2 visible $(format_seconds $((now - seen))) s after the change, $(format_seconds $((now - looked_up))) s after the lookup"
	if [ "$first" = v2 ]; then
		echo fresh
	elif [ $((first_at - looked_up)) -lt 800000 ]; then
		echo stale
	else
		echo late
	fi
	echo "$((now - looked_up))"
}

cache_never() {
	local result
	result=$(host_change_visibility /mnt/never /mnt/never/changed 5) || {
		echo "$result"
		false
	}
	echo "$result"
	# No caching: the very first read after the change returns the new content.
	[ "$(echo "$result" | tail -n2 | head -n1)" = fresh ]
}

cache_auto() {
	local result
	result=$(host_change_visibility /mnt/auto /mnt/never/auto-changed 5) || {
		echo "$result"
		false
	}
	echo "$result"
	local verdict visible_after
	verdict=$(echo "$result" | tail -n2 | head -n1)
	visible_after=$(echo "$result" | tail -n1)
	# Cached for berth's 1 s entry/attribute timeout: a read well within it
	# still sees the old file...
	case $verdict in
	stale) ;;
	late) echo "@@info the first read came too late to see the cached value; only the upper bound was checked" ;;
	*)
		echo "the first read, within the 1 s timeout, already saw the new file: nothing was cached"
		false
		;;
	esac
	# ...and the change shows once the timeout has passed (with slack for TCG).
	[ "$visible_after" -lt 3000000 ] || {
		echo "v2 became visible only $(format_seconds "$visible_after") s after the lookup (timeout 1 s)"
		false
	}
}

kata_fd3() {
	[ "$(cat /mnt/kata/from-host)" = "kata host file" ]
	echo "kata guest file" >/mnt/kata/from-guest
	[ "$(cat /mnt/kata/from-guest)" = "kata guest file" ]
	mkdir /mnt/kata/dir
	mv /mnt/kata/from-guest /mnt/kata/dir/from-guest
}

multi_queue_load() {
	local cpu
	for cpu in 0 1; do
		taskset -c "$cpu" bash -c '
			d=/mnt/mq/cpu'"$cpu"'
			mkdir -p "$d"
			for i in $(seq 100); do
				echo "$i" >"$d/f$i"
				[ "$(cat "$d/f$i")" = "$i" ] || { echo "bad content in $d/f$i"; exit 1; }
			done
			dd if=/dev/zero of="$d/big" bs=1M count=8 status=none
			sha256sum "$d/big" >/dev/null' &
	done
	local failed=0 job
	for job in $(jobs -p); do
		wait "$job" || failed=1
	done
	[ "$failed" = 0 ]
	[ "$(ls /mnt/mq/cpu0 | wc -l)" = 101 ]
	[ "$(ls /mnt/mq/cpu1 | wc -l)" = 101 ]
}

unmount_shares() {
	local tag
	for tag in "$@"; do
		umount "/mnt/$tag"
	done
	if grep -q ' virtiofs ' /proc/mounts; then
		grep ' virtiofs ' /proc/mounts
		false
	fi
}

# The kernel complains about every reply shorter than a reply header (an unanswered
# FUSE_DESTROY at unmount, a dropped request).
no_short_replies() {
	if dmesg | grep -i 'response too short'; then
		false
	fi
}

# First boot of the reboot check: leave a file written and one held open, then reset
# the machine without unmounting, as a guest that reboots or crashes does.
reboot_first_boot() {
	[ ! -e /mnt/reboot/first-boot-done ]
	echo "written before the reboot" >/mnt/reboot/before
	exec 3</mnt/reboot/before
	sync
	touch /mnt/reboot/first-boot-done
}

# Second boot: the share mounts again on the same daemon and works.
reboot_second_boot() {
	[ ! -e /mnt/reboot/second-boot-done ]
	touch /mnt/reboot/second-boot-done
	[ "$(cat /mnt/reboot/before)" = "written before the reboot" ]
	mkdir /mnt/reboot/dir
	echo "written after the reboot" >/mnt/reboot/dir/after
	mv /mnt/reboot/dir/after /mnt/reboot/after
	rmdir /mnt/reboot/dir
	[ "$(cat /mnt/reboot/after)" = "written after the reboot" ]
	[ "$(ls /mnt/reboot | tr '\n' ' ')" = "after before first-boot-done second-boot-done " ]
}

# --- sid's QEMU ----------------------------------------------------------------

# The generic device's share, mounted without dax (the daemon offers no DAX
# window yet); reports whether the guest found one.
mount_generic_share() {
	mount_shares "$1"
	local window
	window=$(dmesg | grep -oE 'virtiofs virtio[0-9]+: (Cache len|virtio_fs_setup_dax).*' | tail -n1 || true)
	echo "@@info DAX window: ${window:-no message from the guest}"
	echo "@@info mounted: $(grep " /mnt/$1 " /proc/mounts)"
}

# Mounts share $1 with dax=always (refused unless the device has a DAX window)
# and shows the window the guest kernel found.
mount_dax_share() {
	mkdir -p "/mnt/$1"
	mount -t virtiofs "$1" "/mnt/$1" -o dax=always
	ls "/mnt/$1" >/dev/null
	local window
	window=$(dmesg | grep -oE 'virtiofs virtio[0-9]+: Cache len: .*')
	echo "@@info DAX window: $window"
	echo "@@info mounted: $(grep " /mnt/$1 " /proc/mounts)"
}

# On DAX share $1: reads the host's from-host-64M through the window and
# compares its sha256 with $2; fills a preallocated 64 MiB file with random data
# through the window (writes inside the file's size are DAX writes; extending
# ones would go through FUSE_WRITE), reads it back after dropping the guest's
# caches and leaves its sha256 in dax-file.sha256 for the host. Every file read
# here is a whole number of 2 MiB mappings: QEMU 11.1 refuses to map a range
# that reaches past a file's end.
dax_round_trip() {
	local d=$1 want_host=$2 sum
	[ "$(sha256sum <"$d/from-host-64M" | cut -c1-64)" = "$want_host" ]
	head -c 64M /dev/urandom >/tmp/dax-data
	sum=$(sha256sum </tmp/dax-data | cut -c1-64)
	truncate -s 64M "$d/dax-file"
	dd if=/tmp/dax-data of="$d/dax-file" bs=1M conv=notrunc status=none
	rm /tmp/dax-data
	sync
	echo 3 >/proc/sys/vm/drop_caches
	[ "$(sha256sum <"$d/dax-file" | cut -c1-64)" = "$sum" ]
	echo "$sum" >"$d/dax-file.sha256"
}

# Share $1 (/mnt/TAG) holds from-host, written by the host; the guest reads it
# and leaves 4 MiB of random data in from-guest and its sha256 in
# from-guest.sha256 for the host to compare.
share_round_trip() {
	local d=$1
	[ "$(cat "$d/from-host")" = "host file for ${d##*/}" ]
	head -c 4M /dev/urandom >/tmp/round-trip
	cp /tmp/round-trip "$d/from-guest"
	cmp /tmp/round-trip "$d/from-guest"
	sha256sum </tmp/round-trip | cut -c1-64 >"$d/from-guest.sha256"
	rm /tmp/round-trip
}
