# shellcheck shell=bash
# Guest side of the fscache tier (Linux 6.12 with CONFIG_CACHEFILES_ONDEMAND): berth in
# the guest serves erofs images whose blobs live on the host, behind a virtio-fs share
# (tag "images"), through cachefiles on-demand mode. The host wrote /mnt/images/expect.env:
# the images, their file digests and the chunk counts of chosen files.
echo "@@boot $(cut -d' ' -f1 /proc/uptime)"
# shellcheck disable=SC1091
. /test/checks.sh

BERTH=/test/berth
HARNESS=/test/berth-service-harness
CACHE=/cache
METRICS=/tmp/fscache-metrics.prom
SERVER_LOG=/tmp/fscache-server.log

metric() { awk -v name="$1" '$1 == name { print $2 }' "$METRICS" 2>/dev/null; }
# The worker rewrites the metrics file every second.
fetched_now() {
	sleep 2.2
	local n
	n=$(metric berth_cache_chunks_fetched_total)
	echo "${n:-0}"
}
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }
# Waits (up to 60 s) until the worker reports at least $1 chunks fetched.
wait_fetched() {
	local n
	for _ in $(seq 600); do
		n=$(metric berth_cache_chunks_fetched_total)
		[ "${n:-0}" -ge "$1" ] && return 0
		sleep 0.1
	done
	echo "the worker never reported $1 chunks fetched"
	return 1
}
digest() { sha256sum "$1" | cut -c1-64; }
expected_digest() { awk -v p="./$1" '$2 == p { print $1 }' /mnt/images/a.sha256; }
is_mounted() { awk -v m="$1" '$2 == m && $3 == "erofs" { found = 1 } END { exit !found }' /proc/mounts; }
# berth_pid worker|server: the pid of `berth fscache`'s worker or supervisor (busybox
# here has no pgrep).
berth_pid() {
	local entry cmdline
	for entry in /proc/[0-9]*; do
		cmdline=$(tr '\0' ' ' <"$entry/cmdline" 2>/dev/null) || continue
		[[ $cmdline == "$BERTH fscache "* ]] || continue
		if [[ $cmdline == *--internal-worker* ]]; then
			[ "$1" = worker ] || continue
		else
			[ "$1" = server ] || continue
		fi
		echo "${entry#/proc/}"
		return 0
	done
}
worker_pid() { berth_pid worker; }
server_pid() { berth_pid server; }

# Waits up to $2 s for command $1 (a shell snippet) to succeed.
wait_until() {
	local deadline=$((SECONDS + $2))
	until eval "$1"; do
		[ $SECONDS -lt $deadline ] || {
			echo "timed out after $2 s waiting for: $1"
			return 1
		}
		sleep 0.1
	done
}

# spawn NAME LOG COMMAND...: starts COMMAND in the background, outside the check's
# subshell bookkeeping: its pid goes to /tmp/NAME.pid, its exit status to /tmp/NAME.rc.
spawn() {
	local name=$1 log=$2
	shift 2
	rm -f "/tmp/$name.pid" "/tmp/$name.rc"
	(
		"$@" &
		echo $! >"/tmp/$name.pid"
		rc=0
		wait $! || rc=$?
		echo "$rc" >"/tmp/$name.rc"
	) >"$log" 2>&1 &
	wait_until "[ -s /tmp/$name.pid ]" 10
}

# stop NAME: SIGTERM to what spawn started; fails unless it exits 0 within 60 s.
stop() {
	local name=$1
	local pid
	pid=$(cat "/tmp/$name.pid")
	kill -TERM "$pid"
	wait_until "[ -s /tmp/$name.rc ]" 60 || {
		# What it is stuck on, thread by thread.
		local task
		[ -d "/proc/$pid" ] || echo "$name (pid $pid) is gone, but its exit status was never recorded"
		for task in /proc/"$pid"/task/*; do
			echo "$name thread ${task##*/}: $(grep -E '^(Name|State)' "$task/status" 2>/dev/null | tr '\n\t' '  ') wchan $(cat "$task/wchan" 2>/dev/null) syscall $(cat "$task/syscall" 2>/dev/null)"
		done
		return 1
	}
	[ "$(cat "/tmp/$name.rc")" = 0 ] || {
		echo "$name exited with status $(cat "/tmp/$name.rc")"
		return 1
	}
}

# start_client NAME IMAGE MOUNTPOINT [ARGS...]
start_client() {
	local name=$1 image=$2 mnt=$3
	shift 3
	mkdir -p "$mnt"
	spawn "client-$name" "/tmp/client-$name.log" "$BERTH" mount "$image" "$mnt" \
		--cachefiles-dir "$CACHE/cachefiles" --cache-dir "$CACHE/blobs" "$@"
	wait_until "is_mounted $mnt || [ -s /tmp/client-$name.rc ]" 120
	is_mounted "$mnt" || {
		cat "/tmp/client-$name.log" "$SERVER_LOG"
		return 1
	}
}

stop_client() {
	stop "client-$1" || {
		cat "/tmp/client-$1.log"
		return 1
	}
}

setup() {
	# The host's server, as a service manager would run it: restarted when it dies, with
	# /dev/cachefiles kept in the descriptor store.
	spawn harness "$SERVER_LOG" "$HARNESS" -- "$BERTH" fscache --cachefiles-dir "$CACHE/cachefiles" \
		--cache-dir "$CACHE/blobs" --readahead 0 --metrics-file "$METRICS" --metrics-interval 1
	wait_until "[ -S $CACHE/cachefiles/berth.sock ]" 60 || {
		cat "$SERVER_LOG"
		return 1
	}
	# --mode auto (the default) must choose fscache on this kernel.
	start_client a /mnt/images/a /mnt/a
	grep -q "Mode fscache" /tmp/client-a.log || {
		cat /tmp/client-a.log
		return 1
	}
	grep " /mnt/a " /proc/mounts | sed 's/^/@@info /'
	# The mount's kernel read-ahead window: berth's 4 MiB, not the kernel's 128 KiB.
	local device
	device=$(sed -n 's/.*kernel read-ahead of the mount set to 4096 KiB (\(erofs-[0-9]*\)).*/\1/p' "$SERVER_LOG" | head -n 1)
	[ -n "$device" ] || {
		echo "the server did not set the read-ahead window"
		return 1
	}
	echo "@@info read-ahead of $device: $(cat "/sys/class/bdi/$device/read_ahead_kb") KiB"
	[ "$(cat "/sys/class/bdi/$device/read_ahead_kb")" = 4096 ]
}

one_file() {
	drop_caches
	local before after
	before=$(fetched_now)
	[ "$(digest "/mnt/a/$F_SMALL")" = "$(expected_digest "$F_SMALL")" ]
	after=$(fetched_now)
	echo "@@info read $F_SMALL: $((after - before)) chunks fetched, the file has $F_SMALL_CHUNKS"
	[ $((after - before)) -eq "$F_SMALL_CHUNKS" ]
}

sixteen_readers() {
	drop_caches
	local before after i want
	want=$(expected_digest "$F_SHARED")
	before=$(fetched_now)
	for i in $(seq 16); do
		digest "/mnt/a/$F_SHARED" >"/tmp/reader-$i" &
	done
	wait
	for i in $(seq 16); do
		[ "$(cat "/tmp/reader-$i")" = "$want" ]
	done
	after=$(fetched_now)
	echo "@@info 16 readers of $F_SHARED: $((after - before)) chunks fetched, the file has $F_SHARED_CHUNKS"
	[ $((after - before)) -eq "$F_SHARED_CHUNKS" ]
}

# wait_reader PID WHAT: waits (up to 120 s) for a background reader; a read still blocked
# then fails the check with what it waits on and the server's last words, instead of
# holding the guest until its timeout.
wait_reader() {
	local pid=$1 what=$2 rc=0
	if ! wait_until "! kill -0 $pid 2>/dev/null" 120; then
		echo "the read of $what is still blocked"
		local task
		for task in /proc/[0-9]*; do
			grep -q '^PPid:[[:space:]]*'"$pid"'$' "$task/status" 2>/dev/null || continue
			echo "  reader ${task#/proc/}: $(grep '^State' "$task/status" | tr '\t' ' ') wchan $(cat "$task/wchan" 2>/dev/null)"
		done
		tail -n 30 "$SERVER_LOG"
		kill "$pid" 2>/dev/null || true
		return 1
	fi
	wait "$pid" || rc=$?
	return $rc
}

worker_kill() {
	drop_caches
	local old new reader rc=0
	old=$(worker_pid)
	[ -n "$old" ]
	local before
	before=$(fetched_now)
	digest "/mnt/a/$F_BIG" >/tmp/reader-big &
	reader=$!
	# Killed in the middle of the file: some chunks fetched, most not.
	wait_fetched $((before + 3))
	kill -9 "$old"
	wait_reader "$reader" "$F_BIG" || rc=$?
	[ "$rc" = 0 ]
	[ "$(cat /tmp/reader-big)" = "$(expected_digest "$F_BIG")" ]
	grep -q "the cachefiles worker died" "$SERVER_LOG"
	# shellcheck disable=SC2016 # expanded by wait_until's eval
	wait_until '[ -n "$(worker_pid)" ] && [ "$(worker_pid)" != '"$old"' ]' 30
	new=$(worker_pid)
	echo "@@info worker $old killed during the read, $new took over"
}

full_restart() {
	drop_caches
	local supervisor worker reader rc=0 after again
	supervisor=$(server_pid)
	worker=$(worker_pid)
	[ -n "$supervisor" ] && [ -n "$worker" ]
	local before progress
	before=$(fetched_now)
	digest "/mnt/a/$F_RESTART" >/tmp/reader-restart &
	reader=$!
	wait_fetched $((before + 3))
	progress=$(($(metric berth_cache_chunks_fetched_total) - before))
	kill -9 "$supervisor" "$worker"
	local killed_at=$SECONDS read_secs
	wait_reader "$reader" "$F_RESTART" || rc=$?
	read_secs=$((SECONDS - killed_at))
	[ "$rc" = 0 ]
	[ "$(cat /tmp/reader-restart)" = "$(expected_digest "$F_RESTART")" ]
	grep -q "took /dev/cachefiles back from the service manager" "$SERVER_LOG"
	grep -q "(start 2)" "$SERVER_LOG"
	# Nothing cached before the restart is fetched again.
	after=$(fetched_now)
	drop_caches
	for f in "$F_SMALL" "$F_SHARED" "$F_BIG" "$F_RESTART"; do
		[ "$(digest "/mnt/a/$f")" = "$(expected_digest "$f")" ]
	done
	again=$(fetched_now)
	echo "@@info supervisor $supervisor and worker $worker killed after at least $progress of the file's $F_RESTART_CHUNKS chunks; after the restart: $after more fetched, then $((again - after)) for rereading every file read before"
	# What the restarted server had to wait for (a slow pass is explained here).
	{ grep -E "previous cachefiles worker|never opened|handed out again|reads of these cache objects wait" "$SERVER_LOG" || true; } |
		sed 's/^/@@info   server: /'
	echo "@@info the read finished $read_secs s after the kill"
	# Chunks fetched before the restart are not fetched again.
	[ $((after + progress)) -le "$F_RESTART_CHUNKS" ]
	[ "$again" -eq "$after" ]
}

# A copy of the blob object's anonymous descriptor outlives both the supervisor and the
# worker (a process still exiting does this by accident). The restarted server gets
# READs under the old object id it cannot complete; it must ask the kernel again until
# the copy is closed, and the kernel then re-opens the object and the reads go on.
restart_held_descriptor() {
	local supervisor worker fd holder reader rc=0
	supervisor=$(server_pid)
	worker=$(worker_pid)
	[ -n "$supervisor" ] && [ -n "$worker" ]
	for fd in /proc/"$worker"/fd/*; do
		[ "$(readlink "$fd")" = "anon_inode:[cachefiles]" ] && break
		fd=""
	done
	[ -n "$fd" ] || {
		echo "worker $worker holds no cachefiles object descriptor"
		return 1
	}
	rm -f /tmp/held-ready /tmp/held-go
	perl /test/hold-fd.pl "$worker" "${fd##*/}" /tmp/held-ready /tmp/held-go 2>/tmp/holder.err &
	holder=$!
	wait_until "[ -e /tmp/held-ready ] || ! kill -0 $holder 2>/dev/null" 30
	[ -e /tmp/held-ready ] || {
		echo "the holder could not copy the descriptor: $(cat /tmp/holder.err)"
		return 1
	}
	local restarts_before
	restarts_before=$(grep -c "took /dev/cachefiles back" "$SERVER_LOG" || true)
	kill -9 "$supervisor" "$worker"
	# shellcheck disable=SC2016 # expanded by wait_until's eval
	wait_until '[ "$(grep -c "took /dev/cachefiles back" "$SERVER_LOG")" -gt '"$restarts_before"' ] && [ -S '"$CACHE"'/cachefiles/berth.sock ]' 60
	# The object is still open (the copy), so this file's READs come under its old id.
	drop_caches
	digest "/mnt/a/$F_HELD" >/tmp/reader-held &
	reader=$!
	wait_until "grep -q 'a descriptor of it outlived the previous server' $SERVER_LOG" 60 || {
		touch /tmp/held-go
		return 1
	}
	# Held a while longer: the server keeps asking (with backoff) meanwhile.
	sleep 3
	kill -0 "$reader" 2>/dev/null || {
		echo "the read finished while the object was still held: no READ was held back"
		touch /tmp/held-go
		return 1
	}
	touch /tmp/held-go
	wait "$holder"
	wait_reader "$reader" "$F_HELD" || rc=$?
	[ "$rc" = 0 ]
	[ "$(cat /tmp/reader-held)" = "$(expected_digest "$F_HELD")" ]
	# Said at the server's next look, once no such READ came back.
	wait_until "grep -q 'every READ of an object the previous server held is handed out again' $SERVER_LOG" 10
	echo "@@info $(grep -c "never opened" "$SERVER_LOG") READs of the held object reported; the read completed once the copy was closed"
}

all_files() {
	drop_caches
	(cd /mnt/a && sha256sum -c --quiet /mnt/images/a.sha256)
	echo "@@info $(wc -l </mnt/images/a.sha256) files match"
	# The cachefiles directory is the only copy of the data: the engine keeps none.
	local copies
	copies=$(find "$CACHE/blobs" -type f | wc -l)
	# (In use, cachefiles' data files are not linked into its directory yet: df, not du.)
	echo "@@info cache disk $(df -m "$CACHE" | awk 'NR == 2 { print $3 }') MiB used; engine cache directory $(du -sk "$CACHE/blobs" | cut -f1) KiB in $copies files"
	[ "$copies" = 0 ]
}

shared_blob() {
	local before after
	before=$(fetched_now)
	# The same image at another mount point: another fsid, the same blob cookie in the
	# domain, so the cached blob serves it.
	start_client a2 /mnt/images/a /mnt/a2
	drop_caches
	(cd /mnt/a2 && sha256sum -c --quiet /mnt/images/a.sha256)
	after=$(fetched_now)
	echo "@@info second mount of the image read in full: $((after - before)) chunks fetched"
	[ "$after" -eq "$before" ]
}

corrupt_chunk() {
	start_client b /mnt/images/b /mnt/b
	drop_caches
	local out rc=0
	out=$(cat "/mnt/b/$BAD_FILE" 2>&1 >/dev/null) || rc=$?
	echo "@@info reading $BAD_FILE: exit $rc: $out"
	[ "$rc" != 0 ]
	[[ $out == *"Input/output error"* ]]
	grep -q "chunk $BAD_CHUNK of blob $BAD_BLOB failed verification" "$SERVER_LOG" || {
		tail -n 20 "$SERVER_LOG"
		return 1
	}
	# Other files of that image are unaffected.
	[ "$(digest "/mnt/b/$GOOD_FILE")" = "$GOOD_DIGEST" ]
}

unmount_all() {
	local name
	for name in a a2 b; do
		stop_client "$name"
	done
	! grep -q " erofs " /proc/mounts
	# An image mounted again by the same server: the worker opens its blob anew.
	start_client b2 /mnt/images/b /mnt/b
	[ "$(digest "/mnt/b/$GOOD_FILE")" = "$GOOD_DIGEST" ]
	stop_client b2
	! grep -q " erofs " /proc/mounts
	stop harness || {
		tail -n 20 "$SERVER_LOG"
		return 1
	}
	grep -q "the cachefiles server stopped" "$SERVER_LOG"
}

# berth mount starts a server itself when none runs; the server leaves when idle.
autostart() {
	start_client auto /mnt/images/a /mnt/auto --mode fscache
	[ "$(digest "/mnt/auto/$F_SMALL")" = "$(expected_digest "$F_SMALL")" ]
	stop_client auto
	# shellcheck disable=SC2016 # expanded by wait_until's eval
	wait_until '[ -z "$(server_pid)" ]' 30
	grep -q "nothing is mounted any more" "$CACHE/cachefiles/berth-fscache.log"
}

# The images share and the cache disk; expect.env is read here, outside the checks'
# subshells, so that every check sees it.
mkdir -p /mnt/images "$CACHE"
mount -t virtiofs images /mnt/images && mount -t ext4 /dev/vdb "$CACHE" || echo "@@info mounting the share or the cache disk failed"
# shellcheck disable=SC1091
. /mnt/images/expect.env

check fscache-setup setup
check fscache-one-file one_file
check fscache-16-readers sixteen_readers
check fscache-worker-kill worker_kill
check fscache-full-restart full_restart
check fscache-restart-held-fd restart_held_descriptor
check fscache-all-files all_files
check fscache-shared-blob shared_blob
check fscache-corrupt-chunk corrupt_chunk
check fscache-unmount unmount_all
check fscache-autostart autostart
if [ "$CHECK_FAILURES" != 0 ]; then
	# What the server and the kernel said, for the host's log.
	tail -n 60 "$SERVER_LOG" | sed 's/^/@@detail fscache-server-log: /'
	dmesg | tail -n 30 | sed 's/^/@@detail fscache-dmesg: /'
fi
[ "$CHECK_FAILURES" = 0 ]
