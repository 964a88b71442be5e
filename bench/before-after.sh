#!/usr/bin/env bash
# Two lever binaries on the same machine, alternating, so that a refactor can show it is no
# slower: generation (lever bench pp/tg), sentence embedding (lever embed) and LoRA fine-tuning
# (lever finetune tokens/s). Prints each figure per round, the medians and the ratio new / old.
#
#   bench/before-after.sh OLD_BINARY [NEW_BINARY, default target/release/lever]
#   ROUNDS=3 THREADS=2 bench/before-after.sh /tmp/lever-before
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OLD=${1:?usage: bench/before-after.sh OLD_BINARY [NEW_BINARY]}
NEW=${2:-$ROOT/target/release/lever}
ROUNDS=${ROUNDS:-3}
THREADS=${THREADS:-2}
HOME_=${LEVER_HOME:-$HOME/.cache/lever}
GEN=$HOME_/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf
ENC=$HOME_/models/all-minilm-l6-v2
DATA=${DATA:-$ROOT/../shared/data/instructions/gsm8k_train_first5000.jsonl}
CORPUS=$ROOT/../shared/data/scifact/corpus.jsonl.gz
WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT

python3 - "$CORPUS" "$WORK/texts.txt" <<'PY'
import gzip, json, sys
with gzip.open(sys.argv[1], "rt", encoding="utf-8") as f, open(sys.argv[2], "w") as o:
    for _, line in zip(range(256), f):
        d = json.loads(line)
        o.write(" ".join((d["title"] + " " + d["text"]).split()) + "\n")
PY

# One round of one binary: "pp tg embed finetune", each in tokens (texts) per second.
measure() {
  local bin=$1 tag=$2 b pp tg emb ft
  b=$("$bin" --threads "$THREADS" bench --model "$GEN" --pp 256 --tg 64 -r 1 --json)
  pp=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["pp_tps"])' "$b")
  tg=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["tg_tps"])' "$b")
  emb=$("$bin" --threads "$THREADS" embed -m "$ENC" --file "$WORK/texts.txt" --batch-size 32 --json 2>&1 >/dev/null \
    | sed -n 's/.*(\([0-9.]*\) texts\/s.*/\1/p' | tail -n1)
  rm -rf "$WORK/ft-$tag"
  "$bin" --threads "$THREADS" finetune --model "$GEN" --data "$DATA" --field instruction=question \
    --field output=answer --steps 4 --batch-size 2 --seq-len 128 --lr 1e-3 --warmup 1 --seed 0 \
    --eval-every 0 --save-every 0 --val-fraction 0.05 --out "$WORK/ft-$tag" >/dev/null 2>&1
  ft=$(python3 - "$WORK/ft-$tag/metrics.jsonl" <<'PY'
import json, sys
s = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
s = [x for x in s if "tokens_per_s" in x and x["step"] >= 2]
print(sum(x["tokens"] for x in s) / sum(x["tokens"] / x["tokens_per_s"] for x in s))
PY
)
  echo "$pp $tg $emb $ft"
}

echo "old: $OLD"; echo "new: $NEW"
echo "$ROUNDS rounds, $THREADS threads, $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
: >"$WORK/old"; : >"$WORK/new"
for r in $(seq 1 "$ROUNDS"); do
  o=$(measure "$OLD" old); n=$(measure "$NEW" new)
  echo "$o" >>"$WORK/old"; echo "$n" >>"$WORK/new"
  echo "round $r: old pp/tg/embed/finetune $o | new $n"
done
python3 - "$WORK/old" "$WORK/new" <<'PY'
import statistics, sys
rows = lambda p: [list(map(float, l.split())) for l in open(p) if l.strip()]
old, new = rows(sys.argv[1]), rows(sys.argv[2])
names = ["pp256 tok/s", "tg64 tok/s", "embed texts/s", "finetune tok/s"]
print(f"{'':16}{'old':>10}{'new':>10}{'new/old':>10}")
for i, n in enumerate(names):
    a = statistics.median(r[i] for r in old)
    b = statistics.median(r[i] for r in new)
    print(f"{n:16}{a:10.1f}{b:10.1f}{b / a:10.2f}")
PY
