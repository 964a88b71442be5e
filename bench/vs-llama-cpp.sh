#!/usr/bin/env bash
# lever bench vs llama.cpp's llama-bench on the same GGUF file and thread count, alternating
# runs in one session so both see the same machine load. Prints each tool's median and the ratio.
#
#   bench/vs-llama-cpp.sh [MODEL.gguf] [THREADS...]      # default: the default model, 2 1
#   ROUNDS=3 PP=512 TG=128 bench/vs-llama-cpp.sh
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
ROUNDS=${ROUNDS:-3}; PP=${PP:-512}; TG=${TG:-128}
cargo build --release -q
LEVER=$ROOT/target/release/lever
MODEL=${1:-$($LEVER models list --json | python3 -c 'import json,sys; print([m for m in json.load(sys.stdin) if m["kind"]=="generator"][0]["path"])')}
[ -f "$MODEL" ] || $LEVER models pull smollm2-135m-instruct >&2
shift || true
THREADS=("${@:-2 1}"); THREADS=(${THREADS[@]})
BIN=$("$ROOT/../shared/tools/llama-cpp-reference.sh" | tail -n1)
OUT=$ROOT/bench/out; mkdir -p "$OUT"
median() { python3 -c 'import sys,statistics; v=[float(x) for x in sys.argv[1:]]; print(f"{statistics.median(v):.1f}")' "$@"; }
[ -x /usr/bin/time ] || { apt-get update -qq && apt-get install -y -qq time >/dev/null; }
rss_of() { /usr/bin/time -f %M "$@" 2>&1 >/dev/null | tail -n1; }
printf '%-8s %-7s %12s %12s %7s\n' threads test llama.cpp lever ratio
for t in "${THREADS[@]}"; do
  lpp=(); ltg=(); opp=(); otg=()
  for r in $(seq "$ROUNDS"); do
    j=$("$BIN/llama-bench" -m "$MODEL" -p "$PP" -n "$TG" -t "$t" -r 1 -o json 2>/dev/null)
    lpp+=($(echo "$j" | python3 -c 'import json,sys; print([x["avg_ts"] for x in json.load(sys.stdin) if x["n_prompt"]>0][0])'))
    ltg+=($(echo "$j" | python3 -c 'import json,sys; print([x["avg_ts"] for x in json.load(sys.stdin) if x["n_gen"]>0][0])'))
    o=$($LEVER --threads "$t" bench --model "$MODEL" --pp "$PP" --tg "$TG" -r 1 --json)
    opp+=($(echo "$o" | python3 -c 'import json,sys; print(json.load(sys.stdin)["pp_tps"])'))
    otg+=($(echo "$o" | python3 -c 'import json,sys; print(json.load(sys.stdin)["tg_tps"])'))
  done
  for test in pp tg; do
    if [ $test = pp ]; then a=$(median "${lpp[@]}"); b=$(median "${opp[@]}"); n=$PP; else a=$(median "${ltg[@]}"); b=$(median "${otg[@]}"); n=$TG; fi
    printf '%-8s %-7s %12s %12s %6.2fx\n' "$t" "$test$n" "$a" "$b" "$(python3 -c "print($b/$a)")"
  done
done
# Peak memory of a generation run (tg only), both tools, 2 threads.
lr=$(rss_of "$BIN/llama-bench" -m "$MODEL" -p 0 -n "$TG" -t "${THREADS[0]}" -r 1)
orss=$(rss_of "$LEVER" --threads "${THREADS[0]}" bench --model "$MODEL" --pp 0 --tg "$TG" -r 1)
printf '%-8s %-7s %10s KB %10s KB %6.2fx\n' "${THREADS[0]}" peakRSS "$lr" "$orss" "$(python3 -c "print($orss/$lr)")"
