#!/usr/bin/env bash
# bench-metrics.sh: what the counters, the board and /metrics cost, side by side with the
# build before them.
#
#   scripts/bench-metrics.sh                       # baseline 0e84428; 5 echo rounds, 2 soak pairs
#   scripts/bench-metrics.sh --baseline REV --rounds 3 --soak-pairs 1
#
# Builds REV (default 0e84428, the last commit before the metrics) in a git worktree under
# target/bench-metrics, and the current tree. Then the echo benchmark on both, alternating,
# the current build scraped once a second (scripts/bench-metrics.py), and the CI soak
# (20,000 connections, 10,000 msg/s, the embedded store) on both, alternating, the
# current build scraped once a second. Results in results/bench-metrics.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
help_if_asked "$0" "$@"
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
baseline=0e84428 rounds=5 soak_pairs=2
while [ $# -gt 0 ]; do
  case $1 in
    --baseline) baseline=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --soak-pairs) soak_pairs=$2; shift 2 ;;
    *) echo "bench-metrics: unknown option $1" >&2; exit 2 ;;
  esac
done
work=target/bench-metrics
results=results/bench-metrics
mkdir -p "$work" "$results"
echo "== building the baseline ($baseline) and the current tree (release)"
if [ ! -d "$work/baseline-src" ]; then git worktree add -q --detach "$work/baseline-src" "$baseline"; fi
git -C "$work/baseline-src" checkout -q --detach "$baseline"
(cd "$work/baseline-src" && cargo build --release --quiet -p shardgate --target-dir ../baseline-target)
baseline_bin=$root/$work/baseline-target/release/shardgate
cargo build --release --quiet -p shardgate -p shardgate-bench
echo "== echo"
python3 scripts/bench-metrics.py --baseline "$baseline_bin" --rounds "$rounds" --results "$results"
echo "== soak, CI profile, baseline and current (scraped) alternating"
summaries=()
for pair in $(seq "$soak_pairs"); do
  for side in baseline metrics; do
    dir=$results/soak-$side-$pair
    rm -rf "$dir"
    if [ "$side" = baseline ]; then
      scripts/soak.sh --profile ci --results "$dir" --gateway-bin "$baseline_bin" >"$dir.log" 2>&1
    else
      scripts/soak.sh --profile ci --results "$dir" --scrape-metrics >"$dir.log" 2>&1
    fi
    summaries+=("$side:$dir/summary.json")
  done
done
python3 - "${summaries[@]}" <<'PY' | tee "$results/soak.md"
import json, statistics, sys
rows = {"baseline": [], "metrics": []}
for arg in sys.argv[1:]:
    side, path = arg.split(":", 1)
    rows[side].append(json.load(open(path)))
print("| CI soak (20,000 connections, 10,000 msg/s, embedded store) | baseline | with metrics, scraped 1/s |")
print("|---|---:|---:|")
def med(side, f):
    return statistics.median(f(s) for s in rows[side])
for name, f, fmt in [
    ("verdict", lambda s: 1.0 if s["verdict"] == "PASS" else 0.0, lambda v: "PASS" if v == 1 else "FAIL"),
    ("messages lost", lambda s: s["messages_lost"], lambda v: "%d" % v),
    ("server p99 (ms, worst gateway)", lambda s: max(g["p99_ms"] for g in s["server_latency_ms"]), lambda v: "%.3f" % v),
    ("server p99.9 (ms, worst gateway)", lambda s: max(g["p999_ms"] for g in s["server_latency_ms"]), lambda v: "%.3f" % v),
    ("client p99 (ms)", lambda s: s["client_latency_ms"]["p99"], lambda v: "%.3f" % v),
    ("CPU per shard (%, mean)", lambda s: statistics.mean(s["cpu_percent_per_shard"].values()), lambda v: "%.1f" % v),
    ("server bytes per connection", lambda s: s["server_bytes_per_connection"], lambda v: "%d" % v),
]:
    print("| %s | %s | %s |" % (name, fmt(med("baseline", f)), fmt(med("metrics", f))))
print()
print("medians of %d pair(s), run alternately" % len(rows["baseline"]))
PY
