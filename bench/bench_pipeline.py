"""Images/s of one training epoch: per-item PIL decode+resize vs the decoded uint8 memmap cache.

Same JPEGs, same output (uint8 3 x S x S, stretched), same DataLoader settings (batch size, workers, shuffling).
Writes bench/results/pipeline.json with the median of the repeats and the ratio cache / PIL.

    python bench/bench_pipeline.py                  # 2,000 JPEGs of 640x480 -> 128 px
    python bench/bench_pipeline.py --n 200 --repeats 2   # a quick look
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader

from retail_cv.core import atomic_write
from retail_cv.data.formats import Annotation, Category, Dataset, ImageRecord
from retail_cv.data.loading import ClassificationDataModule

warnings.filterwarnings('ignore', category=DeprecationWarning)
RESULTS = Path(__file__).resolve().parent/'results'/'pipeline.json'


def make_jpegs(root: Path, n: int, width: int, height: int, seed: int = 0) -> Dataset:
    "Write `n` shelf-like JPEGs (gradient, coloured boxes, sensor noise) and return them as a classification dataset."
    rng = np.random.default_rng(seed)
    (root/'img').mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 // width, yy * 255 // height, (xx + yy) * 255 // (width + height)], -1).astype(np.int16)
    cats = [Category(i + 1, f'product_{i}') for i in range(10)]
    ims, anns = [], []
    for i in range(n):
        name = f'img/{i:05d}.jpg'
        if not (root/name).exists():
            arr = np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)
            im = Image.fromarray(arr)
            d = ImageDraw.Draw(im)
            for _ in range(12):
                x, y = int(rng.integers(0, width - 60)), int(rng.integers(0, height - 80))
                d.rectangle([x, y, x + int(rng.integers(20, 60)), y + int(rng.integers(30, 80))], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
            im.save(root/name, quality=90)
        ims.append(ImageRecord(i + 1, name, width, height))
        anns.append(Annotation(i + 1, i + 1, 1 + i % 10))
    return Dataset(root, 'classification', cats, ims, anns)


class PILItems(torch.utils.data.Dataset):
    "The baseline: open, decode and resize each JPEG with Pillow on every access."
    def __init__(self, root: Path, files: list[str], labels: list[int], size: int):
        self.root, self.files, self.labels, self.size = root, files, labels, size
    def __len__(self) -> int: return len(self.files)
    def __getitem__(self, i: int):
        with Image.open(self.root/self.files[i]) as im:
            im = im.convert('RGB').resize((self.size, self.size), Image.BILINEAR)
            x = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)
        return x, self.labels[i]


def epoch_rate(loader, after=None) -> float:
    "Images per second of one full pass over `loader` (optionally applying `after` to each batch)."
    t, n = time.perf_counter(), 0
    for batch in loader:
        if after is not None: batch = after(batch)
        n += len(batch[0])
    return n / (time.perf_counter() - t)


def measure(variants: dict, repeats: int) -> dict:
    "One warm-up epoch per variant (workers start, pages load), then `repeats` rounds, each timing every variant once."
    for loader, after in variants.values(): epoch_rate(loader, after)
    rates = {name: [] for name in variants}
    for _ in range(repeats):  # interleaved, so load from other processes hits every variant alike
        for name, (loader, after) in variants.items(): rates[name].append(epoch_rate(loader, after))
    return {name: {'median_img_s': round(statistics.median(r), 1), 'runs_img_s': [round(v, 1) for v in r]} for name, r in rates.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--n', type=int, default=2000, help='number of JPEGs')
    ap.add_argument('--width', type=int, default=640)
    ap.add_argument('--height', type=int, default=480)
    ap.add_argument('--size', type=int, default=128, help='training resolution (square)')
    ap.add_argument('--batch-size', type=int, default=64)
    ap.add_argument('--workers', type=int, default=2, help='DataLoader workers for both paths')
    ap.add_argument('--repeats', type=int, default=5)
    ap.add_argument('--data-dir', type=Path, default=None, help='keep the JPEGs here (default: a temporary folder)')
    ap.add_argument('--out', type=Path, default=RESULTS)
    args = ap.parse_args()

    load_start = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix='bench-pipeline-'))
    data = args.data_dir or work/'data'
    t = time.perf_counter()
    ds = make_jpegs(data, args.n, args.width, args.height)
    print(f"{args.n} JPEGs ready in {time.perf_counter() - t:.1f} s "
          f"({sum((data/im.file_name).stat().st_size for im in ds.images) / args.n / 1024:.0f} KiB each)")
    common = dict(batch_size=args.batch_size, shuffle=True, num_workers=args.workers, drop_last=False,
                  persistent_workers=args.workers > 0, generator=torch.Generator().manual_seed(0))

    files, labels = [im.file_name for im in ds.images], [a.category_id - 1 for a in ds.annotations]
    pil_loader = DataLoader(PILItems(data, files, labels, args.size), **common)

    def module(**kw):
        return ClassificationDataModule(ds, image_size=args.size, resize='stretch', batch_size=args.batch_size,
                                        val_fraction=0.0, drop_last=False, cache_dir=work/'cache', progress=False, **kw)
    t = time.perf_counter()
    dm = module(num_workers=args.workers)
    dm.setup()
    build_s = time.perf_counter() - t
    print(f"cache built once in {build_s:.1f} s ({args.n / build_s:.0f} img/s, {dm.source.images.nbytes / 2**20:.0f} MiB)")
    dm0 = module(num_workers=0); dm0.setup()
    dmd = module(num_workers=args.workers, cache=False); dmd.setup()
    res = measure({'pil': (pil_loader, None), 'cache': (dm.train_dataloader(), None),
                   'cache_no_workers': (dm0.train_dataloader(), None),
                   'cache_plus_cpu_batch_augment': (dm.train_dataloader(), lambda b: dm.augment_batch(b, train=True)),
                   'torchvision_decode_per_item_no_cache': (dmd.train_dataloader(), None)}, args.repeats)
    pil, cache = res.pop('pil'), res.pop('cache')
    print(f"(a) PIL decode+resize per item: {pil['median_img_s']:.0f} img/s")
    print(f"(b) uint8 memmap cache:         {cache['median_img_s']:.0f} img/s")
    print('    extra: ' + '; '.join(f"{k} {v['median_img_s']:.0f}" for k, v in res.items()) + ' img/s')

    ratio = cache['median_img_s'] / pil['median_img_s']
    result = {
        'benchmark': 'pipeline', 'what': 'images/s of one shuffled training epoch, median of repeats after one warm-up epoch',
        'images': args.n, 'source_size': [args.width, args.height], 'train_size': args.size, 'batch_size': args.batch_size,
        'num_workers': args.workers, 'repeats': args.repeats,
        'pil_per_item': pil, 'uint8_memmap_cache': cache, 'ratio_cache_over_pil': round(ratio, 2),
        'cache_build_seconds': round(build_s, 2), 'cache_mib': round(dm.source.images.nbytes / 2**20, 1),
        'ratio_per_round': [round(c / p, 1) for c, p in zip(cache['runs_img_s'], pil['runs_img_s'])],
        'extra': res,
        'notes': 'JPEGs and cache file both in the OS page cache (warm); CPU only; variants timed in interleaved rounds; '
                 'the cache build is a one-off cost per (dataset version, resolution, resize mode).',
        'load_average_1m': {'start': round(load_start, 2), 'end': round(os.getloadavg()[0], 2)},
        'machine': {'cpus': os.cpu_count(), 'platform': platform.platform(), 'python': platform.python_version(),
                    'torch': torch.__version__, 'pillow': Image.__version__},
    }
    atomic_write(args.out, json.dumps(result, indent=1))
    print(f"cache / PIL = {ratio:.1f}x -> {args.out}")


if __name__ == '__main__':
    main()
