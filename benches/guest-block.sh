#!/usr/bin/env bash
# ublk in the 7.2 guest: berth's zero-copy, user-copy and copy transports against the
# kernel's own loop device, all on the same backing file (in the guest's tmpfs), in one
# boot. fio, O_DIRECT, libaio: 4 KiB random read and write at QD 1 and 32, 128 KiB and
# 1 MiB sequential read and write; each on a device with 1 and with 4 queues (two fio
# jobs for the 4-queue device; the guest has 2 vCPUs, so at most 2 queues are busy).
# Prints IOPS, MiB/s, p99 latency and the ratios zero-copy/user-copy, zero-copy/copy and
# zero-copy/loop per job, and writes them as JSON.
#
# Density, in the same boot: one berth process exports a small image N times
# (`berth block add --readonly --count N`, 1 000 by default), and the script records how
# long the devices take to come up and go away, the process's RSS, threads and descriptors
# and the kernel memory they take (MemAvailable before and after), against one device, so
# the per-device cost is the difference over N - 1; every device's first block is read
# back and compared with the image's.
#
# Then a writable volume (`volume:file://...`, its bucket, log and cache in the guest's
# tmpfs) against the raw file it was filled from, both zero-copy on one queue, the same
# jobs alternating (64 MiB, 32 MiB with --quick); the fill is compared byte for byte, and
# the volume process's peak resident memory (VmHWM) is recorded. --volume-only runs just
# this part.
#
# Under QEMU TCG the emulated guest dominates: the ratios say what each transport costs
# relative to the others on the same guest, not what a real machine reaches.
#
# Usage: benches/guest-block.sh [--quick] [--runtime SECONDS] [--devices N]
#                               [--density-only | --volume-only] [--json FILE]   (as root)
source "$(dirname "${BASH_SOURCE[0]}")/../guest-images/lib.sh"

runtime=4 size=256M volume_size=64M json="" quick=0 devices=1000 density_only=0 volume_only=0
while [ $# -gt 0 ]; do
	case $1 in
	--quick) runtime=2 size=64M volume_size=32M quick=1 devices=100; shift ;;
	--runtime) runtime=$2; shift 2 ;;
	--devices) devices=$2; shift 2 ;;
	--density-only) density_only=1; shift ;;
	--volume-only) volume_only=1; shift ;;
	--json) json=$2; shift 2 ;;
	-h | --help) sed -n '2,26p' "$0"; exit 0 ;;
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
runtime=$runtime quick=$quick devices=$devices density_only=$density_only volume_only=$volume_only
job_size=$size max_ios_bytes=""
jobs="randread:4k:1 randread:4k:32 randwrite:4k:1 randwrite:4k:32 read:128k:8 write:128k:8 read:1m:4 write:1m:4"
[ "\$quick" = 1 ] && jobs="randread:4k:1 randread:4k:32 read:128k:8 write:128k:8"
run_job() { # run_job BACKEND QUEUES DEVICE JOB
	local backend=\$1 queues=\$2 dev=\$3 job=\$4 numjobs=1 rw bs depth out
	[ "\$queues" = 4 ] && numjobs=2
	{
		rw=\${job%%:*}; bs=\${job#*:}; depth=\${bs#*:}; bs=\${bs%:*}
		# With max_ios_bytes set, a job ends early once it has moved that much (the
		# volume's bucket and log live in the guest's memory and must not fill it).
		local limit=""
		if [ -n "\$max_ios_bytes" ]; then
			local unit=1
			case \$bs in *k) unit=1024 ;; *m) unit=1048576 ;; esac
			limit="--number_ios=\$((max_ios_bytes / (\${bs%[km]} * unit)))"
		fi
		out=\$(fio --name=b --filename="\$dev" --rw="\$rw" --bs="\$bs" --iodepth="\$depth" \\
			--numjobs=\$numjobs --group_reporting --ioengine=libaio --direct=1 --size=\$job_size \\
			--runtime=\$runtime --time_based --ramp_time=1 \$limit --output-format=terse --terse-version=3)
		echo "\$out" | awk -F';' -v b="\$backend" -v q="\$queues" -v j="\$rw-\$bs-qd\$depth" '
			{ riops = \$8; wiops = \$49; rbw = \$7; wbw = \$48
			  iops = riops + wiops; kib = rbw + wbw
			  p99 = (riops > 0) ? \$30 : \$71; sub(/.*=/, "", p99)
			  printf "@@bench %s %s %s %.0f %.1f %s\\n", b, q, j, iops, kib / 1024, p99 }'
	}
}
add_device() { # add_device NAME ARGS...: berth block add ARGS in the background; sets DEV and PID
	local name=\$1
	shift
	/test/berth block add "\$@" >/tmp/add-\$name.out 2>/tmp/add-\$name.log &
	PID=\$!
	for _ in \$(seq 300); do grep -q '^ublk device' /tmp/add-\$name.out && break; sleep 0.1; done
	DEV=\$(awk '/^ublk device/ { print \$4 }' /tmp/add-\$name.out)
	[ -b "\$DEV" ] || { cat /tmp/add-\$name.log; exit 1; }
}
del_devices() { # every berth device goes, and the processes serving them end
	for id in \$(/test/berth block list --json | grep -o '"id":[0-9]*' | cut -d: -f2); do
		/test/berth block del \$id >/dev/null
	done
	wait
}
density() { # density N: one process exports a 4 MiB image N times
	local n=\$1 pid up=0 start ready rss threads fds avail_before avail_after down bad=0 dev
	sync; echo 3 >/proc/sys/vm/drop_caches
	avail_before=\$(awk '/^MemAvailable:/ { print \$2 }' /proc/meminfo)
	start=\$(cut -d' ' -f1 /proc/uptime)
	/test/berth block add /tmp/density.img --readonly --count "\$n" --queues 1 --depth 16 \\
		--max-io 64K >/tmp/density.out 2>/tmp/density.log &
	pid=\$!
	for _ in \$(seq 6000); do
		up=\$(grep -c '^ublk device' /tmp/density.out || true)
		[ "\$up" -ge "\$n" ] && break
		kill -0 \$pid 2>/dev/null || break
		sleep 0.1
	done
	ready=\$(cut -d' ' -f1 /proc/uptime)
	[ "\$up" -ge "\$n" ] || { echo "density: \$up of \$n devices came up"; tail -n 20 /tmp/density.log; exit 1; }
	rss=\$(awk '/^VmRSS:/ { print \$2 }' /proc/\$pid/status)
	threads=\$(awk '/^Threads:/ { print \$2 }' /proc/\$pid/status)
	fds=\$(ls /proc/\$pid/fd | wc -l)
	avail_after=\$(awk '/^MemAvailable:/ { print \$2 }' /proc/meminfo)
	for dev in \$(awk '/^ublk device/ { print \$4 }' /tmp/density.out); do
		dd if="\$dev" bs=4k count=1 iflag=direct status=none | cmp -s - /tmp/density.head || bad=\$((bad + 1))
	done
	[ "\$bad" = 0 ] || { echo "density: \$bad of \$n devices read back wrong data"; exit 1; }
	start_down=\$(cut -d' ' -f1 /proc/uptime)
	kill -TERM \$pid
	wait \$pid || { echo "density: berth exited with status \$?"; tail -n 20 /tmp/density.log; exit 1; }
	down=\$(cut -d' ' -f1 /proc/uptime)
	[ -z "\$(ls /dev/ublkb* 2>/dev/null)" ] || { echo "density: devices left after berth stopped"; exit 1; }
	echo "@@density \$n \$(awk -v a="\$start" -v b="\$ready" 'BEGIN { print b - a }') \$rss \$threads \$fds \$((avail_before - avail_after)) \$(awk -v a="\$start_down" -v b="\$down" 'BEGIN { print b - a }')"
}
if [ "\$volume_only" = 0 ]; then
dd if=/dev/urandom of=/tmp/density.img bs=1M count=4 status=none
head -c 4096 /tmp/density.img >/tmp/density.head
density 1
density "\$devices"
[ "\$density_only" = 1 ] && exit 0

dd if=/dev/urandom of=/tmp/backing.img bs=1M count=${size%M} status=none

for queues in 1 4; do
	# All four devices exist at once and each job runs on them back to back, so that
	# the host's load at any moment weighs on every backend alike.
	devs=""
	for transport in zero-copy user-copy copy; do
		add_device \$transport /tmp/backing.img --ublk-transport \$transport --queues \$queues --depth 64
		devs="\$devs \$transport=\$DEV"
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
	del_devices
done
rm /tmp/backing.img
fi

# A volume against the raw file it was filled from, both zero-copy on one queue, smaller
# (the volume's log, cache and bucket all live in the guest's memory). The volume's writes
# go to its log and cache and are uploaded to a file:// bucket in the background while the
# jobs run, every 5 s (the default).
job_size=$volume_size
# Each job moves at most twice the volume (a faster host would otherwise fill the
# guest's memory with the log and the bucket's packs within one job).
max_ios_bytes=\$((2 * ${volume_size%M} * 1048576))
dd if=/dev/urandom of=/tmp/volume-raw.img bs=1M count=${volume_size%M} status=none
mkdir -p /tmp/volume-bucket
/test/berth volume create file:///tmp/volume-bucket/vol --size $volume_size >/dev/null
add_device raw-file /tmp/volume-raw.img --ublk-transport zero-copy --queues 1 --depth 64
raw=\$DEV
# The log may hold no more than the volume's size not yet in the bucket (--max-dirty):
# log, cache, bucket and raw file share the guest's 512 MiB tmpfs, and with the default
# (1 GiB) a quiet host's writes fill it before the uploader catches up.
add_device volume volume:file:///tmp/volume-bucket/vol --volume-dir /tmp/volume-local \\
	--max-dirty $volume_size --ublk-transport zero-copy --queues 1 --depth 64
volume=\$DEV volume_pid=\$PID
dd if=/tmp/volume-raw.img of="\$volume" bs=1M oflag=direct conv=fsync status=none
cmp /tmp/volume-raw.img "\$volume"
for job in \$jobs; do
	run_job raw-file 1 "\$raw" "\$job"
	run_job volume 1 "\$volume" "\$job"
	# The packs the job's overwrites superseded go, as a host's scheduled
	# \`berth volume gc\` would have them go (the served volume's own runs every 10 min).
	/test/berth volume gc file:///tmp/volume-bucket/vol --grace 0 >/tmp/volume-gc.log 2>&1 ||
		{ echo "berth volume gc failed:"; tail -n 5 /tmp/volume-gc.log; exit 1; }
done
# The most memory the volume's process held at once over all the jobs.
echo "@@volume-memory \$(awk '/^VmHWM:/ { print \$2 }' /proc/\$volume_pid/status)"
del_devices
EOF

if [ "$volume_only" = 1 ]; then
	log "booting the guest: a volume against a raw file, $runtime s per job"
else
	log "booting the guest: $devices devices at once, 4 backends x 2 queue counts, then a volume against a raw file, $runtime s per job"
fi
console=$work/console
rc=0
guest_boot --script "$work/guest.sh" --extra "$work/extra" --console "$console" --timeout 3000 || rc=$?
if [ "$rc" != 0 ]; then
	# What was measured before the failure is kept in the log.
	tr -d '\r' <"$console" | grep -a -E '^@@(bench|density|volume-memory) ' >&2 || true
	die "the guest failed (status $rc): $(tr -d '\r' <"$console" | grep -a -v '^@@bench' | tail -n 30)"
fi
mkdir -p "$(dirname "$json")"
cat >"$work/report.py" <<'PY'
import json, sys
out, runtime, size, density_only, volume_only = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
rows, volume_rows, density, volume_hwm_kib = {}, {}, [], None
for line in sys.stdin:
    fields = line.split()
    if fields[0] == "@@volume-memory":
        volume_hwm_kib = int(fields[1])
        continue
    if fields[0] == "@@density":
        n, up_s, rss, threads, fds, avail_kib, down_s = fields[1:]
        density.append({"devices": int(n), "up_s": float(up_s), "rss_kib": int(rss),
                        "threads": int(threads), "fds": int(fds),
                        "mem_taken_kib": int(avail_kib), "teardown_s": float(down_s)})
        continue
    _, backend, queues, job, iops, mib, p99 = fields
    figures = {"iops": float(iops), "mib_s": float(mib), "p99_us": float(p99)}
    if backend in ("raw-file", "volume"):
        volume_rows.setdefault(job, {})[backend] = figures
    else:
        rows.setdefault((job, int(queues)), {})[backend] = figures


def ratio(a, b):
    return a / b if b else float("nan")


table = []
if rows:
    print(f"{'job':<22} {'q':>2} {'zero-copy':>10} {'user-copy':>10} {'copy':>10} {'loop':>10}"
          f"  {'zc/uc':>6} {'zc/copy':>7} {'zc/loop':>7}")
for (job, queues), b in rows.items():
    zc, uc, cp, lo = (b.get(k, {}).get("iops", float("nan"))
                      for k in ("zero-copy", "user-copy", "copy", "loop"))
    print(f"{job:<22} {queues:>2} {zc:>10.0f} {uc:>10.0f} {cp:>10.0f} {lo:>10.0f}"
          f"  {ratio(zc, uc):>5.2f}x {ratio(zc, cp):>6.2f}x {ratio(zc, lo):>6.2f}x")
    table.append({"job": job, "queues": queues, "backends": b, "zc_over_uc": ratio(zc, uc),
                  "zc_over_copy": ratio(zc, cp), "zc_over_loop": ratio(zc, lo)})
if rows:
    print(f"(IOPS, fio libaio O_DIRECT, {runtime} s per job after 1 s ramp)")
volume_table = []
if volume_rows:
    print(f"{'job (zero-copy, 1 queue)':<26} {'raw file':>10} {'volume':>10}  {'volume/raw':>10}")
for job, b in volume_rows.items():
    raw, vol = (b.get(k, {}).get("iops", float("nan")) for k in ("raw-file", "volume"))
    print(f"{job:<26} {raw:>10.0f} {vol:>10.0f}  {ratio(vol, raw):>9.2f}x")
    volume_table.append({"job": job, "backends": b, "volume_over_raw": ratio(vol, raw)})
if volume_hwm_kib is not None:
    print(f"volume process: {volume_hwm_kib / 1024:.0f} MiB peak resident memory (VmHWM)")
per_device = None
if len(density) == 2:
    one, many = density
    extra = many["devices"] - one["devices"]
    per_device = {key: (many[key] - one[key]) / extra
                  for key in ("rss_kib", "threads", "fds", "mem_taken_kib", "up_s", "teardown_s")}
    print(f"{'devices':>8} {'up s':>7} {'RSS KiB':>9} {'threads':>8} {'fds':>6}"
          f" {'memory KiB':>11} {'down s':>7}")
    for d in density:
        print(f"{d['devices']:>8} {d['up_s']:>7.2f} {d['rss_kib']:>9} {d['threads']:>8}"
              f" {d['fds']:>6} {d['mem_taken_kib']:>11} {d['teardown_s']:>7.2f}")
    print(f"per device: {per_device['rss_kib']:.1f} KiB RSS, {per_device['threads']:.2f} threads,"
          f" {per_device['fds']:.2f} descriptors, {per_device['mem_taken_kib']:.1f} KiB of memory"
          f" in all (process and kernel), {per_device['up_s'] * 1000:.1f} ms to add,"
          f" {per_device['teardown_s'] * 1000:.1f} ms to remove")
if volume_only == "1":
    complete = bool(volume_rows) and volume_hwm_kib is not None
elif density_only == "1":
    complete = len(density) == 2
else:
    complete = len(density) == 2 and rows and volume_rows and volume_hwm_kib is not None
if not complete:
    sys.exit("the guest printed no complete set of figures")
json.dump({"kind": "guest-block", "runtime_s": runtime, "file_size": size, "table": table,
           "volume_table": volume_table, "volume_peak_rss_kib": volume_hwm_kib,
           "density": density, "density_per_device": per_device},
          open(out, "w"), indent=1)
print(f"(JSON in {out})")
PY
tr -d '\r' <"$console" | grep -a -E '^@@(bench|density|volume-memory) ' |
	python3 "$work/report.py" "$json" "$runtime" "$size" "$density_only" "$volume_only"
