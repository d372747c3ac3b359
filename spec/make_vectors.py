"""Write the bundle format's JSON Schemas and its conformance vectors, deterministically.

    python spec/make_vectors.py            # rewrites spec/*.schema.json and spec/vectors/
    python spec/make_vectors.py --out DIR  # somewhere else (tests compare two runs)

Every key is derived from a fixed seed, every time stamp is fixed, archives have sorted names, zero times and neutral
owners, so two runs with the same onnx / onnxruntime / Pillow give the same bytes. What each vector holds and what a
device must answer is in spec/bundle-format.md; `tests/test_agent.py` runs the Python agent against every vector.
"""
from __future__ import annotations

import argparse
import base64
import copy
import hashlib
import io
import json
import shutil
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from retail_cv.agent import Counters, Statement, TrustedKey, key_b64, revocation_statement, rotation_statement
from retail_cv.bundle import BUNDLE_FORMAT_VERSION, BundleMeta, Manifest, build_bundle, public_key_id, sign_bundle

SPEC = Path(__file__).resolve().parent
PROFILE = 'shelf-cam-x86'  # the profile of every vector's device
T0 = '2026-01-01T00:00:00+00:00'  # when every provisioned key was added and every bundle built
PAST = '2001-01-01T00:00:00+00:00'  # an expiry long gone


# ---- deterministic ingredients -------------------------------------------------------------------------------------

def key(name: str) -> Ed25519PrivateKey:
    "A test signing key derived from its name (never use these keys for anything else)."
    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b'retail_cv conformance vectors: ' + name.encode()).digest())


def tiny_onnx(seed: int, pad: int = 0) -> bytes:
    "A 3-class classifier of 32 x 32 images (mean colour, then a linear layer); `pad` extra float32 weights make it bigger."
    rng = np.random.default_rng(seed)
    init = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n) for n, s in (('W', (3, 3)), ('b', (3,)))]
    nodes = [helper.make_node('ReduceMean', ['images'], ['m'], axes=[2, 3], keepdims=0),
             helper.make_node('MatMul', ['m', 'W'], ['mm']), helper.make_node('Add', ['mm', 'b'], ['logits0'])]
    if pad:  # logits + 0 * sum(pad): the weights are used, so no optimiser drops them
        init += [numpy_helper.from_array(rng.standard_normal(pad).astype(np.float32), 'pad'),
                 numpy_helper.from_array(np.zeros((), np.float32), 'zero')]
        nodes += [helper.make_node('ReduceSum', ['pad'], ['s'], keepdims=0), helper.make_node('Mul', ['s', 'zero'], ['z']),
                  helper.make_node('Add', ['logits0', 'z'], ['logits'])]
    else: nodes[-1].output[0] = 'logits'
    g = helper.make_graph(nodes, 'tiny', [helper.make_tensor_value_info('images', TensorProto.FLOAT, ['batch', 3, 32, 32])],
                          [helper.make_tensor_value_info('logits', TensorProto.FLOAT, ['batch', 3])], init)
    return helper.make_model(g, opset_imports=[helper.make_opsetid('', 17)], ir_version=8).SerializeToString()


CONTRACT = {'inputs': [{'name': 'images', 'shape': ['batch', 3, 32, 32], 'dtype': 'float32'}],
            'outputs': [{'name': 'logits', 'shape': ['batch', 3], 'dtype': 'float32'}], 'preprocessing': {'image_size': 32}}


def golden_png(seed: int = 0) -> bytes:
    "A small noise image as PNG."
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(buf, 'PNG')
    return buf.getvalue()


def make_bundle(out: Path, signer: Ed25519PrivateKey, version: str = '1', profile: str | None = PROFILE,
                name: str = 'shelf', seed: int | None = None, pad: int = 0) -> Path:
    "A signed bundle folder (or archive, by its suffix) with fixed time stamps and provenance."
    return build_bundle(out, tiny_onnx(int(version) if seed is None else seed, pad), name=name, version=version,
                        labels=['cola', 'water', 'juice'], contract=CONTRACT, golden_images=[golden_png()], key=signer,
                        profile=profile, created_at=T0, overwrite=True,
                        provenance={'retail_cv_version': 'vectors', 'onnxruntime_version': 'vectors'})


def pack(folder: Path, out: Path, extra: list[tuple[tarfile.TarInfo, bytes]] = ()) -> Path:
    "A tar archive of `folder` with sorted names, zero times and neutral owners, plus `extra` raw members."
    with open(out, 'wb') as f, tarfile.open(fileobj=f, mode='w', format=tarfile.PAX_FORMAT) as tar:
        for p in sorted(q for q in folder.rglob('*') if q.is_file()):
            ti = tarfile.TarInfo(p.relative_to(folder).as_posix())
            ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = p.stat().st_size, 0, 0o644, 0, 0, '', ''
            with open(p, 'rb') as fh: tar.addfile(ti, fh)
        for ti, data in extra: tar.addfile(ti, io.BytesIO(data) if ti.isreg() else None)
    return out


def member(name: str, data: bytes = b'', kind: bytes = tarfile.REGTYPE, link: str = '') -> tuple[tarfile.TarInfo, bytes]:
    "A raw tar member with neutral metadata."
    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname, ti.size, ti.mtime, ti.mode = kind, link, len(data) if kind == tarfile.REGTYPE else 0, 0, 0o644
    return ti, data


def npz(arrays: dict[str, np.ndarray]) -> bytes:
    "An .npz archive with fixed time stamps."
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, 'w', zipfile.ZIP_DEFLATED) as zf:
        for k in sorted(arrays):
            zi = zipfile.ZipInfo(f'{k}.npy', date_time=(1980, 1, 1, 0, 0, 0)); zi.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(zi, 'w') as f: np.lib.format.write_array(f, np.ascontiguousarray(arrays[k]), allow_pickle=False)
    return buf.getvalue()


def trust_doc(**keys: dict[str, Any]) -> dict[str, Any]:
    "A device's trust.json: key name -> extra fields (expires_at, revoked_at, reason)."
    out = {}
    for name, extra in keys.items():
        k = TrustedKey(public_key=key_b64(key(name)), added_at=T0, **extra)
        out[public_key_id(key(name))] = k.model_dump(mode='json')
    return {'format': 1, 'keys': dict(sorted(out.items()))}


def public_pem(name: str) -> bytes:
    return key(name).public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


# ---- the vectors ----------------------------------------------------------------------------------------------------

def _edit(base: Path, work: Path, change: Callable[[Path], None], signer: str | None = 'root') -> Path:
    "A copy of the bundle folder `base`, changed by `change`, signed again by `signer` (None: not signed again)."
    folder = work/f'edit-{len(list(work.iterdir()))}'
    shutil.copytree(base, folder)
    change(folder)
    if signer: sign_bundle(folder, key(signer))
    return folder


def _meta(**changes: Any) -> Callable[[Path], None]:
    "A change of bundle.json's top-level fields."
    def change(folder: Path):
        meta = json.loads((folder/'bundle.json').read_text()); meta.update(changes)
        (folder/'bundle.json').write_text(json.dumps(meta, indent=2) + '\n')
    return change


def _flip(name: str, at: int = 100) -> Callable[[Path], None]:
    "A change of one byte of file `name`, size kept."
    def change(folder: Path):
        data = bytearray((folder/name).read_bytes()); data[min(at, len(data) - 1)] ^= 0x01; (folder/name).write_bytes(bytes(data))
    return change


def _golden_off(folder: Path) -> None:
    with np.load(folder/'golden'/'expected.npz') as z: arrays = {k: z[k] for k in z.files}
    (folder/'golden'/'expected.npz').write_bytes(npz({k: v + 1.0 for k, v in arrays.items()}))


def _bad_signature(folder: Path) -> None:
    sig = json.loads((folder/'signature.sig').read_text())
    raw = bytearray(base64.b64decode(sig['signature'])); raw[0] ^= 0x01
    (folder/'signature.sig').write_text(json.dumps({**sig, 'signature': base64.b64encode(bytes(raw)).decode()}, sort_keys=True, separators=(',', ':')))


def _tampered_rotation() -> dict[str, Any]:
    "A rotation to `next`, signed by `root`, whose key was then swapped for `rogue`'s."
    doc = copy.deepcopy(rotation_statement(key('root'), key('next').public_key(), issued_at=T0))
    doc['statement'].update(key_id=public_key_id(key('rogue')), public_key=key_b64(key('rogue')))
    return doc


def vectors(work: Path) -> list[dict[str, Any]]:
    "Every vector: name, what it shows, its bundle archive, the device's trust store, statements, expected verdicts."
    base = make_bundle(work/'base', key('root'))
    by = lambda signer: make_bundle(work/f'by-{signer}', key(signer))
    root, rot = trust_doc(root={}), lambda **kw: rotation_statement(key('root'), key('next').public_key(), issued_at=T0, **kw)
    v = lambda name, about, bundle, expected, trust=root, statements=(), codes=(), extra=(): dict(
        name=name, about=about, bundle=bundle, expected=expected, trust=trust, statements=list(statements),
        statement_codes=list(codes), extra=list(extra))
    return [
        v('valid', "a bundle signed by the trusted key, for the device's profile", base, 'accepted'),
        v('valid-format-1', "a format 1 bundle (no embedding output): still read", _edit(base, work, _meta(format_version=1)), 'accepted'),
        v('tampered-model', "one byte of model.onnx changed after signing", _edit(base, work, _flip('model.onnx'), None), 'tampered'),
        v('tampered-golden', "golden/expected.npz changed after signing", _edit(base, work, _golden_off, None), 'tampered'),
        v('extra-file', "a file added after signing", base, 'tampered', extra=[member('notes.txt', b'added later\n')]),
        v('missing-file', "a signed file removed", _edit(base, work, lambda f: (f/'model_card.html').unlink(), None), 'tampered'),
        v('tampered-manifest', "MANIFEST.json changed after signing", _edit(base, work, lambda f: (f/'MANIFEST.json').write_bytes(
            (f/'MANIFEST.json').read_bytes().replace(b'"format_version":2', b'"format_version":1')), None), 'bad-signature'),
        v('bad-signature', "one bit of the signature flipped", _edit(base, work, _bad_signature, None), 'bad-signature'),
        v('unsigned', "no signature.sig", _edit(base, work, lambda f: (f/'signature.sig').unlink(), None), 'bad-signature'),
        v('untrusted-key', "signed by a key the device never trusted", by('rogue'), 'untrusted-key'),
        v('expired-key', "signed by a trusted key past its expiry", base, 'expired-key', trust=trust_doc(root={'expires_at': PAST})),
        v('revoked-key', "signed by a key the trust store holds as revoked", base, 'revoked-key',
          trust=trust_doc(root={'revoked_at': T0, 'reason': 'key leaked'})),
        v('revoked-by-statement', "the trusted key revoked itself by a statement; then a bundle signed by it", base, 'revoked-key',
          statements=[revocation_statement(key('root'), public_key_id(key('root')), 'key leaked', issued_at=T0)], codes=['accepted']),
        v('rotated-key', "a new key announced under the trusted one; a bundle signed by the new key", by('next'), 'accepted',
          statements=[rot()], codes=['accepted']),
        v('rotation-retires-signer', "a rotation that retires the announcing key; a bundle still signed by it", base, 'expired-key',
          statements=[rot(retire_signer_at=PAST)], codes=['accepted']),
        v('forged-rotation', "a rotation signed by an unknown key announcing itself; a bundle signed by it", by('rogue'), 'untrusted-key',
          statements=[rotation_statement(key('rogue'), key('rogue').public_key(), issued_at=T0)], codes=['untrusted-key']),
        v('tampered-rotation', "a rotation whose new key was swapped after signing", by('rogue'), 'untrusted-key',
          statements=[_tampered_rotation()], codes=['bad-signature']),
        v('wrong-profile', "a bundle built for another device profile", make_bundle(work/'arm', key('root'), profile='handheld-arm'), 'wrong-profile'),
        v('no-profile', "a bundle that names no device profile", make_bundle(work/'none', key('root'), profile=None), 'wrong-profile'),
        v('unknown-format', "a correctly signed bundle of format 3, which this format version does not define",
          _edit(base, work, _meta(format_version=3)), 'unknown-format'),
        v('invalid-metadata', "a signed bundle.json that breaks the schema (no labels)", _edit(base, work, _meta(labels=[])), 'invalid-metadata'),
        v('path-traversal', "an archive member named ../evil.txt", base, 'unsafe-archive', extra=[member('../evil.txt', b'x')]),
        v('symlink-member', "an archive member that is a symbolic link", base, 'unsafe-archive',
          extra=[member('golden/link.png', kind=tarfile.SYMTYPE, link='/etc/passwd')]),
        v('golden-mismatch', "signed, but the recorded golden outputs differ from what the model computes", _edit(base, work, _golden_off), 'golden-failed'),
        v('not-a-bundle', "a tar archive without a manifest", None, 'unreadable', extra=[member('model.onnx', b'not a model')]),
    ]


def write_vectors(out: Path) -> list[dict[str, Any]]:
    "Write spec/vectors/: one folder per vector and index.json; return the index."
    shutil.rmtree(out, ignore_errors=True); (out/'keys').mkdir(parents=True)
    for name in ('root', 'next', 'rogue'): (out/'keys'/f'{name}.pub').write_bytes(public_pem(name))
    index = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp); (work/'empty').mkdir()
        for vec in vectors(work):
            d = out/vec['name']; d.mkdir()
            pack(vec['bundle'] or work/'empty', d/'bundle.tar', vec['extra'])
            (d/'trust.json').write_text(json.dumps(vec['trust'], indent=2) + '\n')
            (d/'device.json').write_text(json.dumps({'profile': PROFILE}) + '\n')
            for i, st in enumerate(vec['statements']): (d/f'statement-{i + 1}.trust.json').write_text(json.dumps(st, indent=2) + '\n')
            expected = {'code': vec['expected'], 'statements': vec['statement_codes']}
            (d/'expected.json').write_text(json.dumps(expected, indent=2) + '\n')
            index.append({'name': vec['name'], 'about': vec['about'], **expected})
    (out/'index.json').write_text(json.dumps({'format_version': BUNDLE_FORMAT_VERSION, 'profile': PROFILE, 'vectors': index}, indent=2) + '\n')
    return index


# ---- the schemas ----------------------------------------------------------------------------------------------------

def _schema(name: str, body: dict[str, Any]) -> dict[str, Any]:
    return {'$schema': 'https://json-schema.org/draft/2020-12/schema', '$id': f'retail_cv/bundle/format-{BUNDLE_FORMAT_VERSION}/{name}', **body}


def schemas() -> dict[str, dict[str, Any]]:
    "File name -> JSON Schema of every JSON document of the bundle format and the device interface."
    sig = {'title': 'signature.sig', 'type': 'object', 'additionalProperties': False, 'required': ['algorithm', 'key_id', 'signature'],
           'properties': {'algorithm': {'const': 'ed25519'}, 'key_id': {'type': 'string', 'pattern': '^[0-9a-f]{16}$'},
                          'signature': {'type': 'string', 'description': 'base64 (RFC 4648 section 4, padded) of the 64-byte Ed25519 signature of MANIFEST.json'}}}
    trust = {'title': 'trust.json', 'type': 'object', 'additionalProperties': False, 'required': ['format', 'keys'],
             'properties': {'format': {'const': 1}, 'keys': {'type': 'object', 'propertyNames': {'pattern': '^[0-9a-f]{16}$'},
                                                             'additionalProperties': {'$ref': '#/$defs/TrustedKey'}}},
             '$defs': {'TrustedKey': TrustedKey.model_json_schema()}}
    st = Statement.model_json_schema()
    statement = {'title': 'trust statement', 'type': 'object', 'additionalProperties': False, 'required': ['statement', 'signed_by', 'signature'],
                 'properties': {'statement': {'$ref': '#/$defs/Statement'}, 'signed_by': {'type': 'string', 'pattern': '^[0-9a-f]{16}$'},
                                'signature': {'type': 'string', 'description': 'base64 of the Ed25519 signature of the canonical JSON of `statement`'}},
                 '$defs': {'Statement': st}}
    return {'bundle.schema.json': _schema('bundle', BundleMeta.model_json_schema()),
            'manifest.schema.json': _schema('manifest', Manifest.model_json_schema()),
            'signature.schema.json': _schema('signature', sig),
            'trust.schema.json': _schema('trust', trust),
            'trust-statement.schema.json': _schema('trust-statement', statement),
            'counters.schema.json': _schema('counters', Counters.model_json_schema())}


def write_all(out: Path) -> None:
    "Schemas into `out`, vectors into `out/vectors`."
    out.mkdir(parents=True, exist_ok=True)
    for name, doc in schemas().items(): (out/name).write_text(json.dumps(doc, indent=2, sort_keys=True) + '\n')
    write_vectors(out/'vectors')


if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--out', type=Path, default=SPEC, help='where the schemas go (vectors in OUT/vectors)')
    write_all(ap.parse_args().out)
