#!/usr/bin/env bash
# bench-fanout.sh [--store none|embedded] [MEMBERS] [PUBLISHES] [INTERVAL]: one room of
# MEMBERS connections (default 10000) on a two-shard gateway, PUBLISHES messages (default
# 50) published into it one every INTERVAL (default 200ms). Prints, from room-fanout:
# delivery latency publish -> member (p50/p99/p99.9), the time each publish takes to reach
# its last member, members reached per second, lost deliveries, the client's CPU; and the
# gateway's CPU over the run. The client threads share the two CPUs with the gateway.
# --store: the gateway's message store (default none: the fan-out alone; embedded: each
# publish is stored first, as the default gateway does).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
help_if_asked "$0" "$@"
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
store=none
if [ "${1:-}" = --store ]; then
  store=$2
  shift 2
fi
members=${1:-10000}
publishes=${2:-50}
interval=${3:-200ms}
out=$root/target/bench-fanout
rm -rf "$out"
client=
start_gateway "$out" --shards 2 --insecure-dev-auth --store "$store" --max-connections 19000
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
before=$(cpu_ticks "$server")
target/release/room-fanout --addr "127.0.0.1:$port" --members "$members" --publishes "$publishes" \
  --interval "$interval" --cpus 0,1 | tee "$out/client.log" &
client=$!
status=0
wait "$client" || status=$?
client=
after=$(cpu_ticks "$server")
hz=$(getconf CLK_TCK)
python3 -c "print(f'gateway CPU: {($after - $before) / $hz:.2f} s over the run (store: $store)')"
exit "$status"
