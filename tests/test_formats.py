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
