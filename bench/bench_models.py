"""CPU latency of the default models: eager PyTorch against ONNX Runtime fp32, batch 1.

Usage: python bench/bench_models.py [--runs 50] [--warmup 10] [--repeats 3] [--out bench/results/models.json]

Two models, both from `retail_cv.models` with fresh weights and BatchNorm statistics recalibrated on random images
(an untrained network's activations otherwise die out and its detector scores tie, which is not what a trained one
costs): MobileNetV3-small at 224 (1000 classes), and the default detector at 320 (10 classes). For the detector,
a classification prior bias, where the architecture has one, is zeroed so every candidate passes the score
threshold: post-processing is timed at its full load.

Each repeat times an eager block, then an ORT block: `warmup` untimed calls, `runs` timed ones, and a pause, because
ORT's and OpenMP's worker threads spin for a while after a call, and on two cores calls interleaved one by one slow
each other down several-fold. The result keeps the repeat with the lowest eager+ORT median (the one least disturbed
by other work on a shared machine) beside all repeats. The outputs are checked against each other first.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from retail_cv.core import atomic_write  # noqa: E402
from retail_cv.models import ModelSpec, build_model, example_input, recalibrate_batchnorm, to_onnx, wrap  # noqa: E402


def block_ms(fn, runs: int, warmup: int) -> list[float]:
    "Per-call milliseconds of `runs` calls after `warmup` untimed ones, then a pause for spinning threads to idle."
    for _ in range(warmup): fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter(); fn(); times.append((time.perf_counter() - t0) * 1e3)
    time.sleep(0.5)  # ORT's and OpenMP's worker threads spin after a call; on 2 cores they would slow the next block
    return times


def summary(ms: list[float]) -> dict:
    q = np.percentile(ms, [10, 90])
    return {'median_ms': round(statistics.median(ms), 3), 'p10_ms': round(float(q[0]), 3), 'p90_ms': round(float(q[1]), 3)}


def bench(spec: ModelSpec, folder: Path, runs: int, warmup: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = recalibrate_batchnorm(build_model(spec), example_input(spec, 4, seed=9))
    if spec.task == 'detection':
        for m in model.modules():
            if hasattr(m, 'cls_logits'):
                with torch.no_grad(): m.cls_logits.bias.zero_()
    module = wrap(model, spec)
    x = module.example_input(1, seed=1)
    xn = x.numpy()
    path = to_onnx(module, folder/f'{spec.arch}.onnx')
    sess = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    with torch.inference_mode(): ref = [t.numpy() for t in (module(x) if spec.task == 'detection' else (module(x),))]
    got = sess.run(None, {'images': xn})
    if spec.task == 'classification':
        parity = {'max_abs_logit_diff': float(np.abs(got[0] - ref[0]).max())}
    else:
        parity = {'top10_max_box_diff_px': float(np.abs(got[0][0, :10] - ref[0][0, :10]).max()),
                  'max_sorted_score_diff': float(np.abs(np.sort(got[1]) - np.sort(ref[1])).max()),
                  'top10_labels_equal': bool((got[2][0, :10] == ref[2][0, :10]).all()),
                  'detections': int((ref[2] >= 0).sum())}
    reps = []
    with torch.inference_mode():
        for _ in range(repeats):
            load = os.getloadavg()[0]
            te = block_ms(lambda: module(x), runs, warmup)
            to = block_ms(lambda: sess.run(None, {'images': xn}), runs, warmup)
            e, o = summary(te), summary(to)
            reps.append({'eager': e, 'ort_fp32': o, 'speedup': round(e['median_ms'] / o['median_ms'], 2), 'loadavg_1min': load})
    best = min(reps, key=lambda r: r['eager']['median_ms'] + r['ort_fp32']['median_ms'])
    return {'arch': spec.arch, 'task': spec.task, 'image_size': spec.image_size, 'batch': 1, 'num_classes': spec.num_classes,
            'params': sum(p.numel() for p in model.parameters()), 'onnx_bytes': path.stat().st_size,
            'parity': parity, **{k: best[k] for k in ('eager', 'ort_fp32', 'speedup')}, 'repeats': reps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--runs', type=int, default=50, help='timed rounds per repeat (>= 50 for the published numbers)')
    ap.add_argument('--warmup', type=int, default=10, help='untimed rounds first')
    ap.add_argument('--repeats', type=int, default=3, help='repeats; the least disturbed one is reported')
    ap.add_argument('--out', type=Path, default=Path(__file__).resolve().parent/'results'/'models.json')
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = [bench(ModelSpec(arch='mobilenet_v3_small', num_classes=1000, image_size=224), Path(tmp), args.runs, args.warmup, args.repeats),
                   bench(ModelSpec(arch='ssdlite320_mobilenet_v3_large', num_classes=10, image_size=320), Path(tmp), args.runs, args.warmup, args.repeats)]
    out = {'benchmark': 'models', 'created': dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds'),
           'method': f'batch 1, fresh weights with recalibrated BatchNorm; eager block then ORT block; median of {args.runs} '
                     f'calls after {args.warmup} warm-up, least disturbed of {args.repeats} repeats',
           'environment': {'python': platform.python_version(), 'torch': torch.__version__, 'onnxruntime': ort.__version__,
                           'cpu_count': os.cpu_count(), 'torch_threads': torch.get_num_threads(), 'machine': platform.machine(),
                           'processor': platform.processor() or platform.machine()},
           'results': results}
    atomic_write(args.out, json.dumps(out, indent=2) + '\n')
    for r in results:
        print(f"{r['arch']:40} {r['image_size']} px  eager {r['eager']['median_ms']:8.2f} ms  ORT fp32 {r['ort_fp32']['median_ms']:7.2f} ms  {r['speedup']:.2f}x")
    print(f"wrote {args.out}")


if __name__ == '__main__':
    main()
