#!/usr/bin/env bash
# Load on `lever serve` over loopback, default model, streaming chat requests (64 tokens each,
# temperature 0.8), closed loop (bench/serve_load.py: standard-library HTTP, no client library):
#   1. batching: 1 client for SHORT seconds, then 8 clients for SHORT seconds; aggregate
#      completion tokens/s of each and the ratio (target: 8 clients >= 3x one);
#   2. load: 16 clients for LONG seconds: requests, errors (target 0), latency p50/p99,
#      time to first token, tokens/s;
#   3. SIGTERM: the server's exit code (target 0).
#
#   bench/serve-load.sh [LONG=120] [SHORT=30]
#
# The machine may be shared: read ratios, and run it when nothing else is.
set -euo pipefail
ROOT=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
LONG=${1:-120}
SHORT=${2:-30}
LEVER="$ROOT/target/release/lever"
[ -x "$LEVER" ] || (cd "$ROOT" && cargo build --release -p lever)
LOG=$(mktemp)
"$LEVER" serve --port 0 --no-embedder --max-batch 16 --queue 64 2> "$LOG" &
PID=$!
trap 'kill $PID 2>/dev/null || true; rm -f "$LOG"' EXIT
for _ in $(seq 1 600); do
  grep -q 'listening on' "$LOG" && break
  sleep 0.2
done
URL=$(grep -o 'http://[0-9.:]*' "$LOG" | head -1)
echo "server: $URL (pid $PID)"
py() { python3 "$ROOT/bench/serve_load.py" --url "$URL" "$@"; }
ONE=$(py --clients 1 --duration "$SHORT")
EIGHT=$(py --clients 8 --duration "$SHORT")
LOAD=$(py --clients 16 --duration "$LONG")
kill -TERM $PID
set +e
wait $PID
CODE=$?
set -e
python3 - "$ONE" "$EIGHT" "$LOAD" "$CODE" <<'PY'
import json, sys
one, eight, load = (json.loads(x) for x in sys.argv[1:4])
code = int(sys.argv[4])
print(f"batching: 1 client {one['tokens_per_s']:.1f} tok/s, 8 clients {eight['tokens_per_s']:.1f} tok/s "
      f"-> {eight['tokens_per_s'] / one['tokens_per_s']:.2f}x (target >= 3x); "
      f"errors {one['errors'] + eight['errors']}")
print(f"load: 16 clients, {load['seconds']:.0f} s: {load['requests']} requests, {load['errors']} errors "
      f"{load['error_kinds'] if load['errors'] else ''}, latency p50 {load['latency_p50_s']:.2f} s "
      f"p99 {load['latency_p99_s']:.2f} s, first token p50 {load['ttft_p50_s']:.2f} s, "
      f"{load['tokens_per_s']:.1f} tok/s")
print(f"SIGTERM: exit {code}")
PY
