#!/usr/bin/env bash
# bench-cluster-store.sh [ROUNDS] [HOLD]: the durable chat at 10,000 msg/s, side by side in
# alternating rounds (default 2 rounds, 30s holds): 16,000 connections at 0.625 msg/s each,
# direct pairs, through scripts/soak.sh in these set-ups:
#   embedded-1   one gateway, the embedded store (no NATS)
#   redis-3      three gateways joined through NATS on one shared Redis, half the pairs
#                split across nodes
#   redis-6      the same on six gateways
#   cluster-3    three gateways on a Redis Cluster of three primaries
#   relay-3      three gateways, no store (relay only): what the store costs
# Every Redis runs appendfsync always. Prints, per set-up, the medians over the rounds of
# the figures each soak summary gives: lost, client and server p99, the CPU of a shard and
# of a node's store and NATS threads (averages over the nodes), of Redis and of the load
# generator, and store groups per message (one pipeline each; on the Redis Cluster one
# per primary the group touches). Each run's folder is under target/bench-cluster-store.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
help_if_asked "$0" "$@"
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
rounds=${1:-2} hold=${2:-30s}
out=$root/target/bench-cluster-store
rm -rf "$out"
mkdir -p "$out"
common=(--connections 16000 --rate 0.625 --duration "$hold")
declare -A setup=(
  [embedded-1]="--nodes 1 --store embedded"
  [redis-3]="--nodes 3 --nats --store redis"
  [redis-6]="--nodes 6 --nats --store redis"
  [cluster-3]="--nodes 3 --nats --store redis-cluster"
  [relay-3]="--nodes 3 --nats --store none"
)
order=(embedded-1 redis-3 redis-6 cluster-3 relay-3)
for round in $(seq "$rounds"); do
  for name in "${order[@]}"; do
    echo "== round $round: $name"
    # shellcheck disable=SC2086 # the set-up's flags are words
    scripts/soak.sh "${common[@]}" ${setup[$name]} --results "$out/$name-$round" >"$out/$name-$round.txt" 2>&1 ||
      echo "   (the soak did not pass: $out/$name-$round.txt)"
    grep -E "^(soak |messages:|client latency|store:|redis:|load generator:)" "$out/$name-$round.txt" | sed 's/^/   /'
  done
done
python3 - "$out" "${order[@]}" <<'PY'
import json, pathlib, statistics, sys
out, names = pathlib.Path(sys.argv[1]), sys.argv[2:]
print(f"{'set-up':<12} {'runs':>4} {'lost':>5} {'client p99 ms':>13} {'server p99 ms':>13} {'shard CPU %':>11} {'store thr %':>11} {'NATS thr %':>10} {'redis CPU %':>11} {'load CPU %':>10} {'groups/msg':>10}")
for name in names:
    runs = [json.loads(p.read_text()) for p in sorted(out.glob(f"{name}-*/summary.json"))]
    if not runs:
        continue
    med = lambda f: statistics.median(f(r) for r in runs)
    lost = sum(r["messages_lost"] for r in runs)
    client = med(lambda r: r["client_latency_ms"]["p99"])
    server = med(lambda r: max(s["p99_ms"] for s in r["server_latency_ms"]))
    shard = med(lambda r: sum(r["cpu_percent_per_shard"].values()) / max(len(r["cpu_percent_per_shard"]), 1))
    def per_node(r, kind):
        v = [c for n, c in r.get("cpu_percent_store_and_cluster_threads", {}).items() if n.endswith("/" + kind)]
        return sum(v) / len(v) if v else 0.0
    store_thread = med(lambda r: per_node(r, "store"))
    nats_thread = med(lambda r: per_node(r, "cluster"))
    redis = med(lambda r: r.get("redis_cpu_percent", 0))
    load = med(lambda r: r.get("load_cpu_percent", 0))
    trips = med(lambda r: r.get("store", {}).get("groups_per_message", 0))
    print(f"{name:<12} {len(runs):>4} {lost:>5} {client:>13.2f} {server:>13.2f} {shard:>11.1f} {store_thread:>11.1f} {nats_thread:>10.1f} {redis:>11.1f} {load:>10.1f} {trips:>10.3f}")
PY
