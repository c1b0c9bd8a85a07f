#!/usr/bin/env bash
# bench-store.sh [ROUNDS]: the store's append path alone, side by side in alternating
# rounds (`store-load append`, default 3): the embedded store, one Redis, and a Redis
# Cluster of three primaries. Starts the redis-servers on free loopback ports with their
# append-only files synced before every reply (`appendfsync always`: what `stored` needs)
# in target/bench-store, and stops them by PID. On Redis one group is one pipeline (one
# per primary on the cluster): the "syncs" column is then round trips per second, and the
# last column Redis's memory per message instead of the disk's.
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
start_redis "$out/single"
pids=("$redis_pid")
trap 'kill -TERM "${pids[@]}" 2>/dev/null; wait 2>/dev/null || true' EXIT
url="redis://127.0.0.1:$redis_port/0"
start_redis_cluster "$out/cluster"
pids+=("${redis_cluster_pids[@]}")
cluster_url="redis+cluster://$redis_cluster_seeds"
for round in $(seq "$rounds"); do
  echo "== round $round: embedded"
  target/release/store-load append --duration 3s --dir "$out/embedded"
  echo "== round $round: redis (appendfsync always)"
  target/release/store-load append --duration 3s --redis "$url"
  echo "== round $round: redis cluster, three primaries (appendfsync always)"
  target/release/store-load append --duration 3s --redis "$cluster_url"
done
