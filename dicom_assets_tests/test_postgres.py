"""Scale-out storage: the chain through a real PostgreSQL instance (a throwaway cluster on a
free loopback port), with the multiprocess executor, read back from a second instance."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dicom_assets.testing import postgres as pg

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def postgres():
    why = pg.missing()
    if why:
        pytest.skip(why)
    with pg.postgres_server() as server:
        yield server


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
