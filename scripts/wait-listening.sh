#!/usr/bin/env bash
# wait-listening.sh LOG PID: waits (at most 30 s) until the gateway writing LOG has printed its
# listening lines, or fails at once if process PID has exited.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
help_if_asked "$0" "$@"
log=$1 pid=$2
for _ in $(seq 300); do
  if grep -q "listening on" "$log" 2>/dev/null; then exit 0; fi
  if ! kill -0 "$pid" 2>/dev/null; then echo "the gateway exited before listening:" >&2; cat "$log" >&2; exit 1; fi
  sleep 0.1
done
echo "the gateway did not start listening within 30 s" >&2; exit 1
