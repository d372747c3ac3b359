"""Shared fixtures: the project root, the CLI as a real subprocess, a folder for artifacts tests keep, and a real PostgreSQL.

The PostgreSQL fixture runs the server binaries of the Debian package `postgresql` (scripts/system-deps.sh installs
it on CI): `initdb` into a temporary folder, `postgres` on a free localhost port with its socket in that folder,
then `CREATE DATABASE`. `initdb` and `postgres` refuse to run as root, so when the tests run as root (a container)
both run as an unprivileged user through `runuser -u USER --`: the `postgres` account the Debian package creates, or
`nobody` where it is absent, with the temporary folder owned by that user. Authentication is `trust` on 127.0.0.1,
which is safe because the server listens on loopback only and lives as long as the test module.
"""
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT/'test-artifacts'
CLI = str(Path(sys.executable).parent/'retail-cv')  # the installed console script, as users run it

@pytest.fixture(scope='session')
def root() -> Path: return ROOT

@pytest.fixture(scope='session')
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS

def run_cli(*args, env=None, timeout=300, cwd=None) -> subprocess.CompletedProcess:
    "Run `retail-cv ARGS` in a fresh interpreter, as a user would."
    full_env = {**os.environ, 'WANDB_MODE': 'offline', **(env or {})}
    return subprocess.run([CLI, *map(str, args)], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=cwd)

def wait_ready(url: str, tries: int = 300) -> None:
    "Poll a `retail-cv serve` at `url` until `/readyz` answers 200 (a server started as a subprocess)."
    import httpx
    for _ in range(tries):
        try:
            if httpx.get(url + '/readyz').status_code == 200: return
        except httpx.TransportError: time.sleep(0.1)


@pytest.fixture
def cli(tmp_path):
    "The CLI with a fresh workspace in `tmp_path`."
    def _run(*args, env=None, **kw):
        return run_cli(*args, env={'RETAIL_CV_WORKSPACE': str(tmp_path/'ws'), **(env or {})}, **kw)
    return _run


# --- a real PostgreSQL server (tune, fleet) --------------------------------------------------------------------

def _pg_binary(name: str) -> str | None:
    "A PostgreSQL server binary on PATH or in Debian's versioned folder."
    if found := shutil.which(name): return found
    cands = sorted(glob.glob(f'/usr/lib/postgresql/*/bin/{name}'))
    return cands[-1] if cands else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def postgres_url():
    "A fresh PostgreSQL server with an empty database `retailcv` (one per test module); yields its URL, then stops the server and deletes it."
    import psycopg2
    initdb, postgres = _pg_binary('initdb'), _pg_binary('postgres')
    assert initdb and postgres, "PostgreSQL server binaries not found (scripts/system-deps.sh installs Debian package 'postgresql')"
    prefix: list[str] = []
    root = os.geteuid() == 0
    base = Path(tempfile.mkdtemp(prefix='retailcv-pg-', dir='/tmp' if root else None))  # /tmp: traversable by the server's user
    if root:  # initdb/postgres refuse root: run them as an unprivileged account owning the folder
        user = next(u for u in ('postgres', 'nobody') if _has_user(u))
        pw = pwd.getpwnam(user)
        os.chown(base, pw.pw_uid, pw.pw_gid)
        prefix = ['runuser', '-u', user, '--'] if shutil.which('runuser') else ['su', '-s', '/bin/sh', user, '-c']
    data, port = base/'data', _free_port()
    log_path = base.parent/f'{base.name}.log'
    proc, log = None, open(log_path, 'wb')
    try:
        init = _as(prefix, [initdb, '-D', str(data), '-U', 'retailcv', '--auth=trust', '-E', 'UTF8', '--no-sync'])
        assert init.returncode == 0, f"initdb failed: {init.stderr.decode(errors='replace')[-2000:]}"
        proc = _as(prefix, [postgres, '-D', str(data), '-k', str(base), '-p', str(port), '-c', 'listen_addresses=127.0.0.1',
                            '-c', 'fsync=off', '-c', 'max_connections=60'], popen=True, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                conn = psycopg2.connect(host='127.0.0.1', port=port, user='retailcv', dbname='postgres', connect_timeout=2)
                break
            except psycopg2.OperationalError:
                assert proc.poll() is None, f"postgres exited: {log_path.read_text()[-2000:]}"
                assert time.monotonic() < deadline, f"postgres did not accept connections in 30 s: {log_path.read_text()[-2000:]}"
                time.sleep(0.2)
        conn.autocommit = True
        conn.cursor().execute('CREATE DATABASE retailcv')
        conn.close()
        yield f'postgresql://retailcv@127.0.0.1:{port}/retailcv'
    finally:
        _stop_postgres(data, proc)
        log.close()
        shutil.rmtree(base, ignore_errors=True)
        log_path.unlink(missing_ok=True)


def _has_user(name: str) -> bool:
    try: pwd.getpwnam(name); return True
    except KeyError: return False


def _as(prefix: list[str], cmd: list[str], popen: bool = False, **kw):
    "Run `cmd` directly, or as another user through `runuser -u USER --` (or `su -c`)."
    full = prefix + [' '.join(map(str, cmd))] if prefix[:1] == ['su'] else prefix + cmd
    if popen: return subprocess.Popen(full, **kw)
    return subprocess.run(full, capture_output=True, timeout=120, **kw)


def _stop_postgres(data: Path, proc) -> None:
    "Fast shutdown (SIGINT) of the postmaster this fixture started, by the pid it recorded; immediate (SIGQUIT) if it lingers."
    pidfile = data/'postmaster.pid'
    pid = int(pidfile.read_text().split()[0]) if pidfile.exists() else None
    def signal_postmaster(sig):
        if pid is not None:
            try: os.kill(pid, sig)
            except ProcessLookupError: pass
    signal_postmaster(signal.SIGINT)
    if proc is None: return
    try: proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        signal_postmaster(signal.SIGQUIT)
        proc.kill(); proc.wait()
