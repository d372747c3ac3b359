"""Shelf-audit accuracy on synthetic shelves from seeds training never saw, on pixels through an exported detector bundle.

The bundle: `--bundle` (with `--workspace` for its trusted keys), or the champion detector bundle of a demo workspace
(`--workspace` alone), or a detector trained here (`--train-minutes M`): the demo's recipe (its pipeline's `shelves`,
`train_detector` and `export_detector_<profile>` steps, run through the job runner) in a fresh workspace.

For each held-out seed, `--shelves` shelves are rendered with the demo's framing and stored as the demo stores them,
then every shelf is detected with the bundle on the torch-free runtime and audited by `apps.audit_image` (tags read
from pixels: code by zxing-cpp, printed price by Tesseract unless `--no-ocr`; tags the detector missed found by their
codes, `apps.tags_by_code`) against:
- a price table: the generator's, with `--price-changes` products repriced (`demo.changed_prices`): their tags are the
  true wrong prices;
- a store planogram: the generator's plan with ONE known change per shelf, cycling through four kinds so the truth
  holds issues of each: two neighbouring runs swapped (-> `misplaced`, either product), a run's facing count changed
  (-> `wrong_facings`), a product that is not on the shelf added (-> `missing`), a run left out of the plan
  (-> `extra`). Changes touch only runs with product on the shelf, so out of stock is the same as with the true plan.
Scores: out of stock at facing level and wrong-price tags by `demo.score_audits`; planogram issues matched to the
true ones by row + product + kind (F1). Two references run on the same shelves: `oracle` (the generator's own boxes
with their SKUs, no tag reading: checks the planogram logic and the truth built here) and `truth_boxes` (the
generator's boxes as kinds, tags read from pixels exactly as with the bundle: everything but the detector). The gap
between truth_boxes and bundle is the detector's; between oracle and truth_boxes, tag reading and naming. Detection
stages count the detector's own boxes; `price_tags_found_by_code` counts the tags its codes found on top.
Writes bench/results/shelf_audit.json: per seed and pooled numbers, per-stage diagnostics, timings, targets met or not.

    python bench/bench_shelf_audit.py --workspace /tmp/dh15/ws                    # its champion detector bundle
    python bench/bench_shelf_audit.py --train-minutes 12 [--workspace NEW_DIR]    # train one here first
    options: --shelves 200 --seeds 1001 1002 1003 --no-ocr --no-references --price-changes 3 --min-score 0.3
"""
import argparse, io, json, os, platform, shutil, statistics, subprocess, sys, tempfile, time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from retail_cv.apps import Box, Slot, audit_image, boxes_from_detections, tesseract_available  # noqa: E402
from retail_cv.core import Workspace, atomic_write, utc_now  # noqa: E402
from retail_cv.data.formats import load_dataset  # noqa: E402
from retail_cv.data.store import DatasetStore  # noqa: E402
from retail_cv.data.synth import generate_shelves, shelf_kinds  # noqa: E402
from retail_cv.demo import DemoConfig, changed_prices, demo_pipeline, score_audits, shelf_truth, truth_prices  # noqa: E402
from retail_cv.demo._audit import _iou, _xyxy  # noqa: E402
from retail_cv.apps._planogram import _merged  # noqa: E402  (the grouping the planogram check aligns: one home)

GROCERY = ROOT.parent/'shared'/'data'/'grocery'
# the real-photos issue's realism options that fit a camera framing one or two shelves: price-first tags at real-photo
# sizes (28-48 px) model a far camera, so tags keep their scannable codes here
REALISM = {'faces': str(GROCERY), 'skus': 200, 'edge_clutter': 0.8, 'roll': 5.0}
TARGETS = {'out_of_stock_precision': 0.9, 'out_of_stock_recall': 0.9, 'planogram_f1': 0.85,
           'wrong_price_precision': 0.95, 'wrong_price_recall': 0.9}
PLAN_KINDS = ('misplaced', 'wrong_facings', 'missing', 'extra')


# ---------------------------------------------------------------- the bundle

def _train(ws: Workspace, minutes: float, shelf_images: int, profile: str, realism: dict) -> tuple[str, dict]:
    "A detector trained and exported by the demo's own pipeline steps (data, train, export for one profile), on shelves with `realism`."
    from retail_cv.jobs import jobs_dir, load_run
    from retail_cv.pipeline import parse_pipeline, run_pipeline
    cfg = DemoConfig(detector_minutes=minutes, shelf_images=shelf_images, profiles=[profile])
    spec = demo_pipeline(cfg)
    export = f"export_detector_{profile.replace('-', '_').replace('.', '_')}"
    spec = {'name': 'bench-shelf-audit', 'steps': {k: spec['steps'][k] for k in ('shelves', 'train_detector', export)}}
    spec['steps']['shelves']['params']['synth_config'].update(realism)
    t0 = time.perf_counter()
    run = run_pipeline(parse_pipeline(spec, base=jobs_dir()), ws,
                       on_step=lambda s: print(f"  {s.step}: {s.status}", flush=True))
    if run.status != 'completed': raise SystemExit(f"training pipeline failed: {[(s.step, s.status, s.error) for s in run.steps]}")
    recs = {s.step: load_run(s.run_id, ws) for s in run.steps}
    tr = recs['train_detector'].outputs
    info = {'trained_here': True, 'seconds': round(time.perf_counter() - t0, 1), 'train_seed': cfg.seed,
            'shelf_images': cfg.shelf_images, 'max_minutes': minutes, 'best_score': tr.get('best_score'), 'monitor': tr.get('monitor'),
            'epochs': int((tr.get('metrics') or {}).get('epoch', -1)) + 1, 'params': spec['steps']['train_detector']['params']}
    return recs[export].artifacts['bundle']['path'], info


def _champion(ws: Workspace, profile: str) -> tuple[str, dict]:
    "The champion detector bundle of a demo workspace, with what trained it."
    from retail_cv.demo import champion_bundle
    from retail_cv.registry import Registry
    mv = Registry(ws).get('shelf-detector', 'champion')
    return champion_bundle(ws, 'detector', profile), {'trained_here': False, 'model': mv.ref, 'params': mv.params,
                                                     'data': list(mv.dataset_versions), 'metrics': mv.metrics}


# ---------------------------------------------------------------- shelves and the store's planogram

def _render(ws: Workspace, seed: int, n: int, framing: dict, tmp: Path):
    "`n` held-out shelves of `seed`, stored as the demo stores them (kinds, each annotation keeping product, shelf, slot)."
    out = tmp/f'synth-{seed}'
    generate_shelves(out, {**framing, 'val_fraction': 1.0}, images=n, seed=seed)
    v = DatasetStore(ws).ingest(shelf_kinds(load_dataset(out)), f'bench-heldout-{seed}', progress=False)
    shutil.rmtree(out)
    return v


def _present(anns, names) -> dict[tuple[int, int], int]:
    "Facings with a product on the shelf per (shelf, slot)."
    c = Counter()
    for a in anns:
        if names[a.category_id] == 'product': c[(a.attributes['shelf'], a.attributes['slot'])] += 1
    return c


def _merged_present(anns, names) -> list[list[int]]:
    "Products present per merged run of each row, as `_merged` groups the plan's slots."
    pres, slots = _present(anns, names), {}
    for a in anns:
        if names[a.category_id] != 'price_tag': slots[(a.attributes['shelf'], a.attributes['slot'])] = a.attributes['sku']
    out = []
    for sh in sorted({k[0] for k in slots}):
        row, last = [], None
        for k in sorted(k for k in slots if k[0] == sh):
            if row and slots[k] == last: row[-1] += pres[k]
            else: row.append(pres[k])
            last = slots[k]
        out.append(row)
    return out


def perturb_plan(plan: list[list[Slot]],  # the shelves' true plan (per row, left to right)
                 present: list[list[int]],  # products present per merged run
                 kind: str,  # which change: misplaced, wrong_facings, missing or extra
                 other_skus: list[str],  # products not on this shelf (for `missing`)
                 rng: np.random.Generator,
                ) -> tuple[list[list[Slot]], dict | None]:
    "The store's plan: the true plan with one change of `kind`, and the issue it makes (row, kind, products); None if none fits."
    rows = [_merged(r) for r in plan]
    cands = []
    for i, r in enumerate(rows):
        skus = [s.sku for s in r]
        for j, s in enumerate(r):
            left, right = (skus[j - 1] if j else None), (skus[j + 1] if j + 1 < len(r) else None)
            if kind == 'misplaced' and right is not None and present[i][j] and present[i][j + 1] and skus.count(s.sku) == 1 \
               and skus.count(right) == 1 and left != right and (skus[j + 2] if j + 2 < len(r) else None) != s.sku:
                cands.append((i, j))
            if kind == 'wrong_facings' and present[i][j]: cands.append((i, j))
            if kind == 'extra' and present[i][j] and len(r) > 1 and left != right \
               and sum(x.sku == s.sku for rr in rows for x in rr) == 1: cands.append((i, j))
        if kind == 'missing' and other_skus:
            cands += [(i, j) for j in range(len(r) + 1)]
    if not cands: return plan, None
    i, j = cands[int(rng.integers(len(cands)))]
    r = list(rows[i])
    if kind == 'misplaced':
        r[j], r[j + 1] = r[j + 1], r[j]; issue = {'row': i, 'kind': kind, 'skus': [r[j].sku, r[j + 1].sku]}
    elif kind == 'wrong_facings':
        f = r[j].facings
        r[j] = Slot(sku=r[j].sku, facings=f - 1 if f > 1 and rng.random() < 0.5 else f + 1)
        issue = {'row': i, 'kind': kind, 'skus': [r[j].sku], 'planned': r[j].facings, 'true': f}
    elif kind == 'missing':
        sku = other_skus[int(rng.integers(len(other_skus)))]
        r.insert(j, Slot(sku=sku, facings=int(rng.integers(1, 4)))); issue = {'row': i, 'kind': kind, 'skus': [sku]}
    else:
        issue = {'row': i, 'kind': kind, 'skus': [r[j].sku]}; del r[j]
    return [r if k == i else rows[k] for k in range(len(rows))], issue


def score_planogram(found: list[list[dict]],  # per shelf: the audit's planogram issues
                    true: list[list[dict]],  # per shelf: the issues the plan's changes make (row, kind, skus)
                   ) -> dict:
    "Found planogram issues against the true ones, matched one to one by row + kind + product: precision, recall, F1, per kind."
    true = true[:len(found)]  # a reference run may cover the first shelves only
    tp, per = 0, {k: Counter() for k in PLAN_KINDS}
    fp_kinds = Counter()
    for f, t in zip(found, true):
        used = set()
        for issue in t:
            per[issue['kind']]['true'] += 1
            k = next((n for n, x in enumerate(f) if n not in used and x['issue'] == issue['kind'] and x.get('row') == issue['row']
                      and x.get('sku') in issue['skus']), None)
            if k is not None: used.add(k); tp += 1; per[issue['kind']]['matched'] += 1
        for n, x in enumerate(f):
            if x['issue'] in per: per[x['issue']]['found'] += 1
            if n not in used:
                fp_kinds[x['issue']] += 1
                if x['issue'] == 'wrong_facings': fp_kinds['wrong_facings_counted_' + ('fewer' if x['found'] < x['planned'] else 'more')] += 1
    nf, nt = sum(map(len, found)), sum(map(len, true))
    p, r = (tp / nf if nf else None), (tp / nt if nt else None)
    return {'found': nf, 'true': nt, 'matched': tp, 'precision': _r(p), 'recall': _r(r),
            'f1': _r(2 * tp / (nf + nt)) if nf + nt else None,
            'per_kind': {k: {'true': v['true'], 'found': v['found'], 'matched': v['matched'],
                             'recall': _r(v['matched'] / v['true']) if v['true'] else None} for k, v in per.items()},
            'unmatched_found': dict(sorted(fp_kinds.items()))}


def _r(x): return None if x is None else round(x, 4)


# ---------------------------------------------------------------- boxes, audits, diagnostics

def _truth_boxes(anns, names, skus: bool) -> list[Box]:
    "The generator's own boxes: as kinds only (a kinds detector's view), or with products and tags named (oracle)."
    out = []
    for a in anns:
        kind = names[a.category_id]
        out.append(Box(*_xyxy(a.bbox), kind, a.attributes.get('sku') if skus and kind != 'gap' else None))
    return out


def _match(found: list[tuple], true: list[tuple], min_iou: float = 0.5) -> list[tuple[int, int]]:
    "One-to-one (found, true) index pairs by IoU, best first."
    pairs = sorted(((_iou(f, t), i, j) for i, f in enumerate(found) for j, t in enumerate(true)), reverse=True)
    uf, ut, out = set(), set(), []
    for v, i, j in pairs:
        if v < min_iou: break
        if i in uf or j in ut: continue
        uf.add(i); ut.add(j); out.append((i, j))
    return out


def _diagnose(audit, anns, names, changed: set[str], d: Counter) -> None:
    "Where one shelf's audit loses, stage by stage: detection per kind, tag reading, naming, rows, price-issue sources."
    true = {k: [(_xyxy(a.bbox), a) for a in anns if names[a.category_id] == k] for k in ('product', 'gap', 'price_tag')}
    by_code = {tuple(t['box']) for t in audit.tags if t.get('found_by') == 'code'}
    is_code = lambda b: tuple(round(v, 1) for v in (b.x0, b.y0, b.x1, b.y1)) in by_code
    for k in true:
        found = [b for b in audit.boxes if b.kind == k and not is_code(b)]  # the detector's own boxes
        pairs = _match([(b.x0, b.y0, b.x1, b.y1) for b in found], [t for t, _ in true[k]])
        detected = {j for _, j in pairs}
        d[f'{k}_true'] += len(true[k]); d[f'{k}_found'] += len(found); d[f'{k}_matched'] += len(pairs)
        if k == 'product':  # naming: the SKU its tag gave it
            d['product_named_right'] += sum(found[i].sku == true[k][j][1].attributes['sku'] for i, j in pairs)
        if k == 'gap':
            d['gap_facings_true_of_matched'] += sum(true[k][j][1].attributes['facings'] for _, j in pairs)
            d['gap_facings_true_of_missed'] += sum(a.attributes['facings'] for n, (_, a) in enumerate(true[k]) if n not in {j for _, j in pairs})
        if k == 'price_tag':
            tags = audit.tags
            pairs = _match([tuple(t['box']) for t in tags], [t for t, _ in true[k]], 0.3)
            d['tags_read_matched'] += len(pairs)
            for i, j in pairs:
                a, t = true[k][j][1], tags[i]
                d['tag_code_read_right'] += t['sku'] == a.attributes['sku']
                d['tag_code_read_wrong'] += bool(t['sku']) and t['sku'] != a.attributes['sku']
                d['tag_printed_read'] += t['printed_price'] is not None
                d['tag_printed_right'] += t['printed_price'] == f"{a.attributes['price']:.2f}"
                if a.attributes['sku'] in changed: d['repriced_tags_detected'] += 1; d['repriced_tags_code_read'] += t['sku'] == a.attributes['sku']
            d['repriced_tags_true'] += sum(a.attributes['sku'] in changed for _, a in true[k])
            # tags found by their codes: a code-sized box, so matched by its centre lying in a tag the detector missed
            missed = [t for n, (t, _) in enumerate(true[k]) if n not in detected]
            for b in (b for b in audit.boxes if b.kind == k and is_code(b)):
                d['price_tag_by_code_found'] += 1
                hit = next((t for t in missed if t[0] <= (b.x0 + b.x1) / 2 <= t[2] and t[1] <= (b.y0 + b.y1) / 2 <= t[3]), None)
                if hit is not None: d['price_tag_by_code_matched'] += 1; missed.remove(hit)
    n_rows = len({a.attributes['shelf'] for a in anns if names[a.category_id] != 'price_tag'})
    d['shelves'] += 1; d['rows_true'] += n_rows; d['rows_found'] += len(audit.runs); d['shelves_row_count_right'] += len(audit.runs) == n_rows
    for i in audit.prices or []:
        if i['issue'] == 'wrong_price':
            d[f"wrong_price_issues_by_{i['source']}"] += 1
            d[f"wrong_price_issues_by_{i['source']}_repriced"] += i['sku'] in changed


def _stages(d: Counter) -> dict:
    "The diagnostics as rates."
    rate = lambda a, b: _r(d[a] / d[b]) if d[b] else None
    return {
        'detection_recall_iou50': {k: rate(f'{k}_matched', f'{k}_true') for k in ('product', 'gap', 'price_tag')},
        'detection_precision_iou50': {k: rate(f'{k}_matched', f'{k}_found') for k in ('product', 'gap', 'price_tag')},
        'price_tags_found_by_code': {'found': d['price_tag_by_code_found'], 'missed_by_detector_found': d['price_tag_by_code_matched'],
                                     'tag_recall_with_codes': _r((d['price_tag_matched'] + d['price_tag_by_code_matched']) / d['price_tag_true']) if d['price_tag_true'] else None},
        'missing_facings_in_detected_gaps': _r(d['gap_facings_true_of_matched'] / max(1, d['gap_facings_true_of_matched'] + d['gap_facings_true_of_missed'])),
        'products_named_right_of_detected': rate('product_named_right', 'product_matched'),
        'tag_code_read_right_of_detected': rate('tag_code_read_right', 'tags_read_matched'),
        'tag_code_read_wrong': d['tag_code_read_wrong'],
        'tag_printed_price_right_of_detected': rate('tag_printed_right', 'tags_read_matched'),
        'tag_printed_price_read_of_detected': rate('tag_printed_read', 'tags_read_matched'),
        'repriced_tags': {'true': d['repriced_tags_true'], 'detected': d['repriced_tags_detected'], 'code_read': d['repriced_tags_code_read']},
        'shelves_row_count_right': rate('shelves_row_count_right', 'shelves'),
        'rows': {'true': d['rows_true'], 'found': d['rows_found']},
        'wrong_price_issues_by_source': {k[len('wrong_price_issues_by_'):]: v for k, v in sorted(d.items()) if k.startswith('wrong_price_issues_by_')},
        'counts': dict(sorted(d.items())),
    }


def _audit_seed(predictor, version, seed: int, args, ref_modes: list[str]) -> dict:
    "Every shelf of one seed through the bundle (and the references): audits, scores, diagnostics, timings."
    ds, names = version.dataset, version.dataset.category_names
    by = ds.annotations_by_image()
    truth = shelf_truth(version)
    table = truth_prices(version)
    prices, changed = changed_prices(table, args.price_changes, seed)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 15]))
    modes = ['bundle'] + ref_modes
    audits, plans_true, t_detect, t_audit = {m: [] for m in modes}, [], [], []
    oos_same_with_true_plan, diag = 0, {m: Counter() for m in modes}
    t0 = time.perf_counter()
    for n, im in enumerate(ds.images):
        anns, t = by.get(im.id, []), truth[im.file_name]
        on_shelf = {s.sku for r in t['plan'] for s in r}
        plan, issue = t['plan'], None
        for k in range(len(PLAN_KINDS)):  # this shelf's kind in turn, else the next that fits it
            plan, issue = perturb_plan(t['plan'], _merged_present(anns, names), PLAN_KINDS[(n + k) % len(PLAN_KINDS)],
                                       sorted(set(table) - on_shelf), rng)
            if issue: break
        plans_true.append([issue] if issue else [])
        data = version.read_bytes(im.file_name)
        photo = Image.open(io.BytesIO(data)).convert('RGB')
        a = time.perf_counter(); det = predictor.predict(data); b = time.perf_counter()
        boxes = boxes_from_detections(det, args.min_score)
        audits['bundle'].append(audit_image(photo, boxes, plan, prices, ocr=args.ocr, name=im.file_name))
        t_detect.append(b - a); t_audit.append(time.perf_counter() - b)
        for m in ref_modes:
            oracle = m == 'oracle'
            if not oracle and n >= args.reference_shelves: continue
            audits[m].append(audit_image(photo, _truth_boxes(anns, names, oracle), plan, prices, read_tags=not oracle,
                                         ocr=args.ocr, name=im.file_name))
            if oracle:  # out of stock does not depend on the plan's change
                same = audit_image(photo, _truth_boxes(anns, names, True), t['plan'], prices, read_tags=False, name=im.file_name)
                oos_same_with_true_plan += same.out_of_stock == audits[m][-1].out_of_stock
        for m in modes:
            if len(audits[m]) == n + 1: _diagnose(audits[m][-1], anns, names, set(changed), diag[m])
        if (n + 1) % 50 == 0: print(f"  seed {seed}: {n + 1}/{len(ds.images)} shelves, {time.perf_counter() - t0:.0f} s", flush=True)
    out = {'seed': seed, 'shelves': len(ds.images), 'reference_shelves': {m: len(audits[m]) for m in ref_modes}, 'dataset': version.ref, 'repriced': changed, 'planogram_changes': dict(Counter(
        i['kind'] for p in plans_true for i in p)), 'seconds': round(time.perf_counter() - t0, 1),
        'per_shelf_s': {'detect_median': _r(statistics.median(t_detect)), 'audit_median': _r(statistics.median(t_audit)),
                        'audit_p90': _r(float(np.percentile(t_audit, 90)))}}
    for m in modes:
        s = score_audits(audits[m], truth, changed)
        out[m] = {'out_of_stock_facings': s['out_of_stock_facings'], 'wrong_price_tags': s['wrong_price_tags'],
                  'planogram': score_planogram([a.planogram or [] for a in audits[m]], plans_true), 'tags_read': s['tags_read'],
                  'price_findings': dict(Counter(i['issue'] for a in audits[m] for i in a.prices or [])), 'stages': _stages(diag[m]),
                  '_raw': {'oos': s['out_of_stock_facings'], 'wp': s['wrong_price_tags'], 'diag': diag[m]}}
    if 'oracle' in ref_modes: out['oracle']['out_of_stock_same_as_with_true_plan'] = f"{oos_same_with_true_plan}/{len(ds.images)}"
    return out


# ---------------------------------------------------------------- pooling and the report

def _pool(seeds: list[dict], mode: str) -> dict:
    "Counts summed over seeds, rates recomputed."
    oos, wp = Counter(), Counter()
    for s in seeds:
        oos.update({k: s[mode]['_raw']['oos'].get(k, 0) for k in ('found', 'true', 'matched')})
        wp.update({k: s[mode]['_raw']['wp'].get(k, 0) for k in ('found', 'true', 'matched')})
    pl = Counter()
    for s in seeds: pl.update({k: s[mode]['planogram'][k] for k in ('found', 'true', 'matched')})
    per = {k: Counter() for k in PLAN_KINDS}
    unmatched = Counter()
    for s in seeds:
        for k in PLAN_KINDS: per[k].update({x: s[mode]['planogram']['per_kind'][k][x] for x in ('found', 'true', 'matched')})
        unmatched.update(s[mode]['planogram']['unmatched_found'])
    diag = Counter()
    for s in seeds: diag.update(s[mode]['_raw']['diag'])
    ratio = lambda a, b: _r(a / b) if b else None
    return {'out_of_stock_facings': {**oos, 'precision': ratio(oos['matched'], oos['found']), 'recall': ratio(oos['matched'], oos['true'])},
            'wrong_price_tags': {**wp, 'precision': ratio(wp['matched'], wp['found']), 'recall': ratio(wp['matched'], wp['true'])},
            'planogram': {**pl, 'precision': ratio(pl['matched'], pl['found']), 'recall': ratio(pl['matched'], pl['true']),
                          'f1': ratio(2 * pl['matched'], pl['found'] + pl['true']),
                          'per_kind': {k: {'true': v['true'], 'found': v['found'], 'matched': v['matched'], 'recall': ratio(v['matched'], v['true'])}
                                       for k, v in per.items()},
                          'unmatched_found': dict(sorted(unmatched.items()))},
            'stages': _stages(diag)}


def _headline(p: dict) -> dict:
    return {'out_of_stock_precision': p['out_of_stock_facings']['precision'], 'out_of_stock_recall': p['out_of_stock_facings']['recall'],
            'planogram_f1': p['planogram']['f1'], 'wrong_price_precision': p['wrong_price_tags']['precision'],
            'wrong_price_recall': p['wrong_price_tags']['recall']}


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try: return version(dist)
    except PackageNotFoundError: return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--bundle', type=Path, help="detector bundle (kinds product, gap, price_tag); trusted keys from --workspace")
    ap.add_argument('--workspace', type=Path, help="demo workspace (its champion detector bundle, its keys); with --train-minutes a new folder")
    ap.add_argument('--train-minutes', type=float, help="train a detector with the demo's recipe for this many minutes first")
    ap.add_argument('--train-shelves', type=int, default=DemoConfig().shelf_images, help="synthetic shelves to train on")
    ap.add_argument('--profile', default=DemoConfig().profiles[0], help="device profile of the bundle (the demo audits with its first)")
    ap.add_argument('--shelves', type=int, default=200, help="held-out shelves per seed")
    ap.add_argument('--seeds', type=int, nargs='+', default=[1001, 1002, 1003], help="held-out seeds (training uses the demo's seed)")
    ap.add_argument('--price-changes', type=int, default=DemoConfig().price_changes, help="products repriced in the store's table")
    ap.add_argument('--min-score', type=float, default=0.3, help="detections below this confidence are ignored (the demo's)")
    ap.add_argument('--no-ocr', dest='ocr', action='store_false', help="read tags by their codes only (no Tesseract)")
    ap.add_argument('--no-references', dest='references', action='store_false', help="skip the oracle and truth-box runs")
    ap.add_argument('--reference-shelves', type=int, default=100, help="shelves per seed of the truth-box run (it reads every tag again)")
    ap.add_argument('--realism', action='store_true', help="render training and held-out shelves with REALISM (needs ../shared/data/grocery)")
    ap.add_argument('--out', type=Path, help="default bench/results/shelf_audit.json, or shelf_audit_realism.json with --realism")
    a = ap.parse_args()
    a.out = a.out or ROOT/'bench'/'results'/('shelf_audit_realism.json' if a.realism else 'shelf_audit.json')
    if a.realism and not GROCERY.is_dir(): raise SystemExit(f"--realism needs the Grocery Store photos at {GROCERY}")
    from retail_cv.runtime import Predictor
    if a.train_minutes is None and a.workspace is None: raise SystemExit("give --workspace (a demo workspace), --bundle with --workspace, or --train-minutes")
    if a.ocr and not tesseract_available(): raise SystemExit("tesseract is not installed: install it or pass --no-ocr")
    train_seed = DemoConfig().seed
    if train_seed in a.seeds or DemoConfig().heldout_seed in a.seeds:
        raise SystemExit(f"held-out seeds must differ from the training seed {train_seed} (and the demo's held-out seed)")
    load0, t_start = os.getloadavg(), time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix='bench-shelf-audit-'))
    if a.train_minutes is not None:
        ws_dir = a.workspace or tmp/'ws'
        if ws_dir.exists() and any(ws_dir.iterdir()): raise SystemExit(f"{ws_dir} is not empty: training needs a fresh workspace")
        ws = Workspace.open(ws_dir)
        print(f"training the demo's detector for {a.train_minutes} min in {ws_dir}", flush=True)
        bundle, trained = _train(ws, a.train_minutes, a.train_shelves, a.profile, REALISM if a.realism else {})
    else:
        ws = Workspace.open(a.workspace)
        bundle, trained = (str(a.bundle), {'trained_here': False}) if a.bundle else _champion(ws, a.profile)
    predictor = Predictor.from_bundle(bundle, workspace=ws)
    if predictor.task != 'detection' or not {'gap', 'price_tag'} <= set(predictor.labels):
        raise SystemExit(f"{bundle}: not a shelf detector (labels {predictor.labels})")
    store_ws = Workspace.open(tmp/'heldout-ws')  # the held-out shelves stay out of the model's workspace
    framing = {**demo_pipeline(DemoConfig())['steps']['heldout']['params']['synth_config'], **(REALISM if a.realism else {})}
    ref_modes = ['oracle', 'truth_boxes'] if a.references else []
    print(f"bundle {bundle}\n{a.shelves} shelves x seeds {a.seeds}, OCR {'on' if a.ocr else 'off'}, references {ref_modes or 'off'}", flush=True)
    seeds = []
    try:
        for seed in a.seeds:
            t0 = time.perf_counter()
            version = _render(store_ws, seed, a.shelves, {k: v for k, v in framing.items() if k != 'val_fraction'}, tmp)
            render_s = time.perf_counter() - t0
            s = _audit_seed(predictor, version, seed, a, ref_modes); s['render_s'] = round(render_s, 1)
            seeds.append(s)
            h = _headline(s['bundle'])
            print(f"seed {seed}: {s['shelves']} shelves in {s['seconds']:.0f} s (+{render_s:.0f} s render): "
                  + ', '.join(f"{k} {v}" for k, v in h.items())
                  + (f" | truth boxes: " + ', '.join(f"{k} {v}" for k, v in _headline(s['truth_boxes']).items()) if a.references else ''), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    pooled = {m: _pool(seeds, m) for m in ['bundle'] + ref_modes}
    head = _headline(pooled['bundle'])
    per_seed_head = [_headline(s['bundle']) for s in seeds]
    med = {k: _r(statistics.median([h[k] for h in per_seed_head if h[k] is not None])) if any(h[k] is not None for h in per_seed_head) else None for k in TARGETS}
    for s in seeds:
        for m in ['bundle'] + ref_modes: s[m].pop('_raw')
    tess = subprocess.run(['tesseract', '--version'], capture_output=True, text=True).stdout.split('\n')[0] if tesseract_available() else None
    result = {
        'benchmark': 'shelf_audit', 'when': utc_now(), 'wall_s': round(time.perf_counter() - t_start, 1),
        'machine': {'cpus': os.cpu_count(), 'platform': platform.platform(), 'python': platform.python_version(),
                    'onnxruntime': _version('onnxruntime'), 'zxing_cpp': _version('zxing-cpp'), 'tesseract': tess,
                    'loadavg_start': load0, 'loadavg_end': os.getloadavg()},
        'settings': {'bundle': str(bundle), 'profile': a.profile, 'model': repr(predictor),
                     'detector': trained, 'shelves_per_seed': a.shelves, 'seeds': a.seeds, 'train_seed': train_seed,
                     'framing': framing, 'price_changes': a.price_changes, 'min_score': a.min_score, 'ocr': a.ocr,
                     'planogram_changes': 'one per shelf, cycling ' + ', '.join(PLAN_KINDS), 'references': ref_modes},
        'targets': {k: {'target': v, 'pooled': head[k], 'median_over_seeds': med[k], 'met': head[k] is not None and head[k] >= v}
                    for k, v in TARGETS.items()},
        'all_met': all(head[k] is not None and head[k] >= v for k, v in TARGETS.items()),
        'pooled': pooled,
        'per_seed': seeds,
        'per_shelf_s_median': {k: _r(statistics.median([s['per_shelf_s'][k] for s in seeds])) for k in ('detect_median', 'audit_median')},
        'notes': ["out of stock at facing level and wrong-price tags scored by retail_cv.demo.score_audits (IoU >= 0.3 one-to-one)",
                  "planogram issues matched by row + kind + product; a swap counts as found when either product is reported misplaced",
                  "oracle: the generator's boxes with SKUs, no tag reading; truth_boxes: its boxes as kinds, tags read from pixels as with the bundle",
                  ("shelves rendered with the real-photos issue's realism options that fit this framing (Grocery photos as packaging, "
                   "a busy shelf edge, camera roll; training shelves too); tags keep their scannable codes" if a.realism else
                   "shelves use the generator's defaults with the demo's framing (--realism adds the real-photos options)")],
    }
    atomic_write(a.out, json.dumps(result, indent=1) + '\n')
    print(json.dumps({'targets': result['targets'], 'per_shelf_s_median': result['per_shelf_s_median'], 'wall_s': result['wall_s']}, indent=1))
    print(f"wrote {a.out}")


if __name__ == '__main__':
    main()
