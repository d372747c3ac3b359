"""Rewrite the module list at the end of ARCHITECTURE.md from the package: every module, its chapter and summary.

    python scripts/module-map.py        # after adding, renaming or removing a module
`tests/test_codebase.py` fails when a module is missing from the list."""
import json, re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARK = '<!-- module list: python scripts/module-map.py -->'


def summary(nb: Path) -> str:
    "The `> description` line under a chapter's title."
    for cell in json.loads(nb.read_text())['cells'][:3]:
        if m := re.search(r'^> (.*)$', ''.join(cell['source']), re.M): return m.group(1)
    return ''


def rows():
    for f in sorted((ROOT/'retail_cv').rglob('*.py')):
        if f.name == '_modidx.py': continue
        parts = f.relative_to(ROOT/'retail_cv').with_suffix('').parts
        mod = '.'.join(('retail_cv',) + (parts[:-1] if parts[-1] == '__init__' else parts))
        m = re.search(r'File to edit: \S*?([^/\s]+\.ipynb)', f.read_text())
        nb = ROOT/'nbs'/m.group(1) if m else None
        yield f"| `{mod}` | {f'`{nb.name}`' if nb else 'hand-written (version)'} | {summary(nb) if nb and nb.exists() else ''} |"


if __name__ == '__main__':
    arch = ROOT/'ARCHITECTURE.md'
    head = arch.read_text().split(MARK)[0]
    arch.write_text(head + MARK + '\n\n| module | chapter | what it holds |\n|---|---|---|\n' + '\n'.join(rows()) + '\n')
