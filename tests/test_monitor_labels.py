"""Accuracy from delayed labels end to end: the real service writes its prediction log, an audit comes back as a CSV or
JSON-lines file, `retail-cv monitor accuracy` runs as a subprocess; detection boxes; every bad labels file is named."""
from __future__ import annotations

import hashlib
import io
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_cli
from retail_cv.bundle import build_bundle, generate_signing_key
from retail_cv.core import ConfigError, DataError, Workspace
from retail_cv.models import tiny_classifier, to_onnx
from retail_cv.monitor import (AlertConfig, LabelCounts, Labels, accuracy_report, evaluate_rules, join_labels, load_rules,
                               score_prediction)
from retail_cv.serve import ServeConfig, ServerThread
from retail_cv.serve._log import PredictionLog, prediction_record

LABELS = ['cola', 'water', 'juice']
NOW = datetime(2026, 12, 10, 12, tzinfo=timezone.utc)


def jpeg(seed: int) -> bytes:
    "A small smooth random photo as JPEG bytes."
    r = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(r.integers(30, 230, (6, 8, 3), dtype=np.uint8)).resize((64, 48), Image.BICUBIC).save(buf, 'JPEG', quality=90)
    return buf.getvalue()


def other(label: str) -> str: return LABELS[(LABELS.index(label) + 1) % len(LABELS)]


def classifier_log(folder: Path, rows) -> None:
    "Write (pid, sha, version, store, predicted, truth-unused, time) rows with the service's own log writer."
    log = PredictionLog(folder)
    for pid, sha, version, store, label, when in rows:
        rec = prediction_record(pid, sha, ('shelf', version), {'label': label, 'score': 0.9, 'index': LABELS.index(label), 'topk': []},
                                {'brightness': 100.0}, store)
        log.write({**rec, 'time': when.isoformat()})
    log.close()


@pytest.fixture(scope='module')
def served(tmp_path_factory):
    "A tiny classifier served for real on loopback; 30 photos from store s1 and 20 from s2, one photo sent twice."
    root = tmp_path_factory.mktemp('labels')
    ws = Workspace.open(root/'ws')
    key = generate_signing_key(ws)
    torch.manual_seed(0)
    clf = tiny_classifier(3, image_size=32)
    bundle = build_bundle(root/'shelf', to_onnx(clf, root/'clf.onnx'), name='shelf', version='1', labels=LABELS,
                          contract=clf.contract(), golden_images=[jpeg(0)], workspace=ws)
    sent = []  # (store, image bytes, answer)
    cfg = ServeConfig(bundle, [key.public_key], token_keys=None, log_dir=root/'log', watch_s=0)
    with ServerThread(cfg) as s, httpx.Client(base_url=s.url) as c:
        for i in [*range(50), 7]:  # photo 7 is sent again: a client retry
            data, store = jpeg(100 + i), 's1' if i < 30 else 's2'
            r = c.post('/v1/predict', content=data, headers={'Content-Type': 'image/jpeg', 'X-Store-Id': store})
            assert r.status_code == 200, r.text
            sent.append((store, data, r.json()))
    return dict(root=root, log=root/'log', sent=sent)


def test_service_log_and_an_audit_through_the_cli(served, tmp_path):
    sent = served['sent']
    rows = ['prediction_id,image_sha256,label,auditor']
    for n, (store, data, out) in enumerate(sent[:50]):
        said = out['classification']['label']
        if store == 's1': rows.append(f"{out['prediction_id']},,{other(said) if n % 10 == 0 else said},ann")  # 27 of 30 right
        else: rows.append(f",{hashlib.sha256(data).hexdigest()},{other(said) if n % 2 else said},bob")  # 10 of 20 right
    rows.append('no-such-prediction,,cola,ann')
    (tmp_path/'audit.csv').write_text('\n'.join(rows) + '\n')
    # the retry of photo 7 (store s1) carries its own prediction id: the audit judged the first one only
    r = run_cli('monitor', 'accuracy', served['log'], tmp_path/'audit.csv', '--by', 'version,store', '--min-labelled', '10',
                '--json', '--html', tmp_path/'acc.html', '--save-counts', tmp_path/'counts.json')
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)['report']
    assert [(tuple(g['group'].values()), g['correct'], g['labelled']) for g in rep['groups']] == [(('shelf:1', 's1'), 27, 30), (('shelf:1', 's2'), 10, 20)]
    assert rep['stats']['records'] == 51 and rep['stats']['unmatched'] == 1 and rep['stats']['matched'] == 50
    assert rep['stats']['unmatched_examples'] == [f"{tmp_path/'audit.csv'}:52"]
    s2 = rep['groups'][1]
    assert s2['lower'] < 0.5 < s2['upper'] and 0.25 < s2['lower']  # Wilson: 10 of 20 is "somewhere between 30 % and 70 %"
    assert 'data:image/png' in (tmp_path/'acc.html').read_text()
    assert LabelCounts.load(tmp_path/'counts.json').stats['labelled_predictions'] == 50
    # the same photo labelled by its hash: both predictions of it are one image of one version, counted once
    said = sent[7][2]['classification']['label']
    (tmp_path/'hash.jsonl').write_text(json.dumps({'image_sha256': hashlib.sha256(sent[7][1]).hexdigest(), 'label': said}) + '\n')
    counts = join_labels(served['log'], Labels.read(tmp_path/'hash.jsonl'))
    assert (counts.stats['labelled_predictions'], counts.stats['repeats']) == (1, 1)
    # rules: version 1 in store s2 is not confidently below 60 %, but is below 80 %; the CLI exits 3 on a fired rule
    (tmp_path/'rules.yaml').write_text("rules:\n  - {name: sure, metric: accuracy.worst_upper, op: '<', threshold: 0.6, window: 7d}\n"
                                       "  - {name: plain, metric: accuracy.worst, op: '<', threshold: 0.8}\n"
                                       "  - {name: drift, metric: drift, threshold: 1}\n")
    r = run_cli('monitor', 'accuracy', served['log'], tmp_path/'audit.csv', '--by', 'store', '--min-labelled', '10',
                '--rules', tmp_path/'rules.yaml', '--json', '--prometheus', tmp_path/'accuracy.prom')
    assert r.returncode == 3, r.stderr
    alerts = {a['rule']: a['fired'] for a in json.loads(r.stdout)['alerts']}
    assert alerts == {'sure': False, 'plain': True}  # the drift rule belongs to `monitor check`
    # the same numbers as Prometheus gauges, read back by Prometheus' own parser
    from prometheus_client.parser import text_string_to_metric_families
    gauges = {(s.name, tuple(sorted(s.labels.items()))): s.value
              for f in text_string_to_metric_families((tmp_path/'accuracy.prom').read_text()) for s in f.samples}
    assert gauges['retail_cv_labelled', (('store', 's1'), ('window', '7d'))] == 30
    assert gauges['retail_cv_accuracy', (('store', 's2'), ('window', '7d'))] == 0.5
    assert gauges['retail_cv_alert_firing', (('rule', 'plain'), ('window', '7d'))] == 1


def test_small_groups_list_but_do_not_alert(tmp_path):
    rows = [(f"a{i}", f"{i:064x}", '1', 's1', 'cola', NOW - timedelta(hours=i)) for i in range(40)]
    rows += [(f"b{i}", f"{1000 + i:064x}", '1', 's9', 'water', NOW - timedelta(hours=i)) for i in range(3)]  # a quiet store, all wrong
    classifier_log(tmp_path/'log', rows)
    (tmp_path/'l.csv').write_text('prediction_id,label\n' + ''.join(f"{p},cola\n" for p, *_ in rows))
    counts = join_labels(tmp_path/'log', Labels.read(tmp_path/'l.csv'))
    rep = accuracy_report(counts, ['store'], '7d', NOW, min_labelled=20)
    assert [(g['group']['store'], g['correct'], g['labelled'], g['enough']) for g in rep.groups] == [('s1', 40, 40, True), ('s9', 0, 3, False)]
    assert rep.metrics()['accuracy.worst'] == 1.0  # the three labels of s9 feed no alert
    rules = AlertConfig(rules=[{'name': 'low', 'metric': 'accuracy.worst', 'op': '<', 'threshold': 0.9}])
    assert not evaluate_rules(rules, lambda w: rep)[0].fired
    assert accuracy_report(counts, ['store'], '7d', NOW, min_labelled=3).metrics()['accuracy.worst'] == 0.0


def test_counts_merge_to_the_same_report_as_one_log(tmp_path):
    days = [[(f"d{d}-{i}", f"{100 * d + i:064x}", '1' if d < 5 else '2', 's1', 'cola' if i % (d + 2) else 'water',
              NOW - timedelta(days=9 - d)) for i in range(12)] for d in range(10)]
    classifier_log(tmp_path/'first', sum(days[:5], [])); classifier_log(tmp_path/'second', sum(days[5:], [])); classifier_log(tmp_path/'all', sum(days, []))
    (tmp_path/'l.jsonl').write_text(''.join(json.dumps({'prediction_id': p, 'label': 'cola'}) + '\n' for day in days for p, *_ in day))
    labels = Labels.read(tmp_path/'l.jsonl')
    a, b = join_labels(tmp_path/'first', labels), join_labels(tmp_path/'second', labels)
    merged = LabelCounts.load(a.save(tmp_path/'a.json')).merge(b)
    whole = join_labels(tmp_path/'all', labels)
    assert merged.cells == whole.cells and merged.stats['labelled_predictions'] == whole.stats['labelled_predictions'] == 120
    for window in ('3d', '7d', None):
        m, w = accuracy_report(merged, ['version', 'class'], window, NOW), accuracy_report(whole, ['version', 'class'], window, NOW)
        assert m.groups == w.groups and m.series == w.series
    rep = accuracy_report(whole, ['version'], '3d', NOW)
    assert rep.versions == ['shelf:2'] and [p['labelled'] for p in rep.series['shelf:1']] == [12, 24, 36, 36, 36]  # rolling 3 days


def test_detection_boxes(tmp_path):
    dets = lambda *ds: {'detections': [{'box': b, 'score': s, 'label': l, 'index': LABELS.index(l)} for b, s, l in ds]}
    log = PredictionLog(tmp_path/'log')
    log.write(prediction_record('d1', '1' * 64, ('shelf-det', '3'), dets(([0, 0, 10, 10], 0.9, 'cola'), ([0, 1, 10, 11], 0.8, 'cola'),
                                                                         ([40, 40, 50, 50], 0.7, 'water')), {}, 's1'))
    log.write(prediction_record('d2', '2' * 64, ('shelf-det', '3'), dets(), {}, 's1'))
    log.close()
    (tmp_path/'boxes.jsonl').write_text(
        json.dumps({'prediction_id': 'd1', 'boxes': [{'box': [1, 0, 10, 10], 'label': 'cola'}, {'box': [40, 40, 50, 50], 'label': 'juice'}]}) + '\n'
        + json.dumps({'image_sha256': '2' * 64, 'boxes': [{'box': [0, 0, 5, 5], 'label': 'water'}]}) + '\n')
    counts = join_labels(tmp_path/'log', Labels.read(tmp_path/'boxes.jsonl'))
    rep = accuracy_report(counts, ['class'], None, min_labelled=1)
    got = {g['group']['class']: (g['correct'], g['labelled']) for g in rep.groups}
    assert got == {'cola': (1, 2), 'juice': (0, 1), 'water': (0, 2)}  # a duplicate cola box, a juice called water, a water missed
    assert (rep.overall['correct'], rep.overall['labelled']) == (1, 5)
    (tmp_path/'wrong.csv').write_text('prediction_id,label\nd1,cola\n')
    with pytest.raises(DataError, match=r"wrong.csv:2: prediction d1: a class label for a prediction without one"):
        join_labels(tmp_path/'log', Labels.read(tmp_path/'wrong.csv'))
    assert score_prediction(dets(), ()) == []  # nothing on either side adds nothing


@pytest.mark.parametrize('name,text,message', [
    ('q.csv', 'prediction_id,label\np1,"co"la\n', r'q.csv:2: bad CSV'),
    ('q.csv', 'prediction_id,label\np1,cola,more\n', r"q.csv:2: the row has more fields than the header's 2"),
    ('q.csv', 'prediction_id,label\np1\n', r'q.csv:2: the row has fewer fields'),
    ('q.csv', 'prediction,label\np1,cola\n', r"q.csv:1: the header needs 'label' and 'prediction_id' or 'image_sha256'"),
    ('q.csv', 'prediction_id,label,label\np1,a,b\n', r'q.csv:1: column\(s\) label appear twice'),
    ('q.csv', 'prediction_id,boxes\np1,[]\n', r"q.csv:1: detection labels \('boxes'\) go in a JSON lines file"),
    ('q.csv', 'image_sha256,label\nxyz,cola\n', r"q.csv:2: field 'image_sha256' is not 64 hex digits"),
    ('q.csv', 'prediction_id,label\np1,cola\np2,\n', r"q.csv:3: give a 'label' \(classification\) or 'boxes'"),
    ('q.csv', 'prediction_id,label\np1,cola\np1,water\n', r"q.csv:3: p1 is labelled 'water' here but 'cola' at .*q.csv:2"),
    ('q.jsonl', '{"prediction_id": "p1", "label": "cola"}\n{"prediction_id": "p2", "label": "cola"\n', r'q.jsonl:2: not JSON'),
    ('q.jsonl', '{"prediction_id": "p1", "label": 2}\n', r"q.jsonl:1: field 'label' must be text"),
    ('q.jsonl', '{"prediction_id": "p1", "boxes": [{"box": [0, 0, 1], "label": "a"}]}\n', r"q.jsonl:1: field 'boxes'\[0\] must be"),
    ('q.jsonl', '{"label": "cola"}\n', r"q.jsonl:1: give a 'prediction_id' or an 'image_sha256'"),
    ('q.csv', 'prediction_id,label\n', r'hold no labels'),
])
def test_bad_labels_files_are_named(tmp_path, name, text, message):
    (tmp_path/name).write_text(text)
    with pytest.raises(DataError, match=message): Labels.read(tmp_path/name)


def test_other_bad_inputs(tmp_path):
    (tmp_path/'l.txt').write_text('prediction_id,label\n')
    with pytest.raises(ConfigError, match='name it .csv or .jsonl'): Labels.read(tmp_path/'l.txt')
    (tmp_path/'latin.csv').write_bytes('prediction_id,label\np1,caf\xe9\n'.encode('latin-1'))
    with pytest.raises(DataError, match='latin.csv is not UTF-8'): Labels.read(tmp_path/'latin.csv')
    classifier_log(tmp_path/'log', [('p1', 'a' * 64, '1', 's1', 'cola', NOW)])
    (tmp_path/'l.csv').write_text(f"prediction_id,image_sha256,label\np1,{'b' * 64},cola\n")
    with pytest.raises(DataError, match=f"l.csv:2: prediction p1 was of image {'a' * 64}, not {'b' * 64}"):
        join_labels(tmp_path/'log', Labels.read(tmp_path/'l.csv'))
    (tmp_path/'both.csv').write_text(f"prediction_id,image_sha256,label\np1,,cola\n,{'a' * 64},water\n")
    with pytest.raises(DataError, match='give prediction p1 different truths'): join_labels(tmp_path/'log', Labels.read(tmp_path/'both.csv'))
    (tmp_path/'miss.csv').write_text('prediction_id,label\np1,cola\np2,cola\n')
    with pytest.raises(DataError, match=r'1 label\(s\) match no prediction'): join_labels(tmp_path/'log', Labels.read(tmp_path/'miss.csv'), strict=True)
    with pytest.raises(ConfigError, match='not a duration'): join_labels(tmp_path/'log', Labels.read(tmp_path/'miss.csv'), bucket='daily')
    (tmp_path/'rules.yaml').write_text("rules:\n  - {name: a, metric: accuracy.wrost, threshold: 1}\n")
    with pytest.raises(ConfigError, match="unknown metric 'accuracy.wrost'"): load_rules(tmp_path/'rules.yaml')
    r = run_cli('monitor', 'accuracy', tmp_path/'nolog', tmp_path/'miss.csv')
    assert r.returncode == 1 and 'prediction log folder' in r.stderr and 'does not exist' in r.stderr
