#!/usr/bin/env bash
# Regenerates the llama.cpp reference fixtures in crates/lever/tests/fixtures/llama-cpp/
# (tokenize.json, greedy.json, perplexity.json, metadata.json) for the default model.
#
#   scripts/make-llama-cpp-fixtures.sh [MODEL.gguf]      # or LEVER_GGUF=... ; default below
#   ONLY=tokenize,greedy scripts/make-llama-cpp-fixtures.sh   # regenerate a subset
#
# The llama.cpp tools come from ../shared/tools/llama-cpp-reference.sh (built once, ~4 min on
# 2 cores; later calls return at once). Everything runs on the CPU with 2 threads; ~1-2 minutes
# when the machine is idle (llama-perplexity is most of it).
set -euo pipefail
ROOT=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
MODEL=${1:-${LEVER_GGUF:-$HOME/.cache/lever/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf}}
[ -f "$MODEL" ] || { echo "model not found: $MODEL" >&2; exit 1; }
DATA="$ROOT/../shared/data/tinyshakespeare/input.txt"
[ -f "$DATA" ] || { echo "data not found: $DATA" >&2; exit 1; }
OUT="$ROOT/crates/lever/tests/fixtures/llama-cpp"

BIN=$("$ROOT/../shared/tools/llama-cpp-reference.sh" | tail -n1)
for t in llama-tokenize llama-completion llama-perplexity; do
  [ -x "$BIN/$t" ] || { echo "missing $BIN/$t" >&2; exit 1; }
done
# the llama-cpp-python release whose vendored llama.cpp the tools were built from
VERSION=$(ls -d "$BIN"/../src/llama_cpp_python-*/ 2>/dev/null | sed -n 's#.*/llama_cpp_python-\([^/]*\)/$#\1#p' | head -n1)
VERSION=${VERSION:-${LLAMA_CPP_PYTHON_VERSION:-unknown}}

python3 -c 'import gguf, jinja2' 2>/dev/null || python3 -m pip install -q gguf jinja2

exec python3 "$ROOT/scripts/llama_cpp_fixtures.py" --bin "$BIN" --model "$MODEL" --out "$OUT" \
  --data "$DATA" --version "$VERSION" --only "${ONLY:-metadata,tokenize,greedy,perplexity}"
