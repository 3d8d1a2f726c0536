#!/usr/bin/env bash
# Runs Debian sid's QEMU (qemu-system-x86_64, fetched into the cache on first
# use) with the given arguments, the way the guest scripts start it.
# Usage: qemu-sid.sh [QEMU ARGUMENTS...]
#   qemu-sid.sh --version
#   qemu-sid.sh -device vhost-user-test-device-pci,help
# Needs root: QEMU runs in a private mount namespace in which its own module
# directory covers the host QEMU's (see lib.sh, qemu_sid_command).
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
require_root
fetch_qemu_sid
exec "${QEMU_SID_CMD[@]}" "$@"
