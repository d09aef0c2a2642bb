"""Lineage as the UI shows it: data versions, code versions and staleness read through
Dagster's GraphQL API (the webserver's own schema, on a workspace loaded from the code
location) over a real instance that the downloads sensor and the chain's runs wrote to.

One test per promise of docs/decisions.md, "Lineage":
- every data version is the hash of the files it names;
- a re-delivered identical dump leaves everything after ``organized_dicoms`` fresh;
- a changed dump shows ``raw_dicoms`` stale, then what depends on each changed product;
- a bump of ``visit_tarball``'s code version shows every archived visit's tarball stale;
- the tarball's bytes are pinned to its code version.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import subprocess
import zipfile
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
from dagster import AssetSelection, EnvVar

from dicom_assets.core.ids import Visit
from dicom_assets.core.layout import DatasetLayout
from dicom_assets.core.versions import dump_version, kept_version
from dicom_assets.core.xnat import find_session, scan_counts
from dicom_assets.definitions import downloads_sensor
from dicom_assets.defs.lineage import CODE_VERSIONS
from dicom_assets.defs.resources import DatasetResource, XnatResource
from dicom_assets.testing.xnat import XnatTestServer

from .helpers import Ticker, metadata_of, run_chain

VISIT = "QPN001_ses-01"
V = Visit("QPN001", "ses-01")
DUMP = "ses-01/QPN_001_MR.zip"
ALL = ["downloads", "raw_dicoms", "organized_dicoms", "visit_tarball", "visit_metadata", "datalad_dataset",
       "xnat_session"]
AFTER_ORGANIZE = ALL[3:]
USER = "site-uploader"
# sha256 of the demo visit QPN001_ses-01's tarball for each code version of visit_tarball: the
# tarball's bytes are a contract; a change of them without a new code version fails here (a
# change of the demo's DICOMs, testing/demo.py, changes the pin of the same version)
TARBALL_SHA256 = {"1": "6e1ab424ded0f67902e4e9f463fa733448018ed47583488a3a1d0b0fdf6c7467"}

STALE_QUERY = """
query Lineage($key: AssetKeyInput!, $partition: String!) {
  assetNodeOrError(assetKey: $key) {
    ... on AssetNode {
      staleStatus(partition: $partition)
      dataVersion(partition: $partition)
      staleCauses(partition: $partition) { key { path } reason category dependency { path } }
    }
    ... on AssetNotFoundError { message }
  }
}"""


# ------------------------------------------------------------------ the UI's view
@contextmanager
def ui(instance, python_file: Path | None = None):
    """The webserver's GraphQL schema on a workspace loaded from the code location (in this
    process): ``dicom_assets.definitions:defs``, or ``defs`` of ``python_file``."""
    from dagster._core.remote_origin import InProcessCodeLocationOrigin
    from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
    from dagster._core.workspace.context import WorkspaceProcessContext
    from dagster._core.workspace.load_target import InProcessWorkspaceLoadTarget
    from dagster_graphql.test.utils import execute_dagster_graphql

    target = (LoadableTargetOrigin(python_file=str(python_file), attribute="defs") if python_file else
              LoadableTargetOrigin(module_name="dicom_assets.definitions", attribute="defs"))
    with WorkspaceProcessContext(instance, InProcessWorkspaceLoadTarget(
            InProcessCodeLocationOrigin(target, location_name="dicom_assets"))) as process:

        def view(asset: str, partition: str = VISIT) -> dict:
            ctx = process.create_request_context()  # one request: nothing cached between two looks
            res = execute_dagster_graphql(ctx, STALE_QUERY, {"key": {"path": [asset]}, "partition": partition})
            assert not res.errors, res.errors
            node = res.data["assetNodeOrError"]
            assert "staleStatus" in node, node
            # the root causes, as the UI lists them: (asset, why, the dependency that changed)
            return {"status": node["staleStatus"], "version": node["dataVersion"],
                    "causes": [("/".join(c["key"]["path"]), c["reason"],
                                "/".join(c["dependency"]["path"]) if c["dependency"] else None)
                               for c in node["staleCauses"]]}

        yield view


def statuses(view, assets=ALL, partition=VISIT) -> dict[str, str]:
    return {a: view(a, partition)["status"] for a in assets}


def versions(view, assets=ALL, partition=VISIT) -> dict[str, str]:
    return {a: view(a, partition)["version"] for a in assets}


# ------------------------------------------------------------------ fixtures
@pytest.fixture
def xnat(samples, tmp_path, monkeypatch):
    password = "pw-" + secrets.token_hex(8)
    srv = XnatTestServer(samples.xnat_schemas, USER, password, storage=tmp_path / "xnat-storage").start()
    monkeypatch.setenv("XNAT_USER", USER)
    monkeypatch.setenv("XNAT_PASSWORD", password)
    # the resource the runs use, and one the test itself connects with
    yield SimpleNamespace(res=XnatResource(server=srv.url, user=EnvVar("XNAT_USER"), password=EnvVar("XNAT_PASSWORD")),
                          direct=XnatResource(server=srv.url, user=USER, password=password))
    srv.stop()


def sensor(instance, root):
    return Ticker(instance, downloads_sensor, {"dataset": DatasetResource(root=str(root))})


def take(ticker, visit=VISIT, ticks=3):
    """Ticks until the sensor takes a dump of ``visit``; its observations are stored as the
    daemon stores them (helpers.Ticker)."""
    for _ in range(ticks):
        result = ticker.tick()
        runs = [r for r in (getattr(result, "run_requests", None) or []) if r.partition_key == visit]
        if runs:
            assert any(e.partition == visit for e in result.asset_events), "taken without an observation"
            return runs
    raise AssertionError(f"the sensor did not take a dump of {visit} in {ticks} ticks")


def full_chain(instance, root, xnat, selection=None):
    return run_chain(instance, root, VISIT, xnat=xnat.res, datalad=True, selection=selection)


def redeliver(path: Path, data: bytes | None = None) -> None:
    """A dump delivered again: a new file (new inode) put in place, with a later mtime."""
    content = path.read_bytes() if data is None else data
    st = path.stat()
    tmp = path.with_name("." + path.name + ".incoming")
    tmp.write_bytes(content)
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    os.replace(tmp, path)


def chain_run(instance, root, xnat):
    """The sensor takes the demo dump and the whole chain runs: the sensor (to tick again) and
    the data versions the UI shows then."""
    ticker = sensor(instance, root)
    take(ticker)
    full_chain(instance, root, xnat)
    with ui(instance) as view:
        return ticker, versions(view)


def commit_count(repo: Path) -> str:
    return subprocess.run(["git", "-C", str(repo), "rev-list", "--count", "HEAD"], capture_output=True, text=True,
                          check=True).stdout


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


# ------------------------------------------------------------------ the promises
@pytest.mark.slow
def test_data_versions_are_the_hashes_of_the_files(instance, demo_root, xnat):
    take(sensor(instance, demo_root))
    result = full_chain(instance, demo_root, xnat)
    lay = DatasetLayout(demo_root)
    st = (lay.downloads_root / DUMP).stat()
    with ui(instance) as view:
        got = versions(view)
        assert statuses(view, ALL[1:]) == {a: "FRESH" for a in ALL[1:]}
    # the dump as observed by the sensor, and as raw_dicoms extracted it: path, size, mtime, files
    assert got["downloads"] == got["raw_dicoms"] == dump_version([(DUMP, f"{st.st_size}:{st.st_mtime_ns}:1")])
    # the kept DICOMs: <SOPInstanceUID>.dcm and the size of each, as found in dicom/
    kept = [(p.name.removesuffix(".dcm"), p.stat().st_size) for p in lay.dicom_dir(V).iterdir()]
    assert len(kept) >= 40 and got["organized_dicoms"] == kept_version(kept)
    assert got["visit_tarball"] == sha256(lay.tarball_path("QPN", V))
    assert got["visit_metadata"] == hashlib.md5(lay.metadata_dicoms_path("QPN", V).read_bytes()).hexdigest()
    head = subprocess.run(["git", "-C", str(lay.datalad_dir("QPN", V)), "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    assert got["datalad_dataset"] == head
    meta = metadata_of(result, "xnat_session")
    with xnat.direct.connect() as session:
        exp = find_session(session, meta["project"], meta["session_label"])
        counts = scan_counts(session, exp["id"])
    assert counts  # the scans XNAT holds, file counts as XNAT lists them
    expected = f"{exp['id']}:" + hashlib.sha256(
        ("{" + ",".join(f'"{k}":{v}' for k, v in sorted(counts.items())) + "}").encode()).hexdigest()[:16]
    assert got["xnat_session"] == expected


@pytest.mark.slow
def test_redelivered_identical_dump_leaves_downstream_fresh(instance, demo_root, xnat):
    ticker, before = chain_run(instance, demo_root, xnat)
    head = DatasetLayout(demo_root).datalad_dir("QPN", V)
    commits = commit_count(head)

    redeliver(demo_root / "downloads" / DUMP)  # the same bytes, delivered again
    take(ticker)
    with ui(instance) as view:
        assert view("downloads")["version"] != before["downloads"]
        raw = view("raw_dicoms")
        assert raw["status"] == "STALE" and raw["causes"] == [("downloads", "has a new data version", None)]
    # the dump is extracted and organized again: the same DICOMs are kept, so Dagster knows
    # that nothing after organized_dicoms has to run
    run_chain(instance, demo_root, VISIT, selection=AssetSelection.assets("raw_dicoms", "organized_dicoms"))
    with ui(instance) as view:
        after = versions(view)
        assert statuses(view, ALL[1:]) == {a: "FRESH" for a in ALL[1:]}
    assert after["organized_dicoms"] == before["organized_dicoms"]
    assert {a: after[a] for a in AFTER_ORGANIZE} == {a: before[a] for a in AFTER_ORGANIZE}
    # and the sensor's run (the whole chain) changes no product: same tarball, no new commit
    full_chain(instance, demo_root, xnat)
    with ui(instance) as view:
        assert {a: view(a)["version"] for a in AFTER_ORGANIZE} == {a: before[a] for a in AFTER_ORGANIZE}
        assert statuses(view, ALL[1:]) == {a: "FRESH" for a in ALL[1:]}
    assert commit_count(head) == commits


def without_member(zip_path: Path, name_part: str) -> bytes:
    out = zip_path.with_name(".rewritten.zip")
    with zipfile.ZipFile(zip_path) as src, zipfile.ZipFile(out, "w") as dst:
        dropped = [i for i in src.infolist() if name_part in i.filename]
        assert len(dropped) == 1, dropped
        for info in src.infolist():
            if info is not dropped[0]:
                dst.writestr(info, src.read(info))
    data = out.read_bytes()
    out.unlink()
    return data


@pytest.mark.slow
def test_changed_dump_marks_downstream_stale(instance, demo_root, xnat):
    ticker, before = chain_run(instance, demo_root, xnat)

    dump = demo_root / "downloads" / DUMP
    redeliver(dump, without_member(dump, "03_T1w_MPRAGE/DICOM/IM0001"))  # one kept DICOM fewer
    take(ticker)
    with ui(instance) as view:
        raw = view("raw_dicoms")
        assert raw["status"] == "STALE" and raw["causes"] == [("downloads", "has a new data version", None)]
    run_chain(instance, demo_root, VISIT, selection=AssetSelection.assets("raw_dicoms", "organized_dicoms"))
    with ui(instance) as view:
        assert view("organized_dicoms")["version"] != before["organized_dicoms"]
        tar = view("visit_tarball")
        assert tar["status"] == "STALE" and tar["causes"] == [("organized_dicoms", "has a new data version", None)]
        assert view("xnat_session")["causes"] == [("organized_dicoms", "has a new data version", None)]
    # the archive is made again: the products that read it are stale, each naming what changed
    run_chain(instance, demo_root, VISIT, selection=AssetSelection.assets("visit_tarball", "visit_metadata"))
    with ui(instance) as view:
        assert view("visit_tarball")["version"] != before["visit_tarball"]
        assert statuses(view) == {"downloads": "FRESH", "raw_dicoms": "FRESH", "organized_dicoms": "FRESH",
                                  "visit_tarball": "FRESH", "visit_metadata": "FRESH",
                                  "datalad_dataset": "STALE", "xnat_session": "STALE"}
        assert view("datalad_dataset")["causes"] == [("visit_metadata", "has a new data version", None)]
        assert set(view("xnat_session")["causes"]) == {("organized_dicoms", "has a new data version", None),
                                                       ("visit_metadata", "has a new data version", None)}
    full_chain(instance, demo_root, xnat, selection=AssetSelection.assets("datalad_dataset"))
    with ui(instance) as view:
        assert statuses(view, ALL[1:-1]) == {a: "FRESH" for a in ALL[1:-1]}
        assert view("datalad_dataset")["version"] != before["datalad_dataset"]
        # XNAT still holds the session of the old dump (its duplicate policy refuses another content):
        # stale until it is resolved there, as the UI says
        assert view("xnat_session")["status"] == "STALE"


BUMPED = """
from dagster import Definitions

from dicom_assets import definitions as d
from dicom_assets.defs.archive import visit_tarball

bumped = visit_tarball.map_asset_specs(lambda spec: spec.replace_attributes(code_version="{version}"))
defs = Definitions(assets=[d.downloads] + [bumped if a is visit_tarball else a for a in d.CHAIN_ASSETS + d.BIDS_ASSETS],
                   resources=d.defs.resources)
"""


def test_tarball_code_version_bump_marks_archived_visits_stale(instance, demo_root, tmp_path):
    archived = ["QPN001_ses-01", "QPN002_ses-01"]
    for visit in archived:
        run_chain(instance, demo_root, visit)
    instance.add_dynamic_partitions("visits", ["QPN003_ses-01"])  # known, never archived
    with ui(instance) as view:
        assert [view("visit_tarball", v)["status"] for v in archived] == ["FRESH", "FRESH"]
    new = str(int(CODE_VERSIONS["visit_tarball"]) + 1)
    bumped = tmp_path / "bumped_defs.py"
    bumped.write_text(BUMPED.format(version=new))
    with ui(instance, bumped) as view:
        for visit in archived:
            tar = view("visit_tarball", visit)
            assert tar["status"] == "STALE" and tar["causes"] == [("visit_tarball", "has a new code version", None)], visit
            # what reads the tarball is stale once the tarball is made again with the new format
            assert view("visit_metadata", visit)["status"] == "FRESH"
        assert view("visit_tarball", "QPN003_ses-01")["status"] == "MISSING"


def test_tarball_bytes_are_pinned_to_the_code_version(instance, demo_root):
    run_chain(instance, demo_root, VISIT)
    got = sha256(DatasetLayout(demo_root).tarball_path("QPN", V))
    pinned = TARBALL_SHA256.get(CODE_VERSIONS["visit_tarball"])
    assert got == pinned, (
        f"visit_tarball writes other bytes ({got}) than its code version {CODE_VERSIONS['visit_tarball']} "
        "pins: bump CODE_VERSIONS['visit_tarball'] in dicom_assets/defs/lineage.py (every visit archived by the "
        "old format then shows stale) and pin the new sha256 here")
