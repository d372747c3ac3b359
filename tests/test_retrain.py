"""The retraining loop end to end on synthetic drift, with real training, a real signed bundle, the real monitor,
papermill jobs in a pipeline and the workspace's registry.

Shelves of six products (catalogue seed 0) under the usual lights train the champion: product crops cut from the
rendered shelves at 32 px, a tiny CNN. It is exported as a signed bundle carrying its reference statistics,
registered with the dataset version it trained on, and promoted. Then the store changes: dimmer lights
(brightness 0.4-0.5 instead of 0.9-1.05), and 40 % of the shelves stocked from another catalogue (seed 1: products
the champion never saw). The monitor alerts on the new crops, `retrain` runs `nbs/pipelines/retrain.yaml`, and the
retrained model beats the champion on the new shelves and becomes `candidate`. Unchanged shelves raise no alert and
start nothing; a pipeline that fails midway registers nothing.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retail_cv.core import ConfigError, Workspace, sha256_bytes
from retail_cv.data.formats import Annotation, Category, Dataset, ImageRecord, read_coco, write_coco
from retail_cv.data.store import DatasetStore
from retail_cv.data.synth import generate_shelves
from retail_cv.monitor import Monitor, RetrainError, retrain
from retail_cv.registry import Registry, RegistryError

SYNTH = {'width': 320, 'height': 240, 'skus': 6, 'shelves': (1, 2), 'occlusion_prob': 0.0, 'color_cast': 0.03, 'vignette': 0.15}
LIGHT, DIM = (0.9, 1.05), (0.4, 0.5)  # the usual lights, and the dimmer ones
PER_SHELF = 2  # crops taken from one shelf photo: crops of one photo share its light, so few per photo keep samples near independent
TRAIN = {'epochs': 25, 'batch_size': 32, 'lr': 0.003}


def render(out: Path, seed: int, shelves: int, brightness=LIGHT, catalogue_seed: int = 0) -> Dataset:
    "Synthetic shelves, read back."
    s = generate_shelves(out, {**SYNTH, 'brightness': brightness, 'catalogue_seed': catalogue_seed}, images=shelves, seed=seed)
    return read_coco(s.files['annotations'])


def shelf_crops(out: Path, seed: int, shelves: int, brightness=LIGHT, new_products: float = 0.0, size: int = 32,
                held_out: int = 0) -> tuple[Path, Path | None]:
    """Product crops of rendered shelves as a classification set in COCO, and the crops of every `held_out`-th shelf
    as a set of their own (same renders, so the same distribution). Shelves alternate between 'train' and 'val';
    a share `new_products` of them come from another catalogue."""
    n_new = int(round(shelves * new_products))
    parts = [render(out/'shelves', seed, shelves - n_new, brightness)]
    if n_new: parts.append(render(out/'shelves-new', seed + 1000, n_new, brightness, catalogue_seed=1))
    sets = {'main': ({}, [], []), 'held': ({}, [], [])}
    (out/'crops').mkdir(parents=True); (out/'held-out').mkdir()
    for p, ds in enumerate(parts):
        names, by_image = ds.category_names, ds.annotations_by_image()
        for i, im in enumerate(ds.images):
            which = 'held' if held_out and i % held_out == held_out - 1 else 'main'
            cats, ims, anns = sets[which]
            pic = Image.open(ds.root/im.file_name).convert('RGB')
            products = [a for a in by_image.get(im.id, []) if names[a.category_id] not in ('gap', 'price_tag') and min(a.bbox[2:]) >= 8]
            for a in [products[k] for k in sorted(np.random.default_rng(seed + im.id).permutation(len(products))[:PER_SHELF])]:
                x, y, w, h = a.bbox
                f = f"{p}-{im.id}-{a.id}.png"
                pic.crop((int(x), int(y), int(x + w), int(y + h))).resize((size, size), Image.BILINEAR).save(out/('crops' if which == 'main' else 'held-out')/f)
                ims.append(ImageRecord(len(ims) + 1, f, size, size, 'val' if i % 2 else 'train'))
                anns.append(Annotation(len(anns) + 1, len(ims), cats.setdefault(names[a.category_id], len(cats) + 1)))
    def write(which, folder):
        cats, ims, anns = sets[which]
        return write_coco(Dataset(out/folder, 'classification', [Category(i, n) for n, i in cats.items()], ims, anns), out/folder/'labels.json') if ims else None
    return write('main', 'crops'), write('held', 'held-out')


@pytest.fixture(scope='module')
def champion(tmp_path_factory):
    "A workspace whose registry has `shelf-skus@champion`, trained on normal shelves, with its signed bundle."
    from retail_cv.bundle import generate_signing_key
    from retail_cv.export import export
    from retail_cv.train import TrainConfig, fit
    tmp = tmp_path_factory.mktemp('retrain')
    ws = Workspace.open(tmp/'ws')
    generate_signing_key(ws)
    labels, calm = shelf_crops(tmp/'old', seed=1, shelves=400, held_out=4)  # every 4th shelf is kept out, for the no-shift check
    old = DatasetStore(ws).ingest(labels, 'shelf-skus', progress=False)
    run = fit(TrainConfig(arch='tiny_cnn', image_size=32, wandb_mode='disabled', **TRAIN), old.ref, ws, run_name='champion')
    ex = export(run.best_checkpoint, 'shelf-cam-x86', old.ref, ws, name='shelf-skus', version='1',
                config={'precisions': ['fp32'], 'latency_runs': 2, 'latency_repeats': 1, 'latency_warmup': 1})
    reg = Registry(ws, actor='ci')
    mv = reg.register('shelf-skus', run.best_checkpoint, run_id=run.run_id, metrics={'val/acc': run.metrics['val/acc']})
    reg.add_bundle('shelf-skus', mv.version, ex.bundle, 'shelf-cam-x86')
    reg.promote('shelf-skus', mv.version, metric='val/acc', reason='first shelf model')
    return {'ws': ws, 'tmp': tmp, 'old': old, 'bundle': ex.bundle, 'reg': reg, 'calm': calm}


def _cli_retrain(ws: Workspace, new_data: Path, *args: str) -> subprocess.CompletedProcess:
    "`retail-cv monitor retrain` as a user runs it (the champion's bundle found through the registry)."
    cli = Path(sys.executable).parent/'retail-cv'
    return subprocess.run([str(cli), '-w', str(ws.root), 'monitor', 'retrain', str(new_data), '--champion', 'shelf-skus@champion',
                           '--permutations', '300', '--json', *args], capture_output=True, text=True, timeout=600)


def _pipeline_runs(ws: Workspace) -> list[str]:
    return sorted(p.name for p in (ws.root/'runs').glob('pipeline-*'))


def test_no_shift_no_alert_starts_nothing(champion):
    ws = champion['ws']
    calm = champion['calm']  # shelves rendered with the champion's, never trained on nor in its reference
    alerts = Monitor.open(champion['bundle'], images=calm.parent, workspace=ws, permutations=300).alerts()
    assert alerts and not any(a.fired for a in alerts), [a.report.summary() for a in alerts]
    before = _pipeline_runs(ws)
    res = retrain(alerts, 'shelf-skus@champion', calm, ws)
    assert res.status == 'no-alert' and res.version is None
    assert _pipeline_runs(ws) == before and 'shelf-skus-new' not in DatasetStore(ws).names()  # nothing ingested, nothing run
    r = _cli_retrain(ws, calm)
    assert r.returncode == 0 and json.loads(r.stdout)['status'] == 'no-alert', r.stderr[-2000:]
    assert _pipeline_runs(ws) == before


def test_bad_inputs_are_named(champion):
    ws = champion['ws']
    dim = shelf_crops(champion['tmp']/'bad', seed=5, shelves=20, brightness=DIM)[0]
    alerts = Monitor.open(champion['bundle'], images=dim.parent, workspace=ws, permutations=300, min_images=5).alerts()
    assert any(a.fired for a in alerts)
    with pytest.raises(RegistryError, match="no model named 'shelf-sku'"): retrain(alerts, 'shelf-sku@champion', dim, ws)
    with pytest.raises(RegistryError, match="has no candidate yet"): retrain(alerts, 'shelf-skus@candidate', dim, ws)
    with pytest.raises(ConfigError, match="no parameter 'epochz'"): retrain(alerts, 'shelf-skus@champion', dim, ws, overrides={'train': {'epochz': 1}})
    # a pipeline that fails midway (here: training with an architecture that does not exist) registers nothing
    before = [v.ref for v in champion['reg'].versions('shelf-skus')]
    with pytest.raises(RetrainError, match=r"failed at step 'train' \(failed: .*no_such_net.*nothing was registered"):
        retrain(alerts, 'shelf-skus@champion', dim, ws, overrides={'train': {'arch': 'no_such_net'}})
    after = Registry(ws).versions('shelf-skus')
    assert [v.ref for v in after] == before and not any('candidate' in v.aliases for v in after)
    run = json.loads((ws.root/'runs'/_pipeline_runs(ws)[-1]/'pipeline.json').read_text())
    assert [s['status'] for s in run['steps']] == ['ran', 'failed', 'skipped']


def test_drift_retrains_a_candidate_that_beats_the_champion(champion):
    ws, reg = champion['ws'], champion['reg']
    shifted = shelf_crops(champion['tmp']/'shifted', seed=7, shelves=200, brightness=DIM, new_products=0.4)[0]
    alerts = Monitor.open(champion['bundle'], images=shifted.parent, workspace=ws, permutations=300).alerts()
    fired = [a for a in alerts if a.fired]
    assert fired and 'ks.brightness' in {t.name for t in fired[0].report.drifted}

    res = retrain(alerts, 'shelf-skus@champion', shifted, ws, overrides={'train': {'epochs': TRAIN['epochs']}})
    print(res.summary())
    t = res.comparison
    assert res.status == 'candidate' and res.decision['passed']
    assert t['candidate']['new']['top1'] > t['champion']['new']['top1'] + 0.1  # the new products and the dim light
    assert t['champion']['new']['unknown'] > 0 and t['candidate']['new']['unknown'] == 0
    assert t['candidate']['old']['top1'] >= t['champion']['old']['top1'] - 0.05

    champ, mv = reg.get('shelf-skus', 'champion'), reg.get('shelf-skus', 'candidate')
    assert mv.ref == res.version.ref and mv.version != champ.version and 'champion' not in mv.aliases  # promotion stays an approver's
    lin = reg.lineage('shelf-skus', 'candidate')
    assert lin.parent == champ.ref and lin.datasets == (res.data['merged'], res.data['new'])
    assert res.data['base'] == champ.dataset_versions[0] and res.data['new'].startswith('shelf-skus-new@')
    cause = json.loads(mv.tags['retrain.cause'])[0]
    assert (mv.tags['retrain.alerts'], mv.tags['retrain.gate'], mv.tags['retrain.data']) == ('drift', 'passed', res.data['new'])
    assert (cause['rule'], cause['metric'], cause['value'], cause['window']) == ('drift', 'drift', 1.0, None)
    report = ws.root/'runs'/res.pipeline_run/f"drift-{cause['report_sha256'][:16]}.json"
    assert sha256_bytes(report.read_bytes()) == cause['report_sha256'] and json.loads(report.read_bytes())['drift'] is True
    assert mv.metrics['new/top1'] == t['candidate']['new']['top1'] and 'champion/new/top1' in mv.metrics
    assert json.loads(res.record.read_text())['version'] == mv.ref
    moves = [e for e in reg.audit(action='set_alias') if e.target == 'shelf-skus@candidate']
    assert any('passed the retraining gate against shelf-skus:1' in e.reason for e in moves)

    r = _cli_retrain(ws, shifted)  # a re-run from the command line: every step cached, nothing registered twice
    assert r.returncode == 0, r.stderr[-2000:]
    again = json.loads(r.stdout)
    assert again['status'] == 'candidate' and again['version'] == mv.ref, again
    assert [v.run_id for v in reg.versions('shelf-skus')].count(mv.run_id) == 1
