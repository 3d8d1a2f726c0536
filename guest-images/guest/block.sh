# shellcheck shell=bash
# Guest side of the block checks: berth (delivered as /test/berth) exports files and
# images as ublk devices inside the guest; the checks put filesystems and fio on them.
# Sourced after checks.sh (check/skip/wait_for_file).

BERTH=/test/berth
E2FS=/opt/e2fs
e2() { LD_LIBRARY_PATH=$E2FS/lib/x86_64-linux-gnu "$E2FS/sbin/$1" "${@:2}"; }

block_setup() {
	mkdir -p "$E2FS" /mnt/blk
	mount -t erofs -o ro /dev/vdb "$E2FS"
	local version
	version=$(e2 mke2fs -V 2>&1)
	echo "@@info ${version%%$'\n'*}"
	[ -c /dev/ublk-control ]
	"$BERTH" block list
}

# Deletes every ublk device and ends every berth a failed check left behind.
reset_devices() {
	local id
	for id in $("$BERTH" block list --json | grep -o '"id":[0-9]*' | cut -d: -f2); do
		"$BERTH" block del "$id" >/dev/null 2>&1 || true
	done
	pkill -9 -x berth 2>/dev/null || true
}

# start_device NAME ARGS...: `berth block add ARGS` in the background; sets DEV_ID,
# DEV_PATH and DEV_PID once the device exists.
start_device() {
	local name=$1 line=""
	shift
	reset_devices
	"$BERTH" block add "$@" --metrics-file "/tmp/$name.prom" --metrics-interval 1 \
		>"/tmp/$name.out" 2>"/tmp/$name.log" &
	DEV_PID=$!
	for _ in $(seq 600); do
		line=$(grep -m1 '^ublk device' "/tmp/$name.out" || true)
		[ -n "$line" ] && break
		kill -0 "$DEV_PID" 2>/dev/null || break
		sleep 0.1
	done
	if [ -z "$line" ]; then
		echo "berth block add $* did not start a device:"
		tail -n 20 "/tmp/$name.log" "/tmp/$name.out"
		return 1
	fi
	DEV_ID=$(echo "$line" | awk '{ print $3 }')
	DEV_PATH=$(echo "$line" | awk '{ print $4 }')
	for _ in $(seq 100); do
		[ -b "$DEV_PATH" ] && break
		sleep 0.1
	done
	[ -b "$DEV_PATH" ]
	echo "@@info $line"
}

# stop_device NAME: deletes the device; berth must exit 0.
stop_device() {
	"$BERTH" block del "$DEV_ID" >/dev/null
	local rc=0
	wait "$DEV_PID" || rc=$?
	if [ "$rc" != 0 ]; then
		echo "berth exited with $rc:"
		tail -n 20 "/tmp/$1.log"
		return 1
	fi
}

metric() { # metric FILE NAME-AND-LABELS-PREFIX: prints the value
	grep -v "^#" "$1" | grep -F "$2" | head -n1 | awk '{ print $NF }'
}

# A filesystem on DEV: mkfs, fsck, a file tree written and read back with checksums
# across a remount, fsck again.
filesystem_roundtrip() {
	local dev=$1
	e2 mkfs.ext4 -q -F "$dev"
	e2 e2fsck -fn "$dev" >/dev/null
	mount -t ext4 "$dev" /mnt/blk
	mkdir /mnt/blk/tree
	local i
	for i in $(seq 1 24); do
		mkdir -p "/mnt/blk/tree/d$((i % 6))"
		head -c $((i * 7919 % 300000 + 1)) /dev/urandom >"/mnt/blk/tree/d$((i % 6))/f$i"
	done
	(cd /mnt/blk/tree && find . -type f -print0 | sort -z | xargs -0 sha256sum) >/tmp/tree.sums
	umount /mnt/blk
	e2 e2fsck -fn "$dev" >/dev/null
	mount -t ext4 "$dev" /mnt/blk
	(cd /mnt/blk/tree && sha256sum -c --quiet /tmp/tree.sums)
	umount /mnt/blk
}

# fio random writes with crc32c verification, then a read-only verification pass.
fio_verify_device() {
	local dev=$1 size=${2:-8M} out
	out=$(fio --name=vw --filename="$dev" --direct=1 --ioengine=libaio --iodepth=16 \
		--rw=randwrite --bsrange=4k-64k --size="$size" --verify=crc32c --verify_fatal=1 \
		--do_verify=1 --randseed=7 --output-format=terse 2>&1) || { echo "$out"; return 1; }
	out=$(fio --name=vw --filename="$dev" --direct=1 --ioengine=libaio --iodepth=16 \
		--rw=randwrite --bsrange=4k-64k --size="$size" --verify=crc32c --verify_fatal=1 \
		--verify_only=1 --randseed=7 --output-format=terse 2>&1) || { echo "$out"; return 1; }
}

# fsx in block mode (/test/fsx, /test/fsx-block.toml) on device $1: $2 operations from seed
# $3 over its first 16 MiB, every byte read checked against fsx's model (its fadvise and
# msync(MS_INVALIDATE) steps drop cached pages, so reads also come from the device).
block_exercise() {
	local dev=$1
	run_fsx /test/fsx-block.toml "$dev" "$2" "$3" || {
		echo "the kernel's last words:"
		dmesg | tail -n 15
		return 1
	}
	echo "@@info fsx on $dev: $2 operations from seed $3 A-OK"
}

# One transport: a raw file exported through it, filesystem and fio on top, and the
# metrics naming the transport.
block_transport() {
	local transport=$1 seed=$2 name=raw-$1
	truncate -s 96M "/tmp/$name.img"
	start_device "$name" "/tmp/$name.img" --ublk-transport "$transport" --queues 2
	filesystem_roundtrip "$DEV_PATH"
	fio_verify_device "$DEV_PATH"
	block_exercise "$DEV_PATH" 2000 "$seed"
	sleep 1.2
	grep -q "berth_block_info{device=\"ublkb$DEV_ID\",transport=\"$transport\"" "/tmp/$name.prom"
	local reads
	reads=$(metric "/tmp/$name.prom" "berth_block_requests_total{device=\"ublkb$DEV_ID\",op=\"read\"}")
	[ "${reads:-0}" -gt 0 ]
	echo "@@info $transport: $reads reads served, $(metric "/tmp/$name.prom" "berth_block_requests_total{device=\"ublkb$DEV_ID\",op=\"flush\"}") flushes"
	stop_device "$name"
	rm -f "/tmp/$name.img"
}

# fsx in block mode on a volume: writes go to its write-ahead log and cache file and on
# into packs in the bucket (a directory here) while fsx reads them back, and compaction
# rewrites the packs fsx's overwrites leave sparse (eagerly: packs less than 90 % used,
# from 256 KiB dead on). Then the volume is opened from the bucket alone, on a new local
# directory: it must hold the same bytes.
block_volume_exercise() {
	local location=file:///tmp/bucket-fsx/vol
	rm -rf /tmp/bucket-fsx /tmp/vol-fsx /tmp/vol-fsx-again
	mkdir -p /tmp/bucket-fsx
	"$BERTH" volume create "$location" --size 64M >/dev/null
	start_device vol-fsx "volume:$location" --volume-dir /tmp/vol-fsx --ublk-transport zero-copy \
		--upload-interval 1 --compact-below 0.9 --compact-after 256K
	block_exercise "$DEV_PATH" 2000 21 || {
		df -h /tmp
		du -sh /tmp/bucket-fsx /tmp/vol-fsx
		ls -la /tmp/vol-fsx | head -20
		tail -n 20 /tmp/vol-fsx.log
		return 1
	}
	local written steps moved
	written=$(sha256sum <"$DEV_PATH" | cut -d' ' -f1)
	sleep 1.2
	steps=$(metric /tmp/vol-fsx.prom "berth_volume_compactions_total{volume=\"ublkb$DEV_ID\"}")
	moved=$(metric /tmp/vol-fsx.prom "berth_volume_compacted_bytes_total{volume=\"ublkb$DEV_ID\"}")
	echo "@@info the bucket holds $(du -sh /tmp/bucket-fsx | cut -f1) after fsx, the local state $(du -sh /tmp/vol-fsx | cut -f1); ${steps:-0} compaction steps moved ${moved:-0} bytes"
	stop_device vol-fsx
	if [ "${steps:-0}" -lt 1 ]; then
		echo "no compaction step ran during fsx"
		return 1
	fi
	start_device vol-fsx-again "volume:$location" --volume-dir /tmp/vol-fsx-again
	local again
	again=$(sha256sum <"$DEV_PATH" | cut -d' ' -f1)
	stop_device vol-fsx-again
	if [ "$again" != "$written" ]; then
		echo "the volume from the bucket alone differs from what fsx left: $again, not $written"
		return 1
	fi
	rm -rf /tmp/bucket-fsx /tmp/vol-fsx /tmp/vol-fsx-again
}

# Zero-copy with the kernel's automatic registration failing for every other request:
# berth registers those buffers itself, data stays right.
block_registration_fallback() {
	truncate -s 128M /tmp/fallback.img
	start_device fallback /tmp/fallback.img --ublk-transport zero-copy --force-registration-fallback
	fio_verify_device "$DEV_PATH" 8M
	sleep 1.2
	local manual
	manual=$(metric /tmp/fallback.prom "berth_block_ublk_manual_registrations_total{device=\"ublkb$DEV_ID\"}")
	echo "@@info buffers registered by berth: $manual"
	[ "${manual:-0}" -gt 0 ]
	stop_device fallback
	rm -f /tmp/fallback.img
}

# DISCARD and WRITE_ZEROES read back as zeros; FLUSH is counted.
block_discard_zeroes() {
	truncate -s 64M /tmp/dz.img
	start_device dz /tmp/dz.img
	head -c 8M /dev/urandom >/tmp/dz.data
	dd if=/tmp/dz.data of="$DEV_PATH" bs=1M oflag=direct status=none
	blkdiscard -o 0 -l 1M "$DEV_PATH"
	cmp -n 1048576 "$DEV_PATH" /dev/zero
	blkdiscard -z -o 2M -l 1M "$DEV_PATH"
	cmp -n 1048576 -i 2097152 "$DEV_PATH" /dev/zero
	cmp -n 1048576 -i 1048576 "$DEV_PATH" /tmp/dz.data
	sync "$DEV_PATH"
	blockdev --flushbufs "$DEV_PATH"
	stop_device dz
	rm -f /tmp/dz.img /tmp/dz.data
}

# A read-only export refuses writes.
block_readonly() {
	head -c 16M /dev/urandom >/tmp/ro.img
	start_device ro /tmp/ro.img --readonly
	[ "$(blockdev --getro "$DEV_PATH")" = 1 ]
	if dd if=/dev/zero of="$DEV_PATH" bs=4k count=1 oflag=direct status=none 2>/dev/null; then
		echo "a write to the read-only device succeeded"
		return 1
	fi
	cmp "$DEV_PATH" /tmp/ro.img
	stop_device ro
	rm -f /tmp/ro.img
}

# kill -9 of the server during fio's write phase, `berth block recover`, and fio's
# verification finds every block it wrote.
block_recovery() {
	truncate -s 128M /tmp/rec.img
	start_device rec /tmp/rec.img --ublk-transport zero-copy
	local id=$DEV_ID dev=$DEV_PATH
	fio --name=rec --filename="$dev" --direct=1 --ioengine=libaio --iodepth=32 \
		--rw=randwrite --bs=4k --size=24M --verify=crc32c --verify_fatal=1 --do_verify=1 \
		--rate_iops=1000 --randseed=11 --output=/tmp/rec.fio >/dev/null 2>&1 &
	local fio_pid=$!
	# The rate bound keeps the write phase (6144 writes) running for about 6 s, so the
	# kill below always lands in the middle of it.
	sleep 2
	if ! kill -0 "$fio_pid" 2>/dev/null; then
		local early=0
		wait "$fio_pid" || early=$?
		echo "fio ended (status $early) before the server was killed:"
		tail -n 30 /tmp/rec.fio
		return 1
	fi
	kill -9 "$DEV_PID"
	wait "$DEV_PID" 2>/dev/null || true
	"$BERTH" block list | sed 's/^/@@info /'
	"$BERTH" block list --json | grep -q '"state":"quiesced"'
	"$BERTH" block recover "$id" --metrics-file /tmp/rec2.prom --metrics-interval 1 \
		>/tmp/rec2.out 2>/tmp/rec2.log &
	DEV_PID=$!
	local rc=0
	wait "$fio_pid" || rc=$?
	if [ "$rc" != 0 ] || ! grep -q 'err= 0' /tmp/rec.fio; then
		echo "fio failed across the recovery (status $rc):"
		tail -n 30 /tmp/rec.fio
		tail -n 10 /tmp/rec2.log
		return 1
	fi
	grep -E 'write:|read:' /tmp/rec.fio | sed 's/^/@@info /'
	DEV_ID=$id
	stop_device rec2
	rm -f /tmp/rec.img
}

# A berth volume through ublk, its bucket a directory here (file://): mkfs and a tree,
# synced; the server killed with SIGKILL while the filesystem is mounted; `berth block
# recover` brings the same device back and the tree, read through it, checks out; after a
# write and unmount, fsck is clean. The volume then opens from its bucket alone (local
# state thrown away), and a clone of its snapshot serves the same tree and takes writes
# the volume does not see.
block_volume() {
	local location=file:///tmp/bucket/vol clone=file:///tmp/bucket/clone i
	rm -rf /tmp/bucket /tmp/vol-local /tmp/vol-fresh /tmp/clone-local
	mkdir -p /tmp/bucket
	"$BERTH" volume create "$location" --size 128M >/dev/null
	start_device vol "volume:$location" --volume-dir /tmp/vol-local --ublk-transport zero-copy
	local id=$DEV_ID dev=$DEV_PATH
	e2 mkfs.ext4 -q -F "$dev"
	mount -t ext4 "$dev" /mnt/blk
	mkdir /mnt/blk/tree
	for i in $(seq 1 40); do head -c $((i * 12011)) /dev/urandom >"/mnt/blk/tree/f$i"; done
	head -c 6M /dev/urandom >/mnt/blk/tree/big
	(cd /mnt/blk/tree && find . -type f -print0 | sort -z | xargs -0 sha256sum) >/tmp/vol.sums
	sync
	kill -9 "$DEV_PID"
	wait "$DEV_PID" 2>/dev/null || true
	"$BERTH" block list --json | grep -q '"state":"quiesced"'
	"$BERTH" block recover "$id" >/tmp/vol2.out 2>/tmp/vol2.log &
	DEV_PID=$!
	DEV_ID=$id
	echo 3 >/proc/sys/vm/drop_caches
	(cd /mnt/blk/tree && sha256sum -c --quiet /tmp/vol.sums)
	head -c 1M /dev/urandom >/mnt/blk/after-recovery
	sha256sum </mnt/blk/after-recovery >/tmp/after.sum
	umount /mnt/blk
	e2 e2fsck -fn "$dev" >/dev/null
	stop_device vol2
	"$BERTH" volume snapshot "$location" first >/dev/null
	"$BERTH" volume clone "$location" "$clone" --snapshot first >/dev/null
	start_device vol-fresh "volume:$location" --volume-dir /tmp/vol-fresh
	e2 e2fsck -fn "$DEV_PATH" >/dev/null
	mount -t ext4 -o ro "$DEV_PATH" /mnt/blk
	(cd /mnt/blk/tree && sha256sum -c --quiet /tmp/vol.sums)
	[ "$(sha256sum </mnt/blk/after-recovery)" = "$(cat /tmp/after.sum)" ]
	umount /mnt/blk
	stop_device vol-fresh
	start_device clone "volume:$clone" --volume-dir /tmp/clone-local
	mount -t ext4 "$DEV_PATH" /mnt/blk
	(cd /mnt/blk/tree && sha256sum -c --quiet /tmp/vol.sums)
	echo clone >/mnt/blk/written-by-clone
	umount /mnt/blk
	stop_device clone
	start_device vol-again "volume:$location" --volume-dir /tmp/vol-fresh
	mount -t ext4 -o ro "$DEV_PATH" /mnt/blk
	[ ! -e /mnt/blk/written-by-clone ]
	umount /mnt/blk
	stop_device vol-again
	echo "@@info $(wc -l </tmp/vol.sums) files survived kill -9 + recover, the bucket alone and a clone"
	rm -rf /tmp/bucket /tmp/vol-local /tmp/vol-fresh /tmp/clone-local
}

# Every thread runs under a seccomp filter in kill mode (the default, as in every block
# check: a call outside the list kills berth, which then does not exit 0): the queue
# threads under the ublk queue filter and without capabilities, the device's control
# thread under the ublk control filter, main under the block engine's, the signal thread
# under the ublk signals filter (it stops the devices through a control ring it set up
# before). The workload touches every request type; SIGTERM ends it.
block_seccomp() {
	truncate -s 64M /tmp/sc.img
	start_device sc /tmp/sc.img --queues 2 --seccomp kill
	local tid name queues=0 others=0
	for tid in /proc/"$DEV_PID"/task/*; do
		name=$(cat "$tid/comm")
		# The kernel's io_uring workers (iou-wrk-*, iou-sqp-*) run no code of berth's.
		case $name in iou-*) continue ;; esac
		if ! grep -q '^Seccomp:[[:space:]]*2' "$tid/status"; then
			echo "thread $name (${tid##*/}) runs without a seccomp filter"
			return 1
		fi
		if [ "$(awk '/^CapEff:/ { print $2 }' "$tid/status")" = 0000000000000000 ]; then
			queues=$((queues + 1))
		else
			others=$((others + 1))
		fi
	done
	echo "@@info $queues confined queue thread(s) without capabilities, $others other confined thread(s)"
	[ "$queues" -ge 2 ] && [ "$others" -ge 2 ]
	filesystem_roundtrip "$DEV_PATH"
	fio_verify_device "$DEV_PATH" 4M
	blkdiscard -o 0 -l 1M "$DEV_PATH"
	blkdiscard -z -o 1M -l 1M "$DEV_PATH"
	sync "$DEV_PATH"
	# SIGTERM: the signal thread stops the device under its filter. Exit status 0, not
	# 159 (SIGSYS), and the device is gone.
	kill -TERM "$DEV_PID"
	local rc=0
	wait "$DEV_PID" || rc=$?
	[ "$rc" = 0 ] || { echo "berth exited with $rc after SIGTERM:"; tail -n 20 /tmp/sc.log; return 1; }
	grep -q "Received SIGTERM; stopping devices \[$DEV_ID\]" /tmp/sc.log
	for _ in $(seq 50); do
		[ -e "$DEV_PATH" ] || break
		sleep 0.1
	done
	[ ! -e "$DEV_PATH" ] || { echo "$DEV_PATH is still there after SIGTERM"; return 1; }
	rm -f /tmp/sc.img
}

# SIGTERM while a volume's bucket does not answer (its open is retried for up to a minute)
# ends `berth block add` at once, with exit status 0 and no device made.
block_volume_sigterm() {
	reset_devices
	# The S3 client needs trusted CA certificates to exist, though it speaks plain HTTP here:
	# the host's bundle is in /test.
	SSL_CERT_FILE=/test/ca-certificates.crt \
		RUST_LOG=info AWS_ENDPOINT=http://127.0.0.1:1 AWS_ALLOW_HTTP=true AWS_REGION=us-east-1 \
		AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing \
		"$BERTH" block add volume:s3://nobody-answers/vol --volume-dir /tmp/sigterm-vol \
		>/tmp/sigterm.out 2>/tmp/sigterm.log &
	local pid=$! rc=0
	for _ in $(seq 300); do
		grep -q retrying /tmp/sigterm.log && break
		kill -0 "$pid" 2>/dev/null || break
		sleep 0.1
	done
	grep -q retrying /tmp/sigterm.log || {
		echo "the bucket was not retried:"
		tail -n 20 /tmp/sigterm.log
		return 1
	}
	kill -TERM "$pid"
	for _ in $(seq 50); do
		kill -0 "$pid" 2>/dev/null || break
		sleep 0.1
	done
	if kill -0 "$pid" 2>/dev/null; then
		echo "still opening 5 s after SIGTERM:"
		tail -n 20 /tmp/sigterm.log
		kill -9 "$pid"
		return 1
	fi
	wait "$pid" || rc=$?
	[ "$rc" = 0 ] || {
		echo "berth exited with $rc:"
		tail -n 20 /tmp/sigterm.log
		return 1
	}
	grep -q "Stopping before" /tmp/sigterm.log
	! grep -q '^ublk device' /tmp/sigterm.out
	rm -rf /tmp/sigterm-vol
}

# A 4 GiB ext4 image built on the host with `berth image build --block`, fetched lazily
# from the host (its store is a virtio-fs share served by the host's berth) with an
# overlay for writes: the files the host put in read back with their checksums, a write
# survives a restart of the device, fsck is clean.
block_lazy_image() {
	mkdir -p /mnt/store
	mount -t virtiofs store /mnt/store
	start_device lazy /mnt/store/img --overlay /tmp/lazy.ovl --cache-dir /tmp/lazy-cache
	[ "$(blockdev --getsize64 "$DEV_PATH")" = 4294967296 ]
	mount -t ext4 "$DEV_PATH" /mnt/blk || {
		tail -n 20 /tmp/lazy.log
		dmesg | tail -n 10
		return 1
	}
	(cd /mnt/blk && sha256sum -c --quiet /test/tree.sums)
	echo "written in the guest" >/mnt/blk/from-guest
	umount /mnt/blk
	e2 e2fsck -fn "$DEV_PATH" >/dev/null
	stop_device lazy
	start_device lazy /mnt/store/img --overlay /tmp/lazy.ovl --cache-dir /tmp/lazy-cache
	mount -t ext4 -o ro "$DEV_PATH" /mnt/blk
	[ "$(cat /mnt/blk/from-guest)" = "written in the guest" ]
	umount /mnt/blk
	sleep 1.2
	echo "@@info fetched $(metric /tmp/lazy.prom berth_cache_chunks_fetched_total) chunks, cache hits/misses $(metric /tmp/lazy.prom berth_block_cache_hits_total)/$(metric /tmp/lazy.prom berth_block_cache_misses_total)"
	stop_device lazy
}

# A read waiting for its chunk holds up no other read of its queue: the image's blob comes
# over HTTP from a server in the guest (slow-http.pl) that, once told to, answers each GET
# only after 6 s. With one queue, a read of a file whose chunk is not fetched yet waits
# for the server, and meanwhile a read of a block fetched before comes back at once.
# Then the slow read returns the file's data.
block_read_overtakes_fetch() {
	mountpoint -q /mnt/store || { mkdir -p /mnt/store; mount -t virtiofs store /mnt/store; }
	ip link set lo up
	rm -f /tmp/http-slow /tmp/http-slow.seen /tmp/http-ready
	perl /test/slow-http.pl /mnt/store/img 8400 /tmp/http-slow 6 /tmp/http-ready \
		2>/tmp/http.log &
	local server=$!
	for _ in $(seq 100); do
		[ -e /tmp/http-ready ] && break
		sleep 0.1
	done
	[ -e /tmp/http-ready ] || { echo "the HTTP server did not start:"; cat /tmp/http.log; return 1; }
	# The HTTP client wants trusted roots even for plain HTTP (see block_volume_sigterm).
	SSL_CERT_FILE=/test/ca-certificates.crt start_device overtake /mnt/store/img \
		--readonly --queues 1 --readahead 0 \
		--cache-dir /tmp/overtake-cache --backend http://127.0.0.1:8400
	# The mount fetches the metadata, the superblock's chunk among it.
	mount -t ext4 -o ro,noload "$DEV_PATH" /mnt/blk
	dd if="$DEV_PATH" of=/tmp/first.4k bs=4k count=1 iflag=direct status=none
	touch /tmp/http-slow
	# 2 MiB into the file: far from the metadata the mount read.
	dd if=/mnt/blk/big-7 of=/tmp/slow.out bs=64k count=1 skip=32 iflag=direct status=none &
	local slow=$!
	for _ in $(seq 100); do
		[ -e /tmp/http-slow.seen ] && break
		sleep 0.1
	done
	[ -e /tmp/http-slow.seen ] || { echo "the read of big-7 sent no GET"; return 1; }
	local started ended ms
	started=$(date +%s%N)
	dd if="$DEV_PATH" of=/tmp/again.4k bs=4k count=1 iflag=direct status=none
	ended=$(date +%s%N)
	ms=$(((ended - started) / 1000000))
	echo "@@info a read of a fetched block took $ms ms while another waited 6 s for its GET"
	kill -0 "$slow" 2>/dev/null || { echo "the read waiting for the slow server was done first"; return 1; }
	[ "$ms" -lt 3000 ] || { echo "the read of a fetched block waited for the fetch"; return 1; }
	cmp /tmp/first.4k /tmp/again.4k
	rm -f /tmp/http-slow
	wait "$slow"
	# The slow read brought the file's bytes, and the whole file reads back right.
	dd if=/mnt/blk/big-7 bs=64k count=1 skip=32 status=none | cmp - /tmp/slow.out
	(cd /mnt/blk && grep ' \./big-7$' /test/tree.sums | sha256sum -c --quiet)
	umount /mnt/blk
	stop_device overtake
	kill "$server"
	wait "$server" || true
	rm -rf /tmp/overtake-cache /tmp/first.4k /tmp/again.4k /tmp/slow.out
}

# Reading 100 MiB of the 4 GiB image fetches at most 110 MiB of it.
block_lazy_fetch_ratio() {
	mountpoint -q /mnt/store || { mkdir -p /mnt/store; mount -t virtiofs store /mnt/store; }
	start_device ratio /mnt/store/img --readonly --cache-dir /tmp/ratio-cache --readahead 0
	dd if="$DEV_PATH" of=/dev/null bs=1M count=100 skip=1024 iflag=direct status=none
	sleep 1.5
	local chunks chunk_size fetched
	chunks=$(metric /tmp/ratio.prom berth_cache_chunks_fetched_total)
	chunk_size=$(tr -d ' \n' </mnt/store/img/manifest.json | grep -o '"chunk_size":[0-9]*' | cut -d: -f2)
	[ -n "$chunks" ] && [ -n "$chunk_size" ]
	fetched=$((chunks * chunk_size))
	echo "@@info read 104857600 bytes, fetched $fetched ($chunks chunks of $chunk_size)"
	[ "$fetched" -ge 104857600 ] && [ "$fetched" -le 115343360 ]
	stop_device ratio
	umount /mnt/store
}

# dm_table NAME TABLE: loads TABLE into device-mapper device NAME and resumes it, creating
# the device first. The device is suspended without freezing the filesystem on it
# (--nolockfs), so switching tables writes back nothing the filesystem still holds.
dmsetup() { DM_DISABLE_UDEV=1 e2 dmsetup "$@"; }
dm_table() {
	local name=$1 table=$2
	if ! dmsetup info "$name" >/dev/null 2>&1; then
		dmsetup create "$name" --table "$table"
		return
	fi
	dmsetup suspend --nolockfs "$name"
	dmsetup load "$name" --table "$table"
	dmsetup resume "$name"
}

# Whether device-mapper's flakey target is there (a module loaded at boot, or built in).
have_dm_flakey() {
	[ -d /sys/module/dm_flakey ] || dmsetup targets 2>/dev/null | grep -q '^flakey'
}

# The /dev node of device-mapper device NAME.
dm_node() {
	local sys
	for sys in /sys/block/dm-*; do
		if [ "$(cat "$sys/dm/name" 2>/dev/null)" = "$1" ]; then
			echo "/dev/${sys##*/}"
			return 0
		fi
	done
	echo "no device-mapper device named $1" >&2
	return 1
}

# A power cut of the disk holding a volume's local state (log and cache). That disk is
# ext4 on dm-flakey on a loop device, the bucket a directory elsewhere (file://). The
# volume, served through ublk with uploads held back (so the log is the only home of what
# the guest writes), gets an ext4 filesystem and a tree, synced (a FLUSH: berth syncs the
# log), then more files written with O_DIRECT and never synced (acknowledged, never
# flushed), with the volume's filesystem committing no journal on its own. The cut:
# dm-flakey drops every write from then on (as the kernel's power-fail tests do), berth
# is killed with SIGKILL, the ublk device goes with the volume's filesystem still mounted
# (so none of its cached state reaches the volume), and the local filesystem is unmounted
# (its writeback lost) and the page cache dropped. After the flakey device passes writes
# again and the local filesystem is mounted (journal replay), berth opens the volume from
# that state: it must replay log records, fewer than it had (the unflushed tail is gone),
# fsck of the volume must be clean, and every synced file must read back with its
# checksum. Unsynced files may or may not be there.
block_power_cut() {
	local location=file:///tmp/pc-bucket/vol local_mnt=/mnt/pc-local i loop sectors dm
	local pass fail
	rm -rf /tmp/pc-bucket /tmp/pc-disk.img
	mkdir -p /tmp/pc-bucket "$local_mnt"
	truncate -s 160M /tmp/pc-disk.img
	loop=$(losetup -f)
	losetup "$loop" /tmp/pc-disk.img
	sectors=$(blockdev --getsz "$loop")
	pass="0 $sectors flakey $loop 0 3600 0"
	fail="0 $sectors flakey $loop 0 0 3600 1 drop_writes"
	dm_table pc-local "$pass"
	dm=$(dm_node pc-local)
	e2 mkfs.ext4 -q -F "$dm"
	# No journal commit on a timer here either: the log's unsynced tail stays in the page
	# cache until the cut, instead of reaching the disk when a commit happens to fall
	# between the last write and the cut.
	mount -t ext4 -o commit=3600 "$dm" "$local_mnt"
	"$BERTH" volume create "$location" --size 128M >/dev/null
	local opts=(--volume-dir "$local_mnt/volumes" --upload-interval 3600)
	start_device pc "volume:$location" "${opts[@]}"
	local id=$DEV_ID dev=$DEV_PATH
	# Inode tables initialised now, not by a background thread whose writes would land
	# after the count below.
	e2 mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 "$dev"
	# No journal commit on a timer: what reaches the volume unsynced stays unflushed.
	mount -t ext4 -o commit=3600,noinit_itable "$dev" /mnt/blk
	mkdir -p /mnt/blk/synced/a /mnt/blk/synced/b /mnt/blk/unsynced
	for i in $(seq 1 30); do head -c $((i * 9973 + 1)) /dev/urandom >"/mnt/blk/synced/a/f$i"; done
	for i in $(seq 1 10); do head -c $((i * 65536)) /dev/urandom >"/mnt/blk/synced/b/g$i"; done
	head -c 4M /dev/urandom >/mnt/blk/synced/big
	(cd /mnt/blk/synced && find . -type f -print0 | sort -z | xargs -0 sha256sum) >/tmp/pc.sums
	sync
	# Acknowledged by berth, never flushed.
	for i in $(seq 1 8); do
		dd if=/dev/urandom of="/mnt/blk/unsynced/u$i" bs=256k count=2 oflag=direct status=none
	done
	# Every completed write, discard and write-zeroes request is a log record. The
	# metrics file is rewritten every second: the count is taken once two rewrites agree.
	local op records=-1 previous count
	for i in $(seq 1 20); do
		previous=$records
		sleep 1.2
		records=0
		for op in write discard write_zeroes; do
			count=$(metric /tmp/pc.prom "berth_block_requests_total{device=\"ublkb$id\",op=\"$op\"}")
			records=$((records + ${count:-0}))
		done
		[ "$records" -ne "$previous" ] || break
	done
	# The cut: writes to the local disk vanish from now on; berth dies.
	dm_table pc-local "$fail"
	kill -9 "$DEV_PID"
	wait "$DEV_PID" 2>/dev/null || true
	# The old device goes with its filesystem mounted: deleting it fails the I/O the
	# filesystem still has, so unmounting it sends nothing to the volume.
	"$BERTH" block del "$id" >/tmp/pc-del.out 2>&1 &
	local del_pid=$!
	sleep 1
	if ! timeout 120 umount /mnt/blk; then
		echo "@@info the filesystem of the deleted device did not unmount in 120 s: detached"
		umount -l /mnt/blk || true
	fi
	wait "$del_pid" || { cat /tmp/pc-del.out; return 1; }
	[ ! -b "$dev" ] || { echo "$dev is still there after the cut"; return 1; }
	umount "$local_mnt"
	blockdev --flushbufs "$dm"
	echo 3 >/proc/sys/vm/drop_caches
	# Power back: the local filesystem replays its journal.
	dm_table pc-local "$pass"
	mount -t ext4 "$dm" "$local_mnt"
	start_device pc2 "volume:$location" "${opts[@]}"
	local opened replayed
	opened=$(grep -m1 'Opened the volume' /tmp/pc2.log || true)
	echo "@@info ${opened##*: }"
	replayed=$(echo "$opened" | grep -o 'replayed=[0-9]*' | cut -d= -f2)
	echo "@@info $records log records before the cut, $replayed replayed after it"
	if [ "${replayed:-0}" -le 0 ]; then
		echo "berth replayed no log records after the power cut: $opened"
		return 1
	fi
	# The unflushed tail never reached the local disk: the cut took something.
	if [ "$replayed" -ge "$records" ]; then
		echo "all $records log records survived: the power cut dropped nothing"
		return 1
	fi
	e2 e2fsck -fn "$DEV_PATH" >/tmp/pc-fsck.out 2>&1 || {
		echo "fsck after the power cut:"
		tail -n 30 /tmp/pc-fsck.out
		return 1
	}
	mount -t ext4 "$DEV_PATH" /mnt/blk
	local survived=0
	for i in $(seq 1 8); do [ -s "/mnt/blk/unsynced/u$i" ] && survived=$((survived + 1)); done
	echo "@@info $(wc -l </tmp/pc.sums) synced files checked; $survived of 8 unsynced files there"
	(cd /mnt/blk/synced && sha256sum -c --quiet /tmp/pc.sums)
	echo after >/mnt/blk/after-power-cut
	umount /mnt/blk
	e2 e2fsck -fn "$DEV_PATH" >/dev/null
	stop_device pc2
	umount "$local_mnt"
	dmsetup remove pc-local
	losetup -d "$loop"
	rm -rf /tmp/pc-bucket /tmp/pc-disk.img
}
