"Shared fixtures: the project root, the CLI as a real subprocess, and a folder for artifacts tests keep."
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT/'test-artifacts'
CLI = str(Path(sys.executable).parent/'retail-cv')  # the installed console script, as users run it

@pytest.fixture(scope='session')
def root() -> Path: return ROOT

@pytest.fixture(scope='session')
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS

def run_cli(*args, env=None, timeout=300, cwd=None) -> subprocess.CompletedProcess:
    "Run `retail-cv ARGS` in a fresh interpreter, as a user would."
    full_env = {**os.environ, 'WANDB_MODE': 'offline', **(env or {})}
    return subprocess.run([CLI, *map(str, args)], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=cwd)

@pytest.fixture
def cli(tmp_path):
    "The CLI with a fresh workspace in `tmp_path`."
    def _run(*args, env=None, **kw):
        return run_cli(*args, env={'RETAIL_CV_WORKSPACE': str(tmp_path/'ws'), **(env or {})}, **kw)
    return _run
