"""Fleet delivery end to end, as issue 14's "Done when" asks: real `retail-cv agent --server` processes of two device
profiles, each in its own device folder, against a real fleet server on loopback whose registry holds one signed bundle
per profile and version. A three-stage rollout to 50 agents with downloads cut by SIGKILL and resumed (bytes counted
per device at the server's ASGI boundary, since the server keeps no such counter); a bundle that fails the golden check
on the devices; a bundle over its error budget after the switch; `retail-cv fleet serve` killed and restarted mid-rollout.

Every wait is a safety timeout around a condition (`_wait`), never a sleep standing in for an assertion."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import re
import signal
import socket
import sqlite3
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from retail_cv.agent import LOG_LINE, Agent, Counters, WatchdogPolicy, apply_bundle, init_device, read_state, recover, write_counters
from retail_cv.bundle import public_key_id, sign_bundle, verify_bundle
from retail_cv.core import Workspace, sha256_file

from conftest import CLI, ROOT, run_cli

MODEL = 'shelf'
PROFILES = ('shelf-cam-x86', 'handheld-arm')


def _load_make_vectors():
    spec = importlib.util.spec_from_file_location('make_vectors', ROOT/'spec'/'make_vectors.py')
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    return mod

mv = _load_make_vectors()  # the deterministic bundle and key makers of the conformance vectors


# ---- helpers ----------------------------------------------------------------------------------------------------

def _wait(cond, timeout: float = 120, what: str = 'condition', every: float = 0.05):
    "Poll `cond` until it is truthy and return its value (a safety timeout, not a measurement)."
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if (v := cond()): return v
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _bundle(out: Path, version: int, profile: str, pad: int = 0, golden_off: bool = False) -> Path:
    "A signed bundle archive of `shelf` `version` for `profile`; `golden_off`: signed, but its recorded golden outputs are wrong."
    if not golden_off: return mv.make_bundle(out.with_suffix('.tar'), mv.key('root'), str(version), profile=profile, pad=pad)
    folder = mv.make_bundle(out, mv.key('root'), str(version), profile=profile, pad=pad)
    mv._golden_off(folder); sign_bundle(folder, mv.key('root'))  # verifies on the server; the device's golden run disagrees
    return mv.pack(folder, out.with_suffix('.tar'))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _phases(log: Path, pid: int) -> list[str]:
    "The phases process `pid` announced in a device's agent.log."
    return [m['phase'] for m in LOG_LINE.finditer(log.read_text()) if int(m['pid']) == pid] if log.exists() else []


def _canaries(ids: dict[str, str], stages: list[int]) -> dict[str, int]:
    "Device id -> its stage, by the spec's rule (§8): per profile, by sha256 of the id, ceil(p/100 × n) devices (at least one)."
    out: dict[str, int] = {}
    for profile in PROFILES:
        mine = sorted((d for d, p in ids.items() if p == profile), key=lambda d: hashlib.sha256(d.encode()).hexdigest())
        for k, pct in reversed(list(enumerate(stages))):
            for d in mine[:max(1, math.ceil(pct * len(mine) / 100))]: out[d] = k
    return out


class Agents:
    "Real `retail-cv agent` processes, one per device folder; every one still running is stopped (SIGTERM, then SIGKILL) at exit."
    def __init__(self): self.procs: dict[Path, subprocess.Popen] = {}

    def start(self, dev: Path, *args: str) -> subprocess.Popen:
        p = self.procs[dev] = subprocess.Popen([CLI, 'agent', '--device', str(dev), *args], stdout=subprocess.DEVNULL,
                                               stderr=open(dev/'stderr.txt', 'ab'))
        return p

    def alive(self) -> bool:
        "True while every agent runs; an agent that exited fails the test with its stderr (not a timeout later)."
        for dev, p in self.procs.items():
            if p.poll() is not None: raise AssertionError(f"the agent of {dev.name} exited with {p.returncode}: {(dev/'stderr.txt').read_text()[-1500:]}")
        return True

    def kill(self, dev: Path) -> int:
        "SIGKILL the device's agent; its pid."
        p = self.procs.pop(dev); p.kill(); p.wait()
        return p.pid

    def stop(self) -> dict[Path, int]:
        "SIGTERM every agent (a clean stop after the current step); their exit codes."
        for p in self.procs.values(): p.send_signal(signal.SIGTERM)
        codes = {}
        for dev, p in self.procs.items():
            try: codes[dev] = p.wait(timeout=60)
            except subprocess.TimeoutExpired: p.kill(); codes[dev] = p.wait()
        self.procs.clear()
        return codes

    def __enter__(self): return self
    def __exit__(self, *exc): self.stop()


class ByteCounter:
    "ASGI middleware around the real fleet app: each bundle response's status, Range and body bytes sent, per device."
    def __init__(self, app):
        self.app, self.served = app, []

    async def __call__(self, scope, receive, send):
        if scope['type'] != 'http' or scope['method'] != 'GET' or not scope['path'].startswith('/v1/bundles/'):
            return await self.app(scope, receive, send)
        h = {k.decode('latin-1').lower(): v.decode('latin-1') for k, v in scope['headers']}
        rec = {'device': h.get('x-fleet-device'), 'sha256': scope['path'].rsplit('/', 1)[-1], 'range': h.get('range'), 'status': None, 'bytes': 0}
        self.served.append(rec)
        async def counting(msg):
            await send(msg)  # counted once handed to the connection
            if msg['type'] == 'http.response.start': rec['status'] = msg['status']
            elif msg['type'] == 'http.response.body': rec['bytes'] += len(msg.get('body', b''))
        await self.app(scope, receive, counting)

    def of(self, device: str, sha256: str) -> list[dict]: return [r for r in self.served if r['device'] == device and r['sha256'] == sha256]


@pytest.fixture(scope='module')
def kit(tmp_path_factory):
    "A workspace whose registry holds `shelf` versions 1-5, each with one bundle per profile, every one past the gate; v1 is the champion."
    from retail_cv.registry import Registry
    root = tmp_path_factory.mktemp('e2e')
    ws = Workspace.open(root/'ws')
    (ws/'keys'/'root.pub').write_bytes(mv.public_pem('root'))
    reg = Registry(ws)
    sha, paths = {}, {}
    for v in range(1, 6):
        (root/f'm{v}.onnx').write_bytes(mv.tiny_onnx(v))
        reg.register(MODEL, root/f'm{v}.onnx', metrics={'val/acc': 0.80 + v / 100})
        for profile in PROFILES:
            # v2 is 8 MB, so a download lasts long enough to be cut; v3's golden outputs are wrong (it verifies, it fails on devices)
            b = _bundle(root/'bundles'/f'{profile}-{v}', v, profile, pad=2_000_000 if v == 2 else 0, golden_off=v == 3)
            reg.add_bundle(MODEL, v, b, profile)
            paths[v, profile], sha[v, profile] = b, sha256_file(b)
        if v == 1: reg.promote(MODEL, 1, reason='first release')  # the fleet's first release is the champion
        else: reg.promote(MODEL, v, alias='candidate', reason=f'v{v} passed evaluation')  # the gate passed; champion stays v1
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    issuer = Ed25519PrivateKey.generate()
    from retail_cv.credentials import issue_token
    return dict(root=root, ws=ws, reg=reg, sha=sha, paths=paths, pub=ws/'keys'/'root.pub', keys={public_key_id(mv.key('root')): mv.key('root').public_key()},
                issuer=issuer, admin_token=issue_token(issuer, 'alice', ['admin']))


def _admin(kit) -> dict: return {'Authorization': f"Bearer {kit['admin_token']}"}


def _enrol_tokens(url: str, kit, uses: int) -> dict[str, str]:
    "One enrolment token per profile, pinning it."
    out = {}
    for profile in PROFILES:
        r = httpx.post(url + '/v1/admin/enrolment-tokens', json={'model': MODEL, 'profile': profile, 'uses': uses}, headers=_admin(kit))
        assert r.status_code == 201, r.text
        out[profile] = r.json()['token']
    return out


def _devices(root: Path, kit, n: int) -> dict[Path, str]:
    "`n` device folders, alternating profiles: folder -> profile."
    out = {}
    for i in range(n):
        profile = PROFILES[i % 2]
        init_device(root/f'dev-{i:02d}', profile, kit['pub'])
        out[root/f'dev-{i:02d}'] = profile
    return out


def _device_id(dev: Path) -> str | None:
    try: return json.loads((dev/'fleet.json').read_text())['device_id']
    except (FileNotFoundError, ValueError, KeyError): return None


def _running(dev: Path) -> str | None:
    "The version the device runs once its state is settled (idle or on probation), else None."
    try: st = read_state(dev)
    except Exception: return None  # noqa: BLE001 - half-written while the agent starts: not settled
    return st.current.version if st.current and st.phase in ('idle', 'watch') else None


def _rollout(url: str, kit, rid: str) -> dict:
    r = httpx.get(f'{url}/v1/admin/rollouts/{rid}', headers=_admin(kit), timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def _check_runs(dev: Path, profile: str, version: int, kit) -> None:
    "The device's `current` verifies, is the bundle built for its profile, and the state names that bundle's sha256."
    info = verify_bundle(dev/'current', kit['keys'])
    ref = verify_bundle(kit['paths'][version, profile], kit['keys'])
    st = read_state(dev)
    assert (info.version, info.meta.profile, dict(info.files)) == (str(version), profile, dict(ref.files)), dev
    assert (st.current.version, st.current.sha256) == (str(version), kit['sha'][version, profile]), dev


def _switch_times(log: Path, version: int) -> list[str]:
    "ISO times of the device's switches to `version`."
    return [line.split(' ', 1)[0] for line in log.read_text().splitlines() if f'phase=switch version={version} ' in line + ' ']


# ---- 1. a three-stage rollout to 50 agents ----------------------------------------------------------------------

def test_three_stage_rollout_to_50_agents_with_cut_downloads(tmp_path, kit):
    "50 agents (25 per profile) run v1; `retail-cv fleet rollout shelf@2 --stages 5,25,100` reaches 100 %; each device runs its profile's bundle; SIGKILLs mid-download resume."
    from retail_cv.fleet import FleetConfig, FleetServer
    cfg = FleetConfig(tmp_path/'fleet.db', tmp_path/'published', workspace=kit['ws'], token_keys=[kit['issuer'].public_key()],
                      poll_interval_s=1, tick_s=0.5)
    srv = FleetServer(cfg)
    counter = srv.server.config.app = ByteCounter(srv.app)  # the real app, its bundle bytes counted on the way out
    devs = _devices(tmp_path, kit, 50)
    with srv, Agents() as agents:
        tokens = _enrol_tokens(srv.url, kit, 25)
        args = lambda dev: ('--server', srv.url, '--enrol-token', tokens[devs[dev]], '--interval', '0.2', '--grace', '0')
        for dev in devs: agents.start(dev, *args(dev))
        _wait(lambda: agents.alive() and all(_running(d) == '1' for d in devs), 240, 'all 50 agents running v1', every=0.2)
        ids = {_device_id(d): devs[d] for d in devs}
        by_id = {_device_id(d): d for d in devs}
        stage_of = _canaries(ids, [5, 25, 100])
        # cut candidates: two devices per profile of the last stage, killed while their v2 download is under way
        cut = [d for p in PROFILES for d in [by_id[i] for i in sorted(ids) if stage_of[i] == 2 and ids[i] == p][:2]]
        r = run_cli('fleet', 'rollout', f'{MODEL}@2', '--stages', '5,25,100', '--min-healthy', '0.98', '--soak', '1s', '--server', srv.url,
                    '--json', '--reason', 'e2e', env={'RETAIL_CV_FLEET_TOKEN': kit['admin_token'], 'RETAIL_CV_WORKSPACE': str(kit['ws'].root)})
        assert r.returncode == 0, r.stderr
        rid = json.loads(r.stdout)['id']
        cuts: dict[Path, int] = {}  # device -> bytes its .part held when the agent was killed
        missed: set[Path] = set()  # killed, but the download had finished meanwhile

        def progress():
            for dev in cut:
                if dev in cuts or dev in missed: continue
                part, total = dev/'downloads'/f"{kit['sha'][2, devs[dev]]}.tar.part", kit['paths'][2, devs[dev]].stat().st_size
                if 0 < (part.stat().st_size if part.exists() else 0) < total:
                    pid = agents.kill(dev)
                    if 0 < (n := part.stat().st_size if part.exists() else 0) < total:
                        cuts[dev] = n
                        assert _phases(dev/'agent.log', pid)[-1:] == ['download'], (dev, _phases(dev/'agent.log', pid))
                    else: missed.add(dev)
                    agents.start(dev, *args(dev))
            if time.monotonic() < checked[0] + 0.2 or not agents.alive(): return False  # the .part files every few ms, the server five times a second
            checked[0] = time.monotonic()
            return _rollout(srv.url, kit, rid)['state'] != 'active'
        checked = [0.0]
        _wait(progress, 240, 'the rollout to finish', every=0.002)
        ro = _rollout(srv.url, kit, rid)
        status = httpx.get(srv.url + '/v1/admin/status', headers=_admin(kit)).json()
        codes = agents.stop()
    assert ro['state'] == 'completed', ro
    assert [s['devices'] for s in ro['stages']] == [4, 10, 36] and all(s['state'] == 'passed' for s in ro['stages']), ro['stages']
    assert status['releases'][MODEL] == 2 and status['by_version'][MODEL] == {'2': 50}, status
    assert set(codes.values()) == {0}, {d.name: c for d, c in codes.items() if c}
    for dev, profile in devs.items(): _check_runs(dev, profile, 2, kit)
    # stage order: every device of a stage switched after every device of the stages before it
    first = {d: min(_switch_times(by_id[d]/'agent.log', 2)) for d in ids}
    for k in (1, 2):
        assert max(first[d] for d in ids if stage_of[d] == k - 1) < min(first[d] for d in ids if stage_of[d] == k), k
    # bytes per device: one whole download each, except the cut ones, which resumed where their .part ended
    assert len(cuts) >= 2, f"no download was cut mid-way (cut: {len(cuts)} of {len(cut)} tried)"
    ratios = {}
    for did, profile in ids.items():
        for v in (1, 2):
            size, got = kit['paths'][v, profile].stat().st_size, counter.of(did, kit['sha'][v, profile])
            if by_id[did] in missed and v == 2: continue
            if v == 1 or by_id[did] not in cuts:
                assert [(g['status'], g['range'], g['bytes']) for g in got] == [(200, None, size)], (did, v, got)
                continue
            n = cuts[by_id[did]]
            cut_req, resumed = got  # the request the kill cut, and the one after the restart: from byte n on, n + (size - n) on disk
            assert (cut_req['status'], cut_req['range']) == (200, None) and cut_req['bytes'] >= n, got
            assert (resumed['status'], resumed['range'], resumed['bytes']) == (206, f'bytes={n}-', size - n), got
            assert f"resumes at byte {n} of {size}" in (by_id[did]/'agent.log').read_text()
            ratios[did] = (cut_req['bytes'] + resumed['bytes']) / size
        other = kit['sha'][2, PROFILES[1 - PROFILES.index(profile)]]
        assert not counter.of(did, other)  # never the other profile's bundle
    print(f"cut {len(cuts)} downloads at bytes {sorted(cuts.values())} ({len(missed)} kills came too late); bytes sent / bundle size "
          f"for them {sorted(round(r, 2) for r in ratios.values())} (what sat in socket buffers at the kill counts as sent)")


# ---- 2 and 3: a smaller fleet on `retail-cv fleet serve` --------------------------------------------------------

class ServeProcess:
    "`retail-cv fleet serve` as a process on a fixed port and database, which can be killed and started again."
    def __init__(self, root: Path, kit):
        self.root, self.kit, self.port, self.proc = root, kit, _free_port(), None
        (root/'issuer.pub').write_bytes(_pem(kit['issuer'].public_key()))

    @property
    def url(self) -> str: return f'http://127.0.0.1:{self.port}'

    def start(self) -> ServeProcess:
        self.proc = subprocess.Popen([CLI, 'fleet', 'serve', '--db', str(self.root/'fleet.db'), '--bundles', str(self.root/'published'),
                                      '--port', str(self.port), '--token-keys', str(self.root/'issuer.pub'), '--poll-interval', '1', '--tick', '0.5'],
                                     env={**os.environ, 'RETAIL_CV_WORKSPACE': str(self.kit['ws'].root)}, stdout=subprocess.DEVNULL,
                                     stderr=open(self.root/'serve.log', 'ab'))
        def up():
            assert self.proc.poll() is None, (self.root/'serve.log').read_text()[-2000:]
            try: return httpx.get(self.url + '/healthz', timeout=2).status_code == 200
            except httpx.HTTPError: return False
        _wait(up, 60, 'the fleet server to answer')
        return self

    def kill(self) -> None: self.proc.kill(); self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try: self.proc.wait(20)
            except subprocess.TimeoutExpired: self.proc.kill(); self.proc.wait()


def _pem(public_key) -> bytes:
    from cryptography.hazmat.primitives import serialization
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.fixture(scope='module')
def small_fleet(tmp_path_factory, kit):
    "10 devices (5 per profile) installed with v1 at the factory, their agents enrolled with a `retail-cv fleet serve` process."
    root = tmp_path_factory.mktemp('small')
    srv = ServeProcess(root, kit).start()
    devs = _devices(root, kit, 10)
    for dev, profile in devs.items():  # the factory install: what `retail-cv agent install` does, in this process
        agent = recover(Agent.open(dev, WatchdogPolicy(grace_s=0)))
        assert apply_bundle(agent, kit['paths'][1, profile], kit['sha'][1, profile], 'install:factory').ok
    agents = Agents()
    try:
        tokens = _enrol_tokens(srv.url, kit, 5)
        args = lambda dev: ('--server', srv.url, '--enrol-token', tokens[devs[dev]], '--interval', '0.1', '--grace', '60', '--max-errors', '2')
        for dev in devs: agents.start(dev, *args(dev))

        def seen():
            listed = httpx.get(srv.url + '/v1/admin/status', params={'devices': True}, headers=_admin(kit)).json()['device_list']
            return len(listed) == 10 and all(d['running_version'] == 1 and d['health'] == 'ok' for d in listed)
        _wait(lambda: agents.alive() and seen(), 120, 'all 10 devices reporting v1')
        ids = {_device_id(d): devs[d] for d in devs}
        yield dict(srv=srv, devs=devs, ids=ids, by_id={_device_id(d): d for d in devs}, agents=agents, args=args, root=root)
    finally:
        agents.stop(); srv.stop()


def _start(fleet, kit, version: int, stages: str, soak: str) -> str:
    r = httpx.post(fleet['srv'].url + '/v1/admin/rollouts', headers=_admin(kit), timeout=60,
                   json={'ref': f'{MODEL}:{version}', 'stages': [int(s) for s in stages.split(',')], 'min_healthy': 0.98,
                         'soak_s': int(soak), 'reason': f'e2e v{version}'})
    assert r.status_code == 201, r.text
    return r.json()['id']


def _log_mark(fleet) -> dict[Path, int]:
    "Where each device's agent.log ends now."
    return {d: (d/'agent.log').stat().st_size for d in fleet['devs']}


def _log_since(dev: Path, mark: dict[Path, int]) -> str:
    with open(dev/'agent.log', 'rb') as f: f.seek(mark[dev]); return f.read().decode()


def _audit(kit, action: str, target: str) -> list:
    return [e for e in kit['reg'].audit(action=action) if e.target == target]


def test_a_bundle_failing_its_golden_check_halts_the_canary_stage(kit, small_fleet):
    "v3 verifies on the server but its golden outputs are wrong: the canaries refuse it, the stage halts, nobody else is touched, the audit log says why."
    fleet, mark = small_fleet, _log_mark(small_fleet)
    rid = _start(fleet, kit, 3, '40,100', '1')
    ro = _wait(lambda: (ro := _rollout(fleet['srv'].url, kit, rid))['state'] != 'active' and ro, 120, 'the rollout of v3 to halt')
    canaries = {fleet['by_id'][d] for d, k in _canaries(fleet['ids'], [40, 100]).items() if k == 0}
    assert ro['state'] == 'failed' and ro['stage'] == 0 and ro['stages'][0]['devices'] == len(canaries) == 4, ro
    assert ro['stages'][1]['state'] == 'pending' and ro['stages'][1]['devices'] == 0, ro['stages']
    # every canary that got to it refused it on the golden check and runs v1; the others never heard of v3
    _wait(lambda: all(_running(d) == '1' for d in fleet['devs']), 60, 'devices settled')
    refused = {d for d in canaries if 'refused code=golden-failed' in _log_since(d, mark)}
    assert refused, {d.name: _log_since(d, mark) for d in canaries}
    for dev, profile in fleet['devs'].items():
        _check_runs(dev, profile, 1, kit)
        if dev not in canaries:
            assert 'phase=' not in _log_since(dev, mark), (dev, _log_since(dev, mark))  # no download, no verify, nothing
            assert not read_state(dev).rejected
        else: assert set(read_state(dev).rejected) <= {kit['sha'][3, profile]}
    [entry] = _audit(kit, 'fleet.rollout_failed', rid)
    assert entry.outcome == 'failed' and entry.actor and re.search(r'stage 0 failed: .*refused version 3: .*golden', entry.reason), entry
    assert entry.details['rollback_to'] == 1


def test_the_watchdog_reverts_canaries_over_their_error_budget(kit, small_fleet):
    "v4 passes the golden check; after the switch the canaries' counters show errors over --max-errors 2: each agent switches back at its next turn, before its next report, and the rollout halts."
    fleet, mark = small_fleet, _log_mark(small_fleet)
    rid = _start(fleet, kit, 4, '40,100', '600')  # a long soak: the canaries stay on probation, the stage cannot pass
    canaries = {fleet['by_id'][d] for d, k in _canaries(fleet['ids'], [40, 100]).items() if k == 0}
    _wait(lambda: all(read_state(d).phase == 'watch' and read_state(d).current.version == '4' for d in canaries), 120, 'the canaries on v4')
    for dev in canaries:
        write_counters(dev/'health'/'counters.json', Counters(name=MODEL, version='4', inferences=40, errors=7, source='serve'))
    _wait(lambda: all(_running(d) == '1' for d in canaries), 30, 'the canaries back on v1')
    ro = _wait(lambda: (ro := _rollout(fleet['srv'].url, kit, rid))['state'] != 'active' and ro, 60, 'the rollout of v4 to halt')
    assert ro['state'] == 'failed' and ro['stage'] == 0, ro
    for dev, profile in fleet['devs'].items():
        _check_runs(dev, profile, 1, kit)
        log = _log_since(dev, mark)
        if dev not in canaries: assert 'phase=' not in log, (dev, log); continue
        assert re.search(r'phase=rollback version=4 reason="shelf 4 failed 7 of 40 inferences', log), log
        assert 'phase=download version=1' not in log  # switched back to the kept slot, not fetched again
        assert read_state(dev).last_event['event'] == 'rolled_back'
    # within one poll interval: the device's reports (one heartbeat a poll) go from v4 to the rollback with at most one heartbeat
    # showing the errors in between (the turn that was already past its watchdog check when the counters were written)
    with sqlite3.connect(f"file:{fleet['root']/'fleet.db'}?mode=ro", uri=True) as db:
        for dev in canaries:
            bodies = [json.loads(b) for (b,) in db.execute('SELECT body FROM reports WHERE device_id = ? ORDER BY seq', (_device_id(dev),))]
            back = next(i for i, b in enumerate(bodies) if b['event'] == 'rolled_back' and b['target']['version'] == 4)
            bad = [i for i, b in enumerate(bodies) if (b['running'] or {}).get('version') == 4 and b['inference_errors']]
            assert bad in ([], [back - 1]), [(b['event'], (b['running'] or {}).get('version'), b['inference_errors']) for b in bodies]
    [entry] = _audit(kit, 'fleet.rollout_failed', rid)
    assert entry.outcome == 'failed' and re.search(r'stage 0 failed: .*(rolled back version 4: shelf 4 failed 7 of 40|version 4 unhealthy)', entry.reason), entry.reason


def test_a_rollout_survives_a_server_killed_mid_way(kit, small_fleet):
    "`retail-cv fleet serve` is SIGKILLed while v5 is in its second stage and started again on the same database and port: the rollout goes on from its stored stage and completes; the agents reconnect."
    fleet, srv = small_fleet, small_fleet['srv']
    rid = _start(fleet, kit, 5, '20,60,100', '1')
    before = _wait(lambda: (ro := _rollout(srv.url, kit, rid))['stage'] >= 1 and ro, 120, 'the second stage', every=0.02)
    assert before['state'] == 'active', before  # the kill lands mid-rollout
    mark = _log_mark(fleet)
    srv.kill()
    down_at = int(time.time())
    # the agents keep running what they run, and say the server is gone
    _wait(lambda: all('fleet server: ConnectError' in _log_since(d, mark) for d in fleet['devs']), 30, 'every agent to notice')
    assert all(p.poll() is None for p in fleet['agents'].procs.values())
    srv.start()
    after = _rollout(srv.url, kit, rid)
    assert after['id'] == rid and after['stage'] >= before['stage'] and after['state'] == 'active', after
    assert after['stages'][0]['state'] == 'passed' and after['stages'][0]['finished_at'] == before['stages'][0]['finished_at']
    ro = _wait(lambda: (ro := _rollout(srv.url, kit, rid))['state'] != 'active' and ro, 120, 'the rollout of v5 to finish')
    assert ro['state'] == 'completed', ro
    listed = httpx.get(srv.url + '/v1/admin/status', params={'devices': True}, headers=_admin(kit)).json()['device_list']
    assert all(d['last_seen'] > down_at and d['running_version'] == 5 for d in listed), listed
    for dev, profile in fleet['devs'].items(): _check_runs(dev, profile, 5, kit)
    assert [e.target for e in kit['reg'].audit(action='fleet.rollout_completed')][-1] == rid
