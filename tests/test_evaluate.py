"Evaluation: metrics on constructed cases with known answers, label mapping by name, splits as training made them, reports beside the run."
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from retail_cv.core import DataError, Workspace
from retail_cv.data.formats import Annotation, Category, Dataset, ImageRecord
from retail_cv.data.store import DatasetStore
from retail_cv.evaluate import EvalModel, classification_metrics, coco_metrics, eval_split, evaluate, load_model, split_settings
from retail_cv.models import ModelSpec, wrap
from retail_cv.preprocess import Detections, PostprocessSpec, as_preprocess_spec
from retail_cv.train import TrainConfig, fit, make_datamodule

COLOURS = {'red': (220, 20, 20), 'green': (20, 220, 20), 'blue': (20, 20, 220)}


def _colour_folder(root: Path, per_class: int = 4, splits: bool = True) -> Path:
    "A class-folder dataset of noisy solid-colour photos (train/ and val/ when `splits`)."
    rng = np.random.default_rng(0)
    for split in (('train', 'val') if splits else ('',)):
        for name, rgb in COLOURS.items():
            d = root/split/name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                img = np.clip(np.array(rgb) + rng.normal(0, 15, (40, 48, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d/f'{name}{i}.png')
    return root


def _colour_classifier(channel_to_class: list[int]) -> nn.Module:
    "A real classifier: mean colour per channel, then a fixed linear map sending channel c to class `channel_to_class[c]`."
    lin = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        lin.weight.zero_()
        for c, k in enumerate(channel_to_class): lin.weight[k, c] = 1.0
    spec = ModelSpec(arch='tiny_cnn', num_classes=3, image_size=32, mean=(0, 0, 0), std=(1, 1, 1))
    return wrap(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), lin), spec)


def test_classification_metrics_known_confusion():
    r = classification_metrics([0, 0, 1, 1, 2, 2], np.eye(3)[[0, 0, 1, 2, 2, 0]], ['a', 'b', 'c'])
    assert r['confusion'] == [[2, 0, 0], [0, 1, 1], [1, 0, 1]]
    assert r['metrics']['top1'] == pytest.approx(4 / 6)
    assert r['metrics']['mean_class_accuracy'] == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert {k: v['support'] for k, v in r['per_class'].items()} == {'a': 2, 'b': 2, 'c': 2}
    # top-5 with 7 classes: the model always ranks class 0 first, 1 second, ...: class k is in its top 5 iff k < 5
    r7 = classification_metrics(np.arange(7), np.tile(np.arange(7.0)[::-1], (7, 1)), list('abcdefg'))
    assert (r7['metrics']['top1'], r7['metrics']['top5']) == (pytest.approx(1 / 7), pytest.approx(5 / 7))
    with pytest.raises(DataError, match=r'logits must be \(2, 3\)'): classification_metrics([0, 1], np.zeros((2, 4)), ['a', 'b', 'c'])


def test_perfect_and_known_classifiers_end_to_end(tmp_path):
    "A model that reads the colour right scores 100%; one that takes green for blue gives that confusion matrix."
    data = _colour_folder(tmp_path/'colours')
    labels = ['red', 'green', 'blue']  # model order; the dataset numbers categories alphabetically (blue, green, red)
    perfect = evaluate(_colour_classifier([0, 1, 2]), data, labels=labels, out_dir=tmp_path/'perfect')
    assert perfect.metrics['top1'] == 1.0 and perfect.images == 12
    assert perfect.confusion == [[4, 0, 0], [0, 4, 0], [0, 0, 4]]
    confused = evaluate(_colour_classifier([0, 2, 2]), data, labels=labels, write=False)
    assert confused.confusion == [[4, 0, 0], [0, 0, 4], [0, 0, 4]]
    assert confused.metrics['top1'] == pytest.approx(8 / 12)
    assert confused.per_class['green'] == {'accuracy': 0.0, 'support': 4}
    # the report and its plots were written
    stored = json.loads((tmp_path/'perfect'/'eval.json').read_text())
    assert stored['metrics']['top1'] == 1.0 and stored['confusion'] == perfect.confusion
    assert Path(perfect.plots['confusion_matrix']).read_bytes()[:4] == b'\x89PNG'
    assert set(perfect.speed) >= {'preprocess_ms', 'inference_ms', 'postprocess_ms', 'total_ms'}
    # a dataset class the model does not know is an error, not a silent misalignment
    with pytest.raises(DataError, match='classes the model does not know: blue'):
        evaluate(_colour_classifier([0, 1, 2]), data, labels=['red', 'green', 'cyan'], write=False)


def _box_photo(size_wh, boxes_by_channel):
    "Black image with solid pure-colour rectangles; channel c of a rectangle marks class c."
    img = np.zeros((size_wh[1], size_wh[0], 3), np.uint8)
    for c, (x1, y1, x2, y2) in boxes_by_channel:
        img[y1:y2, x1:x2, c] = 255
    return img


def _colour_box_detector(x: np.ndarray) -> dict[str, np.ndarray]:
    "A real, trivial detector: the bounding box of each pure-colour region, in model-input pixels."
    B, K = len(x), 4
    boxes, scores, labels = np.zeros((B, K, 4), np.float32), np.zeros((B, K), np.float32), np.full((B, K), -1, np.int64)
    for i in range(B):
        j = 0
        for c in range(3):
            others = np.delete(x[i], c, 0).max(0)
            ys, xs = np.nonzero((x[i, c] > 0.5) & (others < 0.5))
            if len(xs):
                boxes[i, j] = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
                scores[i, j], labels[i, j] = 0.9, c + 1
                j += 1
    return {'boxes': boxes, 'scores': scores, 'labels': labels}


def _box_dataset(root: Path, size_wh) -> Dataset:
    root.mkdir(parents=True, exist_ok=True)
    layouts = [[(0, (4, 4, 20, 30)), (1, (30, 10, 60, 40))], [(1, (8, 8, 40, 24))], [(0, (10, 30, 50, 60)), (2, (2, 2, 12, 12))]]
    sx, sy = size_wh[0] / 64, size_wh[1] / 64
    images, anns = [], []
    for i, layout in enumerate(layouts):
        scaled = [(c, (round(x1 * sx), round(y1 * sy), round(x2 * sx), round(y2 * sy))) for c, (x1, y1, x2, y2) in layout]
        Image.fromarray(_box_photo(size_wh, scaled)).save(root/f'{i}.png')
        images.append(ImageRecord(i + 1, f'{i}.png', size_wh[0], size_wh[1], 'val'))
        for c, (x1, y1, x2, y2) in scaled:
            anns.append(Annotation(len(anns) + 1, i + 1, 10 + c, (x1, y1, x2 - x1, y2 - y1)))
    cats = [Category(12, 'blue'), Category(10, 'red'), Category(11, 'green')]  # ids out of order on purpose
    return Dataset(root, 'detection', cats, images, anns)


def _detector_model() -> EvalModel:
    pre = as_preprocess_spec({'image_size': 64, 'mean': (0, 0, 0), 'std': (1, 1, 1)})
    return EvalModel('python', 'detection', ['red', 'green', 'blue'], pre, PostprocessSpec(score_threshold=0.5), _colour_box_detector,
                     'colour-box detector')


def test_perfect_detections_give_map_1(tmp_path):
    "Boxes found exactly give COCO mAP 1.0 through the whole path: preprocessing, postprocessing, label mapping, pycocotools."
    rep = evaluate(_detector_model(), _box_dataset(tmp_path/'same', (64, 64)), out_dir=tmp_path/'out')
    assert rep.metrics['map50_95'] == pytest.approx(1.0) and rep.metrics['map50'] == pytest.approx(1.0)
    assert rep.per_class['blue']['support'] == 1 and rep.per_class['blue']['ap'] == pytest.approx(1.0)
    assert {'pr_curves', 'samples'} <= set(rep.plots) and Path(rep.plots['pr_curves']).read_bytes()[:4] == b'\x89PNG'
    assert 'pr_curves' in json.loads((tmp_path/'out'/'eval.json').read_text())
    # photos of another size are resized for the model and the boxes mapped back: still found at IoU 0.5
    rep = evaluate(_detector_model(), _box_dataset(tmp_path/'wide', (128, 96)), write=False)
    assert rep.metrics['map50'] == pytest.approx(1.0) and rep.metrics['map50_95'] > 0.5


def test_coco_metrics_known_cases():
    gt = [(np.array([[10, 10, 40, 70], [50, 20, 110, 60]], np.float32), np.array([0, 1]))]
    dets = lambda b, s, l: [Detections(np.asarray(b, np.float32).reshape(-1, 4), np.asarray(s, np.float32), np.asarray(l, np.int64), ())]
    # a false positive scored above the true positive of the same class halves that class's precision at recall 1
    r = coco_metrics(gt, dets([[10, 10, 40, 70], [50, 20, 110, 60], [0, 0, 5, 5]], [0.5, 0.9, 0.95], [0, 1, 1]), ['a', 'b'])
    assert r['per_class']['a']['ap'] == pytest.approx(1.0)
    assert r['per_class']['b']['ap'] == pytest.approx(0.5, abs=0.01)
    # the wrong class finds nothing
    r = coco_metrics(gt, dets(gt[0][0], [0.9, 0.9], [1, 0]), ['a', 'b'])
    assert r['metrics']['map50'] == 0.0
    with pytest.raises(DataError, match='no ground-truth boxes'):
        coco_metrics([(np.zeros((0, 4)), np.zeros(0, np.int64))], dets([], [], []), ['a'])


def test_checkpoint_split_matches_training_and_report_lands_in_the_run(tmp_path):
    "For data without recorded splits, evaluate picks the validation images the run was trained against."
    ws = Workspace.open(tmp_path/'ws')
    version = DatasetStore(ws).ingest(_colour_folder(tmp_path/'flat', per_class=8, splits=False), 'colours', progress=False)
    cfg = TrainConfig(arch='tiny_cnn', image_size=32, epochs=1, batch_size=8, seed=3, wandb_mode='disabled',
                      pipeline={'val_fraction': 0.25})
    run = fit(cfg, version, ws, run_name='colours')
    dm, _ = make_datamodule(cfg, version, ws)
    m = load_model(run.best_checkpoint)
    rep = evaluate(run.best_checkpoint, version)
    assert rep.images == len(dm.splits['val']) == 6
    assert list(eval_split(version, 'val', **split_settings(m)).positions) == list(dm.splits['val'])
    assert rep.path == run.run_dir/'eval'/f"colours-{version.short_id}-val-torch"/'eval.json'
    assert json.loads(rep.path.read_text())['data_id'] == version.id
    # another seed draws another split
    assert list(eval_split(version, 'val', seed=4, val_fraction=0.25).positions) != list(dm.splits['val'])
