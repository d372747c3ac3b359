"""Monitoring end to end: a bundle's signed reference, the real service's prediction log, `retail-cv monitor check` as a
subprocess, a signed webhook to a real receiver on loopback; the alert's false-alarm rate; a detector's tests."""
from __future__ import annotations

import io
import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance

from conftest import run_cli
from retail_cv.bundle import REFERENCE_FILE, build_bundle, generate_signing_key, load_reference, summarise, verify_bundle
from retail_cv.core import ConfigError, DataError, IntegrityError, Workspace
from retail_cv.models import ModelSpec, build_model, example_input, recalibrate_batchnorm, tiny_classifier, to_onnx, wrap
from retail_cv.monitor import Monitor, check_drift, load_rules, verify_webhook
from retail_cv.serve import ServeConfig, ServerThread

LABELS = ['cola', 'water', 'juice']
SECRET_ENV = 'RETAIL_CV_MONITOR_WEBHOOK_SECRET'


def photos(n: int, seed: int, light: float = 1.0) -> list[Image.Image]:
    "Smooth random 'shelf photos' from one distribution; `light` < 1 dims them."
    r = np.random.default_rng(seed)
    return [ImageEnhance.Brightness(Image.fromarray(r.integers(30, 230, (6, 8, 3), dtype=np.uint8)).resize((96, 72), Image.BICUBIC))
            .enhance(light) for _ in range(n)]


def jpeg(im: Image.Image) -> bytes:
    buf = io.BytesIO(); im.save(buf, 'JPEG', quality=92); return buf.getvalue()


@pytest.fixture(scope='module')
def env(tmp_path_factory):
    "A classifier bundle whose reference is 150 photos, and its trusted key."
    root = tmp_path_factory.mktemp('monitor')
    ws = Workspace.open(root/'ws')
    key = generate_signing_key(ws)
    torch.manual_seed(0)
    clf = tiny_classifier(3, image_size=32)
    bundle = build_bundle(root/'shelf', to_onnx(clf, root/'clf.onnx'), name='shelf', version='1', labels=LABELS,
                          contract=clf.contract(), golden_images=photos(2, 0), workspace=ws,
                          reference_images=[jpeg(p) for p in photos(150, 1)], reference_source={'split': 'val'})
    return dict(root=root, ws=ws, trusted=[key.public_key], bundle=bundle)


class Receiver(BaseHTTPRequestHandler):
    "A webhook receiver that checks the HMAC signature of what it gets."
    got: list = []
    def do_POST(self):
        body = self.rfile.read(int(self.headers['Content-Length']))
        ok = verify_webhook(body, dict(self.headers), 'hook-secret')
        Receiver.got.append((ok, json.loads(body)))
        self.send_response(204 if ok else 401); self.end_headers()
    def log_message(self, *a): pass


def test_reference_is_signed_and_tampering_is_named(env, tmp_path):
    info = verify_bundle(env['bundle'], env['trusted'])
    ref = load_reference(info)
    assert ref.images == 150 and ref.source == {'split': 'val'} and ref.embedding.shape[0] == 150
    assert {'brightness', 'contrast', 'sharpness', 'colourfulness', 'width', 'height'} <= set(ref.image)
    bad = Path(shutil.copytree(env['bundle'], tmp_path/'bad'))
    data = json.loads((bad/REFERENCE_FILE).read_text()); data['image']['brightness'][0] += 1
    (bad/REFERENCE_FILE).write_text(json.dumps(data))
    with pytest.raises(IntegrityError, match='reference.json was changed'): verify_bundle(bad, env['trusted'])


def test_service_log_calm_then_dim_lights_alert_through_the_cli_and_a_signed_webhook(env, tmp_path):
    srv = HTTPServer(('127.0.0.1', 0), Receiver); threading.Thread(target=srv.serve_forever, daemon=True).start()
    (tmp_path/'rules.yaml').write_text(f"webhook: {{url: 'http://127.0.0.1:{srv.server_port}/hook', secret_env: {SECRET_ENV}}}\n"
                                       "rules:\n  - {name: drift, metric: drift, threshold: 1}\n"
                                       "  - {name: brightness, metric: ks.brightness.p_adjusted, op: '<', threshold: 0.05}\n")
    results = {}
    try:
        for name, seed, light in (('calm', 2, 1.0), ('dim', 3, 0.6)):
            cfg = ServeConfig(env['bundle'], env['trusted'], token_keys=None, log_dir=tmp_path/name, watch_s=0)
            with ServerThread(cfg) as s, httpx.Client(base_url=s.url) as c:
                for im in photos(60, seed, light):
                    assert c.post('/v1/predict', content=jpeg(im), headers={'Content-Type': 'image/jpeg', 'X-Store-Id': 's1'}).status_code == 200
            results[name] = run_cli('-w', env['root']/'ws', 'monitor', 'check', env['bundle'], '--log', tmp_path/name, '--rules', tmp_path/'rules.yaml',
                                    '--permutations', 300, '--json', '--html', tmp_path/f'{name}.html', env={SECRET_ENV: 'hook-secret'})
    finally: srv.shutdown()
    calm, dim = results['calm'], results['dim']
    assert calm.returncode == 0, calm.stderr
    out = json.loads(calm.stdout)
    assert not out['report']['drift'] and out['report']['n_current'] == 60 and not any(a['fired'] for a in out['alerts'])
    assert dim.returncode == 3, dim.stderr
    out = json.loads(dim.stdout)
    assert out['report']['drift'] and 'ks.brightness' in out['report']['drifted'] and out['webhook_status'] == 204
    assert len(Receiver.got) == 1 and Receiver.got[0][0]  # only the dim check sent, and its signature verified
    assert {a['rule'] for a in Receiver.got[0][1]['alerts']} == {'drift', 'brightness'}
    assert 'data:image/png' in (tmp_path/'dim.html').read_text()


def test_the_whole_alert_keeps_its_false_alarm_rate(env):
    "No-shift resamples of one pool (reference and current disjoint): the alert over every test fires about alpha of the time."
    ref_all = load_reference(verify_bundle(env['bundle'], env['trusted']))
    rng = np.random.default_rng(0)
    n, alarms, trials = ref_all.images, 0, 40
    emb = ref_all.embedding.array()
    for t in range(trials):
        idx = rng.permutation(n); a, b = idx[:90], idx[90:]
        def part(ix):
            outs = [{'index': ref_all.outputs.index[i], 'score': ref_all.outputs.score[i],
                     'topk': [[LABELS[j], p] for j, p in ref_all.outputs.topk[i]]} for i in ix]
            return summarise('classification', LABELS, [{k: v[i] for k, v in ref_all.image.items()} for i in ix], outs, emb[ix])
        alarms += check_drift(part(a), part(b), permutations=200, seed=t).drift
    assert alarms / trials <= 0.125, f"{alarms} alarms in {trials} no-shift checks"


def test_a_folder_of_images_and_clear_errors(env, tmp_path):
    (tmp_path/'new').mkdir()
    for i, im in enumerate(photos(30, 4)): (tmp_path/'new'/f'{i}.jpg').write_bytes(jpeg(im))  # encoded as the reference was
    rep = Monitor.open(env['bundle'], images=tmp_path/'new', trusted_keys=env['trusted'], permutations=200).report()
    assert rep.n_current == 30 and not rep.drift and 'mmd.embedding' in {t.name for t in rep.tests}
    with pytest.raises(DataError, match='holds no predictions.jsonl'):
        Monitor.open(env['bundle'], log=tmp_path/'new', trusted_keys=env['trusted']).report()
    (tmp_path/'rules.yaml').write_text("rules:\n  - {name: x, metric: mmd.embeding.p_value, threshold: 1}\n")
    with pytest.raises(ConfigError, match=r"rules\.yaml: .*unknown metric 'mmd.embeding.p_value'"): load_rules(tmp_path/'rules.yaml')
    r = run_cli('-w', env['root']/'ws', 'monitor', 'check', env['bundle'], '--images', tmp_path/'new', '--since', 'last tuesday')
    assert r.returncode == 1 and 'neither a duration' in r.stderr
    (tmp_path/'accuracy.yaml').write_text("rules:\n  - {name: low, metric: accuracy.worst, op: '<', threshold: 0.8}\n")
    r = run_cli('-w', env['root']/'ws', 'monitor', 'check', env['bundle'], '--images', tmp_path/'new', '--rules', tmp_path/'accuracy.yaml')
    assert r.returncode == 1 and 'has no rule on a drift metric' in r.stderr and 'monitor accuracy' in r.stderr


def test_detector_reference_and_its_tests(env, tmp_path):
    spec = ModelSpec(task='detection', num_classes=3, max_detections=20)
    det = wrap(recalibrate_batchnorm(build_model(spec), example_input(spec, 4, seed=9)), spec)
    ref_imgs = [jpeg(p) for p in photos(30, 5)]
    bundle = build_bundle(tmp_path/'det', to_onnx(det, tmp_path/'det.onnx'), name='shelf-detector', version='1', labels=LABELS,
                          contract=det.contract(batch_size=1), golden_images=ref_imgs[:1], workspace=env['ws'],
                          postprocessing={'score_threshold': 0.05}, reference_images=ref_imgs)
    ref = load_reference(verify_bundle(bundle, env['trusted']))
    assert ref.task == 'detection' and len(ref.outputs.boxes) == 30 and sum(ref.outputs.boxes) > 0
    (tmp_path/'new').mkdir()
    for i, im in enumerate(photos(25, 6, 0.5)): (tmp_path/'new'/f'{i}.jpg').write_bytes(jpeg(im))
    rep = Monitor.open(bundle, images=tmp_path/'new', trusted_keys=env['trusted'], permutations=200).report()
    names = {t.name for t in rep.tests}
    assert {'ks.boxes_per_image', 'ks.mean_score', 'chi2.class_mix', 'chi2.score_histogram', 'mmd.embedding'} <= names
    assert rep.drift and 'ks.brightness' in {t.name for t in rep.drifted}
