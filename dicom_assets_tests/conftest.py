"""Shared fixtures: real DICOM samples (fetched from PyPI, cached), demo dataset roots,
a real Dagster instance."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from dagster import instance_for_test

from dicom_assets.core.demo import build_demo_dataset
from dicom_assets.core.samples import ensure_samples

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def samples():
    """The real scanner DICOMs; the fetch fails loudly (never skips) when PyPI is unreachable."""
    cache = os.environ.get("DICOM_ASSETS_CACHE", str(REPO / ".cache"))
    return ensure_samples(cache)


@pytest.fixture(scope="session")
def pristine_demo(samples, tmp_path_factory) -> Path:
    """A demo dataset root built once per test session; never modified by tests."""
    root = tmp_path_factory.mktemp("pristine") / "dataset"
    build_demo_dataset(root, samples)
    return root


@pytest.fixture
def demo_root(pristine_demo, tmp_path) -> Path:
    """A private copy of the demo dataset root for one test."""
    root = tmp_path / "dataset"
    shutil.copytree(pristine_demo, root, symlinks=True)
    return root


@pytest.fixture
def instance():
    with instance_for_test() as inst:
        yield inst


_FAULTS: dict[str, str] = {}


def pytest_runtest_logreport(report):
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        if "faults" in report.keywords:
            _FAULTS[report.nodeid] = report.outcome


def pytest_terminal_summary(terminalreporter):
    """The tally of fault-injection cases (bad input, failing services), as the team reads it."""
    if not _FAULTS:
        return
    outcomes: dict[str, int] = {}
    for outcome in _FAULTS.values():
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    terminalreporter.write_sep("-", "fault-injection cases")
    terminalreporter.write_line(f"{len(_FAULTS)} cases: " + ", ".join(f"{n} {o}" for o, n in sorted(outcomes.items())))
