"Synthetic shelves: byte-identical reruns, tags that scan from their COCO boxes, consistent annotations, refused options."
import csv
import hashlib
import json
import math
from collections import Counter, defaultdict
from pathlib import Path

import cv2
import numpy as np
import pytest
import zxingcpp
from pycocotools.coco import COCO

from retail_cv.core import ConfigError
from retail_cv.data.formats import read_coco
from retail_cv.data.synth import (ShelfRenderer, SynthConfig, generate_shelves, parse_price_ean13, price_ean13,
                                  synth_config)


def file_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob('*')) if p.is_file()}


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
    "40 images at the default options, written once for the read-only tests below."
    out = tmp_path_factory.mktemp('synth')/'ds'
    summary = generate_shelves(out, images=40, seed=11)
    return out, summary


# ---------------------------------------------------------------- determinism

def test_same_seed_same_bytes_different_seed_differs(tmp_path):
    a = generate_shelves(tmp_path/'a', images=10, seed=3, skus=30)
    b = generate_shelves(tmp_path/'b', {'images': 10, 'seed': 3, 'skus': 30})
    ha, hb = file_hashes(tmp_path/'a'), file_hashes(tmp_path/'b')
    assert set(ha) == {f'images/{i:06d}.jpg' for i in range(10)} | {'annotations.json', 'planogram.json', 'prices.csv', 'synth.json'}
    assert ha == hb
    assert json.loads((tmp_path/'a'/'synth.json').read_text())['files'] == {k: v for k, v in ha.items() if k != 'synth.json'}
    assert (a.products, a.gaps, a.price_tags) == (b.products, b.gaps, b.price_tags)
    generate_shelves(tmp_path/'c', images=10, seed=4, skus=30)
    hc = file_hashes(tmp_path/'c')
    assert all(hc[f'images/{i:06d}.jpg'] != ha[f'images/{i:06d}.jpg'] for i in range(10))
    for name in ('annotations.json', 'planogram.json'): assert hc[name] != ha[name]
    assert hc['prices.csv'] == ha['prices.csv']  # the catalogue has its own seed


def test_layout_seeds_share_the_catalogue_and_class_list(tmp_path):
    "Seeds 100 and 999 draw other shelves of the same products: train on one, evaluate on the other."
    generate_shelves(tmp_path/'a', images=2, seed=100); generate_shelves(tmp_path/'b', images=2, seed=999)
    a, b = read_coco(tmp_path/'a'/'annotations.json'), read_coco(tmp_path/'b'/'annotations.json')
    assert [c.name for c in a.categories] == [c.name for c in b.categories] and len(a.categories) == SynthConfig().skus + 2
    assert (tmp_path/'a'/'prices.csv').read_bytes() == (tmp_path/'b'/'prices.csv').read_bytes()
    assert (tmp_path/'a'/'images'/'000000.jpg').read_bytes() != (tmp_path/'b'/'images'/'000000.jpg').read_bytes()
    generate_shelves(tmp_path/'c', images=2, seed=100, catalogue_seed=1)
    assert (tmp_path/'c'/'prices.csv').read_bytes() != (tmp_path/'a'/'prices.csv').read_bytes()


def test_kinds_labels_are_product_gap_price_tag(tmp_path):
    s = generate_shelves(tmp_path/'k', images=3, seed=100, labels='kinds')
    ds = read_coco(tmp_path/'k'/'annotations.json')
    assert [(c.id, c.name) for c in ds.categories] == [(1, 'product'), (2, 'gap'), (3, 'price_tag')]
    assert Counter(a.category_id for a in ds.annotations) == {1: s.products, 2: s.gaps, 3: s.price_tags}
    assert json.loads((tmp_path/'k'/'synth.json').read_text())['config']['labels'] == 'kinds'


def test_worker_processes_write_the_same_files(tmp_path):
    generate_shelves(tmp_path/'one', images=8, seed=5)
    generate_shelves(tmp_path/'two', images=8, seed=5, workers=2)
    assert file_hashes(tmp_path/'one') == file_hashes(tmp_path/'two')


def test_an_image_does_not_depend_on_the_run_length_or_order(tmp_path):
    generate_shelves(tmp_path/'long', images=6, seed=9)
    generate_shelves(tmp_path/'short', images=3, seed=9)
    long, short = file_hashes(tmp_path/'long'), file_hashes(tmp_path/'short')
    assert all(long[f'images/{i:06d}.jpg'] == short[f'images/{i:06d}.jpg'] for i in range(3))
    r = ShelfRenderer(synth_config(seed=9))
    later_first = r.render(2).image
    assert np.array_equal(later_first, ShelfRenderer(synth_config(seed=9)).render(2).image)
    assert not np.array_equal(later_first, r.render(1).image)


# ---------------------------------------------------------------- price tags scan

def _read(img: np.ndarray, bbox) -> list[str]:
    x, y, w, h = bbox
    crop = img[int(y):math.ceil(y + h), int(x):math.ceil(x + w)]
    return [b.text for b in zxingcpp.read_barcodes(crop)]


def test_price_tags_decode_from_their_coco_boxes(dataset):
    out, _ = dataset
    coco = json.loads((out/'annotations.json').read_text())
    tag_cat = next(c['id'] for c in coco['categories'] if c['name'] == 'price_tag')
    files = {im['id']: im['file_name'] for im in coco['images']}
    prices = {r['sku']: r for r in csv.DictReader((out/'prices.csv').read_text().splitlines())}
    decoded, total = Counter(), Counter()
    for im_id, file_name in files.items():
        img = cv2.imread(str(out/file_name), cv2.IMREAD_COLOR)
        for a in coco['annotations']:
            if a['image_id'] != im_id or a['category_id'] != tag_cat: continue
            attrs = a['attributes']; sym = attrs['symbology']
            total[sym] += 1
            texts = _read(img, a['bbox'])
            if attrs['payload'] not in texts: continue
            decoded[sym] += 1
            # the payload itself carries the SKU and price of the tag, as listed in the price table
            row = prices[attrs['sku']]
            assert f"{attrs['price']:.2f}" == row['price']
            if sym == 'ean13':
                item, cents = parse_price_ean13(attrs['payload'])
                assert (f'SKU{item:05d}', cents) == (attrs['sku'], round(attrs['price'] * 100))
                assert attrs['payload'] == row['tag_ean13']
            else:
                assert attrs['payload'] == row['qr_payload'] == f"{attrs['sku']}:{row['price']}"
    assert total['ean13'] > 30 and total['qr'] > 30, total
    rate = sum(decoded.values()) / sum(total.values())
    assert rate >= 0.9, (decoded, total)
    for sym in total: assert decoded[sym] / total[sym] >= 0.85, (sym, decoded, total)


def test_boxes_follow_a_strong_perspective(tmp_path):
    "At the largest tilt the tag boxes still hold their codes: the boxes went through the homography."
    cfg = synth_config(seed=2, perspective=0.15, blur_prob=0, noise_sigma=(0, 0), sensor_scale=(1, 1))
    r = ShelfRenderer(cfg)
    ok = total = 0
    for i in range(8):
        sc = r.render(i)
        for o in sc.objects:
            if o.kind != 'price_tag': continue
            total += 1; ok += o.attributes['payload'] in _read(sc.image, o.bbox)
    assert total and ok / total >= 0.9, (ok, total)
    # and the same boxes without the warp would miss: shifting them by the margin breaks most reads
    sc = r.render(0)
    tags = [o for o in sc.objects if o.kind == 'price_tag']
    moved = sum(o.attributes['payload'] in _read(sc.image, (o.bbox[0] + o.bbox[2] * .5, o.bbox[1], o.bbox[2], o.bbox[3])) for o in tags)
    assert moved < len(tags)


# ---------------------------------------------------------------- annotation sanity

def test_annotations_are_inside_the_image_and_consistent_with_the_planogram(dataset):
    out, summary = dataset
    ds = read_coco(out/'annotations.json')
    names = ds.category_names
    cats = {c.name: c.id for c in ds.categories}
    prices = {r['sku']: r for r in csv.DictReader((out/'prices.csv').read_text().splitlines())}
    assert len(prices) == SynthConfig().skus
    assert {names[i] for i in range(1, len(prices) + 1)} == {r['name'] for r in prices.values()}
    assert list(names.values())[-2:] == ['gap', 'price_tag']
    sku_of_cat = {cats[r['name']]: sku for sku, r in prices.items()}
    ims = {im.id: im for im in ds.images}
    assert {im.split for im in ds.images} <= {'train', 'val'} and len(ims) == 40
    for a in ds.annotations:
        im = ims[a.image_id]; x, y, w, h = a.bbox
        assert w > 0 and h > 0, a
        assert x >= 0 and y >= 0 and x + w <= im.width + 1e-6 and y + h <= im.height + 1e-6, a
        if a.category_id in sku_of_cat: assert a.attributes['sku'] == sku_of_cat[a.category_id]
        if a.category_id == cats['price_tag']: assert set(a.attributes) >= {'sku', 'price', 'symbology', 'payload'}
    plan = json.loads((out/'planogram.json').read_text())
    assert [p['image_id'] for p in plan['images']] == sorted(ims)
    by_slot = defaultdict(list)
    for a in ds.annotations: by_slot[a.image_id, a.attributes['shelf'], a.attributes['slot']].append(a)
    slots = 0
    for p in plan['images']:
        for shelf in p['shelves']:
            for slot in shelf['slots']:
                slots += 1
                anns = by_slot.pop((p['image_id'], shelf['shelf'], slot['slot']))
                products = [a for a in anns if a.category_id in sku_of_cat]
                gaps = [a for a in anns if a.category_id == cats['gap']]
                tags = [a for a in anns if a.category_id == cats['price_tag']]
                # every planned facing is on the shelf or inside a gap box, and the slot has its one tag
                assert len(products) == slot['present'] and all(sku_of_cat[a.category_id] == slot['sku'] for a in products)
                assert sum(a.attributes['facings'] for a in gaps) == slot['facings'] - slot['present']
                assert all(a.attributes['sku'] == slot['sku'] for a in gaps)
                assert [a.attributes['sku'] for a in tags] == [slot['sku']] and tags[0].attributes['symbology'] == slot['symbology']
                assert slot['status'] == ('ok' if slot['present'] == slot['facings'] else 'gap' if slot['present'] == 0 else 'partial')
    assert not by_slot  # no annotation outside the planogram
    statuses = Counter(s['status'] for p in plan['images'] for sh in p['shelves'] for s in sh['slots'])
    assert statuses['gap'] > 0 and statuses['ok'] > 0, statuses
    assert summary.gaps > 0 and summary.price_tags == slots
    assert summary.annotations == len(ds.annotations)


def test_coco_file_loads_in_pycocotools(dataset):
    out, summary = dataset
    coco = COCO(str(out/'annotations.json'))
    assert len(coco.getImgIds()) == 40 and len(coco.getAnnIds()) == summary.annotations
    tag_id = coco.getCatIds(catNms=['price_tag'])[0]
    assert len(coco.getAnnIds(catIds=[tag_id])) == summary.price_tags
    img = cv2.imread(str(out/coco.loadImgs(1)[0]['file_name']))
    assert img.shape == (480, 640, 3)


def test_images_vary(dataset):
    "Lighting, shelves and products differ from image to image."
    out, _ = dataset
    imgs = [cv2.imread(str(p)).astype(np.float32) for p in sorted((out/'images').iterdir())[:12]]
    means = np.array([im.mean(axis=(0, 1)) for im in imgs])
    assert means.std(axis=0).min() > 3
    plan = json.loads((out/'planogram.json').read_text())['images']
    assert len({len(p['shelves']) for p in plan}) > 1
    assert len({s['sku'] for p in plan for sh in p['shelves'] for s in sh['slots']}) > 15


# ---------------------------------------------------------------- refused options

@pytest.mark.parametrize('bad, key', [
    ({'images': 0}, 'images'), ({'seed': -1}, 'seed'), ({'width': 100}, 'width'), ({'shelves': (3, 2)}, 'shelves'),
    ({'facings': (0, 2)}, 'facings'), ({'gap_prob': 1.5}, 'gap_prob'), ({'symbology': 'code128'}, 'symbology'),
    ({'ean_module_px': (2, 40)}, 'ean_module_px'), ({'jpeg_quality': (90, 101)}, 'jpeg_quality'),
    ({'images': 'many'}, 'images'), ({'perspective': 0.5}, 'perspective'),
])
def test_bad_option_is_a_config_error_naming_the_key(tmp_path, bad, key):
    with pytest.raises(ConfigError, match=f"'{key}'"): generate_shelves(tmp_path/'x', **bad)
    with pytest.raises(ConfigError, match=f"'{key}'"): generate_shelves(tmp_path/'x', bad)
    assert not (tmp_path/'x').exists()  # refused before anything is written


def test_unknown_key_and_impossible_geometry_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'imgs'"): generate_shelves(tmp_path/'x', imgs=3)
    with pytest.raises(ConfigError, match="'shelves'"): generate_shelves(tmp_path/'x', height=240, shelves=(6, 6))
    with pytest.raises(ConfigError, match="'width'"):
        generate_shelves(tmp_path/'x', width=320, symbology='ean13', ean_module_px=(3, 3))
    with pytest.raises(ConfigError, match='workers'): generate_shelves(tmp_path/'x', images=1, workers=0)
    assert not (tmp_path/'x').exists()


def test_existing_output_needs_overwrite_which_removes_only_generator_files(tmp_path):
    out = tmp_path/'ds'
    generate_shelves(out, images=4, seed=1)
    (out/'notes.txt').write_text('mine')
    with pytest.raises(ConfigError, match='not empty'): generate_shelves(out, images=2, seed=1)
    generate_shelves(out, images=2, seed=1, overwrite=True)
    assert sorted(p.name for p in (out/'images').iterdir()) == ['000000.jpg', '000001.jpg']
    assert (out/'notes.txt').read_text() == 'mine'
    assert len(read_coco(out/'annotations.json').images) == 2


def test_price_embedded_ean13_is_what_zxing_writes_and_reads():
    code = price_ean13(4711, 349)
    assert zxingcpp.create_barcode(code, zxingcpp.BarcodeFormat.EAN13).text == code
    img = np.asarray(zxingcpp.create_barcode(code, zxingcpp.BarcodeFormat.EAN13).to_image(scale=2))
    assert [b.text for b in zxingcpp.read_barcodes(img)] == [code]
    assert parse_price_ean13(code) == (4711, 349)
    with pytest.raises(ValueError): parse_price_ean13(code[:-1] + str((int(code[-1]) + 1) % 10))


# ---------------------------------------------------------------- closer to store photos

def test_realism_options_render_seeded_shelves_with_real_tag_sizes(tmp_path):
    "Product photos as packaging, price-first tags, a cluttered shelf edge and a turned camera: seeded, boxed, any worker count."
    from retail_cv.data.formats import grocery_sample
    opts = dict(images=6, seed=3, width=640, height=640, shelves=(3, 5), labels='kinds', faces=str(grocery_sample()),
                tag_style='price', price_tag_px=(28, 48), edge_clutter=0.8, roll=5.0)
    generate_shelves(tmp_path/'one', opts)
    generate_shelves(tmp_path/'two', opts, workers=2)
    assert file_hashes(tmp_path/'one') == file_hashes(tmp_path/'two')
    ds = read_coco(tmp_path/'one'/'annotations.json')
    tag = next(c.id for c in ds.categories if c.name == 'price_tag')
    tags = [a for a in ds.annotations if a.category_id == tag]
    assert len(tags) >= 6 * 6
    widths = sorted(a.bbox[2] for a in tags)
    assert 26 <= widths[len(widths) // 2] <= 60, widths  # 28-48 px tags, widened by the roll
    assert all(0 <= a.bbox[0] and a.bbox[0] + a.bbox[2] <= 640 + 1e-6 and a.bbox[1] + a.bbox[3] <= 640 + 1e-6 for a in ds.annotations)
    # the packaging is the photos: the product boxes hold photo pixels, far from the drawn catalogue's flat colours
    flat = ShelfRenderer(synth_config(seed=3, width=640, height=640, shelves=(3, 5))).render(0)
    photo = ShelfRenderer(synth_config(seed=3, width=640, height=640, shelves=(3, 5), faces=str(grocery_sample()))).render(0)
    assert not np.array_equal(flat.image, photo.image)


def test_a_faces_folder_without_photos_is_refused_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match="'faces'"): generate_shelves(tmp_path/'x', images=1, faces=str(tmp_path/'missing'))
    (tmp_path/'empty').mkdir()
    with pytest.raises(ConfigError, match="'faces'.*holds no JPEG or PNG photo"): generate_shelves(tmp_path/'x', images=1, faces=str(tmp_path/'empty'))
    (tmp_path/'bad').mkdir(); (tmp_path/'bad'/'a.jpg').write_bytes(b'not a jpeg')
    with pytest.raises(ConfigError, match="a.jpg is not a readable image"): generate_shelves(tmp_path/'x', images=1, faces=str(tmp_path/'bad'))
    assert not (tmp_path/'x').exists()  # refused before anything is written
