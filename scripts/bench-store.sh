#!/usr/bin/env bash
# bench-store.sh [ROUNDS]: the store's append path alone, the embedded store and the Redis
# store side by side (`store-load append`, rounds alternating, default 3). Starts a
# redis-server on a free loopback port with its append-only file synced before every
# reply (`appendfsync always`: what `stored` needs) in target/bench-store, and stops it
# by PID. On Redis one group is one pipeline: its "syncs" column is round trips per
# second, and the last column is Redis's memory per message instead of the disk's.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
help_if_asked "$0" "$@"
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
rounds=${1:-3}
out=$root/target/bench-store
rm -rf "$out"
mkdir -p "$out"
cargo build --release --quiet -p shardgate-bench
start_redis "$out"
trap 'kill -TERM "$redis_pid" 2>/dev/null; wait "$redis_pid" 2>/dev/null || true' EXIT
url="redis://127.0.0.1:$redis_port/0"
for round in $(seq "$rounds"); do
  echo "== round $round: embedded"
  target/release/store-load append --duration 3s --dir "$out/embedded"
  echo "== round $round: redis (appendfsync always)"
  target/release/store-load append --duration 3s --redis "$url"
done
