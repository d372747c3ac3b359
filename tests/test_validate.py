"""validate_dataset: one crafted defect per problem code, reported by code and file; clean data passes; the drop
policy writes a cleaned dataset and a dropped.json that matches the report."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from retail_cv.core import ConfigError, DataError
from retail_cv.data.formats import grocery_sample, load_dataset
from retail_cv.data.validate import PROBLEM_CODES, ValidationReport, check_image_file, validate_dataset


def jpeg(path: Path, size=(64, 48), orientation: int = 1, fmt: str = 'JPEG') -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.effect_noise(size, 50).convert('RGB')  # noise: the file is mostly pixel data, so cutting it truncates pixels
    exif = im.getexif()
    if orientation != 1: exif[0x0112] = orientation
    im.save(path, fmt, exif=exif) if fmt == 'JPEG' else im.save(path, fmt)
    return path


def clean_coco(root: Path) -> dict:
    """Three good images with boxes in a COCO dataset; returns the COCO dict (written to root/annotations.json)."""
    for n in 'abc': jpeg(root/f'img/{n}.jpg')
    coco = {'categories': [{'id': 1, 'name': 'cola'}, {'id': 2, 'name': 'chips'}],
            'images': [{'id': i + 1, 'file_name': f'img/{n}.jpg', 'width': 64, 'height': 48} for i, n in enumerate('abc')],
            'annotations': [{'id': 1, 'image_id': 1, 'category_id': 1, 'bbox': [1, 2, 10.5, 20]},
                            {'id': 2, 'image_id': 2, 'category_id': 2, 'bbox': [0, 0, 64, 48]},
                            {'id': 3, 'image_id': 3, 'category_id': 1, 'bbox': [30.25, 10, 20, 30]}]}
    write(root, coco)
    return coco


def write(root: Path, coco: dict) -> None:
    (root/'annotations.json').write_text(json.dumps(coco))


def image(coco, i): return coco['images'][i]
def ann(coco, i): return coco['annotations'][i]


def _truncate(root, coco):
    p = root/'img/b.jpg'; data = p.read_bytes(); p.write_bytes(data[:len(data) // 2])

def _truncate_png(root, coco):
    p = jpeg(root/'img/b.png', fmt='PNG'); data = p.read_bytes(); p.write_bytes(data[:len(data) // 2])
    image(coco, 1)['file_name'] = 'img/b.png'

def _unreadable(root, coco): (root/'img/b.jpg').write_text('this is not an image')
def _missing(root, coco): (root/'img/b.jpg').unlink()
def _size(root, coco): image(coco, 1)['height'] = 50
def _exif(root, coco):
    jpeg(root/'img/b.jpg', size=(64, 48), orientation=8)  # displayed 48x64, annotated 64x48 = stored size
def _exif_ok(root, coco):
    jpeg(root/'img/b.jpg', size=(48, 64), orientation=6); image(coco, 1).update(width=64, height=48)  # annotated = displayed
def _exif_warn(root, coco): jpeg(root/'img/b.jpg', orientation=3)
def _zero(root, coco): ann(coco, 1)['bbox'] = [5, 5, 0, 10]
def _inverted(root, coco): ann(coco, 1)['bbox'] = [20, 5, -10, 10]
def _nan(root, coco): ann(coco, 1)['bbox'] = [5, float('nan'), 10, 10]
def _inf(root, coco): ann(coco, 1)['bbox'] = [5, 5, float('inf'), 10]
def _oob(root, coco): ann(coco, 1)['bbox'] = [60, 5, 10, 10]
def _oob_neg(root, coco): ann(coco, 1)['bbox'] = [-3, 5, 10, 10]
def _malformed(root, coco): ann(coco, 1)['bbox'] = [5, 5, 10]
def _unknown_cat(root, coco): ann(coco, 1)['category_id'] = 9
def _unknown_img(root, coco): ann(coco, 1)['image_id'] = 99
def _dup_img(root, coco): image(coco, 2)['id'] = 2; ann(coco, 2)['image_id'] = 2
def _dup_ann(root, coco): ann(coco, 2)['id'] = 2
def _dup_cat(root, coco): coco['categories'].append({'id': 2, 'name': 'gum'})
def _absolute(root, coco): image(coco, 1)['file_name'] = str(root/'img/b.jpg')
def _dotdot(root, coco):
    jpeg(root.parent/'outside.jpg'); image(coco, 1)['file_name'] = '../outside.jpg'
def _symlink(root, coco):
    jpeg(root.parent/'secret.jpg'); (root/'img/b.jpg').unlink(); os.symlink(root.parent/'secret.jpg', root/'img/b.jpg')

# (defect, expected code, index of the image whose file the problem names, annotation id or None)
CASES = [
    (_truncate, 'truncated_image', 1, None),
    (_truncate_png, 'truncated_image', 1, None),
    (_unreadable, 'unreadable_image', 1, None),
    (_missing, 'missing_file', 1, None),
    (_size, 'size_mismatch', 1, None),
    (_exif, 'exif_rotated', 1, None),
    (_exif_warn, 'exif_orientation', 1, None),
    (_zero, 'box_zero_area', 1, 2),
    (_inverted, 'box_inverted', 1, 2),
    (_nan, 'box_not_finite', 1, 2),
    (_inf, 'box_not_finite', 1, 2),
    (_oob, 'box_out_of_bounds', 1, 2),
    (_oob_neg, 'box_out_of_bounds', 1, 2),
    (_malformed, 'box_malformed', 1, 2),
    (_unknown_cat, 'unknown_category', 1, 2),
    (_dup_img, 'duplicate_image_id', 2, None),
    (_dup_ann, 'duplicate_annotation_id', 2, 2),
    (_absolute, 'path_escapes_root', 1, None),
    (_dotdot, 'path_escapes_root', 1, None),
    (_symlink, 'path_escapes_root', 1, None),
]


@pytest.mark.parametrize('defect, code, img, ann_id', CASES, ids=[c[0].__name__.strip('_') for c in CASES])
def test_each_defect_is_reported(tmp_path, defect, code, img, ann_id):
    root = tmp_path/'ds'
    coco = clean_coco(root)
    defect(root, coco)
    write(root, coco)
    r = validate_dataset(root)
    assert r.counts == {code: 1 if code != 'duplicate_image_id' else 2}, str(r)
    p = next(p for p in r.problems if p.code == code and p.file == coco['images'][img]['file_name'])
    assert p.scope == PROBLEM_CODES[code][0] and p.message
    assert p.where.startswith('annotations.json: ')
    if ann_id is not None: assert p.annotation_id == ann_id and p.field in ('bbox', 'category_id', 'id')
    if code == 'exif_orientation': assert r.ok and p.severity == 'warning' and r.exit_code == 0
    else: assert not r.ok and r.exit_code == 1


def test_unknown_image_and_duplicate_category(tmp_path):
    root = tmp_path/'ds'; coco = clean_coco(root)
    _unknown_img(root, coco); _dup_cat(root, coco); write(root, coco)
    r = validate_dataset(root)
    assert r.counts == {'duplicate_category_id': 1, 'unknown_image': 1}
    u = next(p for p in r.problems if p.code == 'unknown_image')
    assert (u.file, u.where, u.annotation_id) == ('', 'annotations.json: annotations[1]', 2)
    assert next(p for p in r.problems if p.code == 'duplicate_category_id').where == 'categories[2]'


def test_exif_displayed_size_is_accepted(tmp_path):
    root = tmp_path/'ds'; coco = clean_coco(root)
    _exif_ok(root, coco); write(root, coco)
    assert validate_dataset(root).ok


def test_clean_dataset_and_shipped_sample_are_ok(tmp_path):
    clean_coco(tmp_path/'ds')
    r = validate_dataset(tmp_path/'ds')
    assert r.ok and r.problems == [] and r.exit_code == 0 and (r.n_images, r.n_annotations) == (3, 3)
    assert json.loads(r.to_json())['ok'] is True and 'OK' in str(r)
    s = validate_dataset(grocery_sample(), format='grocery')
    assert s.ok and s.n_images == 91 and s.format == 'grocery', str(s)


def test_reader_findings_become_problems(tmp_path):
    # a YOLO label file whose image is missing
    root = tmp_path/'yolo'
    jpeg(root/'images/train/a.jpg'); (root/'labels/train').mkdir(parents=True)
    (root/'labels/train/a.txt').write_text('0 0.5 0.5 0.2 0.2\n')
    (root/'labels/train/lost.txt').write_text('0 0.5 0.5 0.2 0.2\n')
    (root/'data.yaml').write_text('train: images/train\nnames: [cola]\n')
    r = validate_dataset(root)
    assert r.counts == {'orphan_label': 1} and r.problems[0].file == 'labels/train/lost.txt'
    # a YOLO box past the edge names the label file and line
    (root/'labels/train/lost.txt').unlink()
    (root/'labels/train/a.txt').write_text('0 0.5 0.5 0.2 0.2\n0 0.95 0.5 0.2 0.2\n')
    p = validate_dataset(root).problems[0]
    assert (p.code, p.file, p.where) == ('box_out_of_bounds', 'images/train/a.jpg', 'labels/train/a.txt line 2')
    # a Grocery list line whose coarse class contradicts classes.csv
    g = tmp_path/'g'
    (g/'classes.csv').parent.mkdir()
    (g/'classes.csv').write_text((grocery_sample()/'classes.csv').read_text())
    jpeg(g/'train/x.jpg')
    (g/'train.txt').write_text('train/x.jpg, 0, 5\n')
    r = validate_dataset(g)
    assert r.counts == {'label_mismatch': 1} and (r.problems[0].file, r.problems[0].where) == ('train/x.jpg', 'train.txt line 1')


def test_unparseable_source_is_a_problem_not_a_crash(tmp_path):
    (tmp_path/'annotations.json').write_text('{"images": [}')
    r = validate_dataset(tmp_path)
    assert not r.ok and r.counts == {'unparseable': 1} and 'line 1' in r.problems[0].message and r.exit_code == 1


def test_drop_policy_writes_clean_copy_and_dropped_json(tmp_path):
    root = tmp_path/'ds'; coco = clean_coco(root)
    for n in 'def': jpeg(root/f'img/{n}.jpg')
    coco['images'] += [{'id': 4, 'file_name': 'img/d.jpg', 'width': 64, 'height': 48},
                       {'id': 5, 'file_name': 'img/e.jpg', 'width': 0, 'height': 0},  # size unknown: filled in
                       {'id': 6, 'file_name': 'img/f.jpg', 'width': 64, 'height': 48}]
    coco['annotations'] += [{'id': 4, 'image_id': 4, 'category_id': 1, 'bbox': [1, 1, 5, 5]},
                            {'id': 5, 'image_id': 5, 'category_id': 2, 'bbox': [1, 1, 5, 5]},
                            {'id': 6, 'image_id': 6, 'category_id': 1, 'bbox': [1, 1, 5, 5]}]
    _truncate(root, coco); _oob(root, coco)          # image 2 broken, and its annotation 2 out of bounds
    (root/'img/d.jpg').unlink()                        # image 4 missing, with annotation 4
    ann(coco, 2)['category_id'] = 9                    # annotation 3: unknown category
    _dup_cat(root, coco)                               # category 2 repeated
    write(root, coco)
    out = tmp_path/'clean'
    r = validate_dataset(root, policy='drop', out=out, images='copy')
    assert not r.ok and r.out == out and r.exit_code == 0
    dropped = json.loads((out/'dropped.json').read_text())
    # every image-scope error is a dropped image entry with that reason, and nothing else was dropped
    img_errors = {(p.image_id, p.code) for p in r.errors if p.scope == 'image'}
    assert {(d['id'], q['code']) for d in dropped['images'] for q in d['problems']} == img_errors == {(2, 'truncated_image'), (4, 'missing_file')}
    ann_errors = {(p.annotation_id, p.code) for p in r.errors if p.scope == 'annotation'}
    own = {(d['id'], q['code']) for d in dropped['annotations'] for q in d['problems'] if q['code'] != 'image_dropped'}
    assert own == ann_errors == {(2, 'box_out_of_bounds'), (3, 'unknown_category')}
    assert {d['id'] for d in dropped['annotations'] if any(q['code'] == 'image_dropped' for q in d['problems'])} == {2, 4}
    assert [d['problems'][0]['code'] for d in dropped['categories']] == ['duplicate_category_id']
    assert r.dropped == {'images': 2, 'annotations': 3, 'categories': 1, 'files': 0}
    assert r.kept == {'images': 4, 'annotations': 3}
    clean = load_dataset(out)
    assert sorted(i.file_name for i in clean.images) == ['img/a.jpg', 'img/c.jpg', 'img/e.jpg', 'img/f.jpg']
    assert next(i for i in clean.images if i.id == 5).width == 64
    assert [c.name for c in clean.categories] == ['cola', 'chips']
    again = validate_dataset(out)
    assert again.ok, str(again)
    assert (root/'img/b.jpg').exists()  # the source is untouched


def test_drop_needs_an_empty_out_and_policy_is_checked(tmp_path):
    clean_coco(tmp_path/'ds')
    with pytest.raises(ConfigError, match='needs out='): validate_dataset(tmp_path/'ds', policy='drop')
    with pytest.raises(ConfigError, match="'fail' or 'drop'"): validate_dataset(tmp_path/'ds', policy='fix')
    with pytest.raises(DataError, match='not empty'): validate_dataset(tmp_path/'ds', policy='drop', out=tmp_path/'ds')


def test_report_renders(tmp_path):
    root = tmp_path/'ds'; coco = clean_coco(root); _oob(root, coco); write(root, coco)
    r = validate_dataset(root)
    text = str(r)
    assert 'box_out_of_bounds  1' in text and 'img/b.jpg' in text
    from rich.console import Console
    con = Console(record=True, width=200); con.print(r)
    assert 'box_out_of_bounds' in con.export_text()
    assert ValidationReport('x', 'coco', 'fail', 0, 0).ok


def test_check_image_file_on_missing(tmp_path):
    assert check_image_file(tmp_path/'nope.jpg')[0] == 'missing_file'


def test_boxes_of_an_undecodable_yolo_image_go_with_it(tmp_path):
    root = tmp_path/'yolo'
    jpeg(root/'images/a.jpg'); (root/'images/b.jpg').write_bytes(b'\xff\xd8 not really a jpeg')
    (root/'labels').mkdir()
    for n in 'ab': (root/f'labels/{n}.txt').write_text('0 0.5 0.5 0.2 0.2\n')
    (root/'classes.txt').write_text('cola\n')
    r = validate_dataset(root, policy='drop', out=tmp_path/'out')
    assert r.counts == {'unreadable_image': 1} and r.problems[0].file == 'images/b.jpg'
    dropped = json.loads((tmp_path/'out/dropped.json').read_text())
    assert [q['code'] for d in dropped['annotations'] for q in d['problems']] == ['image_dropped']
    assert r.kept == {'images': 1, 'annotations': 1}


def test_drop_duplicate_image_ids_lists_each_record(tmp_path):
    root = tmp_path/'ds'; coco = clean_coco(root); _dup_img(root, coco); write(root, coco)
    r = validate_dataset(root, policy='drop', out=tmp_path/'out')
    dropped = json.loads((tmp_path/'out/dropped.json').read_text())
    assert [(d['id'], d['file_name'], d['where']) for d in dropped['images']] == \
           [(2, 'img/b.jpg', 'annotations.json: images[1]'), (2, 'img/c.jpg', 'annotations.json: images[2]')]
    assert sorted(d['id'] for d in dropped['annotations']) == [2, 3] and r.kept == {'images': 1, 'annotations': 1}


def test_declared_sizes_and_field_ranges_are_checked(tmp_path):
    "A negative declared width is checked against the file; out-of-range ids, iscrowd and names are errors that drop their record."
    root = tmp_path/'ds'; coco = clean_coco(root)
    image(coco, 1)['width'] = -1                      # the file is 64 px wide
    coco['categories'].append({'id': 3, 'name': ' '})  # an empty name
    ann(coco, 0)['iscrowd'] = 2
    coco['annotations'].append({'id': 4, 'image_id': 3, 'category_id': 3, 'bbox': [1, 1, 5, 5]})
    write(root, coco)
    r = validate_dataset(root, policy='drop', out=tmp_path/'clean')
    assert r.counts == {'invalid_annotation_field': 1, 'invalid_category_field': 1, 'invalid_image_field': 1, 'unknown_category': 1}, str(r)
    w = next(p for p in r.problems if p.code == 'invalid_image_field')
    assert (w.file, w.field, w.image_id) == ('img/b.jpg', 'width/height', 2) and w.message == 'declared size -1x48 is negative; the image is 64x48'
    c = next(p for p in r.problems if p.code == 'invalid_category_field')
    assert (c.where, c.field, c.message) == ('categories[2]', 'name', 'category id 3 has an empty name')
    i = next(p for p in r.problems if p.code == 'invalid_annotation_field')
    assert (i.annotation_id, i.field, i.message) == (1, 'iscrowd', 'iscrowd is 2, expected 0 or 1')
    assert r.kept == {'images': 2, 'annotations': 1} and r.dropped['categories'] == 1
    clean = load_dataset(tmp_path/'clean')
    assert [c.id for c in clean.categories] == [1, 2] and [a.id for a in clean.annotations] == [3]


@pytest.mark.parametrize('where, field, value, message', [
    ('categories', 'name', None, r"categories\[0\] \(id 1\) field 'name' must be a string, got null"),
    ('images', 'width', '64', r"images\[1\] \(id 2\) field 'width' must be an integer, got '64'"),
    ('images', 'file_name', 7, r"images\[1\] \(id 2\) field 'file_name' must be a string, got 7"),
    ('annotations', 'bbox', [0, 0, '5', 5], r"annotations\[1\] \(id 2, image id 2\) field 'bbox' must be a list of numbers"),
    ('annotations', 'area', 'big', r"annotations\[1\] \(id 2, image id 2\) field 'area' must be a number, got 'big'"),
    ('annotations', 'category_id', True, r"annotations\[1\] \(id 2, image id 2\) field 'category_id' must be an integer, got True"),
])
def test_field_types_are_checked(tmp_path, where, field, value, message):
    "A field of the wrong JSON type makes the file unparseable, naming the record by position and by id."
    root = tmp_path/'ds'; coco = clean_coco(root)
    coco[where][0 if where == 'categories' else 1][field] = value
    write(root, coco)
    with pytest.raises(DataError, match=message): load_dataset(root)
    r = validate_dataset(root)
    assert r.counts == {'unparseable': 1} and r.exit_code == 1


def test_bad_annotation_is_located_by_index_and_ids(tmp_path):
    "Table rows and str() give an annotation's array index, its id and its image's id."
    root = tmp_path/'ds'; coco = clean_coco(root)
    ann(coco, 2)['id'] = 30; ann(coco, 2)['bbox'] = [60, 5, 10, 10]
    write(root, coco)
    (p,) = validate_dataset(root).problems
    assert p.location == 'annotations.json: annotations[2] (id 30, image id 3)'
    assert str(p).startswith('error box_out_of_bounds: img/c.jpg, annotations.json: annotations[2] (id 30, image id 3): ')
    from rich.console import Console
    con = Console(width=400, record=True); con.print(validate_dataset(root).rich_table())
    assert 'annotations.json: annotations[2] (id 30, image id 3)' in con.export_text()


def test_declared_sizes_of_every_detection_format_are_checked(tmp_path):
    "SKU-110K and VOC declare image sizes too: a negative one is reported against the file, and so is an empty class name."
    sku = tmp_path/'sku'; jpeg(sku/'images/a.jpg')
    (sku/'annotations').mkdir(); (sku/'annotations/annotations_val.csv').write_text('a.jpg,1,1,9,9,,-64,48\n')
    r = validate_dataset(sku)
    assert r.counts == {'invalid_category_field': 1, 'invalid_image_field': 1, 'unknown_category': 1}, str(r)
    assert next(p for p in r.problems if p.code == 'invalid_image_field').message == 'declared size -64x48 is negative; the image is 64x48'
    voc = tmp_path/'voc'; jpeg(voc/'JPEGImages/a.jpg'); (voc/'Annotations').mkdir()
    (voc/'Annotations/a.xml').write_text('<annotation><filename>a.jpg</filename><size><width>64</width><height>-1</height></size>'
                                          '<object><name>cola</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>9</xmax><ymax>9</ymax></bndbox></object></annotation>')
    r = validate_dataset(voc)
    assert r.counts == {'invalid_image_field': 1} and r.problems[0].location == 'Annotations/a.xml (image id 1)', str(r)
