"""Price-tag detection on real shelf photos, 5-fold by original photo; writes bench/results/real_shelves.json.

The photos: `../shared/data/shelves-pricetags` (60 = 3 augmented copies x 20 real photos, every price tag boxed,
CC BY 4.0). Fold k holds out every 5th original photo (shuffled with seed 0), with all its copies; the rest trains. No
validation split: the runs train for a fixed time and the last checkpoint is evaluated on the held-out photos (COCO
AP@.5 of the one class, pycocotools through `retail_cv.evaluate`). Each (variant, fold) result is written as soon as it
exists, so a cut run resumes where it stopped; `--force` re-measures.

Variants (`VARIANTS`, in the order of the table; each adds one ingredient to its `BASE`): the old default detector;
the registered MobileNetV3 FPN detectors (FCOS, RetinaNet) at full resolution; the small detector at full resolution; + training on tiles (the shipped recipe); the tiles recipe on synthetic
shelves only, flat and then with each realism option of the generator added in turn (`REALISM`: price-first tags,
Grocery photos as packaging, pictures on the shelf edge, camera roll); synthetic pre-training, then the recipe on
the real photos, on flat and on the most realistic synthetic shelves. Each is a TrainConfig (a recipe file or defined below)
trained through `retail_cv.train.fit` on a dataset version in a fresh workspace, with `max_minutes` as the budget
(CPU-minutes on this machine: run it alone); synthetic pre-training time counts in the budget of every fold it serves.

    python bench/bench_real_shelves.py                                  # every variant, every fold
    python bench/bench_real_shelves.py --variants tiles-5min --folds 0  # one cell of the table
"""
import argparse, dataclasses, json, os, platform, re, shutil, statistics, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from retail_cv.core import Workspace, atomic_write, read_yaml  # noqa: E402
from retail_cv.data.formats import load_dataset  # noqa: E402
from retail_cv.data.loading._config import ROBOFLOW_COPIES  # noqa: E402
from retail_cv.data.store import DatasetStore  # noqa: E402

SHELVES = ROOT.parent/'shared'/'data'/'shelves-pricetags'
OUT = ROOT/'bench'/'results'/'real_shelves.json'
FOLDS = 5

# What each variant adds, in the order of the table. A recipe file is the whole config; the others are defined here.
VARIANTS = {
    'default-5min': ('`retail-cv train detect` as it was (SSDlite at 320 px, whole photos)',
                     dict(arch='ssdlite320_mobilenet_v3_large', max_minutes=5)),
    'fcos-mobilenet-640-5min': ('FCOS on MobileNetV3-Large FPN at 640 px, whole photos, the same optimiser',
                                dict(arch='fcos_mobilenet_v3_large_fpn', image_size=640, batch_size=8, lr=2e-3, scheduler='cosine',
                                     warmup_fraction=0.05, grad_clip=10, max_minutes=5)),
    'retinanet-mobilenet-640-5min': ('RetinaNet on MobileNetV3-Large FPN at 640 px, whole photos, the same optimiser',
                                     dict(arch='retinanet_mobilenet_v3_large_fpn', image_size=640, batch_size=8, lr=2e-3, scheduler='cosine',
                                          warmup_fraction=0.05, grad_clip=10, max_minutes=5)),
    'tiny-full-5min': ('fcos_tiny_fpn at 640 px on whole photos',
                       dict(arch='fcos_tiny_fpn', batch_size=8, lr=2e-3, scheduler='cosine', warmup_fraction=0.05, grad_clip=10, max_minutes=5,
                            pipeline=dict(tile_size=None, tile_zoom=[1.0, 1.0], brightness=0.2, contrast=0.2))),  # not its defaults' tiles
    'tiles-5min': ('+ 320 px tiles at zoom 0.6-1.5', 'recipes/shelf-tags-fcos_tiny-5min.yaml'),
    'synthetic-only-5min': ('the tiles recipe on synthetic shelves only (no real photo)', 'recipes/shelf-tags-fcos_tiny-5min.yaml'),
    'synthetic-only-5min+price-tags': ('+ tags printed price-first at real tag sizes (tag_style=price)', 'recipes/shelf-tags-fcos_tiny-5min.yaml'),
    'synthetic-only-5min+faces': ('+ Grocery photos as packaging (faces)', 'recipes/shelf-tags-fcos_tiny-5min.yaml'),
    'synthetic-only-5min+edge-clutter': ('+ product pictures on the shelf edge (edge_clutter)', 'recipes/shelf-tags-fcos_tiny-5min.yaml'),
    'synthetic-only-5min+roll': ('+ camera roll up to 5 degrees (roll)', 'recipes/shelf-tags-fcos_tiny-5min.yaml'),
    'synthetic-then-real-10min': ('5 min on synthetic shelves, then the tiles recipe on the real photos',
                                  'recipes/shelf-tags-fcos_tiny-5min.yaml'),
    'synthetic-then-real-10min+realism': ('the same on realistic synthetic shelves (the options that helped: price-first tags, faces, edge clutter)',
                                          'recipes/shelf-tags-fcos_tiny-5min.yaml'),
}
# Synthetic shelves for the synthetic variants: square like the real photos, QR tags of real tag size (25-50 px),
# price tags as the only class. Each realism level is rendered and trained once (the same model serves every fold),
# its training time counted per fold; rendering is data preparation and not counted.
GROCERY = ROOT.parent/'shared'/'data'/'grocery'/'train'
SYNTH = dict(images=400, width=640, height=640, labels='kinds', symbology='qr', qr_module_px=(1.2, 1.8), shelves=(3, 5), seed=11)
REALISM = {  # cumulative, in the order of the table: each level adds one option to the one before
    'flat': {}, 'price-tags': dict(tag_style='price'), 'faces': dict(faces=str(GROCERY), skus=200),
    'edge-clutter': dict(edge_clutter=0.8), 'roll': dict(roll=5.0)}
SYNTHETIC_LEVEL = {'synthetic-only-5min': 'flat', 'synthetic-only-5min+price-tags': 'price-tags',
                   'synthetic-only-5min+faces': 'faces', 'synthetic-only-5min+edge-clutter': 'edge-clutter',
                   'synthetic-only-5min+roll': 'roll', 'synthetic-then-real-10min': 'flat',
                   'synthetic-then-real-10min+realism': 'edge-clutter'}


def _synth_options(level: str) -> dict:
    "The generator options of a realism level: the base, and every level up to and including it."
    names = list(REALISM)
    out = dict(SYNTH)
    for name in names[:names.index(level) + 1]: out.update(REALISM[name])
    return out


COMMON = dict(task='detection', schedule_clock='time', epochs=100_000, sample_predictions=0, wandb_mode='disabled',
              progress_bar=False)


def _config(variant: str) -> dict:
    "The TrainConfig values of a variant."
    spec = VARIANTS[variant][1]
    cfg = read_yaml(ROOT/spec, 'recipe') if isinstance(spec, str) else dict(spec)
    return {**COMMON, **cfg}


def _photos(tmp: Path):
    "The shared photos as a YOLO dataset (copied: ingest refuses symlinks out of the root), and each image's original photo."
    src = tmp/'pricetags'
    for d in ('images', 'labels'): shutil.copytree(SHELVES/d, src/d, dirs_exist_ok=True)
    (src/'classes.txt').write_text('price_tag\n')
    ds = load_dataset(src, 'yolo')
    originals = [re.match(ROBOFLOW_COPIES, Path(im.file_name).name).group(1) for im in ds.images]
    return ds, originals


def _fold(ds, originals, k: int):
    "The dataset with fold k's photos (every copy of every 5th original, in a seeded order) as 'test', the rest 'train'."
    import random
    names = sorted(set(originals))
    random.Random(0).shuffle(names)
    held = set(names[k::FOLDS])
    images = [dataclasses.replace(im, split='test' if o in held else 'train') for im, o in zip(ds.images, originals)]
    return dataclasses.replace(ds, images=images), sorted(held)


def _synthetic_tags(ws: Workspace, tmp: Path, level: str):
    "The synthetic shelves of a realism level (price tags only) as a dataset version, and the tiles recipe trained on them."
    from retail_cv.data.synth import generate_shelves
    from retail_cv.train import fit
    out = tmp/f'synthetic-{level}'
    if not out.exists(): generate_shelves(out, _synth_options(level), workers=2)
    ds = load_dataset(out)
    tag = next(c.id for c in ds.categories if c.name == 'price_tag')
    tags = dataclasses.replace(ds, categories=[c for c in ds.categories if c.id == tag],
                               annotations=[a for a in ds.annotations if a.category_id == tag])
    version = DatasetStore(ws).ingest(tags, f'synthetic-tags-{level}', progress=False)
    t0 = time.perf_counter()
    res = fit({**_config('synthetic-only-5min'), 'seed': 0}, version, ws, run_name=f'synthetic-tags-{level}')
    return res.last_checkpoint, time.perf_counter() - t0


def run_one(variant: str, k: int, ws: Workspace, ds, originals, synthetic) -> dict:
    from retail_cv.evaluate import evaluate
    from retail_cv.train import fit
    fold_ds, held = _fold(ds, originals, k)
    version = DatasetStore(ws).ingest(fold_ds, f'pricetags-fold{k}', progress=False)
    cfg, pre_s = _config(variant), 0.0
    if variant in SYNTHETIC_LEVEL:
        ckpt, pre_s = synthetic(SYNTHETIC_LEVEL[variant])
    if variant.startswith('synthetic-only'):
        last, train_s, res = ckpt, 0.0, None
    else:
        if variant.startswith('synthetic-then-real'): cfg['weights'] = str(ckpt)
        t0 = time.perf_counter()
        res = fit(cfg, version, ws, run_name=f'{variant}-fold{k}')
        last, train_s = res.last_checkpoint, time.perf_counter() - t0
    rep = evaluate(last, version, split='test', workspace=ws, write=False)
    return {'variant': variant, 'fold': k, 'held_out_photos': held, 'test_images': rep.images,
            'ap50': round(rep.metrics['map50'], 4), 'metrics': {k: round(v, 4) for k, v in rep.metrics.items()},
            'train_seconds': round(train_s + pre_s, 1), 'synthetic_pretraining_seconds': round(pre_s, 1),
            'steps': int(res.metrics.get('step', 0)) if res else 0, 'stopped_by': res.stopped_by if res else None,
            'synthetic': _synth_options(SYNTHETIC_LEVEL[variant]) if variant in SYNTHETIC_LEVEL else None,
            'config': {k: str(v) if isinstance(v, Path) else v for k, v in cfg.items()}}


def _load() -> dict:
    return json.loads(OUT.read_text()) if OUT.exists() else {}


# What each row's gain is measured against: the variant it adds one ingredient to.
BASE = {'fcos-mobilenet-640-5min': 'default-5min', 'retinanet-mobilenet-640-5min': 'default-5min', 'tiny-full-5min': 'default-5min', 'tiles-5min': 'tiny-full-5min', 'synthetic-only-5min+price-tags': 'synthetic-only-5min',
        'synthetic-only-5min+faces': 'synthetic-only-5min+price-tags', 'synthetic-only-5min+edge-clutter': 'synthetic-only-5min+faces',
        'synthetic-only-5min+roll': 'synthetic-only-5min+edge-clutter', 'synthetic-then-real-10min': 'tiles-5min',
        'synthetic-then-real-10min+realism': 'synthetic-then-real-10min'}


def _summarise(doc: dict) -> dict:
    "Per variant: mean and median AP@.5 over the folds measured, and the mean gain over its `BASE` on the folds both have."
    table, per_fold = [], {}
    for v, (what, _) in VARIANTS.items():
        runs = sorted((r for r in doc.get('runs', []) if r['variant'] == v), key=lambda r: r['fold'])
        if not runs: continue
        aps = [r['ap50'] for r in runs]
        per_fold[v] = {r['fold']: r['ap50'] for r in runs}
        row = {'variant': v, 'adds': what, 'folds': len(aps), 'ap50_per_fold': aps, 'mean_ap50': round(statistics.mean(aps), 4),
               'median_ap50': round(statistics.median(aps), 4),
               'median_train_minutes': round(statistics.median(r['train_seconds'] for r in runs) / 60, 2)}
        if (base := BASE.get(v)) in per_fold and (common := sorted(set(per_fold[v]) & set(per_fold[base]))):
            row.update(gain_over=base, gain=round(statistics.mean(per_fold[v][k] - per_fold[base][k] for k in common), 4),
                       gain_folds=len(common))
        table.append(row)
    return table


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--variants', nargs='*', default=list(VARIANTS), choices=None)
    ap.add_argument('--folds', nargs='*', type=int, default=list(range(FOLDS)))
    ap.add_argument('--force', action='store_true', help='re-measure results that exist')
    args = ap.parse_args(argv)
    if not SHELVES.is_dir(): raise SystemExit(f"{SHELVES} is missing: this benchmark needs the shared real shelf photos")
    os.environ.setdefault('WANDB_MODE', 'disabled')
    doc = _load()
    doc.update(machine={'cpu': platform.processor() or platform.machine(), 'cores': os.cpu_count(), 'python': platform.python_version()},
               data=str(SHELVES.relative_to(ROOT.parent)), folds=FOLDS, target_mean_ap50=0.75)
    doc.setdefault('runs', [])
    with tempfile.TemporaryDirectory() as tmp:
        ws = Workspace.open(Path(tmp)/'ws')
        ds, originals = _photos(Path(tmp))
        cache = {}
        def synthetic(level: str):  # each level trained once per run, on first use
            if level not in cache: cache[level] = _synthetic_tags(ws, Path(tmp), level)
            return cache[level]
        for v in args.variants:
            for k in args.folds:
                have = [r for r in doc['runs'] if (r['variant'], r['fold']) == (v, k)]
                if have and not args.force: print(f"{v} fold {k}: AP@.5 {have[0]['ap50']} (measured earlier)"); continue
                r = run_one(v, k, ws, ds, originals, synthetic)
                doc['runs'] = [x for x in doc['runs'] if (x['variant'], x['fold']) != (v, k)] + [r]
                doc['table'] = _summarise(doc)
                atomic_write(OUT, json.dumps(doc, indent=1) + '\n')
                print(f"{v} fold {k}: AP@.5 {r['ap50']} after {r['train_seconds'] / 60:.1f} min ({r['steps']} steps)", flush=True)
    for row in _summarise(doc): print(json.dumps(row))


if __name__ == '__main__':
    main()
