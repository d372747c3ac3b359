"""One update path on a store server: the fleet agent owns the model slots, `retail-cv serve` follows the agent's
`current` link (hot swap, golden set first) and writes the health counters the agent's watchdog reads."""
from __future__ import annotations

import importlib.util
import io
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from retail_cv.agent import init_device, read_counters, read_state
from retail_cv.serve import free_port

from conftest import CLI, ROOT


def _make_vectors():
    spec = importlib.util.spec_from_file_location('make_vectors', ROOT/'spec'/'make_vectors.py')
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    return mod


def _wait(cond, timeout: float = 60, what: str = 'condition'):
    "Poll `cond` until it is truthy (a safety timeout, not a measurement)."
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if (v := cond()): return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _drop(src: Path, folder: Path, name: str):
    "As an OS updater would: written under a .part name, then renamed."
    tmp = folder/f'.{name}.part'; shutil.copy(src, tmp); os.replace(tmp, folder/name)


def _version(url: str) -> str | None:
    try: return httpx.get(url + '/v1/models').json()['models'][0]['version']
    except (httpx.HTTPError, KeyError, IndexError): return None


def test_serve_follows_the_agents_slot_and_reports_health_back(tmp_path):
    mv = _make_vectors()
    pub = tmp_path/'root.pub'; pub.write_bytes(mv.public_pem('root'))
    v1, v2 = (mv.make_bundle(tmp_path/f'v{v}.tar', mv.key('root'), v) for v in ('1', '2'))
    dev, drops = tmp_path/'dev', tmp_path/'drops'
    init_device(dev, mv.PROFILE, pub); drops.mkdir()
    buf = io.BytesIO(); Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(buf, 'JPEG')
    photo = buf.getvalue()
    agent = subprocess.Popen([CLI, 'agent', '--device', str(dev), '--watch', str(drops), '--interval', '0.05', '--grace', '0',
                              '--settle', '0.2'], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    serve = None
    try:
        _drop(v1, drops, 'shelf-1.tar')
        _wait(lambda: (drops/'processed'/'shelf-1.tar').exists(), what='v1 installed by the agent')
        port = free_port()
        serve = subprocess.Popen([CLI, '-w', str(tmp_path/'ws'), 'serve', str(dev/'current'), '--no-auth', '--port', str(port),
                                  '--trusted-keys', str(pub), '--watch', '0.1', '--health-file', str(dev/'health'/'counters.json')],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        url = f'http://127.0.0.1:{port}'
        _wait(lambda: _version(url) == '1', what='serve answering with v1')
        for _ in range(3):
            r = httpx.post(url + '/v1/predict', content=photo, headers={'Content-Type': 'image/jpeg'})
            assert r.status_code == 200 and r.json()['model']['version'] == '1', r.text
        c = _wait(lambda: (c := read_counters(dev/'health'/'counters.json')) and c.version == '1' and c, what='v1 counters')
        assert (c.name, c.errors, c.source) == ('shelf', 0, 'serve') and c.inferences >= 1
        _drop(v2, drops, 'shelf-2.tar')  # the one update path: the agent switches its slot, the service follows
        _wait(lambda: (drops/'processed'/'shelf-2.tar').exists(), what='v2 installed by the agent')
        _wait(lambda: _version(url) == '2', what='serve swapped to v2')
        r = httpx.post(url + '/v1/predict', content=photo, headers={'Content-Type': 'image/jpeg'})
        assert r.status_code == 200 and r.json()['model']['version'] == '2'
        c = _wait(lambda: (c := read_counters(dev/'health'/'counters.json')) and c.version == '2' and c, what='v2 counters')
        assert (c.inferences, c.errors) == (1, 0)  # counted afresh for the new version
        assert (read_state(dev).current.version, read_state(dev).previous.version) == ('2', '1')
    finally:
        for p in (serve, agent):
            if p is not None and p.poll() is None: p.send_signal(signal.SIGTERM); p.communicate(timeout=60)
