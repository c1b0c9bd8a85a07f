#!/usr/bin/env bash
# soak.sh: hold many chat connections under load and report how the gateway held up.
#
#   scripts/soak.sh                      # 100,000 connections, 60 s hold
#   scripts/soak.sh --profile ci         # 20,000 connections, 60 s (what CI runs)
#   scripts/soak.sh --profile small      # 2,000 connections, 15 s
#   scripts/soak.sh --connections 50000 --duration 120s --rate 0.2 --mode room --tune
#   scripts/soak.sh --nodes 6 --nats      # six nodes joined through a local nats-server,
#                                         # half the pairs split across nodes
#   scripts/soak.sh --nats nats://10.0.0.5:4222 --cross-node 1.0
#
# It prints the host limits (and applies scripts/tune-host.sh only with --tune), starts
# enough gateway processes for the open-file limit, ramps the load generator up, holds,
# stops everything it started (by PID) and prints a summary: connections held, server RSS
# per connection, CPU per shard, messages sent/delivered/lost, client- and server-side
# latency percentiles against the SLO. Everything lands in the results folder, with a chart.
# With --nats the gateways form one cluster (a nats-server is started on a free loopback
# port unless a URL is given) and --cross-node of the pairs or rooms span nodes; the summary
# shows the messages that crossed nodes and their latency apart.
#
# Options:
#   --profile ci|small|full   preset sizes (full: the defaults)
#   --connections N           chat connections in all (default 100000)
#   --duration D              hold time, e.g. 60s (default 60s)
#   --rate R                  messages per second per connection (default 0.1)
#   --ramp R                  new connections per second (default 2500)
#   --mode direct|room        pairs of users, or groups in rooms (default direct)
#   --shards N                shards per gateway process (default: one per core, split
#                             over the processes)
#   --per-process N           connections per gateway process (default: what the
#                             open-file limit allows)
#   --slo D                   the latency objective (default 200ms)
#   --results DIR             where the results go (default results/soak-<time>)
#   --tune                    apply scripts/tune-host.sh first
#   --store embedded|redis|redis-cluster|none|URL
#                             the gateways' message store (default: embedded, each gateway
#                             in a directory of its own under the results; none with --nats).
#                             redis: a local redis-server (appendfsync always) started for
#                             the run: with --nats one database for the cluster, else
#                             gateway k on its database k; redis-cluster: a local Redis
#                             Cluster of three primaries; redis://…: that Redis. The
#                             summary shows the local Redis's CPU and groups per message
#   --nodes N                 gateway processes (default: as the open-file limit needs)
#   --nats [URL]              join the gateways through NATS (a local nats-server unless
#                             a URL is given)
#   --cross-node F            share of the pairs or rooms that span nodes (default 0.5)
#   --cluster-key-file FILE   the cluster key (default: a new one in the results directory;
#                             give the one the other nodes use to join an existing cluster)
#   --fault KIND@T            inject a fault T seconds into the hold; clients then reconnect
#                             (to the next gateway) and the run is judged on what the answers
#                             promised. KIND: kill-node (SIGKILL the second gateway),
#                             nats-restart (stop the local nats-server for --outage seconds),
#                             drop (--drop-share of the connections reset at once and reconnect;
#                             T may be a list, drop@10,25: one storm each).
#                             scripts/faults.sh runs the three and judges them.
#   --outage S                seconds NATS stays down for nats-restart (default 2)
#   --drop-share F            share of connections a drop resets (default 0.67)
#   --deflate                 permessage-deflate: gateways with --deflate, clients offer
#                             it and send what is long enough compressed
#   --body-bytes N            pad each message body with N bytes of chat-like text
#                             (default 0: messages of about 90 bytes, under the deflate
#                             threshold)
#   --tls                     wss://: each gateway also listens with TLS (a P-256
#                             certificate made for the run) and the clients connect there
#   --scrape-metrics          GET every gateway's /metrics once a second during the run
#                             (what a scraper costs; scripts/bench-metrics.sh)
#   --gateway-bin PATH        the gateway binary (default target/release/shardgate; the
#                             metrics benchmark runs an older build beside the current)
#   -h, --help                this text
set -euo pipefail
source "$(dirname "$0")/lib.sh"
help_if_asked "$0" "$@"
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

connections=100000 duration=60s rate=0.1 ramp=2500 mode=direct tune=0 slo=200ms
per_process= shards=$(nproc) shards_given=0 results=
nodes=0 nats=0 nats_url= cross_node= cluster_key=
fault= fault_at= outage=2 drop_share=0.67 store=
deflate=() body_bytes=0 scrape=0 gateway_bin=target/release/shardgate tls=0
while [ $# -gt 0 ]; do
  case $1 in
    --profile)
      case $2 in
        ci) connections=20000 duration=60s rate=0.5 ;;
        small) connections=2000 duration=15s rate=1 ;;
        full) ;;
        *) echo "soak: unknown profile $2 (ci, small, full)" >&2; exit 2 ;;
      esac
      shift 2 ;;
    --connections) connections=$2; shift 2 ;;
    --duration) duration=$2; shift 2 ;;
    --rate) rate=$2; shift 2 ;;
    --ramp) ramp=$2; shift 2 ;;
    --mode) mode=$2; shift 2 ;;
    --shards) shards=$2; shards_given=1; shift 2 ;;
    --per-process) per_process=$2; shift 2 ;;
    --slo) slo=$2; shift 2 ;;
    --results) results=$2; shift 2 ;;
    --tune) tune=1; shift ;;
    --nodes) nodes=$2; shift 2 ;;
    --store) store=$2; shift 2 ;;
    --cluster-key-file) cluster_key=$2; shift 2 ;;
    --fault) fault=${2%@*}; fault_at=${2#*@}; fault_at=${fault_at%s}; shift 2 ;;
    --outage) outage=$2; shift 2 ;;
    --drop-share) drop_share=$2; shift 2 ;;
    --nats)
      nats=1
      if [ $# -gt 1 ] && [[ $2 == nats://* ]]; then nats_url=$2; shift; fi
      shift ;;
    --cross-node) cross_node=$2; shift 2 ;;
    --deflate) deflate=(--deflate); shift ;;
    --tls) tls=1; shift ;;
    --body-bytes) body_bytes=$2; shift 2 ;;
    --scrape-metrics) scrape=1; shift ;;
    --gateway-bin) gateway_bin=$2; shift 2 ;;
    *) echo "soak: unknown option $1" >&2; exit 2 ;;
  esac
done
results=${results:-$root/results/soak-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$results"
results=$(cd "$results" && pwd)

echo "== host limits"
scripts/tune-host.sh | tee "$results/host-limits.txt"
if [ "$tune" = 1 ]; then scripts/tune-host.sh --apply; fi
nofile=$(ulimit -Hn)
[ "$nofile" = unlimited ] && nofile=1048576
if [ -z "$per_process" ]; then
  # Leave room for the process's own descriptors; a pair never spans two gateways.
  per_process=$(( (nofile - 400) / 2 * 2 ))
fi
gateways=$(( (connections + per_process - 1) / per_process ))
if [ "$nodes" -gt "$gateways" ]; then gateways=$nodes; fi
if [ "$nodes" -gt 0 ] && [ "$nodes" -lt "$gateways" ]; then
  echo "soak: --nodes $nodes is too few for $connections connections at $per_process per process; using $gateways" >&2
fi
case $fault in
  '') ;;
  kill-node) [ "$gateways" -ge 2 ] || { echo "soak: kill-node needs --nodes 2 or more" >&2; exit 2; } ;;
  nats-restart) [ "$nats" = 1 ] && [ -z "$nats_url" ] || { echo "soak: nats-restart needs --nats (a local nats-server)" >&2; exit 2; } ;;
  drop) ;;
  *) echo "soak: unknown fault $fault (kill-node, nats-restart, drop)" >&2; exit 2 ;;
esac
if [ "$nats" = 1 ]; then cross_node=${cross_node:-0.5}; else cross_node=${cross_node:-0}; fi
if [ "$nats" = 1 ]; then store=${store:-none}; else store=${store:-embedded}; fi
if [ "$nats" = 0 ] && [ "$cross_node" != 0 ]; then
  echo "soak: --cross-node needs --nats (nodes only reach each other through NATS)" >&2; exit 2
fi
# Ephemeral ports per client address on loopback: about 28,000 with the default range.
addresses=$(( connections / 20000 + 1 ))
source_ips=$(seq -s, -f "127.0.0.%g" 2 $((addresses + 1)))
if [ "$gateways" -ge "$(nproc)" ] && [ "$shards_given" = 0 ]; then shards_note="1 shard each, spread over the cores"; else shards_note="$shards shard(s) each"; fi
echo "== plan: $connections connections over $gateways gateway process(es), $shards_note (open-file limit $nofile), $gateways load process(es), client addresses $source_ips; store $store"

cargo build --release --quiet -p shardgate -p shardgate-bench
secret=$results/auth-secret
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$secret"
chmod 600 "$secret"

pids=()
load_pid= nats_pid= redis_pids=()
cleanup() {
  [ -n "$load_pid" ] && kill -TERM "$load_pid" 2>/dev/null
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  [ -n "$nats_pid" ] && kill -TERM "$nats_pid" 2>/dev/null
  for p in "${redis_pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

case $store in
  redis)
    start_redis "$results"
    redis_pids=("$redis_pid")
    echo "== redis-server on port $redis_port (pid $redis_pid), appendfsync always, log $results/redis.log" ;;
  redis-cluster)
    start_redis_cluster "$results/redis-cluster"
    redis_pids=("${redis_cluster_pids[@]}")
    echo "== redis cluster of three primaries at $redis_cluster_seeds (pids ${redis_pids[*]}), appendfsync always" ;;
esac
# CPU time (user + system, clock ticks) of processes, to set beside the gateways': the
# local Redis's, and the load generator's (it shares the cores: a run where it is near
# its share is client-bound).
cpu_ticks() { local t=0 p; for p in "$@"; do t=$((t + $(awk '{print $14+$15}' "/proc/$p/stat" 2>/dev/null || echo 0))); done; echo "$t"; }
redis_cpu() { cpu_ticks "${redis_pids[@]}"; }
load_cpu() { cpu_ticks "$load_pid" $(ps -o pid= --ppid "$load_pid"); }

cluster=()
if [ "$nats" = 1 ]; then
  if [ -z "$nats_url" ]; then
    start_nats "$results"
    echo "== nats-server $nats_url (pid $nats_pid), log $results/nats.log"
  fi
  if [ -z "$cluster_key" ]; then
    cluster_key=$results/cluster-key
    (umask 077; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$cluster_key")
  fi
  cluster=(--nats "$nats_url" --nats-prefix "soak$$" --cluster-key-file "$cluster_key")
  echo "== cluster: $gateways node(s) through $nats_url; $cross_node of the groups span nodes"
fi

addrs=()
plain_addrs=()
client_tls=()
if [ "$tls" = 1 ]; then
  ensure_openssl
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=localhost \
    -addext subjectAltName=DNS:localhost,IP:127.0.0.1 -keyout "$results/tls-key.pem" -out "$results/tls-cert.pem" 2>/dev/null
  client_tls=(--tls)
  echo "== wss://: every gateway also listens with TLS; the clients connect there"
fi
for k in $(seq 0 $((gateways - 1))); do
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  listen_tls=()
  if [ "$tls" = 1 ]; then
    tls_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    listen_tls=(--listen-tls "127.0.0.1:$tls_port" --tls-cert "$results/tls-cert.pem" --tls-key "$results/tls-key.pem")
  fi
  # With more gateway processes than cores, one shard each, spread over the cores: more
  # executor threads than cores only queue for the CPU (and show up as latency).
  if [ "$gateways" -ge "$(nproc)" ] && [ "$shards_given" = 0 ]; then
    placement=(--shards 1 --cpus $((k % $(nproc))))
  else
    placement=(--shards "$shards")
  fi
  case $store in
    # A cluster shares one store; separate gateways keep apart on a database each.
    redis) gateway_store=redis://127.0.0.1:$redis_port/$(( nats ? 0 : k )) ;;
    redis-cluster) gateway_store=redis+cluster://$redis_cluster_seeds ;;
    *) gateway_store=$store ;;
  esac
  "$gateway_bin" serve --listen "127.0.0.1:$port" "${placement[@]}" --auth-secret-file "$secret" \
    --store "$gateway_store" --data-dir "$results/gateway-$k" --max-connections "$per_process" --report-interval 5s --slo "$slo" \
    --max-connections-per-ip 0 --handshakes-per-ip 0 \
    --histogram-out "$results/gateway-$k.hgrm" "${cluster[@]}" "${deflate[@]}" "${listen_tls[@]}" >"$results/gateway-$k.log" 2>&1 &
  pids+=($!)
  scripts/wait-listening.sh "$results/gateway-$k.log" "$!"
  plain_addrs+=("127.0.0.1:$port")
  if [ "$tls" = 1 ]; then addrs+=("127.0.0.1:$tls_port"); else addrs+=("127.0.0.1:$port"); fi
done
if [ "$nats" = 1 ]; then
  # Every node must know every other before users arrive ("offline" is a promise).
  for k in $(seq 0 $((gateways - 1))); do
    for _ in $(seq 600); do
      grep -q "cluster: directory ready: $((gateways - 1)) other node" "$results/gateway-$k.log" && break
      sleep 0.05
    done
    grep -q "cluster: directory ready: $((gateways - 1)) other node" "$results/gateway-$k.log" ||
      { echo "soak: gateway $k did not join the cluster; see $results/gateway-$k.log" >&2; exit 1; }
  done
fi
gateway_list=$(IFS=,; echo "${addrs[*]}")
# Over the gateways still running (a fault may have killed one).
rss_sum() { local s=0 k v u; for p in "${pids[@]}"; do [ -r "/proc/$p/status" ] || continue; while read -r k v u; do [ "$k" = VmRSS: ] && s=$((s + v)); done <"/proc/$p/status"; done; echo "$s"; }
fd_sum() { local s=0 p; for p in "${pids[@]}"; do [ -d "/proc/$p/fd" ] || continue; s=$((s + $(ls "/proc/$p/fd" | wc -l))); done; echo "$s"; }
rss_before=$(rss_sum)

cpus=$(seq -s, 0 $(( $(nproc) - 1 )))
echo "== load: ramp $ramp/s, hold $duration at $rate msg/s per connection ($mode)"
faults=()
if [ -n "$fault" ]; then
  faults=(--reconnect)
  [ "$fault" = drop ] && faults+=(--drop-at "$(echo "$fault_at" | sed -E 's/([0-9]+)/\1s/g')" --drop-share "$drop_share")
  echo "== fault: $fault ${fault_at} s into the hold; clients reconnect"
fi
target/release/shardgate-load "${faults[@]}" --gateways "$gateway_list" --connections "$connections" --ramp "$ramp" \
  --duration "$duration" --rate "$rate" --mode "$mode" --source-ips "$source_ips" \
  --auth-secret-file "$secret" --cpus "$cpus" --processes "$gateways" --slo "$slo" --cross-node "$cross_node" \
  --report-interval 5s --histogram-out "$results/client.hgrm.b64" "${deflate[@]}" "${client_tls[@]}" --body-bytes "$body_bytes" \
  >"$results/load.log" 2>"$results/load.err" &
load_pid=$!

# While the load runs: RSS every second (peak kept) and per-shard CPU during the hold.
# The load waits 2 s after the ramp (--settle) before the hold's first message.
# The sampling loop below uses bash arithmetic only (milliseconds): it runs every second
# on the machine under test, and a python3 start there costs a few % of a core.
ramp_ms=$(python3 -c "print(int(($connections / $ramp + 2) * 1000))")
hold_ms=$(python3 -c "import re; d='$duration'; m=re.fullmatch(r'(\d+)(ms|s|m)?', d); v=int(m.group(1)); print(int({'ms':v/1000,'s':v,'m':v*60,None:v}[m.group(2)] * 1000))")
now_ms() { local t=${EPOCHREALTIME/./}; echo $(( t / 1000 )); }
started=$(now_ms)
peak_rss=0 peak_conns=0
# Shard threads by the ids each gateway printed at start ("shard 0: cpu 0 (…), thread 1234, …").
# The store's threads (its own and fjall's) and the cluster thread by their names, listed
# after the shards.
shard_cpu() { for k in "${!pids[@]}"; do
  grep -o 'shard [0-9]*: .*thread [0-9]*' "$results/gateway-$k.log" | sed -E 's/^shard ([0-9]+):.*thread ([0-9]+)/\1 \2/' |
  while read -r shard tid; do echo "gateway-$k/shard-$shard $(awk '{print $14+$15}' "/proc/${pids[$k]}/task/$tid/stat")"; done
  for task in /proc/"${pids[$k]}"/task/*; do
    case $(cat "$task/comm" 2>/dev/null) in
      store) echo "gateway-$k/store $(awk '{print $14+$15}' "$task/stat")" ;;
      store-apply) echo "gateway-$k/store-apply $(awk '{print $14+$15}' "$task/stat")" ;;
      fjall:worker) echo "gateway-$k/fjall $(awk '{print $14+$15}' "$task/stat")" ;;
      cluster) echo "gateway-$k/cluster $(awk '{print $14+$15}' "$task/stat")" ;;
    esac
  done; done; }
cpu_start= cpu_start_time=
# The fault times (several for drop), in ms into the hold; memory and descriptors are
# sampled just before each and at the end of the hold.
read -r -a fault_times <<<"${fault_at//,/ }"
fault_done=0 samples=() after_fault=
scrapes=0
while kill -0 "$load_pid" 2>/dev/null; do
  sleep 1
  if [ "$scrape" = 1 ]; then
    for a in "${plain_addrs[@]}"; do curl -sf -o /dev/null "http://$a/metrics" && scrapes=$((scrapes + 1)); done
  fi
  now=$(now_ms)
  rss=$(rss_sum)
  [ "$rss" -gt "$peak_rss" ] && peak_rss=$rss
  if [ -n "$fault" ]; then
    into_hold=$(( now - started - ramp_ms ))
    next=${fault_times[${#samples[@]}]:-}
    if [ -n "$next" ] && [ "$into_hold" -ge $(( next * 1000 - 1500 )) ]; then
      samples+=("before@${next}s: rss_kib=$rss fds=$(fd_sum)")
    fi
    if [ "$fault_done" = 0 ] && [ "$into_hold" -ge $(( ${fault_times[0]} * 1000 )) ]; then
      fault_done=1
      case $fault in
        kill-node)
          echo "== fault: SIGKILL gateway 1 (pid ${pids[1]}) at $((into_hold / 1000)) s into the hold"
          kill -KILL "${pids[1]}" ;;
        nats-restart)
          echo "== fault: nats-server stopped at $((into_hold / 1000)) s into the hold, for ${outage} s"
          kill -TERM "$nats_pid"; wait "$nats_pid" 2>/dev/null || true
          sleep "$outage"
          restart_nats "$results" "$nats_url"
          echo "== fault: nats-server back (pid $nats_pid)" ;;
        drop) echo "== fault: the load generator resets ${drop_share} of the connections" ;;
      esac
    fi
    if [ -z "$after_fault" ] && [ "$into_hold" -ge $(( hold_ms - 1500 )) ]; then
      after_fault="rss_kib=$rss fds=$(fd_sum)"
    fi
  fi
  if [ -z "$cpu_start" ] && [ $((now - started)) -gt $((ramp_ms + 2000)) ]; then
    cpu_start=$(shard_cpu); cpu_start_time=$now; redis_cpu_start=$(redis_cpu); load_cpu_start=$(load_cpu)
  fi
  if [ -n "$cpu_start" ] && [ -z "${cpu_end:-}" ] && [ $((now - started)) -gt $((ramp_ms + hold_ms - 1000)) ]; then
    cpu_end=$(shard_cpu); cpu_end_time=$now; redis_cpu_end=$(redis_cpu); load_cpu_end=$(load_cpu)
  fi
done
load_status=0
wait "$load_pid" || load_status=$?
[ "$scrape" = 1 ] && echo "metrics: $scrapes scrapes of /metrics during the run" | tee "$results/scrapes.txt"
load_pid=
for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
for p in "${pids[@]}"; do wait "$p" || true; done
pids=()
if [ -n "$fault" ]; then
  echo "fault: kind=$fault at_s=$fault_at ${samples[*]} end: ${after_fault:-none}" | tee "$results/fault.txt"
fi

printf '%s\n' "${cpu_start:-}" >"$results/cpu-start.txt"
printf '%s\n' "${cpu_end:-}" >"$results/cpu-end.txt"
python3 scripts/soak-report.py "$results" \
  --connections "$connections" --gateways "$gateways" --rss-before-kib "$rss_before" --peak-rss-kib "$peak_rss" \
  --cpu-seconds "$(python3 -c "print((${cpu_end_time:-0} - ${cpu_start_time:-0}) / 1000)")" --clk-tck "$(getconf CLK_TCK)" \
  --load-status "$load_status" --slo "$slo" \
  --redis-cpu-ticks "$(( ${redis_cpu_end:-0} - ${redis_cpu_start:-0} ))" --redis-processes "${#redis_pids[@]}" \
  --load-cpu-ticks "$(( ${load_cpu_end:-0} - ${load_cpu_start:-0} ))"
