#!/usr/bin/env bash
# The whole test suite, as CI runs it: formatting, lints, unit/property/integration tests
# of the workspace, then the Autobahn|Testsuite (cases 1-10) against a real gateway.
# Installs what it needs that a fresh machine of this kind lacks (the Autobahn virtualenv).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "== cargo test"
cargo test --workspace
echo "== autobahn testsuite"
scripts/autobahn.sh
