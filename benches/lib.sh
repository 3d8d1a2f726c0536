# shellcheck shell=bash
# Shared pieces of the load generator benchmarks (sourced by benches/blk-compare.sh and
# benches/volume-flush.sh): where the repository and the cache are, the common options, the
# skip that BERTH_TESTS_NO_SKIP=1 turns into a failure, the test venv's moto_server and the
# default place of the JSON results.
#
# Globals it sets: root (the repository), cache (berth's cache directory), and, through
# bench_parse_args, mode, json and args.
# shellcheck disable=SC2034

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/berth"

# bench_parse_args ARG...: --quick sets mode=quick and is passed on, --json FILE or
# --json=FILE sets json, -h/--help prints the script's header comment and exits; every other argument is appended to args, for the script to pick out its own
# options or pass them on.
bench_parse_args() {
    mode=full
    json=""
    args=()
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --quick) mode=quick; args+=(--quick) ;;
            --json)
                [[ $# -ge 2 ]] || { echo "--json needs a file" >&2; exit 2; }
                json="$2"; shift ;;
            --json=*) json="${1#--json=}" ;;
            -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1' "$0"; exit 0 ;;
            *) args+=("$1") ;;
        esac
        shift
    done
}

# bench_skip_or_fail WHY SKIP_LINE: a missing tool. Under BERTH_TESTS_NO_SKIP=1 (CI) a skip
# is a failure: prints why and exits 1; otherwise prints SKIP_LINE and returns, for the
# script to exit or go on without the tool.
bench_skip_or_fail() {
    if [[ "${BERTH_TESTS_NO_SKIP:-}" == 1 ]]; then
        echo "FAIL: $1; BERTH_TESTS_NO_SKIP=1 makes a skip a failure"
        exit 1
    fi
    echo "$2"
}

# Why bench_find_moto failed.
MOTO_MISSING="moto_server not found (tests/run-all.sh installs it into $cache/venv)"

# bench_find_moto: puts the test venv, where tests/run-all.sh installs the S3 server, on
# PATH; succeeds when moto_server is on PATH then.
bench_find_moto() {
    export PATH="$cache/venv/bin:$PATH"
    command -v moto_server >/dev/null
}

# bench_default_json QUICK_NAME FULL_NAME: unless --json named a file, results go to
# $TMPDIR/QUICK_NAME in quick mode and to benches/results/FULL_NAME otherwise; makes the
# file's directory.
bench_default_json() {
    if [[ -z "$json" ]]; then
        if [[ $mode == quick ]]; then json="${TMPDIR:-/tmp}/$1"; else json="$root/benches/results/$2"; fi
    fi
    mkdir -p "$(dirname "$json")"
}
