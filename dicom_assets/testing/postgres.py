"""A throwaway PostgreSQL cluster on a free loopback port (a temporary folder, password auth),
as the scale-out tests, the cluster launcher and the bench use it::

    with postgres_server() as pg:   # pg.env(): the DAGSTER_PG_* variables of deploy/*.yaml
        ...

Run as the unprivileged ``postgres`` user when this process is root (initdb refuses root).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .dagster_dev import free_port


def initdb() -> Path | None:
    """Debian's newest ``initdb``, None when the server is not installed."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]) if found else None


def missing() -> str | None:
    """Why no server can be started here, None when one can."""
    if initdb() is None:
        return "PostgreSQL server not installed: `make setup` installs Debian's postgresql"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "no 'postgres' system user to run the server as"
    return None


def _as_postgres(cmd, **kw):
    """Run a server command as the unprivileged postgres user when we are root."""
    if os.geteuid() == 0:
        cmd = ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", *cmd]
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


@dataclass(frozen=True)
class Postgres:
    host: str
    port: str
    db: str
    user: str
    password: str
    top: Path

    def env(self) -> dict[str, str]:
        """The connection as the instance files read it (DAGSTER_PG_*)."""
        return {"DAGSTER_PG_HOST": self.host, "DAGSTER_PG_PORT": self.port, "DAGSTER_PG_DB": self.db,
                "DAGSTER_PG_USER": self.user, "DAGSTER_PG_PASSWORD": self.password}

    def __getitem__(self, key: str) -> str:  # the dict form test_postgres.py reads
        return getattr(self, key)


@contextmanager
def postgres_server(db: str = "dagster", max_connections: int = 200) -> Iterator[Postgres]:
    """A running server with database ``db`` (user ``dagster``), stopped and removed at exit."""
    why = missing()
    if why:
        raise RuntimeError(why)
    bindir = initdb().parent
    top = Path(tempfile.mkdtemp(prefix="dicom-assets-pg-", dir="/tmp"))
    data, sock = top / "data", top / "sock"
    sock.mkdir()
    password = "pg-" + os.urandom(6).hex()
    pwfile = top / "pw"
    pwfile.write_text(password)
    if os.geteuid() == 0:
        for p in (top, sock, pwfile):
            shutil.chown(p, "postgres", "postgres")
    started = False
    try:
        _as_postgres([str(bindir / "initdb"), "-D", str(data), "-U", "dagster", "--pwfile", str(pwfile),
                      "--auth=scram-sha-256", "-E", "UTF8"])
        port = free_port()
        _as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(top / "server.log"), "-w", "-o",
                      f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c max_connections={max_connections} "
                      "-c fsync=off", "start"])
        started = True
        env = {**os.environ, "PGPASSWORD": password}
        subprocess.run([str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "dagster", db],
                       check=True, env=env, capture_output=True)
        yield Postgres("127.0.0.1", str(port), db, "dagster", password, top)
    finally:
        if started:
            _as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"])
        shutil.rmtree(top, ignore_errors=True)
