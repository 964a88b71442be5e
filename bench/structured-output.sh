#!/usr/bin/env bash
# Structured output (issue 23): validity and overhead of constrained decoding on the default
# model (SmolLM2-135M-Instruct), same run.
#  1. Validity: all 52 JSON Schemas of bench/structured/schemas.jsonl (nested objects, arrays,
#     enums, bounded numbers, string patterns, anyOf/oneOf, const), at temperature 0 and 1:
#     every output must parse and validate (the `jsonschema` crate), via the test
#     crates/lever-generate/tests/constrain.rs with LEVER_SCHEMAS_ALL=1.
#  2. Overhead: generation tokens/s of `lever ask` with a JSON Schema vs the same question
#     unconstrained (--max-tokens 64, --temperature 0), alternating, N rounds; prints
#     the ratio (target ≥ 0.9).
#  3. The same at 8 concurrent streams on `lever serve` (bench/serve_load.py, closed loop,
#     SERVE seconds each, free then with response_format json_schema): aggregate tokens/s ratio.
# Usage: bench/structured-output.sh [ROUNDS] [SERVE]   (after cargo build --release)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-5}
SERVE=${2:-30}
LEVER=target/release/lever
echo "== validity: 52 schemas x temperature 0 and 1"
LEVER_SCHEMAS_ALL=1 cargo test --release -q -p lever-generate --test integration \
  constrain::json_schema_outputs_parse_and_validate -- --nocapture 2>&1 | grep -E "constrained outputs|test result|panicked"
echo "== overhead: generation tokens/s, constrained vs free, $ROUNDS rounds alternating"
SCHEMA=$(mktemp --suffix=.json)
trap 'rm -f "$SCHEMA"' EXIT
cat >"$SCHEMA" <<'JSON'
{"type": "object", "properties": {"people": {"type": "array", "items": {"type": "object",
 "properties": {"name": {"type": "string", "maxLength": 40}, "age": {"type": "integer"},
 "city": {"type": "string", "maxLength": 40}}, "required": ["name", "age", "city"]},
 "minItems": 8}}, "required": ["people"]}
JSON
Q="List eight people with their name, age and city."
rate() { python3 -c 'import json,sys; v=json.load(sys.stdin); print(v["completion_tokens"]/v["generation_ms"]*1e3, v.get("mask_ms_per_token", 0), v["generation_ms"]/v["completion_tokens"])'; }
free=(); guided=(); mask=(); step=()
for r in $(seq "$ROUNDS"); do
  read -r f _ _ <<< "$($LEVER ask "$Q" --max-tokens 64 --temperature 0 --json | rate)"
  read -r g m s <<< "$($LEVER ask "$Q" --max-tokens 64 --temperature 0 --json-schema "$SCHEMA" --json | rate)"
  free+=("$f"); guided+=("$g"); mask+=("$m"); step+=("$s")
done
python3 - "${free[*]}" "${guided[*]}" "${mask[*]}" "${step[*]}" <<'PY'
import statistics, sys
free, guided, mask, step = ([float(x) for x in a.split()] for a in sys.argv[1:5])
f, g = statistics.median(free), statistics.median(guided)
print(f"free {f:.1f} tok/s, with the JSON schema {g:.1f} tok/s (medians of {len(free)}): ratio {g / f:.3f}")
m, s = statistics.median(mask), statistics.median(step)
print(f"mask computation {m:.3f} ms per token of {s:.2f} ms per generated token ({100 * m / s:.1f}%)")
PY

echo "== overhead at 8 concurrent streams on lever serve, $SERVE s each"
LOG=$(mktemp)
"$LEVER" serve --port 0 --no-embedder --max-batch 16 2> "$LOG" &
PID=$!
trap 'kill $PID 2>/dev/null || true; rm -f "$SCHEMA" "$LOG"' EXIT
for _ in $(seq 1 600); do grep -q 'listening on' "$LOG" && break; sleep 0.2; done
URL=$(grep -o 'http://[0-9.:]*' "$LOG" | head -1)
F=$(python3 bench/serve_load.py --url "$URL" --clients 8 --duration "$SERVE" --max-tokens 64)
G=$(python3 bench/serve_load.py --url "$URL" --clients 8 --duration "$SERVE" --max-tokens 64 --json-schema "$SCHEMA")
python3 - "$F" "$G" <<'PY'
import json, sys
f, g = json.loads(sys.argv[1]), json.loads(sys.argv[2])
key = "tokens_per_s"
print(f"8 streams: free {f[key]:.1f}, with the JSON schema {g[key]:.1f} ({key}); ratio {g[key] / f[key]:.3f}; errors {f.get('errors')}/{g.get('errors')}")
PY
