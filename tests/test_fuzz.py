"""Fuzzed parsers: whatever bytes arrive, a reader returns a dataset (or a verified bundle) or raises a retail_cv error.

Dataset formats, validation and bundle archives, plus (through their public functions only) job parameters (the
notebook's parameters cell, a YAML file, `key=value` pairs, `$RETAIL_CV_PARAM_*`), pipeline files and device profiles.
Inputs are drawn mostly well-formed with wrong values (three draws in four), so that the checks behind the first
parse run too, and otherwise as junk.

Each target writes one drawn input to a fresh folder and parses it. Anything but a `RetailCVError` escaping is a bug.
50 cases per target run in the normal suite (derandomized, so CI is reproducible); `-m slow` runs 10,000 per target
with fresh randomness. `bench/bench_fuzz.py` runs the same targets under `coverage` and writes bench/results/fuzz.json.
"""
from __future__ import annotations

import csv
import datetime
import io
import json
import shutil
import tarfile
import tempfile
from collections import Counter
from pathlib import Path
from xml.sax.saxutils import escape

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from retail_cv.core import DataError, RetailCVError

NORMAL, SLOW = 50, 10_000
OUTCOMES: dict[str, Counter] = {}  # target -> Counter({'parsed': n, 'refused': n, 'escaped': n}), read by bench/bench_fuzz.py
COUNT_ESCAPES = False  # bench/bench_fuzz.py: count a non-retail_cv error as 'escaped' and go on, instead of failing the run
ESCAPES: dict[str, list[str]] = {}  # target -> the first escaped errors, when COUNT_ESCAPES

# ---- building blocks ----------------------------------------------------------------------------------------------

def _png(size=(8, 6)) -> bytes:
    b = io.BytesIO(); Image.new('RGB', size, (200, 30, 30)).save(b, 'PNG'); return b.getvalue()

PNG = _png()
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64), st.floats(), st.text(max_size=10))
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=10)
SMALL_INT = st.integers(-3, 12)
NUMBER = st.one_of(st.integers(-20, 100), st.floats(-20, 100), st.sampled_from([float('nan'), float('inf'), -0.0, 1e308]))
NUMBERISH = st.one_of(NUMBER, SCALARS)
# text for fields of line formats: numbers written many ways, and junk; never '/' (a drawn absolute path could
# make a reader list the whole file system, which is the config's right, not a parser bug)
TOKEN = st.one_of(NUMBER.map(str), st.sampled_from(['nan', '-inf', '1e309', '0x10', '1_0', '', ' ', '\u0660', '٣', '-0', '+1']),
                  st.text(alphabet=st.characters(blacklist_characters='/\\', blacklist_categories=('Cs',)), max_size=8))
NAME = st.one_of(st.sampled_from(['a.png', 'b.png', 'missing.png', '../x.png', '', 'a\x00b.png', 'sub/../a.png', '.']), TOKEN)
IMAGE_BYTES = st.one_of(st.just(PNG), st.binary(max_size=64), st.binary(max_size=64).map(lambda b: PNG[:24] + b),
                        st.integers(0, len(PNG)).map(lambda n: PNG[:n]))


def _run(target: str, parse) -> None:
    "Call `parse()`; count the outcome. Only retail_cv errors may escape it (`COUNT_ESCAPES`: count the others and go on)."
    try: parse()
    except RetailCVError: OUTCOMES.setdefault(target, Counter())['refused'] += 1
    except Exception as e:
        if not COUNT_ESCAPES: raise
        OUTCOMES.setdefault(target, Counter())['escaped'] += 1
        if len(seen := ESCAPES.setdefault(target, [])) < 10: seen.append(f"{type(e).__module__}.{type(e).__name__}: {str(e)[:300]}")
    else: OUTCOMES.setdefault(target, Counter())['parsed'] += 1


class _Folder:
    "A fresh empty folder per example (`root` = <tmp>/ex/ds, so a drawn '..' stays inside <tmp>)."
    def __enter__(self) -> Path:
        self.base = Path(tempfile.mkdtemp(prefix='fuzz-'))
        (root := self.base/'ex'/'ds').mkdir(parents=True)
        return root
    def __exit__(self, *exc): shutil.rmtree(self.base, ignore_errors=True)


def _write(root: Path, files: dict[str, bytes | str]) -> None:
    for rel, data in files.items():
        p = root/rel; p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data if isinstance(data, bytes) else data.encode('utf-8', 'surrogatepass'))


def _lines(field: st.SearchStrategy, sep: str, n: tuple[int, int]) -> st.SearchStrategy[str]:
    "Text of lines, each `n` fields of `field` joined by `sep`, or a junk line."
    line = st.lists(field, min_size=n[0], max_size=n[1]).map(sep.join) | st.text(max_size=20)
    return st.lists(line, max_size=6).map('\n'.join)

# ---- COCO (through the validator, which reads it with load_dataset) -------------------------------------------------

def _mostly(valid: st.SearchStrategy, junk: st.SearchStrategy) -> st.SearchStrategy:
    "Three in four draws from `valid` (so that parsing gets deep), the rest from `junk`."
    return st.integers(0, 3).flatmap(lambda i: junk if i == 3 else valid)  # one_of(valid, valid, valid, junk) dedupes to 1 in 2

def _records(valid: st.SearchStrategy, fields: dict) -> st.SearchStrategy:
    "A list of COCO records, mostly well-typed, some with any JSON in their fields; or any JSON instead of the list."
    return _mostly(st.lists(_mostly(valid, st.fixed_dictionaries({}, optional=fields) | JSON), max_size=4), JSON)

SIZE = st.sampled_from([8, 6, 0, -1, 64, 6.0])
CATEGORY = st.fixed_dictionaries({'id': SMALL_INT, 'name': st.sampled_from(['cola', 'gap', '', ' '])},
                                 optional={'supercategory': st.sampled_from(['drink', None])})
IMAGE = st.fixed_dictionaries({'id': SMALL_INT, 'file_name': st.sampled_from(['a.png', 'b.png', 'missing.png', '../x.png', '/abs.png'])},
                              optional={'width': SIZE, 'height': SIZE, 'split': st.sampled_from(['train', 'val', None])})
ANNOTATION = st.fixed_dictionaries({'id': SMALL_INT, 'image_id': SMALL_INT, 'category_id': SMALL_INT},
                                   optional={'bbox': st.lists(NUMBER, min_size=4, max_size=4) | st.lists(NUMBER, max_size=5),
                                             'area': NUMBER, 'iscrowd': st.sampled_from([0, 1, 2]), 'attributes': st.just({'k': 1})})
COCO_FIELDS = dict(
    categories=_records(CATEGORY, {'id': SMALL_INT | SCALARS, 'name': TOKEN | SCALARS, 'supercategory': SCALARS}),
    images=_records(IMAGE, {'id': SMALL_INT | SCALARS, 'file_name': NAME | SCALARS, 'width': NUMBERISH, 'height': NUMBERISH,
                               'split': st.sampled_from(['train', 'val', 'test', 'x']) | SCALARS}),
    annotations=_records(ANNOTATION, {'id': SMALL_INT | SCALARS, 'image_id': SMALL_INT | SCALARS, 'category_id': SMALL_INT | SCALARS,
                                         'bbox': st.lists(NUMBER, max_size=5) | NUMBERISH | JSON, 'area': NUMBERISH,
                                         'iscrowd': SMALL_INT | SCALARS, 'attributes': JSON}))
COCO = _mostly(st.fixed_dictionaries(COCO_FIELDS, optional={'info': _mostly(st.just({'task': 'detection'}), JSON)}),
               st.fixed_dictionaries({}, optional={**COCO_FIELDS, 'info': JSON}))


def fuzz_coco(data: tuple) -> None:
    coco, raw, image, drop = data
    from retail_cv.data.validate import validate_dataset
    with _Folder() as root:
        _write(root, {'annotations.json': raw if raw is not None else json.dumps(coco), 'a.png': PNG, 'b.png': image})
        def parse():
            r = validate_dataset(root, 'coco', workers=1, **({'policy': 'drop', 'out': root.parent/'clean'} if drop else {}))
            if 'unparseable' in r.counts: raise DataError(r.problems[0].message)  # the validator reports what load_dataset raised
        _run('coco', parse)

COCO_INPUT = st.tuples(COCO, _mostly(st.none(), st.binary(max_size=80)), IMAGE_BYTES, st.booleans())

# ---- YOLO ---------------------------------------------------------------------------------------------------------

ENTRY = st.one_of(st.sampled_from(['images', 'images/train', 'images/val', 'list.txt', 'missing', '..', '', '.', 'a\x00b',
                                   'images/../images', 'data.yaml']), TOKEN)
YOLO_CFG = _mostly(st.fixed_dictionaries({'names': st.sampled_from([['cola', 'gap'], {0: 'cola', 1: 'gap'}, ['cola']]),
                                         'train': st.sampled_from(['images/train', ['images/train', 'list.txt']]), 'val': st.just('images/val')},
                                        optional={'path': st.sampled_from(['.', 'missing']), 'test': ENTRY}),
                   st.fixed_dictionaries({}, optional={
    'names': st.lists(TOKEN | SCALARS, max_size=4) | st.dictionaries(SMALL_INT | TOKEN, TOKEN | SCALARS, max_size=4) | JSON,
    'path': ENTRY | SCALARS, 'train': ENTRY | st.lists(ENTRY, max_size=2) | SCALARS, 'val': ENTRY | SCALARS, 'test': ENTRY}))
YOLO_LINE = st.tuples(st.sampled_from(['0', '1', '7', '-1', '1.0', '1.5', 'x', 'nan']) | TOKEN,
                      st.lists(st.floats(-0.5, 1.5).map(str) | TOKEN, max_size=8)).map(lambda t: ' '.join([t[0], *t[1]]))
VALID_YOLO_LINE = st.tuples(st.sampled_from(['0', '1', '2']), st.lists(st.floats(-0.1, 1.1).map(str), min_size=4, max_size=4)).map(lambda t: ' '.join([t[0], *t[1]]))
YOLO_LABELS = _mostly(st.lists(_mostly(VALID_YOLO_LINE, YOLO_LINE | st.text(max_size=20)), max_size=5).map('\n'.join), st.binary(max_size=40))


def fuzz_yolo(data: tuple) -> None:
    cfg, raw_cfg, classes_txt, labels, listing, image = data
    from retail_cv.data.formats import read_yolo, write_yolo
    files = {'images/train/a.png': PNG, 'images/train/b.png': image, 'images/val/c.png': PNG,
             'labels/train/a.txt': labels[0], 'labels/train/b.txt': labels[1], 'labels/val/c.txt': labels[2],
             'labels/train/orphan.txt': '0 0.5 0.5 0.1 0.1', 'list.txt': listing}
    if classes_txt is not None: files['classes.txt'] = classes_txt
    else: files['data.yaml'] = raw_cfg if raw_cfg is not None else yaml.safe_dump(cfg, allow_unicode=True)
    with _Folder() as root:
        _write(root, files)
        def parse():
            ds = read_yolo(root)
            write_yolo(ds, root.parent/'out')  # what was read can be written back, or is refused by name
        _run('yolo', parse)

YOLO_INPUT = st.tuples(YOLO_CFG, _mostly(st.none(), st.text(alphabet=st.characters(blacklist_characters='/\\'), max_size=60)),
                       _mostly(st.none(), st.text(max_size=30)), st.tuples(YOLO_LABELS, YOLO_LABELS, YOLO_LABELS),
                       _lines(NAME.map(lambda n: f'./images/train/{n}') | NAME, '', (1, 1)), IMAGE_BYTES)

# ---- VOC ----------------------------------------------------------------------------------------------------------

def _el(tag: str, inner: str | None) -> str: return '' if inner is None else f'<{tag}>{inner}</{tag}>'
GOOD = st.sampled_from(['a.png', '10', '1', '20', '5.5', 'cola', 'gap'])
XTEXT = (GOOD | GOOD | NUMBER.map(str) | TOKEN | st.sampled_from(['10', '1', '0', '-5', '1e400', '&amp;', '<x/>'])).map(lambda s: s if s.startswith(('&', '<')) else escape(s))
OPT = st.none() | XTEXT
BNDBOX = st.tuples(OPT, OPT, OPT, OPT).map(lambda t: ''.join(_el(k, v) for k, v in zip(('xmin', 'ymin', 'xmax', 'ymax'), t)))
OBJECT = st.tuples(OPT, st.none() | BNDBOX, OPT, OPT, OPT).map(
    lambda t: '<object>' + _el('name', t[0]) + _el('bndbox', t[1]) + _el('difficult', t[2]) + _el('truncated', t[3]) + _el('pose', t[4]) + '</object>')
VALID_OBJECT = st.tuples(st.sampled_from(['cola', 'gap']), st.tuples(*[NUMBER.map(str)] * 4), st.sampled_from(['', '<difficult>1</difficult>', '<pose>Left</pose>'])).map(
    lambda t: f"<object><name>{t[0]}</name><bndbox>{''.join(_el(k, v) for k, v in zip(('xmin', 'ymin', 'xmax', 'ymax'), t[1]))}</bndbox>{t[2]}</object>")
VALID_DOC = st.tuples(st.sampled_from(['a.png', 'b.png']), st.sampled_from(['', '<size><width>8</width><height>6</height></size>']),
                      st.lists(VALID_OBJECT, max_size=3)).map(lambda t: f"<annotation><filename>{t[0]}</filename>{t[1]}{''.join(t[2])}</annotation>")
JUNK_DOC = st.tuples(st.sampled_from(['annotation', 'annotation', 'other']), OPT, st.none() | st.tuples(OPT, OPT), st.lists(OBJECT, max_size=3)).map(
    lambda t: f"<{t[0]}>{_el('filename', t[1])}{'' if t[2] is None else _el('size', _el('width', t[2][0]) + _el('height', t[2][1]))}{''.join(t[3])}</{t[0]}>")
VOC_DOC = _mostly(VALID_DOC, JUNK_DOC)
LAUGHS = ('<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">'
          '<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>')
DOCTYPES = st.sampled_from([LAUGHS, '<!doctype x>', '<! ENTITY x "y">', '<!DOCTYPE x SYSTEM "file:///etc/passwd">'])


def fuzz_voc(data: tuple) -> None:
    doc, raw, doctype, encoding, split_list, classes, one_based = data
    from retail_cv.data.formats import read_voc, write_voc
    text = (f'<?xml version="1.0" encoding="{encoding}"?>' if encoding else '') + (doctype or '') + doc
    xml = raw if raw is not None else text.encode(encoding or 'utf-8', 'surrogatepass')
    with _Folder() as root:
        _write(root, {'Annotations/a.xml': xml, 'Annotations/sub/b.xml': '<annotation><filename>c.png</filename></annotation>', 'JPEGImages/c.png': PNG,
                      'JPEGImages/a.png': PNG, 'JPEGImages/b.png': PNG, 'ImageSets/Main/train.txt': split_list, 'ImageSets/Main/val.txt': 'sub/b\n',
                      'classes.txt': classes})
        if doctype and raw is None:  # a document type declaration is refused however it is encoded: no entity is ever expanded
            with pytest.raises(DataError) as e: read_voc(root)
            if doctype == LAUGHS and encoding in (None, 'utf-8', 'utf-16') and 'a.xml' in str(e.value):  # refused for what it is
                assert 'document type declarations are not allowed' in str(e.value), str(e.value)
            OUTCOMES.setdefault('voc', Counter())['refused'] += 1
            return
        def parse():
            ds = read_voc(root, one_based=one_based)
            write_voc(ds, root.parent/'out')
        _run('voc', parse)

VOC_INPUT = st.tuples(VOC_DOC, _mostly(st.none(), st.binary(max_size=60)), _mostly(st.none(), DOCTYPES), _mostly(st.none(), st.sampled_from(['utf-8', 'utf-16', 'utf-16-be'])),
                      _lines(st.sampled_from(['a', 'c', '']) | TOKEN, ' ', (1, 2)), st.text(max_size=20), st.booleans())

# ---- SKU-110K -----------------------------------------------------------------------------------------------------

def _csv(rows: list[list[str]]) -> str:
    b = io.StringIO(); csv.writer(b).writerows(rows); return b.getvalue()

SKU_ROW = st.tuples(NAME, NUMBER.map(str) | TOKEN, NUMBER.map(str) | TOKEN, NUMBER.map(str) | TOKEN, NUMBER.map(str) | TOKEN,
                    st.sampled_from(['object', 'gap', '']) | TOKEN, st.sampled_from(['8', '64', '0', '-1', '8.0', '8.5']) | TOKEN,
                    st.sampled_from(['6', '48', '0']) | TOKEN).map(list)
SKU_ROWS = st.lists(SKU_ROW | st.lists(TOKEN, max_size=9), max_size=6)


def fuzz_sku110k(data: tuple) -> None:
    rows, header, raw = data
    from retail_cv.data.formats import read_sku110k
    head = [['image_name', 'x1', 'y1', 'x2', 'y2', 'class', 'image_width', 'image_height']] if header else []
    with _Folder() as root:
        _write(root, {'annotations/annotations_train.csv': raw if raw is not None else _csv(head + rows), 'images/a.png': PNG})
        _run('sku110k', lambda: read_sku110k(root))

SKU_INPUT = st.tuples(SKU_ROWS, st.booleans(), st.none() | st.binary(max_size=60))

# ---- Grocery lists ------------------------------------------------------------------------------------------------

GROCERY_HEADER = ['Class Name (str)', 'Class ID (int)', 'Coarse Class Name (str)', 'Coarse Class ID (int)',
                  'Iconic Image Path (str)', 'Product Description Path (str)']
ID = st.one_of(SMALL_INT.map(str), SMALL_INT.map(str), SMALL_INT.map(str), TOKEN)
GROCERY_CLASS = _mostly(st.tuples(st.sampled_from(['Cola', 'Gap', '']), SMALL_INT.map(str), st.sampled_from(['Drink', '']), SMALL_INT.map(str), st.just(''), st.just('')),
                        st.tuples(TOKEN, ID, TOKEN, ID, TOKEN, TOKEN)).map(list)
GROCERY_LINE = _mostly(st.tuples(st.sampled_from(['a.png', 'b.png', '/a.png']), SMALL_INT.map(str), SMALL_INT.map(str)), st.tuples(NAME, ID, ID)).map(', '.join) | st.text(max_size=20)


def fuzz_grocery(data: tuple) -> None:
    classes, header, lines, raw = data
    from retail_cv.data.formats import read_grocery
    with _Folder() as root:
        _write(root, {'classes.csv': raw if raw is not None else _csv(([GROCERY_HEADER] if header else []) + classes),
                      'train.txt': '\n'.join(lines), 'a.png': PNG})
        _run('grocery', lambda: read_grocery(root))

GROCERY_INPUT = st.tuples(st.lists(_mostly(GROCERY_CLASS, st.lists(TOKEN, max_size=7)), max_size=4), _mostly(st.just(True), st.just(False)),
                          st.lists(GROCERY_LINE, max_size=5), _mostly(st.none(), st.binary(max_size=60)))

# ---- bundle archives and folders ----------------------------------------------------------------------------------

_BUNDLE: dict = {}

def good_bundle() -> dict:
    "A signed bundle of a tiny classifier (folder and tar), its key, and its files; built once per process."
    if _BUNDLE: return _BUNDLE
    import numpy as np
    from retail_cv.bundle import build_bundle, generate_signing_key
    from retail_cv.core import Workspace
    from retail_cv.models import tiny_classifier, to_onnx
    root = Path(tempfile.mkdtemp(prefix='fuzz-bundle-'))
    import atexit; atexit.register(shutil.rmtree, root, True)
    ws = Workspace.open(root/'ws'); key = generate_signing_key(ws)
    clf = tiny_classifier(2, image_size=16)
    golden = [np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)]
    kw = dict(name='fuzz', version='1.0', labels=['a', 'b'], contract=clf.contract(), golden_images=golden, workspace=ws,
              created_at='2025-01-01T00:00:00+00:00')
    onnx = to_onnx(clf, root/'m.onnx')
    folder, tar = build_bundle(root/'good', onnx, **kw), build_bundle(root/'good.tar', onnx, **kw)
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob('*') if p.is_file()}
    _BUNDLE.update(root=root, folder=folder, tar=tar, tar_bytes=tar.read_bytes(), key=load_key(ws), files=files)
    return _BUNDLE

def load_key(ws):
    from retail_cv.bundle import load_signing_key
    return load_signing_key(None, ws)

MEMBER_NAMES = st.sampled_from(['MANIFEST.json', 'signature.sig', 'bundle.json', 'model.onnx', 'model_card.md', 'model_card.html',
                                'golden/000.png', 'golden/expected.npz', '../evil', '/abs', 'a/../../b', 'C:x', 'a\\b', './bundle.json',
                                '', '.', 'golden', 'golden/', './']) | TOKEN
MEMBER = st.tuples(MEMBER_NAMES, st.sampled_from([tarfile.REGTYPE, tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE,
                                                  tarfile.CHRTYPE, tarfile.FIFOTYPE, b'7', b'x']), st.none() | st.binary(max_size=30))
JSON_EDIT = st.lists(st.tuples(st.text(max_size=12) | st.sampled_from(['format_version', 'files', 'name', 'task', 'labels', 'contract',
                                                                    'golden', 'opset', 'min_ort_version', 'key_id', 'signature', 'algorithm']),
                               st.none() | JSON), max_size=3)


def _edit(obj, edits):
    "`obj` with drawn top-level keys replaced (None deletes them)."
    if not isinstance(obj, dict): return obj
    obj = dict(obj)
    for k, v in edits:
        if v is None: obj.pop(k, None)
        else: obj[k] = v
    return obj


def fuzz_bundle(data: tuple) -> None:
    mode, flips, cut, members, meta_edits, manifest_edits, use_tar = data
    from retail_cv.bundle import sign_bundle, verify_bundle
    b = good_bundle()
    with _Folder() as root:
        path = root.parent/'b.tar'
        if mode == 'bytes':  # the good archive with bytes changed and maybe cut short
            raw = bytearray(b['tar_bytes'])
            for off, val in flips: raw[off % len(raw)] = val
            path.write_bytes(bytes(raw[:cut]) if cut is not None else bytes(raw))
        elif mode == 'members':  # the good archive's files plus drawn members
            with tarfile.open(path, 'w') as t:
                for name, typ, data_ in [(n, tarfile.REGTYPE, d) for n, d in b['files'].items()] + members:
                    ti = tarfile.TarInfo(name); ti.type = typ
                    payload = data_ if data_ is not None else b['files'].get(name, b'')
                    if typ in (tarfile.SYMTYPE, tarfile.LNKTYPE): ti.linkname = '../outside'
                    if typ == tarfile.REGTYPE: ti.size = len(payload)
                    t.addfile(ti, io.BytesIO(payload) if typ == tarfile.REGTYPE else None)
        else:  # 'signed': drawn bundle.json and MANIFEST.json content, signed with the trusted key
            path = root/'bundle'
            shutil.copytree(b['folder'], path)
            meta = _edit(json.loads(b['files']['bundle.json']), meta_edits)
            (path/'bundle.json').write_text(json.dumps(meta))
            sign_bundle(path, b['key'])
            if manifest_edits:
                manifest = json.dumps(_edit(json.loads((path/'MANIFEST.json').read_bytes()), manifest_edits)).encode()
                (path/'MANIFEST.json').write_bytes(manifest)
                sign = json.loads((path/'signature.sig').read_bytes())
                import base64
                sign['signature'] = base64.b64encode(b['key'].sign(manifest)).decode()
                (path/'signature.sig').write_text(json.dumps(sign))
            if use_tar:
                tar = root.parent/'signed.tar'
                with tarfile.open(tar, 'w') as t: t.add(path, arcname='.')
                path = tar
        def parse():
            info = verify_bundle(path, [b['key'].public_key()])
            info.golden()
        _run('bundle', parse)

BUNDLE_INPUT = st.tuples(st.sampled_from(['bytes', 'members', 'signed']), st.lists(st.tuples(st.integers(0, 2**20), st.integers(0, 255)), max_size=4),
                         st.none() | st.integers(0, 40_000), st.lists(MEMBER, max_size=3), JSON_EDIT, JSON_EDIT, st.booleans())

# ---- job parameters, pipeline and profile YAML: drawn mostly well-formed with wrong values, so the checks run -----------

JOBS = Path(__file__).resolve().parents[1]/'nbs'/'jobs'
PARAM_NAMES = ['epochs', 'lr', 'data', 'opts', 'tags', 'flag', 'x']
ANNOTATION = st.sampled_from(['', 'int', 'float', 'str', 'bool', 'dict', 'list', 'None', 'Any', 'Optional[str]', 'int | None',
                              'dict | str', 'float | int', 'List[int]', 'x.y', "'int'"])
DEFAULT = st.sampled_from(['1', '0.5', "'x'", 'True', 'None', '[1, 2]', '{}', '(1, 2)', 'f()', 'os.getcwd()', '-3', "{'a': 1}",
                           "b'x'", '{[]: 1}', '{1, (2, [3])}', '1 + 2j', '...'])
STATEMENT = st.sampled_from(['import os', 'a, b = 1, 2', 'x.y = 1', 'x[0] = 1', 'def (', '"""doc"""', 'for', 'x = (', '    y = 1',
                             '# a comment', 'x = 1 if y else 2', 'a = b = 1', '\x00'])


def _declaration(t: tuple) -> str:
    name, ann, default, comment = t
    return name + (f': {ann}' if ann else '') + (f' = {default}' if default is not None else '') + comment

PARAMETERS_CELL = st.lists(_mostly(st.tuples(st.sampled_from(PARAM_NAMES), ANNOTATION, st.none() | DEFAULT,
                                             st.sampled_from(['', '  # the help'])).map(_declaration), STATEMENT), max_size=6).map('\n'.join)


def _notebook(t: tuple) -> str:
    "A job notebook: `tagged` cells tagged 'parameters' holding `source` (as one string or a list of lines), then one more cell."
    source, tagged, as_list = t
    cell = lambda tags: {'cell_type': 'code', 'metadata': {'tags': tags}, 'outputs': [], 'execution_count': None,
                         'source': source.splitlines(keepends=True) if as_list else source}
    return json.dumps({'cells': [cell(['parameters']) for _ in range(tagged)] + [cell([])], 'metadata': {}, 'nbformat': 4, 'nbformat_minor': 5})

NOT_A_NOTEBOOK = st.one_of(st.binary(max_size=40), JSON.map(json.dumps), st.sampled_from([
    '{"cells": 5}', '{"cells": [1]}', '{"cells": [{"metadata": 1}]}', '{"cells": [{"metadata": {"tags": "parameters"}}]}',
    '{"cells": [{"metadata": {"tags": ["parameters"]}, "source": 5}]}', '{"cells": [{"metadata": {"tags": ["parameters"]}, "source": [1]}]}',
    '{"cells": [{"metadata": {"tags": ["parameters"]}}]}', '{"cells": [{"metadata": {"tags": [["parameters"]]}}]}',
    '{"cells": [{"metadata": {"tags": 7}}]}']))
NOTEBOOK = _mostly(st.tuples(PARAMETERS_CELL, st.sampled_from([1, 1, 1, 0, 2]), st.booleans()).map(_notebook), NOT_A_NOTEBOOK)
VALUE_TEXT = st.sampled_from(['3', '0.5', 'true', 'x', '{a: 1}', '[1, 2]', '2020-01-01', '{a: [', 'null', '', '1e3', "'3'",
                              '!!python/name:os.system', '*a', '&a [*a]']) | TOKEN
VALUE = st.sampled_from([1, 0.5, 'x', True, None, [1, 2], {'a': 1}, datetime.date(2020, 1, 1), 'grocery@latest', -3])
PARAM_KEY = _mostly(st.sampled_from(PARAM_NAMES), TOKEN)
PARAMS_INPUT = st.tuples(
    NOTEBOOK, st.sampled_from(['drawn', 'drawn', 'drawn', 'train', 'train.ipynb', 'nope', 'missing.ipynb']),
    _mostly(st.dictionaries(PARAM_KEY, _mostly(VALUE, JSON), max_size=4).map(yaml.safe_dump), st.text(max_size=40)),  # the YAML file
    st.lists(_mostly(st.tuples(PARAM_KEY, VALUE_TEXT).map('='.join), TOKEN), max_size=3),  # -p key=value
    st.dictionaries(st.sampled_from(PARAM_NAMES), VALUE_TEXT, max_size=2))  # $RETAIL_CV_PARAM_<name>


def fuzz_params(data: tuple) -> None:
    notebook, job, text, pairs, env = data
    from retail_cv.jobs import PARAM_ENV_PREFIX, params_from_env, parse_params, validate_params
    with _Folder() as root:
        _write(root, {'job.ipynb': notebook, 'p.yaml': text})
        ref = {'drawn': root/'job.ipynb', 'train.ipynb': JOBS/'train.ipynb', 'missing.ipynb': root/'missing.ipynb'}.get(job, job)
        def parse():
            given = params_from_env(ref, {PARAM_ENV_PREFIX + k: v for k, v in env.items()})
            validate_params(ref, {**given, **parse_params(pairs, root/'p.yaml')})
        _run('params', parse)

STEP_NAMES = ['a', 'b', 'c']
REFERENCE = st.sampled_from(['${a.outputs.x}', '${ b.outputs.version }', '${z.outputs.x}', '${a}', 'v ${c.outputs.n} w', '${',
                             '$${a.outputs.x}', '${a.outputs.}', '${a.outputs.x} and ${b.outputs.y}'])
STEP_VALUE = st.recursive(st.sampled_from([1, 'x', True, 0.5, {}, [], None, 'grocery@latest', -1]) | REFERENCE | REFERENCE,
                          lambda inner: st.lists(inner, max_size=2) | st.dictionaries(st.sampled_from(['k', 'm']), inner, max_size=2), max_leaves=4)
JOB_PARAMS = {'train': ['data', 'epochs', 'config', 'seed'], 'evaluate': ['model', 'split', 'limit'], 'job.ipynb': ['n', 's', 'opts']}
JUNK_STEP = st.fixed_dictionaries(
    {'job': _mostly(st.sampled_from(['train', 'evaluate', 'job.ipynb', 'missing.ipynb', 'nope']), TOKEN | SCALARS)},
    optional={'needs': _mostly(st.lists(st.sampled_from([*STEP_NAMES, 'z']), max_size=2), JSON),
              'params': _mostly(st.dictionaries(st.sampled_from(['data', 'epochs', 'n', 'nope']), STEP_VALUE, max_size=3), JSON),
              'retries': SCALARS})


def _step(others: list[str]) -> st.SearchStrategy:
    "A well-formed step of a job with its own parameters, needing (mostly) other steps: the checks behind parsing run."
    needs = _mostly(st.lists(st.sampled_from(others), max_size=2, unique=True), st.lists(st.sampled_from([*STEP_NAMES, 'z']), max_size=2)) if others else st.just([])
    return st.sampled_from(list(JOB_PARAMS)).flatmap(lambda job: st.fixed_dictionaries(
        {'job': st.just(job), 'params': st.dictionaries(_mostly(st.sampled_from(JOB_PARAMS[job]), st.just('nope')), STEP_VALUE, max_size=3),
         'needs': needs}))


def _steps(names: list[str]) -> st.SearchStrategy:
    "Steps of those names, each mostly well-formed (so cycles, unknown steps and self-dependencies are checked)."
    return st.fixed_dictionaries({n: _mostly(_step([m for m in names if m != n]), _mostly(JUNK_STEP, JSON)) for n in names})

PIPELINE = _mostly(st.fixed_dictionaries({'name': _mostly(st.sampled_from(['p', 'shelf-1']), TOKEN | SCALARS),
                                          'steps': _mostly(st.lists(st.sampled_from(STEP_NAMES), min_size=1, max_size=3, unique=True).flatmap(_steps),
                                                           st.dictionaries(st.sampled_from(['1x', 'a b', 'é', '']) | TOKEN, JUNK_STEP, max_size=2) | JSON)}),
                   st.fixed_dictionaries({}, optional={'name': JSON, 'steps': JSON, 'other': JSON}))
STEP_JOB = _notebook(("n: int = 1  # a number\ns = ''\nopts: dict | str = {}", 1, True))  # the job 'job.ipynb' names


def fuzz_pipeline(data: tuple) -> None:
    obj, raw = data
    from retail_cv.pipeline import load_pipeline
    with _Folder() as root:
        _write(root, {'pipeline.yaml': raw if raw is not None else yaml.safe_dump(obj, allow_unicode=True), 'job.ipynb': STEP_JOB})
        _run('pipeline', lambda: load_pipeline(root/'pipeline.yaml'))

PIPELINE_INPUT = st.tuples(PIPELINE, _mostly(st.none(), st.text(max_size=60)))


def fuzz_profile(data: tuple) -> None:
    edits, raw = data
    from retail_cv.profiles import BUILTIN_PROFILES, load_profile_file
    with _Folder() as root:
        obj = _edit(BUILTIN_PROFILES['shelf-cam-x86'].model_dump(), edits)
        _write(root, {'profile.yaml': raw if raw is not None else yaml.safe_dump(obj, allow_unicode=True)})
        _run('profile', lambda: load_profile_file(root/'profile.yaml'))

PROFILE_KEYS = st.sampled_from(['name', 'providers', 'provider_options', 'intra_op_threads', 'execution_mode', 'graph_optimization',
                                'input_size', 'precisions', 'latency_budget_ms', 'batch_size', 'update']) | TOKEN
PROVIDER = st.sampled_from(['cpu', 'CPU', 'cuda', 'CUDAExecutionProvider', 'CPUExecutionProvider', 'cpuexecutionprovider', 'Cpu_',
                            'tensorrt', 'cpux', 'CUDAExecutionProvidr', 'nope', '']) | TOKEN
PROFILE_EDIT = st.one_of(
    st.tuples(st.just('providers'), _mostly(st.lists(PROVIDER, max_size=3), JSON)),
    st.tuples(st.just('provider_options'), _mostly(st.dictionaries(PROVIDER, _mostly(st.just({'device_id': 0}), JSON), max_size=2), JSON)),
    st.tuples(PROFILE_KEYS, st.none() | JSON | st.sampled_from([0, -1, 'fp16', ['int8'], {'detection': 0}, 'parallel', 'basic', 1e9])))
PROFILE_INPUT = st.tuples(st.lists(PROFILE_EDIT, max_size=3), _mostly(st.none(), st.text(max_size=60)))

# ---- the labelling tools' formats: CreateML, Label Studio, CVAT ---------------------------------------------------

LABEL = st.sampled_from(['cola', 'gap', '', 'price tag']) | TOKEN | SCALARS
CREATEML_BOX = st.fixed_dictionaries({'label': _mostly(st.sampled_from(['cola', 'gap']), LABEL),
                                      'coordinates': _mostly(st.fixed_dictionaries({k: NUMBER for k in ('x', 'y', 'width', 'height')}),
                                                             st.dictionaries(st.sampled_from(['x', 'y', 'width', 'height']), NUMBERISH, max_size=4) | JSON)})
CREATEML = st.lists(_mostly(st.fixed_dictionaries({'image': st.sampled_from(['a.png', 'b.png', 'missing.png']),
                                                   'annotations': st.lists(_mostly(CREATEML_BOX, JSON), max_size=3)}),
                            st.fixed_dictionaries({}, optional={'image': NAME | SCALARS, 'annotations': JSON})), max_size=3)


def fuzz_createml(data: tuple) -> None:
    entries, raw, image = data
    from retail_cv.data.formats import read_createml, write_createml
    with _Folder() as root:
        _write(root, {'c.json': raw if raw is not None else json.dumps(entries), 'a.png': PNG, 'b.png': image})
        def parse():
            ds = read_createml(root/'c.json')
            write_createml(ds, root.parent/'out')
        _run('createml', parse)

CREATEML_INPUT = st.tuples(CREATEML, _mostly(st.none(), st.binary(max_size=60)), IMAGE_BYTES)

LS_VALUE = _mostly(st.fixed_dictionaries({k: NUMBER for k in ('x', 'y', 'width', 'height')} | {'rectanglelabels': st.sampled_from([['cola'], ['gap']])},
                                         optional={'rotation': NUMBER}),
                   st.dictionaries(st.sampled_from(['x', 'y', 'width', 'height', 'rotation', 'rectanglelabels']), NUMBERISH | JSON, max_size=5))
LS_REGION = _mostly(st.fixed_dictionaries({'type': st.just('rectanglelabels'), 'value': LS_VALUE},
                                          optional={'original_width': SIZE, 'original_height': SIZE, 'id': TOKEN}),
                    st.fixed_dictionaries({}, optional={'type': SCALARS, 'value': JSON, 'original_width': NUMBERISH}))
LS_TASK = _mostly(st.fixed_dictionaries({'data': st.fixed_dictionaries({'image': st.sampled_from(['a.png', '/data/upload/1/0a1b2c3d-b.png',
                                                                                                 '/data/local-files/?d=a.png', 'missing.png', '../x.png'])}),
                                         'annotations': st.lists(st.fixed_dictionaries({'result': st.lists(LS_REGION, max_size=3)},
                                                                                       optional={'was_cancelled': st.booleans()}), max_size=2)}),
                  st.fixed_dictionaries({}, optional={'data': JSON, 'annotations': JSON}))


def fuzz_labelstudio(data: tuple) -> None:
    tasks, raw, image = data
    from retail_cv.data.formats import read_labelstudio, write_labelstudio
    with _Folder() as root:
        _write(root, {'t.json': raw if raw is not None else json.dumps(tasks), 'a.png': PNG, 'b.png': image})
        def parse():
            ds = read_labelstudio(root/'t.json')
            write_labelstudio(ds, root.parent/'out')
        _run('labelstudio', parse)

LABELSTUDIO_INPUT = st.tuples(st.lists(LS_TASK, max_size=3), _mostly(st.none(), st.binary(max_size=60)), IMAGE_BYTES)

ATTR = st.none() | XTEXT.map(lambda s: s.replace('"', '&quot;').replace('<', '&lt;'))
CVAT_BOX = st.tuples(_mostly(st.sampled_from(['cola', 'gap', 'beer']), ATTR), st.tuples(*[_mostly(NUMBER.map(str), ATTR)] * 4), ATTR, ATTR).map(
    lambda t: '<box' + ''.join(f' {k}="{v}"' for k, v in zip(('label', 'xtl', 'ytl', 'xbr', 'ybr', 'occluded', 'rotation'), (t[0], *t[1], t[2], t[3])) if v is not None) + '/>')
CVAT_IMAGE = st.tuples(_mostly(st.sampled_from(['a.png', 'b.png', 'missing.png']), ATTR), _mostly(st.sampled_from(['8', '6']), ATTR),
                       st.sampled_from(['', ' subset="Train"', ' subset="default"']), st.lists(CVAT_BOX, max_size=3)).map(
    lambda t: f'<image{"" if t[0] is None else f" name={chr(34)}{t[0]}{chr(34)}"}{"" if t[1] is None else f" width={chr(34)}{t[1]}{chr(34)}"}{t[2]}>{"".join(t[3])}</image>')
CVAT_DOC = st.tuples(st.sampled_from(['annotations', 'annotations', 'annotation']), st.sampled_from(['', '<meta><task><labels><label><name>cola</name></label>'
                     '<label><name>gap</name></label></labels></task></meta>']), st.lists(CVAT_IMAGE, max_size=3)).map(
    lambda t: f"<{t[0]}><version>1.1</version>{t[1]}{''.join(t[2])}</{t[0]}>")


def fuzz_cvat(data: tuple) -> None:
    doc, raw, doctype = data
    from retail_cv.data.formats import read_cvat, write_cvat
    with _Folder() as root:
        _write(root, {'annotations.xml': raw if raw is not None else (doctype or '') + doc, 'images/a.png': PNG, 'images/b.png': PNG})
        if doctype and raw is None:  # refused before any entity is expanded
            with pytest.raises(DataError) as e: read_cvat(root)
            if doctype == LAUGHS: assert 'document type declarations are not allowed' in str(e.value), str(e.value)
            OUTCOMES.setdefault('cvat', Counter())['refused'] += 1
            return
        def parse():
            ds = read_cvat(root)
            write_cvat(ds, root.parent/'out')
        _run('cvat', parse)

CVAT_INPUT = st.tuples(CVAT_DOC, _mostly(st.none(), st.binary(max_size=60)), _mostly(st.none(), DOCTYPES))

# ---- the targets and their tests ----------------------------------------------------------------------------------

TARGETS = {'coco': (COCO_INPUT, fuzz_coco), 'yolo': (YOLO_INPUT, fuzz_yolo), 'voc': (VOC_INPUT, fuzz_voc),
           'sku110k': (SKU_INPUT, fuzz_sku110k), 'grocery': (GROCERY_INPUT, fuzz_grocery), 'bundle': (BUNDLE_INPUT, fuzz_bundle),
           'params': (PARAMS_INPUT, fuzz_params), 'pipeline': (PIPELINE_INPUT, fuzz_pipeline), 'profile': (PROFILE_INPUT, fuzz_profile),
           'createml': (CREATEML_INPUT, fuzz_createml), 'labelstudio': (LABELSTUDIO_INPUT, fuzz_labelstudio), 'cvat': (CVAT_INPUT, fuzz_cvat)}


def fuzz(name: str, n: int, derandomize: bool) -> None:
    "Run target `name` on `n` drawn inputs."
    strategy, target = TARGETS[name]
    @settings(max_examples=n, deadline=None, database=None, derandomize=derandomize,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
    @given(strategy)
    def run(data): target(data)
    run()


@pytest.mark.parametrize('name', list(TARGETS))
def test_fuzz(name):
    OUTCOMES.pop(name, None)
    fuzz(name, NORMAL, derandomize=True)
    assert sum(OUTCOMES[name].values()) >= NORMAL and OUTCOMES[name]['refused'] and OUTCOMES[name]['parsed'], OUTCOMES[name]


@pytest.mark.slow
@pytest.mark.parametrize('name', list(TARGETS))
def test_fuzz_slow(name):
    OUTCOMES.pop(name, None)
    fuzz(name, SLOW, derandomize=False)
    assert sum(OUTCOMES[name].values()) >= SLOW, OUTCOMES[name]
