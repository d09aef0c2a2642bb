"""The invariant of issue 25, tested as such: every public entry point that reads user or
network input (global config, manifest, dir map, TCIA manifest, dcm2bids config, XNAT
exclusions, zip and tar.gz extraction), fed generated hostile input, ends in a result or a
named error, never changes its input, and stays within a memory limit. The inputs run in a
child process under ``resource.setrlimit(RLIMIT_AS)`` (dicom_assets_tests/entry_points.py);
the count is tallied with the fuzz layer's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .fuzz import tried

REPO = Path(__file__).resolve().parents[1]
COUNT = 2000 if os.environ.get("DICOM_ASSETS_FUZZ") == "long" else 240
LIMIT_MIB = 1536


@pytest.mark.fuzz
@pytest.mark.parametrize("seed", [1, 2])
def test_every_entry_point_ends_in_a_result_or_a_named_error(tmp_path, seed):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "dicom_assets_tests.entry_points", str(tmp_path), str(seed),
                           str(COUNT), str(LIMIT_MIB)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for entry, n in out["tried"].items():
        tried(f"entry point {entry}: a result or a named error, input unchanged, memory bounded", n)
    assert not out["failures"], json.dumps(out["failures"][:5], indent=1)
