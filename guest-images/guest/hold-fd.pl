#!/usr/bin/perl
# Takes a copy of another process's open descriptor and holds it, for the checks that
# need a descriptor to outlive its process (pidfd_open(2) and pidfd_getfd(2); root).
#
#   hold-fd.pl PID FD READY GO   copy PID's FD, create READY, hold it until GO exists
# Exits 2 with the error when the copy cannot be made.
use strict;
use warnings;

# The same numbers on every architecture (the syscall table was unified at 403).
use constant { SYS_PIDFD_OPEN => 434, SYS_PIDFD_GETFD => 438 };

my ($pid, $fd, $ready, $go) = @ARGV;
defined $go or die "usage: hold-fd.pl PID FD READY GO\n";
my $pidfd = syscall(SYS_PIDFD_OPEN, $pid + 0, 0);
if ($pidfd < 0) { print STDERR "pidfd_open $pid: $!\n"; exit 2 }
my $copy = syscall(SYS_PIDFD_GETFD, $pidfd, $fd + 0, 0);
if ($copy < 0) { print STDERR "pidfd_getfd $pid $fd: $!\n"; exit 2 }
open(my $mark, '>', $ready) or do { print STDERR "create $ready: $!\n"; exit 2 };
close($mark);
select(undef, undef, undef, 0.1) until -e $go;
exit 0;
