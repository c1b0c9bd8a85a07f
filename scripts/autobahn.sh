#!/usr/bin/env bash
# Runs the Autobahn|Testsuite fuzzingclient (all 517 cases, 1.* to 13.*, with
# permessage-deflate allowed for 12.* and 13.*) against shardgate's /echo and exits non-zero
# unless every case passes. The reports land in target/autobahn/report*.
#
#   scripts/autobahn.sh                     # all 517 cases, the gateway's default deflate
#   scripts/autobahn.sh --context-takeover  # the 216 compression cases (12.*, 13.*) with
#                                           # --deflate-context-takeover
#   scripts/autobahn.sh --tls               # cases 1.* to 10.* (301) over wss:// (--listen-tls,
#                                           # a self-signed certificate made for the run)
#
# For a quicker inner loop, name some cases: AUTOBAHN_CASES='12.*,13.1.*' scripts/autobahn.sh
set -euo pipefail
source "$(dirname "$0")/lib.sh"
help_if_asked "$0" "$@"
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
takeover=
tls=
case "${1:-}" in
  --context-takeover) takeover=--deflate-context-takeover ;;
  --tls) tls=1 ;;
esac
out=$root/target/autobahn${takeover:+-takeover}${tls:+-tls}
mkdir -p "$out"

wstest=$(scripts/autobahn-env.sh) || { echo "autobahn: cannot set up the testsuite (Python 2.7 is required)" >&2; exit 3; }
tls_args=()
if [ -n "$tls" ]; then
  ensure_openssl
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=localhost \
    -addext subjectAltName=DNS:localhost,IP:127.0.0.1 -keyout "$out/key.pem" -out "$out/cert.pem" 2>/dev/null
  tls_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  tls_args=(--listen-tls "127.0.0.1:$tls_port" --tls-cert "$out/cert.pem" --tls-key "$out/key.pem")
fi
start_gateway "$out" --shards 2 --echo --max-message-size 16777216 --deflate $takeover "${tls_args[@]}"
url=ws://127.0.0.1:$port/echo
[ -n "$tls" ] && url=wss://127.0.0.1:$tls_port/echo
# The testsuite's client (Python 2.7, one core) is the slow side: the cases run in two
# clients at once, 13.* (126 compression cases) in one and everything else in the other.
if [ -n "${AUTOBAHN_CASES:-}" ]; then
  parts=("$AUTOBAHN_CASES")
  expect=0
elif [ -n "$takeover" ]; then
  parts=("12.*" "13.*")
  expect=216
elif [ -n "$tls" ]; then
  parts=("1.*,2.*,3.*,4.*,5.*" "6.*,7.*,8.*,9.*,10.*")
  expect=301
else
  parts=("1.*,2.*,3.*,4.*,5.*,6.*,7.*,8.*,9.*,10.*,12.*" "13.*")
  expect=517
fi

rm -rf "$out"/report*
pids=()
for i in "${!parts[@]}"; do
  cases_json=$(python3 -c 'import json, sys; print(json.dumps(sys.argv[1].split(",")))' "${parts[$i]}")
  cat >"$out/spec$i.json" <<JSON
{
  "outdir": "$out/report$i",
  "servers": [{"agent": "shardgate", "url": "$url"}],
  "cases": $cases_json,
  "exclude-cases": [],
  "exclude-agent-cases": {}
}
JSON
  (cd "$out" && "$wstest" -m fuzzingclient -s "spec$i.json" >"$out/wstest$i.log" 2>&1) &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done

# wstest exits 0 even when cases fail: the verdicts are in index.json.
python3 - "$expect" "$out"/report*/index.json <<'PY'
import json, sys
results = {}
for path in sys.argv[2:]:
    results.update(json.load(open(path))["shardgate"])
ok_behavior = {"OK", "NON-STRICT", "INFORMATIONAL"}
ok_close = {"OK", "INFORMATIONAL"}
def key(case):
    return [int(p) for p in case.split(".")]
failed = [(c, r["behavior"], r["behaviorClose"]) for c, r in sorted(results.items(), key=lambda kv: key(kv[0]))
          if r["behavior"] not in ok_behavior or r["behaviorClose"] not in ok_close]
counts = {}
for r in results.values():
    counts[r["behavior"]] = counts.get(r["behavior"], 0) + 1
print("autobahn: %d cases run; behaviours: %s" % (len(results), ", ".join("%s %d" % kv for kv in sorted(counts.items()))))
for case, behavior, close in failed:
    print("autobahn: FAILED %s behavior=%s close=%s" % (case, behavior, close))
if len(results) < int(sys.argv[1]):
    print("autobahn: expected all %s cases, got %d" % (sys.argv[1], len(results)))
    sys.exit(1)
print("autobahn: %d passed, %d failed" % (len(results) - len(failed), len(failed)))
sys.exit(1 if failed else 0)
PY
