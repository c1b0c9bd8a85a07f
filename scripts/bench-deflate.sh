#!/usr/bin/env bash
# bench-deflate.sh: what permessage-deflate costs and saves, in one run.
#
#   scripts/bench-deflate.sh                      # 3 rounds (about 4 minutes)
#   scripts/bench-deflate.sh --rounds 5 --duration 5s
#
# Echo of JSON-like chat payloads (10x1 KiB and 200x16 KiB, window 1), plain and
# compressed alternating in each round: msg/s, server CPU per message, bytes on the wire
# per echo, the client's own CPU. Then idle memory per connection at 15,000 with and
# without the extension, and the compression step of a room fan-out (one 2 KiB publish to
# 10,000 members: compressed once vs per member). Details: scripts/bench-deflate.py.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
help_if_asked "$0" "$@"
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
echo "== building shardgate, echo-load and deflate-fanout (release)"
cargo build --release --quiet -p shardgate -p shardgate-bench
exec python3 scripts/bench-deflate.py "$@"
