#!/usr/bin/env bash
# Runs the Autobahn|Testsuite fuzzingclient (cases 1.* to 10.*) against shardgate's /echo
# and exits non-zero unless every case passes. The report lands in target/autobahn/report.
# 12.* and 13.* test permessage-deflate, which shardgate does not offer yet.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
help_if_asked "$0" "$@"
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
out=$root/target/autobahn
mkdir -p "$out"

wstest=$(scripts/autobahn-env.sh) || { echo "autobahn: cannot set up the testsuite (Python 2.7 is required)" >&2; exit 3; }
start_gateway "$out" --shards 2 --echo --max-message-size 16777216

rm -rf "$out/report"
cat >"$out/spec.json" <<JSON
{
  "outdir": "$out/report",
  "servers": [{"agent": "shardgate", "url": "ws://127.0.0.1:$port/echo"}],
  "cases": ["1.*", "2.*", "3.*", "4.*", "5.*", "6.*", "7.*", "8.*", "9.*", "10.*"],
  "exclude-cases": ["12.*", "13.*"],
  "exclude-agent-cases": {}
}
JSON
(cd "$out" && "$wstest" -m fuzzingclient -s spec.json >"$out/wstest.log" 2>&1)

# wstest exits 0 even when cases fail: the verdicts are in index.json.
python3 - "$out/report/index.json" <<'PY'
import json, sys
results = json.load(open(sys.argv[1]))["shardgate"]
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
if len(results) < 301:
    print("autobahn: expected at least 301 cases, got %d" % len(results))
    sys.exit(1)
print("autobahn: %d passed, %d failed" % (len(results) - len(failed), len(failed)))
sys.exit(1 if failed else 0)
PY
