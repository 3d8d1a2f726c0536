#!/usr/bin/perl
# dax-reclaim-read.pl FILE PATTERN STOP: reads FILE over and over until STOP
# exists; every byte read must equal PATTERN's byte at that offset (PATTERN has
# no zero byte) or be zero (past an end the reader's cached size did not know of
# yet). Prints a summary as an @@info line; dies naming the first foreign byte.
use strict;
use warnings;

my ($file, $pattern, $stop) = @ARGV;
open(my $pf, "<", $pattern) or die "$pattern: $!\n";
binmode $pf;
my $p = do { local $/; <$pf> };
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
		length($want) == $n or die "read past the pattern's end at $off\n";
		if ($buf ne $want) {
			# 1 where the byte differs from the pattern, 1 where it is not zero.
			(my $differs = $buf ^ $want) =~ tr/\x01-\xff/\x01/;
			(my $nonzero = $buf) =~ tr/\x01-\xff/\x01/;
			my $foreign = index($differs & $nonzero, "\x01");
			die sprintf("the byte at %#x was never in the file\n", $off + $foreign) if $foreign >= 0;
			$zeroed++;
		}
		$chunks++;
		$off += $n;
	}
	close $f;
	$passes++;
}
$passes > 0 or die "no pass over the file\n";
print '@@info ', "$passes passes, $chunks chunks of 1 MiB read, $zeroed with zeros past an end\n";
