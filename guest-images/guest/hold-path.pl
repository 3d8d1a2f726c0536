#!/usr/bin/perl
# Pins an inode with an O_PATH descriptor, for the migration checks that need the guest
# to hold an inode without an open file: opening with O_PATH sends the daemon no
# FUSE_OPEN, so it holds the inode only as the guest looked it up.
#
#   hold-path.pl FILE READY GO   open FILE with O_PATH, write the descriptor's number to
#                                READY, hold it until GO exists
# Exits 2 with the error when FILE cannot be opened.
use strict;
use warnings;
use POSIX ();

# O_PATH, which Fcntl does not export; this value on x86-64 and most architectures.
use constant O_PATH => 010000000;

my ($file, $ready, $go) = @ARGV;
defined $go or die "usage: hold-path.pl FILE READY GO\n";
my $fd = POSIX::open($file, O_PATH);
defined $fd or do { print STDERR "open $file with O_PATH: $!\n"; exit 2 };
open(my $mark, '>', "$ready.tmp") or do { print STDERR "create $ready: $!\n"; exit 2 };
print $mark "$fd\n";
close($mark);
rename("$ready.tmp", $ready) or do { print STDERR "rename to $ready: $!\n"; exit 2 };
select(undef, undef, undef, 0.05) until -e $go;
exit 0;
