"Kubernetes manifests: valid against the official API schema (offline, kubernetes-validate), broken ones caught, bad parameters rejected, and the rendered container command really runs the job."
import copy
import json
import os
import subprocess

import pytest
import yaml

from retail_cv.core import ConfigError
from retail_cv.k8s import render_ddp_job, render_job, validate_manifest

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
                      (['add', '--image', IMAGE, '--env', 'NOEQUALS'], "--env 'NOEQUALS' must be KEY=VALUE"),
                      (['add'], 'no container image: pass --image or set $RETAIL_CV_IMAGE')]:
        r = run_cli('k8s', 'render', *args, env={'RETAIL_CV_JOBS': str(job), 'RETAIL_CV_IMAGE': '', 'COLUMNS': '400'})  # wide: one logical line
        assert r.returncode == 1 and r.stdout == '', (args, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith('error:') and msg in lines[0], (args, r.stderr)
    # and the image from the environment
    r = run_cli('k8s', 'render', 'add', '--workers', '2', env={'RETAIL_CV_JOBS': str(job), 'RETAIL_CV_IMAGE': IMAGE})
    assert r.returncode == 0 and yaml.safe_load(r.stdout)['spec']['template']['spec']['containers'][0]['image'] == IMAGE


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
