"""Rollout benchmark: a staged rollout to real agents, with time and bytes per device.

Usage: python bench/bench_rollout.py [--agents 200] [--per-process 25] [--stages 5,25,100] [--soak 1] [--poll-interval 2]
                                     [--interval 0.5] [--pad 2000000] [--cut 0.1] [--out bench/results/rollout.json]

What runs:

1. **Setup**: a workspace whose registry holds `shelf` versions 1 and 2, each with one signed bundle per device profile
   (`shelf-cam-x86`, `handheld-arm`), made by the deterministic makers of spec/make_vectors.py; version 2 carries
   `--pad` extra float32 weights (8 MB by default) so that bytes per device mean something. Version 1 is the champion
   (the fleet's first release), version 2 passed the registry gate.
2. **Server**: the real fleet app (`retail_cv.fleet`, SQLite in WAL mode) under uvicorn in a thread of this process,
   wrapped in an ASGI middleware that counts, per device, the body bytes of every bundle response (with its status and
   Range), the polls and the reports: the server keeps no such counters itself.
3. **Agents**: `--agents` devices, half per profile, each with its own folder, Ed25519 key, trust store and A/B slots.
   `--per-process 1`: one `retail-cv agent --server` process per device, as devices run it (about 100 MB each).
   `--per-process K`: worker processes of this script, each running K agents of the same code (`retail_cv.agent`:
   `connect`, then `run` in one thread per device), so 200 devices fit in a few GB.
4. **Install**: every agent enrols with an enrolment token of its profile and installs the release (version 1).
5. **Rollout**: version 2 with `--stages`, min healthy 0.98, `--soak`. `--cut`: that share of the agent processes is
   SIGKILLed once while one of its devices is in the middle of downloading version 2, and started again: their
   downloads resume with a Range request.

Reported: time to install the release everywhere; the rollout's time to completion and each stage's duration; each
device's switch time from the rollout's start (p50/p90/max); bundle bytes served per device over the bundle size
(mean, max, for cut and uncut devices); bundle requests, polls and reports per device; that every device's `current`
verifies as its profile's version 2; CPU seconds of the agent processes per device. JSON in `--out`.
Run it on an otherwise idle machine: numbers from a shared machine are noise.
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import math
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).parent/'retail-cv')
MODEL, PROFILES = 'shelf', ('shelf-cam-x86', 'handheld-arm')


def make_vectors():
    "spec/make_vectors.py as a module: its deterministic keys and bundle makers."
    spec = importlib.util.spec_from_file_location('make_vectors', ROOT/'spec'/'make_vectors.py')
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    return mod


class ByteCounter:
    "ASGI middleware around the fleet app: per device, each bundle response (status, Range, bytes sent), and polls and reports."
    def __init__(self, app):
        self.app, self.bundles, self.calls, self.lock = app, [], {}, threading.Lock()

    async def __call__(self, scope, receive, send):
        if scope['type'] != 'http': return await self.app(scope, receive, send)
        h = {k.decode('latin-1').lower(): v.decode('latin-1') for k, v in scope['headers']}
        path = scope['path']
        kind = 'poll' if path.endswith('/state') else 'report' if path.endswith('/reports') else None
        if kind:
            did = path.split('/')[3]
            with self.lock: self.calls[did, kind] = self.calls.get((did, kind), 0) + 1
        if scope['method'] != 'GET' or not path.startswith('/v1/bundles/'): return await self.app(scope, receive, send)
        rec = {'device': h.get('x-fleet-device'), 'sha256': path.rsplit('/', 1)[-1], 'range': h.get('range'), 'status': None, 'bytes': 0,
               'at': time.time()}
        self.bundles.append(rec)
        async def counting(msg):
            await send(msg)
            if msg['type'] == 'http.response.start': rec['status'] = msg['status']
            elif msg['type'] == 'http.response.body': rec['bytes'] += len(msg.get('body', b''))
        await self.app(scope, receive, counting)


def make_world(tmp: Path, pad: int) -> dict:
    "The workspace and registry: v1 (champion) and v2 (gate passed), one bundle per profile each; the admin token issuer."
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from retail_cv.core import Workspace, sha256_file
    from retail_cv.credentials import issue_token
    from retail_cv.registry import Registry
    mv = make_vectors()
    ws = Workspace.open(tmp/'ws')
    (ws/'keys'/'root.pub').write_bytes(mv.public_pem('root'))
    reg, paths, sha = Registry(ws), {}, {}
    for v in (1, 2):
        (tmp/f'm{v}.onnx').write_bytes(mv.tiny_onnx(v))
        reg.register(MODEL, tmp/f'm{v}.onnx', metrics={'val/acc': 0.8 + v / 100})
        for p in PROFILES:
            b = mv.make_bundle(tmp/'bundles'/f'{p}-{v}.tar', mv.key('root'), str(v), profile=p, pad=pad if v == 2 else 0)
            reg.add_bundle(MODEL, v, b, p)
            paths[v, p], sha[v, p] = b, sha256_file(b)
        reg.promote(MODEL, v, alias='champion' if v == 1 else 'candidate', reason='benchmark')
    issuer = Ed25519PrivateKey.generate()
    return dict(ws=ws, pub=ws/'keys'/'root.pub', paths=paths, sha=sha, issuer=issuer,
                admin={'Authorization': f"Bearer {issue_token(issuer, 'bench', ['admin'])}"})


def worker(a: argparse.Namespace) -> None:
    "A worker process: the agents of `a.devices`, one thread each, until SIGTERM."
    from retail_cv.agent import Agent, WatchdogPolicy, connect, run
    tokens, stop = json.loads(os.environ['BENCH_ENROL_TOKENS']), threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    threads = []
    for d in a.devices:
        agent = Agent.open(d, WatchdogPolicy(grace_s=0))
        client = connect(agent, a.url, tokens[agent.config.profile])
        threads.append(threading.Thread(target=run, args=(agent, None, client, a.interval), kwargs={'stop': stop}, daemon=True))
    for t in threads: t.start()
    for t in threads: t.join()


class Fleet:
    "The agent processes: groups of devices, each group one process (a `retail-cv agent` or a worker of this script)."
    def __init__(self, groups: list[list[Path]], url: str, tokens: dict[str, str], interval: float, log: Path):
        self.groups, self.url, self.tokens, self.interval, self.log = groups, url, tokens, interval, log
        self.procs: dict[int, subprocess.Popen] = {}

    def start(self, g: int) -> None:
        devs = self.groups[g]
        if len(devs) == 1:
            profile = json.loads((devs[0]/'device.json').read_text())['profile']
            cmd = [CLI, 'agent', '--device', str(devs[0]), '--server', self.url, '--enrol-token', self.tokens[profile],
                   '--interval', str(self.interval), '--grace', '0']
        else: cmd = [sys.executable, __file__, '--worker', '--url', self.url, '--interval', str(self.interval), *map(str, devs)]
        self.procs[g] = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(self.log, 'ab'),
                                         env={**os.environ, 'BENCH_ENROL_TOKENS': json.dumps(self.tokens)})

    def check(self) -> None:
        for g, p in self.procs.items():
            if p.poll() is not None: sys.exit(f"agent process {g} exited with {p.returncode}: {self.log.read_text()[-3000:]}")

    def kill(self, g: int) -> None: p = self.procs.pop(g); p.kill(); p.wait()

    def stop(self) -> None:
        for p in self.procs.values(): p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try: p.wait(60)
            except subprocess.TimeoutExpired: p.kill(); p.wait()


def version_of(dev: Path) -> str | None:
    "The version a device runs once settled (idle), else None."
    try: st = json.loads((dev/'state.json').read_text())
    except (FileNotFoundError, ValueError): return None
    return (st.get('current') or {}).get('version') if st.get('phase') == 'idle' else None


def pcts(xs: list[float]) -> dict:
    xs = sorted(xs)
    at = lambda q: xs[min(len(xs) - 1, int(q * len(xs)))]
    return {'p50': round(at(0.5), 2), 'p90': round(at(0.9), 2), 'max': round(xs[-1], 2), 'n': len(xs)} if xs else {}


def wait(cond, timeout: float, what: str, every: float = 0.2):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if (v := cond()): return v
        time.sleep(every)
    sys.exit(f"timed out after {timeout} s waiting for {what}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--agents', type=int, default=200, help='devices, half per profile')
    ap.add_argument('--per-process', type=int, default=25, help='agents per process (1: a `retail-cv agent` process each)')
    ap.add_argument('--stages', default='5,25,100', help='rollout stages, cumulative percent')
    ap.add_argument('--soak', type=int, default=1, help='seconds a stage must stay healthy')
    ap.add_argument('--poll-interval', type=int, default=2, help="the server's poll interval for devices, seconds")
    ap.add_argument('--interval', type=float, default=0.5, help="seconds between the agents' turns")
    ap.add_argument('--pad', type=int, default=2_000_000, help="extra float32 weights in version 2's bundles (8 MB by default)")
    ap.add_argument('--cut', type=float, default=0.1, help='share of agent processes SIGKILLed once mid-download of version 2')
    ap.add_argument('--timeout', type=float, default=1800, help='give up after this many seconds per phase')
    ap.add_argument('--out', type=Path, default=ROOT/'bench'/'results'/'rollout.json')
    ap.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
    ap.add_argument('--url', help=argparse.SUPPRESS)
    ap.add_argument('devices', nargs='*', type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker: return worker(a)
    import httpx
    from retail_cv.agent import init_device
    from retail_cv.bundle import verify_bundle
    from retail_cv.fleet import FleetConfig, FleetServer
    stages = [int(s) for s in a.stages.split(',')]
    with tempfile.TemporaryDirectory(prefix='bench-rollout-') as d:
        tmp = Path(d)
        world = make_world(tmp, a.pad)
        srv = FleetServer(FleetConfig(tmp/'fleet.db', tmp/'published', workspace=world['ws'], token_keys=[world['issuer'].public_key()],
                                      poll_interval_s=a.poll_interval, tick_s=0.5))
        counter = srv.server.config.app = ByteCounter(srv.app)
        with srv:
            tokens = {}
            for p in PROFILES:
                r = httpx.post(srv.url + '/v1/admin/enrolment-tokens', headers=world['admin'], json={'model': MODEL, 'profile': p, 'uses': a.agents})
                r.raise_for_status(); tokens[p] = r.json()['token']
            devs = {}
            for i in range(a.agents):
                init_device(tmp/'devices'/f'd{i:04d}', PROFILES[i % 2], world['pub']); devs[tmp/'devices'/f'd{i:04d}'] = PROFILES[i % 2]
            paths = list(devs)
            groups = [paths[i:i + a.per_process] for i in range(0, len(paths), a.per_process)]
            fleet = Fleet(groups, srv.url, tokens, a.interval, tmp/'agents.log')
            t0 = time.monotonic()
            for g in range(len(groups)): fleet.start(g)
            wait(lambda: fleet.check() or all(version_of(p) == '1' for p in paths), a.timeout, 'every device on version 1')
            install_s = time.monotonic() - t0
            print(f"{a.agents} agents on version 1 after {install_s:.1f} s", flush=True)

            # the rollout, with a share of the agent processes cut mid-download
            to_cut = set(range(0, len(groups), max(1, round(1 / a.cut)))) if a.cut > 0 else set()
            to_cut = set(sorted(to_cut)[:max(1, math.ceil(a.cut * len(groups)))]) if to_cut else set()
            cut_at: dict[Path, int] = {}
            r = httpx.post(srv.url + '/v1/admin/rollouts', headers=world['admin'], timeout=120,
                           json={'ref': f'{MODEL}:2', 'stages': stages, 'min_healthy': 0.98, 'soak_s': a.soak, 'reason': 'benchmark'})
            r.raise_for_status()
            rid, wall0, t1 = r.json()['id'], time.time(), time.monotonic()
            stage_seen, next_check, ro = {0: 0.0}, 0.0, r.json()
            while ro['state'] == 'active':
                for g in sorted(to_cut):
                    for dev in groups[g]:
                        part = dev/'downloads'/f"{world['sha'][2, devs[dev]]}.tar.part"
                        size = part.stat().st_size if part.exists() else 0
                        if 0 < size < world['paths'][2, devs[dev]].stat().st_size:
                            fleet.kill(g); to_cut.discard(g)
                            cut_at.update({x: (time.time(), (x/'downloads'/f"{world['sha'][2, devs[x]]}.tar.part").stat().st_size) for x in groups[g]
                                           if (x/'downloads'/f"{world['sha'][2, devs[x]]}.tar.part").exists()})
                            fleet.start(g); break
                if time.monotonic() >= next_check:
                    fleet.check()
                    ro = httpx.get(f'{srv.url}/v1/admin/rollouts/{rid}', headers=world['admin'], timeout=120).json()
                    stage_seen.setdefault(ro['stage'], time.monotonic() - t1)
                    next_check = time.monotonic() + 0.25
                    if time.monotonic() - t1 > a.timeout: sys.exit(f"rollout not finished after {a.timeout} s: {ro}")
                time.sleep(0.002)
            rollout_s = time.monotonic() - t1
            calls = dict(counter.calls)
            fleet.stop()
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)

        # per device: switch time, bytes, requests, and what it runs
        ids = {json.loads((p/'fleet.json').read_text())['device_id']: p for p in paths}
        switch, ratio_whole, ratio_cut, written_cut, bad, requests = [], [], [], [], [], []
        for did, p in ids.items():
            profile = devs[p]
            lines = [ln for ln in (p/'agent.log').read_text().splitlines() if 'phase=switch version=2 ' in ln]
            if lines: switch.append(dt.datetime.fromisoformat(lines[0].split(' ', 1)[0]).timestamp() - wall0)
            got = [b for b in counter.bundles if b['device'] == did and b['sha256'] == world['sha'][2, profile]]
            size = world['paths'][2, profile].stat().st_size
            (ratio_cut if p in cut_at else ratio_whole).append(sum(b['bytes'] for b in got) / size)
            if p in cut_at:  # what reached the device's disk: the .part at the kill, then what later requests sent
                killed, had = cut_at[p]
                written_cut.append((had + sum(b['bytes'] for b in got if b['at'] > killed)) / size)
            requests.append(len(got))
            try:
                info = verify_bundle(p/'current', str(world['pub']))
                if (info.version, info.meta.profile) != ('2', profile): bad.append(f'{did}: runs {info.version} for {info.meta.profile}')
            except Exception as e:  # noqa: BLE001 - reported, not raised
                bad.append(f'{did}: {e}')
        n = len(ids)
        result = {
            'benchmark': 'a staged rollout to real agents: time and bytes per device',
            'when': dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds'),
            'machine': {'cpus': os.cpu_count(), 'platform': platform.platform(), 'python': platform.python_version()},
            'config': {'agents': a.agents, 'profiles': list(PROFILES), 'per_process': a.per_process, 'processes': len(groups),
                       'agent': 'retail-cv agent processes' if a.per_process == 1 else 'retail_cv.agent run() threads in worker processes',
                       'stages': stages, 'soak_s': a.soak, 'min_healthy': 0.98, 'poll_interval_s': a.poll_interval, 'agent_interval_s': a.interval,
                       'bundle_bytes': {f'{p}:v{v}': world['paths'][v, p].stat().st_size for v in (1, 2) for p in PROFILES}},
            'install': {'all_on_release_s': round(install_s, 1)},
            'rollout': {'id': rid, 'state': ro['state'], 'reason': ro.get('reason'), 'completed_s': round(rollout_s, 1),
                        'stage_started_s': {str(k): round(v, 1) for k, v in sorted(stage_seen.items())},
                        'stage_devices': [s['devices'] for s in ro['stages']],
                        'switch_s_from_start': pcts(switch),
                        'bundle_bytes_sent_over_size': {'whole': pcts(ratio_whole), 'cut': pcts(ratio_cut), 'devices_cut': len(cut_at),
                                                        'cut_at_bytes': pcts([float(had) for _, had in cut_at.values()]),
                                                        'cut_written_on_device': pcts(written_cut),
                                                        'note': 'sent: body bytes the server handed to the connection, so a cut '
                                                                'request counts what sat in socket buffers when the agent died'},
                        'bundle_requests_per_device': pcts([float(x) for x in requests]),
                        'polls_per_device': pcts([float(calls.get((i, 'poll'), 0)) for i in ids]),
                        'reports_per_device': pcts([float(calls.get((i, 'report'), 0)) for i in ids]),
                        'devices_on_v2_verified': n - len(bad), 'problems': bad[:10]},
            'agent_cpu_s_per_device': round((usage.ru_utime + usage.ru_stime) / max(n, 1), 3),
        }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + '\n')
    print(json.dumps(result, indent=1))
    if ro['state'] != 'completed' or bad: sys.exit(1)


if __name__ == '__main__':
    main()
