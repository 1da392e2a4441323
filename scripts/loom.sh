#!/usr/bin/env bash
# Model-checks the config-access gate with loom (tests/loom_gate.rs).
# A separate target directory keeps the --cfg loom build from invalidating
# the normal one.
set -euo pipefail
cd "$(dirname "$0")/.."
RUSTFLAGS="--cfg loom" cargo test --release --test loom_gate --target-dir target/loom "$@"
