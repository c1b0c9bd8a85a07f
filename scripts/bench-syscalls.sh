#!/usr/bin/env bash
# bench-syscalls.sh [--server BIN] [CONNECTIONS SIZE WINDOW]: system calls per echoed
# message of one shard (default 100 connections x 20 B, window 1).
# The gateway runs with --shards 1 --echo on CPU 0, echo-load on CPU 1 for 8 s; for 4 s in
# the middle, `perf stat` counts the shard thread's system calls (all of them, and the
# ones the data path makes by name) and /proc its CPU time. Prints one line: msg/s, the
# shard's CPU per message, system calls per message. Needs perf (apt-get install
# linux-perf). --server runs another build (an A/B: run both, alternating).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
help_if_asked "$0" "$@"
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bin=$root/target/release/shardgate
if [ "${1:-}" = --server ]; then
  bin=$2
  shift 2
fi
conns=${1:-100}
size=${2:-20}
window=${3:-1}
command -v perf >/dev/null || { echo "bench-syscalls: perf is missing (apt-get install linux-perf)" >&2; exit 1; }
cargo build --release --quiet -p shardgate -p shardgate-bench
out=$root/target/bench-syscalls
mkdir -p "$out"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
taskset -c 0 "$bin" serve --shards 1 --echo --store none --listen "127.0.0.1:$port" --data-dir "$out" \
  --max-connections-per-ip 0 --handshakes-per-ip 0 >"$out/server.log" 2>&1 &
server=$!
client=
trap 'kill -TERM $server ${client:-} 2>/dev/null || true; wait 2>/dev/null || true' EXIT
scripts/wait-listening.sh "$out/server.log" "$server"
thread=$(grep -o 'thread [0-9]*' "$out/server.log" | head -1 | cut -d' ' -f2)
target/release/echo-load --addr "127.0.0.1:$port" -c "$conns" -s "$size" -w "$window" -d 8s --warmup 1s \
  --cpus 1 >"$out/client.log" 2>&1 &
client=$!
sleep 3
cpu_before=$(awk '{print $14 + $15}' "/proc/$server/task/$thread/stat")
events=raw_syscalls:sys_enter
for name in io_uring_enter recvfrom sendto sendmsg epoll_wait epoll_pwait2 sched_yield; do
  events+=",syscalls:sys_enter_$name"
done
perf stat -x, -e "$events" -t "$thread" -- sleep 4 2>"$out/perf.csv"
cpu_after=$(awk '{print $14 + $15}' "/proc/$server/task/$thread/stat")
wait "$client"
client=
python3 - "$out/client.log" "$out/perf.csv" "$cpu_before" "$cpu_after" "$(getconf CLK_TCK)" "$conns" "$size" "$window" <<'PY'
import re, sys
log, perf, before, after, tck, conns, size, window = sys.argv[1:]
kv = dict(re.findall(r"(\w+)=([^ ]+)", open(log).read()))
rate = float(kv["msg_per_s"])
msgs = rate * 4
cpu = (int(after) - int(before)) / int(tck)
counts = {}
for line in open(perf):
    parts = line.strip().split(",")
    if len(parts) > 2 and parts[0].isdigit():
        counts[parts[2].split(":")[-1].replace("sys_enter_", "")] = int(parts[0])
total = counts.pop("sys_enter", 0)
named = " ".join(f"{k}={v / msgs:.3f}" for k, v in counts.items() if v)
print(f"bench-syscalls: {conns}x{size}B w{window} msg/s={rate:.0f} shard_cpu_us_per_msg={cpu * 1e6 / msgs:.2f} "
      f"syscalls_per_msg={total / msgs:.3f} {named}")
PY
