"""The DataLad stage, as a colleague uses it: clone the visit's dataset (from the store's
deposit, or from its folder) with real DataLad and git-annex, `datalad get` DICOMs out of the
tarball, check their md5 against the metadata JSON; and the catalog page in a real browser."""

import hashlib
import http.server
import json
import os
import shutil
import subprocess
import threading
from functools import partial
from pathlib import Path

import pytest
from .helpers import BROWSER_ARGS, CHROMIUM, free_port, metadata_of, run_chain

from dicom_assets.core.datalad_index import DataladError, index_visit, tool_env
from dicom_assets.core.layout import Dataset

VISIT = "QPN001_ses-01"


def sh(*args, cwd=None, check=True):
    out = subprocess.run(list(args), cwd=cwd, env=tool_env(), capture_output=True, text=True)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return out


def datalad(*args, cwd, check=True):
    """`datalad` in a given folder: a `datalad-annex::` clone git-annex-initializes the git
    repository it is run from (datalad-next 1.6), so never from inside this checkout."""
    return sh(shutil.which("datalad", path=tool_env()["PATH"]), *args, cwd=cwd, check=check)


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def indexed(pristine_demo, tmp_path_factory):
    """One demo visit through the chain up to the DataLad dataset and the catalog."""
    from dagster import instance_for_test

    root = tmp_path_factory.mktemp("datalad") / "dataset"
    shutil.copytree(pristine_demo, root, symlinks=True)
    with instance_for_test() as inst:
        result = run_chain(inst, root, VISIT, datalad=True)
        meta = metadata_of(result, "datalad_dataset")
    ds = Dataset.open(root)
    dicoms = json.loads(ds.layout.metadata_dicoms_path(ds.study, ds.manifest.visits[0]).read_text())
    return root, meta, {d["path"]: d for d in dicoms}


def _clone_url(meta) -> str:
    return meta["clone"].split("'")[1]


def _one_per_series(dicoms: dict, n: int = 3) -> list[dict]:
    seen, out = set(), []
    for d in sorted(dicoms.values(), key=lambda d: d["path"]):
        if d["SeriesNumber"] not in seen:
            seen.add(d["SeriesNumber"])
            out.append(d)
    assert len(out) >= n, "the demo visit should have at least three series"
    return out[:n]


def test_clone_from_the_store_deposit_gets_dicoms_from_the_tarball(indexed, tmp_path):
    root, meta, dicoms = indexed
    store = root / "store" / "QPN"
    assert (store / f"{VISIT}_XDLRA--refs").is_file() and (store / f"{VISIT}_XDLRA--repo-export").is_file()
    clone = tmp_path / "clone"
    datalad("clone", _clone_url(meta), str(clone), cwd=tmp_path)
    # the whole tree at once, no content yet
    tree = {str(p.relative_to(clone)) for p in clone.rglob("*.dcm")}
    assert tree == set(dicoms)
    assert (clone / "icf" / f"{VISIT}_dicom.tar").is_symlink()  # the whole tarball, as one file
    assert all(not (clone / p).exists() for p in dicoms)  # dangling annex links until `get`
    picks = _one_per_series(dicoms)
    datalad("get", *[d["path"] for d in picks], cwd=clone)
    for d in picks:
        assert md5(clone / d["path"]) == d["md5"], d["path"]
    # the DICOM keys are the md5 keys of the metadata JSON; the tags are git-annex metadata
    key = sh("git", "annex", "lookupkey", picks[0]["path"], cwd=clone).stdout.strip()
    assert key == f"MD5-s{picks[0]['size']}--{picks[0]['md5']}"
    fields = json.loads(sh("git", "annex", "metadata", "--json", picks[0]["path"], cwd=clone).stdout)["fields"]
    assert fields["SeriesDescription"] == [picks[0]["SeriesDescription"]]
    assert fields["SeriesNumber"] == [str(picks[0]["SeriesNumber"])]
    # the curation status says how far the visit got
    import csv
    rows = {r["visit"]: r for r in csv.DictReader((root / "tabular" / "curation_status.tsv").open(), delimiter="\t")}
    assert rows[VISIT]["in_datalad"].lower() == "true"
    # nothing was copied into the dataset: its annex holds no content
    objects = root / "datalad" / "QPN" / VISIT / ".git" / "annex" / "objects"
    assert not objects.exists() or not any(p.is_file() for p in objects.rglob("*"))


def test_clone_from_the_dataset_folder_and_series_view(indexed, tmp_path):
    root, meta, dicoms = indexed
    clone = tmp_path / "clone"
    datalad("clone", str(root / "datalad" / "QPN" / VISIT), str(clone), cwd=tmp_path)
    datalad("get", "-J", "2", *sorted(dicoms), cwd=clone)  # every DICOM, out of the tarball
    assert {p: md5(clone / p) for p in dicoms} == {p: d["md5"] for p, d in dicoms.items()}
    # the documented series view: one folder per <number>_<description>
    sh("git", "annex", "view", "series=*", cwd=clone)
    folders = {p.name: len(list(p.iterdir())) for p in clone.iterdir() if p.is_dir() and not p.name.startswith(".")}
    expected: dict[str, int] = {}
    for d in dicoms.values():
        label = f"{int(d['SeriesNumber']):03d}_{d['SeriesDescription']}"
        expected[label] = expected.get(label, 0) + 1
    assert folders == expected


def test_study_superdataset_holds_the_visit_as_a_subdataset(indexed, tmp_path):
    root, meta, dicoms = indexed
    sup = root / "datalad" / "QPN"
    recorded = sh("git", "ls-tree", "HEAD", VISIT, cwd=sup).stdout.split()
    assert recorded[:1] == ["160000"] and recorded[2] == meta["version"]  # a gitlink at the visit's HEAD
    clone = tmp_path / "study"
    datalad("clone", str(sup), str(clone), cwd=tmp_path)
    datalad("get", "-n", VISIT, cwd=clone)  # install the visit's dataset, no content
    first = sorted(dicoms)[0]
    datalad("get", f"{VISIT}/{first}", cwd=clone)
    assert md5(clone / VISIT / first) == dicoms[first]["md5"]


def test_rerun_keeps_head_and_a_new_tarball_gives_one_commit(indexed, tmp_path):
    root, meta, dicoms = indexed
    ds = root / "datalad" / "QPN" / VISIT
    head = sh("git", "rev-parse", "HEAD", cwd=ds).stdout.strip()
    assert head == meta["version"]
    store = root / "store" / "QPN"
    tarball_meta = json.loads((store / f"{VISIT}_metadata_tarball.json").read_text())
    listing = list(dicoms.values())
    again = index_visit(ds, visit=VISIT, study="QPN", tarball_meta=tarball_meta, dicoms_meta=listing,
                        store_dir=store)
    assert not again.changed and again.commit == head
    # a new tarball (two DICOMs fewer): one new commit, the old history kept, the tree follows
    fewer = sorted(listing, key=lambda d: d["path"])[2:]
    new_meta = {**tarball_meta, "md5": "0" * 32, "size": tarball_meta["size"] - 1}
    res = index_visit(ds, visit=VISIT, study="QPN", tarball_meta=new_meta, dicoms_meta=fewer, store_dir=store,
                      deposit=False)
    assert res.changed and res.commit != head
    log = sh("git", "log", "--format=%H", cwd=ds).stdout.split()
    assert log[1] == head and res.commit == log[0]
    tracked = set(sh("git", "ls-files", cwd=ds).stdout.split())
    assert {d["path"] for d in fewer} <= tracked and f"icf/{VISIT}_dicom.tar" in tracked
    removed = {d["path"] for d in sorted(listing, key=lambda d: d["path"])[:2]}
    assert not removed & tracked


@pytest.mark.faults
def test_missing_tarball_makes_get_fail_clearly_and_loses_nothing(indexed, tmp_path):
    root, meta, dicoms = indexed
    clone = tmp_path / "clone"
    datalad("clone", _clone_url(meta), str(clone), cwd=tmp_path)
    first = sorted(dicoms)[0]
    tarball = root / "store" / "QPN" / f"{VISIT}_dicom.tar"
    aside = tmp_path / "aside.tar"
    tarball.rename(aside)
    try:
        out = datalad("get", first, cwd=clone, check=False)
    finally:
        aside.rename(tarball)
    assert out.returncode != 0
    message = out.stdout + out.stderr
    assert "get(error)" in message and first in message, message
    assert not (clone / first).exists()  # no silent empty file: the link still dangles
    datalad("get", first, cwd=clone)  # the store back: the same clone gets it
    assert md5(clone / first) == dicoms[first]["md5"]


@pytest.mark.faults
def test_unsafe_member_path_is_refused_before_anything_is_written(tmp_path):
    bad = [{"path": "V/a&b.dcm", "md5": "0" * 32, "size": 1}]
    with pytest.raises(DataladError, match="cannot be indexed"):
        index_visit(tmp_path / "ds", visit="V", study="S", tarball_meta={"size": 1, "md5": "1" * 32},
                    dicoms_meta=bad, store_dir=tmp_path / "store" / "S")
    assert not (tmp_path / "ds").exists()
    assert not any(p.name.startswith(".ds.tmp") for p in tmp_path.iterdir())


@pytest.mark.faults
def test_git_lock_left_by_a_crash_is_reported_and_a_rerun_succeeds(indexed, tmp_path):
    root, meta, dicoms = indexed
    store = root / "store" / "QPN"
    tarball_meta = json.loads((store / f"{VISIT}_metadata_tarball.json").read_text())
    ds = tmp_path / "ds"
    index_visit(ds, visit=VISIT, study="QPN", tarball_meta=tarball_meta, dicoms_meta=list(dicoms.values()),
                store_dir=store, deposit=False)
    head = sh("git", "rev-parse", "HEAD", cwd=ds).stdout.strip()
    # a git process that crashed left its index lock: git-annex cannot stage, we say where and why
    lock = ds / ".git" / "index.lock"
    lock.write_text("")
    new_tarball = {**tarball_meta, "md5": "f" * 32}
    with pytest.raises(DataladError, match="index.lock") as err:
        index_visit(ds, visit=VISIT, study="QPN", tarball_meta=new_tarball, dicoms_meta=list(dicoms.values()),
                    store_dir=store, deposit=False)
    assert str(ds) in str(err.value)
    assert sh("git", "rev-parse", "HEAD", cwd=ds).stdout.strip() == head  # nothing half-committed
    lock.unlink()
    res = index_visit(ds, visit=VISIT, study="QPN", tarball_meta=new_tarball, dicoms_meta=list(dicoms.values()),
                      store_dir=store, deposit=False)
    assert res.changed and res.commit != head


@pytest.mark.faults
def test_git_annex_failure_is_reported_and_a_rerun_succeeds(indexed, tmp_path, monkeypatch):
    root, meta, dicoms = indexed
    store = root / "store" / "QPN"
    tarball_meta = json.loads((store / f"{VISIT}_metadata_tarball.json").read_text())
    # a git-annex whose registerurl dies (as on a full disk), ahead of the real one on PATH
    fake = tmp_path / "bin"
    fake.mkdir()
    real = shutil.which("git-annex", path=tool_env()["PATH"])
    (fake / "git-annex").write_text(
        "#!/bin/sh\ncase \" $* \" in *' registerurl '*)\n"
        "  echo 'git-annex: .git/annex/journal: No space left on device' >&2; exit 1;;\nesac\n"
        f"exec {real} \"$@\"\n")
    (fake / "git-annex").chmod(0o755)
    real_path = os.environ["PATH"]
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{tool_env()['PATH']}")
    ds = tmp_path / "ds"
    with pytest.raises(DataladError, match="No space left on device") as err:
        index_visit(ds, visit=VISIT, study="QPN", tarball_meta=tarball_meta, dicoms_meta=list(dicoms.values()),
                    store_dir=store, deposit=False)
    assert "git annex" in str(err.value)
    assert not ds.exists()  # the half-made dataset was built aside and removed
    monkeypatch.setenv("PATH", real_path)
    res = index_visit(ds, visit=VISIT, study="QPN", tarball_meta=tarball_meta, dicoms_meta=list(dicoms.values()),
                      store_dir=store, deposit=False)
    assert res.changed and res.files == len(dicoms)


@pytest.mark.browser
def test_catalog_renders_visits_and_series_in_chromium(indexed, tmp_path):
    from dagster import instance_for_test
    from playwright.sync_api import sync_playwright

    if not os.path.exists(CHROMIUM):
        pytest.skip("no chromium here: `make test` installs Debian's chromium with apt")
    root, meta, dicoms = indexed
    with instance_for_test() as inst:  # a second visit, and the first one again: no duplicate entry
        run_chain(inst, root, "QPN002_ses-01", datalad=True)
        run_chain(inst, root, VISIT, datalad=True)
    catalog = root / "catalog"
    assert sorted(p.stem for p in (catalog / "visits").glob("*.json")) == [VISIT, "QPN002_ses-01"]
    port = free_port()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(catalog))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS)
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/index.html")
            text = page.inner_text("body")
            page.screenshot(path=str(tmp_path / "catalog.png"), full_page=True)
            browser.close()
    finally:
        server.shutdown()
    for visit in (VISIT, "QPN002_ses-01"):
        assert visit in text
    for d in dicoms.values():
        assert d["SeriesDescription"] in text
    assert meta["dataset_id"] in text
    assert text.count("datalad clone '") == 2
