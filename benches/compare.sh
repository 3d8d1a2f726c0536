#!/usr/bin/env bash
# Builds berth and the load generator (release) and compares berth with virtiofsd and with
# the native syscalls on the same file set, alternating runs.
#
#   benches/compare.sh [--quick] [extra berth-loadgen compare options...]
#
# --quick: smoke mode for CI (small file set, ~0.25 s per workload, a few seconds in all);
#          exits non-zero unless every workload completed with correct data.
# Environment:
#   VIRTIOFSD      virtiofsd binary (default: the cached 1.14.0 build; skipped if missing)
#   LOADGEN_DIR    where the file set lives (default: a directory under the cache dir)
#   LOADGEN_JSON   where to write the per-run JSON (default: benches/results/full.json;
#                  --quick writes under $TMPDIR)
#   CARGO_TARGET_DIR is honoured.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/berth"

mode=full
args=()
for arg in "$@"; do
    case "$arg" in
        --quick) mode=quick; args+=(--quick) ;;
        -h|--help) sed -n '2,16p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) args+=("$arg") ;;
    esac
done

cd "$root"
cargo build --release --quiet -p berth -p berth-loadgen
target="${CARGO_TARGET_DIR:-$root/target}"
berth="$target/release/berth"
loadgen="$target/release/berth-loadgen"

virtiofsd="${VIRTIOFSD:-$cache/virtiofsd-1.14.0/bin/virtiofsd}"
# The comparison needs the peer, the quick CI run too: build it once into the cache (a few
# minutes; it links Debian's libseccomp and libcap-ng).
if [[ ! -x "$virtiofsd" && -z "${VIRTIOFSD:-}" ]]; then
    if [[ $(id -u) == 0 ]]; then
        for pkg in libseccomp-dev libcap-ng-dev pkg-config; do
            dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" ||
                DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$pkg"
        done
    fi
    echo "building virtiofsd 1.14.0 into $cache/virtiofsd-1.14.0 (once)"
    cargo install --locked virtiofsd --version 1.14.0 --root "$cache/virtiofsd-1.14.0" ||
        echo "virtiofsd did not build; comparing berth with native only"
fi
if [[ ! -x "$virtiofsd" ]]; then
    echo "virtiofsd not found at $virtiofsd (install: cargo install virtiofsd --version 1.14.0 --root $cache/virtiofsd-1.14.0); running berth and native only"
    virtiofsd_args=()
else
    virtiofsd_args=(--virtiofsd "$virtiofsd")
fi

dir="${LOADGEN_DIR:-$cache/loadgen-$mode}"
if [[ $mode == quick ]]; then default_json="${TMPDIR:-/tmp}/berth-loadgen-quick.json"; else default_json="$root/benches/results/full.json"; fi
json="${LOADGEN_JSON:-$default_json}"
mkdir -p "$(dirname "$json")"

exec "$loadgen" compare --berth "$berth" "${virtiofsd_args[@]}" --dir "$dir" --json "$json" "${args[@]}"
