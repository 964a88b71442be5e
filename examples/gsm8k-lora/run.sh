#!/usr/bin/env bash
# The README's fine-tuning result: a LoRA on the default model (SmolLM2-135M-Instruct Q4_1),
# trained on the first 1000 GSM8K training problems (../shared/data/instructions, MIT license,
# see its SOURCE.md), scored on 60 later problems (lines 4901-4960, never trained on) before and
# after: format adherence (a final `#### N` line) and exact match of N.
#   examples/gsm8k-lora/run.sh            # ~30 min on 2 cores
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
LEVER=${LEVER:-$ROOT/target/release/lever}
DATA=$ROOT/../shared/data/instructions/gsm8k_train_first5000.jsonl
OUT=${OUT:-$ROOT/runs/gsm8k-lora}
mkdir -p "$OUT"
head -1000 "$DATA" > "$OUT/train1000.jsonl"
sed -n 4901,4960p "$DATA" > "$OUT/heldout60.jsonl"
RESUME=(); [ -f "$OUT/run/checkpoints/last/trainer.json" ] && RESUME=(--resume)
"$LEVER" finetune --data "$OUT/train1000.jsonl" --field instruction=question --field output=answer \
  --lora --lora-r 16 --lora-alpha 32 --steps 80 --batch-size 4 --seq-len 320 --lr 1e-3 --warmup 8 \
  --eval-every 40 --save-every 20 --val-fraction 0.05 --out "$OUT/run" "${RESUME[@]}"
python3 "$ROOT/examples/gsm8k-lora/score.py" --lever "$LEVER" --data "$OUT/heldout60.jsonl" \
  --outputs "$OUT/base-outputs.jsonl" > "$OUT/base.json"
python3 "$ROOT/examples/gsm8k-lora/score.py" --lever "$LEVER" --data "$OUT/heldout60.jsonl" \
  --adapter "$OUT/run/adapter" --outputs "$OUT/lora-outputs.jsonl" > "$OUT/lora.json"
echo "base: $(cat "$OUT/base.json")"
echo "lora: $(cat "$OUT/lora.json")"
