#!/usr/bin/env bash
# `lever eval mc` speed on the 32 reference items (crates/lever-eval/tests/fixtures/mc_items.jsonl,
# 106 choices), with the query's keys and values reused for every choice (the default) and with
# every (query + choice) scored from scratch (--no-prefix-cache); alternating, R rounds, prints
# the median examples/s of each and the ratio. Same binary, same model, same thread count.
#
#   bench/eval-mc.sh [ROUNDS=3] [THREADS=2]
#
# The machine may be shared: read the load average printed first.
set -euo pipefail
ROOT=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
cd "$ROOT"
R=${1:-3}; T=${2:-2}
DATA=crates/lever-eval/tests/fixtures/mc_items.jsonl
cargo build --release -q -p lever
L=target/release/lever
$L models pull >/dev/null
echo "$(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg); $T threads, $R rounds"
rate() { $L --threads "$T" eval mc "$DATA" --json "$@" 2>/dev/null | sed 's/.*"examples_per_s":\([0-9.e+-]*\).*/\1/'; }
reuse=(); scratch=()
for _ in $(seq "$R"); do
  reuse+=("$(rate)")
  scratch+=("$(rate --no-prefix-cache)")
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
mr=$(median "${reuse[@]}"); ms=$(median "${scratch[@]}")
printf 'prefix reuse     %8.2f examples/s  (runs: %s)\n' "$mr" "${reuse[*]}"
printf 'from scratch     %8.2f examples/s  (runs: %s)\n' "$ms" "${scratch[*]}"
awk -v a="$mr" -v b="$ms" 'BEGIN {printf "reuse / scratch  %8.2fx\n", a / b}'
