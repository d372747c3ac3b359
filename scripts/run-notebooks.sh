#!/usr/bin/env bash
# Execute notebooks in place (outputs are part of the docs), then nbdev-clean. Args: notebooks (default: all).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH" WANDB_MODE=${WANDB_MODE:-offline}
nbs=("$@"); [ ${#nbs[@]} -gt 0 ] || mapfile -t nbs < <(ls nbs/*.ipynb)
for nb in "${nbs[@]}"; do
  echo "== $nb"
  (cd "$(dirname "$nb")" && jupyter nbconvert --log-level WARN --to notebook --execute --inplace \
      --ExecutePreprocessor.timeout=900 "$(basename "$nb")")
done
nbdev-clean
