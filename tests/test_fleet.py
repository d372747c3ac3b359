"""The fleet server against real HTTP: uvicorn on loopback, httpx clients, a registry on disk, real signed bundles.

Devices here are a small protocol client written from spec/fleet-protocol.md (enrol, signed polls and downloads,
signed numbered reports); it stands for the agent in these server tests, the agent's own tests drive the real agent
processes. The restart test runs `retail-cv fleet serve` as a process and kills it mid-rollout; the PostgreSQL test
runs against a real server (the `postgres_url` fixture of conftest.py).
"""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from retail_cv.bundle import build_bundle, generate_signing_key, verify_bundle
from retail_cv.core import Workspace, sha256_bytes
from retail_cv.credentials import issue_token
from retail_cv.fleet import (Database, EnrolRequest, FleetConfig, FleetServer, Report, canary_order, public_key_text,
                             sign_doc, signed_headers, spec_files)
from retail_cv.registry import Registry

ROOT = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).parent/'retail-cv')
PROFILES = ('handheld-arm-cpu', 'shelf-cam-x86')
MODEL = 'shelf-cls'
JSON = {'Content-Type': 'application/json'}


# --- a torch-free model, signed bundles, a registry ---------------------------------------------------------------

def tiny_onnx(seed: int) -> bytes:
    "A 3-class classifier of 32 x 32 images: mean colour, then a linear layer."
    rng = np.random.default_rng(seed)
    init = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n) for n, s in (('W', (3, 3)), ('b', (3,)))]
    nodes = [helper.make_node('ReduceMean', ['images'], ['m'], axes=[2, 3], keepdims=0),
             helper.make_node('MatMul', ['m', 'W'], ['mm']), helper.make_node('Add', ['mm', 'b'], ['logits'])]
    g = helper.make_graph(nodes, 'tiny', [helper.make_tensor_value_info('images', TensorProto.FLOAT, ['batch', 3, 32, 32])],
                          [helper.make_tensor_value_info('logits', TensorProto.FLOAT, ['batch', 3])], init)
    return helper.make_model(g, opset_imports=[helper.make_opsetid('', 17)], ir_version=8).SerializeToString()


CONTRACT = {'inputs': [{'name': 'images', 'shape': ['batch', 3, 32, 32], 'dtype': 'float32'}],
            'outputs': [{'name': 'logits', 'shape': ['batch', 3], 'dtype': 'float32'}], 'preprocessing': {'image_size': 32}}


@pytest.fixture(scope='module')
def built(tmp_path_factory):
    "Signed bundles of versions 1-3 for both profiles (built once), with the signing key's files."
    tmp = tmp_path_factory.mktemp('built')
    keys = generate_signing_key(tmp/'keys')
    buf = io.BytesIO(); Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(buf, 'PNG')
    out = {}
    for v in (1, 2, 3):
        (tmp/f'm{v}.onnx').write_bytes(tiny_onnx(v))
        for p in PROFILES:
            out[v, p] = build_bundle(tmp/f'b{v}-{p}', tiny_onnx(v), name=MODEL, version=str(v), labels=['a', 'b', 'c'],
                                     contract=CONTRACT, golden_images=[buf.getvalue()], key=keys.private_key, profile=p)
    return {'tmp': tmp, 'keys': keys, 'bundles': out}


@pytest.fixture
def world(built, tmp_path):
    "A fresh workspace whose registry has versions 1-3 of the model with a bundle per profile; version 1 is the champion."
    ws = Workspace.open(tmp_path/'ws')
    shutil.copy(built['keys'].public_key, ws/'keys'/'trusted.pub')
    reg = Registry(ws, actor='ci')
    for v in (1, 2, 3):
        reg.register(MODEL, built['tmp']/f'm{v}.onnx', metrics={'val/acc': 0.5 + v / 10})
        for p in PROFILES:
            src = tmp_path/'bundles-src'/f'b{v}-{p}'
            shutil.copytree(built['bundles'][v, p], src)
            reg.add_bundle(MODEL, v, src, p)
    reg.promote(MODEL, 1, reason='first')
    issuer = Ed25519PrivateKey.generate()
    (tmp_path/'issuer.pub').write_bytes(issuer.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    (tmp_path/'issuer.key').write_bytes(issuer.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (tmp_path/'issuer.key').chmod(0o600)
    return {'ws': ws, 'reg': reg, 'issuer': issuer, 'tmp': tmp_path,
            'admin': {'Authorization': 'Bearer ' + issue_token(issuer, 'alice', ['fleet:admin'])}}


def config(world, **kw) -> FleetConfig:
    return FleetConfig(kw.pop('db', world['tmp']/'fleet.db'), world['tmp']/'served', workspace=world['ws'],
                       token_keys=[world['tmp']/'issuer.pub'], revocations=world['tmp']/'revoked.txt',
                       **{'tick_s': 0, 'evaluate_every_s': 0, **kw})


# --- a device speaking protocol 1 ----------------------------------------------------------------------------------

class Device:
    "A protocol-1 device client: its own key, enrolment, signed polls and downloads, signed numbered reports."
    def __init__(self, url: str, profile: str, store: str = 'store-1'):
        self.url, self.profile, self.store = url, profile, store
        self.key, self.http = Ed25519PrivateKey.generate(), httpx.Client(base_url=url, timeout=30)
        self.id, self.seq, self.etag, self.running, self.bytes = None, 0, None, None, 0

    def enrol(self, token: str, profile: str | None = None, now: float | None = None) -> httpx.Response:
        r = EnrolRequest(enrolment_token=token, public_key=public_key_text(self.key), profile=profile or self.profile,
                         store=self.store, time=int(now or time.time()), proof='x')
        r = r.model_copy(update={'proof': sign_doc(self.key, r.proof_doc())})
        resp = self.http.post('/v1/enrol', content=r.model_dump_json(), headers=JSON)
        if resp.status_code in (200, 201): self.id = resp.json()['device_id']
        return resp

    def get(self, path: str, now: float | None = None, key=None, **headers) -> httpx.Response:
        return self.http.get(path, headers={**signed_headers(key or self.key, self.id, 'GET', path, now), **headers})

    def poll(self) -> httpx.Response:
        r = self.get(f'/v1/devices/{self.id}/state', **({'If-None-Match': f'"{self.etag}"'} if self.etag else {}))
        if r.status_code == 200: self.etag = r.json()['etag']
        return r

    def report(self, seq: int | None = None, now: float | None = None, key=None, **body) -> httpx.Response:
        if seq is None: self.seq += 1
        rep = Report.make(key or self.key, self.id, seq or self.seq, body, now)
        return self.http.post(f'/v1/devices/{self.id}/reports', content=rep.model_dump_json(exclude_unset=True), headers=JSON)

    def desired(self) -> dict | None:
        r = self.get(f'/v1/devices/{self.id}/state')
        assert r.status_code == 200, r.text
        return r.json()['desired']

    def step(self, refuse: int | None = None) -> None:
        "One agent cycle: poll; download and check a new bundle; switch and report (or refuse version `refuse`)."
        d = self.desired()
        if d is None or (self.running and self.running['sha256'] == d['bundle']['sha256']):
            self.report(running=self.running, health='ok' if self.running else 'unknown', inference_count=10); return
        want = {'model': d['model'], 'version': d['version'], 'sha256': d['bundle']['sha256']}
        if d['version'] == refuse:
            self.report(event='refused', phase='failed', running=self.running, target=want, health='ok', detail='golden set: 1 of 1 outputs differ')
            return
        r = self.get(d['bundle']['url'])
        assert r.status_code == 200 and sha256_bytes(r.content) == d['bundle']['sha256'] == r.headers['x-content-sha256']
        self.bytes += len(r.content)
        self.running = want
        self.report(event='switched', running=want, target=want, health='ok', inference_count=0)


def enrolled(srv, world, n: int, uses: int | None = None) -> list[Device]:
    tok = httpx.post(srv.url + '/v1/admin/enrolment-tokens', json={'model': MODEL, 'uses': uses or n}, headers=world['admin']).json()['token']
    devs = [Device(srv.url, PROFILES[i % 2]) for i in range(n)]
    for d in devs: assert d.enrol(tok).status_code == 201
    return devs


def admin(srv, world, method: str, path: str, **kw) -> httpx.Response:
    return httpx.request(method, srv.url + path, headers=world['admin'], timeout=30, **kw)


def fleet_audit(world, action: str | None = None) -> list:
    return [e for e in Registry(world['ws']).audit(action=action) if e.action.startswith('fleet.')]


# --- the spec -----------------------------------------------------------------------------------------------------

def test_committed_spec_equals_the_code():
    "spec/fleet-openapi.json and spec/fleet-schemas/ are what the code writes now (retail-cv fleet spec --out spec)."
    for rel, data in spec_files().items():
        path = ROOT/'spec'/rel
        assert path.exists() and path.read_bytes() == data, f"{path} is stale: run retail-cv fleet spec --out spec"
    assert 'protocol 1' in (ROOT/'spec'/'fleet-protocol.md').read_text()


def test_fleet_server_imports_no_torch():
    code = 'import sys, retail_cv.fleet, retail_cv.cli._fleet; assert "torch" not in sys.modules, sorted(m for m in sys.modules if "torch" in m)'
    subprocess.run([sys.executable, '-c', code], check=True)


# --- enrolment, desired state, downloads, reports -------------------------------------------------------------------

def test_devices_enrol_poll_download_with_resume_and_report(world):
    with FleetServer(config(world)) as srv:
        devs = enrolled(srv, world, 4)
        assert len({d.id for d in devs}) == 4
        for d in devs:
            r = d.poll()
            assert r.status_code == 200 and r.headers['etag'] == f'"{r.json()["etag"]}"'
            s = r.json()['desired']
            assert (s['model'], s['version'], s['profile'], s['source']) == (MODEL, 1, d.profile, 'release')
            assert d.poll().status_code == 304  # unchanged: the etag answers
        d, s = devs[0], devs[0].desired()
        url, size, sha = s['bundle']['url'], s['bundle']['size'], s['bundle']['sha256']
        whole = d.get(url)
        assert (whole.status_code, len(whole.content), whole.headers['etag'], whole.headers['accept-ranges']) == (200, size, f'"{sha}"', 'bytes')
        verify_bundle_bytes(whole.content, world)  # what devices get is the signed bundle of their profile
        cut = size // 3  # a download cut after a third resumes from there
        rest = d.get(url, Range=f'bytes={cut}-', **{'If-Range': f'"{sha}"'})
        assert (rest.status_code, rest.headers['content-range']) == (206, f'bytes {cut}-{size - 1}/{size}')
        assert sha256_bytes(whole.content[:cut] + rest.content) == sha
        assert d.get(url, Range='bytes=5-', **{'If-Range': '"other"'}).status_code == 200  # changed file: sent whole
        bad = d.get(url, Range=f'bytes={size}-')
        assert (bad.status_code, bad.headers['content-range'], bad.json()['error']) == (416, f'bytes */{size}', 'range_not_satisfiable')
        head = d.http.head(url, headers=signed_headers(d.key, d.id, 'HEAD', url))
        assert (head.status_code, int(head.headers['content-length'])) == (200, size)
        other = devs[1].desired()['bundle']['url']  # devs[1] has the other profile
        r = d.get(other)
        assert (r.status_code, r.json()['error']) == (403, 'profile_mismatch')
        assert d.report(running={'model': MODEL, 'version': 1, 'sha256': sha}, health='ok', inference_count=5).json()['accepted']
        st = admin(srv, world, 'GET', '/v1/admin/status', params={'devices': True}).json()
        assert st['devices'] == 4 and st['by_version'][MODEL] == {'1': 1, 'none': 3} and st['releases'] == {MODEL: 1}


def verify_bundle_bytes(data: bytes, world) -> None:
    p = world['tmp']/'downloaded.tar'
    p.write_bytes(data)
    assert verify_bundle(p, [world['ws']/'keys'/'trusted.pub']).meta.name == MODEL


def test_every_refusal_is_clear_and_audited(world):
    with FleetServer(config(world)) as srv:
        d, other = enrolled(srv, world, 2)
        state = f'/v1/devices/{d.id}/state'
        cases = [
            (d.get(state, key=Ed25519PrivateKey.generate()), 401, 'bad_signature', 'does not verify'),  # forged poll
            (d.get(state, now=time.time() - 3600), 401, 'clock_skew', 'window'),
            (d.get(f'/v1/devices/{other.id}/state'), 403, 'forbidden', 'may not read the state of'),  # another device's state
            (d.report(health='ok', key=Ed25519PrivateKey.generate()), 401, 'bad_signature', 'report signature'),  # forged report
        ]
        assert d.report(seq=5, health='ok').status_code == 200
        cases.append((d.report(seq=5, health='ok'), 409, 'replayed', 'not greater than the last accepted seq 5'))
        cases.append((d.report(seq=4, health='ok'), 409, 'replayed', 'last_seq + 1'))
        stranger = Device(srv.url, PROFILES[0]); stranger.id = 'd-' + '0' * 24
        cases.append((stranger.get(f'/v1/devices/{stranger.id}/state'), 401, 'unknown_device', 'not enrolled'))
        cases.append((stranger.report(health='ok'), 401, 'unknown_device', 'not enrolled'))
        pinned = admin(srv, world, 'POST', '/v1/admin/enrolment-tokens', json={'model': MODEL, 'profile': PROFILES[0]}).json()['token']
        cases.append((Device(srv.url, PROFILES[1]).enrol(pinned), 403, 'profile_mismatch', f"is for profile '{PROFILES[0]}'"))
        cases.append((Device(srv.url, PROFILES[0]).enrol('rcve_' + 'x' * 43), 401, 'bad_enrolment_token', 'not known'))
        assert admin(srv, world, 'POST', f'/v1/admin/devices/{other.id}/revoke', json={'reason': 'stolen'}).status_code == 200
        cases.append((other.get(f'/v1/devices/{other.id}/state'), 401, 'revoked_device', 'stolen'))
        bob = issue_token(world['issuer'], 'bob', ['admin'])
        (world['tmp']/'revoked.txt').write_text(json.loads(__import__('base64').urlsafe_b64decode(bob.split('.')[1] + '=='))['jti'] + '\n')
        cases.append((httpx.get(srv.url + '/v1/admin/status', headers={'Authorization': f'Bearer {bob}'}), 401, 'unauthorized', 'revoked'))
        cases.append((httpx.get(srv.url + '/v1/admin/status'), 401, 'unauthorized', 'no bearer token'))
        cases.append((httpx.post(srv.url + f'/v1/devices/{d.id}/reports', json={'seq': 'x'}), 400, 'bad_request', 'device_id'))
        for r, status, code, words in cases:
            assert (r.status_code, r.json()['error']) == (status, code), r.text
            assert words in r.json()['detail'], r.json()['detail']
        denied = [e for e in fleet_audit(world) if e.outcome == 'denied']
        assert len(denied) == len(cases)  # every refusal is in the registry's audit log, with its reason
        assert {e.actor for e in denied} >= {d.id, 'unknown', other.id}
        assert Registry(world['ws']).verify().ok


# --- rollouts -----------------------------------------------------------------------------------------------------

def run_until(devs, pred, refuse=None, rounds=30):
    for _ in range(rounds):
        for d in devs: d.step(refuse)
        if pred(): return
    raise AssertionError('the fleet did not get there')


def test_three_stage_rollout_reaches_every_device_with_its_profiles_bundle(world):
    with FleetServer(config(world)) as srv:
        devs = enrolled(srv, world, 20)
        run_until(devs, lambda: all(d.running and d.running['version'] == 1 for d in devs))
        world['reg'].promote(MODEL, 2, reason='better')  # the new champion reaches devices only by a rollout
        before = [d.bytes for d in devs]
        r = admin(srv, world, 'POST', '/v1/admin/rollouts', json={'ref': f'{MODEL}@2', 'stages': [5, 25, 100], 'min_healthy': 0.98, 'soak_s': 0})
        assert r.status_code == 201, r.text
        rid = r.json()['id']
        # the canaries: per profile, the first device by the hash of its id
        want = {canary_order([d.id for d in devs if d.profile == p])[0] for p in PROFILES}
        assert {d.id for d in devs if d.desired()['version'] == 2} == want
        def stage(): return admin(srv, world, 'GET', f'/v1/admin/rollouts/{rid}').json()
        run_until(devs, lambda: stage()['state'] == 'completed')
        ro = stage()
        assert [s['state'] for s in ro['stages']] == ['passed'] * 3 and [s['devices'] for s in ro['stages']] == [2, 4, 14]
        expected = {p: Registry(world['ws']).get(MODEL, 2).bundles for p in PROFILES}
        assert expected  # each device runs the bundle built for its own profile
        shas = {d.profile: d.running['sha256'] for d in devs}
        assert len(set(shas.values())) == 2 and all(d.running == {'model': MODEL, 'version': 2, 'sha256': shas[d.profile]} for d in devs)
        sizes = {d.profile: d.desired()['bundle']['size'] for d in devs}
        assert all(d.bytes - b == sizes[d.profile] for d, b in zip(devs, before))  # one bundle's bytes per device
        st = admin(srv, world, 'GET', '/v1/admin/status').json()
        assert st['releases'] == {MODEL: 2} and st['by_version'][MODEL] == {'2': 20}
        page = httpx.get(srv.url + '/fleet', headers=world['admin']).text
        assert rid in page and 'completed' in page
        actions = [e.action for e in fleet_audit(world)]
        assert actions.count('fleet.stage') == 2 and 'fleet.rollout_completed' in actions and 'fleet.rollout' in actions


def test_the_fleet_page_written_by_the_cli_shows_rollout_progress_in_chromium(world, tmp_path, artifacts):
    "`GET /fleet` needs the admin token, which a browser cannot send: `fleet status --html` writes the page to a file."
    from test_docs import CHROME_FLAGS, CHROMIUM
    assert CHROMIUM, "Debian package 'chromium' is not installed (scripts/system-deps.sh installs it)"
    page, token = tmp_path/'fleet.html', world['admin']['Authorization'][7:]
    with FleetServer(config(world)) as srv:
        devs = enrolled(srv, world, 4)
        run_until(devs, lambda: all(d.running for d in devs))
        world['reg'].promote(MODEL, 2, reason='better')
        rid = admin(srv, world, 'POST', '/v1/admin/rollouts', json={'ref': f'{MODEL}:2', 'stages': [50, 100], 'soak_s': 3600}).json()['id']
        for d in devs: d.step()  # the canaries switch and report healthy; the stage soaks for an hour
        assert httpx.get(srv.url + '/fleet').status_code == 401  # the page itself stays protected
        r = subprocess.run([CLI, 'fleet', 'status', '--html', str(page)], capture_output=True, text=True, timeout=60,
                           env={**os.environ, 'RETAIL_CV_FLEET_URL': srv.url, 'RETAIL_CV_FLEET_TOKEN': token})
        assert r.returncode == 0, r.stderr
    assert token not in page.read_text() and 'wrote the fleet page' in r.stderr
    args = [CHROMIUM, *CHROME_FLAGS, f'--user-data-dir={tmp_path}/chrome']
    dom = subprocess.run([*args, '--dump-dom', page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert f'{rid}: {MODEL}:2 (from 1)' in dom and "<span class=\"active\">active</span>" in dom
    # stage 0 (one device of each profile) healthy and soaking, a full bar; stage 1 still pending, an empty one
    assert '<td>0 (50%)</td><td>active</td><td><div class="bar"><div style="width:100%"></div></div> 2/2</td>' in dom, dom
    assert '<td>1 (100%)</td><td>pending</td><td><div class="bar"><div style="width:0%"></div></div> 0/0</td>' in dom, dom
    shot = artifacts/'fleet-page.png'
    shot.unlink(missing_ok=True)
    subprocess.run([*args, '--window-size=1000,800', f'--screenshot={shot}', page.as_uri()], capture_output=True, timeout=120)
    with Image.open(shot) as im: assert im.size == (1000, 800) and len(set(im.convert('L').resize((50, 40)).tobytes())) > 5


def test_polls_from_the_cached_view_see_each_change_at_the_next_poll(world):
    "Rollout evaluation and view expiry an hour away: polls are answered from the model's cached view, so a missed invalidation would show."
    with FleetServer(config(world, evaluate_every_s=3600, view_ttl_s=3600)) as srv:
        devs = enrolled(srv, world, 4)
        run_until(devs, lambda: all(d.running for d in devs))
        assert all(d.poll().status_code == 200 for d in devs) and all(d.poll().status_code == 304 for d in devs)  # then unchanged
        world['reg'].promote(MODEL, 2, reason='better')
        assert all(d.poll().status_code == 304 for d in devs)  # a promotion reaches devices only by a rollout
        rid = admin(srv, world, 'POST', '/v1/admin/rollouts', json={'ref': f'{MODEL}:2', 'stages': [50, 100], 'soak_s': 3600}).json()['id']
        first = {canary_order([d.id for d in devs if d.profile == p])[0] for p in PROFILES}
        canaries, others = [d for d in devs if d.id in first], [d for d in devs if d.id not in first]
        answers = [d.poll() for d in canaries]
        assert all(r.status_code == 200 and (r.json()['desired']['version'], r.json()['desired']['source']) == (2, 'rollout') for r in answers)
        assert all(d.poll().status_code == 304 for d in others)  # their desired state did not change
        assert admin(srv, world, 'POST', f'/v1/admin/rollouts/{rid}/abort', json={'reason': 'wrong build'}).status_code == 200
        answers = [d.poll() for d in canaries]
        assert all(r.status_code == 200 and (r.json()['desired']['version'], r.json()['desired']['source']) == (1, 'rollback') for r in answers)
        assert admin(srv, world, 'POST', f'/v1/admin/devices/{others[0].id}/revoke', json={'reason': 'stolen'}).status_code == 200
        r = others[0].poll()
        assert (r.status_code, r.json()['error']) == (401, 'revoked_device') and others[1].poll().status_code == 304
        forged = others[1].get(f'/v1/devices/{others[1].id}/state', key=Ed25519PrivateKey.generate())
        assert (forged.status_code, forged.json()['error']) == (401, 'bad_signature')
        assert [e.outcome for e in fleet_audit(world, 'fleet.request')][-2:] == ['denied', 'denied']  # refusals audited, as on the slow path


def test_failing_canaries_halt_the_rollout_and_roll_back(world):
    with FleetServer(config(world)) as srv:
        devs = enrolled(srv, world, 10)
        run_until(devs, lambda: all(d.running for d in devs))
        world['reg'].promote(MODEL, 2, reason='better')  # the new champion reaches devices only by a rollout
        rid = admin(srv, world, 'POST', '/v1/admin/rollouts', json={'ref': f'{MODEL}:2', 'stages': [10, 100], 'soak_s': 0}).json()['id']
        canaries = [d for d in devs if d.desired()['version'] == 2]
        assert len(canaries) == 2
        for d in devs: d.step(refuse=2)  # the canaries refuse version 2 (golden check); the others keep version 1
        ro = admin(srv, world, 'GET', f'/v1/admin/rollouts/{rid}').json()
        assert ro['state'] == 'failed' and 'golden set' in ro['reason']
        assert all(d.running['version'] == 1 for d in devs)  # no device runs it, no device outside the canary was offered it
        assert all((d.desired()['version'], d.desired()['source']) == (1, 'rollback') for d in canaries)
        assert all(d.desired()['source'] == 'release' for d in devs if d not in canaries)
        failed = fleet_audit(world, 'fleet.rollout_failed')
        assert len(failed) == 1 and failed[0].actor == 'fleet-server' and 'golden set' in failed[0].reason


def test_a_stage_over_its_error_budget_never_advances_and_a_watchdog_rollback_fails_it(world):
    with FleetServer(config(world)) as srv:
        devs = enrolled(srv, world, 4)
        run_until(devs, lambda: all(d.running for d in devs))
        world['reg'].promote(MODEL, 2, reason='better')  # the new champion reaches devices only by a rollout
        rid = admin(srv, world, 'POST', '/v1/admin/rollouts', json={'ref': f'{MODEL}:2', 'stages': [25, 100], 'soak_s': 3600, 'max_error_rate': 0.01}).json()['id']
        canaries = [d for d in devs if d.desired()['version'] == 2]
        for d in canaries: d.step()
        for d in canaries: d.report(running=d.running, health='ok', inference_count=100, inference_errors=20)
        assert admin(srv, world, 'GET', f'/v1/admin/rollouts/{rid}').json()['stage'] == 0
        old = {'model': MODEL, 'version': 1, 'sha256': 'x'}
        for d in canaries: d.report(event='rolled_back', phase='rolled_back', running=old | {'sha256': d.running['sha256']}, target=d.running, detail='error budget exceeded: 20 of 100')
        ro = admin(srv, world, 'GET', f'/v1/admin/rollouts/{rid}').json()
        assert ro['state'] == 'failed' and 'error budget' in ro['reason']


def test_only_gated_versions_whose_bundles_verify_roll_out(world):
    with FleetServer(config(world)) as srv:
        assert enrolled(srv, world, 2)[0].desired()['version'] == 1  # the fleet's release: the champion when first asked
        r = admin(srv, world, 'POST', '/v1/admin/rollouts', json={'ref': f'{MODEL}:2'})
        assert (r.status_code, r.json()['error']) == (409, 'conflict') and 'not passed the registry gate' in r.json()['detail']
        world['reg'].promote(MODEL, 2, reason='better')
        model = Path(Registry(world['ws']).get(MODEL, 2).bundles[0].path)/'model.onnx'
        model.write_bytes(model.read_bytes()[:-1] + b'\0')  # tampered after registration
        r = admin(srv, world, 'POST', '/v1/admin/rollouts', json={'ref': f'{MODEL}:2'})
        assert r.status_code == 409 and 'cannot be rolled out' in r.json()['detail'] and 'model.onnx was changed' in r.json()['detail']
        denied = [e for e in fleet_audit(world, 'fleet.rollout') if e.outcome == 'denied']
        assert len(denied) == 2 and {e.actor for e in denied} == {'alice'}


def test_pause_resume_abort_and_store_windows(world):
    with FleetServer(config(world)) as srv:
        devs = enrolled(srv, world, 4)
        run_until(devs, lambda: all(d.running for d in devs))
        world['reg'].promote(MODEL, 2, reason='better')  # the new champion reaches devices only by a rollout
        h = time.gmtime(time.time() + 3 * 3600).tm_hour  # a window that is closed now
        r = admin(srv, world, 'POST', '/v1/admin/rollouts', json={'ref': f'{MODEL}:2', 'stages': [50, 100], 'soak_s': 0,
                                                                 'windows': {'store-1': f'{h:02d}:00-{(h + 1) % 24:02d}:00'}}).json()
        rid = r['id']
        assert all(d.desired()['version'] == 1 for d in devs)  # the store's window is closed: nobody switches yet
        canary = next(d for d in devs if d.id == canary_order([e.id for e in devs if e.profile == d.profile])[0])  # in stage 0
        assert 'waiting for the store window' in canary.get(f'/v1/devices/{canary.id}/state').json()['reason']
        assert admin(srv, world, 'POST', f'/v1/admin/rollouts/{rid}/pause', json={'reason': 'inventory day'}).json()['state'] == 'paused'
        assert admin(srv, world, 'POST', f'/v1/admin/rollouts/{rid}/pause', json={'reason': 'x'}).status_code == 409
        assert admin(srv, world, 'POST', f'/v1/admin/rollouts/{rid}/resume', json={'reason': 'done'}).json()['state'] == 'active'
        assert admin(srv, world, 'POST', f'/v1/admin/rollouts/{rid}/abort', json={'reason': 'wrong build'}).json()['state'] == 'aborted'
        assert [e.action for e in fleet_audit(world)][-4:] == ['fleet.pause', 'fleet.pause', 'fleet.resume', 'fleet.abort']
        assert all(e.actor == 'alice' for e in fleet_audit(world)[-4:])


# --- a real server process, restarted mid-rollout -------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


def _start(world, port: int) -> subprocess.Popen:
    cmd = [CLI, '-w', str(world['ws'].root), 'fleet', 'serve', '--db', str(world['tmp']/'fleet.db'), '--bundles', str(world['tmp']/'served'),
           '--port', str(port), '--token-keys', str(world['tmp']/'issuer.pub'), '--tick', '1']
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for _ in range(300):
        try:
            if httpx.get(f'http://127.0.0.1:{port}/healthz').status_code == 200: return proc
        except httpx.TransportError: time.sleep(0.1)
        assert proc.poll() is None, proc.stdout.read()
    raise AssertionError('fleet server did not start')


def test_a_server_killed_mid_rollout_continues_from_its_stored_state(world):
    port = _free_port()
    env = {**os.environ, 'RETAIL_CV_FLEET_URL': f'http://127.0.0.1:{port}', 'RETAIL_CV_FLEET_TOKEN': world['admin']['Authorization'][7:]}
    cli = lambda *a: subprocess.run([CLI, 'fleet', *a], capture_output=True, text=True, env=env, timeout=60)
    proc = _start(world, port)
    try:
        class Srv: url = f'http://127.0.0.1:{port}'
        devs = enrolled(Srv, world, 6)
        run_until(devs, lambda: all(d.running for d in devs))
        world['reg'].promote(MODEL, 2, reason='better')  # the new champion reaches devices only by a rollout
        r = cli('rollout', f'{MODEL}@2', '--stages', '34,100', '--min-healthy', '1', '--soak', '0s', '--json')
        assert r.returncode == 0, r.stderr
        rid = json.loads(r.stdout)['id']
        canaries = [d for d in devs if d.desired()['version'] == 2]
        for d in canaries: d.step()
        proc.send_signal(signal.SIGKILL); proc.wait()  # killed after the canaries switched, before the server saw them soak
        proc = _start(world, port)
        status = lambda: json.loads(cli('status', '--json').stdout)
        assert (status()['rollouts'][0]['id'], status()['rollouts'][0]['state']) == (rid, 'active')  # mid-rollout, from the stored state
        run_until(devs, lambda: status()['rollouts'][0]['state'] == 'completed')
        assert all(d.running['version'] == 2 for d in devs) and status()['releases'] == {MODEL: 2}
        text = cli('status').stdout
        assert rid in text and 'completed' in text
    finally:
        proc.terminate(); proc.wait(10)


# --- the store: PostgreSQL, migrations ------------------------------------------------------------------------------

def test_fleet_on_postgresql(world, postgres_url):
    "A database created by migration 1 is upgraded by the current code; then the whole protocol runs on PostgreSQL."
    import psycopg2
    with psycopg2.connect(postgres_url) as conn, conn.cursor() as cur:
        cur.execute('DROP SCHEMA public CASCADE; CREATE SCHEMA public')
    old = Database(postgres_url, upto=1)
    with old.tx() as t: t.run("INSERT INTO releases VALUES ('other', 7, NULL, 0, 'x', 'test')")
    old.close()
    with FleetServer(config(world, db=postgres_url)) as srv:
        assert srv.fleet.db.version == 2
        devs = enrolled(srv, world, 4)
        assert devs[0].report(seq=3, health='ok').status_code == 200
        assert devs[0].report(seq=3, health='ok').json()['error'] == 'replayed'
        run_until(devs, lambda: all(d.running for d in devs))
        world['reg'].promote(MODEL, 2, reason='better')  # the new champion reaches devices only by a rollout
        rid = admin(srv, world, 'POST', '/v1/admin/rollouts', json={'ref': f'{MODEL}:2', 'stages': [50, 100], 'soak_s': 0}).json()['id']
        run_until(devs, lambda: admin(srv, world, 'GET', f'/v1/admin/rollouts/{rid}').json()['state'] == 'completed')
        assert admin(srv, world, 'GET', '/v1/admin/status').json()['releases'] == {'other': 7, MODEL: 2}


def test_fleet_without_registry_audits_into_its_own_store(tmp_path):
    cfg = FleetConfig(tmp_path/'fleet.db', tmp_path/'served', tick_s=0)
    with FleetServer(cfg) as srv:
        d = Device(srv.url, PROFILES[0]); d.id = 'd-' + '1' * 24
        assert d.get(f'/v1/devices/{d.id}/state').json()['error'] == 'unknown_device'
        entries = srv.fleet.audit.entries()
        assert [(e['actor'], e['outcome']) for e in entries] == [(d.id, 'denied')] and 'not enrolled' in entries[0]['reason']
