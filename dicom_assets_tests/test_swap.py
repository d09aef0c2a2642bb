"""Every folder the chain replaces (extraction, organize, BIDS session, DataLad dataset) goes
through ``fsutil.swap_dir``; a process killed at any step of a swap leaves the old folder or the
new one, never a mixture and never nothing, and the next run converges.

The crashes are real: a child process dies with ``os._exit`` right after a step of the swap
(``dicom_assets_tests/crash.py``), on Linux's ``RENAME_EXCHANGE`` path and on the two-rename
fallback."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dicom_assets.core import fsutil
from dicom_assets.core.dataset import Dataset
from dicom_assets.core.ids import parse_visit_key

from .crash import CRASHED, POINTS, STEPS
from .helpers import run_chain

REPO = Path(__file__).resolve().parents[1]
VISIT = "QPN001_ses-01"

# what a reader finds after a crash at each point (after recover_dir for the fallback's window)
OUTCOME = {"before": "old", "after_exchange": "new", "after_remove": "new", "after_aside": "old", "after_in": "new"}


def tree(path: Path) -> dict | None:
    """Every entry under ``path``: a link's target, a file's sha256, a folder; None: no such path."""
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        return None
    out: dict[str, tuple] = {}
    for dirpath, dirs, names in os.walk(path):
        for n in dirs + names:
            p = Path(dirpath, n)
            rel = p.relative_to(path).as_posix()
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir",)
            else:
                out[rel] = ("file", hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def strays(target: Path) -> list[str]:
    return sorted(n for n in os.listdir(target.parent) if n.startswith(f".{target.name}."))


def crash(step: str, args: list[str], mode: str, point: str | None) -> int:
    spec = json.dumps({"step": step, "args": [str(a) for a in args], "mode": mode, "point": point})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "dicom_assets_tests.crash", spec], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode in (0, CRASHED), proc.stderr[-3000:]
    return proc.returncode


CASES = [(mode, point) for mode in POINTS for point in POINTS[mode]]


def _write(folder: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RENAME_EXCHANGE is Linux's")
def test_exchange_is_available_here(tmp_path):
    """The Linux path is the one under test: renameat2(RENAME_EXCHANGE) works on this disk."""
    a, b = tmp_path / "a", tmp_path / "b"
    _write(a, {"x": b"a"})
    _write(b, {"y": b"b"})
    assert fsutil._exchange(a, b)
    assert (a / "y").read_bytes() == b"b" and (b / "x").read_bytes() == b"a"


@pytest.mark.parametrize("mode,point", CASES, ids=[f"{m}-{p}" for m, p in CASES])
def test_swap_cut_at_any_step_leaves_old_or_new_and_converges(tmp_path, mode, point):
    target = tmp_path / "visit"
    old, new = {"a.dcm": b"old a", "sub/b.dcm": b"old b"}, {"a.dcm": b"new a", "c.dcm": b"new c"}
    _write(target, old)
    os.symlink("a.dcm", target / "link")
    staged = fsutil.temp_sibling(target)
    _write(staged, new)
    assert crash("swap", [staged, target], mode, point) == CRASHED
    seen = tree(target)
    old_tree = {"a.dcm": ("file", hashlib.sha256(b"old a").hexdigest()), "sub": ("dir",),
                "sub/b.dcm": ("file", hashlib.sha256(b"old b").hexdigest()), "link": ("link", "a.dcm")}
    new_tree = {"a.dcm": ("file", hashlib.sha256(b"new a").hexdigest()),
                "c.dcm": ("file", hashlib.sha256(b"new c").hexdigest())}
    if seen is None:
        # only in the fallback's window: the old folder waits beside the missing target
        assert (mode, point) == ("fallback", "after_aside"), f"{point}: the target is gone"
    else:
        assert seen in (old_tree, new_tree), f"{mode}/{point}: a mixture of old and new: {sorted(seen)}"
    fsutil.recover_dir(target)
    assert tree(target) == (old_tree if OUTCOME[point] == "old" else new_tree)
    assert strays(target) == [], "recover_dir leaves no stray"
    # the next swap of the same target converges
    again = fsutil.temp_sibling(target)
    _write(again, {"d.dcm": b"d"})
    fsutil.swap_dir(again, target)
    assert tree(target) == {"d.dcm": ("file", hashlib.sha256(b"d").hexdigest())}
    assert strays(target) == []


def test_swap_into_a_missing_target_and_over_a_link(tmp_path):
    target = tmp_path / "t"
    staged = fsutil.temp_sibling(target)
    _write(staged, {"x": b"1"})
    fsutil.swap_dir(staged, target)
    assert tree(target) == {"x": ("file", hashlib.sha256(b"1").hexdigest())}
    elsewhere = tmp_path / "elsewhere"
    _write(elsewhere, {"kept": b"k"})
    target.rename(tmp_path / "t2")
    os.symlink(elsewhere, target)  # a target that is a link: the link is replaced, never what it points to
    staged = fsutil.temp_sibling(target)
    _write(staged, {"y": b"2"})
    fsutil.swap_dir(staged, target)
    assert not target.is_symlink() and tree(target) == {"y": ("file", hashlib.sha256(b"2").hexdigest())}
    assert (elsewhere / "kept").read_bytes() == b"k"


# --------------------------------------------------------------------------- each step
@pytest.fixture(scope="module")
def chained(pristine_demo, tmp_path_factory):
    """A demo root with one visit through the chain (archive, DataLad) and its BIDS session; the
    folder each step swaps in, as a clean run leaves it."""
    from dagster import instance_for_test

    root = tmp_path_factory.mktemp("swap") / "dataset"
    shutil.copytree(pristine_demo, root, symlinks=True)
    with instance_for_test() as inst:
        assert run_chain(inst, root, VISIT, datalad=True).success
    STEPS["bids"](str(root), VISIT)
    return root


def _target(root: Path, step: str) -> Path:
    ds, v = Dataset.open(root), parse_visit_key(VISIT)
    lay = ds.layout
    return {"extract": lay.raw_dir(v), "organize": lay.dicom_dir(v), "bids": lay.bids_session_dir(v),
            "datalad": lay.datalad_dir(ds.study, v)}[step]


def _state(step: str, target: Path, reference: dict) -> str:
    """"old" (the marker folder), "new" (what a clean run makes) or a failed assertion."""
    seen = tree(target)
    assert seen is not None, f"{step}: {target} is gone"
    if seen == {"old.txt": ("file", hashlib.sha256(b"old").hexdigest())}:
        return "old"
    if step == "datalad":  # commits carry their time: the dataset is complete when git holds the files
        files = subprocess.run(["git", "-C", str(target), "ls-files"], capture_output=True, text=True, check=True)
        assert sorted(files.stdout.split()) == reference["files"], f"{step}: an incomplete dataset"
        return "new"
    assert seen == reference["tree"], f"{step}: neither the old folder nor the new one ({len(seen)} entries)"
    return "new"


def _reference(root: Path, step: str) -> dict:
    target = _target(root, step)
    ref = {"tree": tree(target)}
    if step == "datalad":
        out = subprocess.run(["git", "-C", str(target), "ls-files"], capture_output=True, text=True, check=True)
        ref["files"] = sorted(out.stdout.split())
    return ref


STEP_CASES = [(step, mode, point) for step in ("extract", "organize", "bids", "datalad")
              for mode, point in (("exchange", "after_exchange"), ("fallback", "after_aside"), ("fallback", "after_in"))]


@pytest.mark.slow
@pytest.mark.parametrize("step,mode,point", STEP_CASES, ids=[f"{s}-{m}-{p}" for s, m, p in STEP_CASES])
def test_step_killed_mid_swap_keeps_its_folder_and_a_rerun_converges(chained, tmp_path, step, mode, point):
    root = tmp_path / "dataset"
    shutil.copytree(chained, root, symlinks=True)
    target = _target(root, step)
    reference = _reference(root, step)
    assert reference["tree"], f"{step}: the clean run made nothing at {target}"
    shutil.rmtree(target)
    _write(target, {"old.txt": b"old"})  # the folder an earlier run left
    assert crash(step, [root, VISIT], mode, point) == CRASHED, f"{step} never reached the swap"
    if tree(target) is None:
        assert point == "after_aside"
        assert any(n.startswith(f".{target.name}.old-") for n in strays(target)), "the old folder is lost"
    else:
        assert _state(step, target, reference) == OUTCOME[point]
    STEPS[step](str(root), VISIT)  # the re-run, as the next materialization makes it
    assert _state(step, target, reference) == "new"
    assert strays(target) == [], f"{step}: the re-run left {strays(target)}"
