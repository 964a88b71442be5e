#!/usr/bin/env bash
# Data parallel over MPI on this machine: `lever pretrain --config shakespeare-char` (nanoGPT's
# CPU recipe, 12 windows of 64 tokens per step) as one process and as 2 and 4 MPI ranks with
# the same global batch (2 × 6, 4 × 3: the same run, the same losses), on the same tokens.
# Prints a markdown table: tokens/s over all ranks (median over the steps after the first
# two), the share of a step spent averaging gradients (allreduce_s, which includes waiting for
# the slowest rank), MFU (against the sum of the ranks' measured peaks) and the loss at the
# last step (the same in every row but the one with half the batch, which is another run).
#
#   bench/dp-scaling.sh                     # STEPS=60, builds lever with --features mpi
#   STEPS=200 CONFIG=shakespeare-char LEVER=target/release/lever bench/dp-scaling.sh
#
# Needs the system MPI (`apt-get install openmpi-bin libopenmpi-dev libclang-dev`). Each rank
# runs one thread (RAYON_NUM_THREADS=1; mpirun binds 2 ranks to a core each); the 1-process
# rows run 1 and 2 threads. 4 ranks on a 2-core machine are oversubscribed: two per core.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
STEPS=${STEPS:-60}
CONFIG=${CONFIG:-shakespeare-char}
BATCH=${BATCH:-12}
TEXT="$ROOT/../shared/data/tinyshakespeare/input.txt"
TMP=$(mktemp -d "${TMPDIR:-/tmp}/lever-dp-bench.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
# Open MPI refuses to run as root without these (containers).
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

[ -f "$TEXT" ] || { echo "error: $TEXT: no such file" >&2; exit 1; }
command -v mpirun >/dev/null || { echo "error: no mpirun; apt-get install openmpi-bin libopenmpi-dev libclang-dev" >&2; exit 1; }
if [ -z "${LEVER:-}" ]; then
  cargo build --release -q -p lever --features mpi || { echo "error: cannot build lever --features mpi" >&2; exit 1; }
  LEVER="$ROOT/target/release/lever"
fi

"$LEVER" tokenizer train "$TEXT" --kind char --out "$TMP/tok" >/dev/null 2>&1 &&
  "$LEVER" data shard "$TEXT" --tokenizer "$TMP/tok/tokenizer.json" --val-fraction 0.1 \
    --out "$TMP/shards" >/dev/null 2>&1 || { echo "error: cannot make the shards" >&2; exit 1; }

# $1 label, $2 ranks (0: no mpirun), $3 threads per rank, $4 batch per rank, $5.. mpirun options
run() {
  local label=$1 ranks=$2 threads=$3 batch=$4 out="$TMP/run-$1" log="$TMP/log-$1"
  shift 4
  local cmd=("$LEVER" pretrain --config "$CONFIG" --data "$TMP/shards" --steps "$STEPS"
    --batch-size "$batch" --eval-every 0 --save-every 0 --out "$out")
  if [ "$ranks" = 0 ]; then
    RAYON_NUM_THREADS=$threads "${cmd[@]}" >"$log" 2>&1
  else
    mpirun -np "$ranks" "$@" -x RAYON_NUM_THREADS="$threads" "${cmd[@]}" >"$log" 2>&1
  fi || { echo "error: $label failed, see below" >&2; tail -5 "$log" >&2; return 1; }
  python3 - "$out/metrics.jsonl" "$label" <<'EOF'
import json, statistics, sys
steps = [json.loads(l) for l in open(sys.argv[1]) if '"loss"' in l]
rest = steps[2:] or steps
tps = statistics.median(s["tokens_per_s"] for s in rest)
secs = sum(s["tokens"] / s["tokens_per_s"] for s in rest)
ar = sum(s.get("allreduce_s", 0.0) for s in rest)
mfu = statistics.median(s["mfu"] for s in rest)
share = f"{100 * ar / secs:.1f}%" if any("allreduce_s" in s for s in rest) else "-"
ms = f"{1e3 * ar / len(rest):.2f}" if share != "-" else "-"
print(f"| {sys.argv[2]} | {tps:,.0f} | {ms} | {share} | {100 * mfu:.1f}% | {steps[-1]['loss']:.4f} |")
EOF
}

echo "lever $("$LEVER" --version 2>/dev/null | awk '{print $2}') at $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null), $CONFIG, $STEPS steps, global batch $BATCH, $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "| ranks × threads (batch per rank) | tokens/s, all ranks | all-reduce ms/step | all-reduce share | MFU | loss at step $STEPS |"
echo "|---|---|---|---|---|---|"
run "1 process × 1 thread ($BATCH)" 0 1 "$BATCH"
run "1 process × 2 threads ($BATCH)" 0 2 "$BATCH"
# One rank's work alone: what 2 ranks would do at twice this rate with a free all-reduce
# (another run: its loss differs).
run "1 process × 1 thread ($((BATCH / 2)), a rank's share alone)" 0 1 $((BATCH / 2))
run "2 ranks × 1 thread ($((BATCH / 2)))" 2 1 $((BATCH / 2))
run "4 ranks × 1 thread ($((BATCH / 4)), oversubscribed)" 4 1 $((BATCH / 4)) --oversubscribe
