"""Dataset readers/writers: round trips between formats, auto-detection, and malformed input naming file and line."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
from PIL import Image

from retail_cv.core import DataError
from retail_cv.data.formats import (Annotation, Category, Dataset, ImageRecord, detect_format, grocery_sample, image_size,
                                    load_dataset, read_coco, read_folder, read_grocery, read_sku110k, read_voc, read_yolo,
                                    save_dataset, write_coco, write_folder, write_voc, write_yolo)


def make_image(path: Path, size: tuple[int, int], orientation: int = 1) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new('RGB', size, (30, 90, 150))
    exif = im.getexif()
    if orientation != 1: exif[0x0112] = orientation
    im.save(path, exif=exif) if path.suffix.lower() in ('.jpg', '.jpeg') else im.save(path)


def random_detection(root: Path, seed: int, n_images: int = 15, n_cats: int = 150) -> Dataset:
    """A detection dataset with real images, sparse category ids, fractional boxes, two splits."""
    rng = random.Random(seed)
    cats = [Category(7 * k + 3, f'product {k} / "{seed}"', 'shelf') for k in range(n_cats)]
    ims, anns = [], []
    for i in range(n_images):
        w, h = rng.randint(30, 300), rng.randint(30, 300)
        name = f'{"ab"[i % 2]}/img_{i}.{"png" if i % 3 else "jpg"}'
        make_image(root/name, (w, h))
        ims.append(ImageRecord(100 + i, name, w, h, ['train', 'val', 'test'][i % 3]))
        for _ in range(rng.randint(0, 8)):
            x, y = rng.uniform(0, w - 1), rng.uniform(0, h - 1)
            bw, bh = rng.uniform(1e-3, w - x), rng.uniform(1e-3, h - y)
            anns.append(Annotation(len(anns) + 1, 100 + i, rng.choice(cats).id, (x, y, bw, bh)))
    # boxes touching the edges and integer boxes
    anns.append(Annotation(len(anns) + 1, 100, cats[0].id, (0.0, 0.0, float(ims[0].width), float(ims[0].height))))
    anns.append(Annotation(len(anns) + 1, 101, cats[-1].id, (1.0, 2.0, 3.0, 4.0)))
    return Dataset(root, 'detection', cats, ims, anns)


def boxes_by_name(ds: Dataset) -> dict[str, list]:
    name = {im.id: Path(im.file_name).name for im in ds.images}
    out: dict[str, list] = {n: [] for n in name.values()}
    for a in ds.annotations: out[name[a.image_id]].append((ds.category_names[a.category_id], a.bbox))
    return {k: sorted(v) for k, v in out.items()}


def assert_same(a: Dataset, b: Dataset) -> None:
    ba, bb = boxes_by_name(a), boxes_by_name(b)
    assert sorted(ba) == sorted(bb)
    for k in ba:
        assert [n for n, _ in ba[k]] == [n for n, _ in bb[k]], k
        for (_, u), (_, v) in zip(ba[k], bb[k]):
            for p, q in zip(u, v): assert math.isclose(p, q, rel_tol=1e-6, abs_tol=1e-9), (k, u, v)
    assert sorted(c.name for c in a.categories) == sorted(c.name for c in b.categories)
    assert sorted((Path(i.file_name).name, i.split, i.width, i.height) for i in a.images) == \
           sorted((Path(i.file_name).name, i.split, i.width, i.height) for i in b.images)


@pytest.mark.parametrize('fmt', ['yolo', 'voc'])
@pytest.mark.parametrize('seed', [0, 1])
def test_round_trip_through_format(tmp_path, fmt, seed):
    ds = random_detection(tmp_path/'src', seed)
    save_dataset(ds, tmp_path/'coco', 'coco')
    coco = load_dataset(tmp_path/'coco')
    assert_same(ds, coco)
    save_dataset(coco, tmp_path/fmt, fmt, images='link')
    assert detect_format(tmp_path/fmt) == fmt
    mid = load_dataset(tmp_path/fmt)
    save_dataset(mid, tmp_path/'back', 'coco')
    back = load_dataset(tmp_path/'back')
    assert_same(ds, back)


def test_voc_zero_based_round_trip(tmp_path):
    ds = random_detection(tmp_path/'src', 3, n_images=4, n_cats=5)
    write_voc(ds, tmp_path/'voc', one_based=False)
    assert_same(ds, read_voc(tmp_path/'voc', one_based=False))
    shifted = read_voc(tmp_path/'voc')  # reading 0-based corners as 1-based moves every box by one pixel
    want, got = boxes_by_name(ds), boxes_by_name(shifted)
    for k in want:
        for (_, a), (_, b) in zip(want[k], got[k]):
            assert b == pytest.approx((a[0] - 1, a[1] - 1, a[2] + 1, a[3] + 1))


def test_folder_round_trip_of_grocery_sample(tmp_path):
    g = load_dataset(grocery_sample())
    assert g.task == 'classification' and len(g.images) == 91 and g.splits == ['train', 'val']
    assert len({c.supercategory for c in g.categories}) >= 3
    save_dataset(g, tmp_path/'f', 'folder')
    f = read_folder(tmp_path/'f')
    key = lambda d: sorted((i.split, Path(i.file_name).name, d.category_names[a.category_id], i.width, i.height)
                           for i, a in zip(d.images, d.annotations))
    assert key(f) == key(g)
    save_dataset(g, tmp_path/'c', 'coco')
    c = load_dataset(tmp_path/'c')
    assert c.task == 'classification' and c.to_coco()['categories'] == g.to_coco()['categories']
    assert [a.attributes for a in c.annotations] == [a.attributes for a in g.annotations]


def test_shipped_sample_is_small_and_attributed():
    root = grocery_sample()
    total = sum(p.stat().st_size for p in root.rglob('*') if p.is_file())
    assert total <= 3_000_000
    assert 'MIT License' in (root/'LICENSE').read_text() and 'Klasson' in (root/'README.md').read_text()
    assert max(max(image_size(p)) for p in root.rglob('*.jpg')) <= 256


def test_coco_missing_sizes_come_from_headers(tmp_path):
    make_image(tmp_path/'a.jpg', (40, 30), orientation=6)
    (tmp_path/'ann.json').write_text(json.dumps({'categories': [{'id': 1, 'name': 'x'}],
                                                 'images': [{'id': 1, 'file_name': 'a.jpg'}], 'annotations': []}))
    ds = read_coco(tmp_path/'ann.json')
    assert (ds.images[0].width, ds.images[0].height) == (30, 40)  # displayed size


def test_yolo_layouts(tmp_path):
    # classes.txt, flat images/ + labels/, polygon line, label beside nothing (orphan)
    root = tmp_path/'flat'
    make_image(root/'images/a.jpg', (100, 50))
    (root/'labels').mkdir()
    (root/'labels/a.txt').write_text('1 0.5 0.5 0.2 0.4\n0 0.1 0.1 0.3 0.1 0.3 0.5\n')
    (root/'labels/ghost.txt').write_text('0 0.5 0.5 0.1 0.1\n')
    (root/'classes.txt').write_text('cola\nchips\n\n')
    assert detect_format(root) == 'yolo'
    ds = read_yolo(root)
    assert ds.category_names == {0: 'cola', 1: 'chips'}
    assert ds.images[0].split == '' and ds.annotations[0].bbox == pytest.approx((40, 15, 20, 20))
    assert ds.annotations[1].bbox == pytest.approx((10, 5, 20, 20))
    assert [f['file'] for f in ds.findings] == ['labels/ghost.txt']
    # Roboflow layout: data.yaml at the root, train/images, valid/images, names as a list, paths with ../
    rf = tmp_path/'rf'
    for split in ('train', 'valid'):
        make_image(rf/split/'images/x.jpg', (64, 64))
        (rf/split/'labels').mkdir(parents=True)
        (rf/split/'labels/x.txt').write_text('0 0.5 0.5 0.5 0.5\n')
    (rf/'data.yaml').write_text('train: ../train/images\nval: ../valid/images\nnc: 1\nnames: [shelf-gap]\n')
    ds = load_dataset(rf/'data.yaml')
    assert [(i.file_name, i.split) for i in ds.images] == [('train/images/x.jpg', 'train'), ('valid/images/x.jpg', 'val')]
    assert [a.bbox for a in ds.annotations] == [(16, 16, 32, 32)] * 2


@pytest.mark.parametrize('text, expect', [
    ('0 0.5 0.5 0.2\n', 'a.txt line 1: expected 5 fields'),
    ('0 0.5 0.5 0.2 0.2\n0 0.5 x 0.2 0.2\n', "a.txt line 2: field 3 'x' is not a number"),
    ('\n1.5 0.5 0.5 0.2 0.2\n', 'a.txt line 2: field 1 (class index) must be a non-negative integer'),
    ('0 0.5 0.5 0.2 0.2 0.9\n', 'a.txt line 1: expected 5 fields'),
])
def test_yolo_malformed_labels(tmp_path, text, expect):
    make_image(tmp_path/'images/train/a.jpg', (10, 10))
    (tmp_path/'labels/train').mkdir(parents=True)
    (tmp_path/'labels/train/a.txt').write_text(text)
    (tmp_path/'data.yaml').write_text('train: images/train\nnames: {0: a}\n')
    with pytest.raises(DataError, match=expect.replace('(', r'\(').replace(')', r'\)')): read_yolo(tmp_path)


@pytest.mark.parametrize('yaml_text, expect', [
    ('train: images/train\nnames: [a, b\n', r'data.yaml line \d+: not valid YAML'),
    ('train: images/train\n', "field 'names'"),
    ('- a\n- b\n', 'expected a mapping'),
    ('train: images/nowhere\nnames: [a]\n', "field 'train'"),
    ('names: {zero: a}\n', 'keys must be class indices'),
])
def test_yolo_malformed_yaml(tmp_path, yaml_text, expect):
    make_image(tmp_path/'images/train/a.jpg', (10, 10))
    (tmp_path/'data.yaml').write_text(yaml_text)
    with pytest.raises(DataError, match=expect): load_dataset(tmp_path)


def voc_root(tmp_path: Path, xml: str) -> Path:
    (tmp_path/'Annotations').mkdir(parents=True)
    (tmp_path/'Annotations/a.xml').write_text(xml)
    return tmp_path


@pytest.mark.parametrize('xml, expect', [
    ('<annotation><filename>a.jpg</filename>\n<object><name>x</name>\n</annotation>', r'a.xml line 3, column'),
    ('<annotation><filename>a.jpg</filename><object><name>x</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>abc</xmax>'
     '<ymax>4</ymax></bndbox></object></annotation>', r"field object\[0\]/bndbox/xmax 'abc' is not a number"),
    ('<annotation><filename>a.jpg</filename><object><name>x</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>3</xmax>'
     '</bndbox></object></annotation>', r'field object\[0\]/bndbox/ymax is missing'),
    ('<annotation><object><name>x</name></object></annotation>', 'field filename is missing'),
    ('<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;&a;">]><annotation><filename>&b;</filename></annotation>',
     'document type declarations are not allowed'),
    ('<root/>', 'expected <annotation>'),
])
def test_voc_malformed(tmp_path, xml, expect):
    with pytest.raises(DataError, match=expect): read_voc(voc_root(tmp_path, xml))


def test_voc_splits_and_sizes(tmp_path):
    root = voc_root(tmp_path, '<annotation><filename>a.jpg</filename><object><name>cola</name><difficult>1</difficult>'
                              '<bndbox><xmin>11</xmin><ymin>21</ymin><xmax>30</xmax><ymax>40</ymax></bndbox></object></annotation>')
    make_image(root/'JPEGImages/a.jpg', (64, 48))
    (root/'ImageSets/Main').mkdir(parents=True)
    (root/'ImageSets/Main/val.txt').write_text('a\n')
    ds = load_dataset(root)
    assert (ds.images[0].split, ds.images[0].width, ds.images[0].height) == ('val', 64, 48)
    assert ds.annotations[0].bbox == (10, 20, 20, 20) and ds.annotations[0].attributes == {'difficult': 1}


@pytest.mark.parametrize('rows, expect', [
    ('a.jpg,1,2,3,4,object,100\n', 'annotations_train.csv line 1: expected 8 columns'),
    ('a.jpg,1,2,3,4,object,100,100\na.jpg,1,two,3,4,object,100,100\n', "line 2: column y1 'two' is not a number"),
    ('a.jpg,1,2,3,4,object,100.5,100\n', 'must be integers'),
    ('a.jpg,1,2,3,4,object,100,100\na.jpg,1,2,3,4,object,100,90\n', "line 2: image 'a.jpg' is 100x90 here"),
])
def test_sku110k_malformed(tmp_path, rows, expect):
    (tmp_path/'annotations').mkdir()
    (tmp_path/'annotations/annotations_train.csv').write_text(rows)
    with pytest.raises(DataError, match=expect): read_sku110k(tmp_path)


def test_sku110k_reads(tmp_path):
    (tmp_path/'annotations').mkdir(); (tmp_path/'images').mkdir()
    (tmp_path/'annotations/annotations_test.csv').write_text(
        'image_name,x1,y1,x2,y2,class,image_width,image_height\ntest_0.jpg,10,20,110,220,object,3024,4032\n')
    ds = load_dataset(tmp_path)
    assert ds.info['source_format'] == 'sku110k'
    assert [(i.file_name, i.split, i.width, i.height) for i in ds.images] == [('images/test_0.jpg', 'test', 3024, 4032)]
    assert ds.annotations[0].bbox == (10, 20, 100, 200) and ds.category_names == {1: 'object'}


HEADER = 'Class Name (str),Class ID (int),Coarse Class Name (str),Coarse Class ID (int),Iconic Image Path (str),Product Description Path (str)\n'


def grocery(tmp_path: Path, classes: str, train: str) -> Path:
    (tmp_path/'classes.csv').write_text(classes)
    (tmp_path/'train.txt').write_text(train)
    return tmp_path


@pytest.mark.parametrize('classes, train, expect', [
    ('Class,ID\n', 'a.jpg, 0, 0\n', 'classes.csv line 1: expected the header'),
    (HEADER + 'Apple,0,Fruit,0,/i.jpg\n', 'a.jpg, 0, 0\n', 'classes.csv line 2: expected 6 columns'),
    (HEADER + 'Apple,zero,Fruit,0,/i.jpg,/d.txt\n', 'a.jpg, 0, 0\n', "classes.csv line 2: Class ID 'zero' is not an integer"),
    (HEADER + 'Apple,0,Fruit,0,/i.jpg,/d.txt\n', 'a.jpg, 0, 0\nb.jpg, 0\n', 'train.txt line 2: expected 3 fields'),
    (HEADER + 'Apple,0,Fruit,0,/i.jpg,/d.txt\n', 'a.jpg, x, 0\n', "train.txt line 1: fine class id 'x' is not an integer"),
])
def test_grocery_malformed(tmp_path, classes, train, expect):
    with pytest.raises(DataError, match=expect): read_grocery(grocery(tmp_path, classes, train))


def test_grocery_leading_slash_and_coarse_mismatch(tmp_path):
    root = grocery(tmp_path, HEADER + 'Apple,0,Fruit,0,/i.jpg,/d.txt\nLeek,1,Veg,1,/i.jpg,/d.txt\n',
                   '/train/a.jpg, 0, 0\ntrain/b.jpg, 1, 0\n')
    make_image(root/'train/a.jpg', (20, 10)); make_image(root/'train/b.jpg', (20, 10))
    ds = load_dataset(root)
    assert [i.file_name for i in ds.images] == ['train/a.jpg', 'train/b.jpg'] and ds.images[0].width == 20
    assert ds.categories[1] == Category(1, 'Leek', 'Veg')
    assert [(f['code'], f['where'], f['annotation_id']) for f in ds.findings] == [('label_mismatch', 'train.txt line 2', 2)]


def test_detect_format_lists_what_it_tried(tmp_path):
    (tmp_path/'notes.md').write_text('hi')
    with pytest.raises(DataError) as e: load_dataset(tmp_path)
    for name in ('grocery', 'coco', 'yolo', 'voc', 'sku110k', 'folder'): assert f'{name} (' in str(e.value)
    with pytest.raises(DataError, match='no such file'): load_dataset(tmp_path/'nope')
    with pytest.raises(DataError, match='unknown dataset format'): load_dataset(tmp_path, format='tfrecord')


def test_writers_refuse_unsafe_or_unsuitable_input(tmp_path):
    make_image(tmp_path/'src/a.jpg', (10, 10))
    ds = Dataset(tmp_path/'src', 'detection', [Category(1, 'x')], [ImageRecord(1, '../a.jpg', 10, 10)],
                 [Annotation(1, 1, 1, (1, 1, 2, 2))])
    with pytest.raises(DataError, match="'../a.jpg' must be a relative path"): save_dataset(ds, tmp_path/'o1', 'yolo')
    ds.images[0].file_name = 'a.jpg'
    (tmp_path/'busy').mkdir(); (tmp_path/'busy/x').write_text('x')
    with pytest.raises(DataError, match='not empty'): save_dataset(ds, tmp_path/'busy', 'coco')
    with pytest.raises(DataError, match="cannot write format 'sku110k'"): save_dataset(ds, tmp_path/'o2', 'sku110k')
    with pytest.raises(DataError, match='exactly one image-level label'): write_folder(ds, tmp_path/'o3')
    ds.images[0].width = 0
    with pytest.raises(DataError, match='no known size'): write_yolo(ds, tmp_path/'o4')
    cls = Dataset(tmp_path/'src', 'classification', [Category(1, 'x')], [ImageRecord(1, 'a.jpg', 10, 10)], [Annotation(1, 1, 1)])
    with pytest.raises(DataError, match="format 'folder'"): write_voc(cls, tmp_path/'o5')
    missing = Dataset(tmp_path/'src', 'detection', [Category(1, 'x')], [ImageRecord(1, 'gone.jpg', 10, 10)], [])
    with pytest.raises(DataError, match='gone.jpg: image file of image id 1 does not exist'): save_dataset(missing, tmp_path/'o6', 'coco')


def test_coco_malformed(tmp_path):
    (tmp_path/'a.json').write_text('{"categories": [], "images": [{"id": 1, "file_name": "a.jpg", "width": "wide"}]}')
    with pytest.raises(DataError, match=r"images\[0\] \(id 1\) field 'width' must be an integer, got 'wide'"): read_coco(tmp_path/'a.json')
    (tmp_path/'b.json').write_text('{"categories": [],\n\n "images": [,]}')
    with pytest.raises(DataError, match='b.json line 3: not valid JSON'): read_coco(tmp_path/'b.json')
    (tmp_path/'c.json').write_text('{"categories": {}, "images": []}')
    with pytest.raises(DataError, match="'categories' must be a list"): read_coco(tmp_path/'c.json')


def test_split_names_survive_or_are_refused(tmp_path):
    ds = random_detection(tmp_path/'src', 5, n_images=4, n_cats=3)
    ds.images[0].split = 'holdout'
    write_voc(ds, tmp_path/'voc')  # VOC keeps any split as an ImageSets/Main list
    assert sorted(i.split for i in read_voc(tmp_path/'voc').images) == sorted(i.split for i in ds.images)
    with pytest.raises(DataError, match="train, val and test only, got 'holdout'"): write_yolo(ds, tmp_path/'y1')
    ds.images[0].split = ''
    with pytest.raises(DataError, match='others none'): write_yolo(ds, tmp_path/'y2')
    for im in ds.images: im.split = ''
    write_yolo(ds, tmp_path/'y3')
    back = read_yolo(tmp_path/'y3')
    assert {i.split for i in back.images} == {''} and len(back.images) == 4


# ---- the labelling tools' formats: CreateML, Label Studio, CVAT, Roboflow -----------------------------------------

from retail_cv.data.formats import (read_createml, read_cvat, read_labelstudio, read_roboflow, write_createml,  # noqa: E402
                                    write_cvat, write_labelstudio, write_roboflow)
from retail_cv.data.validate import validate_dataset  # noqa: E402

TOOL_FORMATS = ['createml', 'labelstudio', 'cvat', 'roboflow']


def exact_dataset(root: Path) -> Dataset:
    "A dataset every tool format holds exactly: ids and categories from 1, quarter-pixel boxes, train/val/test."
    cats = [Category(1, 'cola'), Category(2, 'price tag'), Category(3, 'gap'), Category(4, 'unused')]
    ims, anns = [], []
    for i in range(6):
        w, h = 40 + 8 * i, 30 + 4 * i
        make_image(root/f'shelf_{i}.jpg', (w, h))
        ims.append(ImageRecord(i + 1, f'shelf_{i}.jpg', w, h, ['train', 'train', 'train', 'val', 'val', 'test'][i]))
        for k in range(i % 3 + 1):
            anns.append(Annotation(len(anns) + 1, i + 1, 1 + (i + k) % 3, (0.25 * k, 1.5, 10.0 + k, 7.75)))
    return Dataset(root, 'detection', cats, ims, anns)


@pytest.mark.parametrize('fmt', TOOL_FORMATS)
def test_tool_format_round_trip_is_exact(tmp_path, fmt):
    ds = exact_dataset(tmp_path/'src')
    save_dataset(ds, tmp_path/fmt, fmt)
    assert detect_format(tmp_path/fmt) == fmt
    back = load_dataset(tmp_path/fmt)
    assert back.info['source_format'] == fmt and back.categories == ds.categories
    # boxes: exact, except Label Studio's percentages (a division and back)
    assert [(a.id, a.image_id, a.category_id) for a in back.annotations] == [(a.id, a.image_id, a.category_id) for a in ds.annotations]
    for a, b in zip(back.annotations, ds.annotations):
        assert a.bbox == pytest.approx(b.bbox, abs=1e-9) if fmt == 'labelstudio' else a.bbox == b.bbox
    assert [(Path(i.file_name).name, i.width, i.height, i.split) for i in back.images] == \
           [(i.file_name, i.width, i.height, i.split) for i in ds.images]
    assert validate_dataset(tmp_path/fmt).ok
    # and once more: what was read writes back to the same dataset (no folder nested twice)
    save_dataset(back, tmp_path/f'{fmt}2', fmt)
    again = load_dataset(tmp_path/f'{fmt}2')
    assert [i.file_name for i in again.images] == [i.file_name for i in back.images]


@pytest.mark.parametrize('fmt', TOOL_FORMATS)
@pytest.mark.parametrize('seed', [0, 1])
def test_tool_format_round_trip_through_coco(tmp_path, fmt, seed):
    ds = random_detection(tmp_path/'src', seed, n_images=9, n_cats=40)
    save_dataset(ds, tmp_path/fmt, fmt, images='link')
    assert detect_format(tmp_path/fmt) == fmt
    save_dataset(load_dataset(tmp_path/fmt), tmp_path/'back', 'coco')
    assert_same(ds, load_dataset(tmp_path/'back'))


def test_createml_malformed(tmp_path):
    make_image(tmp_path/'a.jpg', (20, 10))
    cases = {'[{"image": "a.jpg", "annotations": [{"label": "x", "coordinates": {"x": 1, "y": 2, "width": "3", "height": 4}}]}]':
                 r"\[0\]\.annotations\[0\]\.coordinates field 'width' must be a number, got '3'",
             '[{"image": "a.jpg", "annotations": [{"coordinates": {}}]}]': r"\[0\]\.annotations\[0\] is missing 'label'",
             '[{"image": "a.jpg", "annotations": {"label": "x"}}]': r"\[0\] field 'annotations' must be a list",
             '[{"image": 3}]': r"\[0\] field 'image' must be a string",
             '{"image": "a.jpg"}': 'expected a JSON list at top level, got dict',
             '[{"image": "a.jpg",\n "annotations": [}]': r'c\.json line 2: not valid JSON'}
    for text, expect in cases.items():
        (tmp_path/'c.json').write_text(text)
        with pytest.raises(DataError, match=expect): read_createml(tmp_path/'c.json')


def test_createml_centre_boxes_and_problems_for_the_validator(tmp_path):
    make_image(tmp_path/'a.jpg', (20, 10))
    (tmp_path/'c.json').write_text(json.dumps([
        {'image': 'a.jpg', 'annotations': [{'label': 'x', 'coordinates': {'x': 10, 'y': 5, 'width': 4, 'height': 2}},
                                           {'label': 'x', 'coordinates': {'x': 19, 'y': 5, 'width': 4, 'height': 2}}]},
        {'image': 'missing.jpg', 'annotations': []}]))
    ds = read_createml(tmp_path/'c.json')
    assert [a.bbox for a in ds.annotations] == [(8.0, 4.0, 4.0, 2.0), (17.0, 4.0, 4.0, 2.0)]
    r = validate_dataset(ds)
    assert r.counts == {'box_out_of_bounds': 1, 'missing_file': 1}
    assert any(p.where == 'c.json: [0].annotations[1]' for p in r.problems)


def ls_task(image='a.jpg', **value):
    v = {'x': 10, 'y': 10, 'width': 20, 'height': 20, 'rotation': 0, 'rectanglelabels': ['cola']} | value
    return {'id': 1, 'annotations': [{'id': 1, 'result': [{'id': 'r1', 'type': 'rectanglelabels', 'from_name': 'label', 'to_name': 'image',
                                                         'original_width': 200, 'original_height': 100, 'value': v}]}],
            'data': {'image': image}}


def test_labelstudio_malformed(tmp_path):
    make_image(tmp_path/'a.jpg', (200, 100))
    cases = [([ls_task(x='10%')], r"\[0\]\.annotations\[0\]\.result\[0\]\.value field 'x' must be a number"),
             ([ls_task(rectanglelabels=[])], 'must be a list of one label'),
             ([ls_task(rectanglelabels='cola')], 'must be a list of one label'),
             ([{'data': {'picture': 'a.jpg'}, 'annotations': []}], r"\[0\]\.data is missing 'image'"),
             ([{'annotations': []}], r"\[0\] is missing 'data'"),
             ([{'data': {'image': 'a.jpg'}, 'annotations': [{'result': {'x': 1}}]}], r"annotations\[0\] field 'result' must be a list"),
             ({'tasks': []}, 'expected a JSON list at top level')]
    for tasks, expect in cases:
        (tmp_path/'t.json').write_text(json.dumps(tasks))
        with pytest.raises(DataError, match=expect): read_labelstudio(tmp_path/'t.json')
    (tmp_path/'t.json').write_text('[{"data": {"image": "a.jpg"}')
    with pytest.raises(DataError, match='t.json line 1: not valid JSON'): read_labelstudio(tmp_path/'t.json')


def test_labelstudio_percentages_out_of_range_are_reported(tmp_path):
    make_image(tmp_path/'a.jpg', (200, 100))
    tasks = [ls_task(), ls_task(x=95), ls_task(y=-10), ls_task(width=-5), ls_task('/data/upload/4/0a1b2c3d-gone.jpg')]
    (tmp_path/'t.json').write_text(json.dumps(tasks))
    ds = load_dataset(tmp_path)
    assert ds.info['source_format'] == 'labelstudio' and ds.annotations[0].bbox == (20.0, 10.0, 40.0, 20.0)
    r = validate_dataset(tmp_path)
    assert r.counts == {'box_inverted': 1, 'box_out_of_bounds': 2, 'missing_file': 1}, r.counts
    assert {p.where for p in r.problems if p.code == 'box_out_of_bounds'} == \
           {"t.json: [1].annotations[0].result[0] (id 'r1')", "t.json: [2].annotations[0].result[0] (id 'r1')"}
    assert [p.file for p in r.problems if p.code == 'missing_file'] == ['gone.jpg']


CVAT_HEAD = '<?xml version="1.0"?><annotations><version>1.1</version><meta><task><labels><label><name>cola</name></label></labels></task></meta>'


@pytest.mark.parametrize('body, expect', [
    ('<image id="0" width="20" height="10"/>', r"image\[0\] attribute 'name' is missing"),
    ('<image id="0" name="a.jpg" width="wide"/>', r"image\[0\] \(name 'a.jpg'\) attribute 'width' 'wide' is not a number"),
    ('<image name="a.jpg"><box label="cola" xtl="1" ytl="1" xbr="x" ybr="2"/></image>', r"box\[0\] attribute 'xbr' 'x' is not a number"),
    ('<image name="a.jpg"><box label="cola" xtl="1" ytl="1" xbr="nan" ybr="2"/></image>', 'expected a finite number'),
    ('<image name="a.jpg"><box xtl="1" ytl="1" xbr="2" ybr="2"/></image>', r"box\[0\] attribute 'label' is missing"),
    ('<image name="a.jpg"><box label="cola" xtl="1" ytl="1" ybr="2"/></image>', "attribute 'xbr' is missing"),
    ('<image name="a.jpg">', 'not well-formed XML'),
])
def test_cvat_malformed(tmp_path, body, expect):
    (tmp_path/'annotations.xml').write_text(CVAT_HEAD + body + ('' if body.endswith('>') and not body.endswith('">') else '') + '</annotations>')
    with pytest.raises(DataError, match=expect): read_cvat(tmp_path)


def test_cvat_refuses_entities_and_reports_unknown_labels(tmp_path):
    (tmp_path/'annotations.xml').write_text('<?xml version="1.0"?><!DOCTYPE a [<!ENTITY l "lol"><!ENTITY l2 "&l;&l;&l;&l;&l;&l;">]>'
                                           '<annotations>&l2;</annotations>')
    with pytest.raises(DataError, match='document type declarations are not allowed'): load_dataset(tmp_path, 'cvat')
    (tmp_path/'annotations.xml').write_text('<?xml version="1.0"?><!DOCTYPE a SYSTEM "file:///etc/passwd"><annotations/>')
    with pytest.raises(DataError, match='document type declarations are not allowed'): load_dataset(tmp_path, 'cvat')
    make_image(tmp_path/'images/a.jpg', (20, 10))
    (tmp_path/'annotations.xml').write_text(CVAT_HEAD + '<image name="a.jpg" width="20" height="10">'
                                           '<box label="cola" xtl="1" ytl="1" xbr="5" ybr="5"/><box label="beer" xtl="1" ytl="1" xbr="5" ybr="5"/>'
                                           '<box label="cola" xtl="15" ytl="1" xbr="25" ybr="5"/><box label="cola" xtl="5" ytl="1" xbr="1" ybr="5"/>'
                                           '</image><image name="b.jpg" width="20" height="10"/></annotations>')
    r = validate_dataset(tmp_path)
    assert r.format == 'cvat'
    assert r.counts == {'box_inverted': 1, 'box_out_of_bounds': 1, 'missing_file': 1, 'unknown_category': 2}, r.counts
    assert any("label 'beer' is not among the labels <meta> declares (cola)" in p.message for p in r.problems)


def test_roboflow_exports(tmp_path):
    # YOLO: data.yaml with ../<split>/images paths and a roboflow: section
    for s in ('train', 'valid', 'test'):
        make_image(tmp_path/'yolo'/s/'images'/f'IMG_1_jpg.rf.{s}0.jpg', (64, 32))
        (tmp_path/'yolo'/s/'labels').mkdir(parents=True)
        (tmp_path/'yolo'/s/'labels'/f'IMG_1_jpg.rf.{s}0.txt').write_text('0 0.5 0.5 0.25 0.5\n')
    (tmp_path/'yolo/data.yaml').write_text("train: ../train/images\nval: ../valid/images\ntest: ../test/images\n\nnc: 1\n"
                                           "names: ['price-tag']\n\nroboflow:\n  workspace: w\n  project: p\n  version: 1\n")
    y = load_dataset(tmp_path/'yolo')
    assert y.info['source_format'] == 'roboflow' and [i.split for i in y.images] == ['train', 'val', 'test']
    assert y.annotations[0].bbox == (24.0, 8.0, 16.0, 16.0) and [c.name for c in y.categories] == ['price-tag']
    # COCO: one _annotations.coco.json per split folder, with Roboflow's project category 0
    cats = [{'id': 0, 'name': 'tags', 'supercategory': 'none'}, {'id': 1, 'name': 'price-tag', 'supercategory': 'tags'}]
    for s in ('train', 'valid'):
        make_image(tmp_path/'coco'/s/'a_jpg.rf.1.jpg', (64, 32))
        (tmp_path/'coco'/s/'_annotations.coco.json').write_text(json.dumps({'categories': cats, 'images': [
            {'id': 0, 'file_name': 'a_jpg.rf.1.jpg', 'width': 64, 'height': 32}], 'annotations': [
            {'id': 0, 'image_id': 0, 'category_id': 1, 'bbox': [1, 2, 3, 4], 'area': 12, 'iscrowd': 0}]}))
    c = load_dataset(tmp_path/'coco')
    assert c.info['source_format'] == 'roboflow' and [(x.id, x.name) for x in c.categories] == [(1, 'price-tag')]
    assert [(i.file_name, i.split) for i in c.images] == [('train/a_jpg.rf.1.jpg', 'train'), ('valid/a_jpg.rf.1.jpg', 'val')]
    assert validate_dataset(tmp_path/'coco').ok
    (tmp_path/'coco/valid/_annotations.coco.json').write_text('{"categories": [], "images": [}')
    with pytest.raises(DataError, match=r'valid/_annotations.coco.json line 1: not valid JSON'): load_dataset(tmp_path/'coco')


def test_tool_writers_refuse_what_they_cannot_hold(tmp_path):
    ds = exact_dataset(tmp_path/'src')
    ds.images[0].width = 0
    for w in (write_labelstudio, write_cvat):
        with pytest.raises(DataError, match='no known size'): w(ds, tmp_path/w.__name__)
    ds.images[0].width = 40
    ds.categories.append(Category(9, 'cola'))
    for w in (write_createml, write_labelstudio, write_cvat):
        with pytest.raises(DataError, match='two categories share a name'): w(ds, tmp_path/f'{w.__name__}2')
    ds.categories.pop(); ds.annotations[0].category_id = 77
    for w in (write_createml, write_labelstudio, write_cvat):  # (Roboflow's COCO, like COCO, keeps it for the validator)
        with pytest.raises(DataError, match='category id 77 is not among the categories'): w(ds, tmp_path/f'{w.__name__}3')
    ds.annotations[0].category_id = 1; ds.images[0].split = 'holdout'
    with pytest.raises(DataError, match="got 'holdout'"): write_createml(ds, tmp_path/'c4')


def test_json_formats_are_told_apart(tmp_path):
    ds = exact_dataset(tmp_path/'src')
    for im in ds.images: im.split = ''
    for fmt in ('coco', 'createml', 'labelstudio'):
        save_dataset(ds, tmp_path/fmt, fmt)
        assert detect_format(tmp_path/fmt) == fmt
    assert detect_format(tmp_path/'labelstudio/tasks.json') == 'labelstudio'
    assert detect_format(tmp_path/'createml/_annotations.createml.json') == 'createml'
    assert detect_format(tmp_path/'coco/annotations.json') == 'coco'
