"""The DataLad stage, as a colleague uses it: clone the visit's dataset (from the store's
deposit, or from its folder) with real DataLad and git-annex, `datalad get` DICOMs out of the
tarball, check their md5 against the metadata JSON; and the catalog page in a real browser."""

import hashlib
import http.server
import json
import os
import re
import shutil
import subprocess
import threading
import zipfile
from functools import partial
from pathlib import Path

import pytest

from dicom_assets.core import annexwrite
from dicom_assets.core.datalad_index import DataladError, index_visit, store_urls, tool_env
from dicom_assets.core.dataset import Dataset

from .helpers import BROWSER_ARGS, CHROMIUM, free_port, metadata_of, run_chain

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


def failing_tool(tmp_path, monkeypatch, tool: str, subcommand: str, message: str, code: int) -> str:
    """Put a wrapper of the real ``tool`` first on PATH whose ``subcommand`` dies with ``message``
    (as on a full disk); every other call runs the real tool. Returns the PATH to restore."""
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    real = shutil.which(tool, path=tool_env()["PATH"])
    (fake / tool).write_text(f"#!/bin/sh\ncase \" $* \" in *' {subcommand} '*)\n"
                             f"  echo '{message}' >&2; exit {code};;\nesac\nexec {real} \"$@\"\n")
    (fake / tool).chmod(0o755)
    real_path = os.environ["PATH"]
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{tool_env()['PATH']}")
    return real_path


def visit_inputs(indexed) -> tuple[Path, dict]:
    """The demo visit's store folder and the ``index_visit`` arguments describing the visit."""
    root, _, dicoms = indexed
    store = root / "store" / "QPN"
    tarball_meta = json.loads((store / f"{VISIT}_metadata_tarball.json").read_text())
    return store, {"visit": VISIT, "study": "QPN", "tarball_meta": tarball_meta, "dicoms_meta": list(dicoms.values())}


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


@pytest.mark.slow
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


@pytest.mark.slow
def test_clone_from_the_dataset_folder_and_series_view(indexed, tmp_path):
    root, meta, dicoms = indexed
    clone = tmp_path / "clone"
    datalad("clone", str(root / "datalad" / "QPN" / VISIT), str(clone), cwd=tmp_path)
    # every DICOM, out of the tarball; one job, as the README shows: with -J 2 two jobs fetching
    # the same tarball race inside datalad-next's archivist (README, "Known limits")
    datalad("get", *sorted(dicoms), cwd=clone)
    assert {p: md5(clone / p) for p in dicoms} == {p: d["md5"] for p, d in dicoms.items()}
    # the documented series view: one folder per <number>_<description>
    sh("git", "annex", "view", "series=*", cwd=clone)
    folders = {p.name: len(list(p.iterdir())) for p in clone.iterdir() if p.is_dir() and not p.name.startswith(".")}
    expected: dict[str, int] = {}
    for d in dicoms.values():
        label = f"{int(d['SeriesNumber']):03d}_{d['SeriesDescription']}"
        expected[label] = expected.get(label, 0) + 1
    assert folders == expected


@pytest.mark.slow
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
@pytest.mark.slow
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
@pytest.mark.slow
def test_git_annex_failure_is_reported_and_a_rerun_succeeds(indexed, tmp_path, monkeypatch):
    store, visit = visit_inputs(indexed)
    # a git-annex whose registerurl dies (as on a full disk), ahead of the real one on PATH
    real_path = failing_tool(tmp_path, monkeypatch, "git-annex", "registerurl",
                             "git-annex: .git/annex/journal: No space left on device", 1)
    ds = tmp_path / "ds"
    with pytest.raises(DataladError, match="No space left on device") as err:
        index_visit(ds, **visit, store_dir=store, deposit=False, writer="batch")  # the direct writer starts no git-annex
    assert "git annex" in str(err.value)
    assert not ds.exists()  # the half-made dataset was built aside and removed
    monkeypatch.setenv("PATH", real_path)
    res = index_visit(ds, **visit, store_dir=store, deposit=False)
    assert res.changed and res.files == len(visit["dicoms_meta"])


@pytest.mark.browser
@pytest.mark.slow
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


# --- the direct writer: verified by git-annex and DataLad, and against the batch reference ----

def _git_files(repo: Path, ref: str) -> dict[str, tuple[str, bytes]]:
    """{path: (mode, content)} of a ref's tree (one ls-tree, one cat-file)."""
    rows = [line.split("\t", 1) for line in sh("git", "ls-tree", "-r", "-z", ref, cwd=repo).stdout.split("\0") if line]
    rows = [(meta.split(), path) for meta, path in rows]
    blobs = [(m, path) for m, path in rows if m[1] == "blob"]
    raw = subprocess.run(["git", "cat-file", "--batch"], cwd=repo, input="".join(m[2] + "\n" for m, _ in blobs).encode(),
                         capture_output=True, check=True).stdout
    out, pos = {}, 0
    for m, path in blobs:
        nl = raw.index(b"\n", pos)
        size = int(raw[pos:nl].split()[2])
        out[path] = (m[0], raw[nl + 1:nl + 1 + size])
        pos = nl + 1 + size + 1
    out.update({path: (m[0], m[2].encode()) for m, path in rows if m[1] == "commit"})
    return out


def records(repo: Path, branch: str = "HEAD") -> dict:
    """What a dataset records, normalized for comparison: the git-annex branch and the dataset's
    tree, with repository uuids replaced by their role (their uuid.log description), log
    timestamps by <t>, the dataset id by <id>; plus the commit subjects and, in a work tree,
    the git and git-annex setup (.git/config, hooks, info/attributes)."""
    annex = _git_files(repo, "refs/heads/git-annex")
    roles = {}
    for line in annex["uuid.log"][1].decode().splitlines():
        u, rest = line.split(" ", 1)
        roles[u] = "<" + rest.rsplit(" timestamp=", 1)[0] + ">"
    tree = _git_files(repo, branch)
    ds_id = re.search(r"id = (\S+)", tree[".datalad/config"][1].decode()).group(1)

    def norm(text: str) -> str:
        text = re.sub(r"(?m)^\d+(\.\d+)?s ", "<t> ", text)
        text = re.sub(r"timestamp=\d+(\.\d+)?s", "timestamp=<t>", text)
        for u, role in roles.items():
            text = text.replace(u, role)
        return text.replace(ds_id, "<id>")

    def lines_sorted(path: str, text: str) -> str:
        # uuid.log and remote.log are sorted by uuid, and uuids are random: compare as sets
        return "".join(sorted(text.splitlines(True))) if path in ("uuid.log", "remote.log") else text

    out = {"git-annex": {p: lines_sorted(p, norm(c.decode())) for p, (_, c) in annex.items()},
           "tree": {p: (m, norm(c.decode())) for p, (m, c) in tree.items()},
           "commits": sh("git", "log", "--format=%s", branch, cwd=repo).stdout.split("\n")}
    if (repo / ".git").is_dir():
        git = repo / ".git"
        out["config"] = norm((git / "config").read_text())
        out["hooks"] = {h.name: h.read_text() for h in (git / "hooks").iterdir() if not h.name.endswith(".sample")}
        out["attributes"] = (git / "info" / "attributes").read_text()
    return out


def _unzip_deposit(store: Path, visit: str, dest: Path) -> Path:
    """The bare repository a `datalad-annex::` clone unpacks from the store, and its refs list."""
    with zipfile.ZipFile(store / f"{visit}_XDLRA--repo-export") as z:
        z.extractall(dest)
    refs = (store / f"{visit}_XDLRA--refs").read_text().splitlines()
    assert refs[-1] == "@refs/heads/master HEAD" or refs[-1].startswith("@refs/heads/")
    for line in refs[:-1]:
        sha, ref = line.split()
        assert sh("git", "rev-parse", ref, cwd=dest).stdout.strip() == sha, (ref, refs)
    return dest


@pytest.mark.slow
def test_direct_and_batch_writers_record_the_same(indexed, tmp_path):
    """The same visit through git-annex's batch commands and through the direct writer: the
    git-annex branch (location, URL and metadata logs, uuid.log, remote.log), the dataset's tree,
    its setup and its deposit read back identical, up to uuids, timestamps and the dataset id;
    the same after a re-index with a new tarball."""
    root, meta, dicoms = indexed
    tarball_meta = json.loads((root / "store" / "QPN" / f"{VISIT}_metadata_tarball.json").read_text())
    listing = sorted(dicoms.values(), key=lambda d: d["path"])
    # in the new tarball, a member's tags change to values with spaces and a leading "!" (which
    # git-annex base64-encodes), and the metadata log of that key is rewritten
    relisted = [dict(d) for d in listing[3:]]
    relisted[0].update(SeriesDescription="!odd  name", ProtocolName="T1 MPRAGE")
    new_tar = {**tarball_meta, "md5": "e" * 32, "size": tarball_meta["size"] + 512}
    got = {}
    for writer in ("batch", "direct"):
        ds = tmp_path / writer / "datalad" / VISIT
        store = tmp_path / writer / "store" / "QPN"
        kw = dict(visit=VISIT, study="QPN", store_dir=store, store_base_url="file:///srv/store")
        first = index_visit(ds, tarball_meta=tarball_meta, dicoms_meta=listing, writer=writer, **kw)
        deposit = records(_unzip_deposit(store, VISIT, tmp_path / writer / "bare"))
        assert deposit == {k: v for k, v in records(ds).items() if k in deposit}  # the deposit is the dataset
        after_first = records(ds)
        again = index_visit(ds, tarball_meta=new_tar, dicoms_meta=relisted, writer=writer, **kw)
        assert first.changed and again.changed and again.commit != first.commit
        got[writer] = (after_first, records(ds))
    assert got["direct"][0] == got["batch"][0]
    assert got["direct"][1] == got["batch"][1]
    # the normalization hid no difference that matters: both name every DICOM and its URL
    annex = got["direct"][1]["git-annex"]
    assert sum(p.endswith(".log.met") for p in annex) == len(dicoms)
    changed = [v for p, v in annex.items() if p.endswith(".met") and "-" + listing[3]["SeriesDescription"] in v]
    assert len(changed) == 1 and "+!IW9kZCAgbmFtZQ==" in changed[0], changed


@pytest.mark.slow
def test_direct_dataset_passes_git_annex_fsck_whereis_and_metadata(indexed, tmp_path):
    """git-annex's own checks on the direct writer's dataset: in a copy of the dataset folder
    (its .git as written here) and in a clone of the deposit."""
    root, meta, dicoms = indexed
    _, visit = visit_inputs(indexed)
    ds, deposit = tmp_path / "datalad" / VISIT, tmp_path / "store" / "QPN"
    res = index_visit(ds, **visit, store_dir=deposit, store_base_url=(root / "store").as_uri(), writer="direct")
    assert not (ds / ".git" / "annex").exists()  # written without git-annex
    copy = tmp_path / "copy"
    shutil.copytree(ds, copy, symlinks=True)
    clone = tmp_path / "clone"
    datalad("clone", store_urls((tmp_path / "store").as_uri(), "QPN", VISIT)[1], str(clone), cwd=tmp_path)
    for repo in (copy, clone):
        fsck = [json.loads(x) for x in sh("git", "annex", "fsck", "--fast", "--json", cwd=repo).stdout.splitlines()]
        assert len(fsck) == len(dicoms) + 1 and all(r["success"] for r in fsck), fsck[:3]
        where = {r["file"]: r for r in map(json.loads, sh("git", "annex", "whereis", "--json", cwd=repo)
                                           .stdout.splitlines())}
        for path, d in dicoms.items():
            remotes = {w["description"].strip("[]"): w["urls"] for w in where[path]["whereis"]}
            assert list(remotes) == ["archivist"], where[path]
            assert remotes["archivist"] == [f"dl+archive:{res.tarball_key}#path={path}&size={d['size']}&atype=tar"]
        tar = where[f"icf/{VISIT}_dicom.tar"]["whereis"]
        assert [w["description"] for w in tar] == ["[uncurl]"] and tar[0]["urls"] == [
            (root / "store" / "QPN" / f"{VISIT}_dicom.tar").resolve().as_uri()]
        pick = _one_per_series(dicoms)[1]
        fields = json.loads(sh("git", "annex", "metadata", "--json", pick["path"], cwd=repo).stdout)["fields"]
        assert fields["series"] == [f"{int(pick['SeriesNumber']):03d}_{pick['SeriesDescription']}"]
        assert fields["ProtocolName"] == [pick["ProtocolName"]] and fields["Modality"] == [pick["Modality"]]
    # a full fsck of content got from the store: checksums verified by git-annex itself
    picks = [d["path"] for d in _one_per_series(dicoms)]
    datalad("get", *picks, cwd=clone)
    full = [json.loads(x) for x in sh("git", "annex", "fsck", "--json", *picks, cwd=clone).stdout.splitlines()]
    assert [r["success"] for r in full] == [True] * len(picks)


@pytest.mark.faults
def test_direct_writer_failure_is_reported_and_a_rerun_succeeds(indexed, tmp_path, monkeypatch):
    """git fast-import dying (as on a full disk): the error names it, no half-made dataset is
    left, and a rerun builds it."""
    _, visit = visit_inputs(indexed)
    real_path = failing_tool(tmp_path, monkeypatch, "git", "fast-import",
                             "fatal: cannot write pack: No space left on device", 128)
    ds = tmp_path / "ds"
    with pytest.raises(DataladError, match="No space left on device") as err:
        index_visit(ds, **visit, store_dir=tmp_path / "store", writer="direct")
    assert "fast-import" in str(err.value)
    assert not ds.exists() and not any(p.name.startswith(".ds.tmp") for p in tmp_path.iterdir())
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").iterdir())
    monkeypatch.setenv("PATH", real_path)
    res = index_visit(ds, **visit, store_dir=tmp_path / "store", writer="direct")
    assert res.changed and res.files == len(visit["dicoms_meta"])


def test_writer_knob_is_validated(tmp_path, monkeypatch):
    from dicom_assets.settings import SettingsError, current

    monkeypatch.setenv("DICOM_ASSETS_DATALAD_WRITER", "fast")
    with pytest.raises(SettingsError, match="DICOM_ASSETS_DATALAD_WRITER='fast'"):
        current()
    with pytest.raises(DataladError, match="writer 'fast'"):
        index_visit(tmp_path / "ds", visit="V", study="S", tarball_meta={"size": 1, "md5": "1" * 32},
                    dicoms_meta=[], store_dir=tmp_path / "store" / "S", writer="fast")


def test_annex_hash_directories_match_git_annex(tmp_path):
    """hashdirmixed / hashdirlower as git-annex itself computes them (examinekey)."""
    keys = [f"MD5-s{i * 7919}--{hashlib.md5(str(i).encode()).hexdigest()}" for i in range(200)]
    keys += ["MD5E-s808960--0f8356a1d5ede9fc994efcefde4c6098.tar"]
    sh("git", "init", "-q", str(tmp_path / "r"))
    out = subprocess.run(["git", "annex", "examinekey", "--batch", "--format=${hashdirmixed} ${hashdirlower}\n"],
                         cwd=tmp_path / "r", env=tool_env(), input="".join(k + "\n" for k in keys),
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == [f"{annexwrite.hashdir_mixed(k)}/ {annexwrite.hashdir_lower(k)}/" for k in keys]
