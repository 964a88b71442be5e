#!/usr/bin/env bash
# lever bench vs llama.cpp's llama-bench on the same GGUF files and thread counts, alternating
# runs in one session so both see the same machine load. Prints each tool's median and the ratio.
# Covers the default model's Q4_1 file, a Q8_0 file made from it by `lever quantize`, and
# gemma-3-270m's Q4_K_M file (Q5_0, Q8_0, Q4_K and Q6_K matrices).
#
#   bench/vs-llama-cpp.sh [THREADS...]            # default: 2 1
#   ROUNDS=3 PP=512 TG=128 MODELS="a.gguf b.gguf" bench/vs-llama-cpp.sh 2
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
ROUNDS=${ROUNDS:-3}; PP=${PP:-512}; TG=${TG:-128}
THREADS=("$@"); [ ${#THREADS[@]} -gt 0 ] || THREADS=(2 1)
cargo build --release -q
LEVER=$ROOT/target/release/lever
OUT=$ROOT/bench/out; mkdir -p "$OUT"
if [ -z "${MODELS:-}" ]; then
  $LEVER models pull smollm2-135m-instruct >&2
  Q41=$($LEVER models list --json | python3 -c 'import json,sys; print([m for m in json.load(sys.stdin) if m["kind"]=="generator"][0]["path"])')
  [ -f "$OUT/smollm2-q8_0.gguf" ] || $LEVER quantize "$Q41" "$OUT/smollm2-q8_0.gguf" --type q8_0 >&2
  $LEVER models pull gemma3-270m >&2
  GEMMA=$($LEVER models list --json | python3 -c 'import json,sys; print([m for m in json.load(sys.stdin) if "gemma" in m["name"]][0]["path"])')
  MODELS="$Q41 $OUT/smollm2-q8_0.gguf $GEMMA"
fi
BIN=$("$ROOT/../shared/tools/llama-cpp-reference.sh" | tail -n1)
[ -x /usr/bin/time ] || { apt-get update -qq && apt-get install -y -qq time >/dev/null; }
median() { python3 -c 'import sys,statistics; v=[float(x) for x in sys.argv[1:]]; print(f"{statistics.median(v):.1f}")' "$@"; }
field() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }
rss_of() { /usr/bin/time -f %M "$@" 2>&1 >/dev/null | tail -n1; }
printf '%-28s %-8s %-7s %12s %12s %7s\n' model threads test llama.cpp lever ratio
for MODEL in $MODELS; do
  name=$(basename "$MODEL")
  for t in "${THREADS[@]}"; do
    lpp=(); ltg=(); opp=(); otg=()
    for r in $(seq "$ROUNDS"); do
      j=$("$BIN/llama-bench" -m "$MODEL" -p "$PP" -n "$TG" -t "$t" -r 1 -o json 2>/dev/null)
      lpp+=($(echo "$j" | field '[x["avg_ts"] for x in d if x["n_prompt"]>0][0]'))
      ltg+=($(echo "$j" | field '[x["avg_ts"] for x in d if x["n_gen"]>0][0]'))
      o=$($LEVER --threads "$t" bench --model "$MODEL" --pp "$PP" --tg "$TG" -r 1 --json)
      opp+=($(echo "$o" | field 'd["pp_tps"]'))
      otg+=($(echo "$o" | field 'd["tg_tps"]'))
    done
    a=$(median "${lpp[@]}"); b=$(median "${opp[@]}")
    printf '%-28s %-8s %-7s %12s %12s %6.2fx\n' "$name" "$t" "pp$PP" "$a" "$b" "$(python3 -c "print($b/$a)")"
    a=$(median "${ltg[@]}"); b=$(median "${otg[@]}")
    printf '%-28s %-8s %-7s %12s %12s %6.2fx\n' "$name" "$t" "tg$TG" "$a" "$b" "$(python3 -c "print($b/$a)")"
  done
  # Peak memory of a generation-only run, both tools, first thread count.
  lr=$(rss_of "$BIN/llama-bench" -m "$MODEL" -p 0 -n "$TG" -t "${THREADS[0]}" -r 1)
  orss=$(rss_of "$LEVER" --threads "${THREADS[0]}" bench --model "$MODEL" --pp 0 --tg "$TG" -r 1)
  printf '%-28s %-8s %-7s %9s KB %9s KB %6.2fx\n' "$name" "${THREADS[0]}" peakRSS "$lr" "$orss" "$(python3 -c "print($orss/$lr)")"
done
