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

# start_redis OUT: starts redis-server on a free loopback port, its append-only file synced
# before every reply (`appendfsync always`: what `stored` needs) in OUT/redis (log in
# OUT/redis.log), waits until it answers PING; sets $redis_port and $redis_pid. The caller
# stops it by PID.
start_redis() {
  local out=$1
  mkdir -p "$out/redis"
  ensure_redis_server
  redis_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  redis-server --bind 127.0.0.1 --port "$redis_port" --save "" --appendonly yes --appendfsync always --databases 64 \
    --dir "$out/redis" >"$out/redis.log" 2>&1 &
  redis_pid=$!
  for _ in $(seq 200); do
    [ "$(redis-cli -p "$redis_port" ping 2>/dev/null)" = PONG ] && return 0
    kill -0 "$redis_pid" 2>/dev/null || { cat "$out/redis.log" >&2; echo "redis-server exited" >&2; return 1; }
    sleep 0.05
  done
  echo "redis-server did not answer PING; see $out/redis.log" >&2
  return 1
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
  for _ in $(seq 200); do
    grep -q "Server is ready" "$out/nats.log" && return 0
    kill -0 "$nats_pid" 2>/dev/null || { cat "$out/nats.log" >&2; echo "nats-server exited" >&2; return 1; }
    sleep 0.05
  done
  echo "nats-server did not become ready; see $out/nats.log" >&2
  return 1
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

