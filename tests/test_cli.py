"The CLI as users run it: data -> train -> tune, each a real subprocess on one workspace."
import json

import pytest

from retail_cv.data.formats import grocery_sample
from conftest import run_cli


@pytest.fixture(scope='module')
def ws(tmp_path_factory):
    ws = tmp_path_factory.mktemp('cli-ws')
    r = run_cli('-w', ws, 'data', 'ingest', grocery_sample(), '--name', 'grocery', '--json')
    assert r.returncode == 0, r.stderr
    return ws


def test_train_prints_checkpoint_and_metrics(ws):
    r = run_cli('-w', ws, 'train', 'classify', '--data', 'grocery@latest', '--model', 'tiny_cnn', '--epochs', 2,
                '--batch-size', 16, '--json', env={'WANDB_MODE': 'disabled'}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out['status'] == 'completed' and out['best_checkpoint'].endswith('best.ckpt')
    assert 0 <= out['metrics']['val/acc'] <= 1 and out['metrics']['epoch'] == 1


def test_train_recipe_file_and_explicit_options(ws, tmp_path):
    "A --config recipe fills TrainConfig; options given on the command line win over it, unset ones do not."
    recipe = tmp_path/'recipe.yaml'
    recipe.write_text("lr: 0.01\nepochs: 5\nlabel_smoothing: 0.1\nmixup_alpha: 0.2\npipeline: {crop_scale: [0.5, 1.0]}\n")
    r = run_cli('-w', ws, 'train', 'classify', '--data', 'grocery@latest', '--model', 'tiny_cnn', '--epochs', 1, '--config', recipe,
                '--json', env={'WANDB_MODE': 'disabled'}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    cfg = json.loads((ws/'runs'/out['run_id']/'config.json').read_text())['config']
    assert (cfg['lr'], cfg['epochs'], cfg['label_smoothing'], cfg['mixup_alpha'], cfg['pipeline']['crop_scale']) == (0.01, 1, 0.1, 0.2, [0.5, 1.0])
    assert cfg['batch_size'] == 32  # the option's default, untouched by the file
    recipe.write_text("lr: [0.01\n")
    r = run_cli('-w', ws, 'train', 'classify', '--data', 'grocery@latest', '--config', recipe, env={'COLUMNS': '400'})
    assert r.returncode == 1 and f'training config file {recipe} is not valid YAML' in r.stderr and 'Traceback' not in r.stderr


def test_train_bad_input_is_one_line(ws):
    r = run_cli('-w', ws, 'train', 'classify', '--data', 'grocery@latest', '--model', 'no_such_net', '--epochs', 1)
    assert r.returncode == 1 and 'no_such_net' in r.stderr and 'Traceback' not in r.stderr
    r = run_cli('-w', ws, 'train', 'segment', '--data', 'grocery@latest')
    assert r.returncode == 2 and 'classify' in r.stderr


def test_tune_reports_best_trial(ws, tmp_path):
    space = tmp_path/'space.yaml'
    space.write_text("arch: {type: categorical, choices: [tiny_cnn]}\nlr: {type: float, low: 0.001, high: 0.01, log: true}\n")
    r = run_cli('-w', ws, 'tune', 'classify', '--data', 'grocery@latest', '--trials', 2, '--epochs', 1, '--space', space, '--json',
                env={'WANDB_MODE': 'disabled'}, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert len(out['trials']) == 2 and out['best'] is not None and 'history' in out['files']


def test_train_export_verify_predict(ws, tmp_path):
    "Research to edge from the shell: a checkpoint becomes a signed bundle that the torch-free runtime serves."
    r = run_cli('-w', ws, 'train', 'classify', '--data', 'grocery@latest', '--model', 'tiny_cnn', '--epochs', 2,
                '--batch-size', 16, '--run-name', 'edge', '--json', env={'WANDB_MODE': 'disabled'}, timeout=300)
    ckpt = json.loads(r.stdout)['best_checkpoint']
    r = run_cli('-w', ws, 'keys', 'generate')
    assert r.returncode == 0, r.stderr
    r = run_cli('-w', ws, 'export', ckpt, '--profile', 'handheld-arm', '--data', 'grocery@latest', '--json',
                env={'WANDB_MODE': 'disabled'}, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    bundle = json.loads(r.stdout)['bundle']
    r = run_cli('-w', ws, 'bundle', 'verify', bundle, '--golden', '--json')
    assert r.returncode == 0 and json.loads(r.stdout)['golden_ok'], r.stdout + r.stderr
    photos = sorted((grocery_sample()/'val').rglob('*.jpg'))[:3]
    r = run_cli('-w', ws, 'predict', bundle, *photos, '--json')
    assert r.returncode == 0, r.stderr
    lines = [json.loads(l) for l in r.stdout.splitlines() if l.strip()]
    assert len(lines) == 3 and all('label' in l for l in lines)
    broken = tmp_path/'broken.jpg'; broken.write_bytes(b'not an image')
    r = run_cli('-w', ws, 'predict', bundle, broken)
    assert r.returncode == 1 and 'broken.jpg' in r.stderr and 'Traceback' not in r.stderr
