"""The shape of the codebase: module sizes, layering, literate chapters, `@patch` only on foreign types.

The layer table is read from ARCHITECTURE.md, so the map and the check cannot drift apart."""
from __future__ import annotations

import ast
import json
import re
import statistics
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT/'retail_cv'
NBS = ROOT/'nbs'
MAX_LINES = 600
TORCH_FREE = ('core', 'preprocess', 'profiles', 'bundle', 'credentials', 'runtime', 'serve', 'agent', 'fleet', 'apps')  # what a device or store server runs
TORCH = {'torch', 'torchvision', 'lightning', 'pytorch_lightning', 'torchmetrics'}
# torch imports on the device side that only run where torch is installed, each with its reason
OPTIONAL_TORCH = {'core': 'seed_everything also seeds torch when it is installed'}


def _modules() -> dict[str, Path]:
    "Dotted module name (without `retail_cv.`) -> file, for every generated module."
    out = {}
    for f in sorted(PKG.rglob('*.py')):
        if f.name == '_modidx.py': continue
        parts = f.relative_to(PKG).with_suffix('').parts
        if parts[-1] == '__init__': parts = parts[:-1]
        out['.'.join(parts)] = f
    return out


def _layers() -> dict[str, int]:
    "Top-level module or package -> layer number, from the table under '## Layers' in ARCHITECTURE.md."
    text = (ROOT/'ARCHITECTURE.md').read_text()
    section = text.split('## Layers', 1)[1].split('\n## ', 1)[0]
    layers = {}
    for row in re.findall(r'^\|\s*(\d+)\s*\|([^|]+)\|', section, flags=re.M):
        for name in re.findall(r'`([a-z0-9_.]+)`', row[1]): layers[name] = int(row[0])
    assert layers, 'ARCHITECTURE.md has no layer table under "## Layers"'
    return layers


def _top(module: str) -> str:
    "The layer key of a module: its top-level package (`registry._store` -> `registry`)."
    return module.split('.')[0]


def _imports(path: Path, module: str) -> set[str]:
    "Every module `path` imports, absolute, at any depth (lazy imports inside functions included)."
    is_pkg = path.name == '__init__.py'
    here = ('retail_cv.' + module).split('.') if module else ['retail_cv']
    package = here if is_pkg else here[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import): out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                name = '.'.join(base + ([node.module] if node.module else []))
                if node.module is None: out.update(f'{name}.{a.name}' for a in node.names)
                else: out.add(name)
            elif node.module: out.add(node.module)
    return out


def test_no_module_over_600_lines():
    long = {str(f.relative_to(ROOT)): n for f in PKG.rglob('*.py')
            if f.name != '_modidx.py' and (n := len(f.read_text().splitlines())) > MAX_LINES}
    assert not long, f'modules over {MAX_LINES} lines (split them along their chapter headings): {long}'


def test_every_module_has_a_layer():
    layers = _layers()
    missing = sorted({_top(m) for m in _modules() if m and _top(m) not in layers})
    assert not missing, f'add these to the layer table of ARCHITECTURE.md: {missing}'


def test_no_module_imports_from_a_layer_above_it():
    layers, bad = _layers(), []
    for mod, path in _modules().items():
        if not mod: continue
        mine = layers[_top(mod)]
        for imp in _imports(path, mod):
            if not imp.startswith('retail_cv.'): continue
            target = imp.removeprefix('retail_cv.')
            if target in ('_modidx', '__version__'): continue
            theirs = layers.get(_top(target))
            if theirs is not None and theirs > mine: bad.append(f'{mod} (layer {mine}) imports {target} (layer {theirs})')
    assert not bad, 'layering broken:\n' + '\n'.join(sorted(bad))


def test_device_side_modules_import_no_torch():
    "The runtime and what it stands on run on devices without torch: no torch import, direct or through our modules."
    mods = _modules()
    graph = {m: {i.removeprefix('retail_cv.') for i in _imports(p, m)} for m, p in mods.items()}
    bad = []
    for start in [m for m in mods if _top(m) in TORCH_FREE]:
        seen, todo = set(), [start]
        while todo:
            m = todo.pop()
            if m in seen: continue
            seen.add(m)
            for dep in graph.get(m, ()):
                if dep.split('.')[0] in TORCH and m not in OPTIONAL_TORCH: bad.append(f'{start} -> {m} imports {dep}')
                # `from retail_cv.x import y` may name a module or a symbol: follow whichever exists
                for cand in (dep, dep.rsplit('.', 1)[0]):
                    if cand in mods: todo.append(cand); break
    assert not bad, 'torch reaches the device side:\n' + '\n'.join(sorted(set(bad)))


def _patched_types() -> list[tuple[str, str]]:
    "(module, annotation of `self`) for every function decorated with fastcore's `@patch`."
    out = []
    for mod, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and any(
                    (isinstance(d, ast.Name) and d.id == 'patch') or (isinstance(d, ast.Call) and getattr(d.func, 'id', '') == 'patch')
                    for d in node.decorator_list):
                ann = node.args.args[0].annotation if node.args.args else None
                out.append((mod, ast.unparse(ann) if ann is not None else '?'))
    return out


def test_patch_only_on_foreign_types():
    ours = {n.name for p in _modules().values() for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.ClassDef)}
    bad = [f'{m}: @patch on our own {t}' for m, t in _patched_types() if t.split('.')[-1].strip("'\"") in ours or t == '?']
    assert not bad, 'methods of our classes belong in the class body:\n' + '\n'.join(bad)


# --- literate chapters -------------------------------------------------------------------------------------------

_EXPORT = re.compile(r'^\s*#\|\s*export(i)?\b', re.M)


def _code(cell) -> str: return ''.join(cell['source']) if isinstance(cell['source'], list) else cell['source']


def _body(src: str) -> str: return '\n'.join(l for l in src.splitlines() if not l.lstrip().startswith('#|'))


def _is_imports(tree: ast.Module) -> bool:
    return all(isinstance(n, (ast.Import, ast.ImportFrom)) or (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))
               for n in tree.body)


def chapter_cells() -> list[dict]:
    "Every exported cell of every chapter: notebook, lines, definitions, whether an example follows."
    rows = []
    for nb in sorted(NBS.glob('*.ipynb')):
        cells = [c for c in json.loads(nb.read_text())['cells'] if c['cell_type'] == 'code']
        for i, c in enumerate(cells):
            src = _code(c)
            if not _EXPORT.search(src.split('\n', 1)[0] if src else ''): continue
            body = _body(src)
            try: tree = ast.parse(body)
            except SyntaxError: continue
            if not tree.body or _is_imports(tree): continue
            defs = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
            nxt = cells[i + 1] if i + 1 < len(cells) else None
            example = nxt is not None and not _EXPORT.search(_code(nxt).split('\n', 1)[0] if _code(nxt) else '')
            rows.append({'notebook': nb.name, 'index': i, 'lines': len(body.strip().splitlines()), 'defs': len(defs),
                         'names': [d.name for d in defs], 'example': example})
    return rows


def test_median_exported_cell_is_short():
    lines = [r['lines'] for r in chapter_cells()]
    assert statistics.median(lines) <= 15, f'median exported cell is {statistics.median(lines)} lines (target <= 15)'


def test_one_definition_per_exported_cell():
    bad = [f"{r['notebook']} code cell {r['index']}: {r['names']}" for r in chapter_cells() if r['defs'] > 1]
    assert not bad, 'one exported function or class per cell:\n' + '\n'.join(bad)


def test_an_example_follows_every_exported_cell():
    bad = [f"{r['notebook']} code cell {r['index']} {r['names']}" for r in chapter_cells() if not r['example']]
    assert not bad, 'put an example or test right under each exported cell:\n' + '\n'.join(bad)


def test_architecture_names_every_module():
    text = (ROOT/'ARCHITECTURE.md').read_text()
    missing = [m for m in _modules() if f"`{'.'.join(['retail_cv', m] if m else ['retail_cv'])}`" not in text]
    assert not missing, f'ARCHITECTURE.md does not list {missing}: run python scripts/module-map.py'


if __name__ == '__main__':  # a per-notebook summary while you work: python tests/test_codebase.py
    from collections import defaultdict
    by = defaultdict(list)
    for r in chapter_cells(): by[r['notebook']].append(r)
    for nb, rs in by.items():
        print(f"{nb:32} cells={len(rs):3} median={statistics.median(r['lines'] for r in rs):5.1f} "
              f"max={max(r['lines'] for r in rs):4} multi={sum(r['defs'] > 1 for r in rs):3} noexample={sum(not r['example'] for r in rs):3}")
    allr = [r['lines'] for rs in by.values() for r in rs]
    print(f"ALL: cells={len(allr)} median={statistics.median(allr)}")
