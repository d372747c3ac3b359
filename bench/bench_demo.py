"""`retail-cv demo` on its embedded defaults, as the README runs it: a fresh workspace, then a second (cached) run.

Writes bench/results/demo.json: wall time of both runs, the per-step times, what the models reached (detector mAP on
held-out shelves, classifier top-1), the shelf audit's score against the synthetic truth and the monitor's verdicts on
the held-out and dimmed shelves, read from the records the demo leaves.

    python bench/bench_demo.py [--workspace DIR] [--keep]
"""
import argparse, json, os, platform, re, shutil, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from retail_cv.core import atomic_write  # noqa: E402

CLI = str(Path(sys.executable).parent/'retail-cv')


def _run(ws: Path) -> tuple[float, str]:
    t0 = time.perf_counter()
    r = subprocess.run([CLI, '--workspace', str(ws), 'demo'], capture_output=True, text=True, env={**os.environ, 'COLUMNS': '200'})
    if r.returncode: raise SystemExit(f"demo failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    return time.perf_counter() - t0, r.stdout


def _own_steps(out: str) -> dict[str, float]:
    "Seconds of the demo's own steps, read from the table it prints (job steps are in the pipeline record)."
    rows = (re.match(r'\W*(register and promote|predict on the edge runtime|shelf audit|drift monitoring|report)\s*\W+\s*(?:ran|cached)\s*\W+\s*([\d.]+) s', l)
            for l in out.splitlines())
    return {m[1]: float(m[2]) for m in rows if m}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--workspace', type=Path, default=None, help="fresh folder to use (default: a temporary one)")
    ap.add_argument('--keep', action='store_true', help="keep the workspace")
    a = ap.parse_args()
    ws = a.workspace or Path(tempfile.mkdtemp(prefix='bench-demo-'))/'ws'
    if ws.exists() and any(ws.iterdir()): raise SystemExit(f"{ws} is not empty: the benchmark needs a fresh workspace")
    load0 = os.getloadavg()
    first_s, first_out = _run(ws)
    second_s, second_out = _run(ws)
    runs = sorted((ws/'runs').glob('pipeline-demo-*/pipeline.json'))
    first_pipe, second_pipe = (json.loads(p.read_text()) for p in runs[:2])
    recs = {s['step']: json.loads((ws/'runs'/s['run_id']/'record.json').read_text()) for s in first_pipe['steps']}
    ev = {k: recs[f'evaluate_{k}']['outputs']['metrics'] for k in ('detector', 'classifier')}
    train = {k: recs[f'train_{k}']['outputs'] for k in ('detector', 'classifier')}
    result = {
        'benchmark': 'demo', 'created': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
        'machine': {'cpus': os.cpu_count(), 'platform': platform.platform(), 'loadavg_start': load0, 'loadavg_end': os.getloadavg()},
        'first_run_s': round(first_s, 1), 'second_run_s': round(second_s, 1), 'ratio_second_over_first': round(second_s / first_s, 3),
        'target_first_run_s': 600,
        # the cached second run only registers (already there), predicts and reports: it was asserted < 1/2 in tests/test_demo.py,
        # a wall-clock ratio that a loaded machine can break; measured here, where the machine's load is recorded with it
        'target_ratio_second_over_first': 0.5,
        'second_run_all_steps_cached': all(s['status'] == 'cached' for s in second_pipe['steps']),
        'steps_first': {s['step']: {'status': s['status'], 'seconds': s['seconds']} for s in first_pipe['steps']},
        'steps_second': {s['step']: s['status'] for s in second_pipe['steps']},
        'detector_map50': ev['detector'].get('map50'), 'detector_map50_95': ev['detector'].get('map50_95'),
        'classifier_top1': ev['classifier'].get('top1'),
        'detector_epochs': int(train['detector']['metrics'].get('epoch', -1)) + 1,
        'classifier_epochs': int(train['classifier']['metrics'].get('epoch', -1)) + 1,
        'heldout': 'detector scored on synthetic shelves rendered from a seed training never saw',
        # the demo's own steps after the pipeline (register, predict, shelf audit, drift monitoring, report), from its table
        'own_steps_first_s': _own_steps(first_out), 'own_steps_second_s': _own_steps(second_out),
        'target_added_step_s': 60,  # each of the shelf audit and the monitoring step
        'shelf_audit': json.loads((ws/'demo'/'audit'/'score.json').read_text()),
        'monitoring': {s: {k: v for k, v in json.loads((ws/'demo'/'monitor'/f'{s}.json').read_text()).items()
                           if k in ('drift', 'drifted', 'n_reference', 'n_current', 'note')} for s in ('held-out', 'dimmed')},
        'terminal_summary_first_run': first_out.splitlines()[-40:],
    }
    out = ROOT/'bench'/'results'/'demo.json'
    atomic_write(out, json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != 'terminal_summary_first_run'}, indent=1))
    if result['ratio_second_over_first'] >= result['target_ratio_second_over_first']:
        print(f"warning: the cached second run took {result['ratio_second_over_first']:.0%} of the first (target < 50%)", file=sys.stderr)
    if not a.keep: shutil.rmtree(ws.parent if a.workspace is None else ws, ignore_errors=True)


if __name__ == '__main__':
    main()
