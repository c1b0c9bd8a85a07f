#!/usr/bin/env bash
# The whole test suite, as CI runs it: formatting, lints, unit/property/integration tests
# of the workspace (the cluster tests against a real nats-server, started here on a free
# loopback port and stopped after), the vendored glommio's own executor and reactor tests
# (scripts/glommio-tests.sh), the whole Autobahn|Testsuite (517 cases, 1-13 with
# permessage-deflate; 12-13 again with context takeover) against a real gateway, then the soak (CI profile), a small soak across a 3-node cluster, and the
# fault-injection runs (CI profile: a node killed, NATS restarted, reconnect storms). The
# fuzz targets (tests/fuzz.rs) run with `cargo test`, 2,000 cases each. The chat and
# dashboard pages run in a headless Chromium, and a real Prometheus scrapes /metrics with
# the example config and answers every query of the Grafana dashboard
# (scripts/browser-test.sh).
# Installs what a fresh machine of this kind lacks (nats-server, redis-server, chromium
# and prometheus from apt, the Autobahn and browser-test virtualenvs). The store tests on Redis start their own redis-server each.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
help_if_asked "$0" "$@"
cd "$(dirname "$0")/.."

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "== redis-server for the store tests (each test starts its own)"
ensure_redis_server
echo "== nats-server for the cluster tests"
start_nats target/test-nats
trap 'kill -TERM "$nats_pid" 2>/dev/null; wait "$nats_pid" 2>/dev/null || true' EXIT
echo "nats-server $nats_url (pid $nats_pid)"
echo "== cargo test"
SHARDGATE_TEST_NATS=$nats_url cargo test --workspace
kill -TERM "$nats_pid"; wait "$nats_pid" 2>/dev/null || true; trap - EXIT
echo "== the pages in a real browser, /metrics in a real Prometheus"
scripts/browser-test.sh
echo "== the glommio fork's own executor, timer and reactor tests"
scripts/glommio-tests.sh
echo "== autobahn testsuite"
scripts/autobahn.sh
echo "== autobahn testsuite, compression cases with context takeover"
scripts/autobahn.sh --context-takeover
echo "== autobahn testsuite over wss:// (cases 1 to 10)"
scripts/autobahn.sh --tls
echo "== soak, CI profile (20,000 connections, 60 s)"
rm -rf target/soak-ci
scripts/soak.sh --profile ci --results target/soak-ci
# The summary must parse and say what the run promises: every connection held, nothing lost.
python3 - target/soak-ci/summary.json <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
problems = [k for k in ("messages_lost", "duplicates", "reordered", "failed_handshakes", "unexpected_closes") if s[k] != 0]
if s["verdict"] != "PASS" or s["connections_held"] != s["connections_requested"] or s["messages_delivered"] == 0 or problems:
    sys.exit("soak summary says: %s" % json.dumps(s))
print("soak: %d connections held, %d messages delivered, 0 lost; client p99 %.3f ms" % (s["connections_held"], s["messages_delivered"], s["client_latency_ms"]["p99"]))
PY
echo "== soak across a cluster (3 nodes through a local nats-server, 2,000 connections, 15 s)"
rm -rf target/soak-cluster
scripts/soak.sh --profile small --nodes 3 --nats --results target/soak-cluster
python3 - target/soak-cluster/summary.json <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
c = s.get("cross_node", {})
if s["verdict"] != "PASS" or s["messages_lost"] != 0 or c.get("messages_delivered", 0) == 0:
    sys.exit("cluster soak summary says: %s" % json.dumps(s))
print("cluster soak: %d messages delivered, %d across nodes (client p99 %.3f ms), 0 lost" % (s["messages_delivered"], c["messages_delivered"], c["client_latency_ms"]["p99"]))
PY
echo "== fault injection, CI profile (a node killed, NATS restarted, reconnect storms)"
rm -rf target/faults
scripts/faults.sh --profile ci --results target/faults
