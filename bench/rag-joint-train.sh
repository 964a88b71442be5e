#!/usr/bin/env bash
# RAG's joint training (Lewis et al. 2020, §2.4) on squad-open, measured: `lever rag train`
# on questions of the training articles (examples/ladder/squad's split by article: articles
# 0 mod 5 are test, 1 mod 5 dev, the rest train; no test or dev question is trained), then
#  - recall@1/5/20 of the gold paragraph on the ladder's 200 test questions, base query
#    encoder against the trained one (`rag eval --formulation closed`, no generation needed
#    for recall: -n 1);
#  - exact match and F1 on the first LIMIT test questions for each of FORMULATIONS, before
#    (base model, base encoder) and after (RUN/adapter, RUN/query-encoder), through
#    bench/rag-squad-eval.sh.
# Prints one table. The training's tokens/s and loss curve are in RUN/metrics.jsonl.
#
#   bench/rag-joint-train.sh      # STEPS=120 BATCH=2 K=5 FORMULATION=token LIMIT=30 K_TEST=10
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
LEVER=${LEVER:-$ROOT/target/release/lever}
STEPS=${STEPS:-120}
BATCH=${BATCH:-2}
K=${K:-5}
K_TEST=${K_TEST:-10}
FORMULATION=${FORMULATION:-token}
LIMIT=${LIMIT:-30}
FORMULATIONS=${FORMULATIONS:-concat seq token}
OUT=${OUT:-$ROOT/runs/rag-joint}
INDEX=${INDEX:-$ROOT/runs/squad-index}
SRC=$ROOT/../shared/data/squad-open/queries-train.jsonl
mkdir -p "$OUT"
if [ ! -e "$INDEX/index.db" ]; then
  "$LEVER" index add "$ROOT/../shared/data/squad-open/corpus.jsonl" --index "$INDEX" >/dev/null
fi

# Training questions: every question of a training article, in a seeded order.
python3 - "$SRC" "$OUT/train.jsonl" "$ROOT/examples/ladder/squad" "$OUT" <<'PY'
import json, random, sys
src, train, ladder, out = sys.argv[1:]
rows = [json.loads(l) for l in open(src, encoding="utf-8")]
rows = [r for r in rows if int(r["gold_ids"][0][1:3]) % 5 >= 2]
random.Random("rag-joint").shuffle(rows)
with open(train, "w", encoding="utf-8") as f:
    for r in rows:
        f.write(json.dumps(r, ensure_ascii=False) + "\n")
for split in ("dev", "test"):
    with open(f"{ladder}/{split}.jsonl", encoding="utf-8") as f, \
         open(f"{out}/{split}.jsonl", "w", encoding="utf-8") as o:
        for line in f:
            q = json.loads(line)
            o.write(json.dumps({"_id": q["id"], "text": q["question"], "answers": q["answers"],
                                "gold_ids": q["gold"]}, ensure_ascii=False) + "\n")
print(f"{len(rows)} training questions (articles 2, 3, 4 mod 5)", file=sys.stderr)
PY

if [ ! -e "$OUT/run/adapter/adapter_config.json" ]; then
  resume=()
  [ -e "$OUT/run/checkpoints/last" ] && resume=(--resume)
  "$LEVER" rag train --data "$OUT/train.jsonl" --index "$INDEX" --out "$OUT/run" \
    --formulation "$FORMULATION" -k "$K" --steps "$STEPS" --batch-size "$BATCH" \
    --lr "${LR:-5e-4}" --encoder-lr "${ENCODER_LR:-5e-5}" --warmup "${WARMUP:-10}" \
    --save-every 10 --val "$OUT/dev.jsonl" ${resume[@]+"${resume[@]}"} 2>&1 | tr '\r' '\n' \
    | grep -v '^\s*$' | tail -n 12
fi

recall() {  # $1: label, then extra flags
  local label=$1; shift
  "$LEVER" rag eval "$OUT/test.jsonl" --index "$INDEX" --formulation closed -n 1 "$@" \
    --json > "$OUT/recall-$label.json"
}
recall before
recall after --query-encoder "$OUT/run/query-encoder"

RUN=$OUT/run
if [ ! -s "$OUT/eval-before/${FORMULATIONS##* }.json" ]; then
  OUT="$OUT/eval-before" LIMIT=$LIMIT K=$K_TEST FORMULATIONS="$FORMULATIONS" \
    "$ROOT/bench/rag-squad-eval.sh" > "$OUT/eval-before.md"
fi
ADAPTER="$RUN/adapter" QENC="$RUN/query-encoder" OUT="$OUT/eval-after" LIMIT=$LIMIT K=$K_TEST \
  FORMULATIONS="$FORMULATIONS" "$ROOT/bench/rag-squad-eval.sh" > "$OUT/eval-after.md"

python3 - "$OUT" $FORMULATIONS <<'PY'
import json, statistics, sys
out, forms = sys.argv[1], sys.argv[2:]
m = [json.loads(l) for l in open(f"{out}/run/metrics.jsonl") if l.strip()]
steps = [r for r in m if "loss" in r]
tps = [r["tokens_per_s"] for r in steps if r.get("tokens_per_s")]
head = statistics.mean(r["loss"] for r in steps[:10])
tail = statistics.mean(r["loss"] for r in steps[-10:])
print(f"training: {len(steps)} steps, loss (mean of first 10 -> last 10) {head:.2f} -> {tail:.2f}, "
      f"median {statistics.median(tps):.0f} tokens/s" if tps else f"training: {len(steps)} steps")
b, a = (json.load(open(f"{out}/recall-{x}.json")) for x in ("before", "after"))
print(f"recall@1/5/20, {b['n']} test questions: "
      + " / ".join(f"{b[k]:.3f}" for k in ("recall@1", "recall@5", "recall@20")) + " -> "
      + " / ".join(f"{a[k]:.3f}" for k in ("recall@1", "recall@5", "recall@20")))
print("| setting | EM before -> after | F1 before -> after [95% CI after] |")
print("|---|---|---|")
for f in forms:
    b, a = (json.load(open(f"{out}/eval-{x}/{f}.json")) for x in ("before", "after"))
    lo, hi = a.get("f1_ci95", [float("nan")] * 2)
    print(f"| {f} (n {a['n']}) | {100 * b['em']:.1f} -> {100 * a['em']:.1f} | "
          f"{100 * b['f1']:.1f} -> {100 * a['f1']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}] |")
PY
