"""Shared fixtures: real DICOM samples (fetched from PyPI, cached), demo dataset roots,
a real Dagster instance."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import xnat  # noqa: F401 - see below
from dagster import instance_for_test

from dicom_assets.testing.demo import build_demo_dataset
from dicom_assets.testing.samples import ensure_samples

from .xnat_target import xnat_target  # noqa: F401 - the XNAT of the contract tests (a fixture)

REPO = Path(__file__).resolve().parents[1]
# xnatpy's progress bar (progressbar2) keeps the sys.stderr of the moment it is first imported:
# imported inside a test that captures output (capsys), it would write to that test's closed
# stream in every later upload. Imported here, it keeps pytest's session-wide stream.


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


@pytest.fixture(scope="session")
def archived_demo(pristine_demo, tmp_path_factory) -> Path:
    """A demo dataset root whose first visit went through the archive chain (raw dump to
    metadata), built once per test session for the tests of what comes after (XNAT); never
    modified by tests."""
    from .helpers import run_chain

    root = tmp_path_factory.mktemp("archived") / "dataset"
    shutil.copytree(pristine_demo, root, symlinks=True)
    with instance_for_test() as inst:
        assert run_chain(inst, root, ARCHIVED_VISIT).success
    return root


ARCHIVED_VISIT = "QPN001_ses-01"


@pytest.fixture
def demo_root(pristine_demo, tmp_path) -> Path:
    """A private copy of the demo dataset root for one test."""
    root = tmp_path / "dataset"
    shutil.copytree(pristine_demo, root, symlinks=True)
    return root


@pytest.fixture
def nobody_dir():
    """A folder the unprivileged user (nobody, see helpers.as_nobody) can work in (pytest's
    tmp_path is root's, mode 0700)."""
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="dicom_assets_nobody_"))
    os.chmod(d, 0o755)
    yield d
    for p in [d, *d.rglob("*")]:
        if p.is_dir() and not p.is_symlink():
            os.chmod(p, 0o755)
    shutil.rmtree(d)


@pytest.fixture
def instance():
    with instance_for_test() as inst:
        yield inst


_FAULTS: dict[str, str] = {}
_GUARDED: set[str] = set()
_UNMARKED_SLOW: dict[str, float] = {}
#: a test whose call takes longer is reported at the end unless it is marked slow (the
#: fast tier, ``make check``, is the tests without the mark; it stays fast only if new slow
#: tests are marked)
SLOW_SECONDS = 5.0


@pytest.fixture(autouse=True)
def _downloads_untouched(request):
    """In every fault case on a demo root: no file of downloads/ is modified or deleted.

    The digest is taken before the test body (after the fixtures built the root); files the
    test itself adds (a bad dump, a manifest, downloaded series) are not compared. A case that
    must change a download (a re-delivery) says so with ``@pytest.mark.changes_downloads``.
    """
    if (request.node.get_closest_marker("faults") is None or "demo_root" not in request.fixturenames
            or request.node.get_closest_marker("changes_downloads") is not None):
        yield
        return
    from dicom_assets.testing.demo import tree_digest

    downloads = request.getfixturevalue("demo_root") / "downloads"
    before = tree_digest(downloads)
    yield
    after = tree_digest(downloads)
    changed = sorted(p for p in before if after.get(p) != before[p])
    assert not changed, f"the fault case modified or deleted input files in {downloads}: {changed[:5]}"
    _GUARDED.add(request.node.nodeid)


def pytest_runtest_logreport(report):
    if report.when == "call" and report.duration > SLOW_SECONDS and "slow" not in report.keywords:
        _UNMARKED_SLOW[report.nodeid] = report.duration
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        if "faults" in report.keywords:
            _FAULTS[report.nodeid] = report.outcome
            if "checks_inputs" in report.keywords and report.outcome == "passed":
                _GUARDED.add(report.nodeid)


def pytest_terminal_summary(terminalreporter):
    """The tallies of fault-injection cases (bad input, failing services) and of the fuzz layer
    (generated inputs tried per invariant), as the team reads them."""
    _fuzz_summary(terminalreporter)
    if _UNMARKED_SLOW:
        terminalreporter.write_sep("-", f"tests over {SLOW_SECONDS:.0f} s without @pytest.mark.slow (mark them)")
        for nodeid, seconds in sorted(_UNMARKED_SLOW.items(), key=lambda kv: -kv[1]):
            terminalreporter.write_line(f"{seconds:6.1f} s  {nodeid}")
    if not _FAULTS:
        return
    outcomes: dict[str, int] = {}
    for outcome in _FAULTS.values():
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    terminalreporter.write_sep("-", "fault-injection cases")
    terminalreporter.write_line(f"{len(_FAULTS)} cases: " + ", ".join(f"{n} {o}" for o, n in sorted(outcomes.items())))
    guarded = len(_GUARDED & set(_FAULTS))
    if not guarded:
        return
    terminalreporter.write_line(f"{guarded} of them checked their inputs unchanged (sha256 of every download of "
                                "the dataset root, or of the archive under test, before and after)")


def _fuzz_summary(terminalreporter):
    from dicom_assets_tests.fuzz import TALLY

    if not TALLY:
        return
    terminalreporter.write_sep("-", "fuzz layer: generated inputs tried per invariant")
    for invariant, n in sorted(TALLY.items()):
        terminalreporter.write_line(f"{n:6d}  {invariant}")
    terminalreporter.write_line(f"{sum(TALLY.values()):6d}  in all ({os.environ.get('DICOM_ASSETS_FUZZ') or 'ci'} profile)")
