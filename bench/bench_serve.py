"""HTTP serving benchmark: `retail-cv serve` against the raw runtime's `predict_batch` on the same JPEGs.

Usage: python bench/bench_serve.py [--images 48] [--seconds 15] [--concurrency 8] [--rounds 3] [--out bench/results/serve.json]

What runs, for the demo's two architectures (MobileNetV3-small classifier at 224 px, SSDlite320 detector), each as
a signed bundle with fresh weights and BatchNorm re-estimated on the photos (latency does not depend on what the
weights learnt, but a detector with untouched BatchNorm ties every anchor and times an unusual NMS load):

1. **Raw baseline**: `Predictor.predict_batch` on the encoded JPEG bytes (decoding included, as the server decodes),
   one call per batch of the server's batch size (a call with all photos would decode and normalise them as one
   array, a saving no server answering requests one batch at a time can make), in a process pinned to core 0 (`taskset -c 0`), ONNX Runtime with one
   intra-op thread. Images/s is the median of `--rounds` rounds, each at least 5 s of passes over `--images` real
   photos.
2. **Server**: `retail-cv serve BUNDLE` (uvicorn with httptools and uvloop, as the `serve` extra installs it) pinned
   to core 0 with the same one-thread profile and bearer tokens on, and a
   load generator pinned to core 1: `--concurrency` clients (stdlib `http.client` on kept-alive connections, the
   lightest client, so that the server is what is measured) posting one JPEG per request for `--seconds`. Images/s,
   p50 and p99 latency per request. Target: HTTP images/s >= 80 % of the raw baseline at the same batch size.
3. **Does batching pay?** The raw runtime at batch 1 and batch 8 (classifier: dynamic batch; detector: a graph
   exported with a fixed batch of 4, since torchvision's detectors trace one loop per image). Where the larger batch
   is faster per image, the server also runs with micro-batching at that size against the raw baseline at that size.

Photos: the Grocery validation split and the shelf photos in `../shared/data` (falls back to the Grocery sample
shipped in the package's tests when `../shared` is absent). JSON in bench/results/serve.json; medians throughout.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent/'shared'/'data'
CLI = str(Path(sys.executable).parent/'retail-cv')


def photos(kind: str, n: int) -> list[Path]:
    "Up to `n` real JPEGs: Grocery product photos for the classifier, shelf photos for the detector."
    if kind == 'classification':
        found = sorted((SHARED/'grocery'/'val').rglob('*.jpg')) or sorted((ROOT/'tests'/'data').rglob('*.jpg'))
    else:
        found = sorted((SHARED/'shelves-pricetags'/'images').glob('*.jpg')) or sorted((ROOT/'tests'/'data').rglob('*.jpg'))
    if not found: sys.exit("no photos found: needs ../shared/data or tests/data")
    step = max(1, len(found) // n)
    return found[::step][:n]


def make_bundle(kind: str, folder: Path, pics: list[Path], batch: int, key) -> Path:
    "A signed bundle of the demo's architecture for `kind`, BatchNorm re-estimated on `pics`."
    import torch
    from retail_cv.bundle import build_bundle
    from retail_cv.models import ModelSpec, build_model, recalibrate_batchnorm, to_onnx, wrap
    from retail_cv.preprocess import preprocess
    torch.manual_seed(0)
    spec = ModelSpec(arch='mobilenet_v3_small', num_classes=10) if kind == 'classification' else ModelSpec(arch='ssdlite320_mobilenet_v3_large', num_classes=3)  # the measured rows' detector
    net = build_model(spec)
    x = torch.from_numpy(preprocess([str(p) for p in pics[:16]], spec.preprocessing))
    module = wrap(recalibrate_batchnorm(net, x, batch_size=4), spec)
    onnx_path = to_onnx(module, folder/f'{kind}-b{batch}.onnx', batch_size=batch)
    labels = [f'class-{i}' for i in range(spec.num_classes)]
    contract = module.contract() if kind == 'classification' else module.contract(batch_size=batch)
    return build_bundle(folder/f'{kind}-b{batch}', onnx_path, name=f'bench-{kind}', version=f'b{batch}', labels=labels,
                        contract=contract, golden_images=[pics[0]], key=key, profile='shelf-cam-x86')


PROFILE = textwrap.dedent("""\
    name: bench-one-core
    description: one core, one intra-op thread, batch {batch}
    intra_op_threads: 1
    inter_op_threads: 1
    allow_spinning: false
    batch_size: {batch}
    """)

RAW = textwrap.dedent("""\
    import json, sys, time
    from pathlib import Path
    from retail_cv.runtime import Predictor
    bundle, profile, pub, rounds, files = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5:]
    p = Predictor.from_bundle(bundle, profile=profile, trusted_keys=[pub])
    data = [Path(f).read_bytes() for f in files]
    b = p.batch_size
    calls = [data[i:i + b] for i in range(0, len(data) - b + 1, b)]  # one call per server batch, as the server makes them
    for c in calls: p.predict_batch(c)  # warm-up
    rates = []
    for _ in range(rounds):  # each round passes over the photos for at least 5 s, as long as an HTTP round
        n, t0 = 0, time.perf_counter()
        while (t := time.perf_counter() - t0) < 5:
            for c in calls: p.predict_batch(c)
            n += b * len(calls)
        rates.append(n / t)
    print(json.dumps(rates))
    """)


def raw_rate(bundle: Path, profile: Path, pub: Path, pics: list[Path], rounds: int) -> list[float]:
    "Images/s of `predict_batch` per round, pinned to core 0."
    out = subprocess.run(['taskset', '-c', '0', sys.executable, '-c', RAW, str(bundle), str(profile), str(pub), str(rounds),
                          *map(str, pics)], capture_output=True, text=True, check=True, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    return json.loads(out.stdout.strip().splitlines()[-1])


LOAD = textwrap.dedent("""\
    import http.client, json, sys, threading, time
    from urllib.parse import urlsplit
    url, token, seconds, clients, files = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), sys.argv[5:]
    host, port = urlsplit(url).hostname, urlsplit(url).port
    data = [open(f, 'rb').read() for f in files]
    lat, errors, lock = [], [], threading.Lock()
    start = time.perf_counter() + 1.0; stop = start + seconds
    headers = {'Authorization': 'Bearer ' + token, 'Content-Type': 'image/jpeg'}
    def post(c, body):  # stdlib http.client on a kept-alive connection: the lightest client, so the server is measured
        c.request('POST', '/v1/predict', body=body, headers=headers); r = c.getresponse(); r.read(); return r.status
    def client(k):
        c, i = http.client.HTTPConnection(host, port, timeout=60), k
        post(c, data[i % len(data)])  # warm-up, connection open
        while time.perf_counter() < start: time.sleep(0.001)
        while (t0 := time.perf_counter()) < stop:
            status = post(c, data[i % len(data)]); t1 = time.perf_counter()
            with lock: (lat.append(t1 - t0) if status == 200 else errors.append(status))
            i += clients
        c.close()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads: t.start()
    for t in threads: t.join()
    print(json.dumps({'latencies': lat, 'errors': errors, 'seconds': seconds}))
    """)


def serve_rate(bundle: Path, profile: Path, pub: Path, token_pub: Path, token: str, pics: list[Path], seconds: float,
               clients: int, batch: int, tmp: Path) -> dict:
    "Server pinned to core 0, load generator to core 1: images/s and latency percentiles."
    from retail_cv.serve import free_port
    port = free_port()
    cmd = ['taskset', '-c', '0', CLI, '-w', str(tmp/'ws'), 'serve', str(bundle), '--profile', str(profile), '--port', str(port),
           '--trusted-keys', str(pub), '--token-keys', str(token_pub), '--watch', '0']
    if batch > 1: cmd += ['--batch-wait-ms', '5', '--batch-images', str(batch)]
    srv = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    try:
        import httpx
        for _ in range(600):
            try:
                if httpx.get(f'http://127.0.0.1:{port}/readyz').status_code == 200: break
            except httpx.HTTPError: pass
            if srv.poll() is not None: sys.exit(f"server exited: {srv.stderr.read()[-2000:]}")
            time.sleep(0.1)
        out = subprocess.run(['taskset', '-c', '1', sys.executable, '-c', LOAD, f'http://127.0.0.1:{port}', token, str(seconds),
                              str(clients), *map(str, pics)], capture_output=True, text=True, check=True)
        res = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        srv.terminate(); srv.wait(30)
    lat = sorted(res['latencies'])
    q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] * 1000
    return {'images_per_s': len(lat) / res['seconds'], 'requests': len(lat), 'errors': len(res['errors']),
            'p50_ms': q(0.50), 'p99_ms': q(0.99), 'concurrency': clients}


def bench_kind(kind: str, args, tmp: Path, key, pub: Path, token_pub: Path, token: str) -> dict:
    pics = photos(kind, args.images)
    big = 8 if kind == 'classification' else 4
    dyn = make_bundle(kind, tmp, pics, 1, key)
    bundles = {1: dyn, big: dyn if kind == 'classification' else make_bundle(kind, tmp, pics, big, key)}
    profiles = {}
    for b in (1, big):
        profiles[b] = tmp/f'{kind}-profile-b{b}.yaml'; profiles[b].write_text(PROFILE.format(batch=b))
    raw = {b: raw_rate(bundles[b], profiles[b], pub, pics, args.rounds) for b in (1, big)}
    raw_med = {b: statistics.median(r) for b, r in raw.items()}
    pays = raw_med[big] > 1.1 * raw_med[1]
    out = {'photos': len(pics), 'raw_images_per_s': {str(b): {'median': raw_med[b], 'rounds': raw[b]} for b in raw},
           'batching_pays': pays, 'batch_compared': big, 'runs': []}
    for b in ([1, big] if pays else [1]):
        rounds = [serve_rate(bundles[b], profiles[b], pub, token_pub, token, pics, args.seconds, args.concurrency, b, tmp)
                  for _ in range(args.rounds)]
        med = {k: statistics.median(r[k] for r in rounds) for k in ('images_per_s', 'p50_ms', 'p99_ms')}
        ratio = med['images_per_s'] / raw_med[b]
        out['runs'].append({'server_batch': b, **med, 'errors': sum(r['errors'] for r in rounds), 'raw_images_per_s': raw_med[b],
                            'http_over_raw': ratio, 'target': 0.8, 'meets_target': ratio >= 0.8, 'rounds': rounds})
        print(f"{kind} batch {b}: HTTP {med['images_per_s']:.1f} img/s vs raw {raw_med[b]:.1f} ({ratio:.2f}), "
              f"p50 {med['p50_ms']:.1f} ms, p99 {med['p99_ms']:.1f} ms at concurrency {args.concurrency}", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--images', type=int, default=48)
    ap.add_argument('--seconds', type=float, default=15)
    ap.add_argument('--concurrency', type=int, default=8)
    ap.add_argument('--rounds', type=int, default=3)
    ap.add_argument('--kinds', nargs='+', default=['classification', 'detection'])
    ap.add_argument('--out', type=Path, default=ROOT/'bench'/'results'/'serve.json')
    args = ap.parse_args()
    if (os.cpu_count() or 1) < 2: sys.exit("needs two cores: the server on one, the load generator on the other")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from retail_cv.credentials import issue_token
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        key, issuer = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
        pem = serialization.PublicFormat.SubjectPublicKeyInfo
        pub = tmp/'bundle-key.pub'; pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM, pem))
        token_pub = tmp/'issuer.pub'; token_pub.write_bytes(issuer.public_key().public_bytes(serialization.Encoding.PEM, pem))
        token = issue_token(issuer, 'bench', ['predict'])
        results = {k: bench_kind(k, args, tmp, key, pub, token_pub, token) for k in args.kinds}
    doc = {'benchmark': 'serve', 'date': dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds'),
           'machine': {'cpus': os.cpu_count(), 'processor': platform.processor() or platform.machine(), 'python': platform.python_version()},
           'settings': vars(args) | {'out': str(args.out)}, 'results': results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + '\n')
    print(f"wrote {args.out}")


if __name__ == '__main__':
    main()
