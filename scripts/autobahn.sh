#!/usr/bin/env bash
# Runs the Autobahn|Testsuite fuzzingclient (all 517 cases, 1.* to 13.*, with
# permessage-deflate allowed for 12.* and 13.*) against shardgate's /echo and exits non-zero
# unless every case passes. The reports land in target/autobahn/report*.
#
#   scripts/autobahn.sh                     # all 517 cases, the gateway's default deflate
#   scripts/autobahn.sh --context-takeover  # the 216 compression cases (12.*, 13.*) with
#                                           # --deflate-context-takeover
#
# For a quicker inner loop, name some cases: AUTOBAHN_CASES='12.*,13.1.*' scripts/autobahn.sh
set -euo pipefail
source "$(dirname "$0")/lib.sh"
help_if_asked "$0" "$@"
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
takeover=
[ "${1:-}" = --context-takeover ] && takeover=--deflate-context-takeover
out=$root/target/autobahn${takeover:+-takeover}
mkdir -p "$out"

wstest=$(scripts/autobahn-env.sh) || { echo "autobahn: cannot set up the testsuite (Python 2.7 is required)" >&2; exit 3; }
start_gateway "$out" --shards 2 --echo --max-message-size 16777216 --deflate $takeover
# The testsuite's client (Python 2.7, one core) is the slow side: the cases run in two
# clients at once, 13.* (126 compression cases) in one and everything else in the other.
if [ -n "${AUTOBAHN_CASES:-}" ]; then
  parts=("$AUTOBAHN_CASES")
  expect=0
elif [ -n "$takeover" ]; then
  parts=("12.*" "13.*")
  expect=216
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
  "servers": [{"agent": "shardgate", "url": "ws://127.0.0.1:$port/echo"}],
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
