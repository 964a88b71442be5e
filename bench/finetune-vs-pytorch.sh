#!/usr/bin/env bash
# Fine-tuning speed and memory: `lever finetune` vs PyTorch (transformers + PEFT, CPU) on the same
# GGUF model, data, batches and schedule, LoRA and full fine-tuning. Prints a markdown table.
#
#   bench/finetune-vs-pytorch.sh [THREADS]        # default THREADS=2
#   STEPS=6 B=4 L=256 WARMUP=2 LORA_LR=1e-3 FULL_LR=1e-5 SEED=0 LEVER=target/release/lever \
#     MODEL=path/to/model.gguf DATA=../shared/data/instructions/gsm8k_train_first5000.jsonl \
#     VENV=~/.cache/lever-ref-venv bench/finetune-vs-pytorch.sh 2
#   GC=1 bench/finetune-vs-pytorch.sh      # both sides with gradient checkpointing (activations
#                                          # recomputed layer by layer in the backward pass)
#
# tokens/s, both tools: non-padding tokens of optimizer steps 2..STEPS divided by those steps'
# seconds (step 1 is a warm-up; model loading, data preparation and lever's validation passes are
# outside). lever's per-step seconds are tokens / tokens_per_s from its metrics.jsonl.
# Peak RSS: /usr/bin/time -f %M around each whole process (loading included), else the PyTorch
# script's own ru_maxrss and "n/a" for lever. The PyTorch side is bench/finetune_pytorch.py; its
# per-step losses should be close to lever's (same base weights, same examples in the same order;
# the base is the dequantized Q4_1 in PyTorch, the quantized file itself in lever).
# A mode lever cannot run yet (full fine-tuning: `finetune` without --lora) shows n/a.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
THREADS=${1:-2}
STEPS=${STEPS:-6}; B=${B:-4}; L=${L:-256}; WARMUP=${WARMUP:-2}; SEED=${SEED:-0}
LORA_LR=${LORA_LR:-1e-3}; FULL_LR=${FULL_LR:-1e-5}
LEVER=${LEVER:-$ROOT/target/release/lever}
DATA=${DATA:-../shared/data/instructions/gsm8k_train_first5000.jsonl}
VENV=${VENV:-${HOME}/.cache/lever-ref-venv}
MODEL=${MODEL:-${LEVER_HOME:-$HOME/.cache/lever}/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf}
TMP=$(mktemp -d "${TMPDIR:-/tmp}/lever-ft-bench.XXXXXX")
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
GC=${GC:-0}
if [ "$GC" = 1 ]; then PY_GC=--grad-checkpoint; LEVER_GC=--grad-checkpoint; else PY_GC=; LEVER_GC=; fi

[ -f "$DATA" ] || { echo "error: $DATA: no such file" >&2; exit 1; }
[ -x "$LEVER" ] || cargo build --release -q -p lever || { echo "error: cannot build lever" >&2; exit 1; }
if [ ! -f "$MODEL" ]; then
  "$LEVER" models pull smollm2-135m-instruct >&2 || exit 1
fi

# The reference venv, pinned as scripts/make-hf-tiny-fixtures.py and make-peft-fixtures.py pin it
# (CPU torch from PyPI; gguf for transformers' GGUF loader).
PIP_PINS=(torch==2.9.1 transformers==4.57.6 tokenizers==0.22.1 safetensors==0.6.2 numpy==2.4.6
          huggingface-hub==0.36.2 peft==0.17.1 gguf==0.17.1)
PY=$VENV/bin/python
if ! "$PY" -c 'import torch, transformers, peft, gguf' 2>/dev/null; then
  echo "== provisioning $VENV (one time; torch's wheel is large)" >&2
  [ -x "$PY" ] || python3 -m venv "$VENV" || exit 1
  "$VENV/bin/pip" install -q "${PIP_PINS[@]}" >&2 || exit 1
fi

if [ -x /usr/bin/time ] || { apt-get update -qq && apt-get install -y -qq time >/dev/null 2>&1; } && [ -x /usr/bin/time ]; then
  HAVE_TIME=1
else
  HAVE_TIME=0
  echo "note: /usr/bin/time missing; PyTorch peak RSS is the script's ru_maxrss, lever's is n/a" >&2
fi

# run LOGFILE RSSFILE CMD...: run CMD with its stderr to LOGFILE, peak RSS (KB) to RSSFILE.
run() {
  local log=$1 rss=$2; shift 2
  if [ "$HAVE_TIME" = 1 ]; then
    /usr/bin/time -o "$rss" -f $'%P CPU, %e s wall\n%M' "$@" 2>"$log"
    local rc=$?
    echo "   (process: $(head -n1 "$rss"))" >&2
    return $rc
  else
    "$@" 2>"$log"
  fi
}

# lever_tps METRICS: sum of tokens over steps 2..N / sum of tokens/tokens_per_s.
lever_tps() {
  python3 - "$1" <<'EOF'
import json, sys
steps = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
steps = [s for s in steps if "tokens_per_s" in s]
timed = [s for s in steps if s["step"] >= 2] or steps
tok = sum(s["tokens"] for s in timed)
sec = sum(s["tokens"] / s["tokens_per_s"] for s in timed)
print(f"{tok / sec:.1f}" if sec > 0 else "n/a")
EOF
}
lever_losses() {
  python3 - "$1" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print(" ".join("%.4f" % r["loss"] for r in rows if "loss" in r))
EOF
}
# pyfield JSON EXPR: print EXPR evaluated with d = the file's JSON.
pyfield() { python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(eval(sys.argv[2]))' "$1" "$2"; }

echo "== load: $(uptime)" >&2
declare -A LTPS PTPS LRSS PRSS LLOSS PLOSS
for mode in lora full; do
  if [ "$mode" = lora ]; then lr=$LORA_LR; flag=--lora; else lr=$FULL_LR; flag=; fi

  echo "== PyTorch $mode ($THREADS threads)" >&2
  pj=$TMP/pytorch-$mode.json
  if run "$TMP/pytorch-$mode.log" "$TMP/pytorch-$mode.rss" "$PY" bench/finetune_pytorch.py \
      --gguf "$MODEL" --data "$DATA" --mode "$mode" --steps "$STEPS" --batch-size "$B" \
      --seq-len "$L" --threads "$THREADS" --seed "$SEED" --lr "$lr" --warmup "$WARMUP" $PY_GC --json "$pj"; then
    PTPS[$mode]=$(pyfield "$pj" '"%.1f" % d["tokens_per_s"]')
    PLOSS[$mode]=$(pyfield "$pj" '" ".join("%.4f" % x for x in d["losses"])')
    if [ "$HAVE_TIME" = 1 ]; then
      PRSS[$mode]=$(( $(tail -n1 "$TMP/pytorch-$mode.rss") / 1024 ))
    else
      PRSS[$mode]=$(pyfield "$pj" 'round(d["peak_rss_mb"])')
    fi
  else
    echo "PyTorch $mode failed; last lines of $TMP/pytorch-$mode.log:" >&2
    tail -n5 "$TMP/pytorch-$mode.log" >&2
    PTPS[$mode]=n/a; PRSS[$mode]=n/a; PLOSS[$mode]=
  fi
  tail -n1 "$TMP/pytorch-$mode.log" >&2

  echo "== lever $mode ($THREADS threads)" >&2
  out=$TMP/lever-$mode
  # shellcheck disable=SC2086
  if run "$TMP/lever-$mode.log" "$TMP/lever-$mode.rss" "$LEVER" --threads "$THREADS" finetune \
      --model "$MODEL" --data "$DATA" --field instruction=question --field output=answer \
      --steps "$STEPS" --batch-size "$B" --seq-len "$L" --lr "$lr" --warmup "$WARMUP" \
      --seed "$SEED" --eval-every 0 --save-every 0 --val-fraction 0.05 --out "$out" $flag $LEVER_GC \
      && [ -s "$out/metrics.jsonl" ]; then
    LTPS[$mode]=$(lever_tps "$out/metrics.jsonl")
    LLOSS[$mode]=$(lever_losses "$out/metrics.jsonl")
    if [ "$HAVE_TIME" = 1 ]; then LRSS[$mode]=$(( $(tail -n1 "$TMP/lever-$mode.rss") / 1024 )); else LRSS[$mode]=n/a; fi
  else
    echo "lever $mode failed (n/a); last lines of $TMP/lever-$mode.log:" >&2
    tail -n3 "$TMP/lever-$mode.log" >&2
    LTPS[$mode]=n/a; LRSS[$mode]=n/a; LLOSS[$mode]=
  fi
done
echo "== load: $(uptime)" >&2

ratio() { python3 -c 'import sys; a,b=sys.argv[1:]; print(f"{float(a)/float(b):.2f}x" if "n/a" not in (a,b) else "n/a")' "$1" "$2"; }
mb() { [ "$1" = n/a ] && echo n/a || echo "$1 MB"; }
echo
echo "Fine-tuning, $(basename "$MODEL"), $THREADS threads, gradient checkpointing $([ "$GC" = 1 ] && echo on || echo off), $STEPS steps (tok/s over steps 2..$STEPS), batch $B, seq-len $L, $(basename "$DATA")"
echo
echo "| mode | lever tok/s | PyTorch tok/s | ratio | lever peak RSS | PyTorch peak RSS |"
echo "|---|---|---|---|---|---|"
for mode in lora full; do
  echo "| $mode | ${LTPS[$mode]} | ${PTPS[$mode]} | $(ratio "${LTPS[$mode]}" "${PTPS[$mode]}") | $(mb "${LRSS[$mode]}") | $(mb "${PRSS[$mode]}") |"
done
echo
if [ "${LRSS[lora]}" != n/a ] && [ "${LRSS[full]}" != n/a ]; then
  echo "lever LoRA peak RSS / lever full peak RSS = $(python3 -c "print(f'{${LRSS[lora]}/${LRSS[full]}:.2f}')")"
else
  echo "lever LoRA peak RSS / lever full peak RSS = n/a"
fi
echo
for mode in lora full; do
  echo "losses $mode: lever [${LLOSS[$mode]}]  PyTorch [${PLOSS[$mode]}]"
done
echo "(logs and outputs in $TMP)"
