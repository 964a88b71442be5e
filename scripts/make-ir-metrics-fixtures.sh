#!/usr/bin/env bash
# Regenerates crates/lever-rag/tests/fixtures/ir_metrics.json: seeded random qrels and runs (with
# score ties, graded and negative relevance, edge-case queries) and their nDCG@10 / recall@100
# from pytrec_eval (trec_eval's C code) plus MRR@10 by BEIR's formula, as BEIR's
# EvaluateRetrieval.evaluate / evaluate_custom(..., "mrr") compute them.
#
#   scripts/make-ir-metrics-fixtures.sh
#
# Installs pytrec-eval-terrier (PyPI wheels) into the reference venv if it is missing
# (override the python with LEVER_REF_PYTHON). Takes a few seconds.
set -euo pipefail
ROOT=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
VENV=/root/.cache/lever-ref-venv
PY=${LEVER_REF_PYTHON:-$VENV/bin/python}
[ -x "$PY" ] || python3 -m venv "$VENV"
"$PY" -c 'import pytrec_eval' 2>/dev/null || "$PY" -m pip install -q 'pytrec-eval-terrier==0.5.11'
exec "$PY" "$ROOT/scripts/make-ir-metrics-fixtures.py" \
  --out "$ROOT/crates/lever-rag/tests/fixtures/ir_metrics.json"
