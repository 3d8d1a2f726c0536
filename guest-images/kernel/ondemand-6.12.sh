#!/usr/bin/env bash
# Builds (or finds in the cache) the 6.12 guest kernel the fscache tier boots: Debian trixie's
# linux-source-6.12, allnoconfig + ondemand-6.12.config (CACHEFILES_ONDEMAND,
# EROFS_FS_ONDEMAND). Prints the directory holding it, as build.sh does.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
exec "$here/build.sh" --package linux-source-6.12 --suite trixie \
	--fragment "$here/ondemand-6.12.config" --name ondemand-6.12 "$@"
