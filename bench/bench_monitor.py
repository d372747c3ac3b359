"""Calibration and power of the monitor's alert (all its tests together, Holm-corrected) on real shelf photos.

Reference and current samples are disjoint random draws from one pool of images (the Grocery Store dataset by default),
so under no shift they come from the same distribution. Every image is measured once per shift: `image_stats`, and the
outputs and pooled embedding of a small fixed network (tiny_cnn, random weights, BatchNorm recalibrated on the pool,
no training). Then, for each sample size n and each condition, `resamples` reference/current draws are checked with
`retail_cv.monitor.check_drift` exactly as `retail-cv monitor check` does.

  false-positive rate : share of no-shift draws where the alert fires (target <= 0.07 at alpha 0.05, >= 500 draws)
  power               : share of shifted draws where it fires (target >= 0.9 at n = 200), per shift and severity,
                        and per detector family (image statistics, outputs, embeddings) at their Holm verdicts
  novel classes       : 30 % of the current images from classes left out of the reference pool

Usage (full size, on an idle machine; ~1 h on 2 cores):
  python bench/bench_monitor.py [DATASET] --out bench/results/monitor.json
Quick check that it runs (a minute):
  python bench/bench_monitor.py retail_cv/assets/grocery_sample --pool 91 --ref 40 --sizes 30 --resamples 20 \\
      --power-resamples 10 --graded --out /tmp/monitor.json
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from retail_cv.bundle import summarise  # noqa: E402
from retail_cv.monitor import check_drift  # noqa: E402
from retail_cv.preprocess import image_stats, load_image, normalize, postprocess_classification, resize_image  # noqa: E402

FAMILIES = {'image': ('ks.', 'psi.'), 'outputs': ('ks.softmax', 'ks.top1_score', 'chi2.'), 'embedding': ('mmd.',)}


def _jpeg(im: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO(); im.save(buf, 'JPEG', quality=quality); return load_image(buf.getvalue())


def _cast(im: Image.Image, s: float) -> Image.Image:
    "A warm colour cast: red up and blue down by the share `s`."
    a = np.asarray(im, np.float32) * np.array([1 + s, 1.0, 1 - s], np.float32)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


# shift -> {severity label: transform}; the first severity of each is the one the issue names (power >= 0.9 at n = 200)
SHIFTS = {
    'brightness': {'-40%': lambda im: ImageEnhance.Brightness(im).enhance(0.6)},
    'blur': {'sigma 2': lambda im: im.filter(ImageFilter.GaussianBlur(2))},
    'jpeg': {'quality 20': lambda im: _jpeg(im, 20)},
    'colour_cast': {'20%': lambda im: _cast(im, 0.2)},
}
GRADED = {
    'brightness': {f'-{p}%': (lambda f: lambda im: ImageEnhance.Brightness(im).enhance(f))(1 - p / 100) for p in (5, 10, 20)},
    'blur': {f'sigma {s}': (lambda s: lambda im: im.filter(ImageFilter.GaussianBlur(s)))(s) for s in (0.5, 1.0)},
    'jpeg': {f'quality {q}': (lambda q: lambda im: _jpeg(im, q))(q) for q in (70, 50, 35)},
    'colour_cast': {f'{p}%': (lambda s: lambda im: _cast(im, s))(p / 100) for p in (2, 5, 10)},
}


def pool_files(dataset: Path, k: int, rng: np.random.Generator) -> list[Path]:
    files = sorted(p for p in dataset.rglob('*') if p.suffix.lower() in ('.jpg', '.jpeg', '.png'))
    if not files: sys.exit(f"no images under {dataset}")
    return [files[i] for i in sorted(rng.choice(len(files), min(k, len(files)), replace=False))]


def network(image_size: int, calib: list[Image.Image], n_classes: int, seed: int):
    "tiny_cnn with random weights, BatchNorm recalibrated on `calib`: a fixed feature extractor, no training."
    import torch
    from retail_cv.models import ModelSpec, build_model, recalibrate_batchnorm, wrap
    torch.manual_seed(seed)
    from retail_cv.preprocess import as_preprocess_spec
    spec = ModelSpec(arch='tiny_cnn', num_classes=n_classes, image_size=image_size)
    pp = as_preprocess_spec(spec.preprocessing)
    x = torch.from_numpy(normalize(np.stack([resize_image(im, pp)[0] for im in calib]), pp))
    model = wrap(recalibrate_batchnorm(build_model(spec), x, batch_size=64), spec).eval()
    return model, pp


def features(images: list[Image.Image], model, pp, labels: list[str]) -> dict[str, list]:
    "Per image: image statistics, the answer's JSON form and the embedding."
    import torch
    stats, outs, embs = [image_stats(im) for im in images], [], []
    for i in range(0, len(images), 64):
        x = torch.from_numpy(normalize(np.stack([resize_image(im, pp)[0] for im in images[i:i + 64]]), pp))
        with torch.no_grad(): logits, emb = model(x)
        outs += [r.to_dict() for r in postprocess_classification(logits.numpy(), labels)]
        embs += list(emb.numpy())
    return {'stats': stats, 'outputs': outs, 'embeddings': embs}


def summary(f: dict, idx, labels):
    return summarise('classification', labels, [f['stats'][i] for i in idx], [f['outputs'][i] for i in idx],
                     [f['embeddings'][i] for i in idx])


def wilson(k: int, n: int) -> list[float]:
    "95 % Wilson interval of a rate."
    if n == 0: return [0.0, 1.0]
    p, z = k / n, 1.96
    c, h = (p + z * z / (2 * n)) / (1 + z * z / n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(max(0, c - h), 4), round(min(1, c + h), 4)]


def run_condition(clean: dict, cur_feats: dict, ref_pool: np.ndarray, cur_pool: np.ndarray, n_ref: int, n: int, resamples: int,
                  labels, args, seed: int) -> dict:
    "Alert rate (and per-family and per-test rates) over `resamples` disjoint reference/current draws."
    rng = np.random.default_rng(seed)
    fired, fams, tests = 0, {k: 0 for k in FAMILIES}, {}
    t0 = time.perf_counter()
    for r in range(resamples):
        ri = rng.choice(ref_pool, n_ref, replace=False)
        ci = rng.choice(np.setdiff1d(cur_pool, ri), n, replace=False)
        rep = check_drift(summary(clean, ri, labels), summary(cur_feats, ci, labels), alpha=args.alpha,
                          permutations=args.permutations, seed=seed * 100003 + r, min_images=1)
        fired += rep.drift
        names = {t.name for t in rep.drifted}
        for k, prefixes in FAMILIES.items(): fams[k] += any(nm.startswith(prefixes) for nm in names)
        for nm in names: tests[nm] = tests.get(nm, 0) + 1
    return {'n': n, 'resamples': resamples, 'alert_rate': round(fired / resamples, 4), 'ci95': wilson(fired, resamples),
            'family_rate': {k: round(v / resamples, 4) for k, v in fams.items()},
            'test_rate': {k: round(v / resamples, 4) for k, v in sorted(tests.items())},
            'seconds_per_check': round((time.perf_counter() - t0) / resamples, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('dataset', nargs='?', default=str(Path(__file__).resolve().parents[2]/'shared'/'data'/'grocery'))
    ap.add_argument('--pool', type=int, default=3000, help="images drawn from the dataset")
    ap.add_argument('--ref', type=int, default=300, help="reference images per draw (export keeps 300)")
    ap.add_argument('--sizes', type=int, nargs='+', default=[50, 200, 1000], help="current sample sizes n")
    ap.add_argument('--resamples', type=int, default=500, help="no-shift draws per n (false-positive rate)")
    ap.add_argument('--power-resamples', type=int, default=100, help="draws per shift and n (power)")
    ap.add_argument('--graded', action='store_true', help="also graded severities at n = 200 (or the largest size below)")
    ap.add_argument('--alpha', type=float, default=0.05)
    ap.add_argument('--permutations', type=int, default=1000)
    ap.add_argument('--image-size', type=int, default=64, help="input side of the feature network")
    ap.add_argument('--max-side', type=int, default=512, help="photos are reduced to this side first (as cameras vary)")
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--out', default=str(Path(__file__).resolve().parent/'results'/'monitor.json'))
    a = ap.parse_args()
    rng = np.random.default_rng(a.seed)
    t_start = time.perf_counter()
    files = pool_files(Path(a.dataset), a.pool, rng)
    classes = sorted({f.parent.name for f in files})
    novel = set(rng.choice(classes, max(1, len(classes) // 5), replace=False).tolist())  # classes the reference never sees
    images = []
    for f in files:
        im = load_image(f)
        if max(im.size) > a.max_side: im.thumbnail((a.max_side, a.max_side))
        images.append(im)
    is_novel = np.array([f.parent.name in novel for f in files])
    seen_idx, novel_idx = np.flatnonzero(~is_novel), np.flatnonzero(is_novel)
    labels = [c for c in classes if c not in novel] or ['x']
    model, pp = network(a.image_size, [images[i] for i in seen_idx[:256]], len(labels), a.seed)
    t_feat = time.perf_counter()
    clean = features(images, model, pp, labels)
    shifted = {(s, sev): fn for s, sevs in SHIFTS.items() for sev, fn in sevs.items()}
    if a.graded: shifted.update({(s, sev): fn for s, sevs in GRADED.items() for sev, fn in sevs.items()})
    feats = {key: features([fn(im) for im in images], model, pp, labels) for key, fn in shifted.items()}
    feat_s = time.perf_counter() - t_feat
    out = {'dataset': a.dataset, 'pool': len(files), 'classes': len(classes), 'novel_classes': sorted(novel), 'ref': a.ref,
           'alpha': a.alpha, 'permutations': a.permutations, 'correction': 'holm over every test', 'network': f'tiny_cnn {a.image_size} px, random weights, BN recalibrated',
           'false_positive': [], 'power': [], 'graded': [], 'novel': []}
    sizes = [n for n in a.sizes if n + a.ref <= len(seen_idx)]
    out['skipped_sizes'] = [n for n in a.sizes if n not in sizes]
    for n in sizes:
        out['false_positive'].append(run_condition(clean, clean, seen_idx, seen_idx, a.ref, n, a.resamples, labels, a, 1 + n))
        print(f"no shift n={n}: {out['false_positive'][-1]['alert_rate']}", file=sys.stderr)
        for (s, sev), f in feats.items():
            if (s, sev) in {(k, next(iter(v))) for k, v in SHIFTS.items()}:
                out['power'].append({'shift': s, 'severity': sev, **run_condition(clean, f, seen_idx, seen_idx, a.ref, n, a.power_resamples, labels, a, 7 + n)})
                print(f"{s} {sev} n={n}: {out['power'][-1]['alert_rate']}", file=sys.stderr)
        # novel classes: 30 % of the current images from classes outside the reference
        k_new = int(round(0.3 * n))
        if len(novel_idx) >= k_new:
            rr = np.random.default_rng(11 + n); fired = 0; t0 = time.perf_counter()
            for r in range(a.power_resamples):
                ri = rr.choice(seen_idx, a.ref, replace=False)
                ci = np.concatenate([rr.choice(np.setdiff1d(seen_idx, ri), n - k_new, replace=False), rr.choice(novel_idx, k_new, replace=False)])
                fired += check_drift(summary(clean, ri, labels), summary(clean, ci, labels), alpha=a.alpha, permutations=a.permutations,
                                     seed=r, min_images=1).drift
            out['novel'].append({'n': n, 'share': 0.3, 'alert_rate': round(fired / a.power_resamples, 4), 'ci95': wilson(fired, a.power_resamples),
                                 'seconds_per_check': round((time.perf_counter() - t0) / a.power_resamples, 3)})
    if a.graded:
        n = max([m for m in sizes if m <= 200], default=None)
        for (s, sev), f in feats.items():
            if n is not None and sev in GRADED.get(s, {}):
                out['graded'].append({'shift': s, 'severity': sev, **run_condition(clean, f, seen_idx, seen_idx, a.ref, n, a.power_resamples, labels, a, 13 + n)})
    out.update(feature_seconds=round(feat_s, 1), total_seconds=round(time.perf_counter() - t_start, 1), cpus=os.cpu_count(),
               python=platform.python_version(), machine=platform.machine())
    fp = [r['alert_rate'] for r in out['false_positive']]
    p200 = [r['alert_rate'] for r in out['power'] if r['n'] == 200]
    out['verdict'] = {'fpr_max': max(fp) if fp else None, 'fpr_ok': bool(fp) and max(fp) <= 0.07,
                      'power_min_at_200': min(p200) if p200 else None, 'power_ok': bool(p200) and min(p200) >= 0.9}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + '\n')
    print(json.dumps(out['verdict']))


if __name__ == '__main__':
    main()
