"""Scale-out storage: the chain through a real PostgreSQL instance (a throwaway cluster on a
free loopback port), with the multiprocess executor, read back from a second instance."""

import glob
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from .helpers import free_port

REPO = Path(__file__).resolve().parents[1]
INITDB = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))


def _as_postgres(cmd, **kw):
    """Run a server command as the unprivileged postgres user when we are root."""
    if os.geteuid() == 0:
        cmd = ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", *cmd]
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")
def postgres():
    if not INITDB:
        pytest.skip("PostgreSQL server not installed: `make test` installs Debian's postgresql")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("no 'postgres' system user to run the server as")
    bindir = Path(INITDB[-1]).parent
    top = Path(tempfile.mkdtemp(prefix="dicom-assets-pg-", dir="/tmp"))
    data, sock = top / "data", top / "sock"
    sock.mkdir()
    if os.geteuid() == 0:
        shutil.chown(top, "postgres", "postgres")
        shutil.chown(sock, "postgres", "postgres")
    password = "pg-" + os.urandom(6).hex()
    pwfile = top / "pw"
    pwfile.write_text(password)
    if os.geteuid() == 0:
        shutil.chown(pwfile, "postgres", "postgres")
    _as_postgres([str(bindir / "initdb"), "-D", str(data), "-U", "dagster", "--pwfile", str(pwfile),
                  "--auth=scram-sha-256", "-E", "UTF8"])
    port = free_port()
    _as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(top / "server.log"), "-w", "-o",
                  f"-p {port} -k {sock} -c listen_addresses=127.0.0.1", "start"])
    try:
        env = {**os.environ, "PGPASSWORD": password}
        subprocess.run([str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "dagster", "dagster"],
                       check=True, env=env, capture_output=True)
        yield {"host": "127.0.0.1", "port": str(port), "db": "dagster", "user": "dagster", "password": password}
    finally:
        _as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"])
        shutil.rmtree(top, ignore_errors=True)


@pytest.mark.slow
def test_two_visits_through_postgres_with_the_multiprocess_executor(postgres, demo_root, tmp_path, monkeypatch):
    from dagster import AssetKey, DagsterInstance, DagsterRunStatus

    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "deploy" / "dagster.postgres.yaml", home / "dagster.yaml")
    env = {"DAGSTER_HOME": str(home), "DAGSTER_PG_HOST": postgres["host"], "DAGSTER_PG_PORT": postgres["port"],
           "DAGSTER_PG_DB": postgres["db"], "DAGSTER_PG_USER": postgres["user"],
           "DAGSTER_PG_PASSWORD": postgres["password"], "DICOM_ASSETS_ROOT": str(demo_root),
           "DICOM_ASSETS_EXECUTOR": "multiprocess"}  # the default is in-process
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    visits = ["QPN001_ses-01", "QPN002_ses-01"]
    with DagsterInstance.get() as inst:
        assert type(inst.run_storage).__name__ == "PostgresRunStorage"
        inst.add_dynamic_partitions("visits", visits)
    dagster = str(Path(sys.executable).parent / "dagster")
    for visit in visits:
        proc = subprocess.run([dagster, "job", "execute", "-m", "dicom_assets.definitions", "-j", "visit_chain",
                               "--tags", json.dumps({"dagster/partition": visit, "dicom_assets/visit": visit})],
                              cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "multiprocess executor" in (proc.stdout + proc.stderr).lower()

    # a second instance, as another machine would open it, reads everything back
    with DagsterInstance.get() as other:
        runs = other.get_runs()
        assert sorted(r.tags["dagster/partition"] for r in runs) == visits
        assert all(r.status == DagsterRunStatus.SUCCESS for r in runs)
        assert set(other.get_dynamic_partitions("visits")) == set(visits)
        for key in ("raw_dicoms", "organized_dicoms", "visit_tarball", "visit_metadata"):
            assert other.get_materialized_partitions(AssetKey(key)) == set(visits), key
        record = other.fetch_materializations(AssetKey("visit_metadata"), limit=1).records[0]
        assert record.asset_materialization.metadata["dicoms"].value > 20
        logs = other.all_logs(runs[0].run_id)
        assert any(e.dagster_event and e.dagster_event.event_type_value == "STEP_WORKER_STARTED" for e in logs)
    for visit in visits:
        assert (demo_root / "store" / "QPN" / f"{visit}_dicom.tar").is_file()
