"""Rebuild `retail_cv/assets/grocery_sample/` from the full Grocery Store Dataset.

Usage: python bench/make_grocery_sample.py [SOURCE] [DEST]
SOURCE defaults to ../shared/data/grocery (train.txt, val.txt, classes.csv, images), DEST to the package asset folder.
The sample keeps the dataset's own list format and class ids: a few fine classes from several coarse classes,
the first N images of each per split, downscaled with Pillow to at most 256 px on the long side (JPEG, quality 85).
The choice is fixed by name and order, so running it twice gives the same files.
"""
from __future__ import annotations

import csv
import io
import shutil
import sys
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from retail_cv.core import atomic_write  # noqa: E402

FINE = ['Golden-Delicious', 'Granny-Smith', 'Banana', 'Bravo-Apple-Juice', 'Oatly-Oat-Milk', 'Carrots', 'Beef-Tomato']
PER_SPLIT = {'train': 10, 'val': 3}
MAX_SIDE = 256


def main(src: Path, dst: Path) -> None:
    with open(src/'classes.csv', newline='', encoding='utf-8') as f: rows = list(csv.reader(f))
    header, rows = rows[0], [r for r in rows[1:] if r and r[0] in FINE]
    assert len(rows) == len(FINE), f"classes not found in {src/'classes.csv'}"
    ids = {r[1] for r in rows}
    if dst.exists(): shutil.rmtree(dst)
    dst.mkdir(parents=True)
    out = io.StringIO(); w = csv.writer(out, lineterminator='\n'); w.writerow(header); w.writerows(rows)
    atomic_write(dst/'classes.csv', out.getvalue())
    total = 0
    for split, n in PER_SPLIT.items():
        kept, per_class = [], {}
        for line in (src/f'{split}.txt').read_text().splitlines():
            path, fine, coarse = [p.strip() for p in line.split(',')]
            if fine not in ids or per_class.get(fine, 0) >= n: continue
            per_class[fine] = per_class.get(fine, 0) + 1
            with Image.open(src/path.lstrip('/')) as im:
                im = im.convert('RGB'); im.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
                buf = io.BytesIO(); im.save(buf, 'JPEG', quality=85, optimize=True)
            total += len(buf.getvalue())
            atomic_write(dst/path.lstrip('/'), buf.getvalue())
            kept.append(f"{path}, {fine}, {coarse}")
        atomic_write(dst/f'{split}.txt', '\n'.join(kept) + '\n')
    shutil.copyfile(src/'LICENSE', dst/'LICENSE')
    atomic_write(dst/'README.md', README)
    print(f"wrote {dst}: {total/1e6:.2f} MB of images")


README = """# Grocery Store Dataset: small sample

A few real photos from the Grocery Store Dataset, shipped with retail_cv for tests, the quickstart and demos.
Seven fine classes (Golden-Delicious, Granny-Smith, Banana, Bravo-Apple-Juice, Oatly-Oat-Milk, Carrots,
Beef-Tomato) from six coarse classes across fruit, packages and vegetables; 10 train and 3 val images per class,
downscaled to at most 256 px on the long side. The files keep the dataset's own layout: `train.txt` and `val.txt`
list `path, fine_class_id, coarse_class_id`, and `classes.csv` names the classes with their original ids.
Rebuild it with `python bench/make_grocery_sample.py`.

Source: Marcus Klasson, Cheng Zhang, Hedvig Kjellström, "A Hierarchical Grocery Store Image Dataset with Visual
and Semantic Labels", IEEE Winter Conference on Applications of Computer Vision (WACV), 2019.
https://github.com/marcusklasson/GroceryStoreDataset. Released under the MIT licence, reproduced in `LICENSE`.
"""

if __name__ == '__main__':
    root = Path(__file__).resolve().parents[1]
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else root.parent/'shared'/'data'/'grocery'
    dst = Path(sys.argv[2]) if len(sys.argv) > 2 else root/'retail_cv'/'assets'/'grocery_sample'
    main(src, dst)
