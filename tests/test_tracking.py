"`retail-cv sync`: a real offline W&B run is listed; without a server or a key the upload fails in seconds with one line and the run stays unsynced; WANDB_MODE=disabled works."
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from retail_cv.core import Workspace
from retail_cv.tracking import SyncError, offline_runs, sync_runs

from conftest import run_cli

MAKE_RUN = """
import sys, wandb
run = wandb.init(mode='offline', dir=sys.argv[1], project='retail-cv-test', name='tiny-run', id='tiny0001',
                 settings=wandb.Settings(silent=True, console='off', x_disable_stats=True, x_disable_meta=True, disable_git=True))
for step in range(3): run.log({'loss': 1.0 / (step + 1)})
run.finish()
"""


def _wandb_env(root: Path) -> dict:
    "W&B's own folders in the test's tmp, and no credentials from the machine."
    return {**{k: str(root/'.wandb-home'/k.lower()) for k in ('WANDB_CONFIG_DIR', 'WANDB_CACHE_DIR', 'WANDB_DATA_DIR')},
            'WANDB_SILENT': 'true', 'WANDB_API_KEY': '', 'NETRC': str(root/'no-netrc'), 'COLUMNS': '400'}


@pytest.fixture(scope='module')
def ws(tmp_path_factory) -> Path:
    "A workspace holding one real offline run made by wandb.init(mode='offline'), as training makes them."
    root = tmp_path_factory.mktemp('tracking')
    ws = Workspace.open(root/'ws')
    subprocess.run([sys.executable, '-c', MAKE_RUN, str(ws/'wandb')], check=True, timeout=120,
                   env={**os.environ, **_wandb_env(root), 'WANDB_MODE': 'offline'})
    return ws.root


def _env(ws: Path, **extra) -> dict:
    return {'RETAIL_CV_WORKSPACE': str(ws), **_wandb_env(ws.parent), **extra}


def test_dry_run_lists_the_offline_run(ws):
    (run,) = offline_runs(ws)
    assert (run.run_id, run.name, run.project, run.synced) == ('tiny0001', 'tiny-run', 'retail-cv-test', False)
    assert run.path.name.startswith('offline-run-') and run.path.name.endswith('-tiny0001') and run.created[:2] == '20'
    r = run_cli('sync', '--dry-run', env=_env(ws))
    assert r.returncode == 0, r.stderr
    row = next(l for l in r.stdout.splitlines() if 'tiny-run' in l)
    assert run.path.name in row and run.created in row and row.rstrip(' │|').endswith('no')
    assert 'dry run: 1 to upload' in r.stdout
    r = run_cli('--workspace', ws, 'sync', '--dry-run', '--json', env=_env(ws))
    rep = json.loads(r.stdout)
    assert rep['dry_run'] and rep['uploaded'] == [] and [(x['name'], x['synced']) for x in rep['runs']] == [('tiny-run', False)]


def test_unreachable_server_fails_within_seconds_and_keeps_the_run(ws):
    t0 = time.perf_counter()
    r = run_cli('sync', env=_env(ws, WANDB_BASE_URL='http://127.0.0.1:9', WANDB_API_KEY='x' * 40))
    elapsed = time.perf_counter() - t0
    assert r.returncode == 1 and elapsed < 20, (elapsed, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: W&B server http://127.0.0.1:9 is not reachable'), r.stderr
    assert '1 offline run in' in lines[0] and 'left unsynced' in lines[0] and 'x' * 40 not in r.stderr + r.stdout
    assert [(x.name, x.synced) for x in offline_runs(ws)] == [('tiny-run', False)] and not list(ws.rglob('*.wandb.synced'))
    # the library says the same, in seconds
    os.environ['WANDB_API_KEY'] = 'y' * 40
    try:
        t0 = time.perf_counter()
        with pytest.raises(SyncError, match='is not reachable'):
            sync_runs(ws, base_url='http://127.0.0.1:9', connect_timeout=2)
        assert time.perf_counter() - t0 < 5
    finally: del os.environ['WANDB_API_KEY']


def test_no_api_key_fails_with_one_line(ws):
    r = run_cli('sync', env=_env(ws, WANDB_BASE_URL='http://127.0.0.1:9'))
    assert r.returncode == 1
    assert r.stderr.strip() == f"error: no W&B API key for http://127.0.0.1:9 (set WANDB_API_KEY or run `wandb login`); 1 offline run in {ws/'wandb'} left unsynced"
    assert not list(ws.rglob('*.wandb.synced'))


def test_a_server_that_is_not_wandb_leaves_the_run_unsynced(ws, tmp_path):
    "A reachable HTTP server that is not W&B: wandb sync runs for real, uploads nothing, and the error names the run."
    server = subprocess.Popen([sys.executable, '-m', 'http.server', '0', '--bind', '127.0.0.1', '--directory', str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = server.stdout.readline()  # "Serving HTTP on 127.0.0.1 port N ..."
        port = int(line.split(' port ')[1].split()[0])
        t0 = time.perf_counter()
        r = run_cli('sync', env=_env(ws, WANDB_BASE_URL=f'http://127.0.0.1:{port}', WANDB_API_KEY='z' * 40), timeout=180)
        assert r.returncode == 1, r.stdout + r.stderr
        (line,) = r.stderr.strip().splitlines()
        assert line.startswith(f'error: wandb sync uploaded 0 of 1 runs to http://127.0.0.1:{port}; not synced: offline-run-'), line
        assert "(wandb sync: Error response Error response Error code: 501 Message: Unsupported method ('POST')" in line  # the server's answer
        assert 'z' * 40 not in r.stderr + r.stdout and time.perf_counter() - t0 < 120
    finally:
        server.kill(); server.wait()
    assert [(x.name, x.synced) for x in offline_runs(ws)] == [('tiny-run', False)]


def test_wandb_disabled(ws, tmp_path):
    "A workspace used with WANDB_MODE=disabled has nothing to sync; with runs present, nothing is uploaded and nothing fails."
    empty = tmp_path/'empty'
    r = run_cli('sync', env=_env(empty, WANDB_MODE='disabled'))
    assert r.returncode == 0 and r.stdout.strip() == 'nothing to sync', r.stderr
    r = run_cli('sync', env=_env(ws, WANDB_MODE='disabled', WANDB_BASE_URL='http://127.0.0.1:9'))
    assert r.returncode == 0 and 'WANDB_MODE=disabled: nothing uploaded' in r.stdout, r.stderr
    assert not list(ws.rglob('*.wandb.synced'))
