"""Edge runtime: verified bundles only, clear input errors, provider fallback said out loud, torch-free, golden check."""
from __future__ import annotations

import io
import json
import logging
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from retail_cv.bundle import build_bundle, generate_signing_key, sign_bundle
from retail_cv.core import ConfigError, DataError, DependencyError, IntegrityError, Workspace
from retail_cv.models import ModelSpec, build_model, example_input, recalibrate_batchnorm, tiny_classifier, to_onnx, wrap
from retail_cv.preprocess import preprocess, preprocess_with_geometry
from retail_cv.profiles import BUILTIN_PROFILES, DeviceProfile, get_profile, load_profile_file, providers_for
from retail_cv.runtime import GoldenReport, Predictor, benchmark, check_golden, image_files

LABELS = ['cola', 'water', 'juice']


@pytest.fixture(scope='session')
def env(tmp_path_factory):
    "A workspace with a key; a classifier bundle (archive) and an SSDlite detector bundle (folder); photos."
    root = tmp_path_factory.mktemp('runtime')
    ws = Workspace.open(root/'ws')
    key = generate_signing_key(ws)
    rng = np.random.default_rng(1)
    photos = []
    for i, (h, w) in enumerate([(240, 320), (300, 200), (64, 64), (90, 500)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root/f'photo{i}.jpg', quality=95)
        photos.append(root/f'photo{i}.jpg')
    torch.manual_seed(0)
    clf = tiny_classifier(3, image_size=32)
    clf_onnx = to_onnx(clf, root/'clf.onnx')
    clf_kw = dict(name='shelf-classifier', version='1', labels=LABELS, contract=clf.contract(), golden_images=photos[:3],
                  workspace=ws, profile='shelf-cam-x86', postprocessing={'top_k': 3})
    clf_bundle = build_bundle(root/'clf.tar', clf_onnx, **clf_kw)
    dspec = ModelSpec(arch='ssdlite320_mobilenet_v3_large', num_classes=3, max_detections=20)
    det = wrap(recalibrate_batchnorm(build_model(dspec), example_input(dspec, 4, seed=9)), dspec)
    det_bundle = build_bundle(root/'det', to_onnx(det, root/'det.onnx'), name='shelf-detector', version='1', labels=LABELS,
                              contract=det.contract(), golden_images=photos[:3], workspace=ws, profile='shelf-cam-x86',
                              postprocessing={'score_threshold': 0.45})
    return dict(root=root, ws=ws, key=key, trusted=[key.public_key], photos=photos, clf=clf, clf_onnx=clf_onnx,
                clf_kw=clf_kw, clf_bundle=clf_bundle, det=det, det_bundle=det_bundle)


@pytest.fixture(scope='session')
def clf_pred(env): return Predictor.from_bundle(env['clf_bundle'], trusted_keys=env['trusted'])


@pytest.fixture(scope='session')
def det_pred(env): return Predictor.from_bundle(env['det_bundle'], trusted_keys=env['trusted'])


# ---- same answers as the torch side ------------------------------------------------------------------------------

def test_classification_matches_the_pytorch_model_on_the_same_preprocessing(env, clf_pred):
    x = preprocess(env['photos'], env['clf'].preprocessing)  # the evaluation side calls this very function
    with torch.no_grad(): probs = torch.softmax(env['clf'](torch.from_numpy(x))[0], 1).numpy()
    results = clf_pred.predict_batch(env['photos'])
    assert [r.label for r in results] == [LABELS[i] for i in probs.argmax(1)]
    np.testing.assert_allclose([r.score for r in results], probs.max(1), rtol=1e-4)
    assert [[l for l, _ in r.topk] for r in results] == [[LABELS[i] for i in np.argsort(-p)] for p in probs]


def test_preprocess_agrees_with_the_training_pipeline(env):
    "The training pipeline decodes with torchvision and resizes uint8 tensors; this differs by at most one grey level."
    from retail_cv.data.loading import decode_image_bytes, resize_image
    spec = ModelSpec(arch='mobilenet_v3_small', num_classes=3, image_size=96).preprocessing
    mean, std = torch.tensor(spec['mean']).view(3, 1, 1), torch.tensor(spec['std']).view(3, 1, 1)
    for photo in env['photos']:
        img, _ = resize_image(decode_image_bytes(photo.read_bytes()), (96, 96), 'stretch')
        theirs = ((img.float() / 255 - mean) / std).numpy()
        ours = preprocess(photo, spec)[0]
        diff = np.abs(ours - theirs)
        assert diff.max() <= 1 / 255 / min(spec['std']) + 1e-5
        assert (diff > 1e-5).mean() < 0.02


def test_detections_are_the_pytorch_detections_in_original_pixels(env, det_pred):
    photo = env['photos'][1]  # 200 x 300, stretched to 320 x 320
    x, (g,) = preprocess_with_geometry(photo, det_pred.contract.preprocessing)
    with torch.no_grad(): boxes, scores, labels, _ = (t[0].numpy() for t in env['det'](torch.from_numpy(x)))
    keep = scores >= 0.45
    d = det_pred.predict(photo)
    assert len(d) == keep.sum() > 0
    np.testing.assert_allclose(d.scores, scores[keep], atol=1e-4)
    assert d.labels.tolist() == (labels[keep] - 1).tolist() and d.label_names == tuple(LABELS[i] for i in labels[keep] - 1)
    np.testing.assert_allclose(d.boxes * np.float32([320 / 200, 320 / 300] * 2), np.clip(boxes[keep], 0, 320), atol=0.05)
    assert d.boxes[:, [0, 2]].max() <= 200 and d.boxes[:, [1, 3]].max() <= 300


# ---- errors ------------------------------------------------------------------------------------------------------

def test_wrong_input_shape_or_dtype_is_a_clear_error(clf_pred, det_pred):
    x = preprocess(Image.new('RGB', (10, 10)), clf_pred.contract.preprocessing)
    assert clf_pred.run(x)['logits'].shape == (1, 3)
    with pytest.raises(DataError, match=r"input 'images' must be float32 with shape \(batch, 3, 32, 32\), got float64"):
        clf_pred.run(x.astype(np.float64))
    with pytest.raises(DataError, match=r"got float32 with shape \(1, 3, 64, 64\)"): clf_pred.run(np.zeros((1, 3, 64, 64), np.float32))
    with pytest.raises(DataError, match=r"got float32 with shape \(3, 32, 32\)"): clf_pred.run(x[0])
    with pytest.raises(DataError, match='must be a numpy array'): clf_pred.run(x.tolist())
    with pytest.raises(DataError, match=r"must be float32 with shape \(1, 3, 320, 320\), got float32 with shape \(2, 3, 320, 320\)"):
        det_pred.run(np.zeros((2, 3, 320, 320), np.float32))  # the detector's batch is fixed at export
    with pytest.raises(DataError, match='image arrays must be uint8'): clf_pred.predict(x[0].transpose(1, 2, 0))
    with pytest.raises(DataError, match='predict takes one image'): clf_pred.predict(np.zeros((2, 8, 8, 3), np.uint8))


def test_corrupt_image_is_named(env, clf_pred, tmp_path):
    shots = tmp_path/'shots'; shots.mkdir()
    for p in env['photos']: shutil.copy(p, shots/p.name)
    (shots/'zz_corrupt.jpg').write_bytes(env['photos'][0].read_bytes()[:500])
    (shots/'aa_empty.png').write_bytes(b'')
    with pytest.raises(DataError, match='zz_corrupt.jpg: cannot decode image'): clf_pred.predict(shots/'zz_corrupt.jpg')
    with pytest.raises(DataError, match='aa_empty.png: cannot decode image'): clf_pred.predict_many(shots, progress=False)
    with pytest.raises(DataError, match='missing.jpg: no such file or folder'): clf_pred.predict_many([shots/'missing.jpg'])
    with pytest.raises(DataError, match='upload 7: cannot decode image'):
        from retail_cv.preprocess import load_image
        load_image(b'GIF89a garbage', name='upload 7')
    preds = clf_pred.predict_many(shots, progress=True, errors='skip')
    assert [Path(p.source).name for p in preds] == ['aa_empty.png', 'photo0.jpg', 'photo1.jpg', 'photo2.jpg', 'photo3.jpg', 'zz_corrupt.jpg']
    assert [p.error is None for p in preds] == [False, True, True, True, True, False]
    assert preds[1].result.label == clf_pred.predict(env['photos'][0]).label
    assert json.loads(json.dumps([p.to_dict() for p in preds]))[5]['error'].endswith('(OSError: Truncated File Read)')


def test_image_files_walks_folders_in_order(tmp_path):
    (tmp_path/'b').mkdir(); (tmp_path/'a.PNG').write_bytes(b''); (tmp_path/'b'/'c.jpeg').write_bytes(b'')
    (tmp_path/'b'/'readme.md').write_text('x')
    assert [p.relative_to(tmp_path).as_posix() for p in image_files(tmp_path)] == ['a.PNG', 'b/c.jpeg']
    assert image_files([tmp_path/'b'/'readme.md']) == [tmp_path/'b'/'readme.md']  # named files are kept


# ---- bundles the runtime refuses ---------------------------------------------------------------------------------

def test_tampered_or_untrusted_bundle_never_opens(env, tmp_path):
    b = Path(shutil.copytree(env['det_bundle'], tmp_path/'det'))
    raw = bytearray((b/'model.onnx').read_bytes()); raw[len(raw) // 3] ^= 1; (b/'model.onnx').write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match='model.onnx was changed'): Predictor.from_bundle(b, trusted_keys=env['trusted'])
    stranger = generate_signing_key(tmp_path/'stranger')
    with pytest.raises(IntegrityError, match='which is not trusted'):
        Predictor.from_bundle(env['clf_bundle'], trusted_keys=stranger.public_key)


def test_model_that_breaks_its_contract_is_refused(env, tmp_path):
    "A signed bundle whose model has 5 outputs where the contract promises 3 (a builder bug, not an attack)."
    b = Path(shutil.copytree(env['det_bundle'], tmp_path/'det'))
    shutil.copy(to_onnx(tiny_classifier(3, image_size=320), tmp_path/'x.onnx'), b/'model.onnx')
    sign_bundle(b, workspace=env['ws'])
    with pytest.raises(IntegrityError, match="model.onnx does not match the contract in bundle.json: model outputs are \\['logits', 'embedding'\\]"):
        Predictor.from_bundle(b, trusted_keys=env['trusted'])


def test_bundle_needing_a_newer_onnxruntime_is_refused(env, tmp_path):
    b = Path(shutil.copytree(env['det_bundle'], tmp_path/'det'))
    meta = json.loads((b/'bundle.json').read_text()); meta['min_ort_version'] = '99.1'
    (b/'bundle.json').write_text(json.dumps(meta)); sign_bundle(b, workspace=env['ws'])
    with pytest.raises(DependencyError, match=f'needs onnxruntime >= 99.1 .* this is {ort.__version__}: upgrade onnxruntime'):
        Predictor.from_bundle(b, trusted_keys=env['trusted'])


# ---- profiles and providers --------------------------------------------------------------------------------------

def test_missing_execution_provider_falls_back_to_cpu_and_says_so(env, caplog):
    assert 'CUDAExecutionProvider' not in ort.get_available_providers()  # this machine has no GPU
    with caplog.at_level(logging.WARNING):
        p = Predictor.from_bundle(env['clf_bundle'], profile='gpu-cuda', trusted_keys=env['trusted'])
    assert p.providers == ['CPUExecutionProvider'] and p.profile.name == 'gpu-cuda'
    fallback = [n for n in p.notes if 'asks for CUDAExecutionProvider' in n]
    assert fallback and 'running on CPUExecutionProvider' in fallback[0]
    assert any('asks for CUDAExecutionProvider' in r.getMessage() for r in caplog.records)
    assert "bundle was built and measured for profile 'shelf-cam-x86', running with 'gpu-cuda'" in p.notes
    assert check_golden(p).ok  # and the answers are still the bundle's


def test_profile_from_yaml_drives_the_session(env, tmp_path):
    (tmp_path/'kiosk.yaml').write_text('providers: [cpu]\nintra_op_threads: 1\nbatch_size: 2\nallow_spinning: false\n')
    p = Predictor.from_bundle(env['clf_bundle'], profile=tmp_path/'kiosk.yaml', trusted_keys=env['trusted'])
    assert (p.profile.name, p.batch_size) == ('kiosk', 2)
    opts = p.session.get_session_options()
    assert (opts.intra_op_num_threads, opts.get_session_config_entry('session.intra_op.allow_spinning')) == (1, '0')
    assert [r.label for r in p.predict_batch(env['photos'])] == [p.predict(x).label for x in env['photos']]


@pytest.mark.parametrize('text, match', [
    ('providers: [CUDAProvider]\n', "unknown execution provider 'CUDAProvider'; did you mean 'CUDAExecutionProvider'?"),
    ('intra_op_threads: four\n', "config key 'intra_op_threads': Input should be a valid integer"),
    ('threads: 4\n', "unknown config key 'threads'"),
    ('precisions: [int4]\n', "config key 'precisions.0'"),
    ('- just\n- a list\n', 'must hold a mapping'),
    ('providers: [CPUExecutionProvider\n', 'is not valid YAML'),
    ('provider_options: {cuda: {device_id: 0}}\n', 'provider_options for'),
])
def test_bad_profile_yaml_is_a_clear_error(tmp_path, text, match):
    (tmp_path/'bad.yaml').write_text(text)
    with pytest.raises(ConfigError) as e: load_profile_file(tmp_path/'bad.yaml')
    assert match in str(e.value) and 'bad.yaml' in str(e.value), str(e.value)


def test_profiles_are_found_in_the_workspace_and_by_name(env, tmp_path):
    ws = Workspace.open(tmp_path/'ws')
    (ws/'profiles').mkdir()
    (ws/'profiles'/'door-cam.yaml').write_text('providers: [CPUExecutionProvider]\nlatency_budget_ms: 40\n')
    assert get_profile('door-cam', ws, env={}).latency_budget_ms == 40
    with pytest.raises(ConfigError, match="unknown device profile 'door-cm'; did you mean 'door-cam'"): get_profile('door-cm', ws, env={})
    assert providers_for(BUILTIN_PROFILES['shelf-cam-x86']) == (['CPUExecutionProvider'], None)
    provs, note = providers_for(DeviceProfile(name='trt', providers=['TensorrtExecutionProvider', 'CUDAExecutionProvider']))
    assert provs == ['CPUExecutionProvider'] and 'TensorrtExecutionProvider, CUDAExecutionProvider' in note


# ---- golden set --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('which', ['clf', 'det'])
def test_golden_check_passes_on_a_good_bundle(clf_pred, det_pred, which):
    r = check_golden(clf_pred if which == 'clf' else det_pred, raise_on_failure=True)
    assert isinstance(r, GoldenReport) and (r.ok, r.images, r.failures) == (True, 3, ())
    if which == 'det': assert r.max_abs_diff['boxes'] < 0.01  # compared over real detections, not only padding


def test_golden_check_fails_when_outputs_differ(env, tmp_path):
    "A bundle whose golden outputs were recorded from other weights: signed and valid, but its golden check fails."
    good = Path(env['clf_bundle'])
    impostor = build_bundle(tmp_path/'other', to_onnx(tiny_classifier(3, image_size=32), tmp_path/'o.onnx'),
                            **{**env['clf_kw'], 'workspace': env['ws']})
    mixed = build_bundle(tmp_path/'mixed', env['clf_onnx'], **env['clf_kw'])
    shutil.copy(impostor/'golden'/'expected.npz', mixed/'golden'/'expected.npz')
    sign_bundle(mixed, workspace=env['ws'])
    p = Predictor.from_bundle(mixed, trusted_keys=env['trusted'])
    r = check_golden(p)
    assert not r.ok and r.failures[0].startswith('golden/000.jpg: logits differ by up to')
    assert sum('logits differ' in f for f in r.failures) == 3 and set(r.max_abs_diff) == {'logits', 'embedding'}
    with pytest.raises(IntegrityError, match='golden check failed'): check_golden(p, raise_on_failure=True)
    assert good.exists()


def test_benchmark_reports_latency_for_a_profile(env, clf_pred):
    lat = benchmark(clf_pred, runs=5, warmup=1)
    assert 0 < lat.p50_ms <= lat.p90_ms and lat.runs == 5 and lat.profile == 'shelf-cam-x86'
    lat = benchmark(env['clf_onnx'], 'gpu-cuda', (4, 3, 32, 32), runs=3, warmup=1)
    assert (lat.batch_size, lat.providers, lat.profile) == (4, ['CPUExecutionProvider'], 'gpu-cuda')
    with pytest.raises(ConfigError, match='give input_shape'): benchmark(env['clf_onnx'], runs=1)


# ---- no torch on the device --------------------------------------------------------------------------------------

def test_runtime_works_without_torch(env, tmp_path):
    shots = tmp_path/'shots'; shots.mkdir()
    for p in env['photos']: shutil.copy(p, shots/p.name)
    script = textwrap.dedent(f'''
        import json, sys
        class NoTorch:
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] in ('torch', 'torchvision', 'lightning', 'pytorch_lightning'):
                    raise ImportError(name + ' is not installed on this device')
        sys.meta_path.insert(0, NoTorch())
        from retail_cv.runtime import Predictor, check_golden
        out = {{}}
        for name, path in (('clf', {str(env['clf_bundle'])!r}), ('det', {str(env['det_bundle'])!r})):
            p = Predictor.from_bundle(path, profile='gpu-cuda', trusted_keys={str(env['key'].public_key)!r})
            preds = p.predict_many({str(shots)!r}, progress=True)
            out[name] = {{'golden': check_golden(p).ok, 'n': len(preds), 'notes': p.notes,
                          'first': preds[0].to_dict()}}
        out['torch_loaded'] = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'lightning'))
        print(json.dumps(out))
    ''')
    res = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out['torch_loaded'] == []
    assert out['clf']['golden'] and out['det']['golden'] and out['clf']['n'] == out['det']['n'] == 4
    assert any('falling' in n or 'running on CPUExecutionProvider' in n for n in out['clf']['notes'])
    assert out['clf']['first']['label'] in LABELS and 'detections' in out['det']['first']
    # and the forbidding hook is real: the same interpreter cannot import torch
    probe = script.split('from retail_cv.runtime')[0] + 'import torch\n'
    assert 'not installed on this device' in subprocess.run([sys.executable, '-c', probe], capture_output=True, text=True).stderr
