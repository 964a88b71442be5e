#!/usr/bin/env bash
# Regenerates crates/lever/tests/fixtures/export.json: `lever export` of the default model as a
# Hugging Face folder (loaded by transformers: token ids, chat template, last-position top-10
# logits, argmax ids) and as GGUF files f16/q8_0/q4_1 (scored by llama-perplexity).
#
#   scripts/make-export-fixtures.sh [MODEL]       # -m for lever; default: lever's default model
#
# Needs: the lever binary (built here if missing), llama.cpp's tools from
# ../shared/tools/llama-cpp-reference.sh, and a python with torch + transformers (the venv of
# scripts/make-hf-tiny-fixtures.py; override with LEVER_REF_PYTHON). ~1-2 minutes on 2 cores.
set -euo pipefail
ROOT=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
DATA="$ROOT/../shared/data/tinyshakespeare/input.txt"
[ -f "$DATA" ] || { echo "data not found: $DATA" >&2; exit 1; }
PY=${LEVER_REF_PYTHON:-/root/.cache/lever-ref-venv/bin/python}
"$PY" -c 'import torch, transformers' 2>/dev/null ||
  { echo "$PY lacks torch/transformers (see scripts/make-hf-tiny-fixtures.py)" >&2; exit 1; }

LEVER="$ROOT/target/release/lever"
[ -x "$LEVER" ] || (cd "$ROOT" && cargo build --release -p lever)

BIN=$("$ROOT/../shared/tools/llama-cpp-reference.sh" | tail -n1)
[ -x "$BIN/llama-perplexity" ] || { echo "missing $BIN/llama-perplexity" >&2; exit 1; }
VERSION=$(ls -d "$BIN"/../src/llama_cpp_python-*/ 2>/dev/null | sed -n 's#.*/llama_cpp_python-\([^/]*\)/$#\1#p' | head -n1)
VERSION=${VERSION:-${LLAMA_CPP_PYTHON_VERSION:-unknown}}

exec "$PY" "$ROOT/scripts/export_fixtures.py" --lever "$LEVER" ${1:+--model "$1"} --bin "$BIN" \
  --llama-version "$VERSION" --data "$DATA" --date "${FIXTURE_DATE:-$(date -u +%F)}" \
  --out "$ROOT/crates/lever/tests/fixtures/export.json"
