"""`retail-cv serve` against a real uvicorn on loopback: predictions equal the runtime's, every bad input a 4xx with a
message, tokens and scopes, hot swap under load with no failed request, a prediction log without image bytes."""
from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import wait_ready
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from PIL import Image

from retail_cv.bundle import build_bundle, generate_signing_key
from retail_cv.core import Workspace, sha256_bytes
from retail_cv.models import tiny_classifier, to_onnx
from retail_cv.runtime import Predictor
from retail_cv.serve import ServeConfig, ServerThread, issue_token

LABELS = ['cola', 'water', 'juice']


def _jpeg(rng, h, w) -> bytes:
    buf = io.BytesIO(); Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, 'JPEG', quality=90)
    return buf.getvalue()


def _swap(link: Path, target: Path):
    "Point `link` at `target` atomically, as the fleet agent switches its active slot."
    tmp = link.with_name(link.name + '.next')
    tmp.unlink(missing_ok=True); tmp.symlink_to(target); os.replace(tmp, link)


@pytest.fixture(scope='module')
def env(tmp_path_factory):
    "Two classifier bundles that answer differently, photos, a token issuer and a revocation list."
    root = tmp_path_factory.mktemp('serve')
    ws = Workspace.open(root/'ws')
    trusted = [generate_signing_key(ws).public_key]
    rng = np.random.default_rng(0)
    photos = [_jpeg(rng, h, w) for h, w in [(240, 320), (300, 200), (64, 64), (90, 500), (128, 96)]]
    (root/'g.jpg').write_bytes(photos[0])
    bundles = {}
    for version, seed in (('1', 0), ('2', 1)):
        torch.manual_seed(seed); clf = tiny_classifier(3, image_size=32)
        bundles[version] = build_bundle(root/f'v{version}', to_onnx(clf, root/f'v{version}.onnx'), name='shelf-classifier',
                                        version=version, labels=LABELS, contract=clf.contract(), golden_images=[root/'g.jpg'],
                                        workspace=ws, profile='shelf-cam-x86')
    preds = {v: Predictor.from_bundle(b, trusted_keys=trusted) for v, b in bundles.items()}
    expected = {v: [p.predict(x).to_dict() for x in photos] for v, p in preds.items()}
    assert [e['topk'] for e in expected['1']] != [e['topk'] for e in expected['2']]  # the swap is visible
    issuer = Ed25519PrivateKey.generate()
    (root/'revoked.txt').write_text('# revoked tokens\n')
    return dict(root=root, trusted=trusted, photos=photos, bundles=bundles, preds=preds, expected=expected, issuer=issuer)


def _config(env, link: Path, **kw) -> ServeConfig:
    return ServeConfig(link, env['trusted'], token_keys=[env['issuer'].public_key()], revocations=env['root']/'revoked.txt',
                       **{'max_body_bytes': 1 << 20, 'max_pixels': 4_000_000, 'log_dir': env['root']/'log', **kw})


@pytest.fixture(scope='module')
def server(env):
    link = env['root']/'active'; _swap(link, env['bundles']['1'])
    with ServerThread(_config(env, link, watch_s=0)) as srv: yield srv


def _auth(env, *scopes, **kw) -> dict:
    return {'Authorization': f"Bearer {issue_token(env['issuer'], 'store-7', scopes or ['predict'], **kw)}"}


def _close(got: dict, want: dict):
    assert got['label'] == want['label'] and got['index'] == want['index']
    assert got['score'] == pytest.approx(want['score'], rel=1e-6)
    assert [l for l, _ in got['topk']] == [l for l, _ in want['topk']]
    np.testing.assert_allclose([s for _, s in got['topk']], [s for _, s in want['topk']], rtol=1e-6)


# ---- predictions -------------------------------------------------------------------------------------------------

def test_predict_equals_the_runtime_raw_and_multipart(env, server):
    with httpx.Client(base_url=server.url, headers=_auth(env)) as c:
        for photo, want in zip(env['photos'], env['expected']['1']):
            r = c.post('/v1/predict', content=photo, headers={'Content-Type': 'image/jpeg', 'X-Store-Id': 'store-7'})
            assert r.status_code == 200, r.text
            assert r.json()['model'] == {'name': 'shelf-classifier', 'version': '1'}
            _close(r.json()['classification'], want)
        r = c.post('/v1/predict', files={'image': ('a.jpg', env['photos'][1], 'image/jpeg')})
        assert r.status_code == 200, r.text
        _close(r.json()['classification'], env['expected']['1'][1])


def test_batch_equals_the_runtime_in_order(env, server):
    files = [('images', (f'{i}.jpg', p, 'image/jpeg')) for i, p in enumerate(env['photos'])]
    r = httpx.post(server.url + '/v1/predict/batch', files=files, headers=_auth(env))
    assert r.status_code == 200, r.text
    got = r.json()['predictions']
    assert len(got) == len(env['photos']) and len({p['prediction_id'] for p in got}) == len(got)
    for g, want in zip(got, env['expected']['1']): _close(g['classification'], want)


def test_models_health_ready_metrics_docs(env, server):
    r = httpx.get(server.url + '/v1/models', headers=_auth(env, 'models'))
    assert r.status_code == 200, r.text
    (m,) = r.json()['models']
    assert (m['name'], m['version'], m['profile'], m['golden']) == ('shelf-classifier', '1', 'shelf-cam-x86', {'ok': True, 'images': 1})
    assert m['contract']['inputs'][0]['name'] == 'images' and r.json()['last_swap_error'] is None
    assert httpx.get(server.url + '/healthz').json() == {'status': 'alive', 'detail': None}
    assert httpx.get(server.url + '/readyz').json()['status'] == 'ready'
    text = httpx.get(server.url + '/metrics').text
    for name in ('retail_cv_requests_total{endpoint="/v1/predict",outcome="ok"}', 'retail_cv_inference_duration_seconds_bucket',
                 'retail_cv_batch_size_bucket', 'retail_cv_model_info{name="shelf-classifier",version="1"} 1.0'):
        assert name in text, name
    spec = httpx.get(server.url + '/openapi.json').json()
    assert {'/v1/predict', '/v1/predict/batch', '/v1/models', '/healthz', '/readyz', '/metrics'} <= set(spec['paths'])
    assert httpx.get(server.url + '/docs').status_code == 200


# ---- bad requests are 4xx with a message -------------------------------------------------------------------------

def _png_claiming(w: int, h: int) -> bytes:
    "A 57-byte PNG whose header claims w x h pixels."
    def chunk(kind, data): return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
    return b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 8, 2, 0, 0, 0)) + chunk(b'IDAT', zlib.compress(b''))


@pytest.mark.parametrize('body,ctype,status,message', [
    (b'this is not an image', 'image/jpeg', 400, 'not an image'),
    (b'', 'image/jpeg', 400, 'empty image'),
    ('truncated', 'image/jpeg', 400, 'image'),
    (_png_claiming(3000, 3000), 'image/png', 413, 'decompression bomb'),
    (_png_claiming(100_000, 100_000), 'image/png', 413, 'decompression bomb'),
    (b'x' * (2 << 20), 'image/jpeg', 413, 'over the limit'),
    (b'{"image": 1}', 'application/json', 415, 'unsupported Content-Type'),
    (b'--x\r\n\r\n', 'multipart/form-data', 400, 'boundary'),
])
def test_bad_requests_are_4xx_naming_the_problem(env, server, body, ctype, status, message):
    if body == 'truncated': body = env['photos'][0][:len(env['photos'][0]) // 2]
    r = httpx.post(server.url + '/v1/predict', content=body, headers={**_auth(env), 'Content-Type': ctype})
    assert r.status_code == status, r.text
    assert message in r.json()['detail']


def test_a_real_bomb_is_refused_before_decoding(env, server):
    buf = io.BytesIO(); Image.new('L', (4000, 4000)).save(buf, 'PNG')  # 16 M pixels in about 16 kB
    r = httpx.post(server.url + '/v1/predict', content=buf.getvalue(), headers={**_auth(env), 'Content-Type': 'image/png'})
    assert r.status_code == 413 and '4000 x 4000' in r.json()['detail']


def test_batch_over_the_limit_and_a_bad_image_in_a_batch(env, server):
    r = httpx.post(server.url + '/v1/predict/batch', headers=_auth(env),
                   files=[('images', ('a.jpg', env['photos'][0], 'image/jpeg')), ('images', ('b.jpg', b'junk', 'image/jpeg'))])
    assert r.status_code == 400 and 'not an image' in r.json()['detail']


# ---- tokens ------------------------------------------------------------------------------------------------------

def test_missing_malformed_wrong_expired_revoked_tokens_are_401_and_a_missing_scope_403(env, server):
    url, img = server.url + '/v1/predict', {'content': env['photos'][0], 'headers': {'Content-Type': 'image/jpeg'}}
    def post(headers): return httpx.post(url, content=img['content'], headers={**img['headers'], **headers})
    cases = {'no token': ({}, 'no bearer token'), 'basic': ({'Authorization': 'Basic dTpw'}, 'no bearer token'),
             'garbage': ({'Authorization': 'Bearer abc.def'}, 'malformed'),
             'other issuer': ({'Authorization': f"Bearer {issue_token(Ed25519PrivateKey.generate(), 's', ['predict'])}"}, 'unknown key'),
             'expired': (_auth(env, 'predict', ttl_s=10, now=1_000_000), 'expired')}
    for name, (headers, message) in cases.items():
        r = post(headers)
        assert r.status_code == 401 and message in r.json()['detail'], (name, r.text)
        assert r.headers['www-authenticate'] == 'Bearer'
    revoked = _auth(env)
    jti = json.loads(__import__('base64').urlsafe_b64decode(revoked['Authorization'].split('.')[1] + '=='))['jti']
    assert post(revoked).status_code == 200
    with open(env['root']/'revoked.txt', 'a') as f: f.write(jti + '\n')
    r = post(revoked)
    assert r.status_code == 401 and 'revoked' in r.json()['detail']
    r = post(_auth(env, 'models'))
    assert r.status_code == 403 and "lacks the 'predict' scope" in r.json()['detail']
    assert httpx.get(server.url + '/v1/models', headers=_auth(env, 'predict')).status_code == 403
    assert httpx.get(server.url + '/v1/models', headers=_auth(env, 'admin')).status_code == 200
    assert 'outcome="unauthorized"' in httpx.get(server.url + '/metrics').text


# ---- the prediction log ------------------------------------------------------------------------------------------

def test_prediction_log_has_ids_hashes_store_and_no_image_bytes(env, server):
    photo = env['photos'][3]
    r = httpx.post(server.url + '/v1/predict', content=photo,
                   headers={**_auth(env), 'Content-Type': 'image/jpeg', 'X-Store-Id': 'store-42', 'X-Device-Id': 'cam-3'})
    pid = r.json()['prediction_id']
    log = env['root']/'log'/'predictions.jsonl'
    for _ in range(50):
        records = {json.loads(l)['prediction_id']: json.loads(l) for l in log.read_text().splitlines()}
        if pid in records: break
        time.sleep(0.05)
    rec = records[pid]
    assert rec['schema'] == 'retail_cv.prediction/1' and rec['image_sha256'] == sha256_bytes(photo)
    assert (rec['store_id'], rec['device_id'], rec['model']['version']) == ('store-42', 'cam-3', '1')
    assert rec['image']['width'] == 500 and rec['outputs']['label'] == r.json()['classification']['label']
    raw = b''.join(p.read_bytes() for p in log.parent.glob('predictions.jsonl*'))
    import base64
    for p in env['photos']:
        assert p[100:164] not in raw and base64.b64encode(p)[100:164] not in raw
    assert set(rec) == {'schema', 'prediction_id', 'time', 'image_sha256', 'model', 'store_id', 'device_id', 'outputs', 'image', 'embedding'}
    assert len(rec['embedding']) == 16  # the tiny classifier's pooled features, for drift monitoring


# ---- hot swap ----------------------------------------------------------------------------------------------------

def _swap_under_load(env, tmp_path, requests: int, clients: int = 8, **kw):
    "Clients hammer the server while the active slot moves from v1 to v2 half-way; every answer checked."
    link = tmp_path/'active'; _swap(link, env['bundles']['1'])
    with ServerThread(_config(env, link, watch_s=0.02, log_dir=tmp_path/'log', **kw)) as srv:
        done, results, failures = [0], [], []
        lock = threading.Lock()
        def client(k):
            with httpx.Client(base_url=srv.url, headers=_auth(env), timeout=30) as c:
                for i in range(k, requests, clients):
                    j = i % len(env['photos'])
                    try:
                        r = c.post('/v1/predict', content=env['photos'][j], headers={'Content-Type': 'image/jpeg'})
                        if r.status_code != 200: failures.append(r.text); continue
                        body = r.json()
                        _close(body['classification'], env['expected'][body['model']['version']][j])
                        with lock: results.append(body['model']['version']); done[0] += 1
                    except Exception as e: failures.append(repr(e))
        def swapper():
            while done[0] < requests // 2: time.sleep(0.005)
            _swap(link, env['bundles']['2'])
        with ThreadPoolExecutor(clients + 1) as pool:
            futures = [pool.submit(client, k) for k in range(clients)] + [pool.submit(swapper)]
            for f in futures: f.result()
        assert failures == []
        assert len(results) == requests and set(results) == {'1', '2'}
        assert results[-clients:] == ['2'] * clients  # the swap stuck
        text = httpx.get(srv.url + '/metrics').text
        assert 'retail_cv_model_swaps_total{outcome="ok"} 2.0' in text and 'version="2"} 1.0' in text
        return text


def test_hot_swap_under_concurrent_load(env, tmp_path):
    "2,000 requests from 8 clients, the slot moved half-way: none fails, each answer matches the version it names."
    _swap_under_load(env, tmp_path, 2000)


def test_hot_swap_with_micro_batching(env, tmp_path):
    "Batches gather several requests yet never mix models: each answer still matches the version it names."
    text = _swap_under_load(env, tmp_path, 300, batch_wait_ms=5, batch_images=8)
    count = float(text.split('retail_cv_batch_size_count ')[1].split()[0])
    total = float(text.split('retail_cv_batch_size_sum ')[1].split()[0])
    assert total == 300 and count < total  # every image inferred once, in fewer calls than requests


def test_a_bundle_failing_verification_keeps_the_old_model_and_says_so(env, tmp_path):
    link = tmp_path/'active'; _swap(link, env['bundles']['1'])
    bad = tmp_path/'bad'; shutil.copytree(env['bundles']['2'], bad)
    with open(bad/'model.onnx', 'ab') as f: f.write(b'tampered')
    with ServerThread(_config(env, link, watch_s=0.02, log_dir=None)) as srv:
        _swap(link, bad)
        for _ in range(200):
            models = httpx.get(srv.url + '/v1/models', headers=_auth(env, 'models')).json()
            if models['last_swap_error']: break
            time.sleep(0.02)
        assert models['models'][0]['version'] == '1'
        assert models['last_swap_error']['path'] == str(bad) and 'IntegrityError' in models['last_swap_error']['error']
        r = httpx.post(srv.url + '/v1/predict', content=env['photos'][0], headers={**_auth(env), 'Content-Type': 'image/jpeg'})
        assert r.status_code == 200 and r.json()['model']['version'] == '1'
        assert 'retail_cv_model_swaps_total{outcome="failed"} 1.0' in httpx.get(srv.url + '/metrics').text
        assert httpx.get(srv.url + '/readyz').status_code == 200


def test_no_model_is_not_ready_and_predict_is_503(env, tmp_path):
    with ServerThread(_config(env, tmp_path/'nothing-here', watch_s=0, log_dir=None)) as srv:
        assert httpx.get(srv.url + '/readyz').status_code == 503
        r = httpx.post(srv.url + '/v1/predict', content=env['photos'][0], headers={**_auth(env), 'Content-Type': 'image/jpeg'})
        assert r.status_code == 503 and 'no model loaded' in r.json()['detail']


# ---- the command line ---------------------------------------------------------------------------------------------

def test_retail_cv_serve_command_serves_with_tokens(env, tmp_path):
    from cryptography.hazmat.primitives import serialization
    from retail_cv.serve import free_port
    pub = tmp_path/'issuer.pub'
    pub.write_bytes(env['issuer'].public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    port, exe = free_port(), Path(sys.executable).parent/'retail-cv'
    cmd = [str(exe), '-w', str(tmp_path/'ws'), 'serve', str(env['bundles']['2']), '--port', str(port), '--token-keys', str(pub),
           '--trusted-keys', str(env['trusted'][0]), '--log-dir', str(tmp_path/'log'), '--watch', '0']
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f'http://127.0.0.1:{port}'
        wait_ready(url)
        r = httpx.post(url + '/v1/predict', content=env['photos'][0], headers={**_auth(env), 'Content-Type': 'image/jpeg'})
        assert r.status_code == 200 and r.json()['model']['version'] == '2', r.text
        _close(r.json()['classification'], env['expected']['2'][0])
        assert httpx.post(url + '/v1/predict', content=env['photos'][0]).status_code == 401
    finally:
        proc.terminate(); out = proc.communicate(timeout=20)[0]
    assert 'serving shelf-classifier 2' in out, out


# ---- the service never imports torch -----------------------------------------------------------------------------

def test_serve_imports_no_torch():
    code = 'import sys, retail_cv.serve, retail_cv.cli._serve; assert "torch" not in sys.modules, sorted(sys.modules)'
    subprocess.run([sys.executable, '-c', code], check=True)


# ---- the OpenAPI spec, fuzzed ------------------------------------------------------------------------------------

SCHEMATHESIS_CHECKS = os.environ.get('RETAIL_CV_ST_CHECKS', 'all')


@pytest.mark.skipif(shutil.which('st', path=str(Path(sys.executable).parent)) is None, reason='schemathesis is not installed')
def test_schemathesis_finds_no_server_error_and_no_schema_violation(env, tmp_path):
    "Every operation of the OpenAPI spec fuzzed with an admin token: no 5xx, every answer as documented."
    link = tmp_path/'active'; _swap(link, env['bundles']['1'])
    st = str(Path(sys.executable).parent/'st')
    with ServerThread(_config(env, link, watch_s=0, log_dir=None)) as srv:
        token = issue_token(env['issuer'], 'fuzzer', ['admin'])
        # a body the schema allows (any bytes) need not be a decodable image: that one answer is a documented 400;
        # a classifier is served, so /v1/shelf/audit answers its documented 409 (tests/test_serve_apps.py fuzzes it with a detector)
        (tmp_path/'schemathesis.toml').write_text('[checks.positive_data_acceptance]\n'
                                                   'expected-statuses = ["2xx", "400", "401", "403", "409"]\n')
        r = subprocess.run([st, '--config-file', str(tmp_path/'schemathesis.toml'), 'run', srv.url + '/openapi.json',
                            '-H', f'Authorization: Bearer {token}', '--checks', SCHEMATHESIS_CHECKS, '--max-examples', '25',
                            '--seed', '1', '--workers', '1', '--generation-database', 'none', '--request-timeout', '20'],
                           capture_output=True, text=True, timeout=600, cwd=tmp_path)  # its reports stay out of the checkout
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert 'Tested: 8' in r.stdout, r.stdout[-3000:]  # every operation of the spec


def test_prediction_log_keeps_images_only_on_request_and_blurs_faces(env, tmp_path):
    "`--log-images`: the logged image is stored with the face blurred, and the record names it; the bytes never enter the JSON."
    from skimage import data as skdata
    buf = io.BytesIO(); Image.fromarray(skdata.astronaut()).save(buf, 'JPEG', quality=95); photo = buf.getvalue()
    link = tmp_path/'active'; _swap(link, env['bundles']['1'])
    with ServerThread(_config(env, link, watch_s=0, log_dir=tmp_path/'log', log_images=True)) as srv:
        r = httpx.post(srv.url + '/v1/predict', content=photo, headers={**_auth(env), 'Content-Type': 'image/jpeg', 'X-Store-Id': 's1'})
        assert r.status_code == 200, r.text
    rec = json.loads((tmp_path/'log'/'predictions.jsonl').read_text())
    assert rec['prediction_id'] == r.json()['prediction_id'] and rec['faces_blurred'] >= 1
    kept = np.asarray(Image.open(tmp_path/'log'/rec['image_file']), dtype=float)
    sent = np.asarray(Image.open(io.BytesIO(photo)), dtype=float)
    face, suit = (slice(60, 170), slice(170, 280)), (slice(400, 512), slice(400, 512))
    assert np.abs(kept[face] - sent[face]).mean() > 15 and np.abs(kept[suit] - sent[suit]).mean() < 5
    from retail_cv.serve import delete_store
    assert delete_store(tmp_path/'log', 's1') == 1 and not list((tmp_path/'log'/'images').iterdir())
