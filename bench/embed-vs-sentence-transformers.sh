#!/usr/bin/env bash
# Sentence-embedding speed on the CPU, lever vs sentence-transformers (PyTorch), same run:
# the first N SciFact abstracts (title + " " + text), batch 32, 2 threads, all-MiniLM-L6-v2.
# Both sort the texts by length and pad each batch to its longest text; both time the
# embedding call only (tokenization included, model loading not).
#
#   bench/embed-vs-sentence-transformers.sh [N=512] [REPEATS=2]
#
# Needs: a release build of lever (built here if missing), a python with torch +
# sentence-transformers (LEVER_REF_PYTHON, default the reference venv), the model provisioned.
# The machine may be shared: run it more than once and read the ratio, not the absolute rates.
set -euo pipefail
ROOT=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
N=${1:-512}
REPEATS=${2:-2}
THREADS=${THREADS:-2}
BATCH=${BATCH:-32}
MODEL=${LEVER_HOME:-$HOME/.cache/lever}/models/all-minilm-l6-v2
CORPUS="$ROOT/../shared/data/scifact/corpus.jsonl.gz"
PY=${LEVER_REF_PYTHON:-/root/.cache/lever-ref-venv/bin/python}
LEVER="$ROOT/target/release/lever"
[ -x "$LEVER" ] || (cd "$ROOT" && cargo build --release -p lever)
[ -f "$MODEL/model.safetensors" ] || "$LEVER" models pull all-minilm-l6-v2
"$PY" -c 'import torch, sentence_transformers' 2>/dev/null ||
  { echo "$PY lacks torch/sentence-transformers (pip install sentence-transformers)" >&2; exit 1; }

WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT
"$PY" - "$CORPUS" "$N" "$WORK/texts.txt" <<'PY'
import gzip, json, sys
corpus, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
with gzip.open(corpus, "rt", encoding="utf-8") as f, open(out, "w", encoding="utf-8") as o:
    for _, line in zip(range(n), f):
        d = json.loads(line)
        o.write(" ".join((d["title"] + " " + d["text"]).split()) + "\n")
PY

echo "all-MiniLM-L6-v2, $N SciFact abstracts, batch $BATCH, $THREADS threads, $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
for r in $(seq 1 "$REPEATS"); do
  st=$("$PY" "$ROOT/bench/embed_sentence_transformers.py" "$MODEL" "$WORK/texts.txt" "$BATCH" "$THREADS" 2>/dev/null | tail -n1)
  lv=$("$LEVER" --threads "$THREADS" embed -m "$MODEL" --file "$WORK/texts.txt" --batch-size "$BATCH" --json 2>&1 >/dev/null | grep '^embedded')
  st_rate=$(sed -n 's/.*: \([0-9.]*\) texts\/s.*/\1/p' <<<"$st")
  lv_rate=$(sed -n 's/.*(\([0-9.]*\) texts\/s.*/\1/p' <<<"$lv")
  echo "run $r: lever $lv_rate texts/s | sentence-transformers $st_rate texts/s | ratio $(awk -v a="$lv_rate" -v b="$st_rate" 'BEGIN{printf "%.2f", a/b}')x"
done
