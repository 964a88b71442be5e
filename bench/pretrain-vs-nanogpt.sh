#!/usr/bin/env bash
# Pretraining from scratch: `lever pretrain --config shakespeare-char` vs nanoGPT itself
# (../shared/anchors/nanogpt, its README's CPU recipe for shakespeare_char) on the same cores,
# alternating, on the same tokens: nanoGPT's prepare.py turns ../shared/data/tinyshakespeare
# into train.bin/val.bin (90/10, characters), and lever trains on those very files (it reads
# nanoGPT's headerless uint16 files) with a character tokenizer of the same text, whose ids are
# nanoGPT's (code-point order) plus an end-of-text token. Prints a markdown table.
#
#   bench/pretrain-vs-nanogpt.sh [THREADS]     # default THREADS=2
#   ITERS=2000 ROUNDS=1 LEVER=target/release/lever VENV=~/.cache/lever-ref-venv bench/pretrain-vs-nanogpt.sh
#
# nanoGPT: --device=cpu --compile=False --eval_iters=20 --log_interval=1 --block_size=64
#   --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=$ITERS
#   --lr_decay_iters=$ITERS --dropout=0.0 (PyTorch from PyPI, installed into $VENV).
# lever: --config shakespeare-char --steps $ITERS (the same recipe; its llama block's size and
#   FLOPs per token are within 1% of nanoGPT's GPT-2 block: the run prints both).
# tokens/s: 768 tokens per iteration over the median iteration time (nanoGPT's "time ... ms"
#   lines, lever's metrics.jsonl tokens_per_s); evaluation iterations are in nanoGPT's times but
#   not the median. Validation loss: the last evaluation (step $ITERS) — nanoGPT's is the mean
#   of 20 random validation batches, lever's is the whole validation split. Peak RSS:
#   /usr/bin/time -f %M around each whole process.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
THREADS=${1:-2}
ITERS=${ITERS:-2000}
ROUNDS=${ROUNDS:-1}
LEVER=${LEVER:-$ROOT/target/release/lever}
VENV=${VENV:-${HOME}/.cache/lever-ref-venv}
ANCHOR="$ROOT/../shared/anchors/nanogpt"
TEXT="$ROOT/../shared/data/tinyshakespeare/input.txt"
TMP=$(mktemp -d "${TMPDIR:-/tmp}/lever-pretrain-bench.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS RAYON_NUM_THREADS=$THREADS

[ -f "$TEXT" ] || { echo "error: $TEXT: no such file" >&2; exit 1; }
[ -d "$ANCHOR" ] || { echo "error: $ANCHOR: no such folder" >&2; exit 1; }
[ -x "$LEVER" ] || cargo build --release -q -p lever || { echo "error: cannot build lever" >&2; exit 1; }
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV" || exit 1
fi
"$VENV/bin/python" -c 'import torch, numpy, requests' 2>/dev/null ||
  "$VENV/bin/pip" install -q torch numpy requests >&2 || { echo "error: cannot install PyTorch" >&2; exit 1; }

# nanoGPT's data, made by its own prepare.py from the shared text (offline: input.txt is there).
cp -r "$ANCHOR" "$TMP/nanogpt" && chmod -R u+w "$TMP/nanogpt"
cp "$TEXT" "$TMP/nanogpt/data/shakespeare_char/input.txt"
(cd "$TMP/nanogpt/data/shakespeare_char" && "$VENV/bin/python" prepare.py >/dev/null) || exit 1
DATA="$TMP/nanogpt/data/shakespeare_char"
"$LEVER" tokenizer train "$TEXT" --kind char --out "$TMP/tok" >/dev/null 2>&1 || { echo "error: lever tokenizer train failed" >&2; exit 1; }

median() { sort -g | awk '{a[NR]=$1} END {if (NR==0) print "nan"; else if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }

run_nanogpt() {  # $1: round → "ms_per_iter val_loss rss_kb seconds"
  local log="$TMP/nanogpt-$1.log" t0 t1
  t0=$(date +%s.%N)
  (cd "$TMP/nanogpt" && /usr/bin/time -f 'RSS %M' "$VENV/bin/python" train.py config/train_shakespeare_char.py \
    --device=cpu --compile=False --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12 \
    --n_layer=4 --n_head=4 --n_embd=128 --max_iters="$ITERS" --lr_decay_iters="$ITERS" --dropout=0.0 \
    --out_dir="$TMP/nanogpt-out-$1" >"$log" 2>&1) || { echo "error: nanoGPT failed, see $log" >&2; tail -5 "$log" >&2; }
  t1=$(date +%s.%N)
  local ms val rss
  ms=$(sed -n 's/^iter [0-9]*: loss [0-9.]*, time \([0-9.]*\)ms.*/\1/p' "$log" | tail -n +3 | median)
  val=$(sed -n "s/^step $ITERS: train loss [0-9.]*, val loss \([0-9.]*\)/\1/p" "$log" | tail -1)
  rss=$(sed -n 's/^RSS \([0-9]*\)/\1/p' "$log" | tail -1)
  echo "$ms ${val:-nan} ${rss:-nan} $(echo "$t1 - $t0" | bc)"
}

run_lever() {  # $1: round → "ms_per_iter val_loss rss_kb seconds"
  local run="$TMP/lever-$1" log="$TMP/lever-$1.log" t0 t1
  t0=$(date +%s.%N)
  /usr/bin/time -f 'RSS %M' "$LEVER" pretrain --config shakespeare-char --steps "$ITERS" \
    --data "$DATA" --tokenizer "$TMP/tok/tokenizer.json" --save-every 0 --out "$run" >"$log" 2>&1 ||
    { echo "error: lever failed, see $log" >&2; tail -5 "$log" >&2; }
  t1=$(date +%s.%N)
  local ms val rss
  ms=$("$VENV/bin/python" -c '
import json, sys
tps = [json.loads(l)["tokens_per_s"] for l in open(sys.argv[1]) if "\"loss\"" in l][2:]
print("\n".join(str(768e3 / t) for t in tps))' "$run/metrics.jsonl" | median)
  val=$("$VENV/bin/python" -c 'import json,sys; print(json.load(open(sys.argv[1]))["result"]["val_loss"])' "$run/manifest.json" 2>/dev/null)
  rss=$(sed -n 's/^RSS \([0-9]*\)/\1/p' "$log" | tail -1)
  echo "$ms ${val:-nan} ${rss:-nan} $(echo "$t1 - $t0" | bc)"
}

echo "pretraining shakespeare_char, $ITERS iterations of 12 x 64 tokens, $THREADS threads, $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs))"
echo "lever $(git -C "$ROOT" rev-parse --short HEAD), torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
echo
printf '| round | tool | ms/iter (median) | tokens/s | val loss @%s | peak RSS MB | wall s |\n' "$ITERS"
printf '|---|---|---|---|---|---|---|\n'
for r in $(seq 1 "$ROUNDS"); do
  read -r nms nval nrss nsec <<<"$(run_nanogpt "$r")"
  read -r lms lval lrss lsec <<<"$(run_lever "$r")"
  for row in "nanoGPT $nms $nval $nrss $nsec" "lever $lms $lval $lrss $lsec"; do
    read -r tool ms val rss sec <<<"$row"
    printf '| %s | %s | %.1f | %.0f | %.4f | %.0f | %.0f |\n' "$r" "$tool" "$ms" "$(echo "768000 / $ms" | bc -l)" "$val" "$(echo "$rss / 1024" | bc -l)" "$sec"
  done
  printf '| %s | lever / nanoGPT tokens/s | %.2fx | | | | |\n' "$r" "$(echo "$nms / $lms" | bc -l)"
done
