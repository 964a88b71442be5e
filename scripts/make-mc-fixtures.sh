#!/usr/bin/env bash
# Regenerates crates/lever-eval/tests/fixtures/mc_reference.json: transformers' (f32, from the
# GGUF dequantized) per-choice log-likelihoods, is_greedy, acc and acc_norm for the items of
# crates/lever-eval/tests/fixtures/mc_items.jsonl, scored with lm-evaluation-harness's rules
# (see scripts/make-mc-fixtures.py). Checked by crates/lever-eval/tests/mc_reference.rs.
#
#   scripts/make-mc-fixtures.sh [GGUF]   # default: $LEVER_HOME/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf
#
# Needs a python with torch + transformers + gguf (default: the reference venv; override with
# LEVER_REF_PYTHON). Runs offline, ~30 s.
set -euo pipefail
ROOT=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
HOME_DIR=${LEVER_HOME:-$HOME/.cache/lever}
GGUF=${1:-$HOME_DIR/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf}
PY=${LEVER_REF_PYTHON:-/root/.cache/lever-ref-venv/bin/python}
[ -f "$GGUF" ] || { echo "model not found: $GGUF (run: lever models pull)" >&2; exit 1; }
"$PY" -c 'import torch, transformers, gguf' 2>/dev/null ||
  { echo "$PY lacks torch/transformers/gguf (pip install torch transformers gguf)" >&2; exit 1; }
FIX="$ROOT/crates/lever-eval/tests/fixtures"
exec "$PY" "$ROOT/scripts/make-mc-fixtures.py" "$GGUF" "$FIX/mc_items.jsonl" "$FIX/mc_reference.json"
