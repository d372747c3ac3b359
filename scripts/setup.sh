#!/usr/bin/env bash
# Create .venv with everything retail_cv needs (every extra) and register its Jupyter kernel. Idempotent: re-runs
# only when pyproject.toml changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "retail_cv needs Python 3.10 or newer")'
[ -x .venv/bin/python ] || $PY -m venv .venv
stamp=.venv/.retail-cv-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "== installing retail_cv and its dependencies into .venv (first time: a few minutes)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[all,dev]'  # every extra: the demo and the tests use them all
  # papermill jobs and JupyterLab run on this kernel, so both see the same environment
  .venv/bin/python -m ipykernel install --sys-prefix --name retail-cv --display-name 'Python (retail-cv)' >/dev/null
  touch "$stamp"
fi
# nbdev's git hooks: clean notebooks on save, readable notebook diffs, notebook merge driver
if [ -d .git ] && ! git config --local --get include.path >/dev/null 2>&1; then
  PATH="$PWD/.venv/bin:$PATH" nbdev-install-hooks >/dev/null || echo "warning: nbdev-install-hooks failed; see CONTRIBUTING.md" >&2
fi
