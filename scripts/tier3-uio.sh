#!/usr/bin/env bash
# Tier-3 tests of the uio_pci_generic backend and the sysfs host helpers
# (tests/tier3_uio.rs), inside the QEMU guest with the real kernel drivers.
#
# Runs the test binary twice, so that both branches of the nointxmask tests
# really run:
#   1. vfio-pci loaded with default parameters (PCI 2.3 masking);
#   2. vfio-pci loaded with nointxmask=1 (disable_irq mode, exclusive lines).
#
# usage: scripts/tier3-uio.sh [TEST-FILTER...]
#   Extra arguments go to the test binary (e.g. a test name filter).
# Environment: TIER3_TIMEOUT (seconds per boot, default 300).
# Exit status: 0 when both runs pass; otherwise the first failing run's status
# (guest/run.sh: 124 timeout, 125 no verdict).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
PROG=scripts/tier3-uio.sh
TIMEOUT="${TIER3_TIMEOUT:-300}"

"$REPO/guest/prepare.sh"

bins="$("$REPO/guest/build-static.sh" --features tier3 --test tier3_uio)"
[ "$(printf '%s\n' "$bins" | wc -l)" = 1 ] || {
    echo "$PROG: expected one test executable, got: $bins" >&2
    exit 1
}
name="$(basename "$bins")"

rc=0
summary=()
run() { # label, run.sh options...
    local label="$1" t0 t1 r=0
    shift
    echo "$PROG: ==== $label" >&2
    t0="$(date +%s.%N)"
    "$REPO/guest/run.sh" --timeout "$TIMEOUT" "$@" --bin "$bins" -- \
        "$name" --test-threads=1 --nocapture "${ARGS[@]}" || r=$?
    t1="$(date +%s.%N)"
    summary+=("$(awk -v a="$t0" -v b="$t1" -v l="$label" -v r="$r" \
        'BEGIN { printf "%-40s rc=%d  %.1f s", l, r, b - a }')")
    if [ "$r" != 0 ] && [ "$rc" = 0 ]; then rc="$r"; fi
}

ARGS=("$@")
run "vfio-pci default parameters"
run "vfio-pci nointxmask=1" --vfio-pci-args nointxmask=1

echo "$PROG: summary:" >&2
for line in "${summary[@]}"; do echo "$PROG:   $line" >&2; done
exit "$rc"
