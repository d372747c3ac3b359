"""Hyper-parameter search end to end: a real PostgreSQL server shared by two worker processes, the journal default,
pruning through Lightning, and search-space validation.

The PostgreSQL server is the `postgres_url` fixture of tests/conftest.py (the fleet tests use it too).
"""
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


# --- the searches ------------------------------------------------------------------------------------------------

TINY = {'arch': 'tiny_cnn', 'image_size': 32, 'epochs': 2, 'batch_size': 16, 'wandb_mode': 'disabled'}
SPACE = {'lr': {'type': 'float', 'low': 1e-3, 'high': 0.1, 'log': True},
         'weight_decay': {'type': 'float', 'low': 1e-6, 'high': 1e-2, 'log': True}}

WORKER = textwrap.dedent('''
    import json, sys
    from retail_cv.core import Workspace
    from retail_cv.data.formats import grocery_sample
    from retail_cv.tune import tune
    storage, ws, worker, trials, base, space = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), json.loads(sys.argv[5]), json.loads(sys.argv[6])
    r = tune('classification', grocery_sample(), trials, storage=storage, study_name='shared', workspace=Workspace.open(ws),
             base_config=base, space=space, worker=worker)
    print('RESULT ' + json.dumps(r.to_dict()))
''')


def _result(proc: subprocess.Popen, timeout: float = 180) -> dict:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"worker failed:\n{err[-4000:]}"
    return json.loads(next(line for line in out.splitlines() if line.startswith('RESULT '))[len('RESULT '):])


def test_two_workers_share_one_postgres_study(postgres_url, tmp_path):
    "Two processes, each with its own workspace (two machines), run 3 trials each of one study in PostgreSQL."
    import optuna
    import psycopg2
    from retail_cv.core import Workspace
    from retail_cv.tune import open_storage, study_results
    n = 3
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, '-c', WORKER, postgres_url, str(tmp_path/f'ws{i}'), str(i), str(n),
                               json.dumps({**TINY, 'epochs': 1}), json.dumps(SPACE)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=tmp_path, env={**os.environ, 'WANDB_MODE': 'disabled'}) for i in range(2)]
    results = [_result(p) for p in procs]
    print(f"two workers x {n} trials: {time.perf_counter() - t0:.1f} s")

    # Straight from the database: one study, every trial recorded once, numbers 0..5, all finished.
    with psycopg2.connect(postgres_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT t.number, t.state FROM trials t JOIN studies s USING (study_id) WHERE s.study_name = 'shared'")
        rows = cur.fetchall()
        cur.execute('SELECT count(*) FROM studies')
        assert cur.fetchone()[0] == 1
    assert sorted(r[0] for r in rows) == list(range(2 * n))
    assert {r[1] for r in rows} <= {'COMPLETE', 'PRUNED'}

    # Through Optuna: each worker ran exactly its n trials.
    study = optuna.load_study(study_name='shared', storage=open_storage(postgres_url, 'shared', Workspace.open(tmp_path/'ws0'), heartbeat_s=None))
    per_worker = {}
    for t in study.trials: per_worker[t.user_attrs['worker']] = per_worker.get(t.user_attrs['worker'], 0) + 1
    assert sorted(per_worker.values()) == [n, n], per_worker

    # The best trial, reported consistently: by each workspace reading the study afterwards, and by the worker that
    # finished last (its report saw all trials finished).
    final = [study_results('shared', postgres_url, Workspace.open(tmp_path/f'ws{i}')) for i in range(2)]
    best = study.best_trial
    for f in final:
        assert (f.best['number'], f.best['value'], f.best['params']) == (best.number, best.value, best.params)
        assert json.loads((f.folder/'best.json').read_text())['best']['number'] == best.number
        assert len(f.trials) == 2 * n
    last = [r for r in results if sum(r['counts'].values()) == 2 * n and 'RUNNING' not in r['counts']]
    assert last, [r['counts'] for r in results]
    for r in last: assert r['best']['number'] == best.number
    for r in results: assert r['best']['value'] <= best.value  # val/acc is maximised: no worker saw a better one
    # The checkpoint of the best trial exists in the workspace of the worker that trained it.
    assert Path(final[0].best['checkpoint']).is_file()


def test_journal_default_shared_by_processes(tmp_path):
    "Without a storage, the study is a journal file in the workspace; two worker processes and a later call share it."
    from retail_cv.core import Workspace
    from retail_cv.data.formats import grocery_sample
    from retail_cv.tune import tune
    ws = Workspace.open(tmp_path/'ws')
    t0 = time.perf_counter()
    r = tune('classification', grocery_sample(), 4, workspace=ws, base_config=TINY, space=SPACE, n_jobs=2, study_name='local')
    print(f"n_jobs=2 x 4 trials: {time.perf_counter() - t0:.1f} s")
    folder = ws/'runs'/'studies'/'local'
    assert (folder/'journal.log').stat().st_size > 0 and r.folder == folder
    assert [t['number'] for t in r.trials] == [0, 1, 2, 3]
    assert len({t['worker'] for t in r.trials}) == 2  # two processes took trials
    r2 = tune('classification', grocery_sample(), 1, workspace=ws, base_config=TINY, space=SPACE, study_name='local')
    assert [t['number'] for t in r2.trials] == [0, 1, 2, 3, 4]  # resumed, numbering continues
    lines = (folder/'trials.csv').read_text().splitlines()
    assert lines[0].startswith('number,state,value,duration_s,epochs') and len(lines) == 6
    for png in ('history.png', 'importances.png'): assert (folder/png).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert json.loads((folder/'best.json').read_text())['best'] == r2.best


def test_median_pruner_stops_a_diverging_trial(tmp_path):
    "Two sensible trials, then lr=1.0: its validation loss after epoch 0 is far above their median, so it is pruned."
    from retail_cv.core import Workspace
    from retail_cv.data.formats import grocery_sample
    from retail_cv.tune import tune
    space = {**SPACE, 'lr': {'type': 'float', 'low': 1e-3, 'high': 1.0, 'log': True}}
    r = tune('classification', grocery_sample(), 3, workspace=Workspace.open(tmp_path/'ws'), base_config={**TINY, 'epochs': 3},
             space=space, study_name='prune', metric='val/loss', startup_trials=2, warmup_epochs=0,
             enqueue=[{'lr': 0.01, 'weight_decay': 1e-4}, {'lr': 0.003, 'weight_decay': 1e-4}, {'lr': 1.0, 'weight_decay': 1e-4}])
    assert [(t['state'], t['epochs'], t['params']['lr']) for t in r.trials] == \
        [('COMPLETE', 3, 0.01), ('COMPLETE', 3, 0.003), ('PRUNED', 1, 1.0)]
    assert r.direction == 'minimize' and r.best['number'] in (0, 1) and r.trials[2]['checkpoint'] is None
    assert r.trials[2]['value'] > max(t['value'] for t in r.trials[:2])  # the pruned trial's last reported loss is the worst


def test_diverging_trial_is_pruned_with_its_reason(tmp_path):
    "SGD at lr=1e8 makes the loss NaN within the first epochs: fit raises TrainingError, the trial becomes PRUNED."
    from retail_cv.core import Workspace
    from retail_cv.data.formats import grocery_sample
    from retail_cv.tune import tune
    r = tune('classification', grocery_sample(), 2, workspace=Workspace.open(tmp_path/'ws'), base_config={**TINY, 'optimizer': 'sgd'},
             space={'lr': {'type': 'float', 'low': 1e-3, 'high': 1e9, 'log': True}}, study_name='diverge', pruner='none',
             enqueue=[{'lr': 1e8}, {'lr': 0.01}])
    bad, good = r.trials
    assert bad['state'] == 'PRUNED' and bad['stopped'].startswith('the training loss became nan') and bad['checkpoint'] is None
    assert good['state'] == 'COMPLETE' and good['stopped'] is None and r.best['number'] == 1  # the study went on


@pytest.mark.parametrize('space, message', [
    ({'lr': {'type': 'float', 'low': 0.1, 'high': 1e-4}}, "search space parameter 'lr'"),
    ({'lr': {'type': 'float', 'low': 0.0, 'high': 0.1, 'log': True}}, "search space parameter 'lr'"),
    ({'batch_size': {'type': 'int', 'low': 8, 'high': 64.5}}, "search space parameter 'batch_size'"),
    ({'optimizer': {'type': 'categorical', 'choices': []}}, "search space parameter 'optimizer'"),
    ({'optimizer': {'type': 'categorical', 'choices': ['adamw', 'lion']}}, "search space parameter 'optimizer' = 'lion' gives an invalid TrainConfig"),
    ({'learning_rate': {'type': 'float', 'low': 1e-4, 'high': 0.1}}, "search space parameter 'learning_rate' is not a TrainConfig field"),
    ({'lr': {'type': 'loguniform', 'low': 1e-4, 'high': 0.1}}, "search space parameter 'lr'"),
])
def test_bad_space_is_a_config_error_naming_the_parameter(tmp_path, space, message):
    from retail_cv.core import ConfigError, Workspace
    from retail_cv.data.formats import grocery_sample
    from retail_cv.tune import tune
    ws = Workspace.open(tmp_path/'ws')
    with pytest.raises(ConfigError, match=message.replace('(', r'\(').replace('.', r'\.')):
        tune('classification', grocery_sample(), 1, workspace=ws, base_config=TINY, space=space, study_name='bad')
    assert not (ws/'runs'/'studies'/'bad').exists()  # refused before the study was created


def test_bad_space_file_names_file_and_parameter(tmp_path):
    from retail_cv.core import ConfigError
    from retail_cv.tune import SearchSpace
    f = tmp_path/'space.yaml'
    f.write_text('lr: {type: float, low: 1.0e-4, high: 0.1, log: true}\nweight_decay: {type: float, low: 1, high: 2, step: -1}\n')
    with pytest.raises(ConfigError, match=r"space\.yaml: search space parameter 'weight_decay'.*`step` must be positive"):
        SearchSpace.load(f)


def test_job_notebook_is_a_worker_of_the_postgres_study(postgres_url, tmp_path):
    "The papermill job joins a study in PostgreSQL as worker $JOB_COMPLETION_INDEX, as each pod of an Indexed Job does."
    import psycopg2
    papermill = str(Path(sys.executable).parent/'papermill')
    out = tmp_path/'tune-out.ipynb'
    t0 = time.perf_counter()
    proc = subprocess.run([papermill, str(ROOT/'nbs'/'jobs'/'tune.ipynb'), str(out), '-p', 'storage', postgres_url, '-p', 'study', 'k8s',
                           '-p', 'workspace', str(tmp_path/'ws'), '-p', 'trials', '2', '-y', json.dumps({'base_config': {**TINY, 'epochs': 1}})],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, 'JOB_COMPLETION_INDEX': '1', 'WANDB_MODE': 'disabled'})
    print(f"job notebook, 2 trials: {time.perf_counter() - t0:.1f} s")
    assert proc.returncode == 0, proc.stderr[-4000:]
    text = out.read_text()
    assert f"worker 1 of study 'k8s' in Workspace('{tmp_path/'ws'}')" in text
    with psycopg2.connect(postgres_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT t.number, t.state FROM trials t JOIN studies s USING (study_id) WHERE s.study_name = 'k8s' ORDER BY t.number")
        assert cur.fetchall() == [(0, 'COMPLETE'), (1, 'COMPLETE')]
    best = json.loads((tmp_path/'ws'/'runs'/'studies'/'k8s'/'best.json').read_text())
    assert best['storage'] == postgres_url and best['best']['number'] in (0, 1)


def _journal_of_one_study(tmp_path) -> tuple[Path, list[bytes]]:
    "A journal holding study 's' with two finished trials, and its lines."
    import optuna
    from retail_cv.core import Workspace
    from retail_cv.tune import open_study
    j = tmp_path/'good.log'
    open_study({'study_name': 's', 'storage': str(j)}, Workspace.open(tmp_path/'ws')).optimize(lambda t: t.suggest_float('x', 0, 1), n_trials=2)
    return j, j.read_bytes().splitlines(keepends=True)


@pytest.mark.parametrize('damage', ['cut', 'binary', 'alien'])
def test_damaged_journal_is_a_storage_error_naming_the_file(tmp_path, damage):
    "A journal line cut short (then others appended), bytes that are not text, JSON that is no Optuna operation: a StorageError, never a bare JSONDecodeError."
    from retail_cv.core import Workspace
    from retail_cv.tune import StorageError, open_storage, open_study, study_results
    _, lines = _journal_of_one_study(tmp_path)
    bad = {'cut': lines[1][:len(lines[1]) // 2] + b'\n', 'binary': b'\xff\x80\x00 not text\n', 'alien': b'{"op_code": 99}\n'}[damage]
    j = tmp_path/'damaged.log'
    j.write_bytes(b''.join([lines[0], bad, *lines[1:]]))
    ws = Workspace.open(tmp_path/'ws')
    for call in (lambda: open_storage(str(j), 's', ws), lambda: open_study({'study_name': 's', 'storage': str(j)}, ws),
                 lambda: study_results('s', str(j), ws)):
        with pytest.raises(StorageError, match=f"journal {j} is damaged or not an Optuna journal") as e: call()
        assert e.value.__cause__ is None and e.value.__suppress_context__  # one clear error, not Optuna's traceback


def test_damaged_last_journal_line_is_skipped_as_one_being_written(tmp_path):
    "Optuna skips a damaged last line (another process may be writing it): the study still opens."
    from retail_cv.core import Workspace
    from retail_cv.tune import study_results
    j, lines = _journal_of_one_study(tmp_path)
    j.write_bytes(b''.join(lines) + b'{"op_code": 4, "worker_id"\n')
    assert len(study_results('s', str(j), Workspace.open(tmp_path/'ws')).trials) == 2


@pytest.mark.parametrize('ddl, message', [
    # Optuna's table with a column Optuna does not fill: the insert fails, the look-up finds nothing (was: KeyError)
    ('create table studies (study_id integer primary key, study_name varchar(512) unique, owner text not null)',
     "it can be neither created nor found there, so its tables are not Optuna's (KeyError"),
    ('create table study_directions (study_direction_id integer primary key, direction text, study_id int, objective int, x text not null)',
     "it can be neither created nor found there, so its tables are not Optuna's (KeyError"),
    # two rows in alembic's version table: Optuna's schema check stops (was: alembic's CommandError)
    ("create table alembic_version (version_num varchar(32) primary key); insert into alembic_version values ('a'), ('b')",
     "its tables are not Optuna's (CommandError"),
])
def test_crafted_sqlite_file_is_a_storage_error(tmp_path, ddl, message):
    import sqlite3
    from retail_cv.core import Workspace
    from retail_cv.tune import StorageError, open_study
    db = tmp_path/'crafted.db'
    with sqlite3.connect(db) as conn: conn.executescript(ddl)
    with pytest.raises(StorageError, match=message.replace('(', r'\(')) as e:
        open_study({'study_name': 's', 'storage': f'sqlite:///{db}', 'heartbeat_s': None}, Workspace.open(tmp_path/'ws'))
    assert 'crafted.db' in str(e.value)


def test_study_results_on_foreign_tables_is_a_storage_error(tmp_path):
    "Reading a study back from a database whose `studies` table is someone else's (was: Optuna's StorageInternalError)."
    import sqlite3
    from retail_cv.core import Workspace
    from retail_cv.tune import StorageError, study_results
    db = tmp_path/'other.db'
    with sqlite3.connect(db) as conn: conn.execute('create table studies (foo text)')
    with pytest.raises(StorageError, match=r"study 's' in sqlite:///.*other\.db: StorageInternalError"):
        study_results('s', f'sqlite:///{db}', Workspace.open(tmp_path/'ws'))
