"Loading files never unpickles arbitrary objects: every `torch.load` in the package is weights-only, checked over every module."
import ast
from pathlib import Path

import pytest

from conftest import ROOT

PACKAGE = ROOT/'retail_cv'


def _aliases(tree: ast.AST) -> tuple[set[str], set[str]]:
    "Names bound to the `torch` module, and names bound to `torch.load` itself, by the imports of a module."
    mods, funcs = {'torch'}, set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            mods |= {a.asname or a.name for a in n.names if a.name == 'torch'}
        elif isinstance(n, ast.ImportFrom) and n.module == 'torch':
            funcs |= {a.asname or a.name for a in n.names if a.name == 'load'}
    return mods, funcs


def _is_torch_load(call: ast.Call, mods: set[str], funcs: set[str]) -> bool:
    f = call.func
    if isinstance(f, ast.Name): return f.id in funcs
    return isinstance(f, ast.Attribute) and f.attr == 'load' and isinstance(f.value, ast.Name) and f.value.id in mods


def _is_true(call: ast.Call, kw: str) -> bool:
    "The call passes `kw=True` literally (not from a variable, not through **kwargs)."
    return any(k.arg == kw and isinstance(k.value, ast.Constant) and k.value.value is True for k in call.keywords)


def unsafe_loads(source: str, where: str = '<source>') -> tuple[int, list[str]]:
    "How many `torch.load` calls `source` makes, and each one that is not `weights_only=True`, or any other unpickling load."
    tree = ast.parse(source)
    mods, funcs = _aliases(tree)
    found, bad = 0, []
    for n in ast.walk(tree):
        if not isinstance(n, ast.Call): continue
        f = n.func
        if _is_torch_load(n, mods, funcs):
            found += 1
            if not _is_true(n, 'weights_only'): bad.append(f"{where}:{n.lineno}: torch.load without weights_only=True")
        elif isinstance(f, ast.Attribute) and f.attr in ('load', 'loads') and isinstance(f.value, ast.Name) \
                and f.value.id in ('pickle', 'cPickle', 'dill', 'joblib'):
            bad.append(f"{where}:{n.lineno}: {f.value.id}.{f.attr}")
        elif isinstance(f, ast.Attribute) and f.attr == 'load' and isinstance(f.value, ast.Name) and f.value.id in ('np', 'numpy') \
                and _is_true(n, 'allow_pickle'):
            bad.append(f"{where}:{n.lineno}: np.load(allow_pickle=True)")
        elif isinstance(f, ast.Attribute) and f.attr == 'load_from_checkpoint':  # Lightning's, which unpickles by default
            bad.append(f"{where}:{n.lineno}: load_from_checkpoint")
        elif isinstance(f, ast.Attribute) and f.attr == 'fit' and any(k.arg == 'ckpt_path' for k in n.keywords) \
                and not _is_true(n, 'weights_only'):  # Lightning's resume reads the checkpoint itself
            bad.append(f"{where}:{n.lineno}: trainer.fit(ckpt_path=...) without weights_only=True")
    return found, bad


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob('*.py') if p.name != '_modidx.py')


def test_every_torch_load_in_every_module_is_weights_only():
    results = {p.relative_to(ROOT).as_posix(): unsafe_loads(p.read_text(), p.relative_to(ROOT).as_posix()) for p in _modules()}
    bad = [b for _, found in results.values() for b in found]
    assert not bad, '\n'.join(bad)
    loading = {m for m, (n, _) in results.items() if n}
    # the one PyTorch file reader (models.read_torch_file) must be seen: a scan that finds nothing proves nothing
    assert 'retail_cv/models.py' in loading, loading
    # ... and the checkpoint readers go through it rather than calling torch.load themselves
    for m in ('train/_runs.py', 'evaluate/_models.py'): assert 'read_torch_file(' in (PACKAGE/m).read_text(), m
    assert len(_modules()) > 50


@pytest.mark.parametrize('src', [
    "import torch\ntorch.load(p)",
    "import torch\ntorch.load(p, weights_only=False)",
    "import torch\ntorch.load(p, weights_only=flag)",
    "import torch\ntorch.load(p, **kw)",
    "import torch as T\nT.load(p, map_location='cpu')",
    "from torch import load\nload(p)",
    "from torch import load as tl\ntl(p)",
    "import pickle\npickle.loads(b)",
    "np.load(f, allow_pickle=True)",
    "Model.load_from_checkpoint(p)",
    "trainer.fit(m, ckpt_path=p)",
])
def test_the_scan_catches_each_unsafe_form(src):
    assert unsafe_loads(src)[1], src


@pytest.mark.parametrize('src', [
    "import torch\ntorch.load(p, map_location='cpu', weights_only=True)",
    "from torch import load as tl\ntl(p, weights_only=True)",
    "trainer.fit(m, ckpt_path=p, weights_only=True)",
    "json.load(f); yaml.safe_load(f); np.load(f, allow_pickle=False)",
])
def test_the_scan_passes_safe_forms(src):
    assert unsafe_loads(src)[1] == []
