#!/usr/bin/env bash
# Re-run notebooks and save their outputs (the docs show them), then nbdev-clean. `slow` cells run too; `cuda`
# cells run only where torch sees a GPU. Args: notebooks (default: all of nbs/).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH" WANDB_MODE=${WANDB_MODE:-offline}
flags=slow
python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null && flags="slow cuda"
if [ $# -eq 0 ]; then nbdev-test --save --flags "$flags" --n-workers 1 --do-print
else for nb in "$@"; do nbdev-test "$nb" --save --flags "$flags" --do-print; done
fi
nbdev-clean
