#!/usr/bin/env bash
# Run every check and test of the project, as CI does.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# The end-to-end tests run the farmgate and farmctl binaries: build them all first.
cargo build --workspace --bins
cargo nextest run --workspace --no-fail-fast
