"`retail-cv demo` end to end, as the README runs it: real subprocess, fresh workspace, report opened in Chromium."
import json
import re
import subprocess
from pathlib import Path

import pytest

from conftest import run_cli
from test_docs import CHROMIUM, CHROME_FLAGS

# short budgets: every step runs for real (jobs, training, export, registry, runtime, audit, monitor); the models are just
# weaker. 20 held-out shelves are the fewest the monitor gives a verdict on; 40 training shelves leave 8 for the bundle's
# reference (with 2, no test could reach Holm's threshold)
QUICK = ('--shelf-images', 40, '--heldout-images', 20, '--detector-minutes', 0.3, '--classifier-minutes', 0.2)
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
    for step in (*JOB_STEPS, 'register and promote', 'predict on the edge runtime', 'shelf audit', 'drift monitoring', 'report'):
        assert f'✓ {step} ' in first.stdout, step
    assert 'shelf-detector:1 champion' in first.stdout and 'product-classifier:1 champion' in first.stdout
    pipe = _pipelines(ws)[0]
    assert pipe['status'] == 'completed' and {s['step']: s['status'] for s in pipe['steps']} == dict.fromkeys(JOB_STEPS, 'ran')
    # exactly four exports (two models x two profiles), each one signed bundle archive, and no other bundle
    exports = [json.loads((ws/'runs'/s['run_id']/'record.json').read_text()) for s in pipe['steps'] if s['step'].startswith('export_')]
    bundles = {Path(r['artifacts']['bundle']['path']) for r in exports}
    assert len(exports) == len(bundles) == 4 and all(b.is_file() for b in bundles), bundles
    assert len(list((ws/'bundles').rglob('*.tar*'))) == 4
    # the detector's bundles answer with every box the shelf audit counts; the classifier's keep the default threshold
    from retail_cv.apps import AUDIT_MIN_SCORE
    from retail_cv.bundle import verify_bundle
    from retail_cv.core import Workspace
    floors = {(r['parameters']['name'], verify_bundle(Path(r['artifacts']['bundle']['path']), workspace=Workspace.open(ws)).meta.contract.postprocessing.score_threshold)
              for r in exports}
    assert floors == {('shelf-detector', AUDIT_MIN_SCORE), ('product-classifier', 0.5)}, floors


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


def test_shelf_audit_writes_its_findings_and_scores_them_against_the_truth(demo_runs):
    ws, [first, _] = demo_runs
    audit = json.loads((ws/'demo'/'audit'/'audit.json').read_text())
    # every held-out shelf audited; an 18-second detector finds little, so its findings are mostly planned products not
    # seen: the test checks that findings are written and scored, not how good they are (bench/bench_demo.py measures that)
    assert len(audit['images']) == 20 and all({'rows', 'out_of_stock', 'planogram', 'prices'} <= set(im) for im in audit['images'])
    assert sum(im['counts']['issues'] for im in audit['images']) > 0
    assert len(list((ws/'demo'/'audit').glob('*.png'))) == 20 and (ws/'demo'/'audit'/'index.html').is_file()
    score = json.loads((ws/'demo'/'audit'/'score.json').read_text())
    oos, wrong = score['out_of_stock_facings'], score['wrong_price_tags']
    assert oos['true'] > 0 and 0 <= oos['matched'] <= min(oos['found'], oos['true']), oos   # the held-out shelves have sold-out runs
    assert score['shelves'] == 20 and sum(score['other_findings'].values()) >= 0
    assert len(wrong['repriced']) == 3 and wrong['true'] >= 0 and wrong['matched'] <= wrong['found'], wrong
    # the planogram and price table it ran with are the generator's, readable by `retail-cv shelf audit`
    from retail_cv.apps import read_planogram, read_prices
    prices = read_prices(ws/'demo'/'audit'/'prices.csv')
    assert read_planogram(ws/'demo'/'audit'/'planogram.json', prices).for_image('000000.jpg')
    assert re.search(r'✓ shelf audit .*20 shelves: out of stock \d+/\d+ missing facings found', first.stdout), first.stdout


def test_monitor_flags_the_dimmed_shelves_and_not_the_unchanged_ones(demo_runs):
    ws, [first, _] = demo_runs
    dimmed, held = (json.loads((ws/'demo'/'monitor'/f'{s}.json').read_text()) for s in ('dimmed', 'held-out'))
    assert dimmed['n_current'] == held['n_current'] == 20 and dimmed['n_reference'] >= 5, (dimmed['n_reference'], dimmed['note'])
    assert dimmed['drift'] and 'ks.brightness' in dimmed['drifted'], dimmed['drifted']
    assert not held['drift'], [(t['name'], t['p_value'], t['p_adjusted']) for t in held['tests'] if t['verdict'] == 'drift']
    assert (ws/'demo'/'monitor'/'dimmed.html').is_file()
    assert re.search(r'✓ drift monitoring .*held-out 20 images: no drift; dimmed 20 images: DRIFT', first.stdout), first.stdout


def test_report_renders_in_browser(demo_runs, tmp_path, artifacts):
    assert CHROMIUM, "Debian package 'chromium' is not installed"
    ws, _ = demo_runs
    report = ws/'demo'/'report.html'
    html = report.read_text()
    assert html.count('<img') >= 5 and 'demo-shelves@' in html and 'shelf-detector:1' in html and 'Audit chain: <b>intact' in html
    assert 'Shelf audit on held-out shelves</h2>' in html and '<h2>Monitoring: held-out and dimmed shelves' in html
    assert html.count("src='data:image/jpeg") == 20 and 'wrong-price tags' in html and 'Adjusted p-values, dimmed set' in html
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
