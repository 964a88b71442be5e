#!/usr/bin/env bash
# RAG on squad-open (../shared/data/squad-open): exact match and F1 with 95% intervals for
# closed-book, concat (`rag ask`'s one prompt), RAG-Sequence and RAG-Token on the test
# questions of examples/ladder/squad (converted to `rag eval`'s questions format), and the
# retrieval recall@1/5/20 of the gold paragraph; the index is built once over the corpus.
#
#   bench/rag-squad-eval.sh                       # LIMIT=50 K=10 OUT=runs/rag-squad
#   LIMIT=20 K=5 FORMULATIONS="seq token" ADAPTER=RUN/adapter QENC=RUN/query-encoder bench/rag-squad-eval.sh
#
# One kernel thread unless LEVER_THREADS says otherwise: on a machine whose cores are shared
# with other work, the 2-thread kernel pool spends most of its time waiting at its barriers
# (on this shared 2-core machine, load 6: closed-book 1.3 s a question with 1 thread, 8.5 s
# with 2; the earlier 88 s/question run was that, plus one question stalled for an hour).
set -euo pipefail
export LEVER_THREADS=${LEVER_THREADS:-1}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
LEVER=${LEVER:-$ROOT/target/release/lever}
LIMIT=${LIMIT:-50}
K=${K:-10}
OUT=${OUT:-$ROOT/runs/rag-squad}
INDEX=${INDEX:-$ROOT/runs/squad-index}
FORMULATIONS=${FORMULATIONS:-closed concat seq token}
CORPUS=$ROOT/../shared/data/squad-open/corpus.jsonl
mkdir -p "$OUT"

if [ ! -e "$INDEX/index.db" ]; then
  "$LEVER" index add "$CORPUS" --index "$INDEX" --json > "$OUT/index.json"
fi
# The ladder's test split ({id, question, answers, gold}) as {"_id", "text", "answers", "gold_ids"}.
python3 - "$ROOT/examples/ladder/squad/test.jsonl" "$OUT/questions.jsonl" <<'PY'
import json, sys
with open(sys.argv[1], encoding="utf-8") as f, open(sys.argv[2], "w", encoding="utf-8") as o:
    for line in f:
        q = json.loads(line)
        o.write(json.dumps({"_id": q["id"], "text": q["question"], "answers": q["answers"],
                            "gold_ids": q["gold"]}, ensure_ascii=False) + "\n")
PY
extra=()
[ -n "${ADAPTER:-}" ] && extra+=(--adapter "$ADAPTER")
[ -n "${QENC:-}" ] && extra+=(--query-encoder "$QENC")
for f in $FORMULATIONS; do
  "$LEVER" rag eval "$OUT/questions.jsonl" --index "$INDEX" --formulation "$f" -k "$K" \
    --limit "$LIMIT" ${extra[@]+"${extra[@]}"} --predictions "$OUT/$f.predictions.jsonl" --json \
    > "$OUT/$f.json"
done
python3 - "$OUT" $FORMULATIONS <<'PY'
import json, os, sys
out = sys.argv[1]
print("| setting | n | EM (95% CI) | F1 (95% CI) | recall@1 | recall@5 | recall@20 | s/question |")
print("|---|---|---|---|---|---|---|---|")
pct = lambda x: f"{100 * x:.1f}"
ci = lambda r, k: f"{pct(r[k])} [{pct(r[k + '_ci95'][0])}, {pct(r[k + '_ci95'][1])}]"
for f in sys.argv[2:]:
    r = json.load(open(os.path.join(out, f + ".json")))
    print(f"| {f} | {r['n']} | {ci(r, 'em')} | {ci(r, 'f1')} | {ci(r, 'recall@1')} | "
          f"{ci(r, 'recall@5')} | {ci(r, 'recall@20')} | {r['seconds_per_question']:.1f} |")
PY
