"Foundation: atomic writes survive a killed writer, bad settings are named, the CLI and doctor behave."
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from retail_cv.core import ConfigError, WorkspaceError, Workspace, atomic_write, load_settings
from conftest import CLI, run_cli


def test_killed_writer_leaves_previous_file_intact(tmp_path):
    target = tmp_path/'manifest.json'
    atomic_write(target, json.dumps({'version': 1}))
    writer = textwrap.dedent(f"""
        import sys, time
        from retail_cv.core import atomic_open
        with atomic_open({str(target)!r}) as f:
            f.write(b'{{"version": 2, "items": [' + b'1,' * 1_000_000)
            f.flush()
            print('half-written', flush=True)
            time.sleep(60)
            f.write(b'0]}}')
    """)
    proc = subprocess.Popen([sys.executable, '-c', writer], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == 'half-written'
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    assert json.loads(target.read_text()) == {'version': 1}
    leftovers = [p for p in tmp_path.iterdir() if p.name != 'manifest.json']
    assert all(p.name.startswith('.manifest.json.') and p.suffix == '.tmp' for p in leftovers)  # never the final name


def test_unknown_key_and_wrong_type_are_named(tmp_path):
    cfg = tmp_path/'settings.yaml'
    cfg.write_text('seed: 3\nnum_wrokers: 2\n')
    with pytest.raises(ConfigError, match="unknown config key 'num_wrokers'"): load_settings(cfg, env={})
    cfg.write_text('seed: three\n')
    with pytest.raises(ConfigError, match=f"config key 'seed' \\(from file {cfg}\\)"): load_settings(cfg, env={})
    with pytest.raises(ConfigError, match="'num_workers' \\(from env RETAIL_CV_NUM_WORKERS\\)"):
        load_settings(env={'RETAIL_CV_NUM_WORKERS': '-1'})


def test_unwritable_workspace_is_named(tmp_path):
    blocker = tmp_path/'not-a-dir'
    blocker.write_text('x')
    with pytest.raises(WorkspaceError, match=str(blocker/'ws')): Workspace.open(blocker/'ws')
    if os.geteuid() != 0:  # root ignores permission bits
        ro = tmp_path/'ro'; ro.mkdir(); ro.chmod(0o500)
        with pytest.raises(WorkspaceError, match='not writable'): Workspace.open(ro/'ws')


def test_workspace_from_env_flag_and_default(tmp_path, cli):
    r = cli('--workspace', tmp_path/'flag-ws', 'doctor', '--json')
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)['environment']['workspace'] == str(tmp_path/'flag-ws')
    r = run_cli('doctor', '--json', env={'RETAIL_CV_WORKSPACE': str(tmp_path/'env-ws')})
    assert json.loads(r.stdout)['environment']['workspace'] == str(tmp_path/'env-ws')
    env = {k: v for k, v in os.environ.items() if k != 'RETAIL_CV_WORKSPACE'}
    r = subprocess.run([CLI, 'doctor', '--json'], cwd=tmp_path, env=env,
                       capture_output=True, text=True)
    assert json.loads(r.stdout)['environment']['workspace'] == str(tmp_path/'retail_cv_workspace')


def test_cli_bad_config_and_workspace_exit_1_with_one_line(tmp_path, cli):
    cfg = tmp_path/'bad.yaml'; cfg.write_text('wandb_mode: sometimes\n')
    r = cli('--config', cfg, 'doctor')
    assert r.returncode == 1 and "config key 'wandb_mode'" in r.stderr and 'Traceback' not in r.stderr
    (tmp_path/'file').write_text('x')
    r = cli('--workspace', tmp_path/'file'/'ws', 'doctor')
    assert r.returncode == 1 and f"workspace {tmp_path/'file'/'ws'} is not writable" in ' '.join(r.stderr.split())


def test_help_lists_every_command_with_purpose():
    from retail_cv.cli import app
    r = run_cli('--help', env={'COLUMNS': '200'})
    assert r.returncode == 0
    names = [c.name or c.callback.__name__ for c in app.registered_commands] + [g.name for g in app.registered_groups]
    assert {'version', 'doctor', 'docs'} <= set(names)
    for name in names:
        line = next((l for l in r.stdout.splitlines() if f' {name} ' in l), None)
        assert line and len(line.split(name, 1)[1].strip(' │')) > 10, f"{name} has no one-line purpose in --help"


def test_version_matches_package():
    import retail_cv
    r = run_cli('version')
    assert (r.returncode, r.stdout.strip()) == (0, f'retail_cv {retail_cv.__version__}')


def test_doctor_healthy(cli):
    r = cli('doctor', '--json')
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert report['ok'] and {p['status'] for p in report['packages']} == {'ok'}
    env = report['environment']
    assert env['torch_threads'] >= 1 and 'CPUExecutionProvider' in env['onnxruntime_providers']
    assert env['wandb_mode'] == 'offline' and env['workspace_free_gb'] > 0


def test_doctor_flags_broken_and_missing_packages(tmp_path, cli):
    broken = tmp_path/'shadow'/'onnxruntime'; broken.mkdir(parents=True)
    (broken/'__init__.py').write_text("raise ImportError('libonnxruntime.so.1: cannot open shared object file')\n")
    # a meta-path finder that makes zxingcpp look uninstalled
    (tmp_path/'shadow'/'sitecustomize.py').write_text(textwrap.dedent("""
        import sys
        class _Hide:
            def find_spec(self, name, path=None, target=None):
                if name == 'zxingcpp': raise ModuleNotFoundError("No module named 'zxingcpp'", name='zxingcpp')
        sys.meta_path.insert(0, _Hide())
    """))
    r = cli('doctor', env={'PYTHONPATH': str(tmp_path/'shadow'), 'COLUMNS': '200'})
    assert r.returncode == 1
    out = ' '.join((r.stdout + r.stderr).split())
    assert 'onnxruntime is broken: ImportError: libonnxruntime.so.1' in out
    assert 'zxing-cpp is missing: pip install zxing-cpp' in out


def test_parameters_tag_survives_nbdev_clean(tmp_path, root):
    import nbformat
    (tmp_path/'pyproject.toml').write_text((root/'pyproject.toml').read_text())
    (tmp_path/'nbs').mkdir()
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell('epochs = 1', metadata={'tags': ['parameters'], 'scrolled': True})])
    nbformat.write(nb, tmp_path/'nbs'/'job.ipynb')
    subprocess.run([os.path.join(os.path.dirname(sys.executable), 'nbdev-clean')], cwd=tmp_path, check=True)
    cell = nbformat.read(tmp_path/'nbs'/'job.ipynb', as_version=4).cells[0]
    assert cell.metadata == {'tags': ['parameters']}   # papermill's tag kept, other metadata cleaned
