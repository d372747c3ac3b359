"""Kubernetes manifests: valid against the official API schema (offline, kubernetes-validate), broken ones caught, bad
parameters rejected, secrets only by reference, and the rendered containers really run: the job's command executes the
job, the service's Deployment serves a signed bundle with its probes, keys, revocation list and prediction log."""
import copy
import json
import os
import re
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from retail_cv.core import ConfigError
from retail_cv.k8s import IMAGE_UID, default_image, render_ddp_job, render_job, render_serve, validate_manifest

from conftest import CLI, run_cli

IMAGE = 'registry.example.com/retail-cv:0.1'


@pytest.fixture
def job(tmp_path, monkeypatch):
    "A tiny real job notebook in a jobs folder of its own (found by name through $RETAIL_CV_JOBS)."
    folder = tmp_path/'jobs'; folder.mkdir()
    nb = {'nbformat': 4, 'nbformat_minor': 5, 'metadata': {'kernelspec': {'name': 'python3', 'display_name': 'python3', 'language': 'python'}},
          'cells': [{'cell_type': 'code', 'id': 'p', 'metadata': {'tags': ['parameters']}, 'outputs': [], 'execution_count': None,
                     'source': "a = 1  # a number\nnote = 'x'  # a string\nworkspace = ''"},
                    {'cell_type': 'code', 'id': 'b', 'metadata': {}, 'outputs': [], 'execution_count': None,
                     'source': 'import os\nfrom retail_cv.jobs import job_outputs\njob_outputs({"double": 2 * a, "note": note, "wandb": os.environ["WANDB_MODE"]})'}]}
    (folder/'add.ipynb').write_text(json.dumps(nb))
    db = copy.deepcopy(nb)  # a job with secret parameters: a URL with a password, and a password nested in a dict
    db['cells'][0]['source'] = "storage = ''  # database URL\nconfig = {}\nworkspace = ''"
    db['cells'][1]['source'] = ('from urllib.parse import urlparse\nfrom retail_cv.jobs import job_outputs\n'
                                'job_outputs({"host": urlparse(storage).hostname, "user": config["db"]["user"], "pw_len": len(config["db"]["password"])})')
    (folder/'db.ipynb').write_text(json.dumps(db))
    monkeypatch.setenv('RETAIL_CV_JOBS', str(folder))
    return folder


def test_rendered_job_validates_against_the_kubernetes_schema():
    m = render_job('train', {'data': 'grocery@latest', 'epochs': '30', 'config': {'lr': 0.01}}, image=IMAGE, cpu=8, memory='32Gi', gpus=2,
                   namespace='vision', secret_env={'WANDB_API_KEY': 'wandb/api-key'}, scheduler='runai-scheduler', queue='team-vision',
                   deadline_seconds=3600, run='train-20260101-000000-abcdef')
    for version in ('1.25', '1.30'):
        assert validate_manifest(m, version, strict=True) == version
    assert (m['apiVersion'], m['kind'], m['metadata']['namespace']) == ('batch/v1', 'Job', 'vision')
    spec = m['spec']
    assert (spec['backoffLimit'], spec['ttlSecondsAfterFinished'], spec['activeDeadlineSeconds']) == (1, 7 * 86400, 3600)
    pod = spec['template']
    assert pod['metadata']['labels'] == m['metadata']['labels'] == {
        'app': 'retail-cv', 'retail-cv/job': 'train', 'retail-cv/run': 'train-20260101-000000-abcdef', 'runai/queue': 'team-vision'}
    assert pod['spec']['schedulerName'] == 'runai-scheduler' and pod['spec']['restartPolicy'] == 'Never'
    c = pod['spec']['containers'][0]
    assert c['command'] == ['retail-cv', 'run', 'train', '--log-output', '-p', 'data=grocery@latest', '-p', 'epochs=30', '-p', 'config={"lr": 0.01}']
    assert c['resources']['requests'] == c['resources']['limits'] == {'cpu': '8', 'memory': '32Gi', 'nvidia.com/gpu': '2'}
    env = {e['name']: e for e in c['env']}
    assert env['RETAIL_CV_WORKSPACE']['value'] == '/workspace' and env['WANDB_MODE']['value'] == 'offline'
    assert env['WANDB_API_KEY'] == {'name': 'WANDB_API_KEY', 'valueFrom': {'secretKeyRef': {'name': 'wandb', 'key': 'api-key'}}}
    assert {'name': 'workspace', 'mountPath': '/workspace'} in c['volumeMounts']
    assert {'name': 'workspace', 'persistentVolumeClaim': {'claimName': 'retail-cv-workspace'}} in pod['spec']['volumes']
    # Indexed tuning workers and fractional GPUs validate too
    tune = render_job('tune', {'trials': 5}, image=IMAGE, workers=3)
    assert validate_manifest(tune) and tune['spec']['completionMode'] == 'Indexed' and tune['spec']['completions'] == 3
    half = render_job('train', {}, image=IMAGE, scheduler='runai-scheduler', gpu_fraction=0.25)
    assert validate_manifest(half) and half['spec']['template']['metadata']['annotations'] == {'gpu-fraction': '0.25'}


def test_broken_manifests_fail_validation():
    m = render_job('train', {}, image=IMAGE, run='r1')
    bad = copy.deepcopy(m); bad['spec']['template']['spec']['containers'][0]['resources'] = '2 cpus'
    with pytest.raises(ConfigError, match=r"Job/retail-cv-r1 does not match the Kubernetes 1\.30 schema at spec\.template\.spec\.containers\.0\.resources: '2 cpus' is not of type 'object'"):
        validate_manifest(bad)
    typo = copy.deepcopy(m); typo['spec']['template']['spec']['containers'][0]['resource'] = {}
    with pytest.raises(ConfigError, match=r"Additional properties are not allowed \('resource' was unexpected\)"):
        validate_manifest(typo, strict=True)
    validate_manifest(typo, strict=False)  # the lax schema lets it through: strictness is what catches it
    wrong = copy.deepcopy(m); wrong['spec']['backoffLimit'] = 'one'
    with pytest.raises(ConfigError, match=r"at spec\.backoffLimit: 'one' is not of type 'integer'"):
        validate_manifest(wrong)
    with pytest.raises(ConfigError, match="Couldn't find schema for kind Job with api version batch/v2"):
        validate_manifest({**m, 'apiVersion': 'batch/v2'})


def test_bad_parameters_and_settings_are_rejected():
    with pytest.raises(ConfigError, match=r"unknown parameter 'epoch'; allowed: .*epochs"):
        render_job('train', {'epoch': 3}, image=IMAGE)
    with pytest.raises(ConfigError, match="parameter 'epochs' must be int"):
        render_job('train', {'epochs': 'ten'}, image=IMAGE)
    with pytest.raises(ConfigError, match="no job named 'trian'"):
        render_job('trian', {}, image=IMAGE)
    for bad, msg in [({'memory': '8 GB'}, "'8 GB' is not a valid Kubernetes quantity"), ({'namespace': 'Vision'}, 'not a valid namespace'),
                     ({'gpus': -1}, "'gpus'"), ({'gpu_fraction': 0.5}, 'needs a scheduler'), ({'cpus': 2}, "unknown config key 'cpus'"),
                     ({'env': {'1BAD': 'x'}}, 'not a valid environment variable name'), ({'image': ''}, "'image'")]:
        with pytest.raises(ConfigError, match=msg):
            render_job('train', {}, **{'image': IMAGE, **bad})
    with pytest.raises(ConfigError, match="workers=2 does not apply"):
        render_ddp_job('train', {}, image=IMAGE, nodes=2, workers=2)


def test_ddp_job_and_its_service_validate():
    svc, job = render_ddp_job('train', {'epochs': 10, 'config': {'lr': 0.1}}, image=IMAGE, gpus=4, nodes=3, run='ddp-1')
    for obj in (svc, job): validate_manifest(obj)
    assert svc['kind'] == 'Service' and svc['spec']['clusterIP'] == 'None' and svc['spec']['selector'] == {'retail-cv/run': 'ddp-1'}
    assert (job['spec']['completions'], job['spec']['parallelism'], job['spec']['completionMode']) == (3, 3, 'Indexed')
    pod = job['spec']['template']['spec']
    assert pod['subdomain'] == svc['metadata']['name']
    c = pod['containers'][0]
    assert c['command'][:3] == ['torchrun', '--nnodes=3', '--nproc-per-node=4'] and c['command'][7:11] == ['retail-cv', 'run', 'train', '--log-output']
    assert 'config={"lr": 0.1, "strategy": "ddp", "devices": 4, "num_nodes": 3, "accelerator": "gpu"}' in c['command']
    assert 'resume=true' in c['command']
    env = {e['name']: e for e in c['env']}
    assert env['MASTER_ADDR']['value'] == f"{job['metadata']['name']}-0.{svc['metadata']['name']}"
    assert env['NODE_RANK']['valueFrom']['fieldRef']['fieldPath'] == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert env['RETAIL_CV_RUN_ID']['value'] == 'ddp-1'


def test_cli_render_and_the_rendered_command_runs_the_job(job, tmp_path):
    "The CLI writes valid YAML; the container's command, run here as the pod would run it, executes the job on the workspace."
    out = tmp_path/'job.yaml'
    r = run_cli('k8s', 'render', 'add', '-p', 'a=21', '-p', 'note=$(HOME)', '--image', IMAGE, '--cpu', '500m', '--out', out,
                env={'RETAIL_CV_JOBS': str(job)})
    assert r.returncode == 0, r.stderr
    assert r.stdout == '' and 'wrote 1 manifest' in r.stderr
    (m,) = list(yaml.safe_load_all(out.read_text()))
    validate_manifest(m)
    c = m['spec']['template']['spec']['containers'][0]
    assert c['command'] == ['retail-cv', 'run', 'add', '--log-output', '-p', 'a=21', '-p', 'note=$$(HOME)']
    # what the kubelet does: expand $(VAR) from the container's env ($$ is a literal $), then run the command
    ws = tmp_path/'ws'
    env = {**os.environ, **{e['name']: e['value'] for e in c['env'] if 'value' in e}, 'RETAIL_CV_WORKSPACE': str(ws), 'RETAIL_CV_JOBS': str(job)}
    cmd = [CLI] + [a.replace('$$', '$') for a in c['command'][1:]]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    (record,) = [json.loads(p.read_text()) for p in (ws/'runs').glob('*/record.json')]
    assert record['status'] == 'completed' and record['parameters'] == {'a': 21, 'note': '$(HOME)', 'workspace': str(ws)}  # the mounted volume
    assert record['outputs'] == {'double': 42, 'note': '$(HOME)', 'wandb': 'offline'}


def test_cli_errors_are_one_line(job):
    for args, msg in [(['add', '-p', 'a=abc', '--image', IMAGE], "parameter 'a' must be int"),
                      (['add', '-p', 'b=1', '--image', IMAGE], "unknown parameter 'b'; allowed: a, note, workspace"),
                      (['add', '--image', IMAGE, '--memory', 'lots'], "'lots' is not a valid Kubernetes quantity"),
                      (['add', '--image', IMAGE, '--env', 'NOEQUALS'], "--env 'NOEQUALS' must be KEY=VALUE")]:
        r = run_cli('k8s', 'render', *args, env={'RETAIL_CV_JOBS': str(job), 'RETAIL_CV_IMAGE': '', 'COLUMNS': '400'})  # wide: one logical line
        assert r.returncode == 1 and r.stdout == '', (args, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith('error:') and msg in lines[0], (args, r.stderr)
    # the image from the environment, else the project's jobs image of this version (its CUDA build for GPUs)
    for args, image_env, want in [(['--workers', '2'], IMAGE, IMAGE), ([], '', default_image('jobs')), (['--gpus', '1'], '', default_image('jobs-cuda'))]:
        r = run_cli('k8s', 'render', 'add', *args, env={'RETAIL_CV_JOBS': str(job), 'RETAIL_CV_IMAGE': image_env})
        assert r.returncode == 0 and yaml.safe_load(r.stdout)['spec']['template']['spec']['containers'][0]['image'] == want, r.stderr
    assert default_image('jobs').startswith('ghcr.io/retail-cv/retail_cv:') and default_image('jobs').endswith('-jobs')


def test_secret_parameters_come_from_a_secret_never_the_manifest(job, tmp_path):
    "Secret parameters become variables read from a Secret (secretKeyRef); the manifest holds no password; the runner reads them."
    out = tmp_path/'db.yaml'
    secret_args = ['-p', 'storage=postgresql://app:hunter2@db:5432/x', '-p', 'config={db: {user: app, password: nested-pw}}']
    r = run_cli('k8s', 'render', 'db', *secret_args, '--image', IMAGE, '--secret', 'app-db', '--out', out, env={'RETAIL_CV_JOBS': str(job)})
    assert r.returncode == 0, r.stderr
    text = out.read_text()
    assert 'hunter2' not in text and 'nested-pw' not in text and 'hunter2' not in r.stderr
    (m,) = list(yaml.safe_load_all(text))
    assert validate_manifest(m, strict=True) == '1.30'
    c = m['spec']['template']['spec']['containers'][0]
    assert c['command'] == ['retail-cv', 'run', 'db', '--log-output']
    refs = {e['name']: e['valueFrom']['secretKeyRef'] for e in c['env'] if 'valueFrom' in e}
    assert refs == {'RETAIL_CV_PARAM_storage': {'name': 'app-db', 'key': 'storage'}, 'RETAIL_CV_PARAM_config': {'name': 'app-db', 'key': 'config'}}
    assert 'kubectl create secret generic app-db --from-literal=config=... --from-literal=storage=...' in r.stderr
    # the pod: the kubelet fills the variables from the Secret; the runner reads them and masks them in what it writes
    ws = tmp_path/'ws'
    secret_data = {'storage': 'postgresql://app:hunter2@db:5432/x', 'config': '{"db": {"user": "app", "password": "nested-pw"}}'}
    env = {**os.environ, **{e['name']: e['value'] for e in c['env'] if 'value' in e}, 'RETAIL_CV_WORKSPACE': str(ws), 'RETAIL_CV_JOBS': str(job),
           **{name: secret_data[ref['key']] for name, ref in refs.items()}}
    done = subprocess.run([CLI, *c['command'][1:]], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    (record,) = [json.loads(p.read_text()) for p in (ws/'runs').glob('*/record.json')]
    assert record['status'] == 'completed' and record['outputs'] == {'host': 'db', 'user': 'app', 'pw_len': 9}
    assert record['parameters']['storage'] == 'postgresql://app:***@db:5432/x' and record['parameters']['config'] == {'db': {'user': 'app', 'password': '***'}}
    assert not [p for p in ws.rglob('*') if p.is_file() and (b'hunter2' in p.read_bytes() or b'nested-pw' in p.read_bytes())]
    # no Secret named: refused, nothing written; a literal secret in --env: refused
    for args, msg in [(secret_args, 'parameter storage, config holds a secret, which a manifest must not'),
                      (['--env', 'DB_PASSWORD=hunter2'], 'env DB_PASSWORD: a secret would be written into the manifest in clear')]:
        r = run_cli('k8s', 'render', 'db', *args, '--image', IMAGE, env={'RETAIL_CV_JOBS': str(job), 'COLUMNS': '400'})
        assert r.returncode == 1 and r.stdout == '' and msg in r.stderr, r.stderr
    with pytest.raises(ConfigError, match='parameter storage holds a secret'):
        render_job('db', {'storage': 'postgresql://app:hunter2@db:5432/x'}, image=IMAGE)


def test_job_pods_run_as_the_images_user_and_own_the_workspace():
    pod = render_job('train', {}, image=IMAGE)['spec']['template']['spec']
    assert pod['securityContext'] == {'runAsNonRoot': True, 'runAsUser': IMAGE_UID, 'runAsGroup': IMAGE_UID, 'fsGroup': IMAGE_UID,
                                      'fsGroupChangePolicy': 'OnRootMismatch'}
    assert pod['containers'][0]['securityContext'] == {'allowPrivilegeEscalation': False}


# ---- the service ----------------------------------------------------------------------------------------------------

def test_serve_manifests_validate_against_the_kubernetes_schema():
    docs = render_serve('shelf-classifier@production', namespace='vision', cpu='4', memory='3Gi', min_replicas=2, max_replicas=12,
                        cpu_utilization=60, revocations='serve-tokens/revoked.txt', log_pvc='predictions', profile='store-server-x86',
                        batch_wait_ms=2, batch_images=16, secret_env={'RETAIL_CV_TOKEN': 'registry-token/token'},
                        node_selector={'pool': 'cpu'}, service_type='LoadBalancer')
    for d in docs:
        for version in ('1.25', '1.30'): assert validate_manifest(d, version, strict=True) == version
    deployment, service, hpa = docs
    assert [(d['apiVersion'], d['kind']) for d in docs] == [('apps/v1', 'Deployment'), ('v1', 'Service'), ('autoscaling/v2', 'HorizontalPodAutoscaler')]
    assert {d['metadata']['namespace'] for d in docs} == {'vision'} and {d['metadata']['name'] for d in docs} == {'retail-cv-serve'}
    spec, pod = deployment['spec'], deployment['spec']['template']['spec']
    assert 'replicas' not in spec and spec['strategy']['rollingUpdate'] == {'maxSurge': 1, 'maxUnavailable': 0}  # the autoscaler's count
    assert hpa['spec']['scaleTargetRef'] == {'apiVersion': 'apps/v1', 'kind': 'Deployment', 'name': 'retail-cv-serve'}
    assert (hpa['spec']['minReplicas'], hpa['spec']['maxReplicas']) == (2, 12)
    assert hpa['spec']['metrics'] == [{'type': 'Resource', 'resource': {'name': 'cpu', 'target': {'type': 'Utilization', 'averageUtilization': 60}}}]
    labels = deployment['spec']['template']['metadata']['labels']
    assert service['spec']['selector'] == spec['selector']['matchLabels'] == labels and service['spec']['type'] == 'LoadBalancer'
    (c,) = pod['containers']
    assert service['spec']['ports'][0]['targetPort'] in [p['name'] for p in c['ports']]
    assert c['image'] == default_image('serve') and c['resources']['requests'] == c['resources']['limits'] == {'cpu': '4', 'memory': '3Gi'}
    assert c['readinessProbe']['httpGet'] == {'path': '/readyz', 'port': 'http'} and c['livenessProbe']['httpGet'] == {'path': '/healthz', 'port': 'http'}
    assert c['startupProbe']['httpGet']['path'] == '/healthz'
    assert pod['securityContext']['runAsNonRoot'] is True and pod['securityContext']['runAsUser'] == IMAGE_UID
    assert c['securityContext'] == {'allowPrivilegeEscalation': False, 'readOnlyRootFilesystem': True, 'capabilities': {'drop': ['ALL']}}
    assert pod['automountServiceAccountToken'] is False and pod['nodeSelector'] == {'pool': 'cpu'}
    assert c['command'] == ['retail-cv', 'serve', 'shelf-classifier@production', '--host', '0.0.0.0', '--port', '8080',
                            '--trusted-keys', '/etc/retail-cv/bundle-keys', '--token-keys', '/etc/retail-cv/token-keys',
                            '--revocations', '/etc/retail-cv/revocations/revoked.txt', '--log-dir', '/var/lib/retail-cv/predictions',
                            '--profile', 'store-server-x86', '--batch-wait-ms', '2.0', '--batch-images', '16']
    volumes = {v['name']: v for v in pod['volumes']}
    assert {m['name'] for m in c['volumeMounts']} == set(volumes)  # every mount has its volume, every volume is mounted
    assert volumes['workspace'] == {'name': 'workspace', 'persistentVolumeClaim': {'claimName': 'retail-cv-workspace'}}  # the registry, writable
    assert [m for m in c['volumeMounts'] if m['name'] == 'predictions'][0]['subPathExpr'] == '$(POD_NAME)'
    assert {'name': 'POD_NAME', 'valueFrom': {'fieldRef': {'fieldPath': 'metadata.name'}}} in c['env']
    # a fixed count: replicas in the Deployment, no autoscaler; a bundle path: the workspace read-only at /models
    fixed = render_serve('bundles/shelf-3', min_replicas=3, max_replicas=3)
    assert [d['kind'] for d in fixed] == ['Deployment', 'Service'] and fixed[0]['spec']['replicas'] == 3
    pod = fixed[0]['spec']['template']['spec']
    assert {'name': 'models', 'persistentVolumeClaim': {'claimName': 'retail-cv-workspace', 'readOnly': True}} in pod['volumes']
    assert {'name': 'workspace', 'emptyDir': {}} in pod['volumes'] and pod['containers'][0]['command'][2] == '/models/bundles/shelf-3'


def test_serve_settings_and_targets_are_checked():
    for target, msg in [('/srv/bundles/x', 'give it relative to the workspace volume'), ('bundles/../../etc', 'give it relative'),
                        ('https://u:hunter2@models.example.com/b.tar', 'the model to serve holds a secret'),
                        ('Shelf Classifier@production', "model name 'Shelf Classifier' must be")]:
        with pytest.raises(ConfigError, match=msg): render_serve(target)
    for bad, msg in [({'min_replicas': 4, 'max_replicas': 2}, 'min_replicas 4 is above max_replicas 2'), ({'name': 'Shelf'}, 'not a valid Service name'),
                     ({'revocations': 'revoked.txt'}, "not 'configmap/key'"), ({'cpu_utilization': 0}, "'cpu_utilization'"),
                     ({'port': 80}, "'port'"), ({'token_keys': 'Keys!'}, 'not a valid Kubernetes object name'), ({'replicas': 2}, "unknown config key 'replicas'")]:
        with pytest.raises(ConfigError, match=msg): render_serve('shelf@production', **bad)


def test_serve_secrets_come_from_secrets_never_the_manifest(tmp_path):
    out = tmp_path/'serve.yaml'
    r = run_cli('k8s', 'serve', 'shelf@production', '--secret-env', 'RETAIL_CV_TOKEN=registry-token/token', '--out', out, env={'COLUMNS': '400'})
    assert r.returncode == 0 and r.stdout == '', r.stderr
    deployment = next(yaml.safe_load_all(out.read_text()))
    env = {e['name']: e for e in deployment['spec']['template']['spec']['containers'][0]['env']}
    assert env['RETAIL_CV_TOKEN'] == {'name': 'RETAIL_CV_TOKEN', 'valueFrom': {'secretKeyRef': {'name': 'registry-token', 'key': 'token'}}}
    assert 'kubectl create secret generic registry-token --from-literal=token=...' in r.stderr
    assert 'kubectl create configmap retail-cv-token-keys --from-file=...' in r.stderr
    for args, msg in [(['--env', 'RETAIL_CV_TOKEN=rcv1.hunter2.sig'], 'env RETAIL_CV_TOKEN: a secret would be written into the manifest in clear'),
                      (['--env', 'REGISTRY_URL=postgresql://app:hunter2@db/registry'], 'env REGISTRY_URL: a secret would be written'),
                      (['--secret-env', 'RETAIL_CV_TOKEN=hunter2'], "RETAIL_CV_TOKEN: 'hunter2' is not 'secret-name/key'")]:
        r = run_cli('k8s', 'serve', 'shelf@production', *args, env={'COLUMNS': '400'})
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and r.stdout == '' and len(lines) == 1 and msg in lines[0], r.stderr
        assert 'hunter2' not in r.stdout


@pytest.fixture(scope='module')
def serving(tmp_path_factory):
    "A workspace volume with a signed bundle, the key ConfigMaps and a revocation list, as folders on this machine."
    import torch
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from PIL import Image

    from retail_cv.bundle import build_bundle, generate_signing_key
    from retail_cv.core import Workspace
    from retail_cv.models import tiny_classifier, to_onnx
    root = tmp_path_factory.mktemp('k8s-serve')
    signing = generate_signing_key(Workspace.open(root/'build'))
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root/'g.jpg')
    torch.manual_seed(0); clf = tiny_classifier(3, image_size=32)
    folders = {name: root/name for name in ('pvc', 'bundle-keys', 'token-keys', 'revocations', 'scratch', 'tmp', 'log')}
    for d in folders.values(): d.mkdir()
    build_bundle(folders['pvc']/'bundles'/'shelf-1', to_onnx(clf, root/'m.onnx'), name='shelf', version='1', labels=['a', 'b', 'c'],
                 contract=clf.contract(), golden_images=[root/'g.jpg'], workspace=Workspace.open(root/'build'), profile='shelf-cam-x86')
    (folders['bundle-keys']/'signing.pub').write_bytes(Path(signing.public_key).read_bytes())
    issuer = Ed25519PrivateKey.generate()
    (folders['token-keys']/'issuer.pub').write_bytes(issuer.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return {'folders': folders, 'issuer': issuer, 'photo': (root/'g.jpg').read_bytes()}


def _kubelet(deployment: dict, volumes: dict[str, Path], pod_name: str) -> tuple[list[str], dict[str, str]]:
    "What the kubelet makes of the pod template here: each volume a folder (subPathExpr expanded), paths in the command and env resolved to them."
    pod = deployment['spec']['template']['spec']
    (c,) = pod['containers']
    env = {}
    for e in c['env']:
        if 'value' in e: env[e['name']] = e['value']
        else: assert e['valueFrom']['fieldRef']['fieldPath'] == 'metadata.name'; env[e['name']] = pod_name
    declared = {v['name'] for v in pod['volumes']}
    mounts = {}
    for m in c['volumeMounts']:
        assert m['name'] in declared, m
        here = volumes[m['name']]
        if 'subPathExpr' in m: (here := here/re.sub(r'\$\((\w+)\)', lambda g: env[g[1]], m['subPathExpr'])).mkdir(exist_ok=True)
        mounts[m['mountPath']] = here

    def resolve(value: str) -> str:
        for inside, here in sorted(mounts.items(), key=lambda kv: -len(kv[0])):
            if value == inside or value.startswith(inside + '/'): return str(here) + value[len(inside):]
        return value
    return [resolve(a.replace('$$', '$')) for a in c['command']], {k: resolve(v) for k, v in env.items()}


def test_the_rendered_serve_pod_serves_the_bundle(serving):
    "The Deployment's container, run as the kubelet would: ready by its readiness probe, tokens checked, a revoked one refused, the log in the pod's folder."
    from retail_cv.credentials import TokenVerifier
    from retail_cv.serve import free_port, issue_token
    folders, port = serving['folders'], free_port()
    good, revoked = (issue_token(serving['issuer'], s, ['predict']) for s in ('store-1', 'store-2'))
    (folders['revocations']/'revoked.txt').write_text(TokenVerifier([serving['issuer'].public_key()]).verify(revoked).jti + '\n')
    (deployment, _), pod_name = render_serve('bundles/shelf-1', port=port, min_replicas=1, max_replicas=1, revocations='serve-tokens/revoked.txt',
                                             log_pvc='predictions'), 'retail-cv-serve-7d9f-x2'
    volumes = {'models': folders['pvc'], 'workspace': folders['scratch'], 'tmp': folders['tmp'], 'bundle-keys': folders['bundle-keys'],
               'token-keys': folders['token-keys'], 'revocations': folders['revocations'], 'predictions': folders['log']}
    argv, env = _kubelet(deployment, volumes, pod_name)
    c = deployment['spec']['template']['spec']['containers'][0]
    argv = [CLI] + [('127.0.0.1' if a == '0.0.0.0' else a) for a in argv[1:]]  # the pod's own network: loopback here
    proc = subprocess.Popen(argv, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = lambda probe: f"http://127.0.0.1:{port}{c[probe]['httpGet']['path']}"
    try:
        deadline = time.monotonic() + 180  # start-up on a busy machine, not a performance bound
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url('readinessProbe')).status_code == 200: break
            except httpx.TransportError: pass
            assert time.monotonic() < deadline, 'the pod never became ready'
            time.sleep(0.5)
        assert httpx.get(url('livenessProbe')).status_code == 200 and httpx.get(url('startupProbe')).status_code == 200
        predict = f'http://127.0.0.1:{port}/v1/predict'
        r = httpx.post(predict, content=serving['photo'], headers={'Content-Type': 'image/jpeg', 'Authorization': f'Bearer {good}', 'X-Store-Id': 'store-1'})
        assert r.status_code == 200 and r.json()['model'] == {'name': 'shelf', 'version': '1'}, r.text
        r = httpx.post(predict, content=serving['photo'], headers={'Content-Type': 'image/jpeg', 'Authorization': f'Bearer {revoked}'})
        assert r.status_code == 401 and 'revoked' in r.text, r.text
        assert 'retail_cv_requests_total' in httpx.get(f"http://127.0.0.1:{port}{deployment['spec']['template']['metadata']['annotations']['prometheus.io/path']}").text
    finally:
        proc.terminate(); proc.wait(timeout=30)
    (record,) = [json.loads(l) for l in (folders['log']/pod_name/'predictions.jsonl').read_text().splitlines()]
    assert record['store_id'] == 'store-1' and record['model'] == {'name': 'shelf', 'version': '1'}
    assert not list(folders['pvc'].rglob('predictions.jsonl'))  # nothing written beside the bundles
