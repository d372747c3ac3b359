"""Model registry: concurrency across processes, audit-chain tampering (signed chain: rewrite, reorder, truncation), roles and tokens, the promotion gate,
rollback, lineage, model cards and the CLI through the real console script."""
from __future__ import annotations

import json
import logging
import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from PIL import Image

from retail_cv.bundle import generate_signing_key
from retail_cv.core import ConfigError, DataError, Workspace, sha256_bytes
from retail_cv.registry import (AUDIT_HEAD_ENV, AUDIT_KEY_ENV, AUDIT_PUBKEY_ENV, GENESIS, GateError, PermissionDeniedError,
                                Registry, RegistryError, plot_lineage)
from retail_cv.registry._audit import _entry_hash

# ---- helpers ---------------------------------------------------------------------------------------------------


def artifact(folder: Path, name: str, content: bytes | None = None) -> Path:
    "A small file standing in for a checkpoint (the registry only hashes it)."
    p = folder/name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(content if content is not None else f"weights of {name}".encode())
    return p


def db_path(ws: Path) -> Path: return ws/'registry'/'registry.db'


def raw(ws: Path, sql: str, *args, drop_triggers: bool = False, signatures: bool = False) -> list[tuple]:
    "Run SQL on the registry database with plain sqlite3, as someone holding the file would."
    with sqlite3.connect(db_path(ws)) as db:
        table = 'audit_signatures' if signatures else 'audit'  # whose append-only triggers to drop
        if drop_triggers:
            db.execute(f'DROP TRIGGER IF EXISTS {table}_no_update'); db.execute(f'DROP TRIGGER IF EXISTS {table}_no_delete')
        rows = db.execute(sql, args).fetchall()
    db.close()
    return rows


@pytest.fixture
def ws(tmp_path) -> Path: return Workspace.open(tmp_path/'ws').root


@pytest.fixture
def reg(ws) -> Registry: return Registry(ws, actor='alice')

# ---- concurrency -----------------------------------------------------------------------------------------------

WORKER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from retail_cv.registry import Registry
    ws, i, n, go = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    while not go.exists(): time.sleep(0.005)  # start together, for real contention
    reg = Registry(ws, actor=f'worker{i}')
    for j in range(n):
        mv = reg.register('shelf-cls', ws.parent/'art'/f'{i}-{j}.ckpt', metrics={'val/acc': i + j / 100}, tags={'worker': str(i)})
        reg.set_alias('shelf-cls', mv.version, 'canary' if j % 2 else 'candidate', reason=f'worker {i} step {j}')
""")


def test_eight_processes_register_and_move_aliases_at_once(tmp_path):
    ws, procs, n, workers = tmp_path/'ws', [], 5, 8
    key = generate_signing_key(tmp_path/'keys'/'audit.key')  # every worker signs; they race for the head file too
    for i in range(workers):
        for j in range(n): artifact(tmp_path/'art', f'{i}-{j}.ckpt')
    go = tmp_path/'go'
    for i in range(workers):  # the registry database does not exist yet: the workers also race to create it
        procs.append(subprocess.Popen([sys.executable, '-c', WORKER, str(ws), str(i), str(n), str(go)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env={**os.environ, AUDIT_KEY_ENV: str(key.private_key)}))
    time.sleep(0.5); go.touch()
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-2000:]
    reg = Registry(ws, actor='checker', env={AUDIT_PUBKEY_ENV: str(key.public_key), AUDIT_HEAD_ENV: str(key.private_key.with_suffix('.head'))})
    versions = reg.versions('shelf-cls')
    total = workers * n
    assert [v.version for v in versions] == list(range(1, total + 1))  # none lost, none repeated
    expected = {sha256_bytes(f'weights of {i}-{j}.ckpt'.encode()) for i in range(workers) for j in range(n)}
    assert {v.sha256 for v in versions} == expected and len({v.sha256 for v in versions}) == total
    for w in range(workers):  # each worker's versions are in its own order
        mine = [v for v in versions if v.tags['worker'] == str(w)]
        assert [Path(v.artifact).name for v in mine] == [f'{w}-{j}.ckpt' for j in range(n)]
        assert {v.created_by for v in mine} == {f'worker{w}'}
    rep = reg.verify()
    assert rep.ok and rep.signed_by == key.key_id and rep.note == '', str(rep)
    assert rep.entries == 2 * total  # one register and one set_alias entry per step, nothing else
    assert raw(ws, 'SELECT COUNT(*) FROM audit_signatures') == [(2 * total,)]
    assert [h['seq'] for h in json.loads(key.private_key.with_suffix('.head').read_text()).values()] == [2 * total]
    entries = reg.audit()
    assert [e.seq for e in entries] == list(range(1, 2 * total + 1))
    assert sorted(e.action for e in entries) == ['register'] * total + ['set_alias'] * total
    assert raw(ws, 'SELECT COUNT(*) FROM alias_history') == [(total,)]
    assert raw(ws, 'PRAGMA journal_mode') == [('wal',)]

# ---- audit log tampering ---------------------------------------------------------------------------------------


def _history(reg: Registry, tmp_path: Path) -> None:
    "A few changes to tamper with: 2 registrations, a promotion, a refused promotion, a tag."
    reg.register('m', artifact(tmp_path, 'a.ckpt'), metrics={'val/acc': 0.9})
    reg.register('m', artifact(tmp_path, 'b.ckpt'), metrics={'val/acc': 0.8})
    reg.promote('m', 1, reason='first')
    with pytest.raises(GateError): reg.promote('m', 2, reason='worse')
    reg.set_tag('m', 1, 'owner', 'shelf team')


def test_editing_an_audit_row_is_detected(ws, reg, tmp_path, cli):
    _history(reg, tmp_path)
    assert reg.verify().ok and reg.verify().entries == 5
    with pytest.raises(sqlite3.DatabaseError, match='append-only'):  # the front door is shut
        raw(ws, "UPDATE audit SET reason = 'x' WHERE seq = 4")
    raw(ws, "UPDATE audit SET details = replace(details, '\"failed\"', '\"passed\"') WHERE seq = 4", drop_triggers=True)
    rep = reg.verify()
    assert (rep.ok, rep.broken_seq) == (False, 4) and 'edited' in rep.problem
    r = cli('registry', 'verify', env={'COLUMNS': '300'})  # wide: the error is one line however long
    assert r.returncode == 1
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and 'audit log broken at entry 4' in err[0], r.stderr


def test_deleting_an_audit_row_is_detected(ws, reg, tmp_path, cli):
    _history(reg, tmp_path)
    with pytest.raises(sqlite3.DatabaseError, match='append-only'): raw(ws, 'DELETE FROM audit WHERE seq = 2')
    raw(ws, 'DELETE FROM audit WHERE seq = 2', drop_triggers=True)
    rep = reg.verify()
    assert (rep.ok, rep.broken_seq) == (False, 2) and 'entry 2 is missing' in rep.problem
    r = cli('registry', 'verify', '--json', env={'COLUMNS': '300'})
    assert r.returncode == 1 and json.loads(r.stdout)['broken_seq'] == 2


def test_deleting_the_newest_entries_and_swapping_rows_is_detected(tmp_path):
    ws1 = Workspace.open(tmp_path/'a').root
    r1 = Registry(ws1, actor='alice'); _history(r1, tmp_path)
    raw(ws1, 'DELETE FROM audit WHERE seq = 5', drop_triggers=True)  # no later entry points at it: the head does
    rep = r1.verify()
    assert (rep.ok, rep.broken_seq) == (False, 5) and 'the log ends at entry 4' in rep.problem
    ws2 = Workspace.open(tmp_path/'b').root
    r2 = Registry(ws2, actor='alice'); _history(r2, tmp_path)
    raw(ws2, 'UPDATE audit SET seq = -2 WHERE seq = 2', drop_triggers=True)  # swap entries 2 and 3
    raw(ws2, 'UPDATE audit SET seq = 2 WHERE seq = 3'); raw(ws2, 'UPDATE audit SET seq = 3 WHERE seq = -2')
    rep = r2.verify()
    assert (rep.ok, rep.broken_seq) == (False, 2)

# ---- signed audit chain ----------------------------------------------------------------------------------------


@pytest.fixture
def audit_key(tmp_path):
    "An audit key pair outside the workspace (tmp_path/'ws'), as `retail-cv keys generate --out` writes it."
    return generate_signing_key(tmp_path/'keys'/'audit.key')


def signer_env(k) -> dict: return {AUDIT_KEY_ENV: str(k.private_key)}


def auditor_env(k) -> dict:
    "A verifier's environment: the pinned public key and the head file, no private key."
    return {AUDIT_PUBKEY_ENV: str(k.public_key), AUDIT_HEAD_ENV: str(k.private_key.with_suffix('.head'))}


def rechain(ws: Path, edit) -> None:
    "Rewrite the audit log as `edit(rows)` returns it and recompute every hash and the head: a consistent forgery."
    with sqlite3.connect(db_path(ws)) as db:
        db.row_factory = sqlite3.Row
        rows = [dict(r) for r in db.execute('SELECT * FROM audit ORDER BY seq')]
        db.execute('DROP TRIGGER IF EXISTS audit_no_delete')
        db.execute('DELETE FROM audit')
        prev = GENESIS
        for seq, e in enumerate(edit(rows), 1):
            e.update(seq=seq, prev_hash=prev); e['hash'] = prev = _entry_hash(e)
            db.execute(f"INSERT INTO audit ({', '.join(e)}) VALUES ({', '.join('?' * len(e))})", list(e.values()))
        db.execute("UPDATE meta SET value = ? WHERE key = 'audit_head'", (f'{seq}:{prev}',))
    db.close()


def test_a_valid_signed_chain_passes_and_the_wrong_key_fails(ws, tmp_path, audit_key, caplog):
    caplog.set_level(logging.DEBUG)
    reg = Registry(ws, actor='alice', env=signer_env(audit_key))
    _history(reg, tmp_path)
    assert raw(ws, 'SELECT seq FROM audit_signatures') == [(s,) for s in range(1, 6)]  # every entry, the refusal too
    rep = Registry(ws, actor='auditor', env=auditor_env(audit_key)).verify()
    assert (rep.ok, rep.entries, rep.signed_by, rep.note) == (True, 5, audit_key.key_id, '')
    other = generate_signing_key(tmp_path/'other'/'audit.key')
    rep = Registry(ws, actor='auditor', audit_pubkey=other.public_key).verify()
    assert (rep.ok, rep.broken_seq) == (False, 1) and f'signed by key {audit_key.key_id}, not by the pinned key {other.key_id}' in rep.problem
    with pytest.raises(ConfigError, match='is not the pinned audit public key'):
        Registry(ws, audit_key=audit_key.private_key, audit_pubkey=other.public_key)
    with pytest.raises(ConfigError, match='is inside the workspace'):
        Registry(ws, audit_key=generate_signing_key(ws/'keys'/'audit.key').private_key)
    # without a pinned key the chain is checked and said to be unsigned, not silently ok
    rep = Registry(ws, actor='auditor', env={}).verify()
    assert rep.ok and not rep.signed_by and rep.note.startswith('UNSIGNED') and 'UNSIGNED' in str(rep)
    # the private key is nowhere: not in the database, the head file, the logs or a repr
    pem = audit_key.private_key.read_text()
    secret = pem.split('-----')[2].strip()  # the base64 body
    files = b''.join(p.read_bytes() for p in db_path(ws).parent.glob('registry.db*'))
    assert secret.encode() not in files and secret not in audit_key.private_key.with_suffix('.head').read_text()
    assert secret not in caplog.text and secret not in repr(reg) and secret not in repr(reg._audit)


def test_a_consistent_rewrite_is_caught(ws, tmp_path, audit_key):
    _history(Registry(ws, actor='alice', env=signer_env(audit_key)), tmp_path)
    def passed(rows):  # the refused promotion (entry 4) becomes a passed one
        rows[3]['details'] = rows[3]['details'].replace('"failed"', '"passed"'); rows[3]['outcome'] = 'ok'
        return rows
    rechain(ws, passed)
    assert Registry(ws, env={}).verify().ok  # the hash chain alone is fooled
    rep = Registry(ws, env=auditor_env(audit_key)).verify()
    assert (rep.ok, rep.broken_seq) == (False, 4) and 'the chain was rewritten after it was signed' in rep.problem
    # deleting the signatures from the forged entry on does not help, nor does deleting them all
    raw(ws, 'DELETE FROM audit_signatures WHERE seq >= 4', drop_triggers=True, signatures=True)
    rep = Registry(ws, env=auditor_env(audit_key)).verify()
    assert (rep.ok, rep.broken_seq) == (False, 4) and 'it is unsigned though earlier entries are signed' in rep.problem
    raw(ws, 'DELETE FROM audit_signatures', drop_triggers=True, signatures=True)  # (each session re-creates the triggers)
    rep = Registry(ws, env=auditor_env(audit_key)).verify()
    assert (rep.ok, rep.broken_seq) == (False, 5) and 'no entry is signed' in rep.problem


def test_a_reorder_with_recomputed_hashes_is_caught(ws, tmp_path, audit_key):
    _history(Registry(ws, actor='alice', env=signer_env(audit_key)), tmp_path)
    rechain(ws, lambda rows: [rows[0], rows[2], rows[1], *rows[3:]])  # the promotion before the second registration
    assert Registry(ws, env={}).verify().ok
    rep = Registry(ws, env=auditor_env(audit_key)).verify()
    assert (rep.ok, rep.broken_seq) == (False, 2), str(rep)


def test_a_truncation_back_to_an_older_head_is_caught(ws, tmp_path, audit_key, cli):
    _history(Registry(ws, actor='alice', env=signer_env(audit_key)), tmp_path)
    head = json.loads(audit_key.private_key.with_suffix('.head').read_text())
    assert [h['seq'] for h in head.values()] == [5]
    rechain(ws, lambda rows: rows[:3])  # cut the refusal and the tag off; their signatures stay behind
    rep = Registry(ws, env={AUDIT_PUBKEY_ENV: str(audit_key.public_key)}).verify()  # even without the head file
    assert (rep.ok, rep.broken_seq) == (False, 4) and 'entry 5 was signed but the log ends at entry 3' in rep.problem
    raw(ws, 'DELETE FROM audit_signatures WHERE seq > 3', drop_triggers=True, signatures=True)  # a careful truncation
    rep = Registry(ws, env={AUDIT_PUBKEY_ENV: str(audit_key.public_key)}).verify()
    assert rep.ok and 'a truncation back to an older signed head would not be seen' in rep.note  # the limit, said
    rep = Registry(ws, env=auditor_env(audit_key)).verify()
    assert (rep.ok, rep.broken_seq) == (False, 4) and 'the log ends at entry 3 but the head file' in rep.problem
    r = cli('registry', 'verify', env={'COLUMNS': '300', **auditor_env(audit_key)})
    err = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(err) == 1 and 'the log was truncated' in err[0], r.stderr


def test_denials_are_signed_and_keyless_writers_refused(ws, tmp_path, audit_key):
    reg = Registry(ws, actor='alice', env=signer_env(audit_key))
    admin = reg.create_token('alice', 'admin')
    viewer = Registry(ws, token=Registry(ws, token=admin, env=signer_env(audit_key)).create_token('vic', 'viewer'),
                      env=signer_env(audit_key))
    with pytest.raises(PermissionDeniedError, match="viewer 'vic' may not register m"):
        viewer.register('m', artifact(tmp_path, 'a.ckpt'))
    last = raw(ws, 'SELECT seq, outcome FROM audit ORDER BY seq DESC LIMIT 1')[0]
    assert last[1] == 'denied' and raw(ws, 'SELECT MAX(seq) FROM audit_signatures') == [(last[0],)]
    assert Registry(ws, token=admin, env=auditor_env(audit_key)).verify().ok
    # a session without the key may read, but may not append to a signed log (not even a denial)
    keyless = Registry(ws, token=admin, env={})
    assert keyless.verify().ok and len(keyless.audit()) == 3
    with pytest.raises(RegistryError, match='has no audit key: set \\$RETAIL_CV_AUDIT_KEY'):
        keyless.register('m', artifact(tmp_path, 'a.ckpt'))
    with pytest.raises(RegistryError, match='has no audit key'): Registry(ws, token='rcv_' + 'x' * 43, env={}).get('m')
    assert raw(ws, 'SELECT COUNT(*) FROM audit') == [(3,)] and raw(ws, 'SELECT COUNT(*) FROM versions') == [(0,)]


def test_signing_set_up_later_covers_the_older_entries(ws, tmp_path, audit_key, cli):
    _history(Registry(ws, actor='alice', env={}), tmp_path)  # five unsigned entries
    rep = Registry(ws, env=auditor_env(audit_key)).verify()
    assert (rep.ok, rep.broken_seq) == (False, 5) and 'no entry is signed' in rep.problem
    r = cli('registry', 'verify', '--require-signed', env={'COLUMNS': '300'})
    assert r.returncode == 1 and 'the audit log is not signed: UNSIGNED' in r.stderr
    Registry(ws, actor='alice', env=signer_env(audit_key)).set_tag('m', 2, 'owner', 'ops')
    rep = Registry(ws, env=auditor_env(audit_key)).verify()
    assert rep.ok and rep.signed_by == audit_key.key_id, str(rep)
    r = cli('registry', 'verify', '--require-signed', env={'COLUMNS': '300', **auditor_env(audit_key)})
    assert r.returncode == 0 and f'signed by key {audit_key.key_id}' in r.stdout, r.stderr
    rechain(ws, lambda rows: [{**rows[0], 'reason': 'forged'}, *rows[1:]])  # a rewrite of an unsigned entry
    rep = Registry(ws, env=auditor_env(audit_key)).verify()
    assert (rep.ok, rep.broken_seq) == (False, 6) and 'rewritten' in rep.problem  # the first signature covers it


# ---- roles and tokens ------------------------------------------------------------------------------------------


def test_roles_tokens_and_denials_are_audited_without_tokens(ws, reg, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    reg.register('m', artifact(tmp_path, 'a.ckpt'), metrics={'val/acc': 0.8})
    with pytest.raises(RegistryError, match='first token must be an admin token'): reg.create_token('ci', 'developer')
    admin = reg.create_token('alice', 'admin', reason='bootstrap')
    with pytest.raises(PermissionDeniedError, match='requires a token'): reg.list_models()  # tokens exist: every call needs one
    a = Registry(ws, token=admin)
    dev_t, appr_t, view_t = a.create_token('bob', 'developer'), a.create_token('carol', 'approver'), a.create_token('vic', 'viewer')
    dev, appr, viewer = Registry(ws, token=dev_t), Registry(ws, token=appr_t), Registry(ws, env={'RETAIL_CV_TOKEN': view_t})
    assert viewer.whoami().actor == 'vic' and viewer.get('m', 1).version == 1
    with pytest.raises(PermissionDeniedError, match="viewer 'vic' may not register m"):
        viewer.register('m', artifact(tmp_path, 'v.ckpt'))
    v2 = dev.register('m', artifact(tmp_path, 'b.ckpt'), metrics={'val/acc': 0.9})
    assert v2.created_by == 'bob'
    dev.set_alias('m', 2, 'candidate', reason='try it')
    with pytest.raises(PermissionDeniedError, match="developer 'bob' may not promote m@champion: that needs the approver role"):
        dev.promote('m', 2, reason='ship it')
    last = a.audit(limit=1)[0]
    assert (last.actor, last.role, last.action, last.outcome, last.details['needs']) == ('bob', 'developer', 'promote', 'denied', 'approver')
    assert last.auth.startswith('token ') and last.auth[6:] == sha256_bytes(dev_t.encode())[:12]
    with pytest.raises(PermissionDeniedError, match='needs the approver role'): dev.promote('m', 2, 'candidate', approve=True, reason='x')
    with pytest.raises(PermissionDeniedError, match='needs the admin role'): appr.create_token('eve', 'admin')
    assert appr.promote('m', 2, reason='beats nothing yet').decision == 'passed'
    assert appr.get('m', 'champion').version == 2
    # revocation takes effect at once; the last admin token cannot be revoked
    a.revoke_token(sha256_bytes(dev_t.encode())[:12], reason='left the team')
    with pytest.raises(PermissionDeniedError, match="token of 'bob' was revoked"): dev.get('m', 1)
    with pytest.raises(RegistryError, match='last active admin token'): a.revoke_token(sha256_bytes(admin.encode())[:12])
    with pytest.raises(PermissionDeniedError, match='not known to this registry'): Registry(ws, token='rcv_' + 'x' * 43).get('m')
    with pytest.raises(ConfigError, match="role 'root' is not one of"): a.create_token('x', 'root')
    denied = [e for e in a.audit() if e.outcome == 'denied']
    assert [(e.actor, e.role) for e in denied] == [('alice', 'none'), ('vic', 'viewer'), ('bob', 'developer'), ('bob', 'developer'),
                                                   ('carol', 'approver'), ('bob', 'none'), ('unknown', 'none')]
    assert a.verify().ok
    # the token text is nowhere: not in the audit rows, not in the database files, not in the logs
    rows = ' '.join(map(str, raw(ws, 'SELECT * FROM audit'))) + ' '.join(map(str, raw(ws, 'SELECT * FROM tokens')))
    files = b''.join(p.read_bytes() for p in db_path(ws).parent.glob('registry.db*'))
    for t in (admin, dev_t, appr_t, view_t):
        assert t not in rows and t.encode() not in files and t not in caplog.text
        assert t not in repr(Registry(ws, token=t))
    assert 'denied' in caplog.text  # the logs did see the denials


def test_local_mode_and_bad_inputs(ws, reg, tmp_path):
    assert reg.whoami().role == 'admin' and reg.whoami().auth == 'local'
    with pytest.raises(DataError, match='nope.ckpt does not exist'): reg.register('m', tmp_path/'nope.ckpt')
    with pytest.raises(ConfigError, match="model name '../x' must be"): reg.register('../x', artifact(tmp_path, 'a.ckpt'))
    with pytest.raises(ConfigError, match="metric 'val/acc' must be a finite number"): reg.register('m', artifact(tmp_path, 'a.ckpt'), metrics={'val/acc': float('inf')})
    assert reg.audit() == []  # nothing was written by refused input
    reg.register('m', artifact(tmp_path, 'a.ckpt'))
    with pytest.raises(RegistryError, match="no model named 'zz'; registered: m"): reg.get('zz')
    with pytest.raises(RegistryError, match="has no version 3"): reg.get('m', 3)
    with pytest.raises(ConfigError, match="alias 'prod' is not one of"): reg.set_alias('m', 1, 'prod')
    with pytest.raises(RegistryError, match='champion moves only through the gate'): reg.set_alias('m', 1, 'champion')
    raw(ws, "UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(RegistryError, match='schema version 99, newer than'): Registry(ws)

# ---- gate and rollback -----------------------------------------------------------------------------------------


def test_promotion_gate_approval_and_rollback(reg, tmp_path):
    for i, acc in enumerate([0.80, 0.78, 0.83, 0.90]):
        reg.register('m', artifact(tmp_path, f'{i}.ckpt'), metrics={'val/acc': acc, 'val/loss': 1 - acc})
    reg.register('m', artifact(tmp_path, 'nometric.ckpt'))
    assert reg.promote('m', 1, reason='first').decision == 'passed'
    with pytest.raises(GateError, match=r"val/acc 0\.78 does not beat champion m:1's 0\.8 by more than the margin 0 "):
        reg.promote('m', 2, reason='worse')
    refused = reg.audit(limit=1)[0]
    assert (refused.outcome, refused.details['decision'], refused.details['value'], refused.details['baseline']) == ('refused', 'failed', 0.78, 0.8)
    with pytest.raises(GateError, match=r"0\.83 does not beat .* 0\.8 by more than the margin 0\.05"):
        reg.promote('m', 3, margin=0.05, reason='not by enough')
    with pytest.raises(GateError, match=r"val/loss 0\.22 does not beat champion m:1's 0\.2 .*lower is better"):
        reg.promote('m', 2, metric='val/loss', higher_is_better=False, reason='loss')
    with pytest.raises(GateError, match="m:5 has no metric 'val/acc'"): reg.promote('m', 5, reason='unmeasured')
    assert reg.get('m', 'champion').version == 1
    p = reg.promote('m', 3, margin=0.02, reason='+3 points')
    assert (p.decision, p.previous, p.value, p.baseline, p.moved) == ('passed', 1, 0.83, 0.8, True)
    p = reg.promote('m', 2, approve=True, reason='fixes the new packaging despite val/acc')
    assert (p.decision, p.previous) == ('approved', 3)
    assert reg.promote('m', 2, approve=True, reason='re-run').moved is False
    reg.promote('m', 4, reason='best yet')
    assert reg.rollback('m', reason='latency regression').version == 2  # back to the previous holder...
    assert reg.rollback('m', reason='2 misreads red packs').version == 3  # ...and the one before, not forth again
    assert reg.rollback('m', reason='back to the first').version == 1
    with pytest.raises(RegistryError, match='no earlier champion to roll back to'): reg.rollback('m', reason='again')
    with pytest.raises(ConfigError, match='rollback needs a reason'): reg.rollback('m')
    assert raw(reg.ws.root, "SELECT version, previous, kind FROM alias_history WHERE alias = 'champion' ORDER BY id") == [
        (1, None, 'set'), (3, 1, 'set'), (2, 3, 'set'), (4, 2, 'set'), (2, 4, 'rollback'), (3, 2, 'rollback'), (1, 3, 'rollback')]
    reg.set_alias('m', 4, 'canary'); reg.set_alias('m', 5, 'canary')
    assert reg.rollback('m', 'canary', reason='5 crashes').version == 4
    reg.remove_alias('m', 'canary', reason='canary over')
    assert reg.rollback('m', 'canary', reason='undo the removal').version == 4
    assert reg.verify().ok

# ---- lineage and cards -----------------------------------------------------------------------------------------


def test_lineage_is_the_true_chain(ws, reg, tmp_path):
    full = '3f2a9c01b7e4' + '5' * 52
    (ws/'runs'/'run-7').mkdir(parents=True)
    (ws/'runs'/'run-7'/'config.json').write_text(json.dumps({'run_id': 'run-7', 'data': {'ref': 'shelf@3f2a9c01b7e4', 'id': full}}))
    v1 = reg.register('m', artifact(tmp_path, 'a.ckpt'), run_id='run-0', dataset_version=['shelf@aaaa11112222', 'promo@bbbb3333'])
    with pytest.raises(DataError, match='run run-7 trained on dataset version shelf@3f2a9c01b7e4'):
        reg.register('m', artifact(tmp_path, 'b.ckpt'), run_id='run-7', dataset_version='shelf@aaaa11112222')
    v2 = reg.register('m', artifact(tmp_path, 'b.ckpt'), run_id='run-7', parent=1)  # the data comes from the run record
    assert v2.dataset_versions == ('shelf@3f2a9c01b7e4',)
    tar = artifact(tmp_path, 'm-2-handheld.tar', b'bundle archive')
    folder = tmp_path/'m-2-cam'; artifact(folder, 'model.onnx', b'onnx'); artifact(folder, 'bundle.json', b'{}')
    reg.add_bundle('m', 2, tar, 'handheld-arm-cpu'); reg.add_bundle('m', 2, folder, 'shelf-cam-x86')
    lin = reg.lineage('m', 2)
    assert (lin.datasets, lin.run_id, lin.parent) == (('shelf@3f2a9c01b7e4',), 'run-7', 'm:1')
    assert [(b.profile, b.sha256) for b in lin.bundles][0] == ('handheld-arm-cpu', sha256_bytes(b'bundle archive'))
    assert lin.edges == [('dataset:shelf@3f2a9c01b7e4', 'run:run-7'), ('run:run-7', 'model:m:2'), ('model:m:1', 'model:m:2'),
                         ('model:m:2', f'bundle:{tar}'), ('model:m:2', f'bundle:{folder}')]
    text = str(lin)
    assert text.index('shelf@3f2a9c01b7e4') < text.index('run-7') < text.index('m:2  sha256') < text.index('handheld-arm-cpu')
    assert [v.ref for v in reg.models_from_dataset(full)] == ['m:2']
    assert [v.ref for v in reg.models_from_dataset('promo@bbbb')] == ['m:1']
    assert reg.models_from_dataset('shelf@ffff') == []
    fig = plot_lineage(lin, tmp_path/'lin.png')
    with Image.open(tmp_path/'lin.png') as im: assert im.format == 'PNG' and im.width > 600
    assert len(fig.axes[0].patches) == 6  # one box per node: dataset, run, parent, model, two bundles
    assert v1.dataset_versions == ('shelf@aaaa11112222', 'promo@bbbb3333')


def test_model_card_files(ws, reg, tmp_path):
    reg.register('m', artifact(tmp_path, 'a.ckpt'), dataset_version='shelf@aaaa11112222', run_id='run-1',
                 metrics={'val/acc': 0.8123}, tags={'limitations': 'Untested at <b>night</b>.', 'data_license': 'CC-BY-4.0'})
    md, page = reg.model_card('m', 1, intended_use='Shelf audits.')
    folder = ws/'registry'/'cards'/'m'
    assert (folder/'v1.md').read_text() == md and (folder/'v1.html').read_text() == page
    for s in ('# m v1', '## Intended use', 'Shelf audits.', '## Limitations', '| val/acc | 0.8123 |', 'CC-BY-4.0',
              '- training run: run-1', 'Apache-2.0', '## Lineage'):
        assert s in md, s
    assert '<b>night</b>' not in page and '&lt;b&gt;night&lt;/b&gt;' in page and page.startswith('<!DOCTYPE html>')
    assert not list(folder.glob('.*.tmp'))  # atomic writes leave no temp files

# ---- CLI -------------------------------------------------------------------------------------------------------


def test_cli_round_trip(cli, tmp_path):
    ws = tmp_path/'ws'
    wide = cli
    cli = lambda *a, env=None: wide(*a, env={'COLUMNS': '300', **(env or {})})  # so a long error stays one line
    a, b = artifact(tmp_path, 'a.onnx'), artifact(tmp_path, 'b.onnx')
    r = cli('registry', 'register', 'shelf-cls', a, '--run', 'run-1', '--data', 'shelf@3f2a9c01b7e4', '--metric', 'val/acc=0.81',
            '--param', 'lr=0.001', '--tag', 'arch=mobilenet_v3_small', '--json')
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)['version'] == 1
    assert cli('registry', 'register', 'shelf-cls', b, '--metric', 'val/acc=0.79', '--parent', '1').returncode == 0
    r = cli('registry', 'promote', 'shelf-cls', '1', '--reason', 'first')
    assert r.returncode == 0 and 'passed' in r.stdout, r.stderr
    r = cli('registry', 'promote', 'shelf-cls', '2', '--reason', 'worse')  # the gate refuses: one red line, exit 1
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert "0.79 does not beat champion shelf-cls:1's 0.81" in r.stderr
    r = cli('registry', 'promote', 'shelf-cls', '2', '--approve', '--reason', 'needed for the new packs', '--json')
    assert r.returncode == 0 and json.loads(r.stdout)['decision'] == 'approved'
    r = cli('registry', 'rollback', 'shelf-cls', '--reason', 'misreads')
    assert r.returncode == 0 and 'back at version 1' in r.stdout
    r = cli('registry', 'show', 'shelf-cls@champion', '--json')
    mv = json.loads(r.stdout)
    assert (mv['version'], mv['aliases'], mv['params'], mv['tags']) == (1, ['champion'], {'lr': 0.001}, {'arch': 'mobilenet_v3_small'})
    r = cli('registry', 'lineage', 'shelf-cls', '1', '--png', tmp_path/'lin.png')
    assert r.returncode == 0 and 'shelf@3f2a9c01b7e4' in r.stdout and (tmp_path/'lin.png').read_bytes()[:4] == b'\x89PNG'
    r = cli('registry', 'card', 'shelf-cls', '1')
    assert r.returncode == 0 and '# shelf-cls v1' in r.stdout and (ws/'registry'/'cards'/'shelf-cls'/'v1.html').is_file()
    n_before = len(json.loads(cli('registry', 'audit', '--limit', '100', '--json').stdout))
    for bad, msg in [(('register', 'shelf-cls', a, '--metric', 'val/acc'), "metric 'val/acc' must be KEY=VALUE"),
                     (('register', 'shelf-cls', a, '--metric', 'val/acc=high'), "the value must be a number"),
                     (('show', 'nothing:1'), "no model named 'nothing'"),
                     (('show', 'shelf-cls:7'), "has no version 7"),
                     (('alias', 'shelf-cls', '1', 'prod'), "alias 'prod' is not one of"),
                     (('token', 'create', 'bob', 'superuser'), "role 'superuser' is not one of")]:
        r = cli('registry', *bad)
        assert r.returncode == 1 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, (bad, r.stderr)
    assert len(json.loads(cli('registry', 'audit', '--limit', '100', '--json').stdout)) == n_before  # nothing changed
    assert cli('registry', 'check', 'shelf-cls@champion').returncode == 0
    b.write_bytes(b'overwritten by a later export')
    r = cli('registry', 'check', 'shelf-cls:2')
    assert r.returncode == 1 and 'artifact of shelf-cls:2 changed since it was registered' in r.stderr
    r = cli('registry', 'token', 'create', 'alice', 'admin')
    token = r.stdout.strip()
    assert r.returncode == 0 and token.startswith('rcv_')
    r = cli('registry', 'list')
    assert r.returncode == 1 and 'requires a token' in r.stderr
    r = cli('registry', 'list', '--json', env={'RETAIL_CV_TOKEN': token})
    assert r.returncode == 0 and json.loads(r.stdout)[0]['aliases'] == {'champion': 1}
    r = cli('registry', 'verify', env={'RETAIL_CV_TOKEN': token})
    assert r.returncode == 0 and 'intact' in r.stdout
    r = cli('registry', 'audit', '--json', env={'RETAIL_CV_TOKEN': token})
    assert token not in r.stdout and json.loads(r.stdout)[-1]['outcome'] == 'denied'


def test_signed_tokens_from_the_one_credential_module_work_on_the_cli(tmp_path):
    "A central issuer's signed token: its registry scope is the role, revocation bites on the next command, denials audited."
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from retail_cv.credentials import issue_token
    from conftest import run_cli
    issuer = Ed25519PrivateKey.generate()
    pub = tmp_path/'issuer.pub'
    pub.write_bytes(issuer.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    revoked = tmp_path/'revoked.txt'; revoked.write_text('')
    ws = tmp_path/'ws'
    viewer = issue_token(issuer, 'dashboard', ['registry:viewer'])
    env = {'RETAIL_CV_TOKEN_KEYS': str(pub), 'RETAIL_CV_TOKEN_REVOCATIONS': str(revoked), 'RETAIL_CV_TOKEN': viewer}
    r = run_cli('-w', ws, 'registry', 'list', env=env)
    assert r.returncode == 0, r.stderr
    r = run_cli('-w', ws, 'registry', 'token', 'list', env=env)
    assert r.returncode == 1 and "viewer 'dashboard' may not list_tokens tokens: that needs the admin role" in r.stderr, r.stderr
    jti = json.loads(__import__('base64').urlsafe_b64decode(viewer.split('.')[1] + '=='))['jti']
    revoked.write_text(jti + '\n')
    r = run_cli('-w', ws, 'registry', 'list', env=env)
    assert r.returncode == 1 and f"token {jti} is revoked" in r.stderr, r.stderr
    r = run_cli('-w', ws, 'registry', 'list', env={**env, 'RETAIL_CV_TOKEN_KEYS': ''})
    assert r.returncode == 1 and 'signed tokens need the issuer' in r.stderr
    entries = Registry(Workspace.open(ws)).audit()
    seen = [(e.actor, e.action, e.outcome) for e in entries]
    assert ('dashboard', 'list_tokens', 'denied') in seen and ('dashboard', 'read', 'denied') in seen and ('unknown', 'read', 'denied') in seen
    assert viewer not in (ws/'registry'/'registry.db').read_bytes().decode('latin-1')  # the token itself is never stored
