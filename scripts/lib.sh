# Sourced by the scripts that run a gateway for a measurement or a test suite.
#
# help_if_asked SCRIPT [ARGS...]: with -h or --help among ARGS, prints SCRIPT's header
# comment (its usage and options) and exits 0.
#
# start_gateway OUT [ARGS...]: builds release binaries, starts `shardgate serve` on a free
# loopback port with its log and data in OUT, waits until it listens, and stops it (by
# PID) when the calling script exits. Sets $port and $server.

start_gateway() {
  local out=$1
  shift
  mkdir -p "$out"
  cargo build --release --quiet -p shardgate -p shardgate-bench
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  # The load comes from one address (loopback): the per-IP limits are off.
  target/release/shardgate serve --listen "127.0.0.1:$port" --data-dir "$out" \
    --max-connections-per-ip 0 --handshakes-per-ip 0 "$@" >"$out/server.log" 2>&1 &
  server=$!
  trap stop_gateway EXIT
  scripts/wait-listening.sh "$out/server.log" "$server"
}

stop_gateway() {
  [ -n "${client:-}" ] && kill -TERM "$client" 2>/dev/null
  kill -TERM "$server" 2>/dev/null || true
  wait 2>/dev/null || true
}

# ensure_nats_server: installs nats-server from the distribution if it is missing.
ensure_nats_server() {
  if ! command -v nats-server >/dev/null; then
    echo "nats-server is missing; installing it (apt-get install nats-server)"
    if [ "$(id -u)" = 0 ]; then sudo=; else sudo=sudo; fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq nats-server >/dev/null
  fi
}

# ensure_openssl: installs the openssl command (certificates made for TLS runs) if it is
# missing.
ensure_openssl() {
  if ! command -v openssl >/dev/null; then
    echo "openssl is missing; installing it (apt-get install openssl)"
    if [ "$(id -u)" = 0 ]; then sudo=; else sudo=sudo; fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq openssl >/dev/null
  fi
}

# ensure_redis_server: installs redis-server (and redis-cli) from the distribution if it
# is missing; the store tests start their own on free loopback ports.
ensure_redis_server() {
  if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
    echo "redis-server is missing; installing it (apt-get install redis-server)"
    if [ "$(id -u)" = 0 ]; then sudo=; else sudo=sudo; fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq redis-server >/dev/null
  fi
}

# start_redis OUT [OPTION...]: starts redis-server on a free loopback port, its append-only
# file synced before every reply (`appendfsync always`: what `stored` needs) in OUT/redis
# (log in OUT/redis.log), with the further options given; waits until it answers PING;
# sets $redis_port and $redis_pid. The caller stops it by PID.
start_redis() {
  local out=$1
  shift
  mkdir -p "$out/redis"
  ensure_redis_server
  # Below 55536, with the port 10,000 above it free too: a cluster node's bus port.
  redis_port=$(python3 -c '
import random, socket
while True:
    p = random.randrange(20000, 55536)
    try:
        for q in (p, p + 10000):
            s = socket.socket(); s.bind(("127.0.0.1", q)); s.close()
        print(p); break
    except OSError:
        pass
')
  redis-server --bind 127.0.0.1 --port "$redis_port" --save "" --appendonly yes --appendfsync always --databases 64 \
    --dir "$out/redis" "$@" >"$out/redis.log" 2>&1 &
  redis_pid=$!
  wait_until "$redis_pid" "$out/redis.log" redis-server redis_answers "$redis_port" PONG ping
}

# redis_answers PORT ANSWER COMMAND...: does the redis-server on PORT answer COMMAND with a
# line holding ANSWER?
redis_answers() {
  local port=$1 answer=$2
  shift 2
  redis-cli -p "$port" "$@" 2>/dev/null | grep -q "$answer"
}

# wait_until PID LOG WHAT CHECK...: runs CHECK every 50 ms until it succeeds (10 s at
# most); fails, showing LOG, if the process PID (WHAT) ends first.
wait_until() {
  local pid=$1 log=$2 what=$3
  shift 3
  for _ in $(seq 200); do
    "$@" && return 0
    kill -0 "$pid" 2>/dev/null || { cat "$log" >&2; echo "$what exited" >&2; return 1; }
    sleep 0.05
  done
  echo "$what did not become ready; see $log" >&2
  return 1
}

# start_redis_cluster OUT: three redis-servers as in start_redis (OUT/node-0..2) joined
# into a Redis Cluster of three primaries; sets $redis_cluster_seeds (host:port,...) and
# $redis_cluster_pids. The caller stops them by PID.
start_redis_cluster() {
  local out=$1 addrs=() i
  redis_cluster_pids=()
  for i in 0 1 2; do
    start_redis "$out/node-$i" --cluster-enabled yes
    redis_cluster_pids+=("$redis_pid")
    addrs+=("127.0.0.1:$redis_port")
  done
  redis-cli --cluster create "${addrs[@]}" --cluster-replicas 0 --cluster-yes >"$out/cluster-create.log" 2>&1
  for i in 0 1 2; do
    wait_until "${redis_cluster_pids[$i]}" "$out/cluster-create.log" "redis cluster node $i" \
      redis_answers "${addrs[$i]##*:}" cluster_state:ok cluster info
  done
  redis_cluster_seeds=$(IFS=,; echo "${addrs[*]}")
}

# start_nats OUT: starts nats-server on a free loopback port (log in OUT/nats.log), waits
# until it accepts clients, sets $nats_url and $nats_pid. The caller stops it by PID.
start_nats() {
  local out=$1
  mkdir -p "$out"
  ensure_nats_server
  local nport
  nport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  nats-server -a 127.0.0.1 -p "$nport" >"$out/nats.log" 2>&1 &
  nats_pid=$!
  nats_url="nats://127.0.0.1:$nport"
  wait_until "$nats_pid" "$out/nats.log" nats-server grep -q "Server is ready" "$out/nats.log"
}

# restart_nats OUT URL: starts nats-server again on URL's port (after a stop), appending
# to OUT/nats.log; sets $nats_pid.
restart_nats() {
  local out=$1 url=$2
  local nport=${url##*:}
  nats-server -a 127.0.0.1 -p "$nport" >>"$out/nats.log" 2>&1 &
  nats_pid=$!
  for _ in $(seq 200); do
    [ "$(grep -c "Server is ready" "$out/nats.log")" -ge 2 ] && return 0
    kill -0 "$nats_pid" 2>/dev/null || { echo "nats-server did not restart; see $out/nats.log" >&2; return 1; }
    sleep 0.05
  done
  echo "nats-server did not become ready again; see $out/nats.log" >&2
  return 1
}

help_if_asked() {
  local script=$1
  shift
  for arg in "$@"; do
    case $arg in
      -h|--help)
        # The comment block after the shebang, without its leading "# ".
        sed -n '2,/^[^#]/{/^#/{s/^# \{0,1\}//;p}}' "$script"
        exit 0 ;;
    esac
  done
}

