"""`retail-cv scan` against raw zxing-cpp on the real barcode photos in ../shared/data/barcodes (zxing-cpp's samples).

Each image `NAME.ext` has its expected text in `NAME.txt`. A decode is correct when a reported code's text equals it
(CRLF read as LF: git stores the .txt files with LF line ends); every other code reported on that image is a wrong
decode, unless LABEL_NOTES below names it as a second code really printed in the photo. `falsepositives-*` hold no
code: every code reported there is a false positive. `multi-*` have no .txt: their codes are counted, not scored.

raw: one `zxingcpp.read_barcodes(image)` per image (PIL image as decoded, default options; text mode Plain so GS1
and control characters compare with the .txt as scan's do): the baseline the bar is checked against.
raw_default: the same call with every option at its default (text mode HRI: GS1 fields in parentheses, control
characters as names), shown for reference. scan: `retail_cv.apps.scan_image`.
Writes bench/results/scan.json: the table per folder, totals, and every miss and wrong decode by name.

    python bench/bench_scan.py [--data DIR]
"""
import argparse, json, os, platform, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import zxingcpp  # noqa: E402
from PIL import Image  # noqa: E402
from retail_cv.apps import scan_image  # noqa: E402
from retail_cv.core import atomic_write, utc_now  # noqa: E402

SUFFIXES = {'.png', '.jpg', '.jpeg', '.webp', '.gif', '.bmp', '.pgm'}
# codes really in a photo besides the one its .txt names, with the evidence (checked by eye on the image)
LABEL_NOTES = {
    'ean13-2/23.webp': {'9784872348880': "the digits printed under the bars read 9784872348880 (valid check digit); "
                                         "the .txt repeats 01.txt's 9780804816632, a book not in this photo"},
    'ean13-2/28.webp': {'9784872348880': "as 23.webp: the printed digits read 9784872348880"},
    'qrcode-2/16.webp': {'[外側QRコード]\n \n*ﾀﾞﾌﾞﾙQR*\nhttp://d-qr.net/ex/':
                         "a 'double QR': the outer code ('外側' = outer) around the inner one the .txt names"},
}


def _norm(t: str) -> str: return t.replace('\r\n', '\n')


def _raw(path: Path) -> list[str]:
    im = Image.open(path); im.load()
    return [r.text for r in zxingcpp.read_barcodes(im, text_mode=zxingcpp.TextMode.Plain)]


def _raw_default(path: Path) -> list[str]:
    im = Image.open(path); im.load()
    return [r.text for r in zxingcpp.read_barcodes(im)]


def _scan(path: Path) -> list[str]:
    return [c.text for c in scan_image(path).codes]


def _score(folder: Path, read) -> dict:
    row = {'images': 0, 'scored': 0, 'correct': 0, 'wrong': 0, 'codes': 0, 'noted': 0, 'seconds': 0.0, 'misses': [], 'wrong_decodes': []}
    for img in sorted(p for p in folder.iterdir() if p.suffix.lower() in SUFFIXES):
        t0 = time.perf_counter(); texts = [_norm(t) for t in read(img)]; row['seconds'] += time.perf_counter() - t0
        row['images'] += 1; row['codes'] += len(texts)
        txt = img.with_suffix('.txt')
        if folder.name.startswith('falsepositives'):
            row['wrong'] += len(texts); row['wrong_decodes'] += [f"{img.name}: {t[:60]!r}" for t in texts]; continue
        if not txt.exists(): continue
        want, notes = _norm(txt.read_text(encoding='utf-8')), LABEL_NOTES.get(f"{folder.name}/{img.name}", {})
        row['scored'] += 1
        if want in texts: row['correct'] += 1
        else: row['misses'].append(img.name)
        for t in texts:
            if t == want: continue
            if t in notes: row['noted'] += 1
            else: row['wrong'] += 1; row['wrong_decodes'].append(f"{img.name}: {t[:60]!r} (expected {want[:60]!r})")
    row['seconds'] = round(row['seconds'], 2)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--data', type=Path, default=ROOT.parent/'shared'/'data'/'barcodes', help="zxing-cpp sample folders")
    a = ap.parse_args()
    if not a.data.is_dir(): raise SystemExit(f"{a.data}: no such folder (zxing-cpp's test/samples folders)")
    folders = sorted(p for p in a.data.iterdir() if p.is_dir())
    table = {f.name: {'raw': _score(f, _raw), 'raw_default': _score(f, _raw_default), 'scan': _score(f, _scan)} for f in folders}
    tot = {k: {m: sum(table[f][k][m] for f in table) for m in ('images', 'scored', 'correct', 'wrong', 'codes', 'noted')} for k in ('raw', 'raw_default', 'scan')}
    fp = {k: sum(table[f][k]['wrong'] for f in table if f.startswith('falsepositives')) for k in ('raw', 'scan')}
    result = {
        'benchmark': 'scan', 'when': utc_now(), 'machine': platform.machine(), 'python': platform.python_version(),
        'zxing_cpp': getattr(zxingcpp, '__version__', None) or _version('zxing-cpp'), 'data': str(a.data), 'label_notes': LABEL_NOTES,
        'table': {f: {k: {m: v[m] for m in ('images', 'scored', 'correct', 'wrong', 'codes', 'noted', 'seconds')} for k, v in row.items()} for f, row in table.items()},
        'totals': tot, 'false_positives': fp,
        'gain': round(tot['scan']['correct'] / max(1, tot['raw']['correct']) - 1, 4),
        'gain_over_raw_default': round(tot['scan']['correct'] / max(1, tot['raw_default']['correct']) - 1, 4),
        'bar': {'scan >= raw in every folder': all(r['scan']['correct'] >= r['raw']['correct'] for r in table.values()),
                'scan >= 1.10 x raw overall': tot['scan']['correct'] >= 1.10 * tot['raw']['correct'],
                'no wrong decodes': tot['scan']['wrong'] - fp['scan'] == 0, 'no codes on falsepositives': fp['scan'] == 0},
        'details': {f: {k: {'misses': v['misses'], 'wrong_decodes': v['wrong_decodes']} for k, v in row.items()} for f, row in table.items()},
    }
    out = ROOT/'bench'/'results'/'scan.json'
    atomic_write(out, json.dumps(result, indent=1, ensure_ascii=False) + '\n')
    w = max(map(len, table))
    print(f"{'folder':<{w}}  raw  scan  (correct of scored; wrong raw / scan; codes; seconds)  raw_default")
    for f, r in table.items():
        print(f"{f:<{w}}  {r['raw']['correct']:>3}  {r['scan']['correct']:>4}  of {r['raw']['scored']:>3}; wrong {r['raw']['wrong']} / {r['scan']['wrong']}"
              f"  codes {r['raw']['codes']} / {r['scan']['codes']}  {r['raw']['seconds']}s / {r['scan']['seconds']}s  {r['raw_default']['correct']}")
    print(f"{'total':<{w}}  {tot['raw']['correct']:>3}  {tot['scan']['correct']:>4}  gain {result['gain']:+.1%} (over raw_default {tot['raw_default']['correct']}: {result['gain_over_raw_default']:+.1%})  bar {result['bar']}")
    print(f"wrote {out}")


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try: return version(dist)
    except PackageNotFoundError: return None


if __name__ == '__main__':
    main()
