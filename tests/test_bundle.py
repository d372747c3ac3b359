"""Signed edge bundles: every kind of tampering is refused with the culprit named; builds are atomic and reproducible."""
from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retail_cv.bundle import (BUNDLE_FORMAT_VERSION, MANIFEST_FILE, SIGNATURE_FILE, SIGNING_KEY_ENV, TRUSTED_KEYS_ENV,
                              build_bundle, generate_signing_key, load_public_keys, load_signing_key, public_key_id,
                              sign_bundle, verify_bundle)
from retail_cv.core import ConfigError, DataError, IntegrityError, Workspace, sha256_file
from retail_cv.models import tiny_classifier, to_onnx

LABELS = ['cola', 'water', 'juice']
# every file a bundle built by `good` holds (golden inputs: a JPEG file, PNG bytes, an array stored as PNG)
FILES = ['MANIFEST.json', 'bundle.json', 'golden/000.jpg', 'golden/001.png', 'golden/002.png', 'golden/expected.npz',
         'model.onnx', 'model_card.html', 'model_card.md', 'signature.sig']


@pytest.fixture(scope='session')
def env(tmp_path_factory):
    "A workspace with a signing key, a foreign key, an exported tiny classifier and golden images."
    root = tmp_path_factory.mktemp('bundle')
    ws = Workspace.open(root/'ws')
    key = generate_signing_key(ws)
    foreign = generate_signing_key(root/'foreign', name='mallory')
    clf = tiny_classifier(3, image_size=32)
    onnx_path = to_onnx(clf, root/'clf.onnx')
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(root/'shelf.jpg', quality=90)
    png = io.BytesIO(); Image.fromarray(rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)).save(png, 'PNG')
    golden = [root/'shelf.jpg', png.getvalue(), rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)]
    kw = dict(name='shelf-classifier', version='1.0', labels=LABELS, contract=clf.contract(), golden_images=golden,
              workspace=ws, profile='shelf-cam-x86', metrics={'accuracy': 0.9}, license='Apache-2.0',
              provenance={'dataset_version': 'ds-1', 'run_id': 'run-1', 'git_commit': 'abc'},
              created_at='2025-01-01T00:00:00+00:00')
    good = build_bundle(root/'good', onnx_path, **kw)
    good_tar = build_bundle(root/'good.tar', onnx_path, **kw)
    return dict(root=root, ws=ws, key=key, foreign=foreign, onnx=onnx_path, kw=kw, good=good, good_tar=good_tar,
                clf=clf, trusted=[key.public_key])


def copy_of(env, tmp_path, tar=False) -> Path:
    src = env['good_tar'] if tar else env['good']
    dst = tmp_path/src.name
    return Path(shutil.copy(src, dst) if tar else shutil.copytree(src, dst))


def refused(path, trusted, match: str) -> str:
    with pytest.raises(IntegrityError) as e: verify_bundle(path, trusted)
    assert match in str(e.value), str(e.value)
    return str(e.value)


# ---- the good bundle ---------------------------------------------------------------------------------------------

def test_good_bundle_verifies_with_all_parts(env):
    info = verify_bundle(env['good'], env['trusted'])
    assert sorted(p.relative_to(env['good']).as_posix() for p in env['good'].rglob('*') if p.is_file()) == FILES
    assert sorted(info.files) == sorted(set(FILES) - {MANIFEST_FILE, SIGNATURE_FILE})
    m = info.meta
    assert (m.format_version, m.name, m.version, m.task, m.labels) == (BUNDLE_FORMAT_VERSION, 'shelf-classifier', '1.0', 'classification', LABELS)
    assert (m.opset, m.min_ort_version, m.profile, m.license) == (17, '1.13', 'shelf-cam-x86', 'Apache-2.0')
    assert m.contract.inputs[0].shape == ['batch', 3, 32, 32] and m.contract.preprocessing.mean == env['clf'].spec.mean
    assert (m.provenance.dataset_version, m.provenance.run_id, m.provenance.git_commit) == ('ds-1', 'run-1', 'abc')
    assert info.key_id == env['key'].key_id
    manifest = json.loads((env['good']/MANIFEST_FILE).read_text())
    for name, entry in manifest['files'].items():
        assert entry == {'sha256': sha256_file(env['good']/name), 'size': (env['good']/name).stat().st_size}
    images, expected = info.golden()
    assert len(images) == 3 and expected['logits'].shape == (3, 3)
    assert images[0] == (env['root']/'shelf.jpg').read_bytes()  # files are kept byte for byte
    card = (env['good']/'model_card.md').read_text()
    assert '# shelf-classifier 1.0' in card and 'ds-1' in card and 'accuracy' in card


def test_archive_is_deterministic_and_verifies(env, tmp_path):
    again = build_bundle(tmp_path/'again.tar', env['onnx'], **env['kw'])
    assert sha256_file(again) == sha256_file(env['good_tar'])
    with tarfile.open(env['good_tar']) as t:
        members = t.getmembers()
    assert [m.name for m in members] == sorted(FILES)
    assert {(m.mtime, m.mode, m.uid, m.gid, m.uname, m.gname) for m in members} == {(0, 0o644, 0, 0, '', '')}
    assert verify_bundle(env['good_tar'], env['trusted']).meta == verify_bundle(env['good'], env['trusted']).meta
    gz = build_bundle(tmp_path/'b.tar.gz', env['onnx'], **env['kw'])
    gz2 = build_bundle(tmp_path/'c.tgz', env['onnx'], **env['kw'])
    assert sha256_file(gz) == sha256_file(gz2) and verify_bundle(gz, env['trusted']).name == 'shelf-classifier'


def test_build_refuses_to_overwrite_unless_asked(env, tmp_path):
    out = build_bundle(tmp_path/'b', env['onnx'], **env['kw'])
    with pytest.raises(ConfigError, match='already exists'): build_bundle(out, env['onnx'], **env['kw'])
    build_bundle(out, env['onnx'], **{**env['kw'], 'version': '1.1'}, overwrite=True)
    assert verify_bundle(out, env['trusted']).version == '1.1'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['b']  # no staging or old copies left


def test_failed_build_leaves_nothing_behind(env, tmp_path):
    (tmp_path/'bad.jpg').write_bytes(b'\xff\xd8\xff\xe0 truncated')
    with pytest.raises(DataError, match='bad.jpg: cannot decode image'):
        build_bundle(tmp_path/'b.tar', env['onnx'], **{**env['kw'], 'golden_images': [tmp_path/'bad.jpg']})
    other = tiny_classifier(5, image_size=32)  # contract for 5 classes, model with 3
    with pytest.raises(ConfigError, match=r"output 'logits' has shape \['batch', 3\] in the model, \['batch', 5\] in the contract"):
        build_bundle(tmp_path/'b', env['onnx'], **{**env['kw'], 'contract': other.contract(), 'labels': list('abcde')})
    with pytest.raises(ConfigError, match="the output 'logits' of shape \\(batch, 4\\) for 4 labels"):
        build_bundle(tmp_path/'b', env['onnx'], **{**env['kw'], 'labels': LABELS + ['tea']})
    assert sorted(p.name for p in tmp_path.iterdir()) == ['bad.jpg']


# ---- tampering ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', FILES)
@pytest.mark.parametrize('where', ['first', 'middle', 'last'])
def test_any_changed_byte_in_any_file_is_refused_naming_the_file(env, tmp_path, name, where):
    b = copy_of(env, tmp_path)
    raw = bytearray((b/name).read_bytes())
    i = {'first': 0, 'middle': len(raw) // 2, 'last': len(raw) - 1}[where]
    raw[i] ^= 0x20
    (b/name).write_bytes(bytes(raw))
    refused(b, env['trusted'], name)


@pytest.mark.parametrize('name', FILES)
def test_changed_byte_inside_an_archive_member_is_refused_naming_it(env, tmp_path, name):
    b = copy_of(env, tmp_path, tar=True)
    with tarfile.open(b) as t:
        m = t.getmember(name)
        offset = m.offset_data + m.size // 2
    raw = bytearray(b.read_bytes()); raw[offset] ^= 0x20; b.write_bytes(bytes(raw))
    refused(b, env['trusted'], name)


@pytest.mark.parametrize('name', [f for f in FILES if f not in (MANIFEST_FILE, SIGNATURE_FILE)])
def test_missing_file_is_refused_naming_it(env, tmp_path, name):
    b = copy_of(env, tmp_path)
    (b/name).unlink()
    refused(b, env['trusted'], f'listed in MANIFEST.json are missing: {name}')


@pytest.mark.parametrize('name, match', [(MANIFEST_FILE, 'MANIFEST.json is missing; not a signed retail_cv bundle'),
                                         (SIGNATURE_FILE, 'signature.sig is missing; the bundle is not signed')])
def test_unsigned_bundle_is_refused(env, tmp_path, name, match):
    b = copy_of(env, tmp_path)
    (b/name).unlink()
    refused(b, env['trusted'], match)


@pytest.mark.parametrize('extra', ['notes.txt', 'golden/003.png', 'sub/dir/x.bin'])
def test_extra_file_is_refused_naming_it(env, tmp_path, extra):
    b = copy_of(env, tmp_path)
    (b/extra).parent.mkdir(parents=True, exist_ok=True)
    (b/extra).write_bytes(b'smuggled')
    refused(b, env['trusted'], f'not listed in MANIFEST.json (added after signing?): {extra}')


def test_extra_member_in_archive_is_refused(env, tmp_path):
    b = copy_of(env, tmp_path, tar=True)
    with tarfile.open(b, 'a') as t:
        ti = tarfile.TarInfo('payload.sh'); ti.size = 4
        t.addfile(ti, io.BytesIO(b'boom'))
    refused(b, env['trusted'], 'payload.sh')


def test_foreign_signature_is_refused(env, tmp_path):
    b = copy_of(env, tmp_path)
    (b/'model.onnx').write_bytes(to_onnx(tiny_classifier(3, image_size=32), tmp_path/'evil.onnx').read_bytes())
    kid = sign_bundle(b, env['foreign'].private_key)
    assert kid == env['foreign'].key_id
    refused(b, env['trusted'], f"signature.sig is by key {kid}, which is not trusted (trusted: {env['key'].key_id})")
    # claiming the trusted key's id does not help: the signature does not verify with it
    sig = json.loads((b/SIGNATURE_FILE).read_text()); sig['key_id'] = env['key'].key_id
    (b/SIGNATURE_FILE).write_text(json.dumps(sig))
    refused(b, env['trusted'], f"signature.sig does not verify MANIFEST.json with trusted key {env['key'].key_id}")


def test_manifest_rewritten_without_the_key_is_refused(env, tmp_path):
    "An attacker who changes a file and updates its hash in MANIFEST.json cannot re-sign it."
    b = copy_of(env, tmp_path)
    (b/'model_card.md').write_text('# nothing to see\n')
    manifest = json.loads((b/MANIFEST_FILE).read_text())
    manifest['files']['model_card.md'] = {'sha256': sha256_file(b/'model_card.md'), 'size': (b/'model_card.md').stat().st_size}
    (b/MANIFEST_FILE).write_text(json.dumps(manifest, sort_keys=True, indent=2) + '\n')
    refused(b, env['trusted'], 'does not verify MANIFEST.json')


def test_newer_format_version_asks_for_an_upgrade(env, tmp_path):
    b = copy_of(env, tmp_path)
    meta = json.loads((b/'bundle.json').read_text()); meta['format_version'] = BUNDLE_FORMAT_VERSION + 1
    (b/'bundle.json').write_text(json.dumps(meta))
    sign_bundle(b, workspace=env['ws'])  # a properly signed bundle from a newer builder
    refused(b, env['trusted'], f'bundle format {BUNDLE_FORMAT_VERSION + 1} is newer than this runtime supports '
                               f'({BUNDLE_FORMAT_VERSION}); upgrade retail_cv')


@pytest.mark.parametrize('edit, match', [
    (lambda m: m.update(colour='red'), "unknown config key 'colour'"),
    (lambda m: m.update(labels=['cola', 'water']), "for 2 labels"),
    (lambda m: m['contract']['preprocessing'].update(image_size=[64, 64]), 'to match preprocessing.image_size'),
    (lambda m: m['contract']['postprocessing'].update(score_threshold='high'), "'contract.postprocessing.score_threshold'"),
    (lambda m: m['golden'].update(inputs=['../etc/passwd']), "golden file '../etc/passwd' must be directly under golden/"),
])
def test_signed_but_invalid_contract_is_refused(env, tmp_path, edit, match):
    b = copy_of(env, tmp_path)
    meta = json.loads((b/'bundle.json').read_text()); edit(meta)
    (b/'bundle.json').write_text(json.dumps(meta))
    sign_bundle(b, workspace=env['ws'])
    msg = refused(b, env['trusted'], 'bundle.json is invalid')
    assert match in msg, msg


# ---- archive and folder safety -----------------------------------------------------------------------------------

def _tar_with(env, path: Path, member: tarfile.TarInfo, data: bytes | None = None) -> Path:
    with tarfile.open(env['good_tar']) as src, tarfile.open(path, 'w') as dst:
        for m in src.getmembers(): dst.addfile(m, src.extractfile(m))
        dst.addfile(member, io.BytesIO(data) if data is not None else None)
    return path


@pytest.mark.parametrize('name', ['../evil.sh', 'golden/../../evil.sh', '/etc/cron.d/evil', './../x', 'C:/win.ini', 'golden\\..\\x'])
def test_archive_member_escaping_the_bundle_is_refused(env, tmp_path, name):
    ti = tarfile.TarInfo(name); ti.size = 1
    refused(_tar_with(env, tmp_path/'t.tar', ti, b'x'), env['trusted'], f'member {name!r} points outside the bundle')


@pytest.mark.parametrize('kind, text', [(tarfile.SYMTYPE, 'is a symbolic link to'), (tarfile.LNKTYPE, 'is a hard link to'),
                                        (tarfile.CHRTYPE, 'is a device'), (tarfile.FIFOTYPE, 'is a FIFO')])
def test_archive_links_and_devices_are_refused(env, tmp_path, kind, text):
    ti = tarfile.TarInfo('golden/003.png'); ti.type = kind
    if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE): ti.linkname = '/etc/passwd'
    refused(_tar_with(env, tmp_path/'t.tar', ti), env['trusted'], f"member 'golden/003.png' {text}")


def test_symlink_replacing_a_signed_file_is_refused(env, tmp_path):
    "Even a link to identical bytes: the runtime would follow it to a file the signature does not protect."
    b = copy_of(env, tmp_path)
    outside = tmp_path/'outside.md'
    shutil.move(b/'model_card.md', outside)
    os.symlink(outside, b/'model_card.md')
    refused(b, env['trusted'], 'model_card.md is a symbolic link')


def test_duplicate_archive_member_is_refused(env, tmp_path):
    ti = tarfile.TarInfo('model.onnx'); ti.size = 4
    refused(_tar_with(env, tmp_path/'t.tar', ti, b'evil'), env['trusted'], "member 'model.onnx' appears twice")


def test_not_a_bundle(env, tmp_path):
    (tmp_path/'x.tar').write_bytes(b'not a tar at all' * 100)
    refused(tmp_path/'x.tar', env['trusted'], 'neither a folder nor a readable tar archive')
    refused(tmp_path/'absent', env['trusted'], 'does not exist')


def test_file_swapped_after_verification_is_caught_when_read(env, tmp_path):
    b = copy_of(env, tmp_path)
    info = verify_bundle(b, env['trusted'])
    assert info.read_bytes('model.onnx') == (b/'model.onnx').read_bytes()
    (b/'model.onnx').write_bytes(b'swapped')
    with pytest.raises(IntegrityError, match='model.onnx changed after the bundle was verified'): info.read_bytes('model.onnx')


# ---- keys --------------------------------------------------------------------------------------------------------

def test_key_files_and_sources(env, tmp_path, monkeypatch):
    k = generate_signing_key(tmp_path/'keys')
    assert oct(k.private_key.stat().st_mode & 0o777) == '0o600'
    with pytest.raises(ConfigError, match='already exists; refusing to overwrite'): generate_signing_key(tmp_path/'keys')
    monkeypatch.setenv(SIGNING_KEY_ENV, str(k.private_key))
    assert public_key_id(load_signing_key()) == k.key_id
    monkeypatch.setenv(SIGNING_KEY_ENV, k.private_key.read_text())  # PEM text, as CI secrets come
    assert public_key_id(load_signing_key()) == k.key_id
    monkeypatch.setenv(SIGNING_KEY_ENV, str(tmp_path/'nope.key'))
    with pytest.raises(ConfigError, match='nope.key does not exist'): load_signing_key()
    monkeypatch.delenv(SIGNING_KEY_ENV)
    with pytest.raises(ConfigError, match='no signing key'): load_signing_key()
    # a bundle signed via the environment verifies with the trusted keys from the environment
    monkeypatch.setenv(SIGNING_KEY_ENV, str(k.private_key))
    out = build_bundle(tmp_path/'b', env['onnx'], **{**env['kw'], 'workspace': None})
    monkeypatch.setenv(TRUSTED_KEYS_ENV, os.pathsep.join([str(env['key'].public_key), str(tmp_path/'keys')]))
    assert sorted(load_public_keys()) == sorted([env['key'].key_id, k.key_id])
    assert verify_bundle(out).key_id == k.key_id
    monkeypatch.delenv(TRUSTED_KEYS_ENV)
    with pytest.raises(ConfigError, match='no trusted public keys'): verify_bundle(out)
    with pytest.raises(ConfigError, match='that is a private key'): verify_bundle(out, k.private_key)


def test_model_with_non_utf8_dimension_names_is_refused(env, tmp_path):
    "A model whose dimension names are not UTF-8 (a crafted file): refused by the builder, and by the runtime in a validly signed bundle."
    from retail_cv.runtime import Predictor
    raw = env['onnx'].read_bytes()
    assert raw.count(b'batch') >= 2
    crafted = raw.replace(b'batch', b'b\xfftch')  # the same length: the protobuf stays well-formed
    message = "model does not match the contract: model inputs have a name or dimension that is not UTF-8 text"
    with pytest.raises(ConfigError, match=message) as e: build_bundle(tmp_path/'b', crafted, **env['kw'])
    assert "model outputs have a name or dimension that is not UTF-8 text" in str(e.value)
    assert not (tmp_path/'b').exists()
    # signed with the trusted key, so only the runtime's own contract check stands between it and a session
    path = copy_of(env, tmp_path)
    (path/'model.onnx').write_bytes(crafted)
    sign_bundle(path, env['key'].private_key)
    with pytest.raises(IntegrityError, match="model.onnx does not match the contract in bundle.json: model inputs have a name or dimension that is not UTF-8"):
        Predictor.from_bundle(path, trusted_keys=env['trusted'])
