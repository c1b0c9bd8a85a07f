#!/usr/bin/env bash
# faults.sh: the fault-injection runs, each a soak (scripts/soak.sh) with a fault in the
# middle of the hold, judged on what the gateway's answers promised:
#
#   kill-node     SIGKILL one node of a 3-node cluster: its users reconnect elsewhere;
#                 users whose connections held lose nothing, and every message between
#                 them is routed (unavailable/offline only for the dead node's share).
#   nats-restart  nats-server stopped for 2 s and started again: traffic within a node
#                 never fails, every send is answered, cross-node traffic resumes by itself.
#   storm         two thirds of the connections reset at once, twice: time until all are
#                 back, latency meanwhile, descriptors back to their count, and no memory
#                 growth from one storm to the next.
#
# Usage: scripts/faults.sh [--profile ci|full] [--only NAME] [--results DIR]
#   ci    3,000 connections per cluster run, 6,000 for the storm (what CI runs)
#   full  15,000 connections per cluster run, 30,000 for the storm (20,000 reset at once)
#   -h, --help   this text
set -euo pipefail
source "$(dirname "$0")/lib.sh"
help_if_asked "$0" "$@"
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

profile=full only= results=
while [ $# -gt 0 ]; do
  case $1 in
    --profile) profile=$2; shift 2 ;;
    --only) only=$2; shift 2 ;;
    --results) results=$2; shift 2 ;;
    *) echo "faults: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
case $profile in
  ci) cluster_conns=3000 storm_conns=6000 hold=20s rate=1 storms=6,14 ;;
  full) cluster_conns=15000 storm_conns=30000 hold=40s rate=0.5 storms=10,25 ;;
  *) echo "faults: unknown profile $profile (ci, full)" >&2; exit 2 ;;
esac
results=${results:-$root/results/faults-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$results"

# field NAME FILE: the value of NAME=… on the `faults:` line of a soak's summary.
field() { grep -o "faults: .*" "$2" | tr ' ' '\n' | sed -n "s/^$1=//p"; }
failed=0
verdict() { # NAME OK MESSAGE
  if [ "$2" = 1 ]; then echo "faults: $1 PASS: $3"; else echo "faults: $1 FAIL: $3"; failed=1; fi
}

if [ -z "$only" ] || [ "$only" = kill-node ]; then
  out=$results/kill-node
  ok=1
  scripts/soak.sh --connections "$cluster_conns" --duration "$hold" --rate "$rate" --nodes 3 --nats \
    --fault kill-node@8 --results "$out" >"$out.log" 2>&1 || ok=0
  s=$out/summary.txt
  [ "$(field refused_local "$s")" = 0 ] && [ "$(field refused_cross "$s")" = 0 ] || ok=0
  verdict kill-node $ok "$(grep -o 'faults: .*' "$s") ($(grep -o 'lost [0-9]*' "$s" | head -1); log $out.log)"
fi

if [ -z "$only" ] || [ "$only" = nats-restart ]; then
  out=$results/nats-restart
  ok=1
  scripts/soak.sh --connections "$cluster_conns" --duration "$hold" --rate "$rate" --nodes 3 --nats \
    --fault nats-restart@8 --outage 2 --results "$out" >"$out.log" 2>&1 || ok=0
  s=$out/summary.txt
  [ "$(field refused_local "$s")" = 0 ] || ok=0
  # Every node reconnected by itself, and routed across nodes again afterwards.
  for log in "$out"/gateway-*.log; do
    [ "$(grep -c 'cluster: connected to NATS' "$log")" -ge 2 ] || ok=0
    awk '/cluster: connected to NATS/ {n++} n >= 2 && /cluster: nodes=/ && /acks_routed=[1-9]/ {found=1} END {exit !found}' "$log" || ok=0
  done
  verdict nats-restart $ok "$(grep -o 'faults: .*' "$s") (log $out.log)"
fi

if [ -z "$only" ] || [ "$only" = storm ]; then
  out=$results/storm
  ok=1
  # Relay: the storm checks what connections leave behind (descriptors, memory), which a
  # store's own files and caches would blur.
  scripts/soak.sh --connections "$storm_conns" --duration "$hold" --rate "$rate" --store none \
    --fault "drop@$storms" --drop-share 0.67 --results "$out" >"$out.log" 2>&1 || ok=0
  s=$out/summary.txt
  f=$(cat "$out/fault.txt")
  # "fault: … before@T1s: rss_kib=A fds=B before@T2s: rss_kib=C fds=D end: rss_kib=E fds=F"
  read -r rss1 fds1 rss2 fds2 rss3 fds3 <<<"$(echo "$f" | grep -oE '(rss_kib|fds)=[0-9]+' | cut -d= -f2 | tr '\n' ' ')"
  [ "$fds3" = "$fds1" ] || ok=0
  # After the first storm the gateway holds what a storm needs; the second adds nothing.
  [ "$rss3" -le $(( rss2 * 105 / 100 )) ] || ok=0
  storm_p99=$(grep -E '^progress' "$out/load.log" | sed -n 's/.*p99_us=\([0-9]*\).*/\1/p' | sort -n | tail -1)
  verdict storm $ok "$(grep -o 'faults: .*' "$s"); worst interval p99 ${storm_p99} µs; RSS KiB $rss1 before, $rss2 after one storm, $rss3 after two; fds $fds1, $fds2, $fds3 (log $out.log)"
fi
exit $failed
