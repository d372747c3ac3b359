#!/usr/bin/env bash
# The whole test suite: notebooks and package in sync, every notebook run, pytest (docs site in Chromium included).
set -uo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH" WANDB_MODE=${WANDB_MODE:-offline} PYTHONHASHSEED=0
fail=0
snapshot() { { git diff HEAD --binary; git ls-files -o --exclude-standard | sort | xargs -r sha256sum; } | sha256sum; }

echo "== 1/3 nbdev-clean + nbdev-export leave no diff"
before=$(snapshot)
nbdev-clean && nbdev-export
if [ "$before" != "$(snapshot)" ]; then
  echo "FAIL: nbdev-clean/nbdev-export changed files (edit notebooks, then run both and commit):"
  git status --short; fail=1
fi

echo "== 2/3 nbdev-test (flags slow, cuda, notest skipped)"
nbdev-test --n-workers 2 || fail=1

echo "== 3/3 pytest tests/ (slow-marked variants run in the scheduled workflow, .github/workflows/slow.yml)"
# One worker per core, whole files per worker (module fixtures stay in one process); one OpenMP thread per worker,
# since two multi-threaded trainings on the same cores slow each other far more than they gain.
OMP_NUM_THREADS=1 pytest tests/ -q -p no:cacheprovider -m "not slow" -n "${PYTEST_WORKERS:-auto}" --dist loadfile --durations=15 || fail=1

[ $fail -eq 0 ] && echo "== all checks passed" || echo "== FAILED (see above)"
exit $fail
