"`retail-cv demo` end to end, as the README runs it: real subprocess, fresh workspace, report opened in Chromium."
import json
import re
import subprocess
from pathlib import Path

import pytest

from conftest import run_cli
from test_docs import CHROMIUM, CHROME_FLAGS

# short budgets: every step runs for real (jobs, training, export, registry, runtime); the models are just weaker
QUICK = ('--shelf-images', 12, '--heldout-images', 4, '--detector-minutes', 0.3, '--classifier-minutes', 0.2)
JOB_STEPS = ('shelves', 'heldout', 'photos', 'train_detector', 'train_classifier', 'evaluate_detector', 'evaluate_classifier',
             'export_detector_shelf_cam_x86', 'export_detector_handheld_arm', 'export_classifier_shelf_cam_x86',
             'export_classifier_handheld_arm')


@pytest.fixture(scope='module')
def demo_runs(tmp_path_factory):
    ws = tmp_path_factory.mktemp('demo-ws')
    # twice: the second run must reuse every job step (its wall time is measured by bench/bench_demo.py, not here)
    return ws, [run_cli('--workspace', ws, 'demo', *QUICK, env={'COLUMNS': '250'}, timeout=900) for _ in range(2)]


def _pipelines(ws: Path) -> list[dict]:
    "The demo's pipeline records, oldest first (run ids start with the UTC time; glob order is arbitrary)."
    return [json.loads(p.read_text()) for p in sorted((ws/'runs').glob('pipeline-demo-*/pipeline.json'))]


def test_demo_runs_every_step(demo_runs):
    ws, [first, _] = demo_runs
    assert first.returncode == 0, first.stdout + first.stderr
    for step in (*JOB_STEPS, 'register and promote', 'predict on the edge runtime', 'report'):
        assert f'✓ {step} ' in first.stdout, step
    assert 'shelf-detector:1 champion' in first.stdout and 'product-classifier:1 champion' in first.stdout
    pipe = _pipelines(ws)[0]
    assert pipe['status'] == 'completed' and {s['step']: s['status'] for s in pipe['steps']} == dict.fromkeys(JOB_STEPS, 'ran')
    # exactly four exports (two models x two profiles), each one signed bundle archive, and no other bundle
    exports = [json.loads((ws/'runs'/s['run_id']/'record.json').read_text()) for s in pipe['steps'] if s['step'].startswith('export_')]
    bundles = {Path(r['artifacts']['bundle']['path']) for r in exports}
    assert len(exports) == len(bundles) == 4 and all(b.is_file() for b in bundles), bundles
    assert len(list((ws/'bundles').rglob('*.tar*'))) == 4


def test_second_run_reuses_every_job_step(demo_runs):
    ws, [_, second] = demo_runs
    assert second.returncode == 0, second.stdout + second.stderr
    for step in JOB_STEPS: assert re.search(rf'✓ {step} +\d+\.\d s  \(cached\)', second.stdout), step
    assert 'already registered' in second.stdout
    pipes = _pipelines(ws)
    assert len(pipes) == 2 and {s['step']: s['status'] for s in pipes[1]['steps']} == dict.fromkeys(JOB_STEPS, 'cached')
    assert [s['run_id'] for s in pipes[1]['steps']] == [s['run_id'] for s in pipes[0]['steps']]  # the first run's records, reused


def test_registry_lineage_and_audit(demo_runs):
    ws, _ = demo_runs
    env = {'RETAIL_CV_WORKSPACE': str(ws), 'COLUMNS': '250'}
    verify = run_cli('registry', 'verify', env=env)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    lin = run_cli('registry', 'lineage', 'shelf-detector', '1', '--json', env=env)
    assert lin.returncode == 0, lin.stderr
    d = json.loads(lin.stdout)
    assert len(d['datasets']) == 1 and d['datasets'][0].startswith('demo-shelves@'), d   # trained on the training shelves
    assert (ws/'runs'/d['run_id']/'config.json').is_file()   # the training run it names exists
    assert {b['profile'] for b in d['bundles']} == {'shelf-cam-x86', 'handheld-arm'}
    assert all(Path(b['path']).exists() for b in d['bundles'])


def test_report_renders_in_browser(demo_runs, tmp_path, artifacts):
    assert CHROMIUM, "Debian package 'chromium' is not installed"
    ws, _ = demo_runs
    report = ws/'demo'/'report.html'
    html = report.read_text()
    assert html.count('<img') >= 5 and 'demo-shelves@' in html and 'shelf-detector:1' in html and 'Audit chain: <b>intact' in html
    shot = artifacts/'demo-report.png'
    shot.unlink(missing_ok=True)
    args = [CHROMIUM, *CHROME_FLAGS, f'--user-data-dir={tmp_path}/chrome']
    dom = subprocess.run([*args, '--dump-dom', report.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert '<h1>retail_cv demo report</h1>' in dom
    subprocess.run([*args, '--window-size=1200,1600', f'--screenshot={shot}', report.as_uri()], capture_output=True, timeout=120)
    from PIL import Image
    with Image.open(shot) as im: assert im.size == (1200, 1600) and len(set(im.convert('L').resize((60, 80)).tobytes())) > 20


def test_bad_option_is_one_clear_line(tmp_path):
    r = run_cli('--workspace', tmp_path/'ws', 'demo', '--detector-minutes', '-1', env={'COLUMNS': '250'})
    assert r.returncode == 1 and 'detector_minutes' in r.stderr and '--detector-minutes' in r.stderr, r.stderr
    assert not (tmp_path/'ws'/'runs').exists()
