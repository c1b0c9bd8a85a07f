#!/usr/bin/env bash
# idle-memory.sh [CONNECTIONS]: server user-space memory per idle, upgraded connection.
# Starts shardgate, opens CONNECTIONS (default 15000) WebSocket connections with echo-load
# --idle, and reports (RSS with the connections - RSS before) / CONNECTIONS.
# Kernel socket buffers are not in RSS: they are the kernel's, see kernel-tuning.md.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
help_if_asked "$0" "$@"
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
n=${1:-15000}
hold=${HOLD:-20s}
out=$root/target/idle-memory
client=
start_gateway "$out" --shards 2 --echo
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
before=$(rss_kib "$server")

target/release/echo-load --addr "127.0.0.1:$port" --idle -c "$n" --cpus 0,1 -d "$hold" >"$out/client.log" 2>&1 &
client=$!
# Both client threads print "N connections up" once their share is upgraded.
for _ in $(seq 600); do
  [ "$(grep -c 'connections up' "$out/client.log" || true)" -ge 2 ] && break
  kill -0 "$client" 2>/dev/null || { cat "$out/client.log" >&2; exit 1; }
  sleep 0.1
done
up=$(awk '/connections up/ {s += $2} END {print s+0}' "$out/client.log")
after=$(rss_kib "$server")
per=$(python3 -c "print(f'{($after - $before) * 1024 / $up:.0f}')")
echo "idle-memory: connections=$up server_rss_before_kib=$before server_rss_after_kib=$after bytes_per_connection=$per"
[ "$up" -eq "$n" ] || { echo "idle-memory: only $up of $n connections came up" >&2; exit 1; }
