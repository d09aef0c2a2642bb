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
