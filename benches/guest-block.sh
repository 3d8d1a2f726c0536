#!/usr/bin/env bash
# ublk in the 7.2 guest: berth's zero-copy, user-copy and copy transports against the
# kernel's own loop device, all on the same backing file (in the guest's tmpfs), in one
# boot. fio, O_DIRECT, libaio: 4 KiB random read and write at QD 1 and 32, 128 KiB and
# 1 MiB sequential read and write; each on a device with 1 and with 4 queues (two fio
# jobs for the 4-queue device; the guest has 2 vCPUs, so at most 2 queues are busy).
# Prints IOPS, MiB/s, p99 latency and the ratios zero-copy/user-copy, zero-copy/copy and
# zero-copy/loop per job, and writes them as JSON.
#
# Under QEMU TCG the emulated guest dominates: the ratios say what each transport costs
# relative to the others on the same guest, not what a real machine reaches.
#
# Usage: benches/guest-block.sh [--quick] [--runtime SECONDS] [--json FILE]   (as root)
source "$(dirname "${BASH_SOURCE[0]}")/../guest-images/lib.sh"

runtime=4 size=256M json="" quick=0
while [ $# -gt 0 ]; do
	case $1 in
	--quick) runtime=2 size=64M quick=1; shift ;;
	--runtime) runtime=$2; shift 2 ;;
	--json) json=$2; shift 2 ;;
	-h | --help) sed -n '2,13p' "$0"; exit 0 ;;
	*) die "unknown argument $1" ;;
	esac
done
require_root
[ -n "$json" ] || json=$REPO_ROOT/benches/results/guest-block.json

prepare_guest
daemon_binary berth
work=$(mktemp -d /tmp/berth-guest-block.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/extra"
objcopy --strip-debug "$DAEMON" "$work/extra/berth"

cat >"$work/guest.sh" <<EOF
set -e
runtime=$runtime quick=$quick
dd if=/dev/urandom of=/tmp/backing.img bs=1M count=${size%M} status=none
jobs="randread:4k:1 randread:4k:32 randwrite:4k:1 randwrite:4k:32 read:128k:8 write:128k:8 read:1m:4 write:1m:4"
[ "\$quick" = 1 ] && jobs="randread:4k:1 randread:4k:32 read:128k:8 write:128k:8"
run_job() { # run_job BACKEND QUEUES DEVICE JOB
	local backend=\$1 queues=\$2 dev=\$3 job=\$4 numjobs=1 rw bs depth out
	[ "\$queues" = 4 ] && numjobs=2
	{
		rw=\${job%%:*}; bs=\${job#*:}; depth=\${bs#*:}; bs=\${bs%:*}
		out=\$(fio --name=b --filename="\$dev" --rw="\$rw" --bs="\$bs" --iodepth="\$depth" \\
			--numjobs=\$numjobs --group_reporting --ioengine=libaio --direct=1 --size=$size \\
			--runtime=\$runtime --time_based --ramp_time=1 --output-format=terse --terse-version=3)
		echo "\$out" | awk -F';' -v b="\$backend" -v q="\$queues" -v j="\$rw-\$bs-qd\$depth" '
			{ riops = \$8; wiops = \$49; rbw = \$7; wbw = \$48
			  iops = riops + wiops; kib = rbw + wbw
			  p99 = (riops > 0) ? \$30 : \$71; sub(/.*=/, "", p99)
			  printf "@@bench %s %s %s %.0f %.1f %s\\n", b, q, j, iops, kib / 1024, p99 }'
	}
}
for queues in 1 4; do
	# All four devices exist at once and each job runs on them back to back, so that
	# the host's load at any moment weighs on every backend alike.
	devs=""
	for transport in zero-copy user-copy copy; do
		/test/berth block add /tmp/backing.img --ublk-transport \$transport --queues \$queues \
			--depth 64 >/tmp/add-\$transport.out 2>/tmp/add-\$transport.log &
		for _ in \$(seq 300); do grep -q '^ublk device' /tmp/add-\$transport.out && break; sleep 0.1; done
		dev=\$(awk '/^ublk device/ { print \$4 }' /tmp/add-\$transport.out)
		[ -b "\$dev" ] || { cat /tmp/add-\$transport.log; exit 1; }
		devs="\$devs \$transport=\$dev"
	done
	# The kernel's loop device on the same file (buffered, like berth: tmpfs has no
	# O_DIRECT). busybox's losetup: find a free device, then attach.
	loop=\$(losetup -f)
	losetup "\$loop" /tmp/backing.img
	devs="\$devs loop=\$loop"
	for job in \$jobs; do
		for pair in \$devs; do
			run_job "\${pair%%=*}" \$queues "\${pair#*=}" "\$job"
		done
	done
	losetup -d "\$loop"
	for id in \$(/test/berth block list --json | grep -o '"id":[0-9]*' | cut -d: -f2); do
		/test/berth block del \$id >/dev/null
	done
	wait
done
EOF

log "booting the guest: 4 backends x 2 queue counts x $runtime s per job"
console=$work/console
rc=0
guest_boot --script "$work/guest.sh" --extra "$work/extra" --console "$console" --timeout 3000 || rc=$?
[ "$rc" = 0 ] || die "the guest failed (status $rc): $(tr -d '\r' <"$console" | tail -n 30)"
mkdir -p "$(dirname "$json")"
tr -d '\r' <"$console" | grep -a '^@@bench ' | python3 -c '
import json, sys
out, runtime, size = sys.argv[1], int(sys.argv[2]), sys.argv[3]
rows = {}
for line in sys.stdin:
    _, backend, queues, job, iops, mib, p99 = line.split()
    rows.setdefault((job, int(queues)), {})[backend] = {"iops": float(iops), "mib_s": float(mib), "p99_us": float(p99)}
table = []
print(f"{\"job\":<22} {\"q\":>2} {\"zero-copy\":>10} {\"user-copy\":>10} {\"copy\":>10} {\"loop\":>10}  {\"zc/uc\":>6} {\"zc/copy\":>7} {\"zc/loop\":>7}")
for (job, queues), b in rows.items():
    get = lambda k: b.get(k, {}).get("iops", float("nan"))
    zc, uc, cp, lo = get("zero-copy"), get("user-copy"), get("copy"), get("loop")
    ratio = lambda a, c: a / c if c else float("nan")
    print(f"{job:<22} {queues:>2} {zc:>10.0f} {uc:>10.0f} {cp:>10.0f} {lo:>10.0f}  {ratio(zc, uc):>5.2f}x {ratio(zc, cp):>6.2f}x {ratio(zc, lo):>6.2f}x")
    table.append({"job": job, "queues": queues, "backends": b,
                  "zc_over_uc": ratio(zc, uc), "zc_over_copy": ratio(zc, cp), "zc_over_loop": ratio(zc, lo)})
json.dump({"kind": "guest-block", "runtime_s": runtime, "file_size": size, "table": table}, open(out, "w"), indent=1)
print(f"(IOPS, fio libaio O_DIRECT, {runtime} s per job after 1 s ramp; JSON in {out})")
' "$json" "$runtime" "$size"
