#!/usr/bin/perl
# POSIX (fcntl) record locks from the shell, for the lock checks on the guest
# and on the host. flock(1) only covers flock(2); nothing in busybox or
# coreutils takes fcntl locks.
#
#   posix-lock.pl try  FILE r|w START LEN          exit 0: granted (and released), 1: conflict
#   posix-lock.pl hold FILE r|w START LEN READY GO  lock (waiting), create READY, hold until GO exists
#   posix-lock.pl wait FILE r|w START LEN SECONDS   F_SETLKW; exit 0 when granted in time, 1 otherwise
#   posix-lock.pl test FILE r|w START LEN           F_GETLK: prints "unlocked" or "TYPE START LEN PID"
# Any other failure exits 2 with the error.
use strict;
use warnings;
use Fcntl qw(F_GETLK F_SETLK F_SETLKW F_RDLCK F_WRLCK F_UNLCK SEEK_SET O_RDWR);
use POSIX qw(EAGAIN EACCES EINTR);

# struct flock on x86_64: short l_type, short l_whence, (4 bytes padding),
# off_t l_start, off_t l_len, pid_t l_pid, (4 bytes padding).
sub flock_struct { my ($type, $start, $len, $pid) = @_; pack('s s x4 q q l x4', $type, SEEK_SET, $start, $len, $pid // 0) }
sub unpack_flock { my ($type, $whence, $start, $len, $pid) = unpack('s s x4 q q l x4', $_[0]); ($type, $start, $len, $pid) }

my ($op, $file, $kind, $start, $len, @rest) = @ARGV;
defined $len or die "usage: posix-lock.pl try|hold|wait|test FILE r|w START LEN ...\n";
my $type = $kind eq 'r' ? F_RDLCK : $kind eq 'w' ? F_WRLCK : die "lock kind must be r or w\n";
sysopen(my $fh, $file, O_RDWR) or do { print STDERR "open $file: $!\n"; exit 2 };

if ($op eq 'try') {
	my $lock = flock_struct($type, $start, $len);
	if (fcntl($fh, F_SETLK, $lock)) { exit 0 }
	exit 1 if $! == EAGAIN || $! == EACCES;
	print STDERR "F_SETLK: $!\n";
	exit 2;
} elsif ($op eq 'hold') {
	my ($ready, $go) = @rest;
	my $lock = flock_struct($type, $start, $len);
	fcntl($fh, F_SETLKW, $lock) or do { print STDERR "F_SETLKW: $!\n"; exit 2 };
	open(my $r, '>', $ready) or do { print STDERR "create $ready: $!\n"; exit 2 };
	close $r;
	select(undef, undef, undef, 0.02) until -e $go;
	exit 0;
} elsif ($op eq 'wait') {
	my ($seconds) = @rest;
	my $lock = flock_struct($type, $start, $len);
	local $SIG{ALRM} = sub { };
	alarm $seconds;
	my $ok = fcntl($fh, F_SETLKW, $lock);
	my $err = $!;
	alarm 0;
	exit 0 if $ok;
	if ($err == EINTR) { print STDERR "still not granted after ${seconds}s\n"; exit 1 }
	print STDERR "F_SETLKW: $err\n";
	exit 2;
} elsif ($op eq 'test') {
	my $lock = flock_struct($type, $start, $len);
	fcntl($fh, F_GETLK, $lock) or do { print STDERR "F_GETLK: $!\n"; exit 2 };
	my ($got, $at, $length, $pid) = unpack_flock($lock);
	if ($got == F_UNLCK) { print "unlocked\n" }
	else { printf "%s %d %d %d\n", ($got == F_WRLCK ? 'w' : 'r'), $at, $length, $pid }
	exit 0;
}
die "unknown operation $op\n";
