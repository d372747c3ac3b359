"The CLI as users run it: data -> train -> tune, each a real subprocess on one workspace; defaults from the configs."
import json

import pytest
import typer
import yaml

from retail_cv.cli import app
from retail_cv.cli._app import Default
from retail_cv.core import Workspace
from retail_cv.data.formats import grocery_sample
from retail_cv.evaluate import evaluate
from retail_cv.k8s import K8sJobConfig
from retail_cv.train import TrainConfig
from retail_cv.tune import TuneConfig
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
    assert out['metrics']['epoch'] == 1 and out['metrics'] == out['history'][-1]
    # the printed accuracy is the last checkpoint's, measured again by `evaluate` on the same split
    again = evaluate(out['last_checkpoint'], 'grocery@latest', 'val', workspace=Workspace.open(ws), write=False)
    assert out['metrics']['val/acc'] == pytest.approx(again.metrics['top1'])


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
    assert cfg['batch_size'] == TrainConfig.model_fields['batch_size'].default  # neither in the file nor given
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


NO_KEY_ENV = {'WANDB_MODE': 'disabled', 'RETAIL_CV_SIGNING_KEY': ''}  # the workspace key only, whatever the caller's shell has


@pytest.fixture(scope='module')
def edge_run(ws):
    "A classifier trained from the shell: the run `export` starts from."
    r = run_cli('-w', ws, 'train', 'classify', '--data', 'grocery@latest', '--model', 'tiny_cnn', '--epochs', 2,
                '--batch-size', 16, '--run-name', 'edge', '--json', env={'WANDB_MODE': 'disabled'}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


@pytest.fixture(scope='module')
def exported(ws, edge_run):
    "`export` of that checkpoint on a workspace without a signing key, no --data, plain text output."
    assert not (ws/'keys'/'signing.key').exists()
    r = run_cli('-w', ws, 'export', edge_run['best_checkpoint'], '--profile', 'handheld-arm', env=NO_KEY_ENV, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    name, version = 'grocery-tiny_cnn', edge_run['run_id']  # <dataset>-<arch>, and the training run
    return r, ws/'bundles'/name/version/f"{name}-{version}-handheld-arm.tar.gz"


def test_export_without_data_uses_the_training_data_and_creates_the_key(ws, edge_run, exported):
    "No --data: the dataset version the checkpoint was trained on; no key: the workspace's, created and reported."
    r, bundle = exported
    key = ws/'keys'/'signing.key'
    assert f"created signing key {key}; devices verify bundles with {ws/'keys'/'signing.pub'}" in r.stderr.splitlines()
    assert key.is_file() and (ws/'keys'/'signing.pub').is_file()
    head = r.stdout.splitlines()[0]
    assert head.startswith(f"bundle {bundle} (handheld-arm, grocery-tiny_cnn {edge_run['run_id']}): shipped "), head
    assert bundle.is_file()
    for fmt in ('torch', 'onnx-fp32'):  # evaluated on the training run's dataset version
        assert json.loads((bundle.parent/'eval'/fmt/'eval.json').read_text())['data_id'] == edge_run['data']['id']


def test_export_no_new_key_refuses_on_a_fresh_workspace(tmp_path):
    "--no-new-key without a key stops before any work, naming the command that makes one."
    fresh = tmp_path/'fresh'
    r = run_cli('-w', fresh, 'export', tmp_path/'missing.ckpt', '--profile', 'handheld-arm', '--no-new-key', env=NO_KEY_ENV)
    assert r.returncode == 1 and 'retail-cv keys generate' in r.stderr and 'Traceback' not in r.stderr, r.stderr
    assert not (fresh/'keys'/'signing.key').exists()


def test_exported_bundle_verifies_and_predicts(ws, exported, tmp_path):
    "Research to edge from the shell: the signed bundle `export` printed is what the torch-free runtime serves."
    _, bundle = exported
    r = run_cli('-w', ws, 'keys', 'generate')
    assert r.returncode == 1 and 'already exists' in r.stderr  # the key that signed the bundle is kept
    r = run_cli('-w', ws, 'bundle', 'verify', bundle, '--golden', '--json')
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout)['golden_ok']
    photos = sorted((grocery_sample()/'val').rglob('*.jpg'))[:3]
    r = run_cli('-w', ws, 'predict', bundle, *photos, '--json')
    assert r.returncode == 0, r.stderr
    lines = [json.loads(l) for l in r.stdout.splitlines() if l.strip()]
    assert len(lines) == 3 and all('label' in l for l in lines)
    broken = tmp_path/'broken.jpg'; broken.write_bytes(b'not an image')
    r = run_cli('-w', ws, 'predict', bundle, broken)
    assert r.returncode == 1 and 'broken.jpg' in r.stderr and 'Traceback' not in r.stderr


def _params(cmd):
    yield from cmd.params
    for sub in getattr(cmd, 'commands', {}).values(): yield from _params(sub)


def test_defaults_are_read_from_their_owners():
    "Every default the CLI takes from a config, a signature or a constant resolves, and --help shows the owner's value."
    found = {p.default.target: p.default() for p in _params(typer.main.get_command(app)) if isinstance(p.default, Default)}
    assert {'retail_cv.train:TrainConfig.epochs', 'retail_cv.tune:TuneConfig.trials', 'retail_cv.data.synth:SynthConfig.images',
            'retail_cv.k8s:K8sJobConfig.memory', 'retail_cv.demo:DemoConfig.shelf_images'} <= set(found)
    assert found['retail_cv.train:TrainConfig.epochs'] == TrainConfig.model_fields['epochs'].default
    assert found['retail_cv.tune:TuneConfig.n_jobs'] == TuneConfig.model_fields['n_jobs'].default
    r = run_cli('k8s', 'render', '--help', env={'COLUMNS': '200'})
    assert f"[default: {K8sJobConfig.model_fields['memory'].default}]" in r.stdout


def test_k8s_defaults_stay_with_the_config():
    "Options not given are left to K8sJobConfig; given ones win."
    r = run_cli('k8s', 'render', 'train', '--image', 'img', '--cpu', '3')
    assert r.returncode == 0, r.stderr
    c = yaml.safe_load(r.stdout)['spec']['template']['spec']['containers'][0]
    assert c['resources']['limits']['cpu'] == '3' and c['resources']['limits']['memory'] == K8sJobConfig.model_fields['memory'].default


def test_synth_options_file_and_explicit_options(tmp_path):
    "`data synth`: SynthConfig's defaults, then the --options file, then the options given (which win)."
    opts = tmp_path/'synth.yaml'; opts.write_text('images: 3\nskus: 5\n')
    r = run_cli('data', 'synth', '--out', tmp_path/'a', '--options', opts, '--images', 2)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith('2 images') and len(list((tmp_path/'a').rglob('*.jpg'))) == 2
    cats = {c['name'] for f in (tmp_path/'a').rglob('*.json') for c in json.loads(f.read_text()).get('categories', [])}
    assert len(cats - {'gap', 'price_tag'}) == 5  # from the file: the command line left skus alone


def test_synth_labels_kinds_writes_three_categories(tmp_path):
    r = run_cli('data', 'synth', '--out', tmp_path/'k', '--images', 1, '--seed', 999, '--labels', 'kinds')
    assert r.returncode == 0, r.stderr
    cats = json.loads((tmp_path/'k'/'annotations.json').read_text())['categories']
    assert [c['name'] for c in cats] == ['product', 'gap', 'price_tag']
    r = run_cli('data', 'synth', '--out', tmp_path/'x', '--images', 1, '--labels', 'classes')
    assert r.returncode == 1 and "'labels'" in r.stderr and 'Traceback' not in r.stderr


def test_piped_output_keeps_long_paths_whole(tmp_path):
    "stdout and stderr are pipes (as in CI logs): a path longer than 80 columns is printed whole, on one line."
    out = tmp_path/('shelves-' + 'x' * 100)
    r = run_cli('data', 'synth', '--out', out, '--images', 1, env={'COLUMNS': '80'})
    assert r.returncode == 0, r.stderr
    assert len(str(out)) > 80 and len(r.stdout.splitlines()) == 1 and f"written to {out} at " in r.stdout
    blocker = tmp_path/('not-a-folder-' + 'y' * 100); blocker.write_text('')
    r = run_cli('data', 'synth', '--out', blocker, '--images', 1, env={'COLUMNS': '80'})
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [f"error: output {blocker} exists and is not a folder"]


@pytest.mark.parametrize('args, message', [
    (['data', 'synth', '--images', 1, '--no-such-option-' + 'z' * 100], 'No such option: --no-such-option-' + 'z' * 100),
    (['data', 'synth', '--out', 'x', 'extra-' + 'e' * 100], 'Got unexpected extra argument(s) (extra-' + 'e' * 100 + ')'),
])
def test_piped_usage_error_is_whole_lines_exit_2(args, message):
    "A usage error on a pipe (a CI log): exit code 2, the usage, the hint and the error each on one line, nothing cut at 80 columns."
    r = run_cli(*args, env={'COLUMNS': '80'})
    assert r.returncode == 2, r.stderr
    assert r.stdout == '' and r.stderr.splitlines() == [
        'Usage: retail-cv data synth [OPTIONS]', "Try 'retail-cv data synth --help' for help.", f'error: {message}'], r.stderr
