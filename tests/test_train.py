"Training: reproducibility, resume after SIGKILL, bad input, checkpoint safety, W&B offline, DDP on two CPU processes, the job notebook."
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from retail_cv.core import ConfigError, IntegrityError, Workspace, parse_model
from retail_cv.data.formats import Dataset, grocery_sample, load_dataset
from retail_cv.data.store import DatasetStore
from retail_cv.data.synth import generate_shelves
from retail_cv.models import ModelSpec, build_model
from retail_cv.train import TrainConfig, TrainingError, fit, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(arch='tiny_cnn', epochs=3, batch_size=16, lr=3e-3, seed=0, wandb_mode='disabled')


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{**TINY, **kw})


def _run_dir(ws: Workspace, name: str) -> Path:
    dirs = sorted((ws/'runs').glob(f'{name}-*'))
    assert len(dirs) == 1, dirs
    return dirs[0]


@pytest.fixture(scope='module')
def ws(tmp_path_factory) -> Workspace:
    "A workspace with the Grocery sample stored as dataset 'grocery'."
    ws = Workspace.open(tmp_path_factory.mktemp('train')/'ws')
    DatasetStore(ws).ingest(grocery_sample(), 'grocery', progress=False)
    return ws


@pytest.fixture(scope='module')
def reference(ws):
    "An uninterrupted 3-epoch run of the tiny config (12 steps, 4 per epoch)."
    return fit(_cfg(checkpoint_every_n_steps=1), 'grocery', ws, run_name='reference')


def _script(tmp_path: Path, body: str) -> Path:
    path = tmp_path/'script.py'
    path.write_text(textwrap.dedent(body))
    return path


def _env() -> dict:
    env = {**os.environ, 'PYTHONPATH': str(ROOT)}
    env.pop('RETAIL_CV_RUN_ID', None)
    return env


def test_config_fills_defaults_and_names_bad_keys():
    c = TrainConfig(task='detection')
    assert (c.arch, c.image_size, c.precision) == ('fcos_tiny_fpn', 640, 'auto')
    assert TrainConfig(arch='resnet18').task == 'classification'
    with pytest.raises(ConfigError, match="unknown config key 'epoch'"): parse_model(TrainConfig, {'epoch': 2})
    with pytest.raises(ConfigError, match='only takes image_size=320'): parse_model(TrainConfig, {'arch': 'ssdlite320_mobilenet_v3_large', 'image_size': 512})
    with pytest.raises(ConfigError, match="'optimizer'"): parse_model(TrainConfig, {'optimizer': 'adam'})
    with pytest.raises(ConfigError, match='set seed on TrainConfig itself'): parse_model(TrainConfig, {'pipeline': {'seed': 1}})
    # round trip through JSON, as config.json and checkpoints store it
    assert TrainConfig.model_validate_json(_cfg().model_dump_json()) == _cfg()


def test_fit_writes_the_run_folder(ws, reference):
    r = reference
    assert r.status == 'completed' and r.stopped_by == 'max_epochs' and r.precision == '32-true'
    assert [row['epoch'] for row in r.history] == [0, 1, 2] and [row['step'] for row in r.history] == [4, 8, 12]
    assert {'train/loss', 'val/loss', 'val/acc', 'val/acc_top5', 'lr'} <= set(r.metrics)
    cfg = json.loads((r.run_dir/'config.json').read_text())
    assert cfg['data']['id'] == DatasetStore(ws).get('grocery').id and cfg['precision'] == '32-true'
    assert cfg['config']['arch'] == 'tiny_cnn' and cfg['monitor'] == {'metric': 'val/acc', 'mode': 'max'}
    metrics = json.loads((r.run_dir/'metrics.json').read_text())
    assert metrics['status'] == 'completed' and metrics['history'] == r.history and metrics['global_step'] == 12
    assert json.loads(json.dumps(r.to_dict()))['metrics'] == r.metrics
    assert r.best_checkpoint == r.run_dir/'checkpoints'/'best.ckpt' and r.last_checkpoint == r.run_dir/'checkpoints'/'last.ckpt'
    # the best checkpoint holds the best monitored score, and loads weights-only into a working model
    m = load_checkpoint(r.best_checkpoint)
    assert r.best_score == max(row['val/acc'] for row in r.history)
    assert m.class_names == cfg['class_names'] and len(m.class_names) == 7
    x = m.exportable().example_input(2)
    with torch.no_grad(): assert m.exportable()(x)[0].shape == (2, 7)


def test_same_seed_same_numbers_other_seed_other_numbers(ws, reference):
    again = fit(_cfg(), 'grocery', ws)
    assert again.run_id != reference.run_id
    assert again.history == reference.history  # exact, every epoch
    other = fit(_cfg(seed=1, epochs=1), 'grocery', ws)
    assert other.history[0] != reference.history[0]


def test_resume_after_sigkill_mid_epoch_matches_an_uninterrupted_run(ws, reference, tmp_path):
    script = _script(tmp_path, f"""
        import json, sys, time
        from lightning.pytorch.callbacks import Callback
        from retail_cv.train import TrainConfig, fit
        class Slow(Callback):
            def on_train_batch_end(self, *args): time.sleep(0.4)
        fit(TrainConfig(**json.loads(sys.argv[2])), 'grocery', sys.argv[1], run_name='killed', callbacks=[Slow()])
        """)
    cfg = _cfg(checkpoint_every_n_steps=1)
    proc = subprocess.Popen([sys.executable, str(script), str(ws.root), cfg.model_dump_json()], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline, killed_at = time.monotonic() + 120, None
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            last = next(iter((ws/'runs').glob('killed-*/checkpoints/last.ckpt')), None)
            if last is not None:
                try: ck = torch.load(last, weights_only=True)
                except Exception: ck = None  # not there yet
                # kill once a checkpoint from the middle of epoch 1 exists
                if ck and 5 <= ck['global_step'] <= 6:
                    proc.send_signal(signal.SIGKILL); killed_at = ck['global_step']; break
            time.sleep(0.05)
    finally:
        if proc.poll() is None and killed_at is None: proc.kill()
    out = proc.communicate()[0].decode(errors='replace')
    assert killed_at is not None and proc.returncode == -signal.SIGKILL, out[-3000:]
    run = _run_dir(ws, 'killed')
    ck = torch.load(run/'checkpoints'/'last.ckpt', weights_only=True)
    progress = ck['loops']['fit_loop']['epoch_loop.batch_progress']['current']
    assert ck['epoch'] == 1 and 0 < progress['processed'] < 4, (ck['global_step'], progress)  # really mid-epoch
    assert json.loads((run/'metrics.json').read_text())['status'] == 'running'  # it never got to say otherwise

    resumed = fit(cfg, 'grocery', ws, run_name='killed', resume=True)
    assert resumed.run_id == run.name and resumed.status == 'completed'
    assert resumed.history == reference.history
    assert resumed.metrics == reference.metrics
    record = json.loads((run/'config.json').read_text())
    assert [a['resumed_from'] for a in record['attempts']] == [None, str(run/'checkpoints'/'last.ckpt')]


class _Crash(Callback):
    "Raise in the middle of training step `step`, or in the validation of epoch `val_epoch`."
    def __init__(self, step=None, val_epoch=None): self.step, self.val_epoch = step, val_epoch
    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == self.step: raise RuntimeError('power cut')
    def on_validation_batch_start(self, trainer, *args):
        if trainer.current_epoch == self.val_epoch: raise RuntimeError('power cut')


@pytest.mark.parametrize('where', [dict(step=9), dict(step=8), dict(val_epoch=1)], ids=['mid-epoch', 'epoch-start', 'in-validation'])
def test_a_crash_resumes_by_run_id_and_a_completed_run_is_not_picked_again(ws, reference, where):
    cfg = _cfg(checkpoint_every_n_steps=1)
    name = 'crash-' + '-'.join(f'{k}{v}' for k, v in where.items()).replace('_', '')
    with pytest.raises(RuntimeError, match='power cut'): fit(cfg, 'grocery', ws, run_name=name, callbacks=[_Crash(**where)])
    run = _run_dir(ws, name)
    assert json.loads((run/'metrics.json').read_text())['status'] == 'failed'
    done = fit(cfg, 'grocery', ws, resume=run.name)
    assert done.history == reference.history  # every epoch validated once, every number as in the uninterrupted run
    # nothing unfinished under that name any more: resume=True starts a new run
    fresh = fit(_cfg(epochs=1), 'grocery', ws, run_name=name, resume=True)
    assert fresh.run_id != run.name
    with pytest.raises(ConfigError, match="no training run 'nope'"): fit(cfg, 'grocery', ws, resume='nope')


def test_resume_refuses_other_settings_data_or_a_damaged_checkpoint(ws, reference, tmp_path):
    cfg = _cfg(checkpoint_every_n_steps=1)
    with pytest.raises(RuntimeError): fit(cfg, 'grocery', ws, run_name='strict', callbacks=[_Crash(step=2)])
    run = _run_dir(ws, 'strict').name
    # resume=True does not pick a run this config cannot continue: it starts a new one
    assert fit(_cfg(lr=0.1, epochs=1), 'grocery', ws, run_name='strict', resume=True).run_id != run
    with pytest.raises(ConfigError, match=r"different config: lr 0\.003 -> 0\.1"): fit(_cfg(lr=0.1, checkpoint_every_n_steps=1), 'grocery', ws, resume=run)
    # the same classes under other data, and fewer classes
    ds = load_dataset(grocery_sample())
    keep = {a.image_id for a in ds.annotations if a.category_id in {c.id for c in ds.categories[:5]}}
    small = Dataset(ds.root, 'classification', ds.categories[:5], [im for im in ds.images if im.id in keep],
                    [a for a in ds.annotations if a.image_id in keep])
    DatasetStore(ws).ingest(small, 'grocery5', progress=False)
    with pytest.raises(ConfigError, match=r"trained on 7 classes .* the data has 5 classes"): fit(cfg, 'grocery5', ws, resume=run)
    # a damaged checkpoint is named, not unpickled
    last = ws/'runs'/run/'checkpoints'/'last.ckpt'
    last.write_bytes(last.read_bytes()[:1000])
    with pytest.raises(IntegrityError, match=f"checkpoint {re.escape(str(last))} is not a readable PyTorch checkpoint"):
        fit(cfg, 'grocery', ws, resume=run)


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(ws):
    bad = _cfg(lr=1e20, optimizer='sgd', scheduler='none', checkpoint_every_n_steps=1)
    with pytest.raises(TrainingError, match=r'loss became (nan|inf) at step (\d+) \(epoch 0, batch \d+\)') as e:
        fit(bad, 'grocery', ws, run_name='explode')
    step = int(re.search(r'at step (\d+)', str(e.value)).group(1))
    assert step >= 1
    run = _run_dir(ws, 'explode')
    good = torch.load(run/'checkpoints'/'last.ckpt', weights_only=True)
    assert good['global_step'] == step  # the checkpoint before the bad step
    assert all(torch.isfinite(v).all() for v in good['state_dict'].values() if v.is_floating_point())
    m = json.loads((run/'metrics.json').read_text())
    assert m['status'] == 'failed' and f'at step {step}' in m['error']


def test_weights_with_another_class_count_or_architecture_are_refused(ws, tmp_path):
    torch.save(build_model(ModelSpec(arch='tiny_cnn', num_classes=4)).state_dict(), tmp_path/'four.pt')
    cfg = _cfg(epochs=1, weights=tmp_path/'four.pt')
    with pytest.raises(ConfigError, match=r"head for another number of classes.*data has 7 classes; set TrainConfig.new_head=True"):
        fit(cfg, 'grocery', ws)
    assert fit(cfg.model_copy(update={'new_head': True}), 'grocery', ws).status == 'completed'
    torch.save(build_model(ModelSpec(arch='resnet18', num_classes=7)).state_dict(), tmp_path/'r18.pt')
    with pytest.raises(ConfigError, match=f"weights file {re.escape(str(tmp_path/'r18.pt'))} does not fit _TinyCNN"):
        fit(_cfg(epochs=1, weights=tmp_path/'r18.pt'), 'grocery', ws)


def test_load_checkpoint_refuses_files_that_are_not_training_checkpoints(tmp_path, reference):
    plain = tmp_path/'plain.pt'
    torch.save(build_model(ModelSpec(arch='tiny_cnn', num_classes=7)).state_dict(), plain)
    with pytest.raises(IntegrityError, match='is not a retail_cv training checkpoint'): load_checkpoint(plain)
    evil = tmp_path/'evil.ckpt'
    torch.save({'state_dict': {}, 'hyper_parameters': {'spec': {}}, 'payload': Path('/etc/passwd')}, evil)
    with pytest.raises(IntegrityError, match=r'holds a Python object \(pathlib'): load_checkpoint(evil)
    noise = tmp_path/'noise.ckpt'
    noise.write_bytes(os.urandom(2048))
    with pytest.raises(IntegrityError, match='is not a readable PyTorch checkpoint'): load_checkpoint(noise)
    with pytest.raises(ConfigError, match='does not exist'): load_checkpoint(tmp_path/'absent.ckpt')
    # a checkpoint whose weights do not fit its own spec
    ck = torch.load(reference.best_checkpoint, weights_only=True)
    ck['hyper_parameters']['spec']['arch'] = 'mobilenet_v3_small'
    torch.save(ck, tmp_path/'mixed.ckpt')
    with pytest.raises(IntegrityError, match='does not match the model its hyper_parameters describe'): load_checkpoint(tmp_path/'mixed.ckpt')


def test_one_callback_per_module_reaching_data_only_through_trainer_datamodule():
    import ast
    for f in sorted((ROOT/'retail_cv'/'train'/'callbacks').glob('_[a-z]*.py')):
        src = f.read_text()
        tree = ast.parse(src)
        callbacks = [n.name for n in tree.body if isinstance(n, ast.ClassDef) and any(
            getattr(b, 'id', getattr(b, 'attr', '')) in ('Callback', 'Checkpoint') for b in n.bases)]
        assert len(callbacks) == 1, (f.name, callbacks)
        assert not re.search(r'datamodule\.(_|inner\b)', src) and 'data.loading' not in src, f.name


def test_wandb_offline_stays_in_the_workspace_and_records_the_run(tmp_path):
    ws = Workspace.open(tmp_path/'ws')
    version = DatasetStore(ws).ingest(grocery_sample(), 'grocery', progress=False)
    before = {k: os.environ.get(k) for k in ('WANDB_DATA_DIR', 'WANDB_CACHE_DIR', 'WANDB_CONFIG_DIR', 'WANDB_MODE')}
    r = fit(_cfg(epochs=2, wandb_mode='offline', sample_predictions=3, log_every_n_steps=2), version, ws, run_name='tracked')
    assert {k: os.environ.get(k) for k in before} == before  # the environment is left as it was
    runs = list((ws/'wandb'/'wandb').glob(f'offline-run-*-{r.run_id}'))
    assert len(runs) == 1
    log = next(runs[0].glob('*.wandb')).read_bytes()
    for needle in (f'model-{r.run_id}', version.id, 'val/acc', 'train/loss_step', 'lr-AdamW', 'best.ckpt', 'dataset_version'):
        assert needle.encode() in log, needle
    assert len(list((runs[0]/'files'/'media').rglob('*.png'))) == 2 * 3  # 3 sample images per validation
    staged = list((ws/'wandb'/'.home').rglob('*'))
    assert staged and all(ws.root in p.parents for p in staged)
    # in a fresh process whose home folder is empty, W&B writes nothing there
    home = tmp_path/'home'; home.mkdir()
    script = _script(tmp_path, """
        import sys
        from retail_cv.train import TrainConfig, fit
        fit(TrainConfig(arch='tiny_cnn', epochs=1, batch_size=16, wandb_mode='offline'), 'grocery', sys.argv[1])
        """)
    p = subprocess.run([sys.executable, str(script), str(ws.root)], env={**_env(), 'HOME': str(home)}, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert not [q for q in home.rglob('*') if 'wandb' in str(q.relative_to(home)).lower()], list(home.rglob('*'))
    assert len(list((ws/'wandb'/'wandb').glob('offline-run-*'))) == 2
    # disabled: no W&B run at all
    r2 = fit(_cfg(epochs=1, wandb_mode='disabled'), version, ws, run_name='untracked')
    assert not list((ws/'wandb'/'wandb').glob(f'offline-run-*-{r2.run_id}'))


def test_time_limit_stops_and_more_time_continues_exactly(ws, reference):
    r = fit(_cfg(checkpoint_every_n_steps=1, max_minutes=0.0005), 'grocery', ws, run_name='timed')  # 30 ms: a step or two
    assert r.stopped_by == 'time_limit' and r.metrics['step'] < 12
    assert json.loads((r.run_dir/'metrics.json').read_text())['stopped_by'] == 'time_limit'
    more = fit(_cfg(checkpoint_every_n_steps=1), 'grocery', ws, run_name='timed', resume=True)  # no limit now
    assert more.run_id == r.run_id and more.history == reference.history


def test_early_stopping(ws):

    class Flat(Callback):  # a metric that never improves
        def on_validation_epoch_end(self, trainer, pl_module): pl_module.log('val/flat', 1.0)
    r = fit(_cfg(epochs=10, monitor='val/flat', early_stopping_patience=2), 'grocery', ws, callbacks=[Flat()])
    assert r.stopped_by == 'early_stopping' and len(r.history) == 3 and r.monitor == 'val/flat'


def test_detector_trains_and_reports_coco_map(tmp_path):
    ws = Workspace.open(tmp_path/'ws')
    generate_shelves(tmp_path/'shelves', images=4, width=320, height=320, shelves=(1, 2), skus=4, seed=0, val_fraction=0.5)
    r = fit(TrainConfig(task='detection', epochs=1, batch_size=2, wandb_mode='disabled'), tmp_path/'shelves', ws)
    assert r.monitor == 'val/map' and r.data['ref'].startswith('shelves@')
    assert {'val/map', 'val/map_50', 'val/loss'} <= set(r.metrics)
    from retail_cv.evaluate import evaluate  # the reported mAP is the last checkpoint's, measured again on the same split
    again = evaluate(r.last_checkpoint, tmp_path/'shelves', 'val', workspace=ws, write=False).metrics
    assert (r.metrics['val/map'], r.metrics['val/map_50']) == (pytest.approx(again['map50_95']), pytest.approx(again['map50']))
    det = load_checkpoint(r.last_checkpoint)
    assert det.spec.num_classes == 6 and det.class_names[0] == '__background__'
    boxes, scores, labels, _ = det.exportable()(det.exportable().example_input(1))
    assert boxes.shape == (1, 100, 4) and int(labels.max()) <= 6


def test_tiled_detector_trains_on_tiles_and_detects_whole_images(tmp_path):
    "The shelf recipe's model and pipeline: 160 px tiles in training, whole 640 px images in validation and export."
    ws = Workspace.open(tmp_path/'ws')
    generate_shelves(tmp_path/'shelves', images=4, width=640, height=480, shelves=(2, 3), skus=4, seed=0, val_fraction=0.5, labels='kinds')

    class Sizes(Callback):  # the sizes the model is fed, per stage
        def __init__(self): self.seen = {'train': set(), 'val': set()}
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx): self.seen['train'] |= {tuple(x.shape) for x in batch[0]}
        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0): self.seen['val'] |= {tuple(x.shape) for x in batch[0]}
    sizes = Sizes()
    cfg = TrainConfig(arch='fcos_tiny_fpn', max_steps=2, batch_size=2, wandb_mode='disabled', bn_recalibration=0,
                      pipeline={'tile_size': 160, 'tile_zoom': (0.8, 1.2)})
    r = fit(cfg, tmp_path/'shelves', ws, callbacks=[sizes])
    assert sizes.seen == {'train': {(3, 160, 160)}, 'val': {(3, 640, 640)}}
    det = load_checkpoint(r.last_checkpoint)
    with torch.no_grad(): boxes, scores, labels, _ = det.exportable()(det.exportable().example_input(1))
    assert det.spec.image_size == 640 and boxes.shape == (1, 100, 4) and float(boxes.max()) <= 640


def test_ddp_on_two_cpu_processes(ws, tmp_path):
    script = _script(tmp_path, f"""
        import json, os, sys
        from pathlib import Path
        from retail_cv.train import TrainConfig, fit
        if __name__ == '__main__':
            cfg = TrainConfig(arch='tiny_cnn', epochs=1, batch_size=16, wandb_mode='disabled',
                              accelerator='cpu', strategy='ddp', devices=2)
            r = fit(cfg, 'grocery', sys.argv[1], run_name='ddp')
            # a file per rank: the two processes share one stdout, where their lines can interleave
            (Path(sys.argv[2])/f"result-{{os.environ.get('LOCAL_RANK', '0')}}.json").write_text(json.dumps(r.to_dict()))
        """)
    out = tmp_path/'results'; out.mkdir()
    p = subprocess.run([sys.executable, str(script), str(ws.root), str(out)], env=_env(), capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    results = [json.loads(f.read_text()) for f in sorted(out.glob('result-*.json'))]
    assert len(results) == 2 and len({r['run_id'] for r in results}) == 1, (p.stdout + p.stderr)[-4000:]  # both ranks, one run
    r = results[0]
    # 70 training images split over 2 processes: 35 each, 2 full batches of 16 -> 2 steps (one process would take 4)
    assert r['metrics']['step'] == 2 and r['status'] == 'completed'
    m = load_checkpoint(r['last_checkpoint'])
    assert len(m.class_names) == 7
    assert torch.load(r['last_checkpoint'], weights_only=True)['global_step'] == 2


def test_job_notebook_runs_under_papermill(tmp_path):
    pm = Path(sys.executable).parent/'papermill'
    out = tmp_path/'out.ipynb'
    p = subprocess.run([str(pm), str(ROOT/'nbs'/'jobs'/'train.ipynb'), str(out), '-p', 'workspace', str(tmp_path/'ws'),
                        '-p', 'arch', 'tiny_cnn', '-p', 'image_size', '32', '-p', 'epochs', '1', '-p', 'wandb_mode', 'disabled',
                        '--cwd', str(tmp_path)], env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    runs = list((tmp_path/'ws'/'runs').glob('train-job-*'))
    assert len(runs) == 1 and (runs[0]/'checkpoints'/'best.ckpt').is_file()
    assert json.loads((runs[0]/'metrics.json').read_text())['status'] == 'completed'
    nb = json.loads(out.read_text())
    assert any(o.get('data', {}).get('image/png') for c in nb['cells'] for o in c.get('outputs', []))  # the learning curve
