"Job runner and pipelines end to end: real papermill runs of tiny job notebooks, the CLI as a subprocess, signals."
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from conftest import CLI, ROOT, run_cli
from retail_cv.core import ConfigError, Workspace, sha256_file
from retail_cv.jobs import list_runs, load_run, run_job
from retail_cv.pipeline import load_pipeline, run_pipeline


def write_job(folder: Path, name: str, params: str, *bodies: str) -> Path:
    "A job notebook: a parameters cell and body cells."
    nb = nbformat.v4.new_notebook(metadata={'kernelspec': {'name': 'python3', 'display_name': 'python3', 'language': 'python'}})
    nb.cells = [nbformat.v4.new_code_cell(params, metadata={'tags': ['parameters']}), *map(nbformat.v4.new_code_cell, bodies)]
    folder.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, folder/f'{name}.ipynb')
    return folder/f'{name}.ipynb'


@pytest.fixture
def jobs(tmp_path):
    "Tiny job notebooks in their own folder: `square` writes a file, `check` fails on demand, `sleep` waits."
    d = tmp_path/'jobs'
    write_job(d, 'square', "x = 3  # number to square\nseed = 7\nstorage = ''  # a database URL\nworkspace = ''",
              "import os\nfrom pathlib import Path\nfrom retail_cv.jobs import job_outputs",
              "out = Path(os.environ['RETAIL_CV_RUN_DIR'])/'square.txt'\nout.write_text(str(x * x))\n"
              "job_outputs({'square': x * x, 'file': out}, inputs={'data': f'numbers@{x}'})")
    write_job(d, 'check', "path = ''  # a file holding a number\nlimit = 100\nworkspace = ''",
              "from retail_cv.jobs import job_outputs\nvalue = int(open(path).read())",
              "if value > limit:\n    raise ValueError(f'{value} is over the limit {limit}')",
              "job_outputs({'value': value})")
    write_job(d, 'sleep', "seconds = 60.0", "import os, time\nopen(os.path.join(os.environ['RETAIL_CV_RUN_DIR'], 'kernel.pid'), 'w').write(str(os.getpid()))\ntime.sleep(seconds)")
    return d


def test_bad_parameters_rejected_before_any_kernel(jobs, tmp_path):
    ws = tmp_path/'ws'
    t0 = time.perf_counter()
    r = run_cli('-w', ws, 'run', jobs/'square.ipynb', '-p', 'x=abc')
    elapsed = time.perf_counter() - t0
    assert r.returncode == 1, r.stdout + r.stderr
    assert "job square: parameter 'x' must be int, got 'abc'" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r2 = run_cli('-w', ws, 'run', jobs/'square.ipynb', '-p', 'y=2', '-p', 'x=1')
    assert r2.returncode == 1 and "unknown parameter 'y'; allowed: x, seed, storage, workspace" in r2.stderr
    r3 = run_cli('-w', ws, 'run', 'no_such_job')
    assert r3.returncode == 1 and 'no job named' in r3.stderr and 'train' in r3.stderr
    # nothing ran: no run folder, no executed notebook; and the rejection took no kernel start
    assert not (ws/'runs').exists() or not any((ws/'runs').iterdir())
    assert not list(tmp_path.rglob('executed.ipynb'))
    assert elapsed < 2 * 1.5, f"rejecting bad parameters took {elapsed:.1f} s for two CLI calls"
    with pytest.raises(ConfigError, match="'x' must be int"):
        run_job(jobs/'square.ipynb', {'x': 2.5}, Workspace.open(tmp_path/'ws2'))
    assert not list((tmp_path/'ws2'/'runs').iterdir())


def test_record_has_hashes_git_and_versions(jobs, tmp_path):
    # the job lives in a git checkout, committed: the record names the commit and says clean, then dirty
    subprocess.run(['git', 'init', '-q', str(jobs)], check=True)
    git = ['git', '-C', str(jobs), '-c', 'user.email=t@example.invalid', '-c', 'user.name=t']
    subprocess.run([*git, 'add', '.'], check=True)
    subprocess.run([*git, 'commit', '-qm', 'jobs'], check=True)
    head = subprocess.run([*git, 'rev-parse', 'HEAD'], capture_output=True, text=True, check=True).stdout.strip()
    ws = Workspace.open(tmp_path/'ws')
    rec = run_job(jobs/'square.ipynb', {'x': '12', 'storage': 'postgresql://tuner:hunter2@db:5432/optuna'}, ws, progress=False)
    assert rec.status == 'completed', rec.error
    for f in ('record.json', 'executed.ipynb'):  # no secret lands in the run folder
        text = (ws/'runs'/rec.run_id/f).read_text()
        assert 'hunter2' not in text and 'postgresql://tuner:***@db:5432/optuna' in text, f
    saved = json.loads((ws/'runs'/rec.run_id/'record.json').read_text())
    assert saved['status'] == 'completed' and saved['parameters']['x'] == 12
    assert saved['notebook_sha256'] == sha256_file(jobs/'square.ipynb')
    assert saved['git'] == {'commit': head, 'dirty': False}
    assert saved['packages']['python'] == sys.version.split()[0] and saved['packages']['papermill'] and 'torch' in saved['packages']
    assert saved['seed'] == 7 and saved['inputs'] == {'data': 'numbers@12'} and saved['outputs'] == {'square': 144}
    art = saved['artifacts']['file']
    assert Path(art['path']).parent == ws/'runs'/rec.run_id and art['sha256'] == sha256_file(art['path'])
    assert saved['duration_s'] > 0 and saved['started'] < saved['ended']
    assert (ws/'runs'/rec.run_id/'executed.ipynb').is_file()
    (jobs/'square.ipynb').write_text((jobs/'square.ipynb').read_text().replace('x = 3', 'x = 4'))
    assert run_job(jobs/'square.ipynb', {}, ws, progress=False).git == {'commit': head, 'dirty': True}


def test_runner_does_not_import_torch(jobs, tmp_path):
    code = ("import sys\nfrom retail_cv.jobs import run_job\nimport retail_cv.pipeline, retail_cv.cli\n"
            f"rec = run_job({str(jobs/'square.ipynb')!r}, {{'x': 2}}, {str(tmp_path/'ws')!r}, progress=False)\n"
            "assert rec.status == 'completed', rec.error\nprint('torch' in sys.modules)")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == 'False', "the runner must not import torch (a job that needs it imports it in its kernel)"


def test_failed_job_keeps_record_with_failing_cell(jobs, tmp_path):
    ws = Workspace.open(tmp_path/'ws')
    (tmp_path/'n.txt').write_text('250')
    rec = run_job(jobs/'check.ipynb', {'path': str(tmp_path/'n.txt')}, ws, progress=False)
    assert rec.status == 'failed'
    saved = json.loads(rec.path.read_text())
    assert saved['status'] == 'failed' and saved['error']['type'] == 'ValueError'
    assert saved['error']['message'] == '250 is over the limit 100'
    assert saved['error']['cell_index'] == 2 and 'raise ValueError' in saved['error']['cell_source']
    assert saved['outputs'] == {} and saved['ended'] and rec.executed.is_file()
    executed = nbformat.read(rec.executed, 4)
    assert any(o.get('ename') == 'ValueError' for c in executed.cells if c.cell_type == 'code' for o in c.get('outputs', []))
    # the CLI exits 1 and shows the cell; `runs show` and `runs list` read the record back
    r = run_cli('-w', ws.root, 'run', jobs/'check.ipynb', '-p', f'path={tmp_path/"n.txt"}', '-p', 'limit=10', '-q')
    assert r.returncode == 1 and 'ValueError in cell 2: 250 is over the limit 10' in r.stderr
    listed = json.loads(run_cli('-w', ws.root, 'runs', 'list', '--json').stdout)
    assert [x['status'] for x in listed] == ['failed', 'failed']
    shown = json.loads(run_cli('-w', ws.root, 'runs', 'show', rec.run_id[:-2], '--json').stdout)
    assert shown['run_id'] == rec.run_id and shown['error']['cell_index'] == 2


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT])
def test_interrupted_run_leaves_record(jobs, tmp_path, sig):
    ws = tmp_path/'ws'
    # As from a terminal: a shell that starts the test suite in the background (`cmd &`) makes it ignore SIGINT,
    # every child inherits that, and Python then never raises KeyboardInterrupt.
    p = subprocess.Popen([CLI, '-w', str(ws), 'run', str(jobs/'sleep.ipynb'), '-q'], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env={**os.environ, 'WANDB_MODE': 'offline'},
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not list(ws.glob('runs/*/kernel.pid')): time.sleep(0.1)  # the kernel is in the sleeping cell
        [pid_file] = list(ws.glob('runs/*/kernel.pid'))
        time.sleep(0.3)
        p.send_signal(sig)
        p.wait(timeout=60)  # stopping the kernel, then the papermill thread (<= 15 s)
    finally:
        if p.poll() is None: p.kill()
    assert p.returncode == 130, p.stderr.read()
    [rec] = list_runs(ws)
    assert rec.status == 'interrupted' and rec.error['type'] in ('JobInterrupted', 'KeyboardInterrupt'), (rec.status, rec.error)
    kernel_pid = int(pid_file.read_text())
    for _ in range(50):  # the runner stopped the kernel: nothing is left sleeping
        try: os.kill(kernel_pid, 0)
        except ProcessLookupError: break
        time.sleep(0.1)
    else: pytest.fail(f"kernel {kernel_pid} is still running after the runner was interrupted")
    assert rec.ended and rec.duration_s < 60


PEM = ('-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIHBlbS1ib2R5LXRoYXQtbXVzdC1uZXZlci1sZWFr\n'
       '-----END PRIVATE KEY-----')


def test_sigkilled_runner_leaves_no_secret_on_disk(tmp_path):
    "Killed outright mid-job, the runner leaves no cleartext secret in any file: saves of the notebook are masked as written."
    secrets = {'url': 'hunter2-url', 'nested': 'hunter2-nested', 'param_pem': 'HBlbS1ib2R5LXRoYXQtbXVzdC1uZXZlci1sZWFr',
               'env': 'env-token-0123456789'}
    job = write_job(tmp_path/'jobs', 'vault', "storage = ''  # database URL\nconfig = {}\naudit_key = ''  # PEM text\nworkspace = ''",
                    "import os\nprint(storage, config, audit_key, os.environ['RETAIL_CV_AUDIT_KEY'], os.environ['SERVICE_TOKEN'])",
                    "from pathlib import Path\nPath(os.environ['RETAIL_CV_RUN_DIR'], 'kernel.pid').write_text(str(os.getpid()))\n"
                    "import time; time.sleep(120)")
    ws = tmp_path/'ws'
    env = {**os.environ, 'WANDB_MODE': 'offline', 'IPYTHONDIR': str(tmp_path/'ipython'), 'RETAIL_CV_AUDIT_KEY': PEM,
           'SERVICE_TOKEN': secrets['env'], 'RETAIL_CV_PARAM_audit_key': PEM}  # a parameter from the environment, as in a pod
    p = subprocess.Popen([CLI, '-w', str(ws), 'run', str(job), '-q', '-p', 'storage=postgresql://app:hunter2-url@db:5432/x',
                          '-p', 'config={db: {host: db, password: hunter2-nested}}'], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not list(ws.glob('runs/*/kernel.pid')): time.sleep(0.1)  # the kernel sleeps in cell 3
        [pid_file] = list(ws.glob('runs/*/kernel.pid'))
        time.sleep(0.5)  # papermill saved the notebook when the sleeping cell started
        assert p.poll() is None, "the runner ended before it was killed"
        p.kill()  # SIGKILL: nothing of the runner's cleanup runs
        p.wait(timeout=10)
    finally:
        if p.poll() is None: p.kill()
    kernel_pid = int(pid_file.read_text())
    try:
        os.kill(kernel_pid, 0)  # the job was still running when its runner died
    finally:
        with contextlib.suppress(ProcessLookupError): os.kill(kernel_pid, signal.SIGKILL)
    assert p.returncode == -signal.SIGKILL
    [rec] = list_runs(ws)
    assert rec.status == 'interrupted' and rec.error['type'] == 'RunnerLost'
    assert rec.parameters['config'] == {'db': {'host': 'db', 'password': '***'}} and rec.parameters['audit_key'] == '***'
    executed = (ws/'runs'/rec.run_id/'executed.ipynb').read_text()
    assert 'postgresql://app:***@db:5432/x' in executed and 'time.sleep(120)' in executed  # saved mid-job, masked
    assert "'password': '***'" in executed  # the job printed its (real) config: the output is masked too
    files = [f for f in tmp_path.rglob('*') if f.is_file()]
    assert any(f.name == 'executed.ipynb' for f in files) and any(f.name == 'record.json' for f in files)
    leaks = {(str(f.relative_to(tmp_path)), name) for f in files for name, s in secrets.items() if s.encode() in f.read_bytes()}
    assert not leaks, leaks

def test_streamed_log_output_masks_secrets(tmp_path):
    "`retail-cv run --log-output` (how a Kubernetes pod runs a job) streams cell output to the log: secrets masked there too."
    secrets = {'url': 'hunter2-url', 'nested': 'hunter2-nested', 'token': 'tok-0123456789', 'env': 'env-token-0123456789'}
    job = write_job(tmp_path/'jobs', 'chatty', "storage = ''  # database URL\nconfig = {}\napi_token = ''\nworkspace = ''",
                    "import os, sys\nprint('streamed:', storage, config, os.environ['SERVICE_TOKEN'])\n"
                    "print('to stderr:', api_token, file=sys.stderr)",
                    "{'result': api_token, 'db': storage}")  # an execute_result: papermill logs its text/plain too
    env = {'IPYTHONDIR': str(tmp_path/'ipython'), 'SERVICE_TOKEN': secrets['env']}
    r = run_cli('-w', tmp_path/'ws', 'run', job, '-q', '--log-output', '-p', 'storage=postgresql://app:hunter2-url@db:5432/x',
                '-p', 'config={db: {host: db, password: hunter2-nested}}', '-p', f"api_token={secrets['token']}", env=env, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    log = r.stdout + r.stderr
    # the output was streamed (so the test can fail): the lines are there, the secrets in them masked
    assert "streamed: postgresql://app:***@db:5432/x {'db': {'host': 'db', 'password': '***'}} ***" in log, log[-3000:]
    assert 'to stderr: ***' in log and "{'result': '***', 'db': 'postgresql://app:***@db:5432/x'}" in log
    assert not {name for name, s in secrets.items() if s in log}, log[-3000:]


def _pipeline(folder: Path, x: int = 3, limit: int = 100) -> Path:
    f = folder/'pipe.yaml'
    f.write_text(f"""
name: numbers
steps:
  sq: {{job: square.ipynb, params: {{x: {x}}}}}
  other: {{job: square.ipynb, params: {{x: 5}}}}
  check: {{job: check.ipynb, params: {{path: "${{sq.outputs.file}}", limit: {limit}}}}}
  after: {{job: square.ipynb, needs: [check], params: {{x: "${{check.outputs.value}}"}}}}
""")
    return f


def test_pipeline_cache_change_force(jobs, tmp_path):
    ws = Workspace.open(tmp_path/'ws')
    f = _pipeline(jobs)
    status = lambda run: {s.step: s.status for s in run.steps}
    first = run_pipeline(f, ws)
    assert status(first) == dict.fromkeys(['sq', 'other', 'check', 'after'], 'ran') and first.status == 'completed'
    assert load_run(first.step('after').run_id, ws).outputs == {'square': 81}
    n_runs = len(list_runs(ws))
    t0 = time.perf_counter()
    second = run_pipeline(f, ws)
    assert status(second) == dict.fromkeys(['sq', 'other', 'check', 'after'], 'cached')
    assert len(list_runs(ws)) == n_runs and time.perf_counter() - t0 < 2, "a cached pipeline must run nothing"
    assert [s.run_id for s in second.steps] == [s.run_id for s in first.steps]
    # one parameter changed: that step and its dependants run, the independent step stays cached
    third = run_pipeline(_pipeline(jobs, x=4), ws)
    assert status(third) == {'sq': 'ran', 'other': 'cached', 'check': 'ran', 'after': 'ran'}
    assert load_run(third.step('after').run_id, ws).outputs == {'square': 256}
    # the CLI: --from re-runs a step and its dependants, --force all of them; rich table and JSON
    r = run_cli('-w', ws.root, 'pipeline', 'run', f, '--from', 'check', '--json')
    assert r.returncode == 0, r.stderr
    assert {s['step']: s['status'] for s in json.loads(r.stdout)['steps']} == {'sq': 'cached', 'other': 'cached', 'check': 'ran', 'after': 'ran'}
    r = run_cli('-w', ws.root, 'pipeline', 'run', f, '--force')
    assert r.returncode == 0 and r.stdout.count('ran') >= 4 and 'pipeline numbers: completed' in r.stdout, r.stdout
    r = run_cli('-w', ws.root, 'pipeline', 'run', f)
    assert r.returncode == 0 and r.stdout.count('cached') >= 4
    records = list((ws/'runs').glob('pipeline-numbers-*/pipeline.json'))
    assert len(records) == 6 and all(json.loads(p.read_text())['status'] == 'completed' for p in records)


def test_pipeline_failure_then_resume(jobs, tmp_path):
    ws = Workspace.open(tmp_path/'ws')
    r = run_cli('-w', ws.root, 'pipeline', 'run', _pipeline(jobs, limit=5))
    assert r.returncode == 1
    run = json.loads(sorted((ws/'runs').glob('pipeline-*/pipeline.json'))[-1].read_text())
    assert run['status'] == 'failed'
    assert {s['step']: s['status'] for s in run['steps']} == {'sq': 'ran', 'other': 'ran', 'check': 'failed', 'after': 'skipped'}
    assert 'ValueError in cell 2: 9 is over the limit 5' in {s['step']: s for s in run['steps']}['check']['error']
    assert 'failed' in r.stdout and 'skipped' in r.stdout
    fixed = run_pipeline(_pipeline(jobs, limit=50), ws)
    assert {s.step: s.status for s in fixed.steps} == {'sq': 'cached', 'other': 'cached', 'check': 'ran', 'after': 'ran'}


def test_pipeline_file_errors(jobs):
    def bad(text, msg):
        (jobs/'bad.yaml').write_text(text)
        with pytest.raises(ConfigError, match=msg): load_pipeline(jobs/'bad.yaml')
    bad("name: p\nsteps: {a: {job: square.ipynb, param: {}}}", r"unknown config key 'steps\.a\.param'")
    bad("name: p\nsteps: {a: {job: nothing_here}}", "step 'a': no job named 'nothing_here'")
    bad("name: p\nsteps: {a: {job: square.ipynb, needs: [b]}, b: {job: square.ipynb, needs: [a]}}", "cycle: a -> b -> a")
    bad("name: p\nsteps: {a: {job: check.ipynb, params: {path: '${sq.outputs.file}'}}}", "step 'a': references unknown step 'sq'")
    r = run_cli('pipeline', 'check', jobs/'bad.yaml')
    assert r.returncode == 1 and "references unknown step 'sq'" in r.stderr


def test_prepare_data_job_through_the_cli(cli, tmp_path):
    r = cli('run', 'prepare_data', '-p', 'name=grocery', '-q', '--json', timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads(r.stdout)
    assert rec['status'] == 'completed' and rec['job'] == 'prepare_data'
    assert rec['outputs']['version'].startswith('grocery@') and rec['outputs']['files'] > 50
    manifest = rec['artifacts']['manifest']
    assert Path(manifest['path']).is_file() and manifest['sha256'] == sha256_file(manifest['path'])
    assert Path(rec['workspace']) == tmp_path/'ws' and rec['notebook'] == str(ROOT/'nbs'/'jobs'/'prepare_data.ipynb')
    versions = cli('data', 'versions', '--json')
    assert rec['outputs']['version_id'] in versions.stdout
