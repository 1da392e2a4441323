#!/usr/bin/env bash
# The whole test suite, all tiers. This is the README's test command and what
# CI runs (.ci/run). Installs what the tiers need (Debian packages, the guest
# kernel) through guest/prepare.sh.
#
#   lint   cargo fmt --check, clippy (warnings denied), rustdoc (warnings denied)
#   tier 1 unit, property and model tests on the simulated device; the loom
#          model check of the gate
#   tier 2 real KVM on /dev/kvm (added with the KVM wiring)
#   tier 3 real vfio-pci / uio_pci_generic inside a QEMU guest (guest/)
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
step() { printf '\n==> %s\n' "$*"; }

step "lint: cargo fmt --check"
cargo fmt --check

step "lint: cargo clippy --all-targets --all-features -- -D warnings"
cargo clippy --all-targets --all-features -- -D warnings

step "lint: cargo doc (warnings denied)"
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --all-features

step "tools: promtool for the metrics tests (Prometheus' own parser)"
if [ -z "${PROMTOOL:-}" ]; then
    PROMTOOL="$(scripts/promtool.sh || true)"
    if [ -n "$PROMTOOL" ]; then export PROMTOOL; else unset PROMTOOL; fi
fi
echo "PROMTOOL=${PROMTOOL:-(none: the metrics tests skip their promtool parse)}"

step "tier 1: cargo test"
cargo test

step "tier 1: loom model check of the config-access gate"
scripts/loom.sh

step "tier 3: QEMU guest with real vfio-pci and uio_pci_generic"
if [ -x scripts/tier3.sh ]; then
    scripts/tier3.sh
else
    guest/prepare.sh
    guest/smoke.sh
fi

step "all tiers passed"
