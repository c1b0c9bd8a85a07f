#!/usr/bin/env bash
# Runs the fuzz targets (tests/fuzz.rs: the upgrade request, the frame decoder, the chat
# protocol, the cluster wire) long, in release mode, and prints cases and rates per target.
# CI runs the same targets with 2,000 cases each as part of `cargo test`.
#
# Usage: scripts/fuzz.sh [--cases N]    (default 10000000 cases per target)
#   -h, --help   this text
set -euo pipefail
source "$(dirname "$0")/lib.sh"
help_if_asked "$0" "$@"
cd "$(dirname "$0")/.."
cases=10000000
while [ $# -gt 0 ]; do
  case $1 in
    --cases) cases=$2; shift 2 ;;
    *) echo "fuzz: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
SHARDGATE_FUZZ_CASES=$cases cargo test --release --quiet --test fuzz -- --nocapture --test-threads 1 2>&1 |
  grep -oE 'fuzz [a-z ]+: .*|panicked.*|minimal failing input.*|test result.*'
