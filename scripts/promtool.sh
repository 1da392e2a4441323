#!/usr/bin/env bash
# Prints the path of a promtool (Prometheus' own text-format parser and
# linter), for the metrics tests (tests/daemon/metrics_http.rs reads it from
# $PROMTOOL). The one in PATH if there is one; else promtool extracted from
# Debian's prometheus package into a cache, never installed (installing it
# would bring a Prometheus server and its service). Prints nothing, and
# says why on stderr, when none can be had: the tests then skip their
# promtool parse loudly.
set -euo pipefail

if command -v promtool >/dev/null; then
    command -v promtool
    exit 0
fi
dir="${XDG_CACHE_HOME:-$HOME/.cache}/vfio-intx-promtool"
tool="$dir/usr/bin/promtool"
if [ ! -x "$tool" ]; then
    mkdir -p "$dir"
    tmp="$(mktemp -d "$dir/.download.XXXXXX")"
    # As root apt-get warns that the download is unsandboxed; harmless.
    if ! (cd "$tmp" && { apt-get download -q prometheus >&2 \
            || { apt-get update -q >&2 && apt-get download -q prometheus >&2; }; }); then
        rm -rf "$tmp"
        echo "promtool.sh: apt-get download prometheus failed; no promtool" >&2
        exit 0
    fi
    debs=("$tmp"/prometheus_*.deb)
    dpkg-deb -x "${debs[0]}" "$tmp/unpack" && install -m 0755 "$tmp/unpack/usr/bin/promtool" "$dir/promtool.new" \
        && mkdir -p "$dir/usr/bin" && mv "$dir/promtool.new" "$tool"
    rm -rf "$tmp"
fi
[ -x "$tool" ] && echo "$tool"
