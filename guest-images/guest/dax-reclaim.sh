# shellcheck shell=bash
# Guest side of the DAX reclaim checks (dax-reclaim-tier.sh); sourced after
# checks.sh, whose check/wait_for_file helpers it uses.

# Reads $d/loop-file through the window (dax=always: read() copies from the
# window) over and over while the host truncates and rewrites it, until the host
# says it is done ($d/loop-done holds the file's final size). Every byte read
# must be the host's pattern at that offset ($d/dax-pattern, which has no zero
# byte) or zero (past an end the guest's cached size did not know of yet): never
# a byte that was never in the file. Then the file must read back as exactly the
# pattern up to the final size.
dax_truncate_loop() {
	local d=$1
	cp "$d/dax-pattern" /tmp/dax-pattern
	touch "$d/loop-start"
	perl /test/dax-reclaim-read.pl "$d/loop-file" /tmp/dax-pattern "$d/loop-done"
	local size
	# loop-done is padded to a whole page: QEMU 11.1 cannot map a shorter file.
	read -r size <"$d/loop-done"
	# The guest's cached attributes expire within a second (cache=auto).
	sleep 2
	[ "$(stat -c %s "$d/loop-file")" = "$size" ]
	head -c "$size" /tmp/dax-pattern | cmp - "$d/loop-file"
	rm /tmp/dax-pattern
	echo "@@info final size $size matches the host's pattern"
}

# Checksums every file under $d/ws (more bytes than the window holds, so the
# guest has to reclaim window ranges: REMOVEMAPPING under load) against the
# host's list, which travels beside this script (/test/ws.sha256): a file that
# small cannot be read through QEMU 11.1's window.
dax_working_set() {
	local d=$1
	(cd "$d/ws" && sha256sum -c --quiet /test/ws.sha256)
	echo "@@info $(du -sh "$d/ws" | cut -f1) checksummed through a $(dmesg | grep -oE 'Cache len: 0x[0-9a-f]+' | tail -n1)"
}
