#!/usr/bin/env bash
# Tier-3 tests: the crate against the real vfio-pci and uio_pci_generic drivers, inside
# the QEMU guest of guest/ (see guest/README.md).
#
# usage: scripts/tier3.sh [--no-bench] [--timeout SECONDS]
#
# 1. guest/prepare.sh (packages, guest kernel; idempotent).
# 2. Builds every tier3_* integration test target of the crate statically
#    (guest/build-static.sh --features tier3 --test ...); a target without tests is
#    reported and skipped.
# 3. Boots the guest once per test binary and runs `BINARY --test-threads=1`.
# 4. Unless --no-bench: builds the tier3_* bench targets the same way and boots once per
#    bench, printing its figures (figures, not pass/fail criteria; a crash fails).
#
# Every boot adds a pcie-pci-bridge with two pci-testdev functions behind it: they share
# an IOMMU group, which the group-viability test needs. The tier3_hot_reset boot also adds
# two edus behind a second pcie-pci-bridge (a bus reset reaches both). Guest logs are kept in
# target/guest/tier3-<target>-<date>.log (one per boot, never overwritten). Exit status 0
# only if every boot passed.
set -euo pipefail

PROG=scripts/tier3.sh
die() { echo "$PROG: error: $*" >&2; exit 2; }
info() { echo "$PROG: $*" >&2; }

BENCH=1
TIMEOUT=300
while [ $# -gt 0 ]; do
    case "$1" in
        --no-bench) BENCH=0; shift ;;
        --timeout) [ $# -ge 2 ] || die "--timeout needs seconds"; TIMEOUT="$2"; shift 2 ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) die "unknown argument: $1 (try --help)" ;;
    esac
done

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
LOGDIR="$REPO/target/guest"
mkdir -p "$LOGDIR"
STAMP="$(date +%Y%m%d-%H%M%S)-$$"
T0=$(date +%s.%N)
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1fs", b - a }'; }

# Devices added to every boot: two functions behind a PCIe-to-PCI bridge share an IOMMU
# group (the guest's topology has no such group otherwise).
# shellcheck disable=SC2054 # the commas are QEMU option syntax
QEMU_ARGS=(
    --qemu-arg -device --qemu-arg pcie-pci-bridge,id=tier3br,bus=pcie.0,addr=0x13
    --qemu-arg -device --qemu-arg pci-testdev,bus=tier3br,addr=0x1
    --qemu-arg -device --qemu-arg pci-testdev,bus=tier3br,addr=0x2
)

# tier3_* targets of a kind ("test" or "bench") declared in Cargo.toml.
targets() {
    cargo metadata --no-deps --format-version 1 | python3 -c '
import json, sys
kind = sys.argv[1]
for pkg in json.load(sys.stdin)["packages"]:
    for t in pkg["targets"]:
        if kind in t["kind"] and t["name"].startswith("tier3_"):
            print(t["name"])
' "$1"
}

# Builds the given targets statically; prints "<name> <path>" lines.
build() { # kind names...
    local kind="$1"; shift
    local args=() name path
    for name in "$@"; do args+=("--$kind" "$name"); done
    local paths
    paths="$(guest/build-static.sh --features tier3 "${args[@]}")" || die "static build failed"
    for name in "$@"; do
        path="$(printf '%s\n' "$paths" | grep -E "/${name}-[0-9a-f]+\$" | head -n 1)"
        [ -n "$path" ] || die "no executable for $kind target $name in: $paths"
        echo "$name $path"
    done
}

FAILED=()
boot() { # label log path [run.sh options --] args...
    local label="$1" log="$2" path="$3"; shift 3
    local t rc=0 opts=()
    if [ "${1:-}" = --run-opts ]; then
        shift
        while [ "$1" != -- ]; do opts+=("$1"); shift; done
        shift
    fi
    t=$(date +%s.%N)
    info "booting the guest for $label"
    guest/run.sh --timeout "$TIMEOUT" --log "$log" "${QEMU_ARGS[@]}" "${opts[@]}" --bin "$path" \
        -- "$(basename "$path")" "$@" || rc=$?
    if [ "$rc" = 0 ]; then
        info "$label: passed ($(elapsed "$t"), log $log)"
    else
        info "$label: FAILED with rc=$rc ($(elapsed "$t"), log $log)"
        FAILED+=("$label")
    fi
}

info "preparing the guest"
guest/prepare.sh >&2

mapfile -t TESTS < <(targets test)
[ "${#TESTS[@]}" -gt 0 ] || die "no tier3_* test targets in Cargo.toml"
info "building ${TESTS[*]}"
T=$(date +%s.%N)
BUILT="$(build test "${TESTS[@]}")"
info "built in $(elapsed "$T")"

while read -r name path; do
    if [ -z "$("$path" --list --format terse 2>/dev/null | grep ': test$' || true)" ]; then
        info "$name: no tests in this target yet, skipped"
        continue
    fi
    if [ "$name" = tier3_hot_reset ]; then
        # Two edus on one conventional bus behind a pcie-pci-bridge (guest/run.sh's
        # BR_BUS): a bus reset reaches both.
        # shellcheck disable=SC2054 # the commas are QEMU option syntax
        boot "$name" "$LOGDIR/tier3-$name-$STAMP.log" "$path" --run-opts \
            --qemu-arg -device --qemu-arg pcie-pci-bridge,id=tier3bus,bus=pcie.0,addr=0x14 \
            --qemu-arg -device --qemu-arg edu,bus=tier3bus,addr=0x1 \
            --qemu-arg -device --qemu-arg edu,bus=tier3bus,addr=0x2 -- --test-threads=1
        continue
    fi
    if [ "$name" = tier3_cli ]; then
        # An e1000 on the root bus at slot 0x15: four slots after the root-bus
        # edu (0x11), so q35 routes both to GSI 21 (issue 15's shared line).
        # shellcheck disable=SC2054 # the commas are QEMU option syntax
        boot "$name" "$LOGDIR/tier3-$name-$STAMP.log" "$path" --run-opts \
            --qemu-arg -device --qemu-arg e1000,bus=pcie.0,addr=0x15 -- --test-threads=1
        continue
    fi
    if [ "$name" = tier3_daemon ]; then
        # The restart tests one a boot, the rest in one: the emulated guest's
        # interrupt layer hangs now and then on long interrupt-heavy boots
        # (guest/README.md), and short boots keep a hang to one test.
        boot "$name" "$LOGDIR/tier3-$name-$STAMP.log" "$path" --without-restarts
        while read -r test; do
            case "$test" in *restart*) ;; *) continue ;; esac
            boot "$name $test" "$LOGDIR/tier3-$name-$test-$STAMP.log" "$path" "$test"
        done < <("$path" --list | sed -n 's/: test$//p')
        continue
    fi
    boot "$name" "$LOGDIR/tier3-$name-$STAMP.log" "$path" --test-threads=1
    if [ "$name" = tier3_uio ]; then
        # vfio-pci reads nointxmask once, at load: a second boot exercises its
        # disable_irq mode, which the masking verdict must report.
        boot "$name (vfio_pci nointxmask=1)" "$LOGDIR/tier3-$name-nointxmask-$STAMP.log" "$path" \
            --run-opts --vfio-pci-args nointxmask=1 -- --test-threads=1
    fi
done <<<"$BUILT"

if [ "$BENCH" = 1 ]; then
    mapfile -t BENCHES < <(targets bench)
    if [ "${#BENCHES[@]}" -gt 0 ]; then
        info "building benches ${BENCHES[*]}"
        BUILT="$(build bench "${BENCHES[@]}")"
        while read -r name path; do
            log="$LOGDIR/tier3-bench-$name-$STAMP.log"
            boot "bench $name" "$log" "$path"
            echo "---- figures from bench $name (guest log $log):"
            grep -aE '^(tier3 bench|\([a-z]\) )' "$log" || echo "(no figures printed)"
        done <<<"$BUILT"
    fi
fi

info "total $(elapsed "$T0")"
if [ "${#FAILED[@]}" -gt 0 ]; then
    info "FAILED: ${FAILED[*]}"
    exit 1
fi
info "all tier-3 boots passed"
