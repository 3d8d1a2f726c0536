#!/usr/bin/perl
# A small HTTP/1.1 file server for the block checks: serves the files under ROOT (GET with
# an optional `Range: bytes=A-B`, and HEAD) on 127.0.0.1:PORT, one child process per
# connection. While the file SLOW exists every GET waits DELAY seconds before it is
# answered, and SLOW.seen is created when the first such GET arrives: a backend that is
# slow to answer on demand.
#
#   slow-http.pl ROOT PORT SLOW DELAY READY   creates READY once it listens
use strict;
use warnings;
use IO::Socket::INET;
use POSIX ();

my ($root, $port, $slow, $delay, $ready) = @ARGV;
defined $ready or die "usage: slow-http.pl ROOT PORT SLOW DELAY READY\n";
$SIG{CHLD} = 'IGNORE';
my $server = IO::Socket::INET->new(
    LocalAddr => '127.0.0.1',
    LocalPort => $port,
    Listen    => 16,
    ReuseAddr => 1,
) or die "listen on 127.0.0.1:$port: $!\n";
open(my $mark, '>', $ready) or die "create $ready: $!\n";
close($mark);

while (1) {
    my $client = $server->accept or next;
    my $pid = fork;
    if (!defined $pid) { close($client); next }
    if ($pid == 0) {
        close($server);
        serve($client);
        POSIX::_exit(0);
    }
    close($client);
}

sub answer {
    my ($client, $status, $headers, $body) = @_;
    my $head = "HTTP/1.1 $status\r\nConnection: close\r\n";
    $head .= "$_: $headers->{$_}\r\n" for sort keys %$headers;
    print $client $head, "\r\n";
    print $client $body if defined $body;
}

sub serve {
    my ($client) = @_;
    my $line = <$client>;
    return unless defined $line;
    my ($method, $target) = $line =~ m{^(GET|HEAD) (\S+) HTTP/1\.[01]\r?\n$};
    my %header;
    while (my $h = <$client>) {
        last if $h =~ /^\r?\n$/;
        $header{ lc $1 } = $2 if $h =~ /^([^:]+):\s*(.*?)\r?\n$/;
    }
    if (!defined $method) {
        answer($client, '405 Method Not Allowed', { 'Content-Length' => 0 });
        return;
    }
    my $path = $target =~ s/\?.*//r;
    if ($path =~ m{(^|/)\.\.(/|$)}) {
        answer($client, '403 Forbidden', { 'Content-Length' => 0 });
        return;
    }
    my $file = "$root$path";
    my $size = -s $file;
    if (!-f $file) {
        answer($client, '404 Not Found', { 'Content-Length' => 0 });
        return;
    }
    my %meta = (
        'Last-Modified' => POSIX::strftime('%a, %d %b %Y %H:%M:%S GMT', gmtime((stat $file)[9])),
        'ETag'          => sprintf('"%x-%x"', $size, (stat $file)[9]),
        'Accept-Ranges' => 'bytes',
    );
    if ($method eq 'HEAD') {
        answer($client, '200 OK', { %meta, 'Content-Length' => $size });
        return;
    }
    if (-e $slow) {
        if (open(my $seen, '>', "$slow.seen")) { close($seen) }
        sleep $delay;
    }
    my ($from, $to, $status) = (0, $size - 1, '200 OK');
    if (defined $header{range} && $header{range} =~ /^bytes=(\d+)-(\d*)$/) {
        ($from, $to) = ($1, $2 eq '' ? $size - 1 : $2);
        $to = $size - 1 if $to > $size - 1;
        if ($from > $to) {
            answer($client, '416 Range Not Satisfiable',
                { 'Content-Range' => "bytes */$size", 'Content-Length' => 0 });
            return;
        }
        $status = '206 Partial Content';
        $meta{'Content-Range'} = "bytes $from-$to/$size";
    }
    open(my $fh, '<:raw', $file) or do {
        answer($client, '500 Internal Server Error', { 'Content-Length' => 0 });
        return;
    };
    seek($fh, $from, 0);
    my $len = $to - $from + 1;
    my $body = '';
    read($fh, $body, $len) == $len or do {
        answer($client, '500 Internal Server Error', { 'Content-Length' => 0 });
        return;
    };
    answer($client, $status, { %meta, 'Content-Length' => $len }, $body);
}
