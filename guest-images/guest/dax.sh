# shellcheck shell=bash
# Guest side of the per-file DAX checks (dax-tier.sh), sourced after checks.sh.
# The share is served with --dax-window 1G --dax-policy size:2M, so files of at
# least 2 MiB go through the window and smaller ones through FUSE READ/WRITE.
# Every DAX file here is a whole number of 2 MiB ranges: QEMU 11.1 refuses to
# map a range that reaches past a file's end.

# The tools image has no locales; perl would warn about that on every call.
export PERL_BADLANG=0

# Mounts tag $1 with dax=inode: the guest offers FUSE_HAS_INODE_DAX and maps
# exactly the files whose attributes carry FUSE_ATTR_DAX.
mount_dax_inode_share() {
	mkdir -p "/mnt/$1"
	mount -t virtiofs "$1" "/mnt/$1" -o dax=inode
	grep " /mnt/$1 " /proc/mounts >/tmp/mount-line
	echo "@@info mounted: $(cat /tmp/mount-line)"
	grep 'dax=inode' /tmp/mount-line >/dev/null
}

# In $1: statx reports STATX_ATTR_DAX on exactly the files of at least 2 MiB,
# and every file (through the window or not) reads what the host wrote.
dax_policy_files() {
	local d=$1 got want
	got=$(cd "$d" && perl /test/dax.pl attr small-4k mid-1M below-2M exact-2M big-8M big-256M fio-64M)
	want="small-4k plain
mid-1M plain
below-2M plain
exact-2M dax
big-8M dax
big-256M dax
fio-64M dax"
	if [ "$got" != "$want" ]; then
		echo "statx says:"
		echo "$got"
		false
	fi
	echo "@@info statx: $(echo "$got" | tr '\n' ';')"
	(cd "$d" && sha256sum -c --quiet host.sums)
}

# Mounts tag $1 (served with --dax-policy xattr) with dax=inode: statx reports
# DAX on the file the host marked with user.berth.dax=1 only, and both files
# read what the host wrote (the marked one through the window).
dax_xattr_files() {
	local d=/mnt/$1 got
	mount_dax_inode_share "$1"
	got=$(cd "$d" && perl /test/dax.pl attr marked-4M unmarked-4M)
	if [ "$got" != "marked-4M dax
unmarked-4M plain" ]; then
		echo "statx says:"
		echo "$got"
		false
	fi
	(cd "$d" && sha256sum -c --quiet host.sums)
}

# Maps $1/big-8M MAP_SHARED, stores 8 MiB of random data through the mapping,
# msyncs, and leaves the data's sha256 in mmap.sha256 for the host.
dax_mmap_write() {
	local d=$1
	head -c 8M /dev/urandom >/tmp/mmap-src
	perl /test/dax.pl mmap-fill "$d/big-8M" /tmp/mmap-src
	sha256sum </tmp/mmap-src | cut -c1-64 >"$d/mmap.sha256"
	rm /tmp/mmap-src
}

# fio with crc32c verification over a DAX file the host preallocated (a file
# fio lays out itself starts empty and so is not DAX under size:2M): once with
# read/write, once through fio's own MAP_SHARED mappings.
dax_fio_verify() {
	local d=$1 engine
	for engine in psync mmap; do
		fio --name="dax-$engine" --filename="$d/fio-64M" --size=64M --bs=64k \
			--rw=randwrite --ioengine="$engine" --fallocate=none --norandommap \
			--verify=crc32c --do_verify=1 --verify_fatal=1 >/tmp/fio.out 2>&1 ||
			{
				cat /tmp/fio.out
				false
			}
		if grep 'verify: bad' /tmp/fio.out >/dev/null; then
			cat /tmp/fio.out
			false
		fi
		grep -E 'IOPS' /tmp/fio.out | sed "s/^/@@info $engine: /"
	done
	[ "$(stat -c %s "$d/fio-64M")" = $((64 << 20)) ]
	[ "$(perl /test/dax.pl attr "$d/fio-64M")" = "$d/fio-64M dax" ]
}

# Writes 256 MiB of random data into the preallocated $1/big-256M (inside its
# size: DAX stores, no FUSE_WRITE), reads it back after dropping the guest's
# caches and leaves its sha256 in 256M.sha256 for the host.
dax_write_256m() {
	local d=$1 sum
	# The guest's /dev has no /dev/fd for a process substitution: a fifo instead.
	rm -f /tmp/256M.fifo
	mkfifo /tmp/256M.fifo
	sha256sum </tmp/256M.fifo >/tmp/256M.sum &
	head -c 256M /dev/urandom | tee /tmp/256M.fifo |
		dd of="$d/big-256M" bs=1M conv=notrunc iflag=fullblock status=none
	wait $!
	sum=$(cut -c1-64 /tmp/256M.sum)
	sync
	echo 3 >/proc/sys/vm/drop_caches
	[ "$(sha256sum <"$d/big-256M" | cut -c1-64)" = "$sum" ]
	echo "$sum" >"$d/256M.sha256"
}

# Guest A of the two-guest pair (each guest on its own berth, one host
# directory, both dax=always): once guest B has mapped $1/pair-2M, stores a
# text through A's own MAP_SHARED mapping, never msyncs, and keeps the mapping
# until B has seen the text in its mapping.
dax_pair_poke() {
	local d=$1
	for _ in $(seq 1800); do
		[ -e "$d/b-mapped" ] && break
		sleep 0.1
	done
	[ -e "$d/b-mapped" ]
	perl /test/dax.pl mmap-poke "$d/pair-2M" 4096 "written by guest A" "$d/b-saw" 120
}

# Guest B: maps $1/pair-2M read-only, says so, and watches the mapping until A's
# text appears (both map the host's page cache: one copy of the data).
dax_pair_watch() {
	local d=$1
	perl /test/dax.pl mmap-watch "$d/pair-2M" 4096 "written by guest A" 120 "$d/b-mapped"
	touch "$d/b-saw"
}
