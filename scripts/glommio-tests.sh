#!/usr/bin/env bash
# glommio-tests.sh: runs the vendored glommio fork's own executor, timer and reactor tests
# (`cargo test --lib -- executor:: timer:: sys::`), from a copy under target/ so that the
# fork builds as a crate of its own, with the dependency versions of
# scripts/glommio-tests.Cargo.lock (glommio 0.9's tests need rand 0.8).
#
# Two upstream tests pin behaviour that shardgate's patches change on purpose, and are
# skipped (vendor/glommio/SHARDGATE-PATCH.md says why):
#   executor::test::test_runtime_stats      the preemption deadline reads the clock on
#                                           every 8th check only
#   sys::uring::tests::timeout_smoke_test   a wait after a cancellation may return early
set -euo pipefail
source "$(dirname "$0")/lib.sh"
help_if_asked "$0" "$@"
cd "$(dirname "$0")/.."
copy=target/glommio-fork
rm -rf "$copy"
mkdir -p "$copy"
cp -r vendor/glommio "$copy/glommio"
cp scripts/glommio-tests.Cargo.lock "$copy/glommio/Cargo.lock"
# A workspace of its own: under target/ it would otherwise belong to shardgate's.
printf '\n[workspace]\n' >>"$copy/glommio/Cargo.toml"
cd "$copy/glommio"
CARGO_TARGET_DIR=../target cargo test --lib --locked -- executor:: timer:: sys:: \
  --skip executor::test::test_runtime_stats --skip sys::uring::tests::timeout_smoke_test
