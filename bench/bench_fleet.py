"""Fleet server benchmark: poll load of many simulated devices against a real `retail-cv fleet serve` process.

Usage: python bench/bench_fleet.py [--devices 10000] [--interval 60] [--rate 170] [--seconds 300] [--saturate 30]
                                   [--connections 64] [--profile] [--out bench/results/fleet.json]

What runs:

1. **Setup**: a workspace whose registry holds a tiny torch-free ONNX classifier, version 1 signed and bundled for two
   device profiles and promoted to champion (the fleet's first release). `--devices` devices, half per profile, each
   with its own Ed25519 key: `--http-enrol` of them (default 20) enrol through `POST /v1/enrol` with an enrolment token
   and a proof of key possession, as an agent does; the rest are written straight into the fleet database through the
   store API (`retail_cv.fleet.Database`), the same rows enrolment writes, since 10,000 enrolments are not what is
   measured. Each device knows its desired state's etag (as it would after its first poll).
2. **Server**: `retail-cv fleet serve` (SQLite in WAL mode, uvicorn, one worker) pinned to core 0 (`taskset -c 0`).
3. **Poll load**: this process, pinned to core 1, is the load generator: asyncio + httpx with `--connections`
   keep-alive connections. Every device polls `GET /v1/devices/{id}/state` once per `--interval` seconds at its own
   phase (open loop: a poll is sent at its time whether or not earlier ones were answered), each a real signed
   protocol request (`X-Fleet-Device`, `X-Fleet-Time`, `X-Fleet-Signature`: Ed25519 over the canonical JSON of
   device id, method, path and time, spec/fleet-protocol.md §4) with `If-None-Match`, so an unchanged state costs a
   304. `--rate` (polls/s) shortens the interval when it is above devices/interval: the target is stated at 170 polls/s,
   just above the 167/s of 10,000 devices polling once a minute. Reported: polls/s answered, p50/p90/p99/max latency
   (from the moment the poll was due, so a late load generator does not hide queueing), status codes, errors.
4. **Saturation** (`--saturate` seconds): closed loop, `--connections` concurrent pollers as fast as the server
   answers: the server's capacity on one core, and the latency at that load.
5. **Profile** (`--profile`): py-spy samples the server during the poll load; the hottest functions go in the JSON.
The rollout to real agents (time and bytes per device) is `bench/bench_rollout.py`.

Target (issue 14): >= 170 polls/s sustained with p99 <= 100 ms. JSON in bench/results/fleet.json.
Run it on an otherwise idle machine with at least two cores: numbers from a shared machine are noise.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import io
import json
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).parent/'retail-cv')
MODEL, PROFILES = 'bench-cls', ('handheld-arm-cpu', 'shelf-cam-x86')


def tiny_onnx(seed: int) -> bytes:
    "A 3-class classifier of 32 x 32 images: mean colour, then a linear layer (the bundle's size does not matter here)."
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(seed)
    init = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n) for n, s in (('W', (3, 3)), ('b', (3,)))]
    nodes = [helper.make_node('ReduceMean', ['images'], ['m'], axes=[2, 3], keepdims=0),
             helper.make_node('MatMul', ['m', 'W'], ['mm']), helper.make_node('Add', ['mm', 'b'], ['logits'])]
    g = helper.make_graph(nodes, 'tiny', [helper.make_tensor_value_info('images', TensorProto.FLOAT, ['batch', 3, 32, 32])],
                          [helper.make_tensor_value_info('logits', TensorProto.FLOAT, ['batch', 3])], init)
    return helper.make_model(g, opset_imports=[helper.make_opsetid('', 17)], ir_version=8).SerializeToString()


def make_world(tmp: Path) -> dict:
    "A workspace with the model's version 1 registered, bundled per profile and promoted; the admin token issuer's keys."
    import numpy as np
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from PIL import Image
    from retail_cv.bundle import build_bundle, generate_signing_key
    from retail_cv.core import Workspace
    from retail_cv.registry import Registry
    ws = Workspace.open(tmp/'ws')
    keys = generate_signing_key(tmp/'keys')
    shutil.copy(keys.public_key, ws/'keys'/'trusted.pub')
    buf = io.BytesIO(); Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(buf, 'PNG')
    contract = {'inputs': [{'name': 'images', 'shape': ['batch', 3, 32, 32], 'dtype': 'float32'}],
                'outputs': [{'name': 'logits', 'shape': ['batch', 3], 'dtype': 'float32'}], 'preprocessing': {'image_size': 32}}
    (tmp/'m1.onnx').write_bytes(tiny_onnx(1))
    reg = Registry(ws, actor='bench')
    reg.register(MODEL, tmp/'m1.onnx', metrics={'val/acc': 0.6})
    for p in PROFILES:
        b = build_bundle(tmp/f'b1-{p}', tiny_onnx(1), name=MODEL, version='1', labels=['a', 'b', 'c'], contract=contract,
                         golden_images=[buf.getvalue()], key=keys.private_key, profile=p)
        reg.add_bundle(MODEL, 1, b, p)
    reg.promote(MODEL, 1, reason='bench')
    (tmp/'m2.onnx').write_bytes(tiny_onnx(2))
    reg.register(MODEL, tmp/'m2.onnx', metrics={'val/acc': 0.7})
    for p in PROFILES:
        b = build_bundle(tmp/f'b2-{p}', tiny_onnx(2), name=MODEL, version='2', labels=['a', 'b', 'c'], contract=contract,
                         golden_images=[buf.getvalue()], key=keys.private_key, profile=p)
        reg.add_bundle(MODEL, 2, b, p)
    issuer = Ed25519PrivateKey.generate()
    (tmp/'issuer.pub').write_bytes(issuer.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return {'ws': ws, 'issuer': issuer, 'keys': keys, 'reg': reg}


class Devices:
    "The simulated devices: keys, ids, profiles, the etag each last saw."
    def __init__(self, n: int, seed: int = 0):
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from retail_cv.fleet import device_id_for, public_key_text
        self.keys = [Ed25519PrivateKey.generate() for _ in range(n)]
        self.public = [public_key_text(k) for k in self.keys]
        self.ids = [device_id_for(p) for p in self.public]
        self.profiles = [PROFILES[i % 2] for i in range(n)]
        self.etags: list[str | None] = [None] * n

    def insert(self, db_path: Path, start: int) -> None:
        "Write devices `start`.. into the fleet database through the store API (the rows enrolment writes)."
        from retail_cv.fleet import Database
        db, now = Database(db_path), int(time.time())
        with db.tx() as t:
            for i in range(start, len(self.ids)):
                t.run('INSERT INTO devices (id, public_key, model, profile, store, channel, labels, enrolled_at, enrolled_with) '
                      'VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)', (self.ids[i], self.public[i], MODEL, self.profiles[i],
                                                            f'store-{i % 50}', 'stable', '{}', now, 'bench-direct'))
        db.close()


def cpu_s(pid: int) -> float:
    "CPU seconds (user + system) a process has used, all its threads."
    fields = Path(f'/proc/{pid}/stat').read_text().rpartition(')')[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


def with_cpu(pid: int, run) -> dict:
    "Run a load phase and add the server's CPU time per answered poll: capacity on one core, whatever else the machine runs."
    c0, g0 = cpu_s(pid), time.process_time(); out = run(); c1, g1 = cpu_s(pid), time.process_time()
    polls = sum(out['codes'].values())
    out['load_generator_cpu_ms_per_poll'] = round(1e3 * (g1 - g0) / max(polls, 1), 3)  # it must not be the bottleneck
    out['server_cpu_s'] = round(c1 - c0, 2)
    out['server_cpu_ms_per_poll'] = round(1e3 * (c1 - c0) / max(polls, 1), 3)
    out['capacity_polls_per_s_one_core'] = round(polls / max(c1 - c0, 1e-9), 1)
    return out


def free_port() -> int:
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


def start_server(tmp: Path, world: dict, port: int, db: str = 'fleet.db', *extra: str) -> subprocess.Popen:
    "`retail-cv fleet serve` pinned to core 0, once it answers."
    import httpx
    cmd = ['taskset', '-c', '0', CLI, '--workspace', str(world['ws'].root), 'fleet', 'serve', '--db', str(tmp/db),
           '--bundles', str(tmp/'served'), '--port', str(port), '--token-keys', str(tmp/'issuer.pub'), '--tick', '5', *extra]
    log = open(tmp/f'server-{db}.log', 'w')
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    for _ in range(300):
        try:
            if httpx.get(f'http://127.0.0.1:{port}/healthz').status_code == 200: return proc
        except httpx.TransportError: time.sleep(0.1)
        if proc.poll() is not None: break
    sys.exit(f"fleet server did not start:\n{(tmp/f'server-{db}.log').read_text()[-3000:]}")


def enrol_over_http(url: str, world: dict, devs: Devices, n: int) -> None:
    "Enrol the first `n` devices through the protocol: an admin's enrolment token, each device's proof."
    import httpx
    from retail_cv.credentials import issue_token
    from retail_cv.fleet import EnrolRequest, sign_doc
    admin = {'Authorization': 'Bearer ' + issue_token(world['issuer'], 'bench', ['fleet:admin'])}
    tok = httpx.post(url + '/v1/admin/enrolment-tokens', json={'model': MODEL, 'uses': max(n, 1)}, headers=admin, timeout=60)
    tok.raise_for_status()
    for i in range(n):
        r = EnrolRequest(enrolment_token=tok.json()['token'], public_key=devs.public[i], profile=devs.profiles[i],
                         store=f'store-{i % 50}', time=int(time.time()), proof='x')
        r = r.model_copy(update={'proof': sign_doc(devs.keys[i], r.proof_doc())})
        ans = httpx.post(url + '/v1/enrol', content=r.model_dump_json(), headers={'Content-Type': 'application/json'}, timeout=60)
        assert ans.status_code == 201 and ans.json()['device_id'] == devs.ids[i], ans.text


def prime_etags(url: str, devs: Devices) -> dict[str, str]:
    "One real poll per profile gives the etag every device of that profile has seen before the run (same desired state)."
    import httpx
    from retail_cv.fleet import signed_headers
    etag = {}
    for i in range(2):
        path = f'/v1/devices/{devs.ids[i]}/state'
        r = httpx.get(url + path, headers=signed_headers(devs.keys[i], devs.ids[i], 'GET', path), timeout=60)
        assert r.status_code == 200 and r.json()['desired'] is not None, r.text
        etag[devs.profiles[i]] = r.json()['etag']
    devs.etags = [etag[p] for p in devs.profiles]
    return etag


def percentiles(xs: list[float]) -> dict:
    "p50/p90/p99/max in milliseconds."
    if not xs: return {}
    s = sorted(xs)
    q = lambda f: s[min(len(s) - 1, int(f * len(s)))]
    return {'p50_ms': round(q(0.5) * 1e3, 2), 'p90_ms': round(q(0.9) * 1e3, 2), 'p99_ms': round(q(0.99) * 1e3, 2),
            'max_ms': round(s[-1] * 1e3, 2), 'mean_ms': round(statistics.fmean(s) * 1e3, 2)}


async def poll(client, devs: Devices, i: int, stats: dict, due: float | None = None) -> None:
    "One signed poll of device `i` with If-None-Match; latency from when it was due (or sent)."
    from retail_cv.fleet import signed_headers
    path = f'/v1/devices/{devs.ids[i]}/state'
    sent = time.perf_counter()
    headers = signed_headers(devs.keys[i], devs.ids[i], 'GET', path)
    if devs.etags[i]: headers['If-None-Match'] = f'"{devs.etags[i]}"'
    try: r = await client.get(path, headers=headers)
    except Exception as e:  # a refused or dropped connection is a failed poll, counted, not a crash of the generator
        stats['errors'][type(e).__name__] = stats['errors'].get(type(e).__name__, 0) + 1; return
    done = time.perf_counter()
    stats['codes'][r.status_code] = stats['codes'].get(r.status_code, 0) + 1
    if r.status_code == 200: devs.etags[i] = r.json()['etag']
    stats['latency'].append(done - (due if due is not None else sent))
    stats['service'].append(done - sent)
    stats['done'].append(done)


def new_stats() -> dict: return {'codes': {}, 'errors': {}, 'latency': [], 'service': [], 'done': []}


def summary(stats: dict, t0: float, t1: float, offered: float | None) -> dict:
    "Polls/s answered in [t0, t1] and the latency of the polls answered in it."
    inside = [k for k, d in enumerate(stats['done']) if t0 <= d <= t1]
    ok = sum(n for c, n in stats['codes'].items() if c in (200, 304))
    out = {'seconds': round(t1 - t0, 1), 'polls': len(inside), 'polls_per_s': round(len(inside) / (t1 - t0), 1),
           'codes': {str(k): v for k, v in sorted(stats['codes'].items())}, 'errors': stats['errors'],
           'ok_share': round(ok / max(1, sum(stats['codes'].values()) + sum(stats['errors'].values())), 4),
           'latency_from_due': percentiles([stats['latency'][k] for k in inside]),
           'latency_from_send': percentiles([stats['service'][k] for k in inside])}
    if offered is not None: out['offered_per_s'] = round(offered, 1)
    return out


async def open_loop(url: str, devs: Devices, rate: float, seconds: float, connections: int, warmup: float) -> dict:
    "Every device polls once per N/rate seconds at its own phase; polls are sent when due, answered or not."
    import httpx
    n, stats = len(devs.ids), new_stats()
    period = n / rate
    order = list(range(n)); random.Random(1).shuffle(order)
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=httpx.Timeout(30, pool=60)) as client:
        start, tasks, k = time.perf_counter() + 0.5, set(), 0
        end = start + warmup + seconds
        while True:
            due = start + (k // n) * period + (k % n) * period / n
            if due >= end: break
            if (wait := due - time.perf_counter()) > 0: await asyncio.sleep(wait)
            t = asyncio.create_task(poll(client, devs, order[k % n], stats, due))
            tasks.add(t); t.add_done_callback(tasks.discard)
            k += 1
        if tasks: await asyncio.wait(tasks, timeout=60)
    return summary(stats, start + warmup, end, rate)


async def closed_loop(url: str, devs: Devices, seconds: float, connections: int) -> dict:
    "`connections` pollers, each sending its next poll when the last is answered: the server's capacity."
    import httpx
    stats, rng = new_stats(), random.Random(2)
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
        t0 = time.perf_counter(); end = t0 + seconds
        async def worker():
            while time.perf_counter() < end: await poll(client, devs, rng.randrange(len(devs.ids)), stats)
        await asyncio.gather(*(worker() for _ in range(connections)))
    return summary(stats, t0 + min(2.0, seconds / 5), end, None)


IDLE = ('EpollSelector.select', 'Condition.wait', 'select (', 'Event.wait', 'Queue.get', 'lock.acquire')


def profile_server(pid: int, seconds: float, out: Path) -> dict:
    "py-spy samples of the server process (all threads) for `seconds`: the top functions by own and total samples."
    spy = shutil.which('py-spy') or str(Path(sys.executable).parent/'py-spy')
    if not Path(spy).exists(): return {'skipped': 'py-spy is not installed (pip install py-spy)'}
    raw = out.with_suffix('.txt')
    r = subprocess.run([spy, 'record', '--pid', str(pid), '--duration', str(int(seconds)), '--rate', '200', '--format', 'raw',
                        '--output', str(raw), '--nonblocking'], capture_output=True, text=True)
    if r.returncode != 0 or not raw.exists(): return {'skipped': f'py-spy failed: {r.stderr[-500:]}'}
    own, total, n = {}, {}, 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(' ')
        if not stack or not count.isdigit(): continue
        frames, c = stack.split(';'), int(count)
        if frames[-1].startswith(IDLE): continue  # a thread waiting (event loop select, idle worker threads)
        n += c
        own[frames[-1]] = own.get(frames[-1], 0) + c
        for f in set(frames): total[f] = total.get(f, 0) + c
    top = lambda d: [{'function': f, 'share': round(c / n, 3)} for f, c in sorted(d.items(), key=lambda x: -x[1])[:25]]
    return {'busy_samples': n, 'top_own': top(own), 'top_total': top(total)}


def admin_headers(world: dict) -> dict:
    from retail_cv.credentials import issue_token
    return {'Authorization': 'Bearer ' + issue_token(world['issuer'], 'bench', ['fleet:admin'])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--devices', type=int, default=10_000)
    ap.add_argument('--interval', type=float, default=60.0, help="seconds between a device's polls")
    ap.add_argument('--rate', type=float, default=170.0, help="offered polls/s (used when above devices/interval)")
    ap.add_argument('--seconds', type=float, default=300.0, help='measured seconds of poll load')
    ap.add_argument('--warmup', type=float, default=10.0)
    ap.add_argument('--saturate', type=float, default=30.0, help='seconds of closed-loop load (0: skip)')
    ap.add_argument('--connections', type=int, default=64)
    ap.add_argument('--http-enrol', type=int, default=20, help='devices enrolled through POST /v1/enrol')
    ap.add_argument('--profile', action='store_true', help='sample the server with py-spy during the poll load')
    ap.add_argument('--out', type=Path, default=ROOT/'bench'/'results'/'fleet.json')
    a = ap.parse_args()
    if len(os.sched_getaffinity(0)) < 2: sys.exit("needs two cores: the server on core 0, the load generator on core 1")
    tmp = Path(tempfile.mkdtemp(prefix='bench-fleet-'))
    try:
        world = make_world(tmp)
        os.sched_setaffinity(0, {1})  # this process is the load generator: core 1; the server is on core 0
        result = {'benchmark': 'fleet server poll load',
                  'date': dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds'),
                  'machine': {'cpu': platform.processor() or platform.machine(), 'cores': os.cpu_count(), 'python': platform.python_version()}}
        result.update(poll_part(tmp, world, a))
        result['machine']['load_average_at_end'] = os.getloadavg()
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=2) + '\n')
        print(f"wrote {a.out}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def poll_part(tmp: Path, world: dict, a: argparse.Namespace) -> dict:
    "Parts 1-5: the devices, the server, the open-loop poll load, saturation, the profile."
    t = time.perf_counter()
    devs = Devices(a.devices)
    from retail_cv.fleet import Database
    Database(tmp/'fleet.db').close()  # the schema, before the direct inserts
    devs.insert(tmp/'fleet.db', a.http_enrol)
    port = free_port(); url = f'http://127.0.0.1:{port}'
    proc = start_server(tmp, world, port)
    try:
        enrol_over_http(url, world, devs, a.http_enrol)
        etags = prime_etags(url, devs)
        setup_s = time.perf_counter() - t
        rate = max(a.rate, a.devices / a.interval)
        print(f"{a.devices} devices ready in {setup_s:.0f} s; polling at {rate:.1f}/s for {a.seconds:.0f} s", flush=True)
        prof = None
        if a.profile:
            import concurrent.futures
            prof = concurrent.futures.ThreadPoolExecutor(1).submit(profile_server, proc.pid, min(a.seconds, 60), tmp/'profile')
        poll_load = with_cpu(proc.pid, lambda: asyncio.run(open_loop(url, devs, rate, a.seconds, a.connections, a.warmup)))
        print(json.dumps(poll_load, indent=1), flush=True)
        sat = with_cpu(proc.pid, lambda: asyncio.run(closed_loop(url, devs, a.saturate, a.connections))) if a.saturate > 0 else None
        if sat: print(json.dumps(sat, indent=1), flush=True)
    finally:
        proc.terminate(); proc.wait(20)
    lat = poll_load['latency_from_due']
    return {'setup': {'devices': a.devices, 'profiles': list(PROFILES), 'enrolled_over_http': a.http_enrol,
                      'inserted_through_store': a.devices - a.http_enrol, 'interval_s': round(a.devices / rate, 2),
                      'connections': a.connections, 'database': 'SQLite (WAL)', 'server_core': 0, 'load_generator_core': 1,
                      'etags': etags, 'setup_s': round(setup_s, 1)},
            'poll_load': poll_load, 'saturation': sat,
            'target': {'polls_per_s': 170, 'p99_ms': 100,
                       'met': poll_load['polls_per_s'] >= 170 * 0.99 and bool(lat) and lat['p99_ms'] <= 100 and poll_load['ok_share'] == 1.0},
            'profile': prof.result() if prof else None}

if __name__ == '__main__':
    main()
