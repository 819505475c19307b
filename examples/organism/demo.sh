#!/usr/bin/env bash
# The whole story on the shipped organism, on CPU, in a few minutes:
#   install -> probe (find "red") -> apply (patched copy on disk) -> eval (before/after table + GIF).
# Usage: bash examples/organism/demo.sh [OUT_DIR]   (default /tmp/vpatch-demo; it must not exist yet
# or must be empty)
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-/tmp/vpatch-demo}
mkdir -p "$OUT"
python3 -m pip install -q torch==2.13.0              # the CPU wheel first (a bare torch pulls CUDA)
python3 -m pip install -q -e '.[probe]'
MODEL=examples/organism/model
CONCEPT=examples/organism/red.toml
echo "== 1. probe: map 'red' and the words that read like it (--scan) to its safe twin at every cross-attention K/V (the twin map, docs/efficacy.md; the paper's projection is --method cpca)"
vpatch probe "$MODEL" -c "$CONCEPT" -o "$OUT/red.vud" --method twin --layers cross_kv --scan 64 --device cpu
vpatch inspect "$OUT/red.vud"
echo "== 2. apply: stream the edit into a patched copy (weights only, no pipeline)"
vpatch apply "$MODEL" "$OUT/red.vud" -o "$OUT/organism-no-red"
echo "== 3. eval: original vs patched (loaded from disk), same prompts and seeds, analytic judge"
vpatch eval "$MODEL" -c "$CONCEPT" --patched "$OUT/organism-no-red" --seeds 4 --preview "$OUT/red-before-after.gif"
echo "done: $OUT/red-before-after.gif (left: original, right: patched; rows listed in red-before-after.txt)"
