#!/usr/bin/env bash
# Same-run reference for lever's English analyzer and BM25: Lucene 8 (Debian's liblucene8-java,
# Java 17) indexes the same BEIR split with EnglishAnalyzer and BM25Similarity(0.9, 0.4), as
# Anserini's BEIR "flat" runs do; lever compares tokens and scores and evaluates both runs.
#
#   scripts/lucene-bm25-reference.sh [BEIR_DIR] [SPLIT]     # default: ../shared/data/scifact train
#
# Installs liblucene8-java and a JDK with apt-get if missing. About a minute on 2 cores.
set -euo pipefail
ROOT=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
DATA=${1:-$ROOT/../shared/data/scifact}
SPLIT=${2:-train}
if ! ls /usr/share/java/lucene-core-8*.jar >/dev/null 2>&1 || ! command -v javac >/dev/null; then
  apt-get update -qq && apt-get install -y -qq liblucene8-java default-jdk-headless >/dev/null
fi
CP=$(ls /usr/share/java/lucene-core-8*.jar /usr/share/java/lucene-analyzers-common-8*.jar | tr '\n' ':')
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cd "$ROOT"
cargo run -q --release -p lever-rag --example scifact_bm25 -- --dir "$DATA" --split "$SPLIT" --export "$WORK"
java -cp "$CP" scripts/LuceneBm25Reference.java "$WORK" 0.9 0.4
cargo run -q --release -p lever-rag --example scifact_bm25 -- --dir "$DATA" --split "$SPLIT" --compare "$WORK"
