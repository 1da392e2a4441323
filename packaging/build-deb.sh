#!/usr/bin/env bash
# Builds the Debian package and prints its path (the last line of stdout).
#
#   packaging/build-deb.sh
#
# 1. the release binary (cargo build --release; the profile the benchmarks'
#    builds share);
# 2. its man pages and bash/zsh/fish completions, generated from the binary's
#    own clap command (`vfio-intx generate-assets`);
# 3. the packaged /etc/vfio-intx/daemon.toml: config/daemon.toml with its
#    [[device]] tables commented out, so the daemon starts on a host with no
#    device configured and binds nothing until the operator lists one;
# 4. cargo deb --no-build ([package.metadata.deb] in Cargo.toml), with the
#    pinned cargo-deb, installed here if missing.
# It writes target/package-assets (the generated files, named in Cargo.toml's
# assets: not under target/release, which cargo-deb takes for build products
# and neither compresses nor leaves unstripped) and the package in
# target/debian.
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_DEB_VERSION=3.8.0

log() { echo "build-deb: $*" >&2; }

if [ "$(cargo deb --version 2>/dev/null)" != "cargo-deb $CARGO_DEB_VERSION" ]; then
    log "installing cargo-deb $CARGO_DEB_VERSION"
    cargo install cargo-deb --version "$CARGO_DEB_VERSION" --locked >&2
fi

log "release build"
cargo build --release --locked --bin vfio-intx >&2

target=${CARGO_TARGET_DIR:-target}
assets=target/package-assets
rm -rf "$assets"
mkdir -p "$assets"
date=$(git log -1 --format=%cs 2>/dev/null || date -u +%F)
log "man pages and completions ($date)"
"$target/release/vfio-intx" generate-assets --out "$assets" --date "$date" >/dev/null

# A [[device]] table runs to the next table header; its key lines (and the
# header) are commented out, its comments and blank lines kept.
awk '
    NR == 1 {
        print "# Installed by the vfio-intx package. No device is armed: list yours"
        print "# (uncomment and edit a [[device]] example below), check the file with"
        print "# `vfio-intx validate /etc/vfio-intx/daemon.toml`, then"
        print "# `systemctl enable --now vfio-intx`."
        print "#"
    }
    /^\[/ { device = ($0 ~ /^\[\[device\]\]/) }
    device && /^[^#[:space:]]/ { print "# " $0; next }
    { print }
' config/daemon.toml >"$assets/daemon.toml"
"$target/release/vfio-intx" validate "$assets/daemon.toml" >/dev/null

log "cargo deb"
deb=$(cargo deb --no-build --locked | tail -n 1)
[ -f "$deb" ] || {
    log "cargo deb did not name a package: $deb"
    exit 1
}
echo "$deb"
