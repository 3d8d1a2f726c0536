#!/usr/bin/env bash
# Builds berth and the load generator (release) and compares berth's vhost-user-blk backend
# (`berth block serve-vhost`) with qemu-storage-daemon's vhost-user-blk export on the same
# raw file, and with berth serving the same data as a volume (`volume:s3://...`) on a moto
# S3 server on loopback, alternating the backends per case; prints the berth/qsd and
# volume/berth ratios per workload.
#
#   benches/blk-compare.sh [--quick] [--no-volume] [--json FILE] [extra berth-loadgen blk-compare options...]
#
# --quick: smoke mode for CI (64 MiB image, 0.3 s per case, under a minute in all); exits
#          non-zero unless every case completed with correct data and statuses.
# --no-volume: leave the volume out.
# --json FILE: write every run's figures there (default: benches/results/blk.json; --quick
#          writes under $TMPDIR).
# Both backends serve the file through the host page cache (berth has no O_DIRECT mode;
# qsd runs with cache.direct=off, aio=io_uring unless --qsd-aio threads is given).
# Environment:
#   QSD            qemu-storage-daemon binary (default: the one on PATH; skipped if missing,
#                  a failure under BERTH_TESTS_NO_SKIP=1)
#   BLK_IMAGE      the raw image (default: an image under the cache dir, made once)
#   moto_server    on PATH or in the test venv (see tests/run-all.sh) for the volume; the
#                  volume is skipped without it, a failure under BERTH_TESTS_NO_SKIP=1
#   CARGO_TARGET_DIR is honoured.
set -euo pipefail

# shellcheck source=benches/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

bench_parse_args "$@"
volume=1
passed_on=()
for arg in "${args[@]}"; do
    if [[ $arg == --no-volume ]]; then volume=0; else passed_on+=("$arg"); fi
done
args=("${passed_on[@]}")

cd "$root"
cargo build --release --quiet -p berth -p berth-loadgen
target="${CARGO_TARGET_DIR:-$root/target}"
berth="$target/release/berth"
loadgen="$target/release/berth-loadgen"

qsd="${QSD:-$(command -v qemu-storage-daemon || true)}"
if [[ -z "$qsd" || ! -x "$qsd" ]]; then
    why="qemu-storage-daemon not found (install the qemu-system-common package or set QSD)"
    # CI (BERTH_TESTS_NO_SKIP=1) installs it: a skip there is a failure.
    bench_skip_or_fail "$why" "SKIP: $why; nothing to compare berth with"
    exit 0
fi
echo "qemu-storage-daemon: $qsd ($("$qsd" --version | sed -n 1p))"

if [[ $volume == 1 ]]; then
    # The S3 server the volume lives on.
    if bench_find_moto; then
        args+=(--volume)
    else
        bench_skip_or_fail "$MOTO_MISSING" "SKIP volume: $MOTO_MISSING"
    fi
fi

image="${BLK_IMAGE:-$cache/blkbench-$mode/disk.img}"
mkdir -p "$(dirname "$image")"
bench_default_json berth-blk-quick.json blk.json

exec "$loadgen" blk-compare --berth "$berth" --qsd "$qsd" --image "$image" --json "$json" "${args[@]}"
