"""Time load_dataset and validate_dataset on a real dataset (default: the full Grocery Store train+val set).

Usage: python bench/bench_validate.py [DATASET] [--workers N ...]  -> JSON on stdout
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from retail_cv.data.formats import load_dataset  # noqa: E402
from retail_cv.data.validate import validate_dataset  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument('dataset', nargs='?', default=str(Path(__file__).resolve().parents[2]/'shared'/'data'/'grocery'))
    ap.add_argument('--workers', type=int, nargs='+', default=[1, 2 * (os.cpu_count() or 1)])
    a = ap.parse_args()
    t = time.perf_counter(); ds = load_dataset(a.dataset); load_s = time.perf_counter() - t
    runs = []
    for w in a.workers:
        r = validate_dataset(ds, workers=w)
        runs.append({'workers': w, 'seconds': round(r.seconds, 3), 'images_per_s': round(r.n_images / r.seconds, 1), 'ok': r.ok})
    print(json.dumps({'dataset': a.dataset, 'format': ds.info.get('source_format'), 'images': len(ds.images),
                      'load_seconds': round(load_s, 3), 'validate': runs, 'cpus': os.cpu_count(),
                      'python': platform.python_version()}, indent=1))


if __name__ == '__main__':
    main()
