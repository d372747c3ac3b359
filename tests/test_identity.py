"""Product identity (`retail_cv.apps._identity`) through real signed classifier bundles on the edge runtime.

Two tiny classifiers with fresh weights (same name, other weights; and another version) are exported with `to_onnx`
and signed with `build_bundle`, as the export job does. Catalogue images are the synthetic catalogue's product faces
as the shelf generator draws them. Measured accuracy of the two ways belongs to `bench/bench_identity.py`.
"""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from retail_cv.apps import Gallery, Identity, embed, identify, model_identity
from retail_cv.core import ConfigError, DataError, IntegrityError, Workspace
from retail_cv.data.synth import make_catalogue, render_sku
from retail_cv.runtime import Predictor

torch = pytest.importorskip('torch')


def _face(s) -> np.ndarray:
    bgra = render_sku(s, ppmm=0.5).astype(np.float32)
    a = bgra[..., 3:] / 255
    return (bgra[..., 2::-1] * a + 255 * (1 - a)).astype(np.uint8)


@pytest.fixture(scope='module')
def env(tmp_path_factory):
    from retail_cv.bundle import build_bundle, generate_signing_key
    from retail_cv.models import tiny_classifier, to_onnx
    tmp = tmp_path_factory.mktemp('identity')
    ws = Workspace.open(tmp/'ws'); generate_signing_key(ws)
    cat = make_catalogue(8, seed=3)
    faces = {s.sku: _face(s) for s in cat}
    def bundle(name, seed, version):
        torch.manual_seed(seed)
        clf = tiny_classifier(4, image_size=32)
        return Predictor.from_bundle(build_bundle(tmp/name, to_onnx(clf, tmp/f'{name}.onnx'), name='shelf-skus', version=version,
                                                  labels=[s.sku for s in cat[:4]], contract=clf.contract(),
                                                  golden_images=[faces[cat[0].sku]], workspace=ws, profile='shelf-cam-x86'), workspace=ws)
    return dict(tmp=tmp, cat=cat, faces=faces, pred=bundle('a', 0, '1'), twin=bundle('b', 1, '1'), v2=bundle('c', 0, '2'))


def test_gallery_names_catalogue_products_and_survives_save_and_load(env):
    pred, faces, cat = env['pred'], env['faces'], env['cat']
    gal = Gallery.build(pred, {s.sku: faces[s.sku] for s in cat[:6]}, threshold=0.5)  # two products the classifier never had
    ids = identify(pred, [faces[s.sku] for s in cat[:6]], gal)
    assert [i.sku for i in ids] == [s.sku for s in cat[:6]] and all(i.by == 'gallery' and i.score > 0.999 for i in ids)
    path = gal.save(env['tmp']/'gal'/'gallery.npz')
    assert sorted(p.name for p in path.parent.iterdir()) == ['gallery.npz']  # one file, no temporary left behind
    back = Gallery.load(path, pred)
    assert back.skus == gal.skus and back.threshold == 0.5 and back.model == model_identity(pred)
    assert [i.to_dict() for i in identify(pred, [faces[s.sku] for s in cat[:6]], back)] == [i.to_dict() for i in ids]
    with np.load(path, allow_pickle=False) as z:  # the header names the model that embedded it
        meta = json.loads(str(z['meta']))
    assert meta['model']['name'] == 'shelf-skus' and meta['model']['version'] == '1' and meta['images'] == 6
    more = back.add(pred, {'NEW1': [faces[cat[6].sku], faces[cat[7].sku]]})  # several images for one product
    assert more.products == sorted([s.sku for s in cat[:6]] + ['NEW1']) and len(more) == 8 and len(back) == 6
    assert identify(pred, [faces[cat[7].sku]], more)[0].sku == 'NEW1'


def test_gallery_of_another_model_is_refused(env):
    pred, twin, v2, faces, cat = env['pred'], env['twin'], env['v2'], env['faces'], env['cat']
    path = Gallery.build(pred, {s.sku: faces[s.sku] for s in cat[:4]}).save(env['tmp']/'refuse.npz')
    with pytest.raises(IntegrityError, match=r"embedded by shelf-skus 1 \(model [0-9a-f]{12}\), not by shelf-skus 1"):
        Gallery.load(path, twin)  # same name and version, other weights
    with pytest.raises(IntegrityError, match="not by shelf-skus 2"): Gallery.load(path, v2)
    gal = Gallery.load(path)  # read without a model, it still refuses to be used with the wrong one
    with pytest.raises(IntegrityError, match='build it again with this bundle'): identify(twin, [faces[cat[0].sku]], gal)
    with pytest.raises(IntegrityError): gal.add(v2, {'X': faces[cat[5].sku]})


def test_unknown_below_the_threshold_and_classifier_always_names_a_label(env):
    pred, faces, cat = env['pred'], env['faces'], env['cat']
    gal = Gallery.build(pred, {s.sku: faces[s.sku] for s in cat[:4]}, threshold=-1.0)
    outsiders = [faces[s.sku] for s in cat[4:]]
    nearest = [i.score for i in gal.lookup(embed(pred, outsiders))]
    assert all(i.sku in gal.products for i in gal.lookup(embed(pred, outsiders)))  # threshold -1: the nearest, always
    strict = Gallery(gal.skus, gal.embeddings, gal.model, threshold=min(1.0, max(nearest) + 1e-4))
    assert [i.sku for i in identify(pred, outsiders, strict)] == [None] * 4  # not in the gallery: unknown
    assert [i.sku for i in identify(pred, [faces[cat[2].sku]], strict)] == [cat[2].sku]  # its own image still matches
    by_clf = identify(pred, outsiders)
    assert all(i.by == 'classifier' and i.sku in pred.labels for i in by_clf)  # a classifier cannot say unknown...
    assert all(i.sku is None for i in identify(pred, outsiders, min_score=1.01))  # ...unless given a softmax floor
    assert Identity(None, 0.3, 'gallery').to_dict() == {'sku': None, 'score': 0.3, 'by': 'gallery'}


def test_bad_inputs_are_named(env):
    pred, faces, cat, tmp = env['pred'], env['faces'], env['cat'], env['tmp']
    gal = Gallery.build(pred, {s.sku: faces[s.sku] for s in cat[:2]})
    with pytest.raises(DataError, match='does not exist'): Gallery.load(tmp/'nope.npz')
    (tmp/'junk.npz').write_bytes(b'PK\x03\x04 not really a zip')
    with pytest.raises(DataError, match='is not a gallery file'): Gallery.load(tmp/'junk.npz')
    buf = io.BytesIO(); np.savez(buf, embeddings=gal.embeddings, skus=np.array(gal.skus), meta=np.array(json.dumps({'format': 99})))
    (tmp/'future.npz').write_bytes(buf.getvalue())
    with pytest.raises(DataError, match='has format 99; this version reads format 1'): Gallery.load(tmp/'future.npz')
    buf = io.BytesIO(); np.savez(buf, embeddings=gal.embeddings, meta=np.array('{}'))
    (tmp/'noskus.npz').write_bytes(buf.getvalue())
    with pytest.raises(DataError, match='is not a gallery file'): Gallery.load(tmp/'noskus.npz')
    with pytest.raises(ConfigError, match=r'threshold is a cosine similarity in \[-1, 1\], got 2'): Gallery(gal.skus, gal.embeddings, gal.model, 2)
    with pytest.raises(DataError, match='one embedding row per SKU entry'): Gallery(['a'], gal.embeddings, gal.model)
    with pytest.raises(DataError, match='NaN or infinite'): Gallery(['a'], np.full((1, 16), np.nan), gal.model)
    with pytest.raises(DataError, match='non-empty string'): Gallery([' ', 'b'], gal.embeddings, gal.model)
    with pytest.raises(DataError, match='must map each SKU'): Gallery.build(pred, {})
    with pytest.raises(DataError, match="SKU 'x' has no catalogue image"): Gallery.build(pred, {'x': []})
    with pytest.raises(DataError, match=r'must have shape \(N, 16\), got \(3, 8\)'): gal.lookup(np.ones((3, 8)))
    with pytest.raises(DataError, match='not one image'): identify(pred, faces[cat[0].sku])
    with pytest.raises(ConfigError, match='needs a gallery'): identify(pred, [faces[cat[0].sku]], by='gallery')
    with pytest.raises(ConfigError, match="by must be 'gallery' or 'classifier'"): identify(pred, [faces[cat[0].sku]], gal, by='knn')
    (tmp/'broken.png').write_bytes(b'\x89PNG broken')
    with pytest.raises(DataError, match='broken.png'): identify(pred, [tmp/'broken.png'], gal)
    Image.new('RGB', (10, 10)).save(tmp/'ok.png')
    assert identify(pred, [tmp/'ok.png'], gal)[0].by == 'gallery'  # paths work as crops
