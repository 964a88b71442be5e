#!/usr/bin/env bash
# How close `lever plan` comes to the real thing on this machine: calibrate (`lever plan
# --calibrate`), plan two runs, then make them and compare the planned training time with the
# measured one (target: within ±25%).
#
#   1. LoRA on the default model: `lever finetune --lora` on GSM8K (../shared/data/instructions,
#      the README's fine-tuning data), finetune's defaults (batch 4, seq-len 256), planned with
#      `lever plan --job lora --data FILE` (the same examples and micro-batches, padding
#      included).
#   2. The shakespeare-char pretraining recipe: `lever pretrain --config shakespeare-char` on
#      Tiny Shakespeare (character tokenizer and shards made by lever: 65 characters +
#      <|endoftext|>), planned with its shape (4 layers, width 128, 4 heads, MLP 344,
#      vocabulary 66, context 64, batch 12).
#
# Measured: the training loop's own time from each run's manifest (finetune `result.seconds`
# with validation off; pretrain `result.train_seconds`, the steps without the evaluations),
# and the whole process's wall time for reference.
#
#   bench/plan-accuracy.sh
#   LORA_STEPS=20 PRETRAIN_STEPS=300 bench/plan-accuracy.sh     # shorter: same steps planned and run
#   LEVER=target/release/lever THREADS=2 bench/plan-accuracy.sh
#
# LEVER_HOME is used as is (the model and the calibration live there); set it to keep the
# calibration apart.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
LEVER=${LEVER:-$ROOT/target/release/lever}
LORA_STEPS=${LORA_STEPS:-200}
PRETRAIN_STEPS=${PRETRAIN_STEPS:-2000}
THREADS=${THREADS:-$(nproc)}
DATA=${DATA:-$ROOT/../shared/data/instructions/gsm8k_train_first5000.jsonl}
FIELDS=(--field instruction=question --field output=answer)
TEXT=$ROOT/../shared/data/tinyshakespeare/input.txt
TMP=$(mktemp -d "${TMPDIR:-/tmp}/lever-plan-bench.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
export RAYON_NUM_THREADS=$THREADS

for f in "$DATA" "$TEXT"; do
  [ -f "$f" ] || { echo "error: $f: no such file" >&2; exit 1; }
done
[ -x "$LEVER" ] || cargo build --release -q -p lever || { echo "error: cannot build lever" >&2; exit 1; }
json() { python3 -c 'import json,sys; v=json.load(open(sys.argv[1]))
for k in sys.argv[2].split("."): v=v[k]
print(v)' "$@"; }

echo "lever $(git -C "$ROOT" rev-parse --short HEAD), $THREADS threads, $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), load $(cut -d' ' -f1-3 /proc/loadavg)"
"$LEVER" plan --calibrate || exit 1

# Shakespeare's shards, made by lever.
"$LEVER" tokenizer train "$TEXT" --kind char --out "$TMP/tok" >/dev/null 2>&1 || { echo "error: tokenizer train failed" >&2; exit 1; }
"$LEVER" data shard "$TEXT" --tokenizer "$TMP/tok" --val-fraction 0.1 --out "$TMP/shards" >/dev/null 2>&1 || { echo "error: data shard failed" >&2; exit 1; }

# The plans.
"$LEVER" plan --model smollm2-135m-instruct --job lora --data "$DATA" "${FIELDS[@]}" --steps "$LORA_STEPS" --json >"$TMP/lora-plan.json" || exit 1
"$LEVER" plan --model smollm2-135m-instruct --job lora --data "$DATA" "${FIELDS[@]}" --steps "$LORA_STEPS" | sed 's/^/  /'
"$LEVER" plan --layers 4 --width 128 --heads 4 --mlp-width 344 --vocab 66 --context 64 \
  --job pretrain --steps "$PRETRAIN_STEPS" --batch 12 --json >"$TMP/pretrain-plan.json" || exit 1
"$LEVER" plan --layers 4 --width 128 --heads 4 --mlp-width 344 --vocab 66 --context 64 \
  --job pretrain --steps "$PRETRAIN_STEPS" --batch 12 | sed 's/^/  /'

# The runs.
t0=$(date +%s.%N)
"$LEVER" finetune --lora --data "$DATA" "${FIELDS[@]}" --steps "$LORA_STEPS" --eval-every 0 --save-every 0 \
  --out "$TMP/lora" >"$TMP/lora.log" 2>&1 || { echo "error: finetune failed, see below" >&2; tail -5 "$TMP/lora.log" >&2; exit 1; }
lora_wall=$(echo "$(date +%s.%N) - $t0" | bc)
t0=$(date +%s.%N)
"$LEVER" pretrain --config shakespeare-char --steps "$PRETRAIN_STEPS" --eval-every 0 --save-every 0 \
  --data "$TMP/shards" --out "$TMP/pretrain" >"$TMP/pretrain.log" 2>&1 || { echo "error: pretrain failed" >&2; tail -5 "$TMP/pretrain.log" >&2; exit 1; }
pre_wall=$(echo "$(date +%s.%N) - $t0" | bc)

lora_plan=$(json "$TMP/lora-plan.json" time.total_s)
pre_plan=$(json "$TMP/pretrain-plan.json" time.total_s)
lora_meas=$(json "$TMP/lora/manifest.json" result.seconds)
pre_meas=$(json "$TMP/pretrain/manifest.json" result.train_seconds)
lora_tokens_plan=$(json "$TMP/lora-plan.json" tokens)
lora_tokens=$(json "$TMP/lora/manifest.json" result.tokens)

echo
echo "load after the runs: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "LoRA positions planned (padding included) $lora_tokens_plan; the run's tokens (padding excluded) $lora_tokens"
echo
printf '| run | steps | planned s | measured s (training loop) | measured / planned | within ±25%% | wall s (whole process) |\n'
printf '|---|---|---|---|---|---|---|\n'
row() {
  local ratio ok
  ratio=$(echo "$4 / $3" | bc -l)
  ok=$(echo "$ratio >= 0.75 && $ratio <= 1.25" | bc -l)
  printf '| %s | %s | %.1f | %.1f | %.2f | %s | %.1f |\n' "$1" "$2" "$3" "$4" "$ratio" "$([ "$ok" = 1 ] && echo yes || echo no)" "$5"
}
row "LoRA, default model, GSM8K" "$LORA_STEPS" "$lora_plan" "$lora_meas" "$lora_wall"
row "pretrain shakespeare-char" "$PRETRAIN_STEPS" "$pre_plan" "$pre_meas" "$pre_wall"
