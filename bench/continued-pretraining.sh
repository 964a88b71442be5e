#!/usr/bin/env bash
# Continued pretraining on a domain (issue 18 item 4): the default model (SmolLM2-135M-Instruct)
# trained further on SciFact's biomedical abstracts (../shared/data/scifact), then perplexity
# before → after on held-out abstracts (the domain) and on Wikipedia paragraphs
# (../shared/data/squad-open: what was forgotten). Prints a markdown table.
#
#   bench/continued-pretraining.sh                 # STEPS=50 BATCH=8 CONTEXT=256 (102,400 tokens)
#   STEPS=200 LEVER=target/release/lever bench/continued-pretraining.sh
#
# Data: the abstracts' text (the corpus order), the last 200 held out; the rest sharded with
# the model's own tokenizer (`lever data shard --tokenizer smollm2-135m-instruct`). "Before" is
# the model dequantized to f32 (`lever export`, a Hugging Face folder) so that before and after
# differ only by the training, not by Q4_1 → f32; both perplexities are llama-perplexity's
# method (`lever perplexity`, windows of CONTEXT tokens, the second half of each scored), on
# at most CHUNKS windows of each text.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
STEPS=${STEPS:-50}
BATCH=${BATCH:-8}
CONTEXT=${CONTEXT:-256}
CHUNKS=${CHUNKS:-40}
LR=${LR:-1e-4}
MODEL=${MODEL:-smollm2-135m-instruct}
LEVER=${LEVER:-$ROOT/target/release/lever}
DATA="$ROOT/../shared/data"
WORK=${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/lever-cpt.XXXXXX")}
mkdir -p "$WORK"
[ -x "$LEVER" ] || cargo build --release -q -p lever

# The domain: abstracts in corpus order; the last 200 are held out.
python3 - "$DATA/scifact/corpus.jsonl.gz" "$WORK" <<'EOF'
import gzip, json, sys
docs = [json.loads(l) for l in gzip.open(sys.argv[1], "rt", encoding="utf-8")]
train, held = docs[:-200], docs[-200:]
with open(f"{sys.argv[2]}/scifact-train.jsonl", "w") as f:
    for d in train:
        f.write(json.dumps({"text": d["title"] + "\n" + d["text"]}) + "\n")
with open(f"{sys.argv[2]}/scifact-heldout.txt", "w") as f:
    f.write("\n\n".join(d["title"] + "\n" + d["text"] for d in held))
EOF
# The other domain: Wikipedia paragraphs the model never saw here.
python3 - "$DATA/squad-open/corpus.jsonl" "$WORK" <<'EOF'
import json, sys
docs = [json.loads(l) for l in open(sys.argv[1], encoding="utf-8")][:300]
with open(f"{sys.argv[2]}/wikipedia.txt", "w") as f:
    f.write("\n\n".join(d["title"] + "\n" + d["text"] for d in docs))
EOF

"$LEVER" data shard "$WORK/scifact-train.jsonl" --tokenizer "$MODEL" --val-fraction 0.01 \
  --out "$WORK/shards" --force
"$LEVER" export --model "$MODEL" --out "$WORK/before" --force >/dev/null

start=$(date +%s)
"$LEVER" pretrain --init "$MODEL" --data "$WORK/shards" --out "$WORK/run" --force \
  --steps "$STEPS" --batch-size "$BATCH" --grad-accum 1 --context "$CONTEXT" --lr "$LR" --eval-every 0 \
  --save-every 20 2> "$WORK/pretrain.log"
secs=$(( $(date +%s) - start ))

ppl() { "$LEVER" perplexity --model "$1" "$2" --ctx "$CONTEXT" --chunks "$CHUNKS" --json \
  | python3 -c 'import json,sys; print("%.3f" % json.load(sys.stdin)["ppl"])'; }
d0=$(ppl "$WORK/before" "$WORK/scifact-heldout.txt"); d1=$(ppl "$WORK/run/model" "$WORK/scifact-heldout.txt")
w0=$(ppl "$WORK/before" "$WORK/wikipedia.txt"); w1=$(ppl "$WORK/run/model" "$WORK/wikipedia.txt")
tokens=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["result"]["tokens"])' "$WORK/run/manifest.json")
tps=$(python3 -c 'import json,sys; print(round(json.load(open(sys.argv[1]))["result"]["tokens_per_s"]))' "$WORK/run/manifest.json")

echo
echo "lever $(git -C "$ROOT" rev-parse --short HEAD), $MODEL, $STEPS steps × $BATCH windows × $CONTEXT tokens, lr $LR: $tokens tokens in ${secs} s ($tps tokens/s of training)"
echo
echo "| perplexity (ctx $CONTEXT) | before | after | after/before |"
echo "|---|---|---|---|"
python3 - "$d0" "$d1" "$w0" "$w1" <<'EOF'
import sys
d0, d1, w0, w1 = map(float, sys.argv[1:])
print(f"| SciFact abstracts, held out (the domain) | {d0:.2f} | {d1:.2f} | {d1/d0:.3f} |")
print(f"| Wikipedia paragraphs (another domain) | {w0:.2f} | {w1:.2f} | {w1/w0:.3f} |")
EOF
echo
echo "work folder: $WORK"
