"""Retail applications: `retail-cv scan` on real barcode photos, shelf-audit logic on synthetic shelves with their
ground truth, and `retail-cv shelf audit` end to end through a signed detector bundle (real subprocesses)."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retail_cv.apps import (PriceEntry, Slot, audit_image, boxes_from_scene, check_planogram, name_products, out_of_stock,
                            read_planogram, read_prices, runs_of_row, scan_image, shelf_rows, sku_widths)
from retail_cv.core import ConfigError, DataError

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT/'tests'/'data'/'barcodes'
CLI = str(Path(sys.executable).parent/'retail-cv')


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *args], capture_output=True, text=True, cwd=cwd, env={**os.environ, 'COLUMNS': '200'})


# --- scan -------------------------------------------------------------------------------------------------------

def test_scan_cli_reads_every_code_and_counts_products():
    r = _cli('scan', str(SAMPLES), '--json')
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    by = {Path(i['source']).name: sorted(c['text'] for c in i['codes']) for i in out['images']}
    assert by == {'ean13-1.webp': ['8480010001136'], 'ean13-blurred.webp': ['9780345348036'], 'falsepositive.webp': [],
                  'multi-3xean-8.png': ['12345670', '48512343', '67678983'], 'qrcode.png': [by['qrcode.png'][0]]}
    assert by['qrcode.png'][0].startswith('When we at WRT talk about')
    syms = {c['text']: c['symbology'] for i in out['images'] for c in i['codes']}
    assert syms['8480010001136'] == 'EAN13' and syms['12345670'] == 'EAN8' and syms[by['qrcode.png'][0]] == 'QRCode'
    counts = {c['gtin'] or c['text'][:10]: c['count'] for c in out['counts']}
    assert counts['08480010001136'] == 1 and counts['00000012345670'] == 1 and len(counts) == 6


def test_scan_retries_beat_one_plain_read_on_a_blurred_code():
    assert scan_image(SAMPLES/'ean13-blurred.webp', retry=False).codes == []
    assert [c.text for c in scan_image(SAMPLES/'ean13-blurred.webp').codes] == ['9780345348036']


def test_scan_finds_codes_rotated_past_what_one_read_takes():
    im = Image.open(SAMPLES/'ean13-1.webp').convert('L')
    tilted = im.rotate(35, resample=Image.BICUBIC, expand=True, fillcolor=255)
    codes = scan_image(tilted).codes
    assert [c.text for c in codes] == ['8480010001136'] and codes[0].valid


def test_scan_same_code_twice_counts_twice_and_a_bad_check_digit_is_never_valid():
    im = Image.open(SAMPLES/'ean13-1.webp').convert('L')
    two = Image.new('L', (im.width * 2 + 40, im.height), 255); two.paste(im, (0, 0)); two.paste(im, (im.width + 40, 0))
    assert [c.text for c in scan_image(two).codes] == ['8480010001136'] * 2
    from retail_cv.apps import check_code
    assert not check_code('EAN13', '8480010001137').valid  # whatever reader hands it over


def test_scan_unreadable_image_is_a_clear_error(tmp_path):
    (tmp_path/'broken.jpg').write_bytes(b'\xff\xd8 not really a jpeg')
    r = _cli('scan', str(tmp_path/'broken.jpg'))
    assert r.returncode == 1 and 'broken.jpg: cannot decode image' in r.stderr
    r = _cli('scan', str(tmp_path/'broken.jpg'), str(SAMPLES/'ean13-1.webp'), '--skip-errors', '--json')
    assert r.returncode == 1 and json.loads(r.stdout)['images'][1]['codes'][0]['text'] == '8480010001136'


# --- shelf logic on synthetic shelves, ground truth as detections --------------------------------------------------

@pytest.fixture(scope='module')
def shelves():
    from retail_cv.data.synth import ShelfRenderer, synth_config
    r = ShelfRenderer(synth_config(images=30, seed=21))
    return r, [r.render(i) for i in range(30)]


def _merged(shelf):
    out = []
    for s in shelf:
        if out and out[-1]['sku'] == s['sku']: out[-1] = {**out[-1], 'facings': out[-1]['facings'] + s['facings'], 'present': out[-1]['present'] + s['present']}
        else: out.append(dict(s))
    return out


def test_rows_runs_and_out_of_stock_match_the_ground_truth(shelves):
    _, scenes = shelves
    exact = 0
    for sc in scenes:
        boxes = boxes_from_scene(sc.objects)
        runs = [runs_of_row(r, sku_widths(boxes)) for r in shelf_rows(boxes)]
        assert len(runs) == len(sc.planogram)
        got = [[(r.sku, r.present) for r in rr] for rr in runs]
        assert got == [[(s['sku'], s['present']) for s in _merged(shelf)] for shelf in sc.planogram]
        # holes inside runs count exactly; sold-out runs are flagged (their facings come from the planogram)
        oos = {(o['row'], o['sku']) for o in out_of_stock(r for rr in runs for r in rr)}
        assert oos == {(i, s['sku']) for i, shelf in enumerate(sc.planogram) for s in _merged(shelf) if s['present'] < s['facings']}
        exact += all(r.facings == s['facings'] for rr, shelf in zip(runs, sc.planogram) for r, s in zip(rr, _merged(shelf)) if r.present)
    assert exact >= 28, exact


def test_planogram_of_the_scene_finds_nothing_and_a_changed_one_finds_each_change(shelves):
    _, scenes = shelves
    for sc in scenes:
        boxes = boxes_from_scene(sc.objects)
        plan = [[Slot(sku=s['sku'], facings=s['facings']) for s in shelf] for shelf in sc.planogram]
        runs = [runs_of_row(r, sku_widths(boxes)) for r in shelf_rows(boxes)]
        assert check_planogram(runs, plan) == []
        # every sold-out run now has its planned facings
        for rr, shelf in zip(runs, sc.planogram):
            for r, s in zip(rr, _merged(shelf)): assert r.facings == s['facings']
    sc = scenes[0]
    boxes = boxes_from_scene(sc.objects)
    plan = [[Slot(sku=s['sku'], facings=s['facings']) for s in shelf] for shelf in sc.planogram]
    plan[-1] = plan[-1] + [Slot(sku='SKU-NEW', facings=2)]
    first = plan[0][0]; plan[0][0] = Slot(sku=first.sku, facings=first.facings + 3)
    runs = [runs_of_row(r, sku_widths(boxes)) for r in shelf_rows(boxes)]
    issues = {(i['issue'], i['row'], i['sku']) for i in check_planogram(runs, plan)}
    assert issues == {('missing', len(plan) - 1, 'SKU-NEW'), ('wrong_facings', 0, first.sku)}


def test_a_missed_tag_does_not_merge_the_run_above_it_into_its_left_neighbour(shelves):
    _, scenes = shelves
    checked = 0
    for sc in scenes:
        photo = Image.fromarray(sc.image[..., ::-1])
        truth = boxes_from_scene(sc.objects)
        kinds = [dataclasses.replace(b, sku=None) if b.kind == 'product' else b for b in truth]  # a kinds detector, tags read
        plan = [[Slot(sku=s['sku'], facings=s['facings']) for s in shelf] for shelf in sc.planogram]
        for row in shelf_rows(truth):
            runs = runs_of_row(row, sku_widths(truth))
            for left, right in zip(runs, runs[1:]):  # two neighbouring runs with products, of two products
                if not (left.present and right.present and not right.missing and left.sku != right.sku and left.boxes[-1].kind == 'product'): continue
                tag = next(t for t in row.tags if t.sku == right.sku)
                gone = [b for b in kinds if b != tag]  # the detector missed the right run's tag
                named = {(b.x0, b.y0): b.sku for b in name_products(gone, photo) if b.kind == 'product'}
                got = [named[(b.x0, b.y0)] for b in right.boxes if b.kind == 'product']
                assert left.sku not in got  # without the photo, the tag on the left would name them all
                first = next(b for b in right.boxes if b.kind == 'product')
                assert {b.sku for b in name_products(gone) if (b.x0, b.y0, b.kind) == (first.x0, first.y0, 'product')} == {left.sku}
                audit = audit_image(photo, gone, plan, None, ocr=False)
                assert audit.planogram == []  # the plan names the unnamed run, facings and all
                assert not any(o['sku'] in (left.sku, right.sku) and o['issue'] == 'out_of_stock' for o in audit.out_of_stock)
                checked += 1
                break
            if checked >= 6: return
    assert checked >= 3, checked


def test_price_check_reads_the_tags_from_pixels(shelves, tmp_path):
    renderer, scenes = shelves
    table = {s.sku: PriceEntry(s.sku, s.price_cents, s.name, s.ean13, s.tag_ean13, s.qr_payload) for s in renderer.catalogue}
    sc = scenes[1]
    photo = Image.fromarray(sc.image[..., ::-1])
    boxes = boxes_from_scene(sc.objects)
    boxes = [dataclasses.replace(b, sku=None) if b.kind == 'price_tag' else b for b in boxes]  # tags named only by reading them
    audit = audit_image(photo, boxes, None, table, ocr=False)
    tags = [o for o in sc.objects if o.kind == 'price_tag']
    assert sorted((t['sku'], t['price']) for t in audit.tags) == sorted((o.sku, f"{o.attributes['price']:.2f}") for o in tags)
    assert audit.prices == []
    sku = tags[0].sku
    wrong = {**table, sku: dataclasses.replace(table[sku], cents=table[sku].cents + 10)}
    issues = audit_image(photo, boxes, None, wrong, ocr=False).prices
    assert {(i['issue'], i['sku']) for i in issues} == {('wrong_price', sku)}


def test_bad_planogram_and_price_table_are_clear_errors(tmp_path):
    (tmp_path/'p.yaml').write_text("shelves:\n  - [{sku: A, facings: 2}, {sku: NOPE}]\n")
    with pytest.raises(ConfigError, match=r"names 1 unknown product\(s\): NOPE"): read_planogram(tmp_path/'p.yaml', known={'A'})
    (tmp_path/'q.yaml').write_text("shelves: [[{sku: A, facings: -1}]]\n")
    with pytest.raises(ConfigError, match=r"shelves.0.0.facings"): read_planogram(tmp_path/'q.yaml')
    (tmp_path/'prices.csv').write_text("sku,price\nA,1.19\nB,\n")
    with pytest.raises(DataError, match=r"line 3: price '' is not a number"): read_prices(tmp_path/'prices.csv')


# --- retail-cv shelf audit through a signed bundle ----------------------------------------------------------------

@pytest.fixture(scope='module')
def bundle(tmp_path_factory, shelves):
    "A tiny untrained SSDlite shelf detector (product, gap, price_tag), signed; the workspace that trusts it; photos."
    torch = pytest.importorskip('torch')
    from retail_cv.bundle import build_bundle, generate_signing_key
    from retail_cv.core import Workspace
    from retail_cv.models import ModelSpec, build_model, example_input, recalibrate_batchnorm, to_onnx, wrap
    root = tmp_path_factory.mktemp('apps')
    ws = Workspace.open(root/'ws'); generate_signing_key(ws)
    renderer, scenes = shelves
    photos = []
    for i in range(2):
        Image.fromarray(scenes[i].image[..., ::-1]).save(root/f'shelf{i}.jpg', quality=92); photos.append(root/f'shelf{i}.jpg')
    torch.manual_seed(0)
    spec = ModelSpec(task='detection', num_classes=3, max_detections=20)
    det = wrap(recalibrate_batchnorm(build_model(spec), example_input(spec, 4, seed=9)), spec)
    b = build_bundle(root/'det', to_onnx(det, root/'det.onnx'), name='shelf-detector', version='1', labels=['product', 'gap', 'price_tag'],
                     contract=det.contract(), golden_images=photos[:1], workspace=ws, profile='shelf-cam-x86')
    lines = ['sku,name,price,ean13,tag_ean13,qr_payload'] + [f"{s.sku},{s.name},{s.price},{s.ean13},{s.tag_ean13},{s.qr_payload}" for s in renderer.catalogue]
    (root/'prices.csv').write_text('\n'.join(lines) + '\n')
    plan = {'shelves': [[{'sku': s['sku'], 'facings': s['facings']} for s in shelf] for shelf in scenes[0].planogram]}
    (root/'plan.yaml').write_text(json.dumps(plan))
    return dict(root=root, ws=root/'ws', bundle=b, photos=photos)


def test_shelf_audit_cli_runs_a_bundle_and_writes_json_images_and_html(bundle):
    root = bundle['root']
    r = _cli('--workspace', str(bundle['ws']), 'shelf', 'audit', str(bundle['bundle']), *map(str, bundle['photos']),
             '--planogram', str(root/'plan.yaml'), '--prices', str(root/'prices.csv'), '--out', str(root/'report'), '--json', '--no-ocr')
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [Path(i['source']).name for i in out['images']] == ['shelf0.jpg', 'shelf1.jpg']
    for i in out['images']:
        assert set(i) >= {'rows', 'facings', 'out_of_stock', 'planogram', 'prices', 'tags', 'counts'}
        assert isinstance(i['planogram'], list) and isinstance(i['prices'], list)
    files = sorted(p.name for p in (root/'report').iterdir())
    assert files == ['0000-shelf0.png', '0001-shelf1.png', 'audit.json', 'index.html']
    assert Image.open(root/'report'/'0000-shelf0.png').size == Image.open(bundle['photos'][0]).size
    assert 'shelf0.jpg' in (root/'report'/'index.html').read_text()
    r = _cli('--workspace', str(bundle['ws']), 'shelf', 'audit', str(bundle['bundle']), str(bundle['photos'][0]), '--no-ocr')
    assert r.returncode == 0 and 'shelf0.jpg' in r.stdout


def test_shelf_audit_cli_refuses_bad_inputs_with_clear_errors(bundle, tmp_path):
    root, ws, b = bundle['root'], str(bundle['ws']), str(bundle['bundle'])
    (tmp_path/'plan.yaml').write_text("shelves:\n  - [{sku: SKU-UNKNOWN, facings: 2}]\n")
    r = _cli('--workspace', ws, 'shelf', 'audit', b, str(bundle['photos'][0]), '--planogram', str(tmp_path/'plan.yaml'), '--prices', str(root/'prices.csv'))
    assert r.returncode == 1 and 'unknown product(s): SKU-UNKNOWN' in r.stderr
    (tmp_path/'prices.csv').write_text("sku,price\nA,1.19\nA,2.00\n")
    r = _cli('--workspace', ws, 'shelf', 'audit', b, str(bundle['photos'][0]), '--prices', str(tmp_path/'prices.csv'))
    assert r.returncode == 1 and 'line 3: sku A is listed twice' in r.stderr
    (tmp_path/'broken.jpg').write_bytes(b'not an image')
    r = _cli('--workspace', ws, 'shelf', 'audit', b, str(tmp_path/'broken.jpg'))
    assert r.returncode == 1 and 'broken.jpg: cannot decode image' in r.stderr
    r = _cli('shelf', 'audit', b, str(bundle['photos'][0]), '--trusted-key', str(tmp_path/'nokey.pub'))
    assert r.returncode != 0


# --- picking and returns -------------------------------------------------------------------------------------------

def test_pick_cli_reports_each_line_and_exits_3_on_a_mismatch(tmp_path):
    (tmp_path/'order.csv').write_text("item,quantity\n12345670,1\n48512343,2\n8480010001136,1\n")
    r = _cli('pick', str(tmp_path/'order.csv'), str(SAMPLES/'multi-3xean-8.png'), str(SAMPLES/'ean13-1.webp'), '--json')
    assert r.returncode == 3, r.stderr
    lines = {l['item']: (l['ordered'], l['picked'], l['status']) for l in json.loads(r.stdout)['lines']}
    assert lines == {'00000012345670': (1, 1, 'ok'), '00000048512343': (2, 1, 'short'), '08480010001136': (1, 1, 'ok'),
                     '00000067678983': (0, 1, 'not_ordered')}
    (tmp_path/'exact.csv').write_text("item,quantity\n12345670,1\n48512343,1\n67678983,1\n")
    assert _cli('pick', str(tmp_path/'exact.csv'), str(SAMPLES/'multi-3xean-8.png')).returncode == 0
    (tmp_path/'bad.csv').write_text("item,quantity\n12345671,1\n")
    r = _cli('pick', str(tmp_path/'bad.csv'), str(SAMPLES/'multi-3xean-8.png'))
    assert r.returncode == 1 and 'line 2: EAN8: check digit 1 of 12345671 should be 0' in r.stderr


def test_returns_cli_accepts_or_flags_with_reasons(tmp_path):
    (tmp_path/'receipt.csv').write_text("item,quantity\n8480010001136,1\n")
    r = _cli('returns', str(SAMPLES/'ean13-1.webp'), '--receipt', str(tmp_path/'receipt.csv'), '--json')
    assert r.returncode == 0 and json.loads(r.stdout) == {'decision': 'accept', 'item': '08480010001136', 'reasons': []}
    r = _cli('returns', str(SAMPLES/'ean13-blurred.webp'), '--receipt', str(tmp_path/'receipt.csv'), '--condition', 'opened', '--json')
    assert r.returncode == 3
    assert json.loads(r.stdout)['reasons'] == ['09780345348036 is not on the receipt', 'condition: opened']
    r = _cli('returns', str(SAMPLES/'falsepositive.webp'), '--receipt', str(tmp_path/'receipt.csv'))
    assert r.returncode == 3 and 'no valid code read' in r.stdout
    r = _cli('returns', str(SAMPLES/'ean13-1.webp'), '--receipt', str(tmp_path/'receipt.csv'), '--condition', 'wet')
    assert r.returncode == 1 and '--condition must be ok, opened or damaged' in r.stderr
