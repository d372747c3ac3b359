"""Training benchmarks, measured in one run on this machine; writes bench/results/train.json.

1. Throughput: retail_cv's Lightning `ClassificationModule` under `lightning.Trainer` against a plain PyTorch loop on
   the same model, optimiser and in-memory batches (MobileNetV3-small, 128 px, CPU). Rounds alternate; medians.
2. Accuracy: a recipe file from `recipes/` (default: MobileNetV3-small, 128 px, 10 minutes) trained from scratch on the
   real Grocery Store photos (`../shared/data/grocery`, 81 fine-grained classes), top-1 on the val split. Every
   earlier run's outcome stays in `accuracy_earlier_runs`. The recipe that reached 50 %, as the README shows it:

    python bench/bench_train.py --skip-throughput --skip-bn --recipe recipes/grocery-mobilenet_v3_small-10min.yaml

3. BatchNorm re-estimation: `torch.optim.swa_utils.update_bn` (what `train.callbacks.PreciseBN` uses) against the
   hand-written loop of `models.recalibrate_batchnorm`, on MobileNetV3-small: same statistics (bit for bit) and time.

    python bench/bench_train.py [--minutes 10] [--skip-accuracy] [--skip-throughput] [--skip-bn] [--recipe FILE] [--seed N] [--minutes M]
"""
import argparse, json, os, platform, statistics, sys, tempfile, time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from retail_cv.core import Workspace, atomic_write, read_yaml, seed_everything  # noqa: E402
from retail_cv.models import ModelSpec  # noqa: E402
from retail_cv.train import ClassificationModule, TrainConfig, fit  # noqa: E402

GROCERY = ROOT.parent/'shared'/'data'/'grocery'


def _batches(n_batches, batch, size, classes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, size, size, generator=g), torch.randint(0, classes, (batch,), generator=g)) for _ in range(n_batches)]


def _plain(module, batches):
    opt = torch.optim.AdamW(module.model.parameters(), lr=1e-3, weight_decay=1e-4)
    module.model.train()
    t0 = time.perf_counter()
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        if module.config.channels_last: x = x.contiguous(memory_format=torch.channels_last)  # as the module's training_step
        loss = F.cross_entropy(module.model(x), y)
        loss.backward()
        opt.step()
    return sum(len(y) for _, y in batches) / (time.perf_counter() - t0)


class _Timer(L.Callback):
    def on_train_start(self, trainer, pl_module): self.t0 = time.perf_counter()
    def on_train_end(self, trainer, pl_module): self.seconds = time.perf_counter() - self.t0


def _lightning(module, batches):
    timer = _Timer()
    trainer = L.Trainer(accelerator='cpu', devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[timer])
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    return sum(len(y) for _, y in batches) / timer.seconds


def throughput(rounds=5, n_batches=20, batch=32, size=128, classes=43):
    spec = dict(arch='mobilenet_v3_small', num_classes=classes, image_size=size)
    cfg = TrainConfig(arch='mobilenet_v3_small', image_size=size, scheduler='none', lr=1e-3, wandb_mode='disabled').model_dump(mode='json')
    names = [f'c{i}' for i in range(classes)]
    batches = _batches(n_batches, batch, size, classes)
    res = {'plain': [], 'lightning': []}
    for r in range(rounds + 1):  # round 0 warms up both paths
        for kind in (('plain', 'lightning') if r % 2 else ('lightning', 'plain')):
            seed_everything(r)
            m = ClassificationModule(spec, cfg, names)
            v = _plain(m, batches) if kind == 'plain' else _lightning(m, batches)
            if r: res[kind].append(v)
    med = {k: statistics.median(v) for k, v in res.items()}
    return {'model': 'mobilenet_v3_small', 'image_size': size, 'batch': batch, 'batches': n_batches, 'rounds': rounds,
            'plain_img_s': res['plain'], 'lightning_img_s': res['lightning'],
            'median_plain_img_s': round(med['plain'], 1), 'median_lightning_img_s': round(med['lightning'], 1),
            'ratio_lightning_over_plain': round(med['lightning'] / med['plain'], 3), 'target_ratio': 0.97}


def precise_bn(rounds=5, images=256, size=128, batch=32):
    "Seconds per re-estimation of MobileNetV3-small's BatchNorm statistics, update_bn against recalibrate_batchnorm."
    from torch.optim.swa_utils import update_bn
    from retail_cv.models import build_model, recalibrate_batchnorm
    from retail_cv.train.callbacks._precise_bn import _BatchNormOnly
    spec = ModelSpec(arch='mobilenet_v3_small', num_classes=43, image_size=size)
    x = torch.randn(images, 3, size, size, generator=torch.Generator().manual_seed(0))
    a, b = build_model(spec), build_model(spec)
    b.load_state_dict(a.state_dict())
    times = {'recalibrate_batchnorm': [], 'update_bn': []}
    for r in range(rounds + 1):  # round 0 warms up
        t0 = time.perf_counter(); recalibrate_batchnorm(a, x, batch_size=batch); t1 = time.perf_counter()
        update_bn([c for c in x.split(batch) if len(c) >= 2], _BatchNormOnly(b)); t2 = time.perf_counter()
        if r: times['recalibrate_batchnorm'].append(t1 - t0); times['update_bn'].append(t2 - t1)
    same = all(torch.equal(u, v) for u, v in zip(a.state_dict().values(), b.state_dict().values()))
    return {'model': 'mobilenet_v3_small', 'image_size': size, 'images': images, 'batch': batch, 'identical_statistics': same,
            **{f'median_s_{k}': round(statistics.median(v), 4) for k, v in times.items()}}


def accuracy(recipe: Path, seed: int = 0, minutes: float | None = None):
    "Train the recipe on the Grocery photos; `seed` and `minutes` override the file."
    from retail_cv.data.store import DatasetStore
    if not (GROCERY/'classes.csv').exists(): raise SystemExit(f"{GROCERY} not found: the accuracy benchmark needs ../shared")
    cfg = read_yaml(recipe, 'training recipe') | {'seed': seed, 'wandb_mode': 'disabled', 'sample_predictions': 0}
    if minutes: cfg['max_minutes'] = minutes
    ws = Workspace.open(tempfile.mkdtemp(prefix='bench-train-'))
    version = DatasetStore(ws).ingest(GROCERY, 'grocery', progress=False)
    t0 = time.perf_counter()
    res = fit(cfg, version, ws, run_name='grocery-budget')
    return {'dataset': 'Grocery Store Dataset (train/val lists in ../shared/data/grocery)', 'dataset_version': version.ref,
            'train_images': sum(1 for i in version.dataset.images if i.split == 'train'),
            'val_images': sum(1 for i in version.dataset.images if i.split == 'val'),
            'classes': len(version.dataset.categories), 'budget_minutes': cfg['max_minutes'], 'epochs_done': len(res.history),
            'training_seconds': round(time.perf_counter() - t0, 1),
            'stopped_by': res.stopped_by, 'val_top1': res.metrics.get('val/acc'), 'best_val_top1': res.best_score,
            'val_top5': res.metrics.get('val/acc_top5'), 'history': res.history,
            'recipe_file': str(Path(recipe).resolve().relative_to(ROOT)) if Path(recipe).resolve().is_relative_to(ROOT) else str(recipe),
            'recipe': cfg, 'target_top1': 0.50, 'baseline_plain_loop_top1': 0.42,
            'loadavg_after': os.getloadavg(), 'created': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}


if __name__ == '__main__':
    ap = argparse.ArgumentParser()
    ap.add_argument('--recipe', type=Path, default=ROOT/'recipes'/'grocery-mobilenet_v3_small-10min.yaml', help='a TrainConfig YAML from recipes/')
    ap.add_argument('--minutes', type=float, default=None, help="training budget (default: the recipe's max_minutes)")
    ap.add_argument('--seed', type=int, default=0, help='seed of initialisation, order and augmentation')
    ap.add_argument('--skip-accuracy', action='store_true')
    ap.add_argument('--skip-throughput', action='store_true')
    ap.add_argument('--skip-bn', action='store_true')
    a = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    out = ROOT/'bench'/'results'/'train.json'
    result = json.loads(out.read_text()) if out.exists() else {}
    result.update(machine={'cpus': os.cpu_count(), 'platform': platform.platform(), 'torch': torch.__version__,
                           'loadavg_start': os.getloadavg()}, created=time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()))
    if not a.skip_throughput:
        result['throughput'] = throughput(); print(json.dumps(result['throughput'], indent=1))
    if not a.skip_bn:
        result['precise_bn'] = precise_bn(); print(json.dumps(result['precise_bn'], indent=1))
    if not a.skip_accuracy:
        if 'accuracy' in result:  # keep every earlier recipe's outcome (without its history) for comparison
            result.setdefault('accuracy_earlier_runs', []).append({k: v for k, v in result['accuracy'].items() if k != 'history'})
        result['accuracy'] = accuracy(a.recipe, seed=a.seed, minutes=a.minutes)
        print(json.dumps({k: v for k, v in result['accuracy'].items() if k != 'history'}, indent=1))
    result['machine']['loadavg_end'] = os.getloadavg()
    out.parent.mkdir(exist_ok=True)
    atomic_write(out, json.dumps(result, indent=1))
