#!/usr/bin/env bash
# Shared caching in the guest: boots the shared-versions guest kernel (patched 7.2) on
# Debian sid's QEMU against berth serving one directory with --shared-cache (the version
# table as shared memory region 1), --cache auto and --cache never, and runs
# metadata-heavy workloads in the guest: a stat storm over a tree of small files (a perl
# walk that lstats every file), `git status` of a checked-out repository and an untar.
# For each mode and workload it prints the guest's wall time for the measured pass and the
# FUSE requests berth served for it, and the ratios shared/auto and shared/never.
#
# Request counts come from berth's log at exit (one daemon per boot), so each stat storm
# and git status runs in two boots: one with the cold pass alone (caches filled), one with
# the cold pass and the measured warm pass; the warm pass's requests are the difference.
# The untar is measured in a fresh boot (its "cold" boot only mounts).
#
# The staleness window: two guests A and B, each on its own berth serving the directory in
# the mode under test (in shared mode both map one table). B has a file's attributes
# cached, asks for a change, and times how long its stat keeps showing the old mode; the
# change is made by a host process (a chmod on the host directory) or by guest A (a chmod
# through its mount). The request and its answer travel through a second share served with
# --cache never, so every figure includes that round trip: the never mode, where every
# stat asks berth, shows it.
#
# Under TCG (no usable KVM) an uncached guest stat costs a millisecond or more of emulated
# CPU and FUSE round trip; the default tree is 20 000 files so that a run finishes in about
# five minutes. --files 100000, the size the host benchmark uses, takes about a quarter of
# an hour (most of it the never mode's three 100 000-file walks, over three minutes each).
#
# Usage: benches/guest-shared-cache.sh [--files N] [--repo-files N] [--reps R] [--quick]
#                                      [--json FILE] [--keep]
#   --files N       files in the stat-storm tree (default 20000)
#   --repo-files N  files in the git checkout and the tarball (default 3000)
#   --reps R        staleness samples per mode and source (default 10)
#   --quick         2 000 files, 500 repository files, 3 samples, no JSON (a smoke run,
#                   about two minutes; fails unless shared mode's warm stat storm is served
#                   from the guest's cache and its staleness windows stay under 500 ms)
#   --keep          keep the work directory (consoles and berth's logs) for a look
# (as root; builds berth and the guest kernel, fetches sid's QEMU and a tools image with
# git into the guest cache)
bench_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$bench_dir/../guest-images/lib.sh"
# shellcheck source=benches/metadata-trees.sh
source "$bench_dir/metadata-trees.sh"

files=20000 repo_files=3000 reps=10 json="" quick=0 keep=0
while [ $# -gt 0 ]; do
	case $1 in
	--files) files=$2; shift 2 ;;
	--repo-files) repo_files=$2; shift 2 ;;
	--reps) reps=$2; shift 2 ;;
	--json) json=$2; shift 2 ;;
	--quick) files=2000 repo_files=500 reps=3 quick=1; shift ;;
	--keep) keep=1; shift ;;
	-h | --help) sed -n '2,38p' "$0"; exit 0 ;;
	*) die "unknown argument $1" ;;
	esac
done
require_root
for n in "$files" "$repo_files" "$reps"; do
	[[ $n =~ ^[1-9][0-9]*$ ]] || die "--files, --repo-files and --reps take positive numbers"
done
[ -n "$json" ] || [ "$quick" = 1 ] || json=$REPO_ROOT/benches/results/guest-shared-cache.json
command -v git >/dev/null || die "needs git on the host (the repository it checks out)"

# git in the guest: the tools image of this benchmark (cached beside the default one) adds
# it to the packages every guest gets.
GUEST_TOOL_PACKAGES+=(git)
kernel_line=$("$GUEST_IMAGES_DIR/kernel/shared-versions/check.sh" --build-only)
kernel_dir=$(sed -n 's/^shared-versions kernel: \(.*\) (.*)$/\1/p' <<<"$kernel_line")
[ -f "$kernel_dir/vmlinux" ] || die "no shared-versions kernel: $kernel_line"
BERTH_GUEST_KERNEL=$kernel_dir/vmlinux
prepare_guest
fetch_qemu_sid
daemon_binary berth
BERTH=$DAEMON

work=$(mktemp -d /var/tmp/berth-guest-shared-cache.XXXXXX)
pids=()
cleanup() {
	local pid
	for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
	for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
	if [ "$keep" = 1 ]; then log "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
share=$work/share sig=$work/sig
mkdir -p "$share" "$sig" "$work/logs"

log "preparing: a $files-file tree, a $repo_files-file git checkout and its tarball"
stat_tree "$share/tree" "$files"
git_checkout "$work/repo-src" "$share/repo" "$sig/untar.tar" "$repo_files"
mkdir -p "$share/stale"
for source in host guest; do
	: >"$share/stale/$source"
	chmod 644 "$share/stale/$source"
done

# The guest's workloads: a perl walk that lstats every entry of a tree, git status, and
# busybox's tar. Each prints "@@result WORKLOAD PASS SECONDS".
cat >"$work/lib.sh" <<'EOF'
export LC_ALL=C
stat_storm() {
	perl -e '
		my @dirs = ($ARGV[0]);
		while (defined(my $d = shift @dirs)) {
			opendir(my $h, $d) or die "opendir $d: $!\n";
			for my $e (readdir $h) {
				next if $e eq "." || $e eq "..";
				my $p = "$d/$e";
				lstat $p or die "lstat $p: $!\n";
				push @dirs, $p if -d _;
			}
			closedir $h;
		}' "$1"
}
git_status() { git -C "$1" status --porcelain >/dev/null; }
timed() { # WORKLOAD PASS COMMAND...
	local workload=$1 pass=$2 start
	shift 2
	start=$EPOCHREALTIME
	"$@" || { echo "@@failed $workload $pass"; return 1; }
	echo "@@result $workload $pass $(awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.3f", b - a }')"
}
mount_shares() {
	local tag
	for tag in "$@"; do
		mkdir -p "/mnt/$tag"
		mount -t virtiofs "$tag" "/mnt/$tag"
	done
}
EOF

# The staleness measurement in guest B: for each sample, caches the file's attributes,
# asks for a change (SOURCE-go-N on the never-cached share), and times until its lstat
# shows the new mode (5 s at most). Prints "@@stale SOURCE N MILLISECONDS".
cat >"$work/stale.pl" <<'EOF'
use strict;
use Time::HiRes qw(time sleep);
my ($source, $target, $sig, $reps) = @ARGV;
my $want = 0644;
for my $i (1 .. $reps) {
	$want = $want == 0644 ? 0600 : 0644;
	my @st = lstat $target or die "lstat $target: $!\n";
	sleep 0.05;
	lstat $target;
	open(my $go, ">", "$sig/$source-go-$i") or die "$sig/$source-go-$i: $!\n";
	close $go;
	my $t0 = time;
	my $seen = -1;
	while (time - $t0 < 5) {
		my @s = lstat $target;
		if (@s && ($s[2] & 0777) == $want) { $seen = time - $t0; last }
		sleep 0.001;
	}
	printf '@@stale %s %d %s' . "\n", $source, $i, $seen < 0 ? "timeout" : sprintf("%.3f", $seen * 1000);
	sleep 0.05;
}
EOF
# Guest A: makes the change guest B asks for, until B is done.
cat >"$work/change.pl" <<'EOF'
use strict;
use Time::HiRes qw(sleep);
my ($target, $sig) = @ARGV;
my $want = 0644;
my $i = 1;
until (-e "$sig/b-done") {
	if (-e "$sig/guest-go-$i") {
		$want = $want == 0644 ? 0600 : 0644;
		chmod $want, $target or die "chmod $target: $!\n";
		$i++;
		next;
	}
	sleep 0.001;
}
EOF

mode_flags() {
	case $1 in
	shared) echo --shared-cache --version-table "$work/versions.table" ;;
	auto) echo --cache auto ;;
	never) echo --cache never ;;
	esac
}

# start_daemon NAME DIR ARGS...: berth serving DIR on $work/NAME.sock, logging to
# $work/logs/NAME.log; its pid is kept for cleanup.
start_daemon() {
	local name=$1 dir=$2
	shift 2
	rm -f "$work/$name.sock"
	"$BERTH" --socket-path "$work/$name.sock" --shared-dir "$dir" --tag "${name%-?}" \
		--max-request-queues 1 "$@" >"$work/logs/$name.log" 2>&1 &
	pids+=($!)
	for _ in $(seq 100); do
		[ -S "$work/$name.sock" ] && return 0
		sleep 0.1
	done
	die "berth ($name) did not create its socket: $(cat "$work/logs/$name.log")"
}

# Waits for every daemon started so far to exit (each does once its guest is gone).
wait_daemons() {
	local pid
	for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
	pids=()
}

# count LOG OPCODE: the count berth logged at exit for OPCODE (total for all).
count() {
	local v
	v=$(sed -n "s/.*FUSE requests served: .*\b$2=\([0-9]*\).*/\1/p" "$1")
	echo "${v:-0}"
}

# warm_count OPCODE: the warm boot's count less the cold boot's ($warm_log, $cold_log).
warm_count() {
	local n=$(($(count "$warm_log" "$1") - $(count "$cold_log" "$1")))
	echo $((n < 0 ? 0 : n))
}

# boot NAME SCRIPT [SUFFIX]: boots one guest with the shares of daemons fsSUFFIX and
# sigSUFFIX; its console goes to logs/NAME-console.log.
boot() {
	local name=$1 script=$2 suffix=${3:-} rc=0
	guest_boot --qemu sid --script "$script" --extra "$work/extra" --console "$work/logs/$name-console.log" \
		--timeout 3600 --fs "fs=$work/fs$suffix.sock,device=generic" \
		--fs "sig=$work/sig$suffix.sock,device=generic" || rc=$?
	[ "$rc" = 0 ] || die "guest $name failed (status $rc); console: $(tail -n 20 "$work/logs/$name-console.log")"
}

mkdir -p "$work/extra"
cp "$work/lib.sh" "$work/stale.pl" "$work/change.pl" "$work/extra/"
results=()
result() { results+=("$1"); }

for mode in shared auto never; do
	# shellcheck disable=SC2207 # the flags are words without spaces
	flags=($(mode_flags "$mode"))
	for workload in stat-storm git-status untar; do
		for pass in cold warm; do
			rm -f "$work/versions.table"
			start_daemon fs "$share" "${flags[@]}"
			start_daemon sig "$sig" --cache never
			{
				echo 'set -e'
				echo '. /test/lib.sh'
				echo 'mount_shares fs sig'
				# shellcheck disable=SC2016
				case $workload in
				stat-storm)
					echo 'timed stat-storm cold stat_storm /mnt/fs/tree'
					[ $pass = cold ] || echo 'timed stat-storm warm stat_storm /mnt/fs/tree'
					;;
				git-status)
					echo 'timed git-status cold git_status /mnt/fs/repo'
					[ $pass = cold ] || echo 'timed git-status warm git_status /mnt/fs/repo'
					;;
				untar)
					if [ $pass = warm ]; then
						echo 'cp /mnt/sig/untar.tar /tmp/'
						echo "mkdir /mnt/fs/untar-$mode"
						echo "timed untar warm tar -C /mnt/fs/untar-$mode -xf /tmp/untar.tar"
					fi
					;;
				esac
				echo 'umount /mnt/sig'
				echo 'umount /mnt/fs'
			} >"$work/run.sh"
			log "$mode: $workload, $pass boot"
			boot "$mode-$workload-$pass" "$work/run.sh"
			wait_daemons
			cp "$work/logs/fs.log" "$work/logs/$mode-$workload-$pass.log"
		done
		warm_log=$work/logs/$mode-$workload-warm.log cold_log=$work/logs/$mode-$workload-cold.log
		secs=$(tr -d '\r' <"$work/logs/$mode-$workload-warm-console.log" |
			sed -n "s/^.*@@result $workload warm \([0-9.]*\)$/\1/p")
		[ -n "$secs" ] || die "no result for $workload in $mode mode: $work/logs/$mode-$workload-warm-console.log"
		# The warm pass's share of the warm boot's requests. In auto mode the cold passes
		# of the two boots may differ by a few entries that expired mid-walk: never below 0.
		requests=$(warm_count total) lookups=$(warm_count LOOKUP) getattrs=$(warm_count GETATTR)
		# A new table generation (berth lost host events) makes every client revalidate
		# everything, rightly: such a pass's counts say nothing about caching.
		regenerations=$(grep -c "revalidates everything" "$warm_log" || true)
		log "  $secs s, $requests requests ($lookups LOOKUP, $getattrs GETATTR)"
		result "{\"mode\":\"$mode\",\"workload\":\"$workload\",\"seconds\":$secs,\"requests\":$requests,\"lookups\":$lookups,\"getattrs\":$getattrs,\"regenerations\":$regenerations}"
	done

	# Staleness: guests A and B on their own daemons (one table in shared mode); a host
	# process answers B's requests for host changes, guest A those for guest changes.
	rm -f "$work/versions.table" "$sig"/*-go-* "$sig/b-done" "$sig/a-up"
	for side in a b; do
		start_daemon "fs-$side" "$share" "${flags[@]}"
		start_daemon "sig-$side" "$sig" --cache never
	done
	cat >"$work/stale-a.sh" <<'EOF'
set -e
. /test/lib.sh
mount_shares fs sig
touch /mnt/sig/a-up
perl /test/change.pl /mnt/fs/stale/guest /mnt/sig
umount /mnt/sig
umount /mnt/fs
EOF
	cat >"$work/stale-b.sh" <<EOF
set -e
. /test/lib.sh
mount_shares fs sig
trap 'touch /mnt/sig/b-done' EXIT
perl /test/stale.pl host /mnt/fs/stale/host /mnt/sig $reps
for _ in \$(seq 600); do [ -e /mnt/sig/a-up ] && break; sleep 0.1; done
perl /test/stale.pl guest /mnt/fs/stale/guest /mnt/sig $reps
touch /mnt/sig/b-done
trap - EXIT
umount /mnt/sig
umount /mnt/fs
EOF
	python3 - "$share/stale/host" "$sig" "$reps" <<'EOF' &
import os, sys, time
target, sig, reps = sys.argv[1], sys.argv[2], int(sys.argv[3])
mode, i = 0o644, 1
deadline = time.time() + 3600
while i <= reps and time.time() < deadline and not os.path.exists(os.path.join(sig, "b-done")):
    if os.path.exists(os.path.join(sig, f"host-go-{i}")):
        mode = 0o600 if mode == 0o644 else 0o644
        os.chmod(target, mode)
        i += 1
        continue
    time.sleep(0.0005)
EOF
	host_changer=$!
	log "$mode: staleness, guests A and B"
	boot "$mode-stale-a" "$work/stale-a.sh" -a &
	boot_a=$!
	rc_b=0
	(boot "$mode-stale-b" "$work/stale-b.sh" -b) || rc_b=$?
	# Guest A stops once B is done, whether B got there or not.
	touch "$sig/b-done"
	rc_a=0
	wait "$boot_a" || rc_a=$?
	[ "$rc_a" = 0 ] && [ "$rc_b" = 0 ] || die "the $mode staleness guests failed (A: $rc_a, B: $rc_b)"
	wait "$host_changer" || true
	wait_daemons
	for source in host guest; do
		samples=$(tr -d '\r' <"$work/logs/$mode-stale-b-console.log" | sed -n "s/^.*@@stale $source [0-9]* \([0-9.a-z]*\)$/\1/p")
		out=$(python3 - "$samples" <<'EOF'
import statistics, sys
values = sys.argv[1].split()
timeouts = values.count("timeout")
ms = sorted(float(v) for v in values if v != "timeout")
if not ms:
    print("null null", len(values), timeouts)
else:
    print(f"{statistics.median(ms):.3f} {ms[-1]:.3f}", len(values), timeouts)
EOF
)
		read -r median worst n timeouts <<<"$out"
		[ "$n" -gt 0 ] || die "no staleness samples ($source, $mode): $work/logs/$mode-stale-b-console.log"
		log "  staleness ($source): median $median ms, max $worst ms over $n samples ($timeouts not seen within 5 s)"
		result "{\"mode\":\"$mode\",\"workload\":\"staleness-$source\",\"median_ms\":$median,\"max_ms\":$worst,\"samples\":$n,\"timeouts\":$timeouts}"
	done
done

printf '%s\n' "${results[@]}" >"$work/results.jsonl"
python3 - "$work/results.jsonl" "$files" "$repo_files" "$reps" "$GUEST_ACCEL" "$json" "$quick" <<'EOF'
import json, sys
results, files, repo_files, reps, accel, out, check = sys.argv[1:8]
with open(results) as f:
    rows = [json.loads(line) for line in f]
by = {(r["mode"], r["workload"]): r for r in rows}
modes = ["shared", "auto", "never"]
def ratio(a, b):
    return f"{a / b:.3g}" if b else ("n/a" if a == 0 else "inf")
print(f"guest shared caching ({accel}): {files}-file tree, {repo_files}-file repository, "
      f"{reps} staleness samples per mode and source")
print(f"{'workload':<12} {'':<9} {'shared':>10} {'auto':>10} {'never':>10} {'sh/auto':>8} {'sh/never':>9}")
for w in ["stat-storm", "git-status", "untar"]:
    for key, label in [("seconds", "seconds"), ("requests", "requests"),
                       ("lookups", "LOOKUP"), ("getattrs", "GETATTR")]:
        v = [by[(m, w)][key] for m in modes]
        print(f"{w:<12} {label:<9} {v[0]:>10} {v[1]:>10} {v[2]:>10} {ratio(v[0], v[1]):>8} {ratio(v[0], v[2]):>9}")
print("staleness, ms median/max (change by a host process, by guest A; seen in guest B):")
for w in ["staleness-host", "staleness-guest"]:
    v = [by[(m, w)] for m in modes]
    cells = [f"{r['median_ms']}/{r['max_ms']}" for r in v]
    notes = "".join(f" ({r['mode']}: {r['timeouts']} of {r['samples']} not seen within 5 s)"
                    for r in v if r["timeouts"])
    print(f"{w:<22} {cells[0]:>12} {cells[1]:>12} {cells[2]:>12}{notes}")
problems = []
if check == "1":
    # What must hold however loaded the machine is: the warm stat storm served from the
    # guest's cache with the table, and both staleness windows well under auto's 1 s.
    storm = by[("shared", "stat-storm")]
    if storm["lookups"] + storm["getattrs"] > int(files) // 10 and storm.get("regenerations"):
        print(f"NOTE: shared mode's warm stat storm cost {storm['lookups']} LOOKUP + "
              f"{storm['getattrs']} GETATTR after berth started a new table generation "
              "(host events lost, logged): a full revalidation is the right answer then")
    elif storm["lookups"] + storm["getattrs"] > int(files) // 10:
        problems.append(f"shared mode's warm stat storm of {files} files cost "
                        f"{storm['lookups']} LOOKUP + {storm['getattrs']} GETATTR")
    for w in ["staleness-host", "staleness-guest"]:
        r = by[("shared", w)]
        if r["timeouts"] or r["median_ms"] is None or r["median_ms"] > 500:
            problems.append(f"shared mode's {w}: median {r['median_ms']} ms, "
                            f"{r['timeouts']} of {r['samples']} not seen within 5 s")
for p in problems:
    print(f"FAIL: {p}")
if out:
    with open(out, "w") as f:
        json.dump({"files": int(files), "repo_files": int(repo_files),
                   "staleness_samples": int(reps), "accel": accel, "results": rows}, f, indent=1)
    print(f"(JSON in {out})")
sys.exit(1 if problems else 0)
EOF

