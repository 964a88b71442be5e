#!/usr/bin/env bash
# The README's first command on simple questions: `lever ask "QUESTION"` as a new user runs it,
# scored for right answers and for loops (bench/front_door.py), with the defaults and with
# other settings side by side, over several seeds.
# Usage: bench/front-door.sh [LEVER_BINARY] [SEEDS]   (default target/release/lever, "42 1 2 3")
# Per-answer records go to bench/out/front-door-*.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
LEVER=${1:-target/release/lever}
SEEDS=${2:-42 1 2 3}
mkdir -p bench/out
Q=bench/front-door/questions.jsonl
run() { local name=$1; shift; python3 bench/front_door.py "$LEVER" "$Q" "bench/out/front-door-$name.jsonl" -- "$@"; }
for s in $SEEDS; do
  run "defaults-s$s" --seed "$s"
  run "card-no-penalty-s$s" --seed "$s" --repeat-penalty 1
done
run greedy --temperature 0 --repeat-penalty 1
