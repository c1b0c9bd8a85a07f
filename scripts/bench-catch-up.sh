#!/usr/bin/env bash
# bench-catch-up.sh [MESSAGES] [CONVERSATIONS]: an offline user's catch-up over a real
# connection. Stores MESSAGES (default 100,000) over CONVERSATIONS (default 1,000) direct
# conversations of user `reader` with `store-load fill`, starts a one-shard gateway on
# that data directory, and lets `catch-up` fetch them all: wall time and the gateway's CPU.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
help_if_asked "$0" "$@"
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
messages=${1:-100000} conversations=${2:-1000}
out=$root/target/bench-catch-up
rm -rf "$out"
mkdir -p "$out"
cargo build --release --quiet -p shardgate -p shardgate-bench
target/release/store-load fill --messages "$messages" --conversations "$conversations" --dir "$out/messages"
# A client catching up asks one page per conversation: the per-connection rate limit is off.
start_gateway "$out" --shards 1 --insecure-dev-auth --ready-conversations "$conversations" --rate-limit 0 --rate-limit-bytes 0
target/release/catch-up --addr "127.0.0.1:$port" --pid "$server"
