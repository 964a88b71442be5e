#!/usr/bin/env bash
# How often does llama.cpp's greedy output for the golden prompts (crates/lever/tests/fixtures/
# llama-cpp/greedy.json) stay token-identical when only llama.cpp's own settings change?
# The baseline against which lever's greedy agreement with llama.cpp should be read.
#
#   scripts/llama-cpp-self-consistency.sh [MODEL.gguf]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
MODEL=${1:-${LEVER_GGUF:-$HOME/.cache/lever/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf}}
BIN=$("$ROOT/../shared/tools/llama-cpp-reference.sh" | tail -n1)
WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT
python3 - "$ROOT/crates/lever/tests/fixtures/llama-cpp/greedy.json" "$WORK" <<'PY'
import json, sys
g = json.load(open(sys.argv[1]))
for c in g["cases"]:
    open(f"{sys.argv[2]}/p_{c['name']}.txt", "w").write(c["prompt"])
    open(f"{sys.argv[2]}/want_{c['name']}.txt", "w").write(c["completion_text"])
PY
for variant in "-t 2" "-t 1" "-t 2 -ub 1 -b 1" "-t 2 -fa off"; do
  n=0; total=0
  for f in "$WORK"/p_*.txt; do
    name=$(basename "$f" .txt); name=${name#p_}
    out=$("$BIN/llama-completion" -m "$MODEL" -bf "$f" --no-escape -no-cnv --no-display-prompt \
          --temp 0 -n 32 --seed 1 $variant </dev/null 2>/dev/null | sed 's/ \[end of text\]//')
    total=$((total + 1))
    [ "$out" == "$(cat "$WORK/want_$name.txt")" ] && n=$((n + 1))
  done
  echo "llama-completion $variant: $n / $total prompts identical to the fixture (made with -t 2)"
done
