"Export: the parity gate passes on a trained model and fails, with its numbers, on a damaged one; quantisation and the precision choice; OpenCV as an independent consumer; one input tensor on both sides; detection; the bundle on the device."
import json
import os
import re
import time
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from onnx import TensorProto, helper, numpy_helper

from retail_cv.bundle import SIGNING_KEY_ENV, generate_signing_key, verify_bundle
from retail_cv.core import ConfigError, Workspace
from retail_cv.data.formats import grocery_sample
from retail_cv.data.store import DatasetStore
from retail_cv.data.synth import generate_shelves
from retail_cv.evaluate import eval_split, evaluate, load_model, onnx_metadata
from retail_cv.export import (FORMATS, ExportConfig, ParityError, benchmark, choose_precision, export, export_onnx, measure_latencies,
                               quantize_int8)
from retail_cv.export._export import _gate_lowp
from retail_cv.models import Classifier, ModelSpec, build_model, example_input, recalibrate_batchnorm, tiny_classifier, wrap
from retail_cv.preprocess import preprocess, preprocess_with_geometry, softmax
from retail_cv.runtime import Predictor, check_golden
from retail_cv.train import TrainConfig, fit, load_checkpoint


@pytest.fixture(scope='module')
def ws(tmp_path_factory) -> Workspace:
    ws = Workspace.open(tmp_path_factory.mktemp('export')/'ws')
    generate_signing_key(ws)
    return ws


@pytest.fixture(scope='module')
def grocery(ws):
    return DatasetStore(ws).ingest(grocery_sample(), 'grocery', progress=False)


@pytest.fixture(scope='module')
def trained(ws, grocery):
    "A tiny CNN trained for a few epochs on the Grocery sample at 32 px."
    return fit(TrainConfig(arch='tiny_cnn', image_size=32, epochs=4, batch_size=16, lr=3e-3, wandb_mode='disabled'),
               grocery, ws, run_name='tiny')


@pytest.fixture(scope='module')
def exported(ws, grocery, trained):
    return export(trained.best_checkpoint, 'shelf-cam-x86', grocery, ws)


def test_parity_gate_passes_on_a_trained_model(exported, trained):
    p = exported.parity
    assert p.passed and p.failures == []
    assert p.outputs['max_abs_diff'] <= 1e-4 and p.outputs['top1_agreement'] == 1.0 and p.images == 4
    assert p.metric == 'top1' and p.metric_delta_pts <= 0.1
    assert exported.evaluations['torch'].metrics['top1'] == pytest.approx(exported.evaluations['onnx-fp32'].metrics['top1'])
    report = json.loads(exported.report.read_text())
    assert report['status'] == 'ok' and report['parity']['passed'] and report['profile'] == 'shelf-cam-x86'
    # the ONNX file describes itself; the classifier's batch axis is dynamic
    meta = onnx_metadata(exported.onnx['fp32'])
    assert (meta['task'], meta['name'], meta['version'], meta['precision']) == ('classification', exported.name, trained.run_id, 'fp32')
    assert meta['labels'] == exported.evaluations['torch'].labels and meta['preprocessing']['image_size'] == [32, 32]
    onnx.checker.check_model(onnx.load(str(exported.onnx['fp32'])))
    sess = ort.InferenceSession(str(exported.onnx['fp32']), providers=['CPUExecutionProvider'])
    assert sess.get_inputs()[0].shape == ['batch', 3, 32, 32]


class ExportsWrong(Classifier):
    "A classifier whose exported graph is not its PyTorch forward (as an export-only code path would make it): noise on the logits."
    def forward(self, images):
        logits, embedding = super().forward(images)
        if not torch.onnx.is_in_onnx_export(): return logits, embedding
        return logits + torch.from_numpy(np.random.default_rng(0).standard_normal(logits.shape[-1]).astype(np.float32)), embedding


def test_broken_export_fails_with_its_numbers(ws, grocery, trained):
    clf = load_checkpoint(trained.best_checkpoint).exportable()
    broken = ExportsWrong(clf.model, clf.spec)
    with pytest.raises(ParityError) as e:
        export(broken, 'shelf-cam-x86', grocery, ws, version='broken')
    msg = str(e.value)
    diff = float(re.search(r'max \|logit diff\| ([0-9.e+-]+) > 0.0001', msg).group(1))
    assert diff > 1e-4 and 'parity gate failed' in msg and 'model.fp32.onnx' in msg
    assert e.value.report.outputs['max_abs_diff'] == pytest.approx(diff, rel=1e-2) and not e.value.report.passed
    folder = ws/'bundles'/'grocery-tiny_cnn'/'broken'
    assert json.loads((folder/'shelf-cam-x86.export.json').read_text())['status'] == 'parity_failed'
    assert not list(folder.glob('*.tar.gz'))  # nothing shipped
    # a tolerance loose enough lets the same damage through: the gate is the tolerance, not a constant answer
    loose = export(broken, 'shelf-cam-x86', grocery, ws, version='loose', precisions=['fp32'],
                   max_abs_diff=10.0, min_top1_agreement=0.0, max_metric_delta_pts=100.0)
    assert loose.parity.passed and loose.parity.outputs['max_abs_diff'] > 1e-4


def test_quantisation_gate_and_precision_choice_are_recorded(exported, ws, grocery):
    info = verify_bundle(exported.bundle, workspace=ws)
    pc = info.meta.precision
    by = {m.precision: m for m in pc.measurements}
    assert by['fp32'].metrics['top1'] >= 0.10  # high enough for int8 to be tried
    assert set(by) == {'fp32', 'int8'} and all(m.latency_ms > 0 for m in by.values())
    assert 'top1 drop' in by['int8'].note and 'static QDQ per-channel' in by['int8'].note
    drop = (by['fp32'].metrics['top1'] - by['int8'].metrics['top1']) * 100
    # the agreement in the note is the share of the 21 validation photos on which both files give the same top-1 class
    sp = eval_split(grocery, 'val')
    x = preprocess([sp.read(k) for k in range(len(sp))], load_model(exported.onnx['fp32']).preprocessing)
    top1 = lambda f: ort.InferenceSession(str(f), providers=['CPUExecutionProvider']).run(None, {'images': x})[0].argmax(1)
    agreement = float((top1(exported.onnx['fp32']) == top1(exported.onnx['int8'])).mean())
    assert f"top-1 agreement with fp32 {agreement:.1%} on 21 images (gate >= 99%)" in by['int8'].note
    int8_ok = drop <= 1.0 and agreement >= 0.99 and by['fp32'].latency_ms >= 1.05 * by['int8'].latency_ms
    assert pc.chosen == ('int8' if int8_ok else 'fp32') and pc.reason
    assert info.meta.latency.profile == 'shelf-cam-x86' and info.meta.latency.p50_ms == pytest.approx(by[pc.chosen].latency_ms)
    assert info.meta.metrics == by[pc.chosen].metrics
    # the int8 model is a real QDQ graph
    int8 = onnx.load(str(exported.onnx['int8']))
    assert any(n.op_type == 'QuantizeLinear' for n in int8.graph.node) and onnx_metadata(int8)['precision'] == 'int8'
    # the rule: int8 that is slower than fp32, or fails the accuracy gate, is not shipped
    slow = [by['fp32'], by['int8'].model_copy(update={'latency_ms': by['fp32'].latency_ms * 3})]
    assert choose_precision(slow, ['fp32', 'int8'], {'fp32': True, 'int8': True}).chosen == 'fp32'
    fast = [by['fp32'], by['int8'].model_copy(update={'latency_ms': by['fp32'].latency_ms / 3})]
    assert choose_precision(fast, ['fp32', 'int8'], {'fp32': True, 'int8': True}).chosen == 'int8'
    assert choose_precision(fast, ['fp32', 'int8'], {'fp32': True, 'int8': False}).chosen == 'fp32'


def test_precisions_are_timed_together_in_rotated_blocks(exported):
    "export timed fp32 and int8 in three rounds, rotating the order; each shipped number is its candidate's fastest block."
    t = exported.timings
    assert set(t) == {'fp32', 'int8'} and t['fp32'].positions == [0, 1, 0] and t['int8'].positions == [1, 0, 1]
    by = {m.precision: m for m in exported.precision.measurements}
    for p, s in t.items():
        assert len(s.block_medians_ms) == 3 and len(s.times_ms) == 30 and s.p50_ms == min(s.block_medians_ms)
        assert by[p].latency_ms == s.p50_ms
    stored = json.loads(exported.report.read_text())['timings']
    assert stored['int8']['block_medians_ms'] == t['int8'].block_medians_ms and stored['fp32']['kept_block'] == t['fp32'].kept_block


def _matmul(path: Path, n_out: int, n_in: int = 256) -> Path:
    "A real ONNX graph: a (1, n_in) input times a fixed (n_in, n_out) matrix."
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((n_in, n_out)).astype(np.float32), 'w')
    g = helper.make_graph([helper.make_node('MatMul', ['x', 'w'], ['y'])], 'mm', [helper.make_tensor_value_info('x', TensorProto.FLOAT, [1, n_in])],
                          [helper.make_tensor_value_info('y', TensorProto.FLOAT, [1, n_out])], [w])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid('', 17)]), str(path))
    return path


def test_measure_latencies_keeps_each_candidates_least_disturbed_block(tmp_path):
    "Three candidates (an ONNX file, an open session, a function disturbed during one block) in rotated rounds."
    small = _matmul(tmp_path/'small.onnx', 256)
    big = ort.InferenceSession(str(_matmul(tmp_path/'big.onnx', 8192)), providers=['CPUExecutionProvider'])
    x = np.ones((1, 256), np.float32)
    n = {'calls': 0}
    def burst(batch):
        "Slow (8 ms) throughout its second block, as if another process took the core; 1 ms otherwise."
        n['calls'] += 1
        time.sleep(0.008 if 8 <= n['calls'] <= 14 else 0.001)
    lat = measure_latencies({'small': small, 'big': big, 'burst': burst}, x, runs=5, warmup=2, repeats=3, pause=0.0)
    assert [lat[k].positions for k in ('small', 'big', 'burst')] == [[0, 2, 1], [1, 0, 2], [2, 1, 0]]
    b = lat['burst']
    assert b.block_medians_ms[1] > 7 and b.kept_block != 1 and b.p50_ms < 4 and len(b.times_ms) == 5
    assert b.p50_ms == min(b.block_medians_ms) and b.providers == ['python']
    assert lat['big'].providers == ['CPUExecutionProvider'] and lat['big'].p50_ms > lat['small'].p50_ms
    assert lat['small'].latency('edge').model_dump()['p50_ms'] == lat['small'].p50_ms
    with pytest.raises(Exception, match='repeats must be >= 1'):
        measure_latencies({'small': small}, x, repeats=0)


def test_accuracy_gate_decides_with_the_measured_drop(ws, grocery, trained):
    "With a zero-point gate, int8 ships only if it loses nothing and is faster; its note states the drop against the gate."
    res = export(trained.best_checkpoint, 'shelf-cam-x86', grocery, ws, version='strict', max_int8_drop_pts=0.0, min_speedup=1.0,
                 latency_runs=5, latency_warmup=1)
    by = {m.precision: m for m in res.precision.measurements}
    drop = (res.evaluations['onnx-fp32'].metrics['top1'] - res.evaluations['onnx-int8'].metrics['top1']) * 100
    assert f"top1 drop {drop:.2f} pt ({'past' if drop > 0 else 'within'} the 0 pt gate)" in by['int8'].note
    agreement = float(re.search(r'top-1 agreement with fp32 ([0-9.]+)%', by['int8'].note).group(1)) / 100
    assert res.precision.chosen == ('int8' if drop <= 0 and agreement >= 0.99 and by['int8'].latency_ms < by['fp32'].latency_ms else 'fp32')
    # a profile that allows only fp32 measures nothing else
    res = export(trained.best_checkpoint, 'shelf-cam-x86', grocery, ws, version='fp32only', precisions=['fp32'], latency_runs=5)
    assert [m.precision for m in res.precision.measurements] == ['fp32'] and res.precision.chosen == 'fp32'


def test_gpu_profile_gates_fp16_and_does_not_choose_it_on_cpu(ws, grocery, trained):
    "fp16 is converted, passes its parity gate against fp32 on CPU, is timed, and is not chosen: a CPU timing does not measure fp16."
    res = export(trained.best_checkpoint, 'gpu-cuda', grocery, ws, version='gpu', latency_runs=5)
    by = {m.precision: m for m in res.precision.measurements}
    fp16 = by['fp16']
    assert onnx_metadata(res.onnx['fp16'])['precision'] == 'fp16'
    assert {t.data_type for t in onnx.load(str(res.onnx['fp16'])).graph.initializer} == {TensorProto.FLOAT16}
    # its parity with fp32, recomputed here on the 21 validation photos, is within the fp16 tolerance
    sp = eval_split(grocery, 'val')
    x = preprocess([sp.read(k) for k in range(len(sp))], load_model(res.onnx['fp32']).preprocessing)
    logits = lambda f: ort.InferenceSession(str(f), providers=['CPUExecutionProvider']).run(None, {'images': x})[0]
    diff = float(np.abs(logits(res.onnx['fp32']) - logits(res.onnx['fp16'])).max())
    assert 0 < diff <= ExportConfig().max_fp16_abs_diff and (logits(res.onnx['fp32']).argmax(1) == logits(res.onnx['fp16']).argmax(1)).all()
    assert f"max |output diff| {diff:.3g} (gate <= 0.01)" in fp16.note and 'refused' not in fp16.note
    assert fp16.metrics['top1'] == by['fp32'].metrics['top1']
    # timed on the CPU (no CUDA here), which runs it as fp32 behind casts: whatever the numbers, not chosen, and the reason says why
    assert res.timings['fp16'].providers == ['CPUExecutionProvider'] and fp16.latency_ms > 0 and res.precision.chosen == 'fp32'
    why = "timed on CPUExecutionProvider, which runs most fp16 operations as fp32 behind casts: no measure of fp16's own speed"
    speed = by['fp32'].latency_ms / fp16.latency_ms
    assert (f"fp16 {fp16.latency_ms:.2f} ms vs fp32 {by['fp32'].latency_ms:.2f} ms on gpu-cuda ({speed:.2f}x), not chosen: {why}"
            in res.precision.reason) and f"fp16 not chosen: {why}" in res.notes
    assert any("expects 224 px input" in n for n in res.notes)  # the profile's size, noted, not silently changed


def test_opencv_dnn_agrees_with_onnx_runtime(exported, grocery, tmp_path):
    "OpenCV's own ONNX importer, an independent consumer, gives the same top-1 as ONNX Runtime."
    sp = eval_split(grocery, 'val')
    x = preprocess([sp.read(k) for k in range(len(sp))], load_model(exported.onnx['fp32']).preprocessing)
    ort_logits = ort.InferenceSession(str(exported.onnx['fp32']), providers=['CPUExecutionProvider']).run(None, {'images': x})[0]
    net = cv2.dnn.readNetFromONNX(str(exported.onnx['fp32']))
    net.setInput(x)
    cv_logits = net.forward('logits')
    assert (cv_logits.argmax(1) == ort_logits.argmax(1)).all()
    np.testing.assert_allclose(cv_logits, ort_logits, atol=1e-4)
    # and for a real architecture: MobileNetV3-small (hard-swish, squeeze-excitation), BatchNorm recalibrated on the photos
    spec = ModelSpec(arch='mobilenet_v3_small', num_classes=7, image_size=64)
    xs = preprocess([sp.read(k) for k in range(len(sp))], spec.preprocessing)
    torch.manual_seed(0)
    mnet = wrap(recalibrate_batchnorm(build_model(spec), torch.from_numpy(xs)), spec)
    path = export_onnx(mnet, tmp_path/'mnv3.onnx', 'mnv3', '1', [f'c{i}' for i in range(7)])
    ort_logits = ort.InferenceSession(str(path), providers=['CPUExecutionProvider']).run(None, {'images': xs})[0]
    net = cv2.dnn.readNetFromONNX(str(path))
    net.setInput(xs)
    cv_logits = net.forward('logits')
    assert (cv_logits.argmax(1) == ort_logits.argmax(1)).all()
    np.testing.assert_allclose(cv_logits, ort_logits, atol=1e-3)


def test_same_input_tensor_on_the_evaluation_and_runtime_sides(exported, grocery, trained, ws):
    "The evaluation side (checkpoint spec) and the device (bundle.json read back) build bit-identical inputs from one photo."
    sp = eval_split(grocery, 'val')
    photo = sp.read(3)
    eval_model = load_model(trained.best_checkpoint)
    eval_x, _ = preprocess_with_geometry([photo], eval_model.preprocessing)  # what evaluate() feeds the model
    p = Predictor.from_bundle(exported.bundle, workspace=ws)
    device_x = preprocess(photo, p.contract.preprocessing)  # what the runtime feeds it
    assert eval_x.dtype == device_x.dtype == np.float32 and np.array_equal(eval_x, device_x)
    # and the device's answer for the photo is the model's answer for that tensor
    logits = p.run(eval_x)['logits']
    c = p.predict(photo)
    assert c.index == int(logits.argmax()) and c.score == pytest.approx(float(softmax(logits)[0].max()), abs=1e-6)
    with torch.inference_mode():
        torch_logits = load_checkpoint(trained.best_checkpoint).exportable()(torch.from_numpy(eval_x))[0].numpy()
    np.testing.assert_allclose(logits, torch_logits, atol=1e-4)


def test_bundle_verifies_and_runs_on_the_device(exported, ws, grocery, trained):
    info = verify_bundle(exported.bundle, workspace=ws)
    assert (info.name, info.version, info.meta.profile) == ('grocery-tiny_cnn', trained.run_id, 'shelf-cam-x86')
    assert info.meta.provenance.run_id == trained.run_id and info.meta.provenance.dataset_version == grocery.ref
    assert len(info.meta.golden.inputs) == 4
    p = Predictor.from_bundle(exported.bundle, workspace=ws)
    g = check_golden(p)
    assert g.ok and g.images == 4
    card = info.read_bytes('model_card.md').decode()
    assert 'Precision' in card and 'int8' in card and grocery.ref in card


def test_benchmark_table_and_json(trained, grocery, ws, tmp_path, exported):
    rep = benchmark(trained.best_checkpoint, grocery, profile='handheld-arm', workspace=ws, runs=10, warmup=2, repeats=2,
                    out=tmp_path/'bench.json')
    assert [r.format for r in rep.rows] == list(FORMATS)
    for r in rep.rows:
        assert 0 < r.p50_ms <= r.p95_ms and r.throughput == pytest.approx(1e3 / r.p50_ms) and len(r.repeats_p50_ms) == 2
        assert r.metric == 'top1'
    # the same checkpoint, split and calibration as the export: the same accuracy, format by format
    for fmt in ('torch', 'onnx-fp32', 'onnx-int8'):
        assert rep.row(fmt).value == pytest.approx(exported.evaluations[fmt].metrics['top1'])
    stored = json.loads((tmp_path/'bench.json').read_text())
    assert stored['profile'] == 'handheld-arm' and [r['format'] for r in stored['rows']] == list(FORMATS)
    assert '| onnx-int8 |' in rep.table()
    # without data: random inputs, no accuracy
    bare = benchmark(trained.best_checkpoint, formats=('torch', 'onnx-fp32'), runs=5, warmup=1)
    assert all(r.value is None and r.p50_ms > 0 for r in bare.rows)


@pytest.fixture(scope='module')
def shelves(ws, tmp_path_factory):
    folder = tmp_path_factory.mktemp('shelves')/'shelves'
    generate_shelves(folder, images=6, width=320, height=240, shelves=(1, 2), skus=3, seed=0, val_fraction=0.34)
    return DatasetStore(ws).ingest(folder, 'shelves', progress=False)


def test_detection_export(ws, shelves, tmp_path, monkeypatch):
    "SSDlite, BatchNorm recalibrated on the shelf photos (distinct scores): batch-1 graph, boxes and scores match, COCO mAP keys, bundle runs."
    spec = ModelSpec(arch='ssdlite320_mobilenet_v3_large', num_classes=len(shelves.dataset.categories))
    train = eval_split(shelves, 'train')
    x = torch.from_numpy(preprocess([train.read(k) for k in range(len(train))], spec.preprocessing))
    torch.manual_seed(0)
    det = wrap(recalibrate_batchnorm(build_model(spec), torch.cat([x, x.flip(-1)])), spec)
    res = export(det, 'shelf-cam-x86', shelves, ws, name='shelf-ssdlite', precisions=['fp32'], latency_runs=5, latency_warmup=1,
                 postprocessing={'score_threshold': 0.05})
    assert res.task == 'detection' and res.parity.passed and res.version == 'dev'
    o = res.parity.outputs
    assert o['rows_compared'] >= 10 and o['min_box_iou'] >= 0.99 and o['box_agreement'] == 1.0 and o['max_abs_diff'] <= 1e-4
    for fmt in ('torch', 'onnx-fp32'):
        assert {'map50_95', 'map50', 'map75', 'mar100'} <= set(res.evaluations[fmt].metrics)
    assert res.parity.metric == 'map50_95' and 'pr_curves' in res.evaluations['onnx-fp32'].plots
    sess = ort.InferenceSession(str(res.onnx['fp32']), providers=['CPUExecutionProvider'])
    assert sess.get_inputs()[0].shape == [1, 3, 320, 320]  # detectors: batch fixed at 1
    p = Predictor.from_bundle(res.bundle, workspace=ws)
    assert check_golden(p).ok and p.task == 'detection' and p.labels == [c.name for c in sorted(shelves.dataset.categories, key=lambda c: c.id)]
    assert verify_bundle(res.bundle, workspace=ws).meta.precision.chosen == 'fp32'
    # int8: ONNX Runtime's symbolic shape inference gives up on SSDlite's NMS and, when it runs, leaves
    # sym_shape_infer_temp.onnx and a weights file in the current directory; quantize_int8 leaves nothing behind
    cwd = tmp_path/'cwd'; cwd.mkdir(); monkeypatch.chdir(cwd)
    out = quantize_int8(res.onnx['fp32'], tmp_path/'out'/'det.int8.onnx', [train.read(0)], spec.preprocessing, ['Conv'])
    assert os.listdir(cwd) == [] and os.listdir(tmp_path/'out') == ['det.int8.onnx'] and onnx_metadata(out)['precision'] == 'int8'


def test_detection_checkpoint_with_tied_scores_never_ships_int8(ws, shelves):
    """One training step leaves SSDlite's scores tied across anchors: those rows are compared by score, and the report says so.
    Its mAP is zero, too low to measure an int8 drop from: int8 is not tried, even with every other gate open."""
    run = fit(TrainConfig(arch='ssdlite320_mobilenet_v3_large', epochs=1, batch_size=2, max_steps=1, wandb_mode='disabled'), shelves, ws, run_name='ssd')
    res = export(run.last_checkpoint, 'shelf-cam-x86', precisions=['fp32', 'int8'], workspace=ws, latency_runs=3, latency_warmup=1,
                 max_int8_drop_pts=100.0, min_speedup=1.0)
    o = res.parity.outputs
    assert res.parity.passed and o['tied_rows'] > 0 and o['max_abs_diff'] <= 1e-4
    assert res.parity.metric_delta_pts <= 0.1
    fp32_map = res.evaluations['onnx-fp32'].metrics['map50_95']
    assert fp32_map < 0.01  # one batch seen: next to nothing found (0.0009 here)
    int8 = next(m for m in res.precision.measurements if m.precision == 'int8')
    assert int8.note == f"not tried: fp32 map50_95 {fp32_map:.3f} is below 0.1, too low to measure a drop" and int8.latency_ms is None
    assert res.precision.chosen == 'fp32' and 'int8' not in res.onnx and 'onnx-int8' not in res.evaluations
    assert verify_bundle(res.bundle, workspace=ws).meta.precision.chosen == 'fp32'
    assert res.evaluations['torch'].data == shelves.ref  # no data given: the checkpoint's own dataset version


def _swap_logits(src: Path, dst: Path, a: int, b: int, n: int) -> Path:
    "A copy of a classifier graph whose logits `a` and `b` trade places: the same file in every other respect."
    g = onnx.load(str(src)); out = g.graph.output[0].name
    for node in g.graph.node: node.output[:] = [o + '_raw' if o == out else o for o in node.output]
    perm = list(range(n)); perm[a], perm[b] = b, a
    g.graph.initializer.append(helper.make_tensor('perm', TensorProto.INT64, [n], perm))
    g.graph.node.append(helper.make_node('Gather', [out + '_raw', 'perm'], [out], axis=1))
    onnx.save(g, str(dst))
    return dst


def test_int8_that_flips_every_answer_is_refused_at_equal_metric(grocery, tmp_path):
    """An untrained classifier with a bias on its first class answers that class for every photo (top-1 3/21); its real
    int8 file, with that logit traded for the second class's, answers the second class for every photo: the same top-1,
    no answer in common."""
    sp = eval_split(grocery, 'val')
    toy = load_model(tiny_classifier(7)).bind_labels(sp.dataset)
    with torch.no_grad(): [l for l in toy.module.modules() if isinstance(l, torch.nn.Linear)][-1].bias[0] += 4  # a margin int8 keeps
    fp32 = export_onnx(toy.module, tmp_path/'model.fp32.onnx', 'toy', 'dev', toy.labels)
    ref = load_model(fp32, labels=toy.labels)
    answers = ref.run(preprocess([sp.read(k) for k in range(len(sp))], ref.preprocessing))['logits'].argmax(1)
    assert set(answers.tolist()) == {0}
    ref_top1 = evaluate(ref, sp, write=False).metrics['top1']
    assert ref_top1 == pytest.approx(3 / 21)
    int8 = quantize_int8(fp32, tmp_path/'model.int8.onnx', [sp.resplit('train').read(k) for k in range(8)], ref.preprocessing)
    flipped = _swap_logits(int8, tmp_path/'flipped.onnx', 0, 1, 7)
    ev, ok, note = _gate_lowp('int8', ref, ref_top1, flipped, sp, ExportConfig(), tmp_path)
    assert ev.metrics['top1'] == ref_top1 and not ok  # equal metric, refused
    assert note == ('top1 drop 0.00 pt (within the 1 pt gate); top-1 agreement with fp32 0.0% on 21 images (gate >= 99%); '
                    'refused: 1 of 2 gates failed')
    ev, ok, note = _gate_lowp('int8', ref, ref_top1, int8, sp, ExportConfig(), tmp_path)  # the int8 file itself passes
    assert ok and 'top-1 agreement with fp32 100.0% on 21 images' in note


def test_export_takes_the_training_data_and_creates_a_missing_signing_key(ws, grocery, trained, tmp_path, monkeypatch, caplog):
    res = export(trained.best_checkpoint, 'shelf-cam-x86', workspace=ws, version='nodata', precisions=['fp32'], latency_runs=3)
    assert res.evaluations['torch'].data == grocery.ref and res.new_signing_key is None  # ws had its key
    with pytest.raises(ConfigError, match=r'no data given, and the model records no dataset version .* pass data=<dataset version>'):
        export(tiny_classifier(7), 'shelf-cam-x86', workspace=ws)
    # a fresh workspace, no key anywhere: the first export creates the workspace's key, says so, and signs with it
    monkeypatch.delenv(SIGNING_KEY_ENV, raising=False)
    fresh = Workspace.open(tmp_path/'fresh')
    with caplog.at_level('INFO', logger='retail_cv.export._export'):
        res = export(tiny_classifier(7), 'shelf-cam-x86', grocery, fresh, precisions=['fp32'], latency_runs=3)
    assert res.new_signing_key == fresh/'keys'/'signing.key' and (fresh/'keys'/'signing.pub').is_file()
    assert f"no signing key yet: created {fresh/'keys'/'signing.key'}" in caplog.text
    assert json.loads(res.report.read_text())['new_signing_key'] == str(fresh/'keys'/'signing.key')
    assert verify_bundle(res.bundle, workspace=fresh).meta.precision.chosen == 'fp32'
