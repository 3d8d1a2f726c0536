#!/usr/bin/env bash
# Runs every fuzz target for a bounded time: ./run.sh [SECONDS_PER_TARGET] [TARGET...]
# New inputs go to a scratch corpus under the cache, so the checked-in seeds stay as they are.
# Exits non-zero if any target found a crash (the input is kept under the cache's artifacts/).
set -euo pipefail

seconds=${1:-60}
shift || true
cd "$(dirname "$0")"
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(fuse_request vhost_user_message vhost_blk_request cli_options manifest_parse xattrmap_parse dax_window)
fi
cache=${XDG_CACHE_HOME:-$HOME/.cache}/berth/fuzz

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi
# cargo-fuzz passes nightly-only flags (-Zsanitizer=...). Prefer a nightly toolchain; without
# one, let the stable compiler accept them.
if cargo +nightly --version >/dev/null 2>&1; then
    toolchain=(+nightly)
else
    toolchain=()
    export RUSTC_BOOTSTRAP=1
fi

failed=()
summary=()
for target in "${targets[@]}"; do
    scratch="$cache/corpus/$target"
    artifacts="$cache/artifacts/$target"
    mkdir -p "$scratch" "$artifacts"
    log="$cache/$target.log"
    echo "== fuzzing $target for ${seconds}s (log: $log)"
    status=0
    cargo "${toolchain[@]}" fuzz run "$target" "$scratch" "corpus/$target" -- \
        -max_total_time="$seconds" -timeout=20 -rss_limit_mb=4096 \
        -artifact_prefix="$artifacts/" -print_final_stats=1 >"$log" 2>&1 || status=$?
    runs=$(grep -Eo 'Done [0-9]+ runs' "$log" | grep -Eo '[0-9]+' | tail -1 || true)
    summary+=("$target: ${runs:-?} runs, exit $status")
    if [ "$status" -ne 0 ]; then
        failed+=("$target")
        grep -E 'ERROR|panicked|SUMMARY|Test unit written' "$log" | head -20 || true
    fi
done

printf '%s\n' "${summary[@]}"
if [ ${#failed[@]} -ne 0 ]; then
    echo "crashes or errors in: ${failed[*]}"
    exit 1
fi
