"""Throughput of the synthetic shelf generator, per core, against the 10 images/s target at 640x480.

Usage: python bench/bench_synth.py [--images N] [--repeats R] [--out bench/results/synth.json]

Three measurements, each the median of R repeats in this one process with OpenCV held to one thread:
- render: `ShelfRenderer.render` + `encode_jpeg` in memory (the generator's own work per image);
- generate: `generate_shelves` end to end into a fresh folder (catalogue drawing, atomic fsynced writes, COCO,
  planogram, price table, manifest);
- cpu: process CPU seconds per rendered image, which does not move when other jobs share the machine.
Wall-clock rates are what the target is judged on; the CPU figure tells how much of a shortfall is the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from retail_cv.core import atomic_write  # noqa: E402
from retail_cv.data.synth import ShelfRenderer, encode_jpeg, generate_shelves, synth_config  # noqa: E402

TARGET = 10.0  # images per second per core at 640x480


def bench_render(n: int, repeats: int, seed: int = 0) -> tuple[list[float], list[float]]:
    "Images/s (wall) and CPU seconds per image of render + encode, per repeat (catalogue already drawn)."
    r = ShelfRenderer(synth_config(seed=seed))
    for i in range(3): encode_jpeg(r.render(i).image)  # warm the sprite and tag caches
    rates, cpu = [], []
    for rep in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        for i in range(n):
            sc = r.render(rep * n + i)
            encode_jpeg(sc.image, sc.jpeg_quality)
        wall, used = time.perf_counter() - w0, time.process_time() - c0
        rates.append(n / wall); cpu.append(used / n)
    return rates, cpu


def bench_generate(n: int, repeats: int, workers: int = 1) -> list[float]:
    "Images/s of `generate_shelves` end to end into fresh folders."
    rates = []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(repeats):
            t0 = time.perf_counter()
            generate_shelves(Path(tmp)/f'run{rep}', images=n, seed=rep, workers=workers)
            rates.append(n / (time.perf_counter() - t0))
    return rates


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--images', type=int, default=40, help='images per repeat')
    p.add_argument('--repeats', type=int, default=5, help='repeats; the median is reported')
    p.add_argument('--out', type=Path, default=Path(__file__).resolve().parent/'results'/'synth.json')
    args = p.parse_args(argv)
    cv2.setNumThreads(1)  # one core: the target is per core
    load = os.getloadavg() if hasattr(os, 'getloadavg') else None
    render, cpu = bench_render(args.images, args.repeats)
    generate = bench_generate(args.images, max(3, args.repeats // 2))
    import numpy, PIL, zxingcpp  # noqa: E401
    res = {
        'benchmark': 'synthetic shelf generator, 640x480, default options, single process, cv2 threads = 1',
        'target_img_per_s_per_core': TARGET,
        'images_per_repeat': args.images, 'repeats': args.repeats,
        'render_img_per_s_median': round(statistics.median(render), 2),
        'render_img_per_s_runs': [round(v, 2) for v in render],
        'render_ratio_to_target': round(statistics.median(render) / TARGET, 2),
        'render_cpu_ms_per_image_median': round(statistics.median(cpu) * 1000, 2),
        'render_cpu_img_per_s': round(1 / statistics.median(cpu), 2),
        'generate_img_per_s_median': round(statistics.median(generate), 2),
        'generate_img_per_s_runs': [round(v, 2) for v in generate],
        'generate_ratio_to_target': round(statistics.median(generate) / TARGET, 2),
        'machine': {'cpu_count': os.cpu_count(), 'platform': platform.platform(), 'python': platform.python_version(),
                    'loadavg_at_start': [round(v, 2) for v in load] if load else None},
        'versions': {'numpy': numpy.__version__, 'opencv': cv2.__version__, 'pillow': PIL.__version__,
                     'zxingcpp': getattr(zxingcpp, '__version__', 'unknown')},
    }
    atomic_write(args.out, json.dumps(res, indent=1) + '\n')
    print(json.dumps(res, indent=1))
    return res


if __name__ == '__main__':
    main()
