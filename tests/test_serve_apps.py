"""`POST /v1/scan` and `POST /v1/shelf/audit` against a real uvicorn on loopback: real barcode photos, a signed shelf
detector on synthetic shelves, the planogram and price table checked at start, every bad input a 4xx with a message."""
from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import httpx
import pytest
from conftest import wait_ready
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from PIL import Image

from retail_cv.apps import audit_image, boxes_from_detections, read_planogram, read_prices, scan_image
from retail_cv.core import ConfigError, DataError, sha256_bytes
from retail_cv.runtime import Predictor
from retail_cv.serve import ServeConfig, ServerThread, issue_token

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT/'tests'/'data'/'barcodes'
CTYPES = {'.webp': 'image/webp', '.png': 'image/png', '.jpg': 'image/jpeg'}
# what each real photo holds (tests/test_apps.py checks the same through `retail-cv scan`)
CODES = {'ean13-1.webp': [('EAN13', '8480010001136')], 'ean13-blurred.webp': [('EAN13', '9780345348036')], 'falsepositive.webp': [],
         'multi-3xean-8.png': [('EAN8', '12345670'), ('EAN8', '48512343'), ('EAN8', '67678983')]}


@pytest.fixture(scope='module')
def env(tmp_path_factory):
    "A tiny untrained shelf detector (product, gap, price_tag) and a classifier, signed; shelf photos; their planogram and price table."
    torch = pytest.importorskip('torch')
    from retail_cv.bundle import build_bundle, generate_signing_key
    from retail_cv.core import Workspace
    from retail_cv.data.synth import ShelfRenderer, synth_config
    from retail_cv.models import ModelSpec, build_model, example_input, recalibrate_batchnorm, tiny_classifier, to_onnx, wrap
    root = tmp_path_factory.mktemp('serve-apps')
    ws = Workspace.open(root/'ws')
    trusted = [generate_signing_key(ws).public_key]
    renderer = ShelfRenderer(synth_config(images=2, seed=21))
    scenes = [renderer.render(i) for i in range(2)]
    photos = []
    for i, sc in enumerate(scenes):
        Image.fromarray(sc.image[..., ::-1]).save(root/f'shelf{i}.jpg', quality=92); photos.append((root/f'shelf{i}.jpg').read_bytes())
    torch.manual_seed(0)
    spec = ModelSpec(arch='ssdlite320_mobilenet_v3_large', num_classes=3, max_detections=20)
    det = wrap(recalibrate_batchnorm(build_model(spec), example_input(spec, 4, seed=9)), spec)
    detector = build_bundle(root/'det', to_onnx(det, root/'det.onnx'), name='shelf-detector', version='1', labels=['product', 'gap', 'price_tag'],
                            contract=det.contract(), golden_images=[root/'shelf0.jpg'], workspace=ws, profile='shelf-cam-x86')
    clf = tiny_classifier(3, image_size=32)
    classifier = build_bundle(root/'clf', to_onnx(clf, root/'clf.onnx'), name='shelf-classifier', version='1', labels=['a', 'b', 'c'],
                              contract=clf.contract(), golden_images=[root/'shelf0.jpg'], workspace=ws, profile='shelf-cam-x86')
    (root/'prices.csv').write_text('sku,name,price,ean13,tag_ean13,qr_payload\n' + ''.join(
        f"{s.sku},{s.name},{s.price},{s.ean13},{s.tag_ean13},{s.qr_payload}\n" for s in renderer.catalogue))
    plan = {'shelves': [[{'sku': s['sku'], 'facings': s['facings']} for s in shelf] for shelf in scenes[0].planogram]}
    (root/'plan.yaml').write_text(json.dumps(plan))
    return dict(root=root, trusted=trusted, photos=photos, detector=detector, classifier=classifier, issuer=Ed25519PrivateKey.generate())


def _config(env, bundle, **kw) -> ServeConfig:
    return ServeConfig(bundle, env['trusted'], token_keys=[env['issuer'].public_key()], watch_s=0,
                       **{'max_body_bytes': 1 << 20, 'max_pixels': 4_000_000, 'planogram': env['root']/'plan.yaml',
                          'prices': env['root']/'prices.csv', 'shelf_min_score': 0.0, 'shelf_ocr': False, **kw})


@pytest.fixture(scope='module')
def server(env):
    with ServerThread(_config(env, env['detector'], log_dir=env['root']/'log')) as srv: yield srv


def _auth(env, *scopes) -> dict:
    return {'Authorization': f"Bearer {issue_token(env['issuer'], 'store-7', scopes or ['predict'])}"}


def _log(env) -> list[dict]:
    path = env['root']/'log'/'predictions.jsonl'
    return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []


def _expected_audit(env, photo: bytes) -> dict:
    "The library's audit of the served detector's answer (boxes to 0.01 px, as /v1/predict gives them), as the service is configured."
    d = Predictor.from_bundle(env['detector'], trusted_keys=env['trusted']).predict(photo).to_dict()['detections']
    det = types.SimpleNamespace(boxes=[x['box'] for x in d], scores=[x['score'] for x in d], label_names=[x['label'] for x in d])
    table = read_prices(env['root']/'prices.csv')
    plan = read_planogram(env['root']/'plan.yaml', set(table)).shelves
    audit = audit_image(Image.open(io.BytesIO(photo)), boxes_from_detections(det), plan, table, ocr=False, name='image').to_dict()
    return {k: v for k, v in audit.items() if k != 'source'}


# ---- scan ----------------------------------------------------------------------------------------------------------

def test_scan_reads_the_real_barcode_photos_as_the_library_does(env, server):
    before = len(_log(env))
    with httpx.Client(base_url=server.url, headers=_auth(env), timeout=60) as c:
        for name, want in CODES.items():
            data = (SAMPLES/name).read_bytes()
            r = c.post('/v1/scan', content=data, headers={'Content-Type': CTYPES[Path(name).suffix]})
            assert r.status_code == 200, r.text
            got = r.json()
            assert sorted((x['symbology'], x['text']) for x in got['codes']) == want, name
            assert got['codes'] == [x.to_dict() for x in scan_image(SAMPLES/name).codes]  # symbology, text, GS1 check, corners
            assert all(x['valid'] and x['gtin'] == x['text'].zfill(14) for x in got['codes'])
            assert sorted(p['gtin'] for p in got['products']) == sorted(t.zfill(14) for _, t in want)
        r = c.post('/v1/scan', files={'image': ('qr.png', (SAMPLES/'qrcode.png').read_bytes(), 'image/png')})
        assert r.status_code == 200, r.text
        (code,) = r.json()['codes']
        assert code['symbology'] == 'QRCode' and code['text'].startswith('When we at WRT talk about') and code['gtin'] is None
        assert len(code['corners']) == 4 and len(r.json()['scan_id']) == 32
    assert len(_log(env)) == before  # scans run no model and are not logged


# ---- shelf audit ---------------------------------------------------------------------------------------------------

def test_shelf_audit_is_the_library_audit_of_the_served_detector(env, server):
    for photo in env['photos']:
        r = httpx.post(server.url + '/v1/shelf/audit', content=photo, timeout=120,
                       headers={**_auth(env), 'Content-Type': 'image/jpeg', 'X-Store-Id': 'store-42', 'X-Device-Id': 'cam-1'})
        assert r.status_code == 200, r.text
        got = r.json()
        assert got['model'] == {'name': 'shelf-detector', 'version': '1'}
        want = _expected_audit(env, photo)
        assert got['counts']['boxes'] > 0 and isinstance(got['planogram'], list) and isinstance(got['prices'], list)
        assert {k: v for k, v in got.items() if k not in ('audit_id', 'model')} == json.loads(json.dumps(want)), \
            'the typed answer must carry every field of ShelfAudit.to_dict(), and only those'
        # the detection behind the audit is logged like a prediction: ids and hashes, never the photo
        rec = next(x for x in _log(env) if x['prediction_id'] == got['audit_id'])
        assert (rec['image_sha256'], rec['store_id'], rec['device_id']) == (sha256_bytes(photo), 'store-42', 'cam-1')
        by_code = sum(t['found_by'] == 'code' for t in got['tags'])  # tags the detector missed, found by their codes
        assert 0 < got['counts']['boxes'] - by_code <= len(rec['outputs']['detections'])  # the detector's boxes, one per spot
    raw = b''.join(p.read_bytes() for p in (env['root']/'log').glob('predictions.jsonl*'))
    for p in env['photos']: assert p[200:264] not in raw and base64.b64encode(p)[200:264] not in raw


def test_shelf_audit_annotated_is_a_png_of_the_photo(env, server):
    r = httpx.post(server.url + '/v1/shelf/audit?annotated=true', content=env['photos'][0], timeout=120,
                   headers={**_auth(env), 'Content-Type': 'image/jpeg'})
    assert r.status_code == 200 and r.headers['content-type'] == 'image/png', r.text
    assert Image.open(io.BytesIO(r.content)).size == Image.open(io.BytesIO(env['photos'][0])).size
    assert len(r.headers['x-audit-id']) == 32


def test_metrics_and_openapi_name_the_new_endpoints(env, server):
    httpx.post(server.url + '/v1/scan', content=(SAMPLES/'ean13-1.webp').read_bytes(), headers={**_auth(env), 'Content-Type': 'image/webp'})
    httpx.post(server.url + '/v1/shelf/audit', content=b'junk', headers={**_auth(env), 'Content-Type': 'image/jpeg'})
    text = httpx.get(server.url + '/metrics').text
    assert 'retail_cv_requests_total{endpoint="/v1/scan",outcome="ok"}' in text
    assert 'retail_cv_requests_total{endpoint="/v1/shelf/audit",outcome="client_error"}' in text
    spec = httpx.get(server.url + '/openapi.json').json()
    assert spec['paths']['/v1/scan']['post']['responses']['200']['content']['application/json']['schema'] == {'$ref': '#/components/schemas/ScanOut'}
    audit = spec['paths']['/v1/shelf/audit']['post']['responses']
    assert set(audit['200']['content']) == {'application/json', 'image/png'} and {'409', '501'} <= set(audit)
    assert {'PriceIssueOut', 'PlanogramIssueOut', 'StockIssueOut', 'CodeOut'} <= set(spec['components']['schemas'])


def _issue_kinds_and_keys() -> tuple[set[str], set[str]]:
    "Every issue kind `retail_cv.apps` writes (`{'issue': ...}` dicts and `_issue(...)` calls), and every key beside it."
    import ast
    kinds, keys = set(), set()
    consts = lambda n: {n.value} if isinstance(n, ast.Constant) else consts(n.body) | consts(n.orelse) if isinstance(n, ast.IfExp) else set()
    for f in (ROOT/'retail_cv'/'apps').glob('_*.py'):
        for n in ast.walk(ast.parse(f.read_text())):
            names = [getattr(k, 'value', None) for k in n.keys] if isinstance(n, ast.Dict) else []
            if 'issue' in names and (kind := consts(n.values[names.index('issue')])) and all(isinstance(k, str) for k in kind):
                kinds |= kind; keys |= {k for k in names if isinstance(k, str)}  # an issue (not, say, a colour per issue)
            elif isinstance(n, ast.Call) and getattr(n.func, 'id', '') == '_issue':
                kinds |= consts(n.args[0]); keys |= {'issue', 'row'} | {k.arg for k in n.keywords if k.arg}
                keys |= {k.value for kw in n.keywords if kw.arg is None for d in ast.walk(kw.value) if isinstance(d, ast.Dict)
                         for k in d.keys if isinstance(k, ast.Constant)}
    return kinds, keys


def test_the_typed_issues_cover_every_issue_the_apps_write():
    "A new issue kind or field in `retail_cv.apps` must reach the typed answer (a kind unknown to it would be a 500)."
    from typing import get_args
    from retail_cv.serve._schemas import PlanogramIssueOut, PriceIssueOut, StockIssueOut
    models = (StockIssueOut, PlanogramIssueOut, PriceIssueOut)
    kinds, keys = _issue_kinds_and_keys()
    assert {'out_of_stock', 'missing', 'wrong_price', 'print_differs_from_code'} <= kinds and {'tag_box', 'planned_here'} <= keys
    assert kinds <= {k for m in models for k in get_args(m.model_fields['issue'].annotation)}
    assert keys <= {f for m in models for f in m.model_fields}


# ---- bad requests are 4xx with a message ---------------------------------------------------------------------------

@pytest.mark.parametrize('endpoint', ['/v1/scan', '/v1/shelf/audit'])
@pytest.mark.parametrize('body,ctype,headers,status,message', [
    (b'this is not an image', 'image/jpeg', None, 400, 'not an image'),
    ('truncated', 'image/jpeg', None, 400, 'image'),
    (b'x' * (2 << 20), 'image/jpeg', None, 413, 'over the limit'),
    ('bomb', 'image/png', None, 413, 'decompression bomb'),
    (b'{"image": 1}', 'application/json', None, 415, 'unsupported Content-Type'),
    ('photo', 'image/jpeg', {}, 401, 'no bearer token'),
    ('photo', 'image/jpeg', ('models',), 403, "lacks the 'predict' scope"),
])
def test_bad_requests_are_4xx_naming_the_problem(env, server, endpoint, body, ctype, headers, status, message):
    if body == 'truncated': body = env['photos'][0][:len(env['photos'][0]) // 2]
    elif body == 'photo': body = env['photos'][0]
    elif body == 'bomb': buf = io.BytesIO(); Image.new('L', (4000, 4000)).save(buf, 'PNG'); body = buf.getvalue()  # 16 M pixels in 16 kB
    auth = _auth(env) if headers is None else _auth(env, *headers) if headers else {}
    r = httpx.post(server.url + endpoint, content=body, headers={**auth, 'Content-Type': ctype}, timeout=60)
    assert r.status_code == status, r.text
    assert message in r.json()['detail']


def test_a_classifier_served_cannot_audit_but_scans(env):
    with ServerThread(_config(env, env['classifier'])) as srv:
        r = httpx.post(srv.url + '/v1/shelf/audit', content=env['photos'][0], headers={**_auth(env), 'Content-Type': 'image/jpeg'})
        assert r.status_code == 409, r.text
        assert 'shelf-classifier 1 is a classification model of a, b, c: a shelf audit needs a detector' in r.json()['detail']
        r = httpx.post(srv.url + '/v1/scan', content=(SAMPLES/'ean13-1.webp').read_bytes(), headers={**_auth(env), 'Content-Type': 'image/webp'})
        assert r.status_code == 200 and r.json()['codes'][0]['text'] == '8480010001136'


def test_no_model_audit_is_503_and_scan_still_works(env, tmp_path):
    with ServerThread(_config(env, tmp_path/'nothing-here')) as srv:
        r = httpx.post(srv.url + '/v1/shelf/audit', content=env['photos'][0], headers={**_auth(env), 'Content-Type': 'image/jpeg'})
        assert r.status_code == 503 and 'no model loaded' in r.json()['detail']
        r = httpx.post(srv.url + '/v1/scan', content=(SAMPLES/'ean13-1.webp').read_bytes(), headers={**_auth(env), 'Content-Type': 'image/webp'})
        assert r.status_code == 200


def test_without_zxing_the_service_starts_and_both_endpoints_name_the_extra(env, monkeypatch):
    monkeypatch.setitem(sys.modules, 'zxingcpp', None)  # what `import zxingcpp` meets where the apps extra is not installed
    with pytest.raises(ImportError): import zxingcpp  # noqa: F401
    with ServerThread(_config(env, env['detector'])) as srv:
        for endpoint in ('/v1/scan', '/v1/shelf/audit'):
            r = httpx.post(srv.url + endpoint, content=env['photos'][0], headers={**_auth(env), 'Content-Type': 'image/jpeg'})
            assert r.status_code == 501 and "install the `apps` extra (pip install 'retail-cv[apps]')" in r.json()['detail'], r.text
        r = httpx.post(srv.url + '/v1/predict', content=env['photos'][0], headers={**_auth(env), 'Content-Type': 'image/jpeg'})
        assert r.status_code == 200 and r.json()['detections'] is not None


# ---- the planogram and price table are checked at start ------------------------------------------------------------

def test_a_bad_planogram_or_price_table_stops_the_start(env, tmp_path):
    (tmp_path/'twice.csv').write_text('sku,price\nA,1.19\nA,2.00\n')
    with pytest.raises(DataError, match='line 3: sku A is listed twice'): ServerThread(_config(env, env['detector'], prices=tmp_path/'twice.csv'))
    (tmp_path/'unknown.yaml').write_text('shelves:\n  - [{sku: SKU-UNKNOWN, facings: 2}]\n')
    with pytest.raises(ConfigError, match=r'unknown product\(s\): SKU-UNKNOWN'): ServerThread(_config(env, env['detector'], planogram=tmp_path/'unknown.yaml'))
    (tmp_path/'bad.yaml').write_text('shelves: [[{sku: A, facings: -1}]]\n')
    with pytest.raises(ConfigError, match='shelves.0.0.facings'): ServerThread(_config(env, env['detector'], planogram=tmp_path/'bad.yaml', prices=None))
    with pytest.raises(DataError, match='does not exist'): ServerThread(_config(env, env['detector'], prices=tmp_path/'absent.csv'))


def test_retail_cv_serve_with_planogram_and_prices(env, tmp_path):
    "The command line reads both files before it listens: a bad one is exit 1 with its line; good ones configure the audit."
    from cryptography.hazmat.primitives import serialization
    from retail_cv.serve import free_port
    pub = tmp_path/'issuer.pub'
    pub.write_bytes(env['issuer'].public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    (tmp_path/'twice.csv').write_text('sku,price\nA,1.19\nA,2.00\n')
    port, exe = free_port(), str(Path(sys.executable).parent/'retail-cv')
    cmd = [exe, '-w', str(tmp_path/'ws'), 'serve', str(env['detector']), '--port', str(port), '--token-keys', str(pub),
           '--trusted-keys', str(env['trusted'][0]), '--watch', '0', '--planogram', str(env['root']/'plan.yaml')]
    r = subprocess.run(cmd + ['--prices', str(tmp_path/'twice.csv')], capture_output=True, text=True, timeout=120, env={**os.environ, 'COLUMNS': '200'})
    assert r.returncode == 1 and 'line 3: sku A is listed twice' in r.stderr, r.stderr
    proc = subprocess.Popen(cmd + ['--prices', str(env['root']/'prices.csv'), '--shelf-min-score', '0', '--no-shelf-ocr'],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f'http://127.0.0.1:{port}'
        wait_ready(url)
        r = httpx.post(url + '/v1/shelf/audit', content=env['photos'][1], headers={**_auth(env), 'Content-Type': 'image/jpeg'}, timeout=120)
        assert r.status_code == 200, r.text
        assert {k: v for k, v in r.json().items() if k not in ('audit_id', 'model')} == json.loads(json.dumps(_expected_audit(env, env['photos'][1])))
    finally:
        proc.terminate(); out = proc.communicate(timeout=20)[0]
    assert 'serving shelf-detector 1' in out, out


# ---- the OpenAPI spec of the new operations, fuzzed against a detector ---------------------------------------------

@pytest.mark.skipif(shutil.which('st', path=str(Path(sys.executable).parent)) is None, reason='schemathesis is not installed')
def test_schemathesis_on_scan_and_audit_finds_no_server_error_and_no_schema_violation(env, tmp_path):
    "tests/test_serve.py fuzzes every operation with a classifier served; here the apps operations get a detector, planogram and prices."
    st = str(Path(sys.executable).parent/'st')
    with ServerThread(_config(env, env['detector'], shelf_min_score=0.3)) as srv:
        token = issue_token(env['issuer'], 'fuzzer', ['admin'])
        (tmp_path/'schemathesis.toml').write_text('[checks.positive_data_acceptance]\n'
                                                   'expected-statuses = ["2xx", "400", "401", "403"]\n')
        r = subprocess.run([st, '--config-file', str(tmp_path/'schemathesis.toml'), 'run', srv.url + '/openapi.json',
                            '--include-tag', 'apps', '-H', f'Authorization: Bearer {token}', '--checks', 'all', '--max-examples', '25',
                            '--seed', '1', '--workers', '1', '--generation-database', 'none', '--request-timeout', '60'],
                           capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert 'Tested: 2' in r.stdout, r.stdout[-3000:]
