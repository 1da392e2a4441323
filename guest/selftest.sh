#!/usr/bin/env bash
# Self-test of the guest harness itself (about 30 s, 5 boots):
#   1. smoke.sh: /dev/kvm, both /dev/vfio/<group>, /dev/uio0, reset methods
#   2. a throwaway Rust crate (made in a temp dir) built with build-static.sh runs
#      inside the guest, and its test harness sees the guest's environment
#   3. a failing Rust test makes run.sh exit with the test binary's status (101)
#   4. a command's exit status comes back through the verdict line
#   5. a hang ends with the timeout (exit 124) and a monitor dump in the log
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PROG=guest/selftest.sh
fail() { echo "$PROG: FAIL: $*" >&2; exit 1; }
step() { echo "$PROG: ==== $*" >&2; }

TMP="$(mktemp -d "${TMPDIR:-/tmp}/vfio-intx-selftest.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

step "1. smoke check"
"$HERE/smoke.sh" || fail "smoke.sh failed"

step "2. static Rust test binary in the guest"
mkdir -p "$TMP/demo/src" "$TMP/demo/tests"
cat >"$TMP/demo/Cargo.toml" <<'EOF'
[package]
name = "guest-demo"
version = "0.1.0"
edition = "2021"
publish = false

[dependencies]
EOF
echo 'pub fn answer() -> u32 { 42 }' >"$TMP/demo/src/lib.rs"
cat >"$TMP/demo/tests/in_guest.rs" <<'EOF'
#[test]
fn runs_in_the_guest() {
    println!("hello from a static Rust test binary");
    assert_eq!(guest_demo::answer(), 42);
    assert_eq!(std::env::var("VFIO_INTX_IN_GUEST").as_deref(), Ok("1"));
    let bdf = std::env::var("VFIO_INTX_EDU_RESET").unwrap();
    let vendor = std::fs::read_to_string(format!("/sys/bus/pci/devices/{bdf}/vendor")).unwrap();
    println!("edu {bdf} vendor {}", vendor.trim());
    assert_eq!(vendor.trim(), "0x1234");
    assert!(std::path::Path::new("/dev/kvm").exists());
    assert_eq!(std::thread::spawn(|| 7).join().unwrap(), 7);
}

#[test]
fn fails_when_asked() {
    assert!(std::env::var("DEMO_FAIL").is_err(), "DEMO_FAIL is set: failing on purpose");
}
EOF
bins="$("$HERE/build-static.sh" --manifest-path "$TMP/demo/Cargo.toml" --test in_guest)" \
    || fail "build-static.sh failed"
[ "$(echo "$bins" | wc -l)" = 1 ] || fail "expected one test executable, got: $bins"
name="$(basename "$bins")"
out="$TMP/rust.out"
"$HERE/run.sh" --timeout 120 --bin "$bins" -- "$name" --test-threads=1 --nocapture | tee "$out" \
    || fail "the Rust test binary failed in the guest"
grep -q 'hello from a static Rust test binary' "$out" || fail "the test's output did not reach stdout"
grep -q '^test result: ok. 2 passed' "$out" || fail "unexpected Rust test result"

step "3. a failing Rust test"
rc=0
# Its output goes to a file: a deliberate "test result: FAILED" line on stdout would
# look like a real failure to anyone reading this script's output.
"$HERE/run.sh" --timeout 120 --bin "$bins" -- env DEMO_FAIL=1 "$name" --test-threads=1 \
    >"$TMP/fail.out" || rc=$?
[ "$rc" = 101 ] || fail "a failing Rust test gave exit status $rc, expected 101"
grep -q '^test result: FAILED. 1 passed; 1 failed' "$TMP/fail.out" || fail "unexpected output: $TMP/fail.out"

step "4. exit status through the verdict"
rc=0
"$HERE/run.sh" --timeout 60 -- sh -c 'echo "exiting with 3"; exit 3' || rc=$?
[ "$rc" = 3 ] || fail "exit status $rc, expected 3"

step "5. timeout with a monitor dump"
rc=0
mkdir -p "$HERE/../target/guest"
log="$(cd "$HERE/.." && pwd)/target/guest/selftest-timeout.log"
"$HERE/run.sh" --timeout 6 --log "$log" -- sh -c 'echo hanging; sleep 600' || rc=$?
[ "$rc" = 124 ] || fail "a hang gave exit status $rc, expected 124"
grep -q '^---- (qemu) info registers' "$log" || fail "no register dump in $log"
grep -q '^---- (qemu) info lapic' "$log" || fail "no lapic dump in $log"

echo "$PROG: all harness self-tests passed" >&2
