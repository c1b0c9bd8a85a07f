# Sourced by the scripts that run a gateway for a measurement or a test suite.
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
  target/release/shardgate serve --listen "127.0.0.1:$port" --data-dir "$out" "$@" >"$out/server.log" 2>&1 &
  server=$!
  trap stop_gateway EXIT
  scripts/wait-listening.sh "$out/server.log" "$server"
}

stop_gateway() {
  [ -n "${client:-}" ] && kill -TERM "$client" 2>/dev/null
  kill -TERM "$server" 2>/dev/null || true
  wait 2>/dev/null || true
}
