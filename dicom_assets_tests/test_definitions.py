"""The Dagster project loads, as `dagster dev` would load it."""

import subprocess
import sys
from pathlib import Path

import pytest
from dagster import Definitions

from dicom_assets.definitions import build_definitions

REPO = Path(__file__).resolve().parents[1]


def test_definitions_load(demo_root):
    defs = build_definitions(str(demo_root))
    Definitions.validate_loadable(defs)
    repo = defs.get_repository_def()
    keys = {k.to_user_string() for k in repo.asset_graph.get_all_asset_keys()}
    assert {"raw_dicoms", "organized_dicoms", "visit_tarball", "visit_metadata"} <= keys
    assert repo.get_job("visit_chain").partitions_def.name == "visits"
    assert "downloads_sensor" in {s.name for s in repo.sensor_defs}


@pytest.mark.slow
def test_workspace_validates_with_the_dagster_cli(demo_root, tmp_path):
    env = {"DICOM_ASSETS_ROOT": str(demo_root), "DAGSTER_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    (tmp_path / "dagster.yaml").write_text((REPO / "dagster.yaml").read_text())
    proc = subprocess.run([str(Path(sys.executable).parent / "dagster"), "definitions", "validate", "-w",
                           str(REPO / "workspace.yaml")], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Validation successful" in proc.stderr + proc.stdout
