#!/usr/bin/env bash
# Build statically linked test executables of the Rust crate for the QEMU guest
# (whose initramfs has no libc) and print their paths, one per line, on stdout.
#
# usage: guest/build-static.sh [CARGO TEST ARGS...]
#   e.g. guest/build-static.sh --test tier3_vfio
#        guest/build-static.sh --manifest-path /path/to/Cargo.toml --tests
#
# Runs
#   RUSTFLAGS="$RUSTFLAGS -C target-feature=+crt-static" cargo test --no-run --release
#       --target x86_64-unknown-linux-gnu --message-format=json-render-diagnostics ARGS
# with the target dir <workspace>/target/guest-build (unless ARGS has --target-dir), so
# the normal build is not invalidated. `--target` keeps the flag away from build scripts
# and proc macros. Cargo's messages go to stderr.
#
# Then: bins=$(guest/build-static.sh --test tier3_vfio)
#       guest/run.sh $(printf -- '--bin %s ' $bins) -- tier3_vfio-<hash> --test-threads=1
set -euo pipefail

PROG=guest/build-static.sh
die() { echo "$PROG: error: $*" >&2; exit 1; }

case "${1:-}" in
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
esac

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
TARGET=x86_64-unknown-linux-gnu

command -v cargo >/dev/null || die "cargo not found"
command -v python3 >/dev/null || die "python3 not found"

manifest=""
have_target_dir=0
prev=""
for a in "$@"; do
    case "$prev" in --manifest-path) manifest="$a" ;; esac
    case "$a" in
        --manifest-path=*) manifest="${a#--manifest-path=}" ;;
        --target-dir|--target-dir=*) have_target_dir=1 ;;
        --target|--target=*) die "do not pass --target: the guest needs $TARGET" ;;
    esac
    prev="$a"
done

extra=()
if [ "$have_target_dir" = 0 ]; then
    if [ -n "$manifest" ]; then
        ws="$(cargo locate-project --workspace --message-format plain --manifest-path "$manifest")" \
            || die "cannot locate the cargo workspace of $manifest"
    else
        ws="$(cd "$REPO" && cargo locate-project --workspace --message-format plain)" \
            || die "no Cargo.toml at $REPO (use --manifest-path)"
    fi
    extra=(--target-dir "$(dirname "$ws")/target/guest-build")
fi

if [ -n "$manifest" ]; then
    run_dir="$PWD"
else
    run_dir="$REPO"
fi

json="$(mktemp "${TMPDIR:-/tmp}/vfio-intx-build.XXXXXX")"
trap 'rm -f "$json"' EXIT

echo "$PROG: building static test executables for $TARGET" >&2
rc=0
(cd "$run_dir" && RUSTFLAGS="${RUSTFLAGS:+$RUSTFLAGS }-C target-feature=+crt-static" \
    cargo test --no-run --release --target "$TARGET" \
        --message-format=json-render-diagnostics "${extra[@]}" "$@") >"$json" || rc=$?
[ "$rc" = 0 ] || die "cargo test --no-run failed (exit $rc)"

python3 - "$json" <<'EOF' || die "no usable test executable in cargo's output"
import json, struct, sys
exes = []
for line in open(sys.argv[1]):
    line = line.strip()
    if not line.startswith("{"):
        continue
    msg = json.loads(line)
    if msg.get("reason") == "compiler-artifact" and msg.get("executable") \
            and msg.get("profile", {}).get("test"):
        exes.append(msg["executable"])
if not exes:
    sys.exit("cargo built no test executable")

def interp(path):
    with open(path, "rb") as f:
        h = f.read(64)
        phoff, = struct.unpack_from("<Q", h, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", h, 0x36)
        for i in range(phnum):
            f.seek(phoff + i * phentsize)
            if struct.unpack("<I", f.read(4))[0] == 3:  # PT_INTERP
                return True
    return False

bad = [e for e in exes if interp(e)]
if bad:
    sys.exit("not statically linked (RUSTFLAGS overridden by a config?): " + " ".join(bad))
for e in dict.fromkeys(exes):
    print(e)
EOF
