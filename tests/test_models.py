"Models: every architecture builds, weights load safely or fail with the file and keys named, exports match ORT."
import pathlib

import numpy as np
import onnxruntime as ort
import pytest
import torch

from retail_cv.core import ConfigError, IntegrityError
from retail_cv.models import (DEFAULT_ARCH, ModelSpec, architectures, build_model, example_input, load_weights,
                              recalibrate_batchnorm, tiny_classifier, to_onnx, wrap)


def _outputs(model, x):
    with torch.inference_mode(): return model.eval()(x)


@pytest.mark.parametrize('arch', architectures('classification'))
def test_each_classifier_gives_one_logit_per_class(arch):
    spec = ModelSpec(arch=arch, num_classes=5, image_size=64)
    model = build_model(spec)
    assert _outputs(model, example_input(spec, 3)).shape == (3, 5)


def test_weights_round_trip_gives_identical_outputs(tmp_path):
    spec = ModelSpec(arch='mobilenet_v3_small', num_classes=4, image_size=64)
    a, b = build_model(spec), build_model(spec)
    x = example_input(spec, 2, seed=3)
    assert not torch.equal(_outputs(a, x), _outputs(b, x))
    torch.save(a.state_dict(), tmp_path/'a.pt')
    report = load_weights(b, tmp_path/'a.pt')
    assert torch.equal(_outputs(a, x), _outputs(b, x))
    assert report.loaded == len(a.state_dict()) and report.skipped == ()
    # build_model loads `spec.weights` itself
    c = build_model(ModelSpec(**{**spec.model_dump(), 'weights': tmp_path/'a.pt'}))
    assert torch.equal(_outputs(a, x), _outputs(c, x))


def test_real_lightning_checkpoint_loads(tmp_path):
    import lightning as L

    class Module(L.LightningModule):
        def __init__(self, num_classes: int = 3):
            super().__init__()
            self.save_hyperparameters()
            self.model = tiny_classifier(num_classes).model.train()
            self.loss = torch.nn.CrossEntropyLoss()
        def training_step(self, batch, _): return self.loss(self.model(batch[0]), batch[1])
        def configure_optimizers(self): return torch.optim.SGD(self.parameters(), lr=0.5)

    data = torch.utils.data.TensorDataset(torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,)))
    module = Module()
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator='cpu')
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
    trainer.save_checkpoint(tmp_path/'run.ckpt')
    fresh = tiny_classifier(3)
    x = fresh.example_input(4)
    assert not torch.equal(_outputs(fresh, x)[0], _outputs(module.model, x))
    load_weights(fresh, tmp_path/'run.ckpt')  # a Classifier is unwrapped; the 'model.' prefix is stripped
    assert torch.equal(_outputs(fresh, x)[0], _outputs(module.model, x))


def test_checkpoint_of_another_architecture_names_file_and_keys(tmp_path):
    torch.save(build_model(ModelSpec(arch='resnet18', num_classes=4)).state_dict(), tmp_path/'r18.pt')
    mobilenet = build_model(ModelSpec(arch='mobilenet_v3_small', num_classes=4))
    with pytest.raises(ConfigError) as e: load_weights(mobilenet, tmp_path/'r18.pt')
    msg = str(e.value)
    assert f"weights file {tmp_path/'r18.pt'} does not fit MobileNetV3" in msg
    n_missing = sum(not k.endswith('num_batches_tracked') for k in mobilenet.state_dict())
    assert f"{n_missing} keys missing (features.0.0.weight, features.0.1.weight, features.0.1.bias, ... (+" in msg
    assert "keys unexpected (conv1.weight, bn1.weight, bn1.bias, ... (+" in msg


@pytest.mark.parametrize('content', [np.random.default_rng(0).bytes(10_000), b'', b'{"not": "a checkpoint"}'])
def test_corrupt_file_is_refused_with_its_name(tmp_path, content):
    path = tmp_path/'broken.pt'
    path.write_bytes(content)
    with pytest.raises(IntegrityError, match=f"weights file {path} is not a readable PyTorch checkpoint"):
        load_weights(tiny_classifier(), path)


def test_files_that_are_not_state_dicts_are_refused(tmp_path):
    torch.save({'epoch': 1, 'root': pathlib.Path('/tmp')}, tmp_path/'obj.pt')
    with pytest.raises(IntegrityError, match=r"holds a Python object \(pathlib\.\w*Path\)"): load_weights(tiny_classifier(), tmp_path/'obj.pt')
    torch.save(torch.zeros(3), tmp_path/'tensor.pt')
    with pytest.raises(IntegrityError, match="holds Tensor, not a state_dict"): load_weights(tiny_classifier(), tmp_path/'tensor.pt')
    torch.save({'a.weight': torch.zeros(3), 'lr': 0.1}, tmp_path/'mixed.pt')
    with pytest.raises(IntegrityError, match=r"1 entries are not named tensors \(lr\)"): load_weights(tiny_classifier(), tmp_path/'mixed.pt')
    with pytest.raises(ConfigError, match="does not exist"): load_weights(tiny_classifier(), tmp_path/'absent.pt')


def test_head_of_another_size_is_skipped_or_refused(tmp_path, caplog):
    src = build_model(ModelSpec(arch='resnet18', num_classes=10))
    torch.save({'state_dict': {f'model.{k}': v for k, v in src.state_dict().items()}}, tmp_path/'r18-10.ckpt')
    dst = build_model(ModelSpec(arch='resnet18', num_classes=3))
    fc_before = dst.fc.weight.clone()
    with caplog.at_level('INFO', logger='retail_cv.models'):
        report = load_weights(dst, tmp_path/'r18-10.ckpt')
    assert report.skipped == ('fc.weight', 'fc.bias')
    assert 'fc.weight [10, 512] in file vs [3, 512] in model' in caplog.text
    assert torch.equal(dst.conv1.weight, src.conv1.weight) and torch.equal(dst.fc.weight, fc_before)
    with pytest.raises(ConfigError, match=r"head for another number of classes: fc\.weight \[10, 512\] in file vs \[3, 512\]"):
        load_weights(dst, tmp_path/'r18-10.ckpt', strict_head=True)


def test_detector_head_of_another_size_is_skipped(tmp_path):
    coco_like = build_model(ModelSpec(arch='ssdlite320_mobilenet_v3_large', num_classes=90))
    torch.save(coco_like.state_dict(), tmp_path/'ssd.pt')
    report = load_weights(build_model(ModelSpec(arch='ssdlite320_mobilenet_v3_large', num_classes=3)), tmp_path/'ssd.pt')
    assert report.skipped and all(k.startswith('head.classification_head.module_list.') for k in report.skipped)
    assert report.loaded == len(coco_like.state_dict()) - len(report.skipped)


def test_classifier_onnx_has_dynamic_batch_and_matches(tmp_path):
    clf = tiny_classifier(4, image_size=48)
    sess = ort.InferenceSession(str(to_onnx(clf, tmp_path/'tiny.onnx')), providers=['CPUExecutionProvider'])
    assert [o.name for o in sess.get_outputs()] == ['logits', 'embedding']
    for batch in (1, 5):
        x = clf.example_input(batch, seed=batch)
        for got, want in zip(sess.run(None, {'images': x.numpy()}), _outputs(clf, x)):
            np.testing.assert_allclose(got, want.numpy(), atol=1e-5)


@pytest.mark.parametrize('arch', architectures('detection'))
def test_each_detector_runs_at_320_with_padded_outputs(arch):
    spec = ModelSpec(arch=arch, num_classes=3, image_size=320, max_detections=50)
    det = wrap(recalibrate_batchnorm(build_model(spec), example_input(spec, 2, seed=9)), spec)
    boxes, scores, labels, embedding = _outputs(det, det.example_input(1))
    assert (boxes.shape, scores.shape, labels.shape, labels.dtype) == ((1, 50, 4), (1, 50), (1, 50), torch.int64)
    assert embedding.shape == (1, det.contract()['outputs'][3]['shape'][1])
    real = labels >= 0
    assert set(labels[real].tolist()) <= {1, 2, 3} and (scores[~real] == 0).all() and (labels[~real] == -1).all()
    assert (boxes[real][:, 2:] >= boxes[real][:, :2]).all() and (boxes[real] >= 0).all() and (boxes[real] <= 320).all()


def _check_detections(ort_out, torch_out):
    (ob, os_, ol, oe), (eb, es, el, ee) = ort_out, [t.numpy() for t in torch_out]
    np.testing.assert_allclose(oe, ee, atol=1e-4)  # the pooled backbone features
    assert (ob.shape, os_.shape, ol.shape, ol.dtype) == (eb.shape, es.shape, el.shape, el.dtype)
    for i in range(len(eb)):  # top 10 in the same order; all scores equal as multisets
        np.testing.assert_allclose(ob[i, :10], eb[i, :10], atol=1e-2)
        assert (ol[i, :10] == el[i, :10]).all()
        np.testing.assert_allclose(np.sort(os_[i]), np.sort(es[i]), atol=1e-4)


@pytest.mark.parametrize('batch_size', [1, 2])
def test_default_detector_exports_and_onnx_runtime_agrees(tmp_path, batch_size):
    spec = ModelSpec(task='detection', num_classes=4)
    assert spec.arch == DEFAULT_ARCH['detection'] and spec.image_size == 640
    torch.manual_seed(0)
    det = wrap(recalibrate_batchnorm(build_model(spec), example_input(spec, 4, seed=9)), spec)
    path = to_onnx(det, tmp_path/'det.onnx', batch_size=batch_size)
    sess = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    assert [(i.name, i.shape) for i in sess.get_inputs()] == [('images', [batch_size, 3, 640, 640])]
    assert [o.name for o in sess.get_outputs()] == ['boxes', 'scores', 'labels', 'embedding']
    x = det.example_input(batch_size, seed=5)  # not the input the graph was traced with
    _check_detections(sess.run(None, {'images': x.numpy()}), _outputs(det, x))
    assert det.contract(batch_size)['outputs'][0]['shape'] == [batch_size, spec.max_detections, 4]


def test_spec_errors_name_the_key():
    from retail_cv.core import parse_model
    with pytest.raises(ConfigError, match="unknown arch 'mobilenet_v4'"): parse_model(ModelSpec, {'arch': 'mobilenet_v4', 'num_classes': 3})
    with pytest.raises(ConfigError, match="'num_classes'"): parse_model(ModelSpec, {'arch': 'resnet18', 'num_classes': 0})
    with pytest.raises(ConfigError, match='a classifier needs num_classes >= 2'): build_model({'arch': 'resnet18', 'num_classes': 1})
    with pytest.raises(ConfigError, match="spec is for classification but the model is a SSD"):
        wrap(build_model({'arch': 'ssdlite320_mobilenet_v3_large', 'num_classes': 2}), ModelSpec(arch='resnet18', num_classes=2))
