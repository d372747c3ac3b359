"""Product identity on the shelf: a crop classifier against nearest-neighbour lookup in a gallery of catalogue images.

A catalogue of 24 products (catalogue seed 0) is split at random into 12 *seen* products (the classifier trains on
their crops), 6 *new* products (never trained on; their only data is one catalogue image in the gallery) and 6
*unregistered* products (in no gallery and no label list: the open-set case of a product the store never entered).
Shelves of training seed 1 give the training crops (seen products only, 32 px, a tiny CNN through `fit`, exported as
a signed bundle with `export`) and the catalogue photos; shelves of seed 2, never rendered for training, give the
crops measured, all through the exported bundle on the edge runtime (`retail_cv.apps.identify`).

Two kinds of catalogue image, one per product: `face` (the product's face as the generator draws it, on white) and
`photo` (one crop of it from a training-seed shelf). The unknown thresholds (gallery: cosine similarity; classifier:
softmax) are the 5th percentile of the correct answers' scores on the training run's validation crops, so nothing
about the held-out products or shelves chooses them.

Writes bench/results/identity.json.

    flock /tmp/cpu.lock python bench/bench_identity.py [--train-shelves 600] [--eval-shelves 300] [--epochs 40]
"""
import argparse, json, os, platform, sys, tempfile, time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from retail_cv.apps import Gallery, embed, identify  # noqa: E402
from retail_cv.core import Workspace, atomic_write, git_state  # noqa: E402
from retail_cv.data.formats import Annotation, Category, Dataset, ImageRecord, read_coco, write_coco  # noqa: E402
from retail_cv.data.synth import generate_shelves, make_catalogue, render_sku  # noqa: E402

SYNTH = {'width': 480, 'height': 360, 'skus': 24, 'shelves': (2, 3), 'occlusion_prob': 0.0, 'color_cast': 0.03, 'vignette': 0.15}
SIZE = 32
PER_SHELF = 2  # crops of one product taken from one shelf photo (distinct facings, at random)
SPLIT = {'seen': 12, 'new': 6, 'unregistered': 6}


def crops_of(out: Path, seed: int, shelves: int) -> dict[str, list[np.ndarray]]:
    "Up to PER_SHELF crops per product per shelf (random facings), SIZE px, by product name, from `shelves` rendered shelves."
    s = generate_shelves(out, SYNTH, images=shelves, seed=seed)
    ds = read_coco(s.files['annotations'])
    names, by_image, got = ds.category_names, ds.annotations_by_image(), {}
    for im in ds.images:
        pic = Image.open(ds.root/im.file_name).convert('RGB')
        per: dict[str, list] = {}
        for a in by_image.get(im.id, []):
            if names[a.category_id] not in ('gap', 'price_tag') and min(a.bbox[2:]) >= 8: per.setdefault(names[a.category_id], []).append(a)
        rng = np.random.default_rng(seed * 100_000 + im.id)
        for name, anns in sorted(per.items()):
            for k in rng.permutation(len(anns))[:PER_SHELF]:
                x, y, w, h = anns[int(k)].bbox
                got.setdefault(name, []).append(np.asarray(pic.crop((int(x), int(y), int(x + w), int(y + h))).resize((SIZE, SIZE), Image.BILINEAR)))
    return got


def face(sku) -> np.ndarray:
    "The product's face as the generator draws it, on white, SIZE px."
    bgra = render_sku(sku).astype(np.float32)
    a = bgra[..., 3:] / 255
    return np.asarray(Image.fromarray((bgra[..., 2::-1] * a + 255 * (1 - a)).astype(np.uint8)).resize((SIZE, SIZE), Image.BILINEAR))


def write_set(out: Path, crops: dict[str, list[np.ndarray]]) -> Path:
    "The seen products' crops as a COCO classification set, alternate crops of a product in train and val."
    out.mkdir(parents=True)
    cats, ims, anns = {}, [], []
    for name, arrs in sorted(crops.items()):
        for i, arr in enumerate(arrs):
            f = f"{len(ims):05d}.png"; Image.fromarray(arr).save(out/f)
            ims.append(ImageRecord(len(ims) + 1, f, SIZE, SIZE, 'val' if i % 4 == 3 else 'train'))
            anns.append(Annotation(len(anns) + 1, len(ims), cats.setdefault(name, len(cats) + 1)))
    return write_coco(Dataset(out, 'classification', [Category(i, n) for n, i in cats.items()], ims, anns), out/'labels.json')


def train_bundle(tmp: Path, crops: dict[str, list[np.ndarray]], epochs: int, arch: str) -> tuple[Path, Workspace]:
    "Train on the seen products' crops with `fit`, export a signed bundle with `export`."
    from retail_cv.bundle import generate_signing_key
    from retail_cv.data.store import DatasetStore
    from retail_cv.export import export
    from retail_cv.train import TrainConfig, fit
    ws = Workspace.open(tmp/'ws'); generate_signing_key(ws)
    ver = DatasetStore(ws).ingest(write_set(tmp/'crops', crops), 'shelf-skus', progress=False)
    run = fit(TrainConfig(arch=arch, image_size=SIZE, wandb_mode='disabled', epochs=epochs, batch_size=32, lr=0.003), ver.ref, ws, run_name='identity')
    ex = export(run.best_checkpoint, 'shelf-cam-x86', ver.ref, ws, name='shelf-skus', version='1',
                config={'precisions': ['fp32'], 'latency_runs': 2, 'latency_repeats': 1, 'latency_warmup': 1})
    return ex.bundle, ws


def rate(xs) -> float | None: return round(float(np.mean(xs)), 4) if len(xs) else None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--train-shelves', type=int, default=600)
    ap.add_argument('--eval-shelves', type=int, default=300)
    ap.add_argument('--epochs', type=int, default=40)
    ap.add_argument('--arch', default='tiny_cnn')
    ap.add_argument('--out', default=str(ROOT/'bench'/'results'/'identity.json'))
    args = ap.parse_args()
    from retail_cv.runtime import Predictor
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix='bench-identity-'))
    catalogue = make_catalogue(SYNTH['skus'], seed=0)
    names = [s.name for s in catalogue]
    order = [names[i] for i in np.random.default_rng(7).permutation(len(names))]
    groups = {'seen': order[:12], 'new': order[12:18], 'unregistered': order[18:]}
    train, held = crops_of(tmp/'train-shelves', 1, args.train_shelves), crops_of(tmp/'eval-shelves', 2, args.eval_shelves)
    t_render = time.perf_counter() - t0
    bundle, ws = train_bundle(tmp, {n: train[n] for n in groups['seen'] if n in train}, args.epochs, args.arch)
    t_train = time.perf_counter() - t0 - t_render
    pred = Predictor.from_bundle(bundle, workspace=ws)
    val = {n: train[n][3::4] for n in groups["seen"] if len(train.get(n, [])) > 3}  # the training run's validation crops
    soft = [i.score for n, cs in val.items() for i in identify(pred, cs) if i.sku == n]
    clf_min = float(np.percentile(soft, 5)) if soft else 0.0
    by_sku = {s.name: s for s in catalogue}
    result = {'catalogue': {k: len(v) for k, v in groups.items()}, 'arch': args.arch, 'image_size': SIZE,
              'crops': {'train_seen': sum(len(train.get(n, [])) for n in groups['seen']),
                        **{f'eval_{k}': sum(len(held.get(n, [])) for n in v) for k, v in groups.items()}},
              'classifier': {'labels': len(pred.labels), 'min_score': round(clf_min, 4)}, 'gallery': {}}
    c = result['classifier']
    for k in ('seen', 'new', 'unregistered'):
        ids = [(n, i) for n in groups[k] for i in identify(pred, held.get(n, []))]
        if k == 'seen':
            c['top1_seen'] = rate([i.sku == n for n, i in ids])
            c['top1_seen_with_min_score'] = rate([i.sku == n and i.score >= clf_min for n, i in ids])
        else:
            c[f'named_wrongly_{k}'] = rate([True for _ in ids])  # it always names one of its labels, never this product
            c[f'named_wrongly_{k}_with_min_score'] = rate([i.score >= clf_min for _, i in ids])
    for kind in ('face', 'photo'):
        images = {n: (face(by_sku[n]) if kind == 'face' else train[n][0]) for n in groups['seen'] + groups['new'] if kind == 'face' or n in train}
        gal = Gallery.build(pred, images, threshold=-1.0)
        sims = [i.score for n, cs in val.items() for i in gal.lookup(embed(pred, cs)) if i.sku == n]
        thr = float(np.percentile(sims, 5)) if sims else 0.0
        gal = Gallery(gal.skus, gal.embeddings, gal.model, threshold=thr)
        gal.save(tmp/f'gallery-{kind}.npz'); gal = Gallery.load(tmp/f'gallery-{kind}.npz', pred)
        r = {'threshold': round(thr, 4), 'products': len(gal.products)}
        for k in ('seen', 'new', 'unregistered'):
            emb = {n: embed(pred, held[n]) for n in groups[k] if held.get(n)}
            ids = [(n, i) for n, e in emb.items() for i in gal.lookup(e)]
            _, best = zip(*[gal.scores(e) for e in emb.values()]) if emb else ((), ())
            if k == 'unregistered':
                r['named_wrongly_unregistered'] = rate([i.sku is not None for _, i in ids])
            else:
                prods = gal.products
                top1 = [prods[j] == n for (n, e), b in zip(emb.items(), best) for j in b.argmax(axis=1)]
                r[f'top1_{k}'] = rate(top1)  # nearest catalogue image, no threshold
                r[f'top1_{k}_with_threshold'] = rate([i.sku == n for n, i in ids])  # unknown counts as wrong
        result['gallery'][kind] = r
    result['seconds'] = {'render': round(t_render, 1), 'train_and_export': round(t_train, 1), 'total': round(time.perf_counter() - t0, 1)}
    result['machine'] = {'cpus': os.cpu_count(), 'python': platform.python_version(), **git_state(ROOT)}
    result['setup'] = {'train_shelves': args.train_shelves, 'eval_shelves': args.eval_shelves, 'epochs': args.epochs, 'crops_per_product_per_shelf': PER_SHELF, 'train_seed': 1, 'eval_seed': 2, 'catalogue_seed': 0, 'synth': {**SYNTH, 'shelves': list(SYNTH['shelves'])}}
    atomic_write(args.out, json.dumps(result, indent=2) + '\n')
    print(json.dumps(result, indent=2))


if __name__ == '__main__':
    main()
