"""``dagster dev`` (webserver + daemon) as a test fixture: start it, wait for the webserver's
``/server_info``, stop it with SIGINT to its whole process group, then SIGKILL if it hangs.

Used by the backfill scale test and the throughput benchmark, which drive a real daemon::

    with dagster_dev(workspace, cwd=repo, env={"DAGSTER_HOME": ...}, log=tmp / "dev.log") as dev:
        dev.graphql(LAUNCH_BACKFILL, {"params": ...})

or, inside an existing ``try``/``finally``, ``dev.start()`` and ``dev.stop()`` (idempotent).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator, Mapping


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


LAUNCH_BACKFILL = """
mutation($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message }
    ... on UnauthorizedError { message }
  }
}"""


class DagsterDev:
    """One ``dagster dev -w WORKSPACE`` in its own session (so a signal reaches every process it
    starts), output to ``log``; ``env`` is added to this process's environment, with this
    interpreter's bin folder first on PATH."""

    def __init__(self, workspace: Path | str, *, log: Path | str, cwd: Path | str | None = None,
                 env: Mapping[str, str] | None = None, host: str = "127.0.0.1", port: int | None = None,
                 start_timeout: float = 180.0, stop_timeout: float = 30.0):
        self.workspace = Path(workspace)
        self.log = Path(log)
        self.cwd = Path(cwd) if cwd is not None else self.workspace.parent
        self.env = dict(env or {})
        self.host = host
        self.port = port or free_port(host)
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.proc: subprocess.Popen | None = None
        self._log_fh: IO | None = None
        self._stopped = False

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        """Process id of ``dagster dev``, also the id of the session it leads."""
        assert self.proc is not None, "dagster dev not started"
        return self.proc.pid

    def graphql(self, query: str, variables: dict, timeout: float = 60) -> dict:
        """The ``data`` of a GraphQL request to the webserver (``RuntimeError`` when it reports errors)."""
        req = urllib.request.Request(f"{self.url}/graphql", method="POST",
                                     data=json.dumps({"query": query, "variables": variables}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            out = json.loads(r.read())
        if "errors" in out:
            raise RuntimeError(f"GraphQL errors: {out}")
        return out["data"]

    def _up(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/server_info", timeout=5):
                return True
        except OSError:
            return False

    def start(self) -> "DagsterDev":
        """Start and wait until the webserver answers; on failure stop it and raise
        ``RuntimeError`` with the end of the log."""
        assert self.proc is None, "dagster dev already started"
        bindir = Path(sys.executable).parent
        env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}", **self.env}
        self._log_fh = self.log.open("w")
        self.proc = subprocess.Popen([str(bindir / "dagster"), "dev", "-w", str(self.workspace),
                                      "-h", self.host, "-p", str(self.port)],
                                     cwd=self.cwd, env=env, stdout=self._log_fh, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        end = time.monotonic() + self.start_timeout
        try:
            while not self._up():
                if self.proc.poll() is not None or time.monotonic() > end:
                    why = (f"exited with {self.proc.returncode}" if self.proc.poll() is not None
                           else f"did not answer within {self.start_timeout:.0f}s")
                    raise RuntimeError(f"dagster dev {why}; see {self.log}\n{self.log.read_text()[-3000:]}")
                time.sleep(1)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """SIGINT to the process group, SIGKILL after ``stop_timeout`` seconds; a no-op when
        not started or already stopped."""
        if self.proc is not None and not self._stopped:
            self._stopped = True
            try:
                os.killpg(self.proc.pid, signal.SIGINT)
                try:
                    self.proc.wait(self.stop_timeout)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait()
            except ProcessLookupError:  # the whole group is already gone
                pass
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None

    def __enter__(self) -> "DagsterDev":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextmanager
def dagster_dev(workspace: Path | str, **kwargs) -> Iterator[DagsterDev]:
    """A running ``dagster dev`` for the ``with`` block (arguments of :class:`DagsterDev`)."""
    with DagsterDev(workspace, **kwargs) as dev:
        yield dev
