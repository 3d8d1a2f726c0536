# shellcheck shell=bash
# Guest side of the live-migration checks (sourced after checks.sh). The guest keeps
# a workload running on the share while the host moves it from QEMU to QEMU:
#   fd 6   held-append.txt, appended to after every hop (a held write handle)
#   fd 7   held.txt, one line read after every hop (a held read handle)
#   fd 8   rename-me.txt, renamed on the host before a hop
#   fd 9   delete-me.txt, deleted on the host before a hop
#   fd 10  lose-me.txt, deleted on the host before a guest-error hop (find-paths)
# plus a writer appending numbered lines to log.txt through a handle it holds, and fio
# writing and verifying (crc32c) fio.dat in a loop. The host and the guest take turns
# through files in mig/ on the share: the guest creates mig/ready-HOP, the host
# migrates and creates mig/done-HOP (mig/failed-HOP when the hop was refused).
#
# The setup and the workload start in the script's own shell (mig_setup, not a
# check): a check runs in a subshell, whose descriptors and jobs end with it.
#
# In file-handles mode a deleted file the guest holds open still moves (the open file
# keeps the inode, and so its handle, alive). What the source cannot describe there is
# an inode the guest looked up without opening it, deleted on the host: the daemon holds
# it by file handle only, and that handle is stale. mig_pin_unopened makes one.

MIG=/mnt/fs
MIG_HOST_WAIT=${MIG_HOST_WAIT:-300}

# Lines 1..40 of each held file, "NAME line N"; each check reads the next one.
mig_setup() {
	local name n
	for name in held rename-me delete-me lose-me; do
		for n in $(seq 1 40); do echo "$name line $n"; done >"$MIG/$name.txt"
	done
	: >"$MIG/held-append.txt"
	: >"$MIG/log.txt"
	# The writer: "line N" through a handle it holds, every 20 ms, until told to stop;
	# its count and failures stay in the guest's memory (/tmp is tmpfs).
	(
		exec 5>>"$MIG/log.txt"
		n=0
		while [ ! -e /tmp/stop-writer ]; do
			n=$((n + 1))
			if echo "line $n" >&5; then
				echo "$n" >/tmp/writer.count
			else
				echo "line $n failed" >>/tmp/writer.errors
				break
			fi
			sleep 0.02
		done
	) &
	MIG_WRITER=$!
	# fio: 8 MiB of 4 KiB direct random writes, each block verified (crc32c), again and
	# again until told to stop; the exit status of each run is kept.
	(
		i=0
		while [ ! -e /tmp/stop-fio ]; do
			i=$((i + 1))
			rc=0
			fio --name=mig --filename="$MIG/fio.dat" --size=8M --bs=4k --rw=randwrite \
				--ioengine=libaio --iodepth=8 --direct=1 --verify=crc32c --do_verify=1 \
				--verify_fatal=1 --verify_backlog=256 >"/tmp/fio-$i.out" 2>&1 || rc=$?
			echo "$i $rc" >>/tmp/fio.runs
		done
	) &
	MIG_FIO=$!
	# Opened after the background jobs started, so that only this shell holds them.
	exec 6>>"$MIG/held-append.txt" 7<"$MIG/held.txt" 8<"$MIG/rename-me.txt" \
		9<"$MIG/delete-me.txt" 10<"$MIG/lose-me.txt"
}

# Locks that move with the guest (berth with --posix-lock --flock): a POSIX write lock on
# bytes 0..99 of mig-locked.txt and an exclusive flock lock on mig-flocked.txt, each held
# by a process of the script's shell until /tmp/ml-go or /tmp/mf-go exists; and a process
# waiting for each of them (F_SETLKW on the same range, flock -x), still waiting when the
# guest moves: its request moves with it and is answered by the destination.
mig_lock_setup() {
	: >"$MIG/mig-locked.txt"
	: >"$MIG/mig-flocked.txt"
	perl /test/posix-lock.pl hold "$MIG/mig-locked.txt" w 0 100 /tmp/ml-ready /tmp/ml-go &
	MIG_POSIX_HOLDER=$!
	flock -x "$MIG/mig-flocked.txt" -c 'touch /tmp/mf-ready; until [ -e /tmp/mf-go ]; do sleep 0.05; done' &
	MIG_FLOCK_HOLDER=$!
	wait_for_file /tmp/ml-ready 30 && wait_for_file /tmp/mf-ready 30 ||
		echo "@@detail the lock holders did not start"
	(
		rc=0
		perl /test/posix-lock.pl wait "$MIG/mig-locked.txt" w 0 100 600 2>/tmp/mlw.err || rc=$?
		echo "$rc" >/tmp/mlw.rc
	) &
	MIG_POSIX_WAITER=$!
	flock -x "$MIG/mig-flocked.txt" -c 'touch /tmp/mfw-got' &
	MIG_FLOCK_WAITER=$!
	# Time for both requests to reach the daemon and wait there.
	sleep 1
}

# After a hop: the host sees both locks held (it probes when mig/locks-probe appears and
# answers in mig/locks-probed), another guest process is refused them too, and once the
# holders let go the guest locks the same ranges again.
mig_locks_kept() {
	touch "$MIG/mig/locks-probe"
	wait_for_file "$MIG/mig/locks-probed" 90
	local host
	host=$(cat "$MIG/mig/locks-probed")
	if [ "$host" != held ]; then
		echo "the host's probe: $host"
		return 1
	fi
	posix_lock_try "$MIG/mig-locked.txt" w 50 10 conflict
	if flock -n -s "$MIG/mig-flocked.txt" true; then
		echo "another guest process got a shared flock while the exclusive one is held"
		return 1
	fi
	if [ -e /tmp/mlw.rc ] || [ -e /tmp/mfw-got ]; then
		echo "a waiter stopped waiting while the locks are held: posix $(cat /tmp/mlw.rc 2>/dev/null) $(cat /tmp/mlw.err 2>/dev/null), flock $([ -e /tmp/mfw-got ] && echo granted)"
		return 1
	fi
	touch /tmp/ml-go /tmp/mf-go
	local pid waited
	# The waiters get the locks once the holders let go, then exit (letting go too).
	for pid in "$MIG_POSIX_HOLDER" "$MIG_FLOCK_HOLDER" "$MIG_POSIX_WAITER" "$MIG_FLOCK_WAITER"; do
		waited=0
		while kill -0 "$pid" 2>/dev/null; do
			waited=$((waited + 1))
			[ $waited -lt 500 ] || {
				echo "lock holder $pid did not exit"
				return 1
			}
			sleep 0.02
		done
	done
	if [ "$(cat /tmp/mlw.rc 2>/dev/null)" != 0 ]; then
		echo "the F_SETLKW that waited across the hop: exit $(cat /tmp/mlw.rc 2>/dev/null) $(cat /tmp/mlw.err 2>/dev/null)"
		return 1
	fi
	if [ ! -e /tmp/mfw-got ]; then
		echo "the flock -x that waited across the hop was not granted"
		return 1
	fi
	posix_lock_try "$MIG/mig-locked.txt" w 0 100 granted
	flock -n -x "$MIG/mig-flocked.txt" true
	posix_lock_try "$MIG/mig-locked.txt" r 0 0 granted
}

# Closes the held descriptors (before the unmount), one at a time: closing the lost
# handle may fail (its FLUSH gets an error), and bash keeps copies of the descriptors
# of an exec whose redirections did not all succeed.
mig_release() {
	local fd
	for fd in 10 9 8 7 6; do
		{ exec {fd}>&-; } 2>/dev/null || echo "@@info closing held descriptor $fd failed"
	done
}

# The workload is running: the writer has written, no fio run failed yet.
mig_started() {
	wait_for_file /tmp/writer.count 30
	[ ! -e /tmp/writer.errors ]
	mig_no_failed_fio
}

mig_no_failed_fio() {
	[ -e /tmp/fio.runs ] || return 0
	if awk '$2 != 0 { bad = 1 } END { exit !bad }' /tmp/fio.runs; then
		local run
		run=$(awk '$2 != 0 { print $1; exit }' /tmp/fio.runs)
		echo "fio run $run failed:"
		cat "/tmp/fio-$run.out"
		return 1
	fi
}

# mig_read_next FD NAME: the next line read through held descriptor FD is NAME's next
# line. The guest's page cache is dropped first, so the read reaches the daemon.
mig_read_next() {
	local fd=$1 name=$2 line expected
	sync
	echo 1 >/proc/sys/vm/drop_caches
	read -r line <&"$fd"
	# Every line read so far by this check series: count them in a guest file.
	local count=0
	[ ! -e "/tmp/read-$name" ] || count=$(cat "/tmp/read-$name")
	count=$((count + 1))
	echo "$count" >"/tmp/read-$name"
	expected="$name line $count"
	if [ "$line" != "$expected" ]; then
		echo "fd $fd read '$line', expected '$expected'"
		return 1
	fi
}

# mig_handover HOP: hands over to the host for HOP and waits for the outcome; prints
# "done", "failed", or "abandoned" (the host gave up on the chain).
mig_handover() {
	touch "$MIG/mig/ready-$1"
	local deadline=$(($(micros) + MIG_HOST_WAIT * 1000000))
	until [ -e "$MIG/mig/done-$1" ] || [ -e "$MIG/mig/failed-$1" ]; do
		[ ! -e "$MIG/mig/abandon" ] || {
			echo abandoned
			return 0
		}
		[ "$(micros)" -lt "$deadline" ] || {
			echo "timeout"
			return 0
		}
		sleep 0.05
	done
	if [ -e "$MIG/mig/done-$1" ]; then echo "done"; else echo failed; fi
}

# After a hop (or a refused one): the held handles read and write, new files can be
# made, the writer goes on, no fio run failed. Extra arguments name further held
# descriptors that must still read: 8 (renamed on the host), 9 (deleted on the host).
mig_after_hop() {
	local hop=$1
	shift
	mig_read_next 7 held
	echo "appended after hop $hop" >&6
	echo "new file after hop $hop" >"$MIG/after-$hop.txt"
	[ "$(cat "$MIG/after-$hop.txt")" = "new file after hop $hop" ]
	local fd
	for fd in "$@"; do
		case $fd in
		8) mig_read_next 8 rename-me ;;
		9) mig_read_next 9 delete-me ;;
		esac
	done
	local before after
	before=$(cat /tmp/writer.count)
	sleep 0.5
	after=$(cat /tmp/writer.count)
	if [ ! "$after" -gt "$before" ] || [ -e /tmp/writer.errors ]; then
		echo "the log writer stopped at line $after: $(cat /tmp/writer.errors 2>/dev/null)"
		return 1
	fi
	mig_no_failed_fio
	echo "@@info writer at line $after, fio runs so far: $(wc -l </tmp/fio.runs 2>/dev/null || echo 0)"
}

# The file renamed on the host shows up under its new name.
mig_renamed_visible() {
	local i
	for i in $(seq 50); do
		[ -e "$MIG/renamed.txt" ] && break
		sleep 0.1
	done
	[ "$(sed -n 1p "$MIG/renamed.txt")" = "rename-me line 1" ]
}

# After a guest-error hop: the handle of the file deleted on the host fails (the
# daemon could not carry it over), every other handle still works.
mig_lost_handle() {
	sync
	echo 1 >/proc/sys/vm/drop_caches
	local err
	if err=$(read -r _ <&10 2>&1); then
		echo "the handle of the file deleted on the host still reads after the migration"
		return 1
	fi
	if [ -z "$err" ]; then
		echo "the handle of the file deleted on the host read end-of-file instead of failing"
		return 1
	fi
	echo "@@info read on the lost handle: ${err##*: }"
	mig_after_hop lost 8
}

# Closes the handle of the file deleted on the host and makes the kernel forget the
# inode, so that the daemon no longer holds it.
mig_forget_deleted() {
	exec 9<&-
	mig_forget_unused
}

mig_forget_unused() {
	sync
	echo 2 >/proc/sys/vm/drop_caches
}

# mig_pin_unopened NAME: creates NAME on the share (its open file is released at once)
# and pins its inode in the guest with an O_PATH descriptor (no FUSE_OPEN), held by a
# job of the script's shell until /tmp/pin-NAME.go exists.
mig_pin_unopened() {
	local name=$1
	: >"$MIG/$name"
	perl /test/hold-path.pl "$MIG/$name" "/tmp/pin-$name.fd" "/tmp/pin-$name.go" &
	echo "$!" >"/tmp/pin-$name.pid"
	wait_for_file "/tmp/pin-$name.fd" 30 || echo "@@detail the O_PATH holder of $name did not start"
}

# The pinned inode of NAME as a path the guest can stat (the holder's descriptor).
mig_pinned() { echo "/proc/$(cat "/tmp/pin-$1.pid")/fd/$(cat "/tmp/pin-$1.fd")"; }

# mig_unpin NAME: the holder lets go; then the kernel forgets the inode.
mig_unpin() {
	local pid
	pid=$(cat "/tmp/pin-$1.pid")
	touch "/tmp/pin-$1.go"
	wait "$pid" || echo "@@info the O_PATH holder of $1 exited $?"
	mig_forget_unused
}

# After a guest-error hop that followed the deletion on the host of NAME, pinned but not
# open: its file handle is stale (berth finds that on the source, virtiofsd 1.14 on the
# destination), so the destination serves it as lost: a stat that reaches the daemon
# fails with EIO.
# Every other handle, the held deleted file's too, still works.
mig_lost_inode() {
	local name=$1 err
	if err=$(stat --cached=never -L -c %i "$(mig_pinned "$name")" 2>&1); then
		echo "the pinned inode deleted on the host still stats after the migration (inode $err)"
		return 1
	fi
	if [[ $err != *"Input/output error"* ]]; then
		echo "a stat of the lost inode failed, but not with EIO: $err"
		return 1
	fi
	echo "@@info stat on the lost inode: ${err##*: }"
	mig_after_hop lost 8 9
}

# Stops the workload and waits for it (in the script's shell: the jobs are its
# children); fio's current run ends first. Lock and O_PATH holders let go.
mig_stop() {
	touch /tmp/stop-writer /tmp/stop-fio /tmp/ml-go /tmp/mf-go
	local pin
	for pin in /tmp/pin-*.pid; do
		[ ! -e "$pin" ] || touch "${pin%.pid}.go"
	done
	wait "$MIG_WRITER" "$MIG_FIO" || true
}

# Unmounts the share, retrying for a few seconds (the releases of the handles just
# closed may still be on their way); names what still holds it when that fails.
mig_unmount() {
	local i
	for i in $(seq 30); do
		umount /mnt/fs 2>/dev/null && return 0
		sleep 0.1
	done
	echo "still in use:"
	local link target
	for link in /proc/[0-9]*/fd/* /proc/[0-9]*/cwd; do
		target=$(readlink "$link" 2>/dev/null) || continue
		case $target in /mnt/fs*) echo "$link -> $target" ;; esac
	done
	umount /mnt/fs
}

# fio's verify passed in every run, the log holds lines 1..N in order and its
# checksum is written for the host to compare.
mig_finish() {
	[ ! -e /tmp/writer.errors ] || {
		cat /tmp/writer.errors
		return 1
	}
	mig_no_failed_fio
	local runs lines
	runs=$(wc -l </tmp/fio.runs)
	[ "$runs" -ge 1 ]
	if grep -h 'verify: bad' /tmp/fio-*.out; then return 1; fi
	lines=$(cat /tmp/writer.count)
	sync
	echo 3 >/proc/sys/vm/drop_caches
	if ! seq 1 "$lines" | sed 's/^/line /' | cmp - "$MIG/log.txt"; then
		echo "log.txt is not lines 1..$lines in order"
		return 1
	fi
	sha256sum <"$MIG/log.txt" | cut -c1-64 >"$MIG/log.sha256"
	echo "$lines" >"$MIG/log.lines"
	echo "@@info $lines log lines, $runs fio runs verified"
}

# The guest kernel logged no I/O error and no virtio-fs or FUSE complaint (after the
# unmount: that covers the answer to FUSE_DESTROY too).
mig_quiet_kernel() {
	# Not complaints: the module loading, the device's tag, a device without a DAX window.
	local benign='fuse: init|discovered new tag|No cache capability'
	# The empty answer to FUSE_DESTROY is berth's fix (umount-quiet); only noted for others.
	if [ "$DAEMON_KIND" != berth ]; then
		benign="$benign|response too short"
		if dmesg | grep 'response too short' >/dev/null; then
			echo "@@info $DAEMON_KIND: the guest logged 'response too short' at the unmount"
		fi
	fi
	if dmesg | grep -iE 'I/O error|virtio-fs|virtio_fs|virtiofs|fuse|response too short' |
		grep -vE "$benign"; then
		return 1
	fi
}
