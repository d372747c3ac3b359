"""Dataset store: content addressing, idempotence, diff, encryption at rest, path safety, integrity."""
from __future__ import annotations

import io
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import ExifTags, Image, PngImagePlugin
from skimage import data as skdata

from retail_cv.core import ConfigError, DataError, IntegrityError, Workspace, sha256_bytes
from retail_cv.data.formats import Annotation, Category, Dataset, ImageRecord, read_coco, write_coco
from retail_cv.data.privacy import generate_key
from retail_cv.data.store import DatasetStore

# ---- helpers ---------------------------------------------------------------------------------------------------

_AUDIT: list = []  # (kind, callback) pairs active during a test; sys.addaudithook cannot be removed, so it dispatches


def _audit(event, args):
    for kind, cb in list(_AUDIT):
        if event == kind: cb(args)


sys.addaudithook(_audit)


def photo(i: int, size=(48, 64), exif=None, marker: str | None = None, fmt='PNG') -> bytes:
    "A distinct synthetic photo; `marker` goes into a PNG text chunk (kept by strip_exif=False)."
    rng = np.random.default_rng(i)
    px = rng.integers(0, 255, (*size, 3), dtype=np.uint8)
    kw = {}
    if exif is not None: kw['exif'] = exif
    if marker is not None:
        info = PngImagePlugin.PngInfo(); info.add_text('note', marker); kw['pnginfo'] = info
    buf = io.BytesIO(); Image.fromarray(px).save(buf, fmt, **kw); return buf.getvalue()


def age(folder: Path, seconds: float = 60) -> None:
    "Make files look written a while ago (the hash cache distrusts files changed within 2 s of hashing)."
    past = time.time() - seconds
    for p in folder.rglob('*'):
        if p.is_file(): os.utime(p, (past, past))


def make_dataset(root: Path, n: int = 6, **photo_kw) -> Path:
    (root/'img').mkdir(parents=True, exist_ok=True)
    for i in range(n): (root/'img'/f'{i}.png').write_bytes(photo(i, **photo_kw))
    ds = Dataset(root, 'detection', [Category(1, 'cola'), Category(2, 'chips')],
                 [ImageRecord(i, f'img/{i}.png', 64, 48) for i in range(n)],
                 [Annotation(i, i, 1 + i % 2, (2.0 + i, 3.0, 10.0, 12.0)) for i in range(n)])
    age(root)
    return write_coco(ds, root/'labels.json')


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob('*')) if p.is_file()}


def all_bytes(folder: Path) -> list[tuple[Path, bytes]]:
    return [(p, p.read_bytes()) for p in folder.rglob('*') if p.is_file()]


@pytest.fixture
def store(tmp_path) -> DatasetStore:
    return DatasetStore(Workspace.open(tmp_path/'ws'))

# ---- content addressing ------------------------------------------------------------------------------------------


def test_reingest_same_id_and_no_new_objects(store, tmp_path):
    labels = make_dataset(tmp_path/'src')
    v1 = store.ingest(labels, 'shelf', progress=False)
    objects_before, manifests_before = tree(store.ws/'objects'), tree(store.ws/'datasets'/'shelf')
    v2 = store.ingest(labels, 'shelf', progress=False)
    assert v2.id == v1.id and v2.stats.objects_written == 0 and v2.stats.hashed == 0 and not v2.stats.new_version
    assert tree(store.ws/'objects') == objects_before
    assert tree(store.ws/'datasets'/'shelf') == manifests_before
    # the same content from another folder: same id, still nothing new
    shutil.copytree(tmp_path/'src', tmp_path/'copy')
    assert store.ingest(tmp_path/'copy'/'labels.json', 'shelf', progress=False).id == v1.id
    assert tree(store.ws/'objects') == objects_before
    # identical images are stored once
    assert len(store.objects.ids()) == 6


def test_warm_ingest_reads_no_source_image(store, tmp_path):
    labels = make_dataset(tmp_path/'src')
    store.ingest(labels, 'shelf', progress=False)
    opened: list[str] = []
    img_dir = str(tmp_path/'src'/'img')
    _AUDIT.append(('open', lambda a: opened.append(str(a[0])) if str(a[0]).startswith(img_dir) else None))
    try: v = store.ingest(labels, 'shelf', progress=False)
    finally: _AUDIT.clear()
    assert opened == [] and v.stats.hashed == 0
    # touching one file makes exactly that one be read again
    p = tmp_path/'src'/'img'/'2.png'; p.write_bytes(p.read_bytes()); past = time.time() - 30; os.utime(p, (past, past))
    assert store.ingest(labels, 'shelf', progress=False).stats.hashed == 1


def test_any_change_gives_new_id(store, tmp_path):
    labels = make_dataset(tmp_path/'src')
    v1 = store.ingest(labels, 'shelf', progress=False)
    ds = read_coco(labels); ds.annotations[0].bbox = (2.0, 3.0, 10.0, 13.0)
    assert store.ingest(ds, 'shelf', progress=False).id != v1.id
    assert store.ingest(labels, 'shelf', strip_exif=False, progress=False).id != v1.id  # privacy options are content


def test_diff_lists_exactly(store, tmp_path):
    labels = make_dataset(tmp_path/'a')
    va = store.ingest(labels, 'shelf', progress=False)
    shutil.copytree(tmp_path/'a', tmp_path/'b')
    (tmp_path/'b'/'img'/'1.png').write_bytes(photo(101))                        # changed content
    (tmp_path/'b'/'img'/'new.png').write_bytes(photo(102))                      # added
    ds = read_coco(tmp_path/'b'/'labels.json')
    ds.images = [im for im in ds.images if im.file_name != 'img/4.png'] + [ImageRecord(99, 'img/new.png', 64, 48)]
    ds.annotations = [a for a in ds.annotations if a.image_id != 4]           # removed
    ds.annotations[2].bbox = (20.0, 3.0, 10.0, 12.0)                            # img/2.png: box moved
    ds.annotations[3].category_id = 1                                          # img/3.png: class changed (chips -> cola)
    ds.categories.append(Category(3, 'soap'))
    vb = store.ingest(ds, 'shelf', progress=False)
    d = store.diff(va.id, vb.ref)
    assert d.added == ['img/new.png'] and d.removed == ['img/4.png']
    assert d.changed == ['img/1.png'] and d.relabelled == ['img/2.png', 'img/3.png']
    assert d.categories_added == ['soap'] and d.categories_removed == []
    assert not d.empty and store.diff(va, va).empty
    back = store.diff(vb, va)
    assert (back.added, back.removed, back.changed) == (['img/4.png'], ['img/new.png'], ['img/1.png'])
    assert json.loads(json.dumps(d.to_dict()))['changed'] == ['img/1.png']


def test_refs(store, tmp_path):
    v1 = store.ingest(make_dataset(tmp_path/'a', n=3), 'shelf', progress=False)
    v2 = store.ingest(make_dataset(tmp_path/'b', n=4), 'shelf', progress=False)
    assert store.get('shelf').id == store.get('shelf@latest').id == v2.id
    assert store.get(f'shelf@{v1.id[:8]}').id == v1.id and store.get(v1.id[:10]).id == v1.id
    assert [v.id for v in store.versions('shelf')] == [v1.id, v2.id] and store.names() == ['shelf']
    with pytest.raises(DataError, match='no dataset version matches'): store.get('shelf@ffffffff0000')
    with pytest.raises(ConfigError, match='dataset name'): store.ingest(tmp_path/'a'/'labels.json', '../evil', progress=False)
    ds = v1.dataset
    assert [im.file_name for im in ds.images] == v1.files == ['img/0.png', 'img/1.png', 'img/2.png']


def test_tampered_manifest_refused(store, tmp_path):
    v = store.ingest(make_dataset(tmp_path/'src'), 'shelf', progress=False)
    path = store.ws/'datasets'/'shelf'/f'{v.id}.json'
    m = json.loads(path.read_text()); m['content']['labels']['annotations'][0]['bbox'] = [0, 0, 1, 1]
    path.write_text(json.dumps(m))
    with pytest.raises(IntegrityError, match='was modified'): store.get(v.id)

# ---- encryption -------------------------------------------------------------------------------------------------


def test_encrypted_roundtrip_and_wrong_key(store, tmp_path):
    key = generate_key(tmp_path/'keys'/'data.key')
    labels = make_dataset(tmp_path/'src')
    v = store.ingest(labels, 'secret', key=key, progress=False)
    assert v.encrypted and v.read_bytes('img/0.png', key=key) == (tmp_path/'src'/'img'/'0.png').read_bytes()
    again = store.ingest(labels, 'secret', key=key, progress=False)
    assert again.id == v.id and again.stats.objects_written == 0
    with pytest.raises(ConfigError, match='is encrypted'): v.read_bytes('img/0.png', key=None)
    wrong = generate_key(tmp_path/'keys'/'wrong.key')
    with pytest.raises(IntegrityError, match='wrong key'): v.read_bytes('img/0.png', key=wrong)
    os.environ['RETAIL_CV_DATA_KEY'] = key.read_text().strip()
    try: assert v.read_bytes('img/1.png') == (tmp_path/'src'/'img'/'1.png').read_bytes()
    finally: del os.environ['RETAIL_CV_DATA_KEY']
    out = v.checkout(tmp_path/'plain', key=key)
    assert (tmp_path/'plain'/'img'/'3.png').read_bytes() == (tmp_path/'src'/'img'/'3.png').read_bytes() and len(out.images) == 6
    with pytest.raises(DataError, match='inside the workspace'): v.checkout(store.ws/'x', key=key)


def _plaintext_windows(blobs: list[bytes]) -> list[bytes]:
    "Distinctive 24-byte pieces of each plaintext (the pixel data of these PNGs is incompressible noise)."
    return [b[i:i + 24] for b in blobs for i in range(len(b) // 4, len(b) - 24, len(b) // 4)]


@pytest.mark.parametrize('strip_exif', [False, True])
def test_no_plaintext_in_workspace_when_encrypted(tmp_path, strip_exif):
    marker = 'PLAINTEXT-MARKER-7f3a9c'
    root = tmp_path/'src'; (root/'img').mkdir(parents=True)
    names = [f'img/{i}.png' for i in range(8)]
    for i, n in enumerate(names): (root/n).write_bytes(photo(i, size=(64, 64), marker=marker))
    age(root)
    ds = Dataset(root, 'classification', [Category(1, 'shelf')], [ImageRecord(i, n, 64, 64) for i, n in enumerate(names)],
                 [Annotation(i, i, 1) for i in range(len(names))])
    key = generate_key(tmp_path/'data.key')
    ws = tmp_path/'ws-enc'
    # every temporary file is read just before it is renamed into place or removed
    seen: list[tuple[str, bytes]] = []
    def grab(args):
        src = Path(os.fsdecode(args[0]))
        if str(src).startswith(str(ws)) and src.is_file(): seen.append((str(src), src.read_bytes()))
    _AUDIT.extend([('os.rename', grab), ('os.remove', grab)])
    try:
        enc = DatasetStore(Workspace.open(ws)).ingest(ds, 'enc', key=key, strip_exif=strip_exif, progress=False)
    finally: _AUDIT.clear()
    plain = [enc.read_bytes(n, key=key) for n in names]
    needles = [marker.encode()] * (not strip_exif) + _plaintext_windows(plain)
    assert len(needles) >= 24 and seen  # the hook really saw the object writes
    for path, data in all_bytes(ws) + seen:
        for needle in needles: assert needle not in data, f"plaintext found in {path}"
    # control: the same scan finds the plaintext in an unencrypted store, so the check above can fail
    clear = DatasetStore(Workspace.open(tmp_path/'ws-clear')).ingest(ds, 'clear', strip_exif=strip_exif, progress=False)
    assert [clear.read_bytes(n) for n in names] == plain
    blob = b''.join(d for _, d in all_bytes(tmp_path/'ws-clear'))
    assert all(n in blob for n in needles)

# ---- privacy through the store -------------------------------------------------------------------------------------


def test_ingest_strips_exif_and_rotates_boxes(store, tmp_path):
    root = tmp_path/'src'; (root/'img').mkdir(parents=True)
    px = np.full((40, 60, 3), 255, np.uint8); px[2:12, 4:14] = (255, 0, 0)
    ex = Image.Exif(); ex[ExifTags.Base.Orientation] = 6
    ex[ExifTags.IFD.GPSInfo] = {1: 'N', 2: (52.0, 31.0, 12.0), 3: 'E', 4: (13.0, 24.0, 0.0)}
    for name in ('stored.png', 'shown.png'):
        buf = io.BytesIO(); Image.fromarray(px).save(buf, 'PNG', exif=ex); (root/'img'/name).write_bytes(buf.getvalue())
    # one image labelled on its stored pixels (60x40), one on the upright picture (40x60): the sizes tell them apart
    ds = Dataset(root, 'detection', [Category(1, 'tag')], [ImageRecord(1, 'img/stored.png', 60, 40), ImageRecord(2, 'img/shown.png', 40, 60)],
                 [Annotation(1, 1, 1, (4.0, 2.0, 10.0, 10.0)), Annotation(2, 2, 1, (28.0, 4.0, 10.0, 10.0))])
    v = store.ingest(ds, 'rot', progress=False)
    for name in ('img/stored.png', 'img/shown.png'):
        im = v.open_image(name)
        assert im.size == (40, 60) and dict(im.getexif()) == {} and b'Exif' not in v.read_bytes(name)
        img = next(i for i in v.dataset.images if i.file_name == name)
        ann = next(a for a in v.dataset.annotations if a.image_id == img.id)
        x, y, w, h = map(int, ann.bbox)
        assert (img.width, img.height) == (40, 60)
        assert (np.asarray(im)[y:y + h, x:x + w] == (255, 0, 0)).all(), (name, ann.bbox)
    assert v.items['img/stored.png']['boxes'] == 'transformed' and v.items['img/shown.png']['boxes'] == 'kept'
    assert v.items['img/stored.png']['orientation'] == 6 and 'source_sha256' in v.items['img/stored.png']


def test_ingest_anonymises_faces(store, tmp_path):
    root = tmp_path/'src'; (root/'img').mkdir(parents=True)
    astronaut = skdata.astronaut()
    (root/'img'/'person.png').write_bytes(_png(astronaut))
    (root/'img'/'shelf.png').write_bytes(photo(1))
    age(root)
    ds = Dataset(root, 'classification', [Category(1, 'x')], [ImageRecord(1, 'img/person.png', 512, 512), ImageRecord(2, 'img/shelf.png', 64, 48)],
                 [Annotation(1, 1, 1), Annotation(2, 2, 1)])
    v = store.ingest(ds, 'people', anonymise_faces=True, progress=False)
    assert v.items['img/person.png']['faces'] >= 1 and v.items['img/shelf.png']['faces'] == 0
    out = np.asarray(v.open_image('img/person.png').convert('RGB')).astype(float)
    assert np.abs(out[80:150, 190:255] - astronaut[80:150, 190:255]).mean() > 15
    np.testing.assert_array_equal(out[380:, 380:], astronaut[380:, 380:])
    assert v.read_bytes('img/shelf.png') == (root/'img'/'shelf.png').read_bytes()   # no face: untouched
    assert v.privacy == {'strip_exif': True, 'anonymise_faces': True, 'face_method': 'blur',
                         'face_detector': 'opencv-haar-frontal+profile'}
    # warm re-ingest neither re-detects nor rewrites
    again = store.ingest(ds, 'people', anonymise_faces=True, progress=False)
    assert again.id == v.id and again.stats.hashed == 0


def _png(arr) -> bytes:
    buf = io.BytesIO(); Image.fromarray(arr).save(buf, 'PNG'); return buf.getvalue()

# ---- path safety, atomicity, integrity ---------------------------------------------------------------------------------


def _coco_with(root: Path, file_name: str) -> Path:
    coco = {'categories': [{'id': 1, 'name': 'x'}], 'images': [{'id': 1, 'file_name': 'img/0.png', 'width': 64, 'height': 48},
                                                             {'id': 2, 'file_name': file_name, 'width': 64, 'height': 48}],
            'annotations': []}
    p = root/'labels.json'; p.write_text(json.dumps(coco)); return p


def test_path_traversal_rejected(store, tmp_path):
    make_dataset(tmp_path/'src', n=1)
    (tmp_path/'x.jpg').write_bytes(photo(5))            # exists, so only the path rule can reject it
    with pytest.raises(DataError, match=r"'\.\./x\.jpg' escapes the dataset root"):
        store.ingest(_coco_with(tmp_path/'src', '../x.jpg'), 'evil', progress=False)
    with pytest.raises(DataError, match='is absolute'):
        store.ingest(_coco_with(tmp_path/'src', str(tmp_path/'x.jpg')), 'evil', progress=False)
    (tmp_path/'src'/'img'/'link.png').symlink_to(tmp_path/'x.jpg')
    with pytest.raises(DataError, match=r"'img/link\.png' resolves to .*outside the dataset root"):
        store.ingest(_coco_with(tmp_path/'src', 'img/link.png'), 'evil', progress=False)
    assert store.objects.ids() == set() and not (store.ws/'datasets'/'evil').exists()
    # a symlink that stays inside the root is fine
    (tmp_path/'src'/'img'/'alias.png').symlink_to(tmp_path/'src'/'img'/'0.png')
    v = store.ingest(_coco_with(tmp_path/'src', 'img/alias.png'), 'ok', progress=False)
    assert v.items['img/alias.png']['sha256'] == v.items['img/0.png']['sha256']


def test_failed_ingest_leaves_no_version(store, tmp_path):
    labels = make_dataset(tmp_path/'src', n=40)
    (tmp_path/'src'/'img'/'25.png').write_bytes(b'\x89PNG\r\n\x1a\n truncated')   # not decodable: sanitising fails
    with pytest.raises(DataError, match=r'img/25\.png: not a readable image'):
        store.ingest(labels, 'shelf', progress=False, workers=4)
    assert not list((store.ws/'datasets').rglob('*.json'))
    leftovers = [p for p in (store.ws/'objects').rglob('*') if p.is_file() and p.name.startswith('.')]
    assert leftovers == []
    for oid in store.objects.ids():     # whatever was stored is complete and under its true name
        assert sha256_bytes(store.objects.path(oid).read_bytes()) == oid


def test_corrupted_object_detected(store, tmp_path):
    v = store.ingest(make_dataset(tmp_path/'src'), 'shelf', progress=False)
    obj = store.objects.path(v.items['img/2.png']['object'])
    obj.chmod(0o644); data = bytearray(obj.read_bytes()); data[100] ^= 0x10; obj.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match='corrupted object'): v.read_bytes('img/2.png')
    assert v.read_bytes('img/3.png') == (tmp_path/'src'/'img'/'3.png').read_bytes()
    with pytest.raises(IntegrityError, match='corrupted object'): v.checkout(tmp_path/'out')
    assert not (tmp_path/'out').exists() and not list(tmp_path.glob('.out.*'))
    assert v.verify(remove_corrupt=True) == ['img/2.png']
    assert store.ingest(tmp_path/'src'/'labels.json', 'shelf', progress=False).stats.objects_written == 1
    assert v.verify() == []


def test_corrupted_encrypted_object_detected(store, tmp_path):
    key = generate_key(tmp_path/'k.key')
    v = store.ingest(make_dataset(tmp_path/'src'), 'shelf', key=key, progress=False)
    obj = store.objects.path(v.items['img/2.png']['object'])
    obj.chmod(0o644); data = bytearray(obj.read_bytes()); data[-5] ^= 0x01; obj.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=f"wrong key or corrupted object {v.items['img/2.png']['sha256']}"):
        v.read_bytes('img/2.png', key=key)
    obj.unlink()
    with pytest.raises(IntegrityError, match='missing from the store'): v.read_bytes('img/2.png', key=key)


@pytest.mark.slow
def test_ingest_throughput(store, tmp_path):
    "The brief's floor is 500 files/s for small files; bench/bench_ingest.py measures 10,000."
    root = tmp_path/'src'; (root/'img').mkdir(parents=True)
    base = io.BytesIO(); Image.fromarray(np.full((48, 64, 3), 90, np.uint8)).save(base, 'JPEG', quality=85)
    jpeg = base.getvalue()
    n = 2000
    for i in range(n): (root/'img'/f'{i}.jpg').write_bytes(jpeg[:-2] + i.to_bytes(4, 'big') + b'\xff\xd9')
    age(root)
    ds = Dataset(root, 'classification', [Category(1, 'x')], [ImageRecord(i, f'img/{i}.jpg', 64, 48) for i in range(n)],
                 [Annotation(i, i, 1) for i in range(n)])
    cold = store.ingest(ds, 'speed', progress=False)
    warm = store.ingest(ds, 'speed', progress=False)
    assert cold.stats.objects_written == n and warm.stats.hashed == 0
    assert cold.stats.files_per_s >= 500, cold.stats
    assert warm.stats.files_per_s >= 500, warm.stats
