"""Overhead of the job runner: `run_job` on a trivial job notebook against running the same code in-process.

overhead = median(run_job) - median(the notebook's code exec'd in this process); target <= 1.5 s.
Also, for the command line: median(`retail-cv run`) - median(`python -c <the same code>`), both fresh processes.

Usage: python bench/bench_runner.py [--rounds N] [--out bench/results/runner.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
import nbformat  # noqa: E402

import retail_cv  # noqa: E402
from retail_cv.core import Workspace  # noqa: E402
from retail_cv.jobs import RUN_DIR_ENV, choose_kernel, package_versions, run_job, validate_params  # noqa: E402

TARGET_S = 1.5
PARAMS = "n = 100_000  # numbers to add\nworkspace = ''"
BODY = ("import os\nfrom pathlib import Path\nfrom retail_cv.jobs import job_outputs\n"
        "total = sum(range(n))\nout = Path(os.environ['RETAIL_CV_RUN_DIR'])/'total.txt'\nout.write_text(str(total))\n"
        "job_outputs({'total': total, 'file': out})")


def trivial_job(folder: Path) -> Path:
    nb = nbformat.v4.new_notebook(metadata={'kernelspec': {'name': 'python3', 'display_name': 'python3', 'language': 'python'}})
    nb.cells = [nbformat.v4.new_code_cell(PARAMS, metadata={'tags': ['parameters']}), nbformat.v4.new_code_cell(BODY)]
    nbformat.write(nb, folder/'trivial.ipynb')
    return folder/'trivial.ipynb'


def in_process(tmp: Path) -> float:
    "The job's code, exec'd here with the run-folder variable the runner gives it."
    run_dir = Path(tempfile.mkdtemp(dir=tmp))
    t = time.perf_counter()
    os.environ[RUN_DIR_ENV] = str(run_dir)
    try:
        g: dict = {}
        exec(PARAMS, g); exec(BODY, g)
    finally:
        del os.environ[RUN_DIR_ENV]
    return time.perf_counter() - t


def timed(cmd: list[str], env: dict, cwd: Path) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env=env, cwd=cwd)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument('--rounds', type=int, default=7)
    ap.add_argument('--out', default=str(Path(__file__).resolve().parent/'results'/'runner.json'))
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix='bench-runner-'))
    job = trivial_job(tmp)
    ws = Workspace.open(tmp/'ws')
    kernel = choose_kernel()

    t = time.perf_counter(); validate_params(job, {'n': '1000'}); validate_s = time.perf_counter() - t
    t = time.perf_counter(); first = run_job(job, {}, ws, progress=False); first_s = time.perf_counter() - t
    assert first.status == 'completed', first.error
    runner, base = [], []
    for _ in range(a.rounds):  # interleaved, so a slow moment of the machine touches both
        t = time.perf_counter(); rec = run_job(job, {}, ws, progress=False); runner.append(time.perf_counter() - t)
        assert rec.status == 'completed' and rec.outputs['total'] == sum(range(100_000)), rec.error
        base.append(in_process(tmp))

    env = {**os.environ, 'RETAIL_CV_WORKSPACE': str(ws.root)}
    cli = str(Path(sys.executable).parent/'retail-cv')
    code = PARAMS + '\n' + BODY
    cli_s, py_s = [], []
    for _ in range(max(3, a.rounds // 2)):
        cli_s.append(timed([cli, 'run', str(job), '-q'], env, tmp))
        py_s.append(timed([sys.executable, '-c', code], {**env, RUN_DIR_ENV: str(tmp)}, tmp))

    med = lambda xs: round(statistics.median(xs), 3)
    overhead = med(runner) - med(base)
    result = {
        'what': "run_job on a trivial job notebook minus the same code exec'd in-process (medians)",
        'rounds': a.rounds, 'kernel': kernel,
        'run_job_s': med(runner), 'in_process_s': round(statistics.median(base), 6),
        'overhead_s': round(overhead, 3), 'target_s': TARGET_S, 'within_target': overhead <= TARGET_S,
        'first_run_job_s': round(first_s, 3), 'validate_params_s': round(validate_s, 4),
        'run_job_all_s': [round(x, 3) for x in runner],
        'cli': {'what': "`retail-cv run JOB -q` minus `python -c CODE`, fresh processes (medians)",
                'retail_cv_run_s': med(cli_s), 'python_c_s': med(py_s), 'overhead_s': round(med(cli_s) - med(py_s), 3)},
        'torch_imported_by_runner': 'torch' in sys.modules,
        'cpus': os.cpu_count(), 'python': platform.python_version(), 'retail_cv': retail_cv.__version__,
        'papermill': package_versions()['papermill'],
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + '\n')
    print(json.dumps(result, indent=1))


if __name__ == '__main__':
    main()
