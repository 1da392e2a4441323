#!/usr/bin/env bash
# The whole test suite, all tiers. This is the README's test command and what
# CI runs (.ci/run). Installs what the tiers need (Debian packages, the guest
# kernel) through guest/prepare.sh.
#
#   lint   cargo fmt --check, clippy (warnings denied), rustdoc (warnings denied)
#   tier 1 unit, property and model tests on the simulated device; the loom
#          model check of the gate
#   tier 2 real KVM on /dev/kvm (added with the KVM wiring)
#   package the Debian package built (packaging/build-deb.sh) and inspected
#          (tests/package.sh)
#   tier 3 real vfio-pci / uio_pci_generic inside a QEMU guest (guest/)
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
step() { printf '\n==> %s\n' "$*"; }

step "lint: cargo fmt --check"
cargo fmt --check

step "lint: cargo clippy --all-targets --all-features -- -D warnings"
cargo clippy --all-targets --all-features -- -D warnings

step "lint: the library builds with the daemon alone (no CLI, no test kit)"
cargo check --lib --no-default-features --features daemon

step "lint: cargo doc (warnings denied)"
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --all-features

step "tools: promtool for the metrics tests (Prometheus' own parser)"
# The whole suite skips nothing: no promtool is a failure here (a bare
# `cargo test` without one skips the promtool parse loudly).
if [ -z "${PROMTOOL:-}" ]; then
    PROMTOOL="$(scripts/promtool.sh)"
fi
if [ -z "$PROMTOOL" ]; then
    echo "no promtool: see scripts/promtool.sh" >&2
    exit 1
fi
export PROMTOOL
echo "PROMTOOL=$PROMTOOL"

step "tier 1: cargo test"
cargo test

step "tier 1: loom model check of the config-access gate"
scripts/loom.sh

step "package: build the Debian package and inspect it"
# What tests/package.sh needs (cargo-deb: packaging/build-deb.sh installs its
# pinned version); installed only when missing.
missing=()
for tool in dpkg-deb:dpkg man:man-db systemd-analyze:systemd zsh:zsh fish:fish; do
    command -v "${tool%%:*}" >/dev/null || missing+=("${tool#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" ||
        { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"; }
fi
tests/package.sh

step "tier 3: QEMU guest with real vfio-pci and uio_pci_generic"
if [ -x scripts/tier3.sh ]; then
    scripts/tier3.sh
else
    guest/prepare.sh
    guest/smoke.sh
fi

step "all tiers passed"
