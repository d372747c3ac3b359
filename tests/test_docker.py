"""The container images without a container engine: the Dockerfile read with a real parser (stages, users,
entrypoints, what each target installs, no secrets), the build context .dockerignore lets through, the workflow that
builds and publishes both targets, and the serve image's command and health check run as the container runs them."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from dockerfile_parse import DockerfileParser

from retail_cv.jobs import redact
from retail_cv.k8s import IMAGE_FLAVORS, IMAGE_REPOSITORY, IMAGE_UID, SERVE_PATHS, K8sServeConfig

from conftest import CLI

tomllib = pytest.importorskip('tomllib' if sys.version_info >= (3, 11) else 'tomli')  # pyproject.toml's reader

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ('serve', 'jobs')
TORCH = re.compile(r'\b(torch|torchvision|lightning|torchmetrics)\b')


# ---- reading the Dockerfile ---------------------------------------------------------------------------------------

def _dockerfile() -> DockerfileParser:
    return DockerfileParser(str(ROOT/'Dockerfile'))


def _stages() -> dict[str, dict]:
    "Stage name -> its base and its instructions (instruction, value, line ENV/ARG/LABEL), in order."
    parser, stages, current = _dockerfile(), {}, None
    bases = iter(parser.parent_images)  # FROM values with the global ARGs' defaults substituted
    for ins, ctx in zip(parser.structure, parser.context_structure):
        if ins['instruction'] == 'FROM':
            m = re.fullmatch(r'(\S+)\s+AS\s+(\S+)', ins['value'].strip(), flags=re.I)
            assert m, f"line {ins['startline'] + 1}: every stage is named ({ins['value']!r})"
            current = stages[m[2]] = {'base': next(bases), 'raw_base': m[1], 'ins': []}
        elif current is not None and ins['instruction'] != 'COMMENT':
            current['ins'].append({'instruction': ins['instruction'], 'value': ins['value'], 'envs': ctx.line_envs,
                                   'args': ctx.line_args, 'labels': ctx.line_labels, 'line': ins['startline'] + 1})
    return stages


def _global_args() -> dict[str, str]:
    "The ARGs before the first FROM, with their defaults."
    out = {}
    for ins in _dockerfile().structure:
        if ins['instruction'] == 'FROM': break
        if ins['instruction'] == 'ARG':
            k, _, v = ins['value'].partition('='); out[k.strip()] = v.strip()
    return out


def _last(stage: dict, instruction: str) -> str | None:
    found = [i['value'] for i in stage['ins'] if i['instruction'] == instruction]
    return found[-1] if found else None


def _chain(stages: dict, name: str) -> list[str]:
    "A target and every stage it is built from: its FROM parents, and the stages it copies or mounts from."
    seen, todo = [], [name]
    while todo:
        s = todo.pop()
        if s in seen or s not in stages: continue
        seen.append(s)
        todo.append(stages[s]['raw_base'])
        for i in stages[s]['ins']: todo += [a or b for a, b in re.findall(r'--from=([\w.-]+)|\bfrom=([\w.-]+)', i['value'])]
    return seen


def _pip_installs(stages: dict, names: list[str]) -> list[str]:
    "Every `pip install ...` command in these stages' RUN lines."
    runs = [i['value'] for s in names for i in stages[s]['ins'] if i['instruction'] == 'RUN']
    return [part.strip() for r in runs for part in re.split(r'&&|;', r) if re.search(r'\bpip install\b', part)]


def _exec_form(value: str) -> list[str]:
    "A JSON-array (exec form) instruction value; anything else fails the test."
    return json.loads(value)


# ---- the Dockerfile -----------------------------------------------------------------------------------------------

def test_two_targets_built_from_one_wheel():
    stages = _stages()
    assert set(TARGETS) <= set(stages) and 'builder' in stages, list(stages)
    assert [i for i in stages['builder']['ins'] if i['instruction'] == 'RUN' and 'pip wheel' in i['value'] and '--no-deps' in i['value']]
    for target, extra in (('serve', '[serve]'), ('jobs', '[jobs]')):
        chain = _chain(stages, target)
        assert 'builder' in chain, f"{target} does not install the builder's wheel: {chain}"
        (install,) = [p for p in _pip_installs(stages, chain) if 'retail_cv-' in p]
        assert f'.whl){extra}"' in install, install
        # the wheel comes in through a bind mount, so no layer keeps it
        assert not [i for s in chain for i in stages[s]['ins'] if i['instruction'] in ('COPY', 'ADD') and '/dist' in i['value']]


def test_each_target_runs_as_the_fixed_non_root_user():
    stages = _stages()
    for target in TARGETS:
        user = _last(stages[target], 'USER')
        assert user == f'{IMAGE_UID}:{IMAGE_UID}', f'{target}: USER {user!r}, want the fixed uid the pods run as'
        created = ' '.join(i['value'] for s in _chain(stages, target) for i in stages[s]['ins'] if i['instruction'] == 'RUN')
        assert f'useradd --system --uid {IMAGE_UID} --gid {IMAGE_UID}' in created and f'groupadd --system --gid {IMAGE_UID}' in created


def test_entrypoints_ports_and_the_serve_health_check():
    stages = _stages()
    for target in TARGETS: assert _exec_form(_last(stages[target], 'ENTRYPOINT')) == ['retail-cv']
    serve, jobs = stages['serve'], stages['jobs']
    cmd = _exec_form(_last(serve, 'CMD'))
    port = K8sServeConfig().port
    assert cmd[0] == 'serve' and cmd[cmd.index('--port') + 1] == str(port) and cmd[cmd.index('--host') + 1] == '0.0.0.0'
    # the same mounts as the Deployment `retail-cv k8s serve` renders
    assert (cmd[cmd.index('--trusted-keys') + 1], cmd[cmd.index('--token-keys') + 1]) == (SERVE_PATHS['bundle_keys'], SERVE_PATHS['token_keys'])
    assert cmd[1].startswith(SERVE_PATHS['models'] + '/')
    assert _last(serve, 'EXPOSE') == str(port)
    check = _last(serve, 'HEALTHCHECK')
    assert check and check != 'NONE' and '--start-period=' in check, check
    probe = _exec_form(check.split('CMD', 1)[1].strip())
    assert probe[0] == 'python' and f'http://127.0.0.1:{port}/healthz' in probe[-1], probe  # slim images have no curl
    assert _last(jobs, 'HEALTHCHECK') == 'NONE' and _exec_form(_last(jobs, 'CMD')) == ['jobs', 'list']
    envs = {k: v for i in jobs['ins'] for k, v in i['envs'].items()}
    assert envs['RETAIL_CV_JOBS'] in [i['value'].split()[-1] for i in jobs['ins'] if i['instruction'] == 'COPY' and 'nbs/jobs' in i['value']]


def test_the_serve_image_has_no_torch():
    stages = _stages()
    chain = [s for s in _chain(stages, 'serve') if s != 'builder']  # the builder makes the wheel with --no-deps
    installs = _pip_installs(stages, chain)
    assert installs and not [p for p in installs if TORCH.search(p) or '[jobs]' in p or '[train]' in p or '[all]' in p], installs
    assert not [i for s in chain for i in stages[s]['ins'] if i['instruction'] == 'ARG' and 'TORCH' in i['value']]
    guard = [i['value'] for s in chain for i in stages[s]['ins'] if i['instruction'] == 'RUN' and "find_spec('torch')" in i['value']]
    assert guard, 'the serve build checks that torch did not come in'
    # what `retail-cv[serve]` installs, read from pyproject.toml: the base install and the serve extra, none of them torch
    project = tomllib.loads((ROOT/'pyproject.toml').read_text())['project']
    extras, todo, reqs = project.get('optional-dependencies', {}), ['serve'], list(project['dependencies'])
    while todo:
        for r in extras.get(todo.pop(), []):
            if m := re.fullmatch(r'retail-cv\[([\w,]+)\]', r): todo += m[1].split(',')
            else: reqs.append(r)
    assert not [r for r in reqs if TORCH.match(r)], reqs


def test_base_images_are_pinned_and_the_cuda_base_has_python_added():
    stages, args = _stages(), _global_args()
    assert args['BASE_IMAGE'] == args['PYTHON_IMAGE'], 'CPU by default: the jobs base is the same Python image'
    for name, stage in stages.items():
        if stage['base'] in stages: continue
        image, _, tag = stage['base'].rpartition(':')
        assert image and re.search(r'\d', tag) and tag != 'latest', f'stage {name}: base {stage["base"]!r} is not pinned by a version tag'
    install = ' '.join(i['value'] for i in stages['jobs-base']['ins'] if i['instruction'] == 'RUN')
    assert 'command -v python3' in install and 'python3-venv' in install  # nvidia/cuda images come without Python
    cuda = [a for a in re.findall(r'BASE_IMAGE=(\S+)', (ROOT/'.github/workflows/docker.yml').read_text())]
    assert cuda and all(re.fullmatch(r'nvidia/cuda:[\d.]+-[\w-]*runtime-ubuntu[\d.]+', c) for c in cuda), cuda


def test_no_secret_in_any_layer():
    stages = _stages()
    for name, stage in stages.items():
        for i in stage['ins']:
            for k, v in {**i['envs'], **i['args'], **i['labels']}.items():
                assert redact(v, k) == v, f"stage {name} line {i['line']}: {i['instruction']} {k} looks like a secret"
            if i['instruction'] in ('COPY', 'ADD'):
                assert not re.search(r'\.(pem|key)\b|\.env\b|keys/|\.git\b', i['value']), f"stage {name} line {i['line']}: {i['value']}"
                assert not re.search(r'https?://', i['value']), 'ADD from a URL fetches unchecked bytes'
    for k, v in _global_args().items(): assert redact(v, k) == v, k


# ---- the build context --------------------------------------------------------------------------------------------

def _pattern(rule: str) -> re.Pattern:
    "A .dockerignore pattern as a regex: `*` and `?` within a path segment, `**` across them, `[...]` a class."
    out, i = '', 0
    while i < len(rule):
        if rule.startswith('**/', i): out, i = out + '(?:.*/)?', i + 3
        elif rule.startswith('**', i): out, i = out + '.*', i + 2
        elif rule[i] == '*': out, i = out + '[^/]*', i + 1
        elif rule[i] == '?': out, i = out + '[^/]', i + 1
        elif rule[i] == '[': j = rule.index(']', i); out, i = out + rule[i:j + 1], j + 1
        else: out, i = out + re.escape(rule[i]), i + 1
    return re.compile(out)


def _ignored(path: str, rules: list[str]) -> bool:
    "Whether Docker leaves `path` out of the build context: the last rule matching it or a folder above it wins; `!` lets in."
    parts, out = path.split('/'), False
    for rule in rules:
        pattern = _pattern(rule.lstrip('!'))
        if any(pattern.fullmatch('/'.join(parts[:n])) for n in range(1, len(parts) + 1)): out = not rule.startswith('!')
    return out


def test_the_build_context_is_what_the_dockerfile_copies():
    rules = [l.strip() for l in (ROOT/'.dockerignore').read_text().splitlines() if l.strip() and not l.startswith('#')]
    assert rules[0] == '*', 'an allowlist: everything out, then what is needed'
    sources = [src for s in _stages().values() for i in s['ins'] if i['instruction'] == 'COPY' and '--from=' not in i['value']
               for src in shlex.split(i['value'])[:-1]]
    assert sources
    for src in sources:
        files = [p for p in (ROOT/src).rglob('*') if p.is_file() and '__pycache__' not in p.parts] if (ROOT/src).is_dir() else [ROOT/src]
        assert files, src
        left_out = [str(p.relative_to(ROOT)) for p in files if _ignored(str(p.relative_to(ROOT)), rules)]
        assert not left_out, f'COPY {src}: .dockerignore keeps out {left_out[:5]}'
    for secret in ['.git/config', '.venv/bin/python', '.env', 'retail_cv_workspace/keys/signing.pem', 'retail_cv/assets/issuer.key',
                   'retail_cv/assets/x.pem', 'nbs/jobs/.env', 'tests/test_k8s.py', 'retail_cv/__pycache__/core.cpython-311.pyc',
                   'bench/results/x.json', 'nbs/00_core.ipynb']:
        assert _ignored(secret, rules), f'.dockerignore lets {secret} into the build context'


# ---- the workflow -------------------------------------------------------------------------------------------------

def _workflow() -> dict:
    wf = yaml.safe_load((ROOT/'.github/workflows/docker.yml').read_text())
    wf['on'] = wf.get('on', wf.pop(True, None))  # YAML 1.1 reads the key `on` as true
    return wf


def test_the_workflow_builds_both_targets_and_pushes_only_from_main_and_tags():
    wf = _workflow()
    assert wf['on']['push'] == {'branches': ['main'], 'tags': ['v*']} and 'pull_request' in wf['on']
    (job,) = wf['jobs'].values()
    matrix = job['strategy']['matrix']['include']
    assert {m['target'] for m in matrix} == set(TARGETS) and [m['flavor'] for m in matrix] == list(IMAGE_FLAVORS)
    steps = job['steps']
    builds = [s for s in steps if str(s.get('uses', '')).startswith('docker/build-push-action@')]
    assert builds and all(s['with']['target'] == '${{ matrix.target }}' and s['with']['context'] == '.' for s in builds)
    pushing = [s for s in builds if s['with'].get('push') is True]
    assert pushing and all(s.get('if') == "github.event_name == 'push'" for s in pushing)  # push: main and v* tags only
    assert [s for s in builds if s['with'].get('load') is True and s['with'].get('push') is False]
    login = [s for s in steps if str(s.get('uses', '')).startswith('docker/login-action@')]
    assert login and login[0]['if'] == "github.event_name == 'push'" and login[0]['with']['password'] == '${{ secrets.GITHUB_TOKEN }}'
    assert any(str(s.get('uses', '')).startswith('docker/setup-buildx-action@') for s in steps)
    smoke = next(s for s in steps if s.get('name') == 'Smoke test')
    assert 'docker run --rm "$IMG" version' in smoke['run'] and smoke['env']['IMG'] == 'retail-cv:${{ matrix.flavor }}'


def test_the_default_image_of_the_manifests_is_what_the_workflow_publishes():
    wf = _workflow()
    assert wf['env']['IMAGE'] == IMAGE_REPOSITORY
    meta = next(s for s in next(iter(wf['jobs'].values()))['steps'] if str(s.get('uses', '')).startswith('docker/metadata-action@'))
    assert meta['with']['images'] == '${{ env.IMAGE }}' and 'suffix=-${{ matrix.flavor }}' in meta['with']['flavor']
    assert 'type=semver,pattern={{version}}' in meta['with']['tags']  # v0.1.0 -> 0.1.0-<flavor>: retail_cv.__version__
    url = tomllib.loads((ROOT/'pyproject.toml').read_text())['project']['urls']['Repository']
    assert IMAGE_REPOSITORY == 'ghcr.io/' + url.removeprefix('https://github.com/').lower()
    stages = _stages()
    for target in TARGETS:
        labels = {k: v for i in stages[target]['ins'] for k, v in i['labels'].items()}
        assert labels['org.opencontainers.image.source'] == url  # what links the ghcr.io package to the repository


# ---- the serve image's command, as the container runs it ----------------------------------------------------------

@pytest.fixture(scope='module')
def served(tmp_path_factory):
    "A signed bundle and the key folders the serve image expects, on this machine's disk."
    import torch
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from PIL import Image

    from retail_cv.bundle import build_bundle, generate_signing_key
    from retail_cv.core import Workspace
    from retail_cv.models import tiny_classifier, to_onnx
    root = tmp_path_factory.mktemp('image')
    ws = Workspace.open(root/'build-ws')
    signing = generate_signing_key(ws)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root/'g.jpg')
    torch.manual_seed(0); clf = tiny_classifier(3, image_size=32)
    fs = {'/models': root/'models', '/etc/retail-cv': root/'etc', '/workspace': root/'workspace'}
    for d in fs.values(): d.mkdir()
    build_bundle(fs['/models']/'bundle', to_onnx(clf, root/'m.onnx'), name='shelf', version='1', labels=['a', 'b', 'c'],
                 contract=clf.contract(), golden_images=[root/'g.jpg'], workspace=ws, profile='shelf-cam-x86')
    for d in ('bundle-keys', 'token-keys'): (fs['/etc/retail-cv']/d).mkdir()
    (fs['/etc/retail-cv']/'bundle-keys'/'signing.pub').write_bytes(Path(signing.public_key).read_bytes())
    issuer = Ed25519PrivateKey.generate()
    (fs['/etc/retail-cv']/'token-keys'/'issuer.pub').write_bytes(issuer.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return {'fs': fs, 'issuer': issuer, 'photo': (root/'g.jpg').read_bytes()}


def _in_container(value: str, fs: dict[str, Path], port: int) -> str:
    "A path or argument of the image as it resolves here: the mounts are these folders, the port a free one."
    for inside, here in sorted(fs.items(), key=lambda kv: -len(kv[0])):
        if value == inside or value.startswith(inside + '/'): return str(here) + value[len(inside):]
    return str(port) if value == '8080' else value


def test_the_serve_image_command_serves_and_its_health_check_tells(served):
    "ENTRYPOINT + CMD with the image's ENV (mounts mapped to folders here) serve the bundle; HEALTHCHECK passes, then fails once it stops."
    from retail_cv.serve import free_port, issue_token
    stages, fs, port = _stages(), served['fs'], free_port()
    serve = stages['serve']
    image_env = {k: v for i in serve['ins'] for k, v in i['envs'].items() if k != 'PATH'}
    env = {**os.environ, **{k: _in_container(v, fs, port) for k, v in image_env.items()}}
    cmd = [CLI] + [_in_container(a, fs, port).replace('0.0.0.0', '127.0.0.1') for a in _exec_form(_last(serve, 'CMD'))]
    check = [sys.executable if a == 'python' else a.replace(':8080/', f':{port}/') for a in _exec_form(_last(serve, 'HEALTHCHECK').split('CMD', 1)[1])]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180  # start-up, not a performance bound: imports and the golden set on a busy machine
        while subprocess.run(check, capture_output=True).returncode != 0:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, 'the service did not come up'
            time.sleep(0.5)
        token = issue_token(served['issuer'], 'store-1', ['predict'])
        r = httpx.post(f'http://127.0.0.1:{port}/v1/predict', content=served['photo'],
                       headers={'Content-Type': 'image/jpeg', 'Authorization': f'Bearer {token}'})
        assert r.status_code == 200 and r.json()['model'] == {'name': 'shelf', 'version': '1'}, r.text
        assert httpx.post(f'http://127.0.0.1:{port}/v1/predict', content=served['photo'], headers={'Content-Type': 'image/jpeg'}).status_code == 401
    finally:
        proc.terminate(); proc.wait(timeout=30)
    failed = subprocess.run(check, capture_output=True, text=True)
    assert failed.returncode != 0 and 'Connection refused' in failed.stderr
