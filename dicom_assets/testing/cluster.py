"""The cluster profile on one machine, as it runs on several: Redis (broker and result backend),
a throwaway PostgreSQL (the instance) and N Celery workers, each worker a separate process
group with its own working directory and HOME and an environment of its own (no variable of
this process leaks into it), reaching Redis and PostgreSQL over loopback and the dataset root
as a shared path. Used by dicom_assets_tests/test_celery.py, bench/celery.py and
``make demo-cluster``::

    with Cluster(workdir, root, workers=[WorkerSpec("w1", ("dagster", "cpu", "xnat"))]) as c:
        c.env()             # what the daemon's host needs: DAGSTER_PG_*, DICOM_ASSETS_EXECUTOR, broker
        c.redis.restart()   # a broker restart, its queues kept (append-only file)
        c.kill_worker("w1") # SIGKILL to the worker's whole process group, as a machine lost
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from . import postgres as pg
from .dagster_dev import free_port


def missing() -> str | None:
    """Why the cluster cannot be started here (a program not installed), None when it can."""
    if shutil.which("redis-server") is None:
        return "redis-server not installed: `make setup` installs Debian's redis-server (scripts/system-deps.sh)"
    return pg.missing()


def _wait_port(port: int, timeout: float, what: str, log: Path | None = None) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    tail = log.read_text()[-2000:] if log is not None and log.is_file() else ""
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f}s\n{tail}")


#: the instance's pools (the XNAT asset's)
POOLS = ("xnat_upload",)


def prime_pools(instance=None) -> None:
    """Create each pool's row at its default limit before any run claims it: on a fresh
    PostgreSQL instance, Dagster 1.13 races when several runs make the row at once (an
    IntegrityError, then "current transaction is aborted": the run fails and is retried). The
    instance of ``$DAGSTER_HOME`` when none is given."""
    from dagster import DagsterInstance

    if instance is None:
        with DagsterInstance.get() as inst:
            return prime_pools(inst)
    for pool in POOLS:
        instance.event_log_storage.initialize_concurrency_limit_to_default(pool)


class RedisServer:
    """``redis-server`` on a free loopback port, its own folder, a password, and an append-only
    file fsynced on every write: a restart keeps the queued and unacknowledged tasks."""

    def __init__(self, workdir: Path, port: int | None = None):
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.password = "redis-" + os.urandom(6).hex()
        self.log = self.dir / "redis.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        conf = self.dir / "redis.conf"
        # the password in a file of the test's own folder (mode 0600), not on a command line
        conf.write_text(f"port {self.port}\nbind 127.0.0.1\ndir {self.dir}\nrequirepass {self.password}\n"
                        "appendonly yes\nappendfsync always\nsave \"\"\ndaemonize no\nprotected-mode yes\n"
                        f"logfile {self.log}\n")
        conf.chmod(0o600)
        self.proc = subprocess.Popen(["redis-server", str(conf)], cwd=self.dir, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        _wait_port(self.port, 30, "redis-server", self.log)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """SIGTERM (Redis writes its file and exits) or SIGKILL (a crash)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self, down_seconds: float = 0.0, sig: int = signal.SIGTERM) -> None:
        self.stop(sig)
        time.sleep(down_seconds)
        self.start()


@dataclass(frozen=True)
class WorkerSpec:
    """A Celery worker: its name, the queues it takes, its concurrency (pool processes), and
    environment variables of its own (``DICOM_ASSETS_ROOT`` for a worker that mounts the root
    elsewhere)."""

    name: str
    queues: tuple[str, ...] = ("dagster", "cpu", "xnat")
    concurrency: int = 1
    env: Mapping[str, str] = field(default_factory=dict)
    #: the Celery app module (``-A``); a test's fault-injecting wrapper of it, for one
    app: str = "dicom_assets.celery_app"


class CeleryWorker:
    """``celery -A dicom_assets.celery_app worker`` in a session of its own, in its own folder,
    with HOME there, and only the environment given (as on another machine)."""

    def __init__(self, spec: WorkerSpec, workdir: Path, env: Mapping[str, str]):
        self.spec = spec
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.env = dict(env)
        self.log = self.dir / "worker.log"
        self.proc: subprocess.Popen | None = None
        self._fh = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def hostname(self) -> str:
        """The worker's Celery name (``<name>@<host>``), as its engine events name it."""
        return f"{self.spec.name}@{socket.gethostname()}"

    def start(self, timeout: float = 120) -> "CeleryWorker":
        return self.launch().wait_ready(timeout)

    def launch(self) -> "CeleryWorker":
        """Start the process without waiting for it (see :meth:`wait_ready`)."""
        bindir = Path(sys.executable).parent
        env = {"PATH": f"{bindir}{os.pathsep}/usr/local/bin:/usr/bin:/bin", "HOME": str(self.dir),
               "LANG": "C.UTF-8", "TMPDIR": str(self.dir / "tmp"), **self.env, **self.spec.env}
        (self.dir / "tmp").mkdir(exist_ok=True)
        self._fh = self.log.open("ab")
        self.proc = subprocess.Popen(
            [str(bindir / "celery"), "-A", self.spec.app, "worker", "-Q", ",".join(self.spec.queues),
             "-c", str(self.spec.concurrency), "-n", self.hostname, "--without-gossip", "--without-mingle",
             "-l", "INFO"],
            cwd=self.dir, env=env, stdout=self._fh, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def wait_ready(self, timeout: float = 120) -> "CeleryWorker":
        """Until the worker says it is ready (it consumes its queues); RuntimeError with its log's
        end when it exits or does not get there in ``timeout`` seconds."""
        assert self.proc is not None, "launch() first"
        end = time.monotonic() + timeout
        while b" ready." not in self.log.read_bytes():
            if self.proc.poll() is not None or time.monotonic() > end:
                why = f"exited with {self.proc.returncode}" if self.proc.poll() is not None else "is not ready"
                tail = self.log.read_text(errors="replace")[-3000:]
                self.stop()
                raise RuntimeError(f"Celery worker {self.spec.name} {why}; see {self.log}\n{tail}")
            time.sleep(0.2)
        return self

    def group_pids(self) -> list[int]:
        """Every live process of the worker's process group (the worker and its pool)."""
        out = []
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    if os.getpgid(int(d.name)) == self.pid:
                        out.append(int(d.name))
                except OSError:
                    pass
        return out

    def kill(self) -> None:
        """SIGKILL to the whole process group: the machine is gone, no handler runs."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        self._close()

    def stop(self, timeout: float = 30) -> None:
        """A warm shutdown (SIGTERM: the running step finishes), SIGKILL after ``timeout``."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.pid, signal.SIGTERM)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
            except ProcessLookupError:
                pass
        self._close()

    def _close(self):
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class Cluster:
    """Redis, PostgreSQL and the workers of ``workers``; ``env()`` is the environment of the
    daemon's host (merge it into the webserver's and daemon's)."""

    def __init__(self, workdir: Path | str, root: Path | str, *, workers: list[WorkerSpec],
                 extra_env: Mapping[str, str] | None = None, visibility_timeout: float | None = None):
        self.dir = Path(workdir)
        self.root = Path(root)
        self.specs = list(workers)
        self.extra_env = dict(extra_env or {})
        self.visibility_timeout = visibility_timeout
        self.redis = RedisServer(self.dir / "redis")
        self.postgres: pg.Postgres | None = None
        self.workers: dict[str, CeleryWorker] = {}
        self._stack = ExitStack()

    def env(self) -> dict[str, str]:
        assert self.postgres is not None, "cluster not started"
        env = {**self.postgres.env(), "DICOM_ASSETS_EXECUTOR": "celery", "DICOM_ASSETS_CELERY_BROKER": self.redis.url,
               "DICOM_ASSETS_ROOT": str(self.root), **self.extra_env}
        if self.visibility_timeout is not None:
            env["DICOM_ASSETS_CELERY_VISIBILITY_TIMEOUT"] = str(self.visibility_timeout)
        return env

    def start(self, wait: bool = True) -> "Cluster":
        """Redis, PostgreSQL, then the workers, all started at once; ``wait``: until every
        worker is ready (else call :meth:`wait_workers`)."""
        try:
            self.redis.start()
            self._stack.callback(self.redis.stop)
            self.postgres = self._stack.enter_context(pg.postgres_server())
            for spec in self.specs:
                self.start_worker(spec, wait=False)
            if wait:
                self.wait_workers()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_workers(self) -> None:
        for worker in self.workers.values():
            worker.wait_ready()

    def start_worker(self, spec: WorkerSpec, wait: bool = True) -> CeleryWorker:
        """Start (or start again) a worker in its own folder under the cluster's; ``wait``: until
        it is ready."""
        worker = CeleryWorker(spec, self.dir / "workers" / spec.name, self.env())
        self.workers[spec.name] = worker
        self._stack.callback(worker.stop)
        worker.launch()
        return worker.wait_ready() if wait else worker

    def kill_worker(self, name: str) -> None:
        self.workers[name].kill()

    def stop(self) -> None:
        self._stack.close()

    def __enter__(self) -> "Cluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
