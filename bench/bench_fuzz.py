"""Fuzz every parser (the targets of tests/test_fuzz.py) under `coverage`; write cases, outcomes, escapes and line coverage.

Each target runs in a fresh interpreter, so the parser modules are imported while coverage is on. A non-retail_cv
error does not stop the run: it is counted under `escaped` (which must be 0) with its first examples under `escapes`.

Coverage is measured over the parser: for dataset formats and bundles the parser is its whole module; for job
parameters, pipelines and device profiles (modules that also run jobs, pipelines and sessions) it is the parsing
functions and classes named in PARSERS, their lines taken from `inspect.getsourcelines`, plus the shared YAML reader.
Whole-module coverage is recorded beside it under `modules`.

The report at --out is updated in place: the targets of this run replace their old records, the others are kept,
and the run is appended to `runs` with its timing and load.

Usage: python bench/bench_fuzz.py [--n 10000] [--targets coco yolo ...] [--out bench/results/fuzz.json]
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import inspect
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# modules measured per target (the first is the one the >= 80 % target is about, unless the target is in PARSERS)
MODULES = {'coco': ['retail_cv/data/formats/_model.py', 'retail_cv/data/formats/_coco.py', 'retail_cv/data/validate.py'],
           'yolo': ['retail_cv/data/formats/_yolo.py'], 'voc': ['retail_cv/data/formats/_voc.py'],
           'sku110k': ['retail_cv/data/formats/_sku110k.py'], 'grocery': ['retail_cv/data/formats/_grocery.py'],
           'bundle': ['retail_cv/bundle/_verify.py'],
           'params': ['retail_cv/jobs/_params.py'], 'pipeline': ['retail_cv/pipeline.py'], 'profile': ['retail_cv/profiles.py']}
# the parsing code of modules that do more than parse: module -> the functions and classes that read and check input
PARSERS = {
    'params': {'retail_cv/jobs/_params.py': ['find_job', 'JobParameter', '_annotation_types', '_parameters_cell', '_read_notebook',
                                             'parse_parameters', 'job_parameters', 'parse_value', '_coerce', 'validate_params',
                                             'parse_params', 'params_from_env'],
               'retail_cv/core.py': ['read_yaml']},
    'pipeline': {'retail_cv/pipeline.py': ['StepSpec', 'PipelineSpec', '_refs', '_cycle_path', '_order', 'parse_pipeline', 'load_pipeline'],
                 'retail_cv/core.py': ['read_yaml', 'parse_model']},
    'profile': {'retail_cv/profiles.py': ['_canonical_provider', 'DeviceProfile', 'load_profile_file'],
                'retail_cv/core.py': ['read_yaml', 'parse_model']}}
TARGET = 0.80


def _module(path: str):
    "The imported module of a file under retail_cv/."
    return importlib.import_module(path.removesuffix('.py').replace('/', '.'))


def parser_coverage(cov, name: str) -> dict:
    "Statements and misses of the parsing functions of target `name`, per module and function."
    out, statements, missed = {}, 0, 0
    for path, names in PARSERS[name].items():
        _, stmts, _, missing, _ = cov.analysis2(str(ROOT/path))
        mod, rows = _module(path), {}
        for fn in names:
            lines, start = inspect.getsourcelines(getattr(mod, fn))
            span = range(start, start + len(lines))
            s, m = [ln for ln in stmts if ln in span], [ln for ln in missing if ln in span]
            rows[fn] = {'lines': [span.start, span.stop - 1], 'statements': len(s), 'missed': len(m), 'missed_lines': m}
            statements, missed = statements + len(s), missed + len(m)
        out[path] = rows
    return {'functions': out, 'statements': statements, 'missed': missed, 'line_coverage': round(1 - missed / max(1, statements), 3)}


def run_one(name: str, n: int) -> dict:
    "In this interpreter: fuzz target `name` with `n` cases under coverage; the target's record."
    import coverage
    paths = {*MODULES[name], *PARSERS.get(name, {})}
    cov = coverage.Coverage(data_file=None, include=[str(ROOT/m) for m in paths])
    cov.start()  # before retail_cv is imported, so module-level lines count
    sys.path[:0] = [str(ROOT), str(ROOT/'tests')]
    import test_fuzz
    test_fuzz.COUNT_ESCAPES = True
    t = time.perf_counter()
    test_fuzz.fuzz(name, n, derandomize=False)
    seconds = time.perf_counter() - t
    cov.stop()
    modules = {}
    for m in MODULES[name]:
        _, statements, _, missing, _ = cov.analysis2(str(ROOT/m))
        modules[m] = {'statements': len(statements), 'missed': len(missing),
                      'line_coverage': round(1 - len(missing) / max(1, len(statements)), 3)}
    outcomes = dict(test_fuzz.OUTCOMES.get(name, {}))
    record = {'cases': sum(outcomes.values()), 'outcomes': outcomes, 'escaped': outcomes.get('escaped', 0),
              'escapes': test_fuzz.ESCAPES.get(name, []), 'seconds': round(seconds, 1), 'modules': modules}
    if name in PARSERS:
        record['parsers'] = parser_coverage(cov, name)
        record['coverage_of'] = 'parsing functions (see parsers)'
        record['line_coverage'] = record['parsers']['line_coverage']
    else:
        record['coverage_of'] = f'module {MODULES[name][0]}'
        record['line_coverage'] = modules[MODULES[name][0]]['line_coverage']
    record['meets_target'] = record['line_coverage'] >= TARGET
    record['measured'] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')
    return record


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument('--n', type=int, default=10_000)
    ap.add_argument('--targets', nargs='+', default=list(MODULES), choices=list(MODULES))
    ap.add_argument('--out', default=str(ROOT/'bench'/'results'/'fuzz.json'))
    ap.add_argument('--one', help=argparse.SUPPRESS)  # internal: run one target and print its JSON
    a = ap.parse_args()
    if a.one:
        print(json.dumps(run_one(a.one, a.n))); return
    load_before, t0, results = os.getloadavg(), time.perf_counter(), {}
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')
    for name in a.targets:
        p = subprocess.run([sys.executable, __file__, '--one', name, '--n', str(a.n)], capture_output=True, text=True, cwd=ROOT)
        if p.returncode == 0: results[name] = json.loads(p.stdout.strip().splitlines()[-1])
        else: results[name] = {'failed': True, 'error': p.stderr[-3000:]}
        print(name, json.dumps({k: v for k, v in results[name].items() if k not in ('error', 'parsers')}), file=sys.stderr, flush=True)
        write(a, results, started, load_before, t0)  # after every target, so a long run that is stopped keeps what it measured


def write(a: argparse.Namespace, results: dict, started: str, load_before: tuple, t0: float) -> None:
    "Update the report at `a.out` with this run's results (atomically)."
    import hypothesis
    out = Path(a.out)
    old = json.loads(out.read_text()) if out.is_file() else {}
    run = {'done': list(results), 'pending': [t for t in a.targets if t not in results], 'cases_per_target': a.n,
           'seconds': round(time.perf_counter() - t0, 1), 'loadavg_before': [round(x, 2) for x in load_before],
           'loadavg_after': [round(x, 2) for x in os.getloadavg()], 'cpus': os.cpu_count(),
           'python': platform.python_version(), 'hypothesis': hypothesis.__version__}
    runs = [r for r in old.get('runs', []) if r.get('started') != started]  # this run's earlier, partial record goes
    runs.append({'started': started, **run})
    targets = {**old.get('targets', {}), **results}
    report = {'cases_per_target': min((r.get('cases', 0) for r in targets.values()), default=0), 'coverage_target': TARGET,
              'targets': targets, 'done': list(targets),
              'all_passed': all(not r.get('failed') and r.get('escaped', 0) == 0 for r in targets.values()),
              'escaped_total': sum(r.get('escaped', 0) for r in targets.values()),
              'all_meet_target': all(r.get('meets_target') for r in targets.values()),
              'seconds': round(sum(r.get('seconds', 0) for r in targets.values()), 1), 'runs': runs}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix('.json.tmp'); tmp.write_text(json.dumps(report, indent=1) + '\n'); os.replace(tmp, out)


if __name__ == '__main__':
    main()
