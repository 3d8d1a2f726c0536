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
	# shellcheck disable=SC2016
	perl -e '
		use strict;
		my ($file, $pattern, $stop) = @ARGV;
		open(my $pf, "<", $pattern) or die "$pattern: $!\n";
		binmode $pf;
		local $/;
		my $p = <$pf>;
		my ($passes, $chunks, $zeroed) = (0, 0, 0);
		until (-e $stop) {
			open(my $f, "<", $file) or die "$file: $!\n";
			binmode $f;
			my $off = 0;
			while (1) {
				my $n = sysread($f, my $buf, 1 << 20);
				defined $n or die "reading $file at $off: $!\n";
				last if $n == 0;
				my $want = substr($p, $off, $n);
				length($want) == $n or die "read past the pattern at $off\n";
				if ($buf ne $want) {
					# 1 where the byte differs from the pattern, 1 where it is not zero.
					(my $differs = $buf ^ $want) =~ tr/\x01-\xff/\x01/;
					(my $nonzero = $buf) =~ tr/\x01-\xff/\x01/;
					my $foreign = index($differs & $nonzero, "\x01");
					die sprintf("byte at %#x was never in the file\n", $off + $foreign) if $foreign >= 0;
					$zeroed++;
				}
				$chunks++;
				$off += $n;
			}
			close $f;
			$passes++;
		}
		print "@@info $passes passes, $chunks chunks read, $zeroed with zeros past an end\n";
		$passes > 0 or die "no pass over the file\n";
	' "$d/loop-file" /tmp/dax-pattern "$d/loop-done"
	local size
	size=$(cat "$d/loop-done")
	# The guest's cached attributes expire within a second (cache=auto).
	sleep 2
	[ "$(stat -c %s "$d/loop-file")" = "$size" ]
	head -c "$size" /tmp/dax-pattern | cmp - "$d/loop-file"
	rm /tmp/dax-pattern
	echo "@@info final size $size matches the host's pattern"
}

# Checksums every file under $d/ws (more bytes than the window holds, so the
# guest has to reclaim window ranges: REMOVEMAPPING under load) against the
# host's list $d/ws.sha256.
dax_working_set() {
	local d=$1
	(cd "$d/ws" && sha256sum -c --quiet "$d/ws.sha256")
	echo "@@info $(du -sh "$d/ws" | cut -f1) checksummed through a $(dmesg | grep -oE 'Cache len: 0x[0-9a-f]+' | tail -n1)"
}
