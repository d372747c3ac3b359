"""A device install: `pip install retail-cv` without extras brings no torch, yet `retail-cv` verifies and runs a signed
bundle there (and serves it with `[serve]`); a command whose extra is missing says which extra to install."""
from __future__ import annotations

import email
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import venv
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from retail_cv.bundle import build_bundle, generate_signing_key
from retail_cv.core import Workspace
from retail_cv.models import tiny_classifier, to_onnx
from retail_cv.runtime import Predictor

ROOT = Path(__file__).resolve().parents[1]
LABELS = ['cola', 'water', 'juice']
# what a device must never download: the training, notebook, docs and server stacks
HEAVY = {'torch', 'torchvision', 'lightning', 'torchmetrics', 'wandb', 'optuna', 'onnx', 'onnxscript', 'opencv-python-headless',
         'matplotlib', 'pycocotools', 'papermill', 'nbdev', 'nbconvert', 'jupyterlab', 'ipykernel', 'mkdocs', 'mkdocs-material',
         'fastapi', 'uvicorn', 'psycopg2-binary', 'kubernetes-validate'}
DEVICE_MODULES = ['retail_cv.core', 'retail_cv.preprocess', 'retail_cv.profiles', 'retail_cv.bundle', 'retail_cv.credentials',
                  'retail_cv.runtime', 'retail_cv.agent', 'retail_cv.cli']


def _pip(python: Path, *args: str):
    "pip of `python`, quiet; its own output in the failure message."
    r = subprocess.run([str(python), '-m', 'pip', '-q', *args], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def _normal(name: str) -> str: return name.lower().replace('_', '-').replace('.', '-')


def _requires_dist(wheel: Path) -> list[str]:
    "The Requires-Dist lines of the wheel's METADATA, as pip reads them."
    with zipfile.ZipFile(wheel) as z:
        meta = email.message_from_bytes(z.read(next(n for n in z.namelist() if n.endswith('.dist-info/METADATA'))))
    return meta.get_all('Requires-Dist')


def _requires(wheel: Path) -> list[tuple[str, set[str], str | None]]:
    "(distribution, extras it asks for, extra it belongs to or None) of every requirement of the wheel."
    out = []
    for req in _requires_dist(wheel):
        m = re.match(r'\s*([A-Za-z0-9._-]+)\s*(?:\[([^\]]*)\])?', req)
        extra = re.search(r';.*\bextra\s*==\s*["\']([^"\']+)', req)  # the marker may name a platform too
        out.append((_normal(m[1]), set(filter(None, (m[2] or '').split(','))), extra[1] if extra else None))
    return out


def _installs(reqs, extra: str) -> set[str]:
    "Every distribution `pip install 'retail-cv[EXTRA]'` asks for, following extras that name other extras."
    seen, todo, out = set(), [extra], set()
    while todo:
        x = todo.pop(); seen.add(x)
        for name, wants, of in reqs:
            if of != x: continue
            if name == 'retail-cv': todo += sorted(wants - seen)
            else: out.add(name)
    return out


@pytest.fixture(scope='session')
def wheel(tmp_path_factory) -> Path:
    "The project built as users get it (from a copy, so the checkout gets no build/ folder)."
    tmp = tmp_path_factory.mktemp('wheel')
    src = tmp/'src'; src.mkdir()
    for name in ('pyproject.toml', 'README.md'): shutil.copy(ROOT/name, src/name)
    shutil.copytree(ROOT/'retail_cv', src/'retail_cv', ignore=shutil.ignore_patterns('__pycache__'))
    _pip(Path(sys.executable), 'wheel', '--no-deps', '-w', str(tmp/'dist'), str(src))
    return next((tmp/'dist').glob('retail_cv-*.whl'))


def _venv(path: Path, *requirements: str) -> Path:
    "A fresh venv at `path` with `requirements`, installed by this pip (its cache) without byte-compiling: seconds, not a minute."
    venv.create(path)  # no pip of its own: `pip --python` installs into it
    _pip(Path(sys.executable), '--python', str(path/'bin'/'python'), 'install', '--no-compile', *requirements)
    return path/'bin'


@pytest.fixture(scope='session')
def slim(tmp_path_factory, wheel) -> Path:
    "The bin folder of a venv holding `pip install retail-cv`: the wheel and its base requirements, no extra."
    return _venv(tmp_path_factory.mktemp('slim')/'venv', str(wheel))


def _run(bin_: Path, *args, env=None, timeout=120) -> subprocess.CompletedProcess:
    "A command of that venv, with nothing of the test's own environment on its import path."
    clean = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'VIRTUAL_ENV', 'PYTHONHOME')}
    clean['PATH'] = f"{bin_}{os.pathsep}{clean.get('PATH', '')}"
    return subprocess.run([str(bin_/args[0]), *map(str, args[1:])], capture_output=True, text=True, timeout=timeout,
                          env={**clean, 'COLUMNS': '200', **(env or {})})


@pytest.fixture(scope='session')
def bundle(tmp_path_factory) -> dict:
    "A tiny signed classifier bundle (a folder and an archive), its public key, two photos and the full install's predictions."
    root = tmp_path_factory.mktemp('slim-bundle')
    ws = Workspace.open(root/'ws'); key = generate_signing_key(ws)
    rng = np.random.default_rng(3)
    photos = []
    for i, (h, w) in enumerate([(120, 160), (90, 70)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root/f'photo{i}.jpg', quality=95)
        photos.append(root/f'photo{i}.jpg')
    torch.manual_seed(0); clf = tiny_classifier(3, image_size=32)
    kw = dict(name='shelf-classifier', version='1', task='classification', labels=LABELS, contract=clf.contract(),
              golden_images=photos[:1], workspace=ws, profile='shelf-cam-x86')
    path = build_bundle(root/'clf', to_onnx(clf, root/'clf.onnx'), **kw)
    archive = build_bundle(root/'clf.tar', root/'clf.onnx', **kw)  # what the agent takes
    expected = [p.to_dict() for p in Predictor.from_bundle(path, trusted_keys=[key.public_key]).predict_batch(photos)]
    return dict(root=root, path=path, archive=archive, key=key.public_key, photos=photos, expected=expected)


def _close(got: dict, want: dict):
    assert (got['label'], got['index']) == (want['label'], want['index'])
    assert got['score'] == pytest.approx(want['score'], rel=1e-5)


# ---- the package as published -----------------------------------------------------------------------------------

def test_the_wheel_base_requires_no_training_stack(wheel):
    reqs = _requires(wheel)
    base = {name for name, _, extra in reqs if extra is None}
    assert {'onnxruntime', 'numpy', 'pillow', 'cryptography', 'httpx', 'typer'} <= base
    assert not base & HEAVY, f"the base install pulls {sorted(base & HEAVY)}"
    assert {'torch', 'torchvision', 'lightning', 'opencv-python-headless'} <= _installs(reqs, 'train')
    assert {'papermill', 'jupyterlab', 'torch'} <= _installs(reqs, 'jobs') and 'fastapi' not in _installs(reqs, 'jobs')
    assert {'fastapi', 'uvicorn', 'prometheus-client', 'httptools', 'uvloop'} == _installs(reqs, 'serve')
    assert {'fastapi', 'uvicorn', 'psycopg2-binary'} <= _installs(reqs, 'fleet') and 'torch' not in _installs(reqs, 'fleet')
    assert {'mkdocs', 'mkdocs-material'} <= _installs(reqs, 'docs')
    assert HEAVY <= _installs(reqs, 'all') and _installs(reqs, 'all') | {'pytest', 'dockerfile-parse'} <= _installs(reqs, 'dev')
    torch_req = next(r for r in _requires_dist(wheel) if re.match(r'torch\s*[<>=]', r))
    assert '<=2.14.1' in torch_req and '>=2.5' in torch_req  # the range that installs from local disk here


# ---- a slim install ------------------------------------------------------------------------------------------------

def test_a_slim_install_has_no_torch_and_its_device_modules_import(slim):
    r = _run(slim, 'python', '-c', 'import torch')
    assert r.returncode == 1 and "No module named 'torch'" in r.stderr
    code = (f"import sys; {'; '.join(f'import {m}' for m in DEVICE_MODULES)}; "
            "print(sorted(m for m in ('torch', 'torchvision', 'lightning', 'papermill', 'nbdev', 'mkdocs', 'fastapi', 'cv2') if m in sys.modules))")
    r = _run(slim, 'python', '-c', code)
    assert (r.returncode, r.stdout.strip()) == (0, '[]'), r.stderr


def test_version_on_a_slim_install(slim):
    import retail_cv
    r = _run(slim, 'retail-cv', 'version')
    assert (r.returncode, r.stdout.strip()) == (0, f'retail_cv {retail_cv.__version__}'), r.stderr


def test_predict_on_a_slim_install_equals_the_full_install(slim, bundle, tmp_path):
    r = _run(slim, 'retail-cv', 'predict', bundle['path'], *bundle['photos'], '--trusted-key', bundle['key'], '--json',
             env={'RETAIL_CV_WORKSPACE': str(tmp_path/'ws')})
    assert r.returncode == 0, r.stderr
    got = [json.loads(line) for line in r.stdout.splitlines()]
    assert [g['source'] for g in got] == [str(p) for p in bundle['photos']]
    for g, want in zip(got, bundle['expected']): _close(g, want)


def test_verify_on_a_slim_install_and_a_tampered_bundle_refused(slim, bundle, tmp_path):
    env = {'RETAIL_CV_WORKSPACE': str(tmp_path/'ws')}
    r = _run(slim, 'retail-cv', 'bundle', 'verify', bundle['path'], '--trusted-key', bundle['key'], '--golden', '--json', env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out['ok'] and out['golden_ok'] and out['name'] == 'shelf-classifier'
    bad = tmp_path/'bad'; shutil.copytree(bundle['path'], bad)
    meta = bad/'bundle.json'; meta.write_text(meta.read_text().replace('"cola"', '"soda"'))  # labels changed after signing
    r = _run(slim, 'retail-cv', 'predict', bad, bundle['photos'][0], '--trusted-key', bundle['key'], env=env)
    assert r.returncode == 1 and r.stderr.startswith('error:') and 'Traceback' not in r.stderr, r.stderr


@pytest.mark.parametrize('args, extra, package', [
    (['train', 'classify', '--data', 'DIR'], 'train', 'torch'),
    (['train', '--help'], 'train', 'torch'),  # its defaults live in the training config
    (['data', 'synth', '--out', 'DIR'], 'train', 'opencv-python-headless'),
    (['docs', 'build'], 'docs', 'mkdocs'),
    (['serve', 'BUNDLE', '--no-auth'], 'serve', 'fastapi'),
])
def test_a_command_of_a_missing_extra_names_the_extra(slim, bundle, tmp_path, args, extra, package):
    args = [{'BUNDLE': bundle['path'], 'DIR': tmp_path}.get(a, a) for a in args]
    r = _run(slim, 'retail-cv', *args, env={'RETAIL_CV_WORKSPACE': str(tmp_path/'ws')})
    err = ' '.join(r.stderr.split())
    assert r.returncode == 1 and 'Traceback' not in r.stderr, r.stderr
    assert f"error: {package} is not installed: this needs the [{extra}] extra" in err
    assert f"pip install 'retail-cv[{extra}]'" in err


def test_doctor_on_a_slim_install_is_ok_and_names_the_extras(slim, tmp_path):
    r = _run(slim, 'retail-cv', 'doctor', '--json', env={'RETAIL_CV_WORKSPACE': str(tmp_path/'ws')})
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    packages = {p['package']: p for p in report['packages']}
    assert report['ok'] and packages['onnxruntime']['status'] == 'ok' and 'torch_device' not in report['environment']
    assert (packages['torch']['status'], packages['torch']['extra']) == ('missing', 'train')
    assert "pip install 'retail-cv[train]'" in ' '.join(report['warnings'])


def test_the_agent_takes_a_dropped_bundle_on_a_slim_install(slim, bundle, tmp_path):
    dev, drop = tmp_path/'device', tmp_path/'drop'
    r = _run(slim, 'retail-cv', 'agent', 'init', dev, '--profile', 'shelf-cam-x86', '--trusted-key', bundle['key'])
    assert r.returncode == 0, r.stderr
    drop.mkdir(); shutil.copy(bundle['archive'], drop/'shelf-classifier-1.tar')
    r = _run(slim, 'retail-cv', 'agent', '--device', dev, '--watch', drop, '--settle', '0', '--once')
    assert r.returncode == 0, r.stderr
    assert (drop/'processed'/'shelf-classifier-1.tar').is_file(), sorted(map(str, drop.rglob('*')))
    r = _run(slim, 'retail-cv', 'agent', 'status', '--device', dev, '--json')
    current = json.loads(r.stdout)['current']
    assert (current['name'], current['version']) == ('shelf-classifier', '1')
    r = _run(slim, 'retail-cv', 'agent', 'probe', '--device', dev, bundle['photos'][1])  # the running bundle, on ONNX Runtime
    assert r.returncode == 0 and json.loads(r.stdout)['healthy'], r.stdout + r.stderr


# ---- with [serve] --------------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


def test_serve_with_the_serve_extra_and_no_torch(tmp_path_factory, wheel, bundle, tmp_path):
    bin_ = _venv(tmp_path_factory.mktemp('slim-serve')/'venv', f"{wheel}[serve]")
    assert _run(bin_, 'python', '-c', 'import torch').returncode == 1
    port = _free_port()
    clean = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'VIRTUAL_ENV', 'PYTHONHOME')}
    proc = subprocess.Popen([str(bin_/'retail-cv'), 'serve', str(bundle['path']), '--no-auth', '--port', str(port),
                             '--trusted-keys', str(bundle['key']), '--watch', '0'],
                            env={**clean, 'RETAIL_CV_WORKSPACE': str(tmp_path/'ws')}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        with httpx.Client(base_url=f'http://127.0.0.1:{port}', timeout=10) as c:
            for _ in range(600):  # until it is ready, or it died
                assert proc.poll() is None, proc.stdout.read()
                try:
                    if c.get('/readyz').status_code == 200: break
                except httpx.TransportError: pass
                time.sleep(0.1)
            r = c.post('/v1/predict', content=bundle['photos'][0].read_bytes(), headers={'Content-Type': 'image/jpeg'})
        assert r.status_code == 200, r.text
        _close(r.json()['classification'], bundle['expected'][0])
    finally:
        proc.terminate(); proc.wait(timeout=30)
