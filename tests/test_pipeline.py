"Input pipeline: the decoded cache is built once and atomically, reads stay flat in memory, boxes follow the image."
import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from PIL import Image, ImageDraw
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from retail_cv.core import DataError, IntegrityError, Workspace
from retail_cv.data.formats import Annotation, Category, Dataset, ImageRecord
from retail_cv.data.loading import (BatchAugment, ClassificationDataModule, DecodedImageCache, DetectionDataModule,
                                     DiskReader, IMAGENET_MEAN, IMAGENET_STD, default_cache_key, resize_image)

pytestmark = pytest.mark.filterwarnings('ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning')

COLOURS = {1: (220, 30, 30), 2: (30, 200, 30), 3: (30, 30, 220)}
CATS = [Category(1, 'cola'), Category(2, 'lime'), Category(3, 'berry')]


def make_dataset(root, task='classification', n=30, size=(96, 72), fmt='JPEG', seed=0):
    "Write `n` images with coloured shapes under `root`; classification: one colour per class, detection: two boxes."
    root = Path(root); (root/'img').mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ims, anns = [], []
    ext = {'JPEG': 'jpg', 'PNG': 'png'}[fmt]
    for i in range(n):
        w, h = size
        im = Image.new('RGB', size, (128, 128, 128))
        d = ImageDraw.Draw(im)
        if task == 'classification':
            cid = 1 + i % 3
            d.rectangle([4, 4, w - 5, h - 5], fill=COLOURS[cid])
            anns.append(Annotation(len(anns) + 1, i + 1, cid))
        else:
            for k in range(2):
                bw, bh = int(rng.integers(10, w // 3)), int(rng.integers(10, h // 3))
                x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
                c = 1 + (i + k) % 3
                d.rectangle([x, y, x + bw - 1, y + bh - 1], fill=COLOURS[c])
                anns.append(Annotation(len(anns) + 1, i + 1, c, (float(x), float(y), float(bw), float(bh))))
        name = f'img/{i:05d}.{ext}'
        im.save(root/name, fmt, **({'quality': 95} if fmt == 'JPEG' else {}))
        ims.append(ImageRecord(i + 1, name, w, h))
    return Dataset(root, task, list(CATS), ims, anns)


def anon_rss() -> int:
    "Resident anonymous memory of this process: RSS minus file-backed and shared pages (psutil's `shared`)."
    mi = psutil.Process().memory_info()
    return mi.rss - mi.shared


# --- memory stays flat -------------------------------------------------------------------------------------------

@pytest.mark.skipif(not sys.platform.startswith('linux'), reason="psutil's `shared` is file-backed RSS on Linux only")
def test_iterating_a_large_cache_keeps_anonymous_memory_flat(tmp_path):
    ds = make_dataset(tmp_path/'data', n=1400, size=(64, 48))
    dm = ClassificationDataModule(ds, image_size=224, resize='stretch', batch_size=50, val_fraction=0.0,
                                  cache_dir=tmp_path/'cache', progress=False, drop_last=False)
    dm.setup()
    cache = dm.source
    cache_bytes = cache.images.nbytes
    assert cache_bytes > 200e6
    # What the DataModule ships to a worker is paths and labels, not pixels.
    blob = pickle.dumps(dm.train_set)
    assert len(blob) < 64_000, len(blob)
    assert pickle.loads(blob).source._images is None

    cache._images = cache._geometry = None  # start from an unmapped cache
    def epoch():
        "Read every image once; return how many were seen and a checksum that needs their pixels."
        seen, checksum = 0, 0
        for x, y in dm.train_dataloader():
            seen += len(x); checksum += int(x[:, :, 100, 100].sum())
        return seen, checksum
    start = anon_rss()
    seen, checksum = epoch()
    first = anon_rss() - start
    seen2, checksum2 = epoch()
    second = anon_rss() - start - first
    assert seen == seen2 == 1400 and checksum == checksum2 > 0
    # The first epoch leaves the allocator holding a few batches' worth of buffers (~3 x 7.5 MB here), not the data...
    assert first < 0.15 * cache_bytes, f"anonymous memory grew {first / 1e6:.1f} MB over a {cache_bytes / 1e6:.0f} MB cache"
    # ...and reading all 211 MB again adds next to nothing: memory does not accumulate with what was read.
    assert second < 0.02 * cache_bytes, f"a second epoch added {second / 1e6:.1f} MB"

    # The measure can fail: holding the pixels in Python shows up as anonymous memory of the cache's size.
    before = anon_rss()
    held = np.array(cache.images)
    assert anon_rss() - before > 0.8 * cache_bytes
    del held


# --- cache: built once, atomically ---------------------------------------------------------------------------------

def test_later_runs_read_the_cache_and_never_the_images(tmp_path):
    ds = make_dataset(tmp_path/'data', n=12)
    key = default_cache_key(ds)
    first = ClassificationDataModule(ds, image_size=32, cache_dir=tmp_path/'cache', cache_key=key, progress=False, val_fraction=0.25)
    first.setup()
    assert first.source.built_now
    ref = next(iter(first.val_dataloader()))[0]
    for p in (ds.root/'img').iterdir(): p.unlink()  # the JPEGs are gone: only the cache can answer
    script = textwrap.dedent(f"""
        import pickle, sys, torch
        from retail_cv.data.loading import ClassificationDataModule
        ds = pickle.loads(bytes.fromhex({pickle.dumps(ds).hex()!r}))
        dm = ClassificationDataModule(ds, image_size=32, cache_dir={str(tmp_path/'cache')!r}, cache_key={key!r}, progress=False, val_fraction=0.25)
        dm.prepare_data(); dm.setup()
        x, y = next(iter(dm.val_dataloader()))
        torch.save({{'built_now': dm.source.built_now, 'x': x}}, {str(tmp_path/'out.pt')!r})
    """)
    subprocess.run([sys.executable, '-c', script], check=True, timeout=120)
    out = torch.load(tmp_path/'out.pt')
    assert out['built_now'] is False
    assert torch.equal(out['x'], ref)


def test_a_killed_build_is_never_reused_and_is_cleaned_up(tmp_path):
    ds = make_dataset(tmp_path/'data', n=80)
    folder = tmp_path/'cache'
    names = [im.file_name for im in ds.images]
    builder = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from retail_cv.data.loading import DecodedImageCache
        root = Path({str(ds.root)!r})
        def slow_read(name):
            time.sleep(0.1)
            if name.endswith('00005.jpg'): print('half-built', flush=True)
            return (root/name).read_bytes()
        DecodedImageCache.ensure({str(folder)!r}, 'k1', {names!r}, slow_read, (32, 32), 'stretch', threads=1, progress=False)
        print('finished', flush=True)
    """)
    proc = subprocess.Popen([sys.executable, '-c', builder], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == 'half-built'
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None: proc.kill()
    leftovers = [p.name for p in folder.iterdir()]
    assert len(leftovers) == 1 and leftovers[0].startswith('.build-'), leftovers  # a hidden, unfinished folder only
    assert (folder/leftovers[0]/'images.npy').exists() and not (folder/leftovers[0]/'meta.json').exists()

    cache = DecodedImageCache.ensure(folder, 'k1', names, DiskReader(ds.root), (32, 32), 'stretch', progress=False)
    assert cache.built_now
    assert [p.name for p in folder.iterdir()] == [cache.path.name]  # the dead builder's folder is gone
    want = resize_image(torch.from_numpy(np.asarray(Image.open(ds.root/names[40]).convert('RGB')).copy()).permute(2, 0, 1),
                        (32, 32), 'stretch')[0]
    assert (cache.load(40)[0].int() - want.int()).abs().max() <= 8  # Pillow vs libjpeg-turbo IDCT may differ slightly


def test_concurrent_builders_agree_on_one_cache(tmp_path):
    ds = make_dataset(tmp_path/'data', n=40)
    names = [im.file_name for im in ds.images]
    results, errors = [], []
    def build():
        try: results.append(DecodedImageCache.ensure(tmp_path/'cache', 'k', names, DiskReader(ds.root), (24, 24), 'crop', threads=2, progress=False))
        except Exception as e: errors.append(e)
    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads: t.start()
    for t in threads: t.join()
    assert not errors, errors
    assert len({r.path for r in results}) == 1
    assert [p.name for p in (tmp_path/'cache').iterdir()] == [results[0].path.name]
    assert all(np.array_equal(r.images[7], results[0].images[7]) for r in results)


def test_a_damaged_cache_is_rebuilt(tmp_path):
    ds = make_dataset(tmp_path/'data', n=10)
    names = [im.file_name for im in ds.images]
    args = (tmp_path/'cache', 'k', names, DiskReader(ds.root), (16, 16), 'stretch')
    good = DecodedImageCache.ensure(*args, progress=False)
    ref = np.array(good.images)
    with open(good.path/'images.npy', 'r+b') as f: f.truncate(1000)
    again = DecodedImageCache.ensure(*args, progress=False)
    assert again.built_now and np.array_equal(np.array(again.images), ref)


def test_a_different_resolution_mode_or_key_is_a_different_cache(tmp_path):
    ds = make_dataset(tmp_path/'data', n=6)
    names = [im.file_name for im in ds.images]
    paths = {DecodedImageCache.ensure(tmp_path/'c', key, names, DiskReader(ds.root), size, mode, progress=False).path
             for key, size, mode in [('a', (16, 16), 'stretch'), ('a', (16, 24), 'stretch'), ('a', (16, 16), 'crop'), ('b', (16, 16), 'stretch')]}
    assert len(paths) == 4


def test_decoded_size_must_match_the_record(tmp_path):
    ds = make_dataset(tmp_path/'data', n=4)
    ds.images[2].width = 100
    dm = ClassificationDataModule(ds, image_size=16, cache_dir=tmp_path/'cache', progress=False)
    with pytest.raises(DataError, match=r'img/00002.jpg: decoded size 96x72 differs from the recorded 100x72'):
        dm.setup()
    assert list((tmp_path/'cache'/'pipeline').iterdir()) == []


def test_non_jpeg_images_decode_through_pillow(tmp_path):
    ds = make_dataset(tmp_path/'data', n=6, fmt='PNG')
    dm = ClassificationDataModule(ds, image_size=32, cache_dir=tmp_path/'cache', progress=False, val_fraction=0.5)
    dm.setup()
    x, y = next(iter(dm.val_dataloader()))
    assert [int(x[i, :, 16, 16].argmax()) for i in range(len(y))] == y.tolist()


def test_default_cache_dir_is_the_workspace_cache(tmp_path, monkeypatch):
    monkeypatch.setenv('RETAIL_CV_WORKSPACE', str(tmp_path/'ws'))
    ds = make_dataset(tmp_path/'data', n=4)
    dm = ClassificationDataModule(ds, image_size=16, progress=False)
    dm.setup()
    assert dm.source.path.parent == Workspace(tmp_path/'ws').root/'cache'/'pipeline'


# --- store versions --------------------------------------------------------------------------------------------------

class FolderVersion:
    "A minimal content-addressed version: files checked against their sha256 on every read, id from the manifest."
    def __init__(self, dataset):
        self.dataset = dataset
        self.manifest = {im.file_name: hashlib.sha256((dataset.root/im.file_name).read_bytes()).hexdigest() for im in dataset.images}
        self.id = hashlib.sha256(json.dumps([self.manifest, dataset.to_coco()], sort_keys=True).encode()).hexdigest()[:16]
        self.reads = 0
    def read_bytes(self, file_name):
        data = (self.dataset.root/file_name).read_bytes()
        if hashlib.sha256(data).hexdigest() != self.manifest[file_name]: raise IntegrityError(f"{file_name}: content changed")
        self.reads += 1
        return data


def test_from_version_reads_through_the_version_and_keys_by_its_id(tmp_path):
    ds = make_dataset(tmp_path/'data', n=9)
    version = FolderVersion(ds)
    dm = ClassificationDataModule.from_version(version, {'image_size': 24}, cache_dir=tmp_path/'cache', progress=False)
    dm.setup()
    assert dm.cache_key == version.id and version.reads == 9 and dm.source.meta['cache_key'] == version.id
    # A tampered file is refused by the version's reader while the cache is built.
    Image.new('RGB', (96, 72), 'white').save(ds.root/ds.images[3].file_name)
    with pytest.raises(IntegrityError, match='00003.jpg'):
        ClassificationDataModule.from_version(version, image_size=40, cache_dir=tmp_path/'cache', progress=False).setup()


# --- loaders, splits, labels -----------------------------------------------------------------------------------------

def test_worker_processes_give_the_same_batches_as_the_main_process(tmp_path):
    ds = make_dataset(tmp_path/'data', 'detection', n=24)
    kw = dict(image_size=48, batch_size=5, cache_dir=tmp_path/'cache', progress=False, seed=3)
    a = DetectionDataModule(ds, num_workers=0, **kw); a.setup()
    b = DetectionDataModule(ds, num_workers=2, **kw); b.setup()
    for (ia, ta), (ib, tb) in zip(a.train_dataloader(), b.train_dataloader()):
        assert all(torch.equal(x, y) for x, y in zip(ia, ib))
        assert [t['image_id'] for t in ta] == [t['image_id'] for t in tb]
        assert all(torch.equal(x['boxes'], y['boxes']) for x, y in zip(ta, tb))


def test_label_problems_are_named(tmp_path):
    ds = make_dataset(tmp_path/'data', n=6)
    ds.annotations = [a for a in ds.annotations if a.image_id != 4]
    with pytest.raises(DataError, match=r'img/00003.jpg has 0 image-level labels'):
        ClassificationDataModule(ds, cache_dir=tmp_path/'cache')
    ds.annotations.append(Annotation(99, 4, 7))
    with pytest.raises(DataError, match='category_id 7 is not among'):
        ClassificationDataModule(ds, cache_dir=tmp_path/'cache')
    det = make_dataset(tmp_path/'det', 'detection', n=3)
    with pytest.raises(Exception, match='needs a classification dataset'):
        ClassificationDataModule(det)


def test_split_is_recorded_or_seeded_and_stable(tmp_path):
    ds = make_dataset(tmp_path/'data', n=30)
    a = ClassificationDataModule(ds, val_fraction=0.2, test_fraction=0.1, seed=5)
    b = ClassificationDataModule(ds, val_fraction=0.2, test_fraction=0.1, seed=5)
    assert {k: len(v) for k, v in a.splits.items()} == {'train': 21, 'val': 6, 'test': 3}
    assert all(np.array_equal(a.splits[k], b.splits[k]) for k in a.splits)
    for im in ds.images: im.split = 'validation' if im.id % 5 == 0 else 'train'
    c = ClassificationDataModule(ds, seed=5)
    assert [ds.images[i].id for i in c.splits['val']] == [5, 10, 15, 20, 25, 30]


# --- boxes follow the image --------------------------------------------------------------------------------------------

def test_flip_and_crop_move_boxes_with_pixels(tmp_path):
    root = tmp_path/'one'; (root/'img').mkdir(parents=True)
    im = Image.new('RGB', (100, 100), (0, 0, 0))
    ImageDraw.Draw(im).rectangle([10, 20, 29, 59], fill=(255, 0, 0))   # x 10..30, y 20..60
    ImageDraw.Draw(im).rectangle([80, 80, 94, 94], fill=(0, 255, 0))   # near the bottom-right corner
    im.save(root/'img/a.png')
    ds = Dataset(root, 'detection', list(CATS), [ImageRecord(1, 'img/a.png', 100, 100)],
                 [Annotation(1, 1, 1, (10, 20, 20, 40)), Annotation(2, 1, 2, (80, 80, 15, 15))])
    kw = dict(image_size=100, cache_dir=tmp_path/'cache', progress=False, val_fraction=0.0)
    flipped = DetectionDataModule(ds, train_transforms=v2.RandomHorizontalFlip(p=1), **kw); flipped.setup()
    img, t = flipped.train_set[0]
    assert t['boxes'].tolist() == [[70.0, 20.0, 90.0, 60.0], [5.0, 80.0, 20.0, 95.0]]
    assert img[0, 40, 71:89].min() > 200 and img[0, 40, 60:69].max() < 40           # the red block moved with its box
    cropped = DetectionDataModule(ds, train_transforms=v2.CenterCrop(50), **kw); cropped.setup()
    img, t = cropped.train_set[0]
    assert t['boxes'].tolist() == [[0.0, 0.0, 5.0, 35.0]] and t['labels'].tolist() == [1]   # the corner box fell out


def test_batch_flip_matches_torchvision_on_boxes_and_pixels(tmp_path):
    ds = make_dataset(tmp_path/'data', 'detection', n=16)
    dm = DetectionDataModule(ds, image_size=64, batch_size=16, cache_dir=tmp_path/'cache', progress=False, val_fraction=0.0,
                             brightness=0, contrast=0, saturation=0, seed=11)
    dm.setup()
    images, targets = next(iter(dm.train_dataloader()))
    out, new = dm.augment_batch((images, targets), train=True)
    flips = 0
    for im, t, o, n in zip(images, targets, out, new):
        bb = tv_tensors.BoundingBoxes(t['boxes'], format='XYXY', canvas_size=(64, 64))
        f_im, f_bb = v2.RandomHorizontalFlip(p=1)(tv_tensors.Image(im), bb)
        if torch.equal(n['boxes'], t['boxes']) and torch.allclose(o, im.float() / 255): continue
        flips += 1
        assert torch.allclose(o, f_im.float() / 255) and torch.equal(n['boxes'], f_bb.as_subclass(torch.Tensor))
    assert 3 <= flips <= 13, flips   # p = 0.5 over 16 images


def test_batch_augment_handles_images_of_different_sizes():
    aug = BatchAugment(hflip_p=1, brightness=0, contrast=0, saturation=0, mean=None)
    a, b = torch.randint(0, 255, (3, 8, 10), dtype=torch.uint8), torch.randint(0, 255, (3, 6, 12), dtype=torch.uint8)
    out, boxes = aug([a, b], [torch.tensor([[0., 0., 2., 2.]]), torch.tensor([[1., 1., 3., 3.]])])
    assert torch.allclose(out[0], a.flip(-1).float() / 255) and torch.allclose(out[1], b.flip(-1).float() / 255)
    assert boxes[0].tolist() == [[8., 0., 10., 2.]] and boxes[1].tolist() == [[9., 1., 11., 3.]]


def test_batch_augment_is_seeded_and_jitters_colour():
    x = torch.randint(0, 255, (32, 3, 16, 16), dtype=torch.uint8)
    aug = BatchAugment(hflip_p=0, brightness=0.4, contrast=0.4, saturation=0.4, mean=None, seed=4)
    y1 = aug(x)
    y2 = aug(x)                      # the stream moves on: a new draw
    assert not torch.equal(y1, y2)
    aug.reseed(4)
    assert torch.equal(aug(x), y1)   # and restarts from the seed
    ratio = (y1.mean((1, 2, 3)) / (x.float() / 255).mean((1, 2, 3)))
    assert ratio.std() > 0.05        # per-image brightness differs


def test_colour_jitter_matches_torchvision_functional_ops():
    x = torch.randint(80, 170, (16, 3, 20, 24), dtype=torch.uint8)   # mid-range: no clamping between the steps
    aug = BatchAugment(hflip_p=0.5, brightness=0.15, contrast=0.15, saturation=0.15, mean=IMAGENET_MEAN, std=IMAGENET_STD, seed=9)
    p = aug.draw(16); aug.reseed(9)
    out = aug(x)
    ref = []
    for im, (flip, b, c, s) in zip(x, p.tolist()):
        r = im.float() / 255
        if flip: r = r.flip(-1)
        r = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(r, b), c), s)
        ref.append(TF.normalize(r, list(IMAGENET_MEAN), list(IMAGENET_STD)))
    assert 0 < p[:, 0].sum() < 16
    assert torch.allclose(out, torch.stack(ref), atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
def test_batch_augment_runs_on_the_gpu(tmp_path):
    ds = make_dataset(tmp_path/'data', 'detection', n=8)
    dm = DetectionDataModule(ds, image_size=64, batch_size=8, cache_dir=tmp_path/'cache', progress=False, val_fraction=0.0)
    dm.setup()
    batch = dm.transfer_batch_to_device(next(iter(dm.train_dataloader())), torch.device('cuda'), 0)
    imgs, tgts = dm.augment_batch(batch, train=True)
    assert imgs[0].is_cuda and tgts[0]['boxes'].is_cuda and imgs[0].dtype == torch.float32
