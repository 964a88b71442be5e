#!/usr/bin/env bash
# Regenerates crates/lever-model/tests/fixtures/embed/minilm.json: sentence-transformers'
# token ids and embeddings of ~60 varied texts (short, empty-ish, Unicode, code, numbers,
# SciFact abstracts, texts beyond max_seq_length) for lever's encoder test (tests/encoder.rs).
#
#   scripts/make-embed-fixtures.sh [MODEL_DIR]     # default: $LEVER_HOME/models/all-minilm-l6-v2
#
# Needs a python with torch + sentence-transformers (default: the reference venv; override with
# LEVER_REF_PYTHON; `pip install sentence-transformers` into it). Runs offline, ~20 s.
set -euo pipefail
ROOT=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
HOME_DIR=${LEVER_HOME:-$HOME/.cache/lever}
MODEL=${1:-$HOME_DIR/models/all-minilm-l6-v2}
CORPUS="$ROOT/../shared/data/scifact/corpus.jsonl.gz"
PY=${LEVER_REF_PYTHON:-/root/.cache/lever-ref-venv/bin/python}
[ -f "$MODEL/model.safetensors" ] || { echo "model not found: $MODEL (run: lever models pull all-minilm-l6-v2)" >&2; exit 1; }
[ -f "$CORPUS" ] || { echo "data not found: $CORPUS" >&2; exit 1; }
"$PY" -c 'import torch, sentence_transformers' 2>/dev/null ||
  { echo "$PY lacks torch/sentence-transformers (pip install sentence-transformers)" >&2; exit 1; }
OUT="$ROOT/crates/lever-model/tests/fixtures/embed"
mkdir -p "$OUT"
exec "$PY" "$ROOT/scripts/embed_fixtures.py" "$MODEL" "$CORPUS" "$OUT/minilm.json"
