"`retail-cv demo` end to end, as the README runs it: real subprocess, fresh workspace, report opened in Chromium."
import re
import shutil
import subprocess
import time

import pytest

from conftest import run_cli
from test_docs import CHROMIUM, CHROME_FLAGS


@pytest.fixture(scope='module')
def demo_runs(tmp_path_factory):
    ws = tmp_path_factory.mktemp('demo-ws')
    runs = []
    for _ in range(2):
        t0 = time.perf_counter()
        r = run_cli('--workspace', ws, 'demo', '--shelf-images', 12, env={'COLUMNS': '200'}, timeout=600)
        runs.append((r, time.perf_counter() - t0))
    return ws, runs


def test_demo_runs_every_step(demo_runs):
    ws, [(first, _), _] = demo_runs
    assert first.returncode == 0, first.stdout + first.stderr
    for step in ('synthesise shelves', 'validate', 'ingest shelves', 'ingest grocery photos', 'read price tags',
                 'detection pipeline', 'classification pipeline', 'report'):
        assert f'✓ {step}' in first.stdout, step
    tags = re.search(r'(\d+)/(\d+) price tags decoded', first.stdout)
    assert tags and int(tags[2]) > 0 and int(tags[1]) >= 0.9 * int(tags[2])
    assert (ws/'demo'/'report.html').exists() and list((ws/'datasets').glob('*/*.json'))


def test_second_run_reuses_work(demo_runs):
    _, [(first, _), (second, _)] = demo_runs
    assert second.returncode == 0, second.stderr
    reused = [l for l in second.stdout.splitlines() if '✓' in l and '(reused)' in l]
    assert len(reused) >= 5, second.stdout   # synthetic data, both versions, both caches
    assert '0 new objects' in second.stdout and 'new objects' in first.stdout


def test_report_renders_in_browser(demo_runs, tmp_path, artifacts):
    assert CHROMIUM, "Debian package 'chromium' is not installed"
    ws, _ = demo_runs
    report = ws/'demo'/'report.html'
    html = report.read_text()
    assert html.count('<img') >= 2 and 'demo-shelves@' in html and 'grocery-sample@' in html
    shot = artifacts/'demo-report.png'
    shot.unlink(missing_ok=True)
    args = [CHROMIUM, *CHROME_FLAGS, f'--user-data-dir={tmp_path}/chrome']
    dom = subprocess.run([*args, '--dump-dom', report.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert '<h1>retail_cv demo report</h1>' in dom
    subprocess.run([*args, '--window-size=1200,1600', f'--screenshot={shot}', report.as_uri()], capture_output=True, timeout=120)
    from PIL import Image
    with Image.open(shot) as im: assert im.size == (1200, 1600) and len(set(im.convert('L').resize((60, 80)).tobytes())) > 20
