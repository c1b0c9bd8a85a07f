#!/usr/bin/env bash
# bench-peers.sh: shardgate side by side with the Rust WebSocket servers a user would pick
# instead (tokio-tungstenite, fastwebsockets, tokio-websockets), same machine, same load
# generator, one run.
#
#   scripts/bench-peers.sh            # every case, 5 rounds each (about 26 minutes)
#   scripts/bench-peers.sh --quick    # one short run per case (about 2 minutes)
#   scripts/bench-peers.sh --runs 9 --duration 5s --results results/peers-today
#
# Builds everything in release mode, then for each case runs the servers in rounds: a round
# runs each server once, in rotating order (A B C D, B C D A, …), so that drift on a shared
# machine hits all of them alike. Prints one table per case: median msg/s, ratio to
# shardgate (of the medians, and paired round by round), the rounds shardgate won,
# round-trip p50/p99, server CPU seconds and peak RSS. Raw numbers (CSV, JSON) and an SVG
# chart go to the results folder.
#
# Options (passed to scripts/bench-peers.py):
#   --quick              one short run per case
#   --runs N             rounds per case (default 5)
#   --duration D         per run (default 3s), after --warmup (default 1s)
#   --idle-connections N for the idle-memory row (default 15000)
#   --results DIR        where raw.csv, summary.json and chart.svg go
#   --baseline BIN       also run this shardgate binary (another build) as 'baseline'
#   --servers LIST       only these servers, e.g. shardgate,baseline for an A/B
#   --uws-dir PATH       a folder with uWebSockets' uws_echo and load_test (measuring
#                        instruments, never part of shardgate; also $UWS_DIR): uWebSockets
#                        joins the one-core cases, and load_test drives every server again
#                        in the one-core window-1 cases (--load-test-runs N rounds, 17 s each)
#
# Every table shows the server's CPU per message (us/msg, from /proc/PID/stat over the
# run) and the client's busy share; a one-core case whose client was above 90% busy is
# marked client-bound.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
help_if_asked "$0" "$@"
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
echo "== building shardgate, echo-load and the peer servers (release)"
cargo build --release --quiet -p shardgate -p shardgate-bench
cargo build --release --quiet --manifest-path bench/peers/Cargo.toml
exec python3 scripts/bench-peers.py "$@"
