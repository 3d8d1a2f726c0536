#!/usr/bin/env bash
# Builds the load generator (release) and measures how fast a volume gets dirty data into
# its bucket against raw PUTs of the same bytes to the same S3 server (moto on loopback),
# from one process, alternating per repetition; prints the fraction (goal >= 0.8). Then,
# per repetition, what compaction of packs left a quarter live costs, against raw GETs
# and PUTs of the same bytes.
#
#   benches/volume-flush.sh [--quick] [--json FILE] [extra berth-loadgen vol-flush options...]
#
# Full: 256 MiB per measurement, 32 MiB packs (the volume default), the volume uploading 1
# and 4 packs at once, raw PUTs with 1 and 4 streams, median of 3 after one untimed round
# of every method (--warm-up-reps). --quick: smoke mode for CI (16 MiB, 4 MiB packs, one repetition, a
# few seconds); exits non-zero unless every flush and compaction completed and read back
# from the bucket and every PUT was stored (never on a fraction).
# --json FILE: every run's figures (default: benches/results/volume-flush.json; --quick
#          writes under $TMPDIR).
# Options after these go to `berth-loadgen vol-flush` (--mib N, --pack SIZE, --streams
# LIST for the raw PUTs, --upload-streams LIST for the volume, --reps N).
# moto_server must be on PATH or in the test venv (see tests/run-all.sh); without it the
# run is skipped, a failure under BERTH_TESTS_NO_SKIP=1. CARGO_TARGET_DIR is honoured.
set -euo pipefail

# shellcheck source=benches/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

bench_parse_args "$@"

if ! bench_find_moto; then
    bench_skip_or_fail "$MOTO_MISSING" "SKIP: $MOTO_MISSING"
    exit 0
fi

cd "$root"
cargo build --release --quiet -p berth-loadgen
target="${CARGO_TARGET_DIR:-$root/target}"
loadgen="$target/release/berth-loadgen"

bench_default_json berth-volume-flush-quick.json volume-flush.json
dir="$cache/volume-flush-$mode"

exec "$loadgen" vol-flush --dir "$dir" --json "$json" "${args[@]}"
