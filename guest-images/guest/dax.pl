#!/usr/bin/perl
# DAX helpers for the guest checks, with nothing but perl-base (the tools image
# has no compiler and no statx-aware stat): raw syscalls on x86_64.
#
#   dax.pl attr FILE...        prints "FILE dax" or "FILE plain" per file, from
#                              statx's STATX_ATTR_DAX (fails when the kernel
#                              does not report the attribute at all)
#   dax.pl mmap-fill FILE SRC  maps FILE (MAP_SHARED, its whole size), copies
#                              SRC into the mapping with read(2), msync(MS_SYNC)
#   dax.pl mmap-watch FILE OFFSET EXPECT SECONDS READY
#                              maps FILE read-only, reads the bytes at OFFSET
#                              once (they must not be EXPECT yet), creates the
#                              file READY, then polls the mapping until they
#                              read EXPECT (exit 0) or SECONDS pass (exit 1)
#   dax.pl mmap-poke FILE OFFSET TEXT UNTIL SECONDS
#                              maps FILE (MAP_SHARED), stores TEXT at OFFSET
#                              through the mapping, and keeps it mapped, never
#                              msynced, until the file UNTIL exists
use strict;
use warnings;
use Fcntl qw(O_RDONLY O_RDWR);

my %nr = (read => 0, write => 1, mmap => 9, munmap => 11, msync => 26, statx => 332);
use constant {
	AT_FDCWD => -100, STATX_BASIC_STATS => 0x7ff, STATX_ATTR_DAX => 0x200000,
	PROT_READ => 1, PROT_WRITE => 2, MAP_SHARED => 1, MS_SYNC => 4,
};

sub fail { print STDERR "dax.pl: @_\n"; exit 2 }

# The statx buffer: stx_attributes at offset 8, stx_size at 40,
# stx_attributes_mask at 56 (all u64).
sub statx_of {
	my ($path) = @_;
	my $buf = "\0" x 256;
	syscall($nr{statx}, AT_FDCWD, $path, 0, STATX_BASIC_STATS, $buf) == 0
		or fail "statx $path: $!";
	my ($attributes, $size, $mask) =
		(unpack('Q<', substr($buf, 8, 8)), unpack('Q<', substr($buf, 40, 8)), unpack('Q<', substr($buf, 56, 8)));
	return ($attributes, $size, $mask);
}

# Maps $len bytes of $fd; returns the address.
sub map_file {
	my ($fd, $len, $prot) = @_;
	my $addr = syscall($nr{mmap}, 0, $len, $prot, MAP_SHARED, $fd, 0);
	fail "mmap: $!" if $addr == -1;
	return $addr;
}

my $cmd = shift @ARGV // fail 'no command';
if ($cmd eq 'attr') {
	for my $path (@ARGV) {
		my ($attributes, undef, $mask) = statx_of($path);
		fail "the kernel does not report STATX_ATTR_DAX for $path" unless $mask & STATX_ATTR_DAX;
		print "$path ", ($attributes & STATX_ATTR_DAX ? 'dax' : 'plain'), "\n";
	}
} elsif ($cmd eq 'mmap-fill') {
	my ($path, $src) = @ARGV;
	my (undef, $len) = statx_of($path);
	sysopen(my $fh, $path, O_RDWR) or fail "open $path: $!";
	sysopen(my $in, $src, O_RDONLY) or fail "open $src: $!";
	my $addr = map_file(fileno($fh), $len, PROT_READ | PROT_WRITE);
	my $done = 0;
	while ($done < $len) {
		my $chunk = $len - $done > (1 << 20) ? 1 << 20 : $len - $done;
		my $n = syscall($nr{read}, fileno($in), $addr + $done, $chunk);
		fail "read $src into the mapping: $!" if $n < 0;
		fail "$src is shorter than $path ($done of $len bytes)" if $n == 0;
		$done += $n;
	}
	syscall($nr{msync}, $addr, $len, MS_SYNC) == 0 or fail "msync: $!";
	syscall($nr{munmap}, $addr, $len) == 0 or fail "munmap: $!";
} elsif ($cmd eq 'mmap-poke') {
	my ($path, $offset, $text, $until, $seconds) = @ARGV;
	# Numbers, not strings: syscall passes a string argument as a pointer.
	$offset += 0;
	my (undef, $len) = statx_of($path);
	sysopen(my $fh, $path, O_RDWR) or fail "open $path: $!";
	my $addr = map_file(fileno($fh), $len, PROT_READ | PROT_WRITE);
	# read(2) from a pipe holding the text stores it at the mapped address.
	pipe(my $r, my $w) or fail "pipe: $!";
	syswrite($w, $text) == length($text) or fail "pipe write: $!";
	close $w;
	my $n = syscall($nr{read}, fileno($r), $addr + $offset, length($text));
	fail "store through the mapping: $!" unless $n == length($text);
	print "stored\n";
	my $deadline = time + $seconds;
	until (-e $until) {
		fail "$until did not appear in $seconds s" if time > $deadline;
		select(undef, undef, undef, 0.2);
	}
} elsif ($cmd eq 'mmap-watch') {
	my ($path, $offset, $expect, $seconds, $ready) = @ARGV;
	$offset += 0;
	my $len = length($expect);
	my (undef, $size) = statx_of($path);
	sysopen(my $fh, $path, O_RDONLY) or fail "open $path: $!";
	my $addr = map_file(fileno($fh), $size, PROT_READ);
	pipe(my $r, my $w) or fail "pipe: $!";
	# write(2) from the mapping into a pipe reads the mapped bytes.
	my $peek = sub {
		my $n = syscall($nr{write}, fileno($w), $addr + $offset, $len);
		fail "read the mapping: $!" unless $n == $len;
		sysread($r, my $seen, $len) == $len or fail "pipe read: $!";
		return $seen;
	};
	fail "the mapping shows '$expect' before the other side wrote it" if $peek->() eq $expect;
	open(my $signal, '>', $ready) or fail "create $ready: $!";
	close $signal;
	my $deadline = time + $seconds;
	while (1) {
		my $seen = $peek->();
		if ($seen eq $expect) { print "seen\n"; exit 0 }
		if (time > $deadline) { print "still '$seen'\n"; exit 1 }
		select(undef, undef, undef, 0.05);
	}
} else {
	fail "unknown command $cmd";
}
