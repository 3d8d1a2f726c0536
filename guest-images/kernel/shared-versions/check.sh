#!/usr/bin/env bash
# Builds the shared-versions guest kernel (Debian's linux-source-7.2, allnoconfig + this
# directory's config + patches; cached) and boots it twice: against berth without a version
# table, where the patched guest must behave exactly like an unpatched one (mounts, file
# operations, xattrs, both cache modes), proving the extension stays off unless negotiated;
# and on sid's QEMU against berth --shared-cache (the sv-* checks of
# guest-images/shared-versions-tier.sh): host changes seen at the next access, no requests
# for a stat storm over unchanged files; two guests on two daemons see each other's changes
# and a host process's.
#
# Usage: guest-images/kernel/shared-versions/check.sh [--build-only]
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
build_only=0
[ "${1:-}" = --build-only ] && build_only=1
out=$("$here/../build.sh" --name shared-versions-7.2 --package linux-source-7.2 --suite sid \
	--fragment "$here/config" --patches "$here/patches")
echo "shared-versions kernel: $out ($(cat "$out/source-version"))"
[ $build_only -eq 1 ] && exit 0
# Everything is built in: no module tree. The sv-* checks run only with this kernel.
BERTH_SHARED_VERSIONS_KERNEL=1 "$here/../../test.sh" --daemon berth --kernel "$out/vmlinux" \
	--only mount,file-ops,xattr,cache-never,cache-auto,umount,daemons-exit-0,no-stray,sv-mount,sv-host-changes,sv-stat-storm,sv-umount,sv-storm-requests,sv-daemons-exit-0,sv-pair-mount,sv-pair-seen,sv-pair-host-changes,sv-pair-umount,sv-pair-change,sv-pair-a-host-changes,sv-pair-daemons-exit-0
