#!/usr/bin/env bash
# The chat and dashboard pages in a real browser: starts a gateway (two shards, the
# embedded store, dev auth for the chat pages) and a headless Chromium, and runs
# scripts/browser-test.py, which drives both pages through the Chrome DevTools Protocol
# (Python websocket-client, in a virtualenv under target/): two users exchange a direct
# and a room message through the page's controls, the dashboard (with an admin token)
# counts them, /metrics parses with the Prometheus client's parser. Screenshots of both
# pages go to the results folder. Then a real Prometheus scrapes the gateway with
# deploy/prometheus.yml, and every query of deploy/grafana-dashboard.json must be valid
# and return series (scripts/prometheus-check.py).
#
# Installs Debian's chromium and prometheus when they are missing. Stops the gateway, the
# browser and Prometheus (by PID) when it ends.
#
# Usage: scripts/browser-test.sh [--results DIR]   (default: results/browser)
set -euo pipefail
source "$(dirname "$0")/lib.sh"
help_if_asked "$0" "$@"
cd "$(dirname "$0")/.."
results=results/browser
while [ $# -gt 0 ]; do
  case $1 in
    --results) results=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
mkdir -p "$results"
out=target/browser-test
rm -rf "$out"
mkdir -p "$out"

for package in chromium prometheus; do
  if ! command -v "$package" >/dev/null; then
    echo "$package is missing; installing it (apt-get install $package)"
    if [ "$(id -u)" = 0 ]; then sudo=; else sudo=sudo; fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$package" >/dev/null
  fi
done
venv=target/browser-venv
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet 'websocket-client>=1.8,<2' 'prometheus-client>=0.20,<1'
fi

start_gateway "$out/gateway" --shards 2 --insecure-dev-auth --rate-limit 0
admin=$(target/release/shardgate token dashboard-test --admin --data-dir "$out/gateway")

# The browser: root needs --no-sandbox; port 0 lets it pick a free DevTools port, which it
# writes to DevToolsActivePort in its profile. Every page is a tab and only one is in
# front: the others' timers must not be throttled as background tabs' are.
chromium --headless=new --no-sandbox --disable-gpu --no-first-run --no-default-browser-check \
  --disable-background-timer-throttling --disable-renderer-backgrounding --disable-backgrounding-occluded-windows \
  --user-data-dir="$out/profile" --remote-debugging-address=127.0.0.1 --remote-debugging-port=0 \
  about:blank >"$out/chromium.log" 2>&1 &
browser=$!
prometheus=
trap 'kill -TERM "$browser" $prometheus 2>/dev/null; wait "$browser" $prometheus 2>/dev/null; stop_gateway' EXIT
wait_until "$browser" "$out/chromium.log" chromium test -s "$out/profile/DevToolsActivePort"
devtools_port=$(head -1 "$out/profile/DevToolsActivePort")

"$venv/bin/python" scripts/browser-test.py "http://127.0.0.1:$port" "$devtools_port" "$admin" "$results"

# The example scrape configuration, pointed at this gateway and scraping each second.
prom_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
sed -e "s/127.0.0.1:8080/127.0.0.1:$port/" -e "s/scrape_interval: 15s/scrape_interval: 1s/" \
  deploy/prometheus.yml >"$out/prometheus.yml"
prometheus --config.file="$out/prometheus.yml" --storage.tsdb.path="$out/prometheus-data" \
  --web.listen-address="127.0.0.1:$prom_port" >"$out/prometheus.log" 2>&1 &
prometheus=$!
python3 scripts/prometheus-check.py "http://127.0.0.1:$prom_port" deploy/grafana-dashboard.json
