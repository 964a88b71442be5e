#!/usr/bin/env bash
# lm-evaluation-harness's `local-completions` model scoring a multiple-choice task through
# `lever serve` (prompt log-probabilities: /v1/completions with token-id prompts, "echo": true,
# "logprobs": 1, "max_tokens": 1) against `lever eval mc` on the same items, same model.
# Prints both accuracies and exits non-zero when they differ.
#
#   bench/lm-eval-vs-eval-mc.sh [ITEMS.jsonl] [LIMIT=100]
#   LM_EVAL_PYTHON=/path/to/python   a Python with lm-eval installed (otherwise a venv is made
#                                    under bench/out/lm-eval-venv with `pip install lm-eval`)
#
# ITEMS: {"query", "choices", "gold"} per line, each choice starting with its space (the lm-eval
# task uses an empty target delimiter). Default: 100 closed-book items made from
# ../shared/data/squad-open by bench/squad_mc.py (a question's answer against three other answers
# from its article). crates/lever-eval/tests/fixtures/mc_items.jsonl (32 items) works too. The
# tokenizer lm-eval encodes with is the model's own, written as a Hugging Face folder by
# `lever export`.
set -euo pipefail
ROOT=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
cd "$ROOT"
LIMIT=${2:-100}
OUT=$ROOT/bench/out/lm-eval; mkdir -p "$OUT"
if [ -n "${1:-}" ]; then
  ITEMS=$(realpath "$1")
else
  ITEMS=$OUT/squad-mc.jsonl
  python3 bench/squad_mc.py "$LIMIT" "$ITEMS"
fi
cargo build --release -q -p lever
L=$ROOT/target/release/lever
$L models pull smollm2-135m-instruct >/dev/null
MODEL=smollm2-135m-instruct

PY=${LM_EVAL_PYTHON:-}
if [ -z "$PY" ]; then
  if [ ! -x "$ROOT/bench/out/lm-eval-venv/bin/python" ]; then
    python3 -m venv "$ROOT/bench/out/lm-eval-venv"
    "$ROOT/bench/out/lm-eval-venv/bin/pip" install -q --upgrade pip
    "$ROOT/bench/out/lm-eval-venv/bin/pip" install -q "lm-eval[api]"
  fi
  PY=$ROOT/bench/out/lm-eval-venv/bin/python
fi

# The model's tokenizer as transformers loads it.
[ -f "$OUT/hf/tokenizer.json" ] || $L export -m "$MODEL" --out "$OUT/hf" --force >/dev/null

# The same items as an lm-eval task: first LIMIT lines.
head -n "$LIMIT" "$ITEMS" > "$OUT/items.jsonl"
N=$(wc -l < "$OUT/items.jsonl")
cat > "$OUT/lever_mc.yaml" <<EOF
task: lever_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: $OUT/items.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: query
doc_to_choice: choices
doc_to_target: gold
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
EOF

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
$L serve -m "$MODEL" --port "$PORT" > "$OUT/serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 120); do
  curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
  kill -0 $SERVER 2>/dev/null || { cat "$OUT/serve.log"; exit 1; }
  sleep 0.5
done

echo "$N items; lm-eval $("$PY" -c 'import importlib.metadata as m; print(m.version("lm_eval"))') through lever serve, and lever eval mc"
HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false "$PY" -m lm_eval \
  --model local-completions \
  --model_args "model=$MODEL,base_url=http://127.0.0.1:$PORT/v1/completions,tokenizer_backend=huggingface,tokenizer=$OUT/hf,tokenized_requests=True,num_concurrent=1,max_retries=1" \
  --include_path "$OUT" --tasks lever_mc --output_path "$OUT/results" > "$OUT/lm-eval.log" 2>&1 \
  || { tail -30 "$OUT/lm-eval.log"; exit 1; }
RESULTS=$(ls -t "$OUT"/results/*/results_*.json | head -1)
$L eval mc "$OUT/items.jsonl" -m "$MODEL" --json > "$OUT/lever.json" 2>/dev/null

python3 - "$RESULTS" "$OUT/lever.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))["results"]["lever_mc"]
o = json.load(open(sys.argv[2]))
rows = [("acc", r["acc,none"], o["acc"]), ("acc_norm", r["acc_norm,none"], o["acc_norm"])]
print(f"{'metric':10} {'lm-eval via serve':>18} {'lever eval mc':>14}")
for name, a, b in rows:
    print(f"{name:10} {a:18.4f} {b:14.4f}")
bad = [n for n, a, b in rows if abs(a - b) > 1e-9]
if bad:
    sys.exit(f"differ: {', '.join(bad)}")
print("equal")
EOF
