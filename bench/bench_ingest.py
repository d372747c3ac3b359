"""Ingest throughput of the dataset store: 10,000 small JPEGs, cold (empty workspace) and warm (re-ingest).

Usage: python bench/bench_ingest.py [--files N] [--repeats R] [--out bench/results/ingest.json]

Each file is a distinct 64x48 JPEG (about 1-2 KB) with one COCO box, written once to a temporary folder. Their
timestamps are set a minute into the past, as for photos copied in earlier: the hash cache does not trust an entry
hashed within 2 s of the file's last change (see the store chapter), and a benchmark should not time that window.
"cold" is a fresh workspace each repeat (every file hashed, checked for metadata and stored, then one os.sync);
"warm" re-ingests into the same workspace (hashes from the cache, objects already present, nothing written).
Source files are in the OS page cache in both cases; the numbers are about the store, not the disk.
Default ingest options are used (strip_exif=True, no face anonymisation); an encrypted cold ingest is timed too.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from retail_cv.core import Workspace, atomic_write  # noqa: E402
from retail_cv.data.formats import Annotation, Category, Dataset, ImageRecord, write_coco  # noqa: E402
from retail_cv.data.privacy import generate_key  # noqa: E402
from retail_cv.data.store import DatasetStore  # noqa: E402


def make_files(root: Path, n: int, seed: int = 0) -> Path:
    "Write `n` distinct small JPEGs and a COCO file naming them; return the COCO path."
    rng = np.random.default_rng(seed)
    base = rng.integers(60, 200, (48, 64, 3), dtype=np.uint8)
    images, anns = [], []
    for i in range(n):
        px = base.copy()
        x, y = i % 40, (i // 40) % 24
        px[y:y + 20, x:x + 20] = ((i * 7) % 256, (i * 13) % 256, (i * 29) % 256)
        px[40:48, 0:8], px[40:48, 8:16] = i % 256, i // 256  # the index in two flat 8x8 blocks: every file distinct
        rel = f'img/{i // 1000:02d}/{i:05d}.jpg'
        (root/rel).parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO(); Image.fromarray(px).save(buf, 'JPEG', quality=85)
        (root/rel).write_bytes(buf.getvalue())
        images.append(ImageRecord(i, rel, 64, 48)); anns.append(Annotation(i, i, 1, (float(x), float(y), 20.0, 20.0)))
    past = time.time() - 60
    for p in (root/'img').rglob('*.jpg'): os.utime(p, (past, past))
    return write_coco(Dataset(root, 'detection', [Category(1, 'product')], images, anns), root/'labels.json')


def timed_ingest(store: DatasetStore, labels: Path, **kw) -> dict:
    v = store.ingest(labels, 'bench', progress=False, **kw)
    s = v.stats
    return {'seconds': s.seconds, 'files_per_s': s.files_per_s, 'hashed': s.hashed, 'objects_written': s.objects_written,
            'version_id': v.id}


def summary(runs: list[dict]) -> dict:
    secs = statistics.median(r['seconds'] for r in runs)
    return {'median_s': round(secs, 4), 'files_per_s': round(runs[0]['files'] / secs, 1) if 'files' in runs[0] else None,
            'runs_s': [round(r['seconds'], 4) for r in runs], 'hashed': runs[-1]['hashed'],
            'objects_written': runs[-1]['objects_written']}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--files', type=int, default=10_000)
    ap.add_argument('--repeats', type=int, default=3)
    ap.add_argument('--out', type=Path, default=Path(__file__).resolve().parent/'results'/'ingest.json')
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix='bench-ingest-'))
    try:
        t = time.perf_counter(); labels = make_files(tmp/'src', args.files); made = time.perf_counter() - t
        key = generate_key(tmp/'bench.key')
        results: dict[str, list[dict]] = {'cold': [], 'warm': [], 'cold_encrypted': []}
        ids = set()
        for r in range(args.repeats):
            store = DatasetStore(Workspace.open(tmp/f'ws{r}'))
            results['cold'].append(timed_ingest(store, labels))
            results['warm'].append(timed_ingest(store, labels))
            estore = DatasetStore(Workspace.open(tmp/f'ws-enc{r}'))
            results['cold_encrypted'].append(timed_ingest(estore, labels, key=key))
            ids.add(results['cold'][-1]['version_id']); ids.add(results['warm'][-1]['version_id'])
            for ws in (tmp/f'ws{r}', tmp/f'ws-enc{r}'): shutil.rmtree(ws)
        assert len(ids) == 1, f"cold and warm ingests gave different version ids: {ids}"
        for runs in results.values():
            for run in runs: run['files'] = args.files
        out = {'benchmark': 'dataset store ingest', 'files': args.files, 'repeats': args.repeats,
               'file_bytes_mean': round(sum(p.stat().st_size for p in (tmp/'src'/'img').rglob('*.jpg')) / args.files, 1),
               'options': {'strip_exif': True, 'anonymise_faces': False},
               'make_files_s': round(made, 2),
               **{k: summary(v) for k, v in results.items()},
               'machine': {'cpus': os.cpu_count(), 'python': platform.python_version(), 'platform': platform.platform()},
               'created': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}
        atomic_write(args.out, json.dumps(out, indent=1) + '\n')
        print(json.dumps(out, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == '__main__':
    main()
