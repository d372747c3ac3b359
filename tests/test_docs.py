"The docs site: built offline from the notebooks, complete, link-clean, and rendered by a real browser."
import functools
import http.server
import importlib
import pkgutil
import re
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

import retail_cv
from retail_cv.docs import check_links, render_readme
from conftest import run_cli

CHROMIUM = shutil.which('chromium') or shutil.which('chromium-browser')
CHROME_FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-quic',
                '--disable-component-update', '--disable-sync', '--no-first-run']


@pytest.fixture(scope='module')
def site(tmp_path_factory, root):
    out = tmp_path_factory.mktemp('site')
    r = run_cli('docs', 'build', '--project', root, '--out', out, '--no-readme', timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return out


@pytest.fixture(scope='module')
def server(site):
    "The built site on a real HTTP server on loopback."
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f'http://127.0.0.1:{httpd.server_address[1]}'
    httpd.shutdown()


def chromium(tmp_path, *args) -> str:
    assert CHROMIUM, "Debian package 'chromium' is not installed (scripts/system-deps.sh installs it)"
    r = subprocess.run([CHROMIUM, *CHROME_FLAGS, f'--user-data-dir={tmp_path}/chrome', *args],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def public_names():
    for mod in pkgutil.walk_packages(retail_cv.__path__, 'retail_cv.'):
        if mod.name.rsplit('.', 1)[-1].startswith('_'): continue
        m = importlib.import_module(mod.name)
        for name in getattr(m, '__all__', []): yield mod.name, name


def test_one_page_per_chapter_and_landing(site, root):
    chapters = sorted(p for p in (root/'nbs').glob('[0-9]*.ipynb'))
    assert chapters and (site/'index.html').exists()
    for nb in chapters:
        assert (site/(re.sub(r'^\d+[a-z]?_', '', nb.stem) + '.html')).exists(), f"no page for {nb.name}"


def test_api_reference_covers_every_public_name(site):
    html = (site/'api.html').read_text()
    missing = [f'{m}.{n}' for m, n in public_names() if f'id="{m}.{n}"' not in html]
    assert not missing, f"API reference lacks: {missing}"
    assert 'Example:' in html and 'atomic_write' in html


def test_search_index_built(site):
    index = (site/'search'/'search_index.json').read_text()
    assert 'atomic_write' in index and 'Workspace' in index


def test_no_broken_internal_links(site):
    broken = check_links(site)
    assert not broken, '\n'.join(f'{b.page}: {b.target} ({b.reason})' for b in broken)


def test_readme_in_step_with_index_notebook(root):
    assert (root/'README.md').read_text() == render_readme(root/'nbs'), \
        "README.md differs from nbs/index.ipynb: run `retail-cv docs build` and commit README.md"


def test_browser_renders_titles_and_screenshot(site, server, tmp_path, artifacts):
    dom = chromium(tmp_path, '--virtual-time-budget=3000', '--dump-dom', f'{server}/index.html')
    assert re.search(r'<h1[^>]*>\s*retail_cv', dom), dom[:2000]
    assert '<title>retail_cv</title>' in dom
    dom = chromium(tmp_path, '--virtual-time-budget=3000', '--dump-dom', f'{server}/api.html')
    assert re.search(r'<h1[^>]*>\s*API reference', dom) and 'id="retail_cv.core.atomic_write"' in dom
    shot = artifacts/'docs-landing.png'
    shot.unlink(missing_ok=True)
    chromium(tmp_path, '--window-size=1280,900', '--hide-scrollbars', f'--screenshot={shot}', f'{server}/index.html')
    from PIL import Image
    with Image.open(shot) as im:
        assert im.size == (1280, 900)
        assert len(set(im.convert('L').resize((64, 48)).tobytes())) > 20   # a rendered page, not a blank canvas
