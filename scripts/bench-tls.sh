#!/usr/bin/env bash
# bench-tls.sh: what wss:// costs beside ws:// on one gateway: echo (100 x 20 B and
# 200 x 16 KiB, windows 1 and 16), handshakes per second (plain upgrades, full and resumed
# TLS handshakes), and idle memory per connection at 15,000.
#
#   scripts/bench-tls.sh                      # 3 rounds of 5 s per case
#   scripts/bench-tls.sh --rounds 5 --duration 10s --idle 0
#   scripts/bench-tls.sh --gateway OTHER/target/release/shardgate   # another build
#
# Builds the release binaries, makes a P-256 certificate for the run (openssl), and runs
# scripts/bench-tls.py. Results in results/bench-tls/tls.md.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
help_if_asked "$0" "$@"
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
certs=target/bench-tls
mkdir -p "$certs"
ensure_openssl
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=localhost \
  -addext subjectAltName=DNS:localhost,IP:127.0.0.1 -keyout "$certs/key.pem" -out "$certs/cert.pem" 2>/dev/null
cargo build --release --quiet -p shardgate -p shardgate-bench
python3 scripts/bench-tls.py --certs "$certs" "$@"
