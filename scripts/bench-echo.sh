#!/usr/bin/env bash
# bench-echo.sh [RUNS]: echo throughput and round-trip latency of one shard.
# The gateway runs with --shards 1 on CPU 0, echo-load on CPU 1; each case runs RUNS
# times (default 3) and the median run (by msg/s) is printed. The machine is shared and
# noisy: compare medians taken in the same run, not against numbers from another day.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
help_if_asked "$0" "$@"
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
runs=${1:-3}
duration=${DURATION:-4s}
start_gateway "$root/target/bench-echo" --shards 1 --echo
out=$root/target/bench-echo
echo "server: shardgate --shards 1 on cpu 0; client: echo-load on cpu 1; $runs runs of $duration per case, median shown"
printf '%-24s %10s %9s %9s %9s\n' case msg/s p50_us p99_us p999_us
for case in "100 20 1" "10 1024 1" "200 16384 1" "500 16384 1" "100 20 16" "10 1024 16"; do
  set -- $case
  for r in $(seq "$runs"); do
    target/release/echo-load --addr "127.0.0.1:$port" -c "$1" -s "$2" -w "$3" -d "$duration" --cpus 1
  done >"$out/case.log"
  python3 - "$out/case.log" "$1x$2B w$3" <<'PY'
import re, sys
rows = []
for line in open(sys.argv[1]):
    kv = dict(re.findall(r"(\w+)=([^ ]+)", line))
    if "msg_per_s" in kv:
        rows.append(kv)
rows.sort(key=lambda kv: float(kv["msg_per_s"]))
m = rows[len(rows) // 2]
print("%-24s %10s %9s %9s %9s" % (sys.argv[2], m["msg_per_s"], m["p50_us"], m["p99_us"], m["p999_us"]))
PY
done
