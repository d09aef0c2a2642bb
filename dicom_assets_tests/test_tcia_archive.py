"""TCIA against the real archive (issue 27): real manifests of every year and host, the NBIA
versions deployed, patients split over manifests, a poisoned series, an outage with
``Retry-After``, annotations, and manifest names that collide. NBIA-compatible servers on
loopback (dicom_assets/testing/nbia_server.py), real DICOM files, a real Dagster instance."""

import csv
import json
from pathlib import Path

import pytest

from dicom_assets.core.tcia import (
    RETIRED_HOSTS,
    NbiaClient,
    TciaManifestError,
    download_series,
    manifest_files,
    manifest_name,
    manifest_servers,
    parse_manifest,
    read_resolved,
    read_studies,
    retry_after_seconds,
)
from dicom_assets.testing.nbia_server import NbiaTestServer, build_collection, lidc_annotation, manifest_text

from .helpers import Ticker
from .test_tcia import failure_of, fresh, materialize_manifest, write_manifest

REAL = Path(__file__).parent / "data" / "tcia"
NBIA, NLST = "https://nbia.cancerimagingarchive.net", "https://nlst.cancerimagingarchive.net"


def resources(root, *servers, public=None, **kw):
    from dicom_assets.defs.resources import DatasetResource, TciaResource

    urls = [s.server_url for s in servers]
    return {"dataset": DatasetResource(root=str(root)),
            "tcia": TciaResource(servers=urls, public_servers=public or urls, backoff=0.01, retries=2,
                                 retry_window=kw.pop("retry_window", 0.2), **kw)}


def series_of(path: Path) -> list[str]:
    """The series list as the NBIA Data Retriever reads it: the lines after the list key that
    hold a digit (tcia_utils' manifestToList drops the six header lines alike)."""
    lines = path.read_text().splitlines()
    start = lines.index("ListOfSeriesToDownload=") + 1
    return [ln.strip() for ln in lines[start:] if any(c.isdigit() for c in ln)]


# ------------------------------------------------------------------ real manifests (point 1)
@pytest.mark.parametrize("name, mapped", [
    ("manifest-1561766528292.tcia", [NBIA, NLST]),   # public. (retired): today's public servers
    ("manifest-lidc-422-modelable.tcia", [NBIA, NLST]),  # services. (retired)
    ("manifest-1683661704579.tcia", [NBIA]),
    ("manifest-NLST_allCT.tcia", [NLST]),
])
def test_every_real_manifest_parses_and_goes_where_tcias_tools_send_it(name, mapped):
    m = parse_manifest(REAL / name)
    assert list(m.series) == series_of(REAL / name)
    assert m.include_annotation
    assert manifest_servers(m, [NBIA + "/", NLST]) == mapped
    # the allow-list still keeps out everything else, and a site that lists only its own
    # server is told why a retired host cannot be mapped
    if urlhost(m.server) in RETIRED_HOSTS:
        with pytest.raises(TciaManifestError, match="retired since"):
            manifest_servers(m, ["https://nbia.example.org"])
    else:
        with pytest.raises(TciaManifestError, match="not one of the configured TCIA servers"):
            manifest_servers(m, ["https://nbia.example.org"])


def urlhost(url):
    return url.split("//", 1)[1].split("/", 1)[0]


def test_http_and_case_name_the_same_allowed_server_and_keep_its_scheme(tmp_path):
    p = tmp_path / "m.tcia"
    p.write_text(manifest_text(["1.2.3.4"], "http://NBIA.cancerimagingarchive.net"))
    assert manifest_servers(parse_manifest(p), [NBIA]) == [NBIA]  # https stays https
    p.write_text(manifest_text(["1.2.3.4"], "http://evil.example.org"))
    with pytest.raises(TciaManifestError, match="evil.example.org"):
        manifest_servers(parse_manifest(p), [NBIA])


def test_retired_host_manifests_download_from_the_public_servers(demo_root, instance, samples):
    """A 2019 public. manifest (a TCGA basket) and an NLST series on public.: each series is
    fetched from the public server that knows it, nothing is refused."""
    tcga = series_of(REAL / "manifest-1561766528292.tcia")
    nbia_col = build_collection(samples, {"TCGA-02-0001": 1, "TCGA-06-0002": 1}, series_uids=tcga)
    with NbiaTestServer(series=fresh(nbia_col)) as nbia, NbiaTestServer(name="nlst") as nlst:
        nlst.series.update(build_collection(samples, {"100012": 1}, collection="NLST", series_per_study=1))
        tcia_dir = demo_root / "downloads" / "tcia"
        text = (REAL / "manifest-1561766528292.tcia").read_text()
        nlst_uid = next(iter(nlst.series))
        write_manifest(tcia_dir, "manifest-1561766528292.tcia", text + nlst_uid + "\n")
        result = materialize_manifest(instance, resources(demo_root, nbia, nlst), "manifest-1561766528292")
        assert result.success, failure_of(result)[0]
        rows = read_resolved(tcia_dir / "manifest-1561766528292" / "resolved.csv")
        assert {r["SeriesInstanceUID"] for r in rows} == {*tcga, nlst_uid}
        assert {r["session_label"] for r in rows} == {"TCGA-02-0001", "TCGA-06-0002", "100012"}
        assert nlst.count("getDCMImage", nlst_uid) == 1 and nbia.count("getDCMImage", nlst_uid) == 0


def test_a_csv_export_is_asked_at_every_configured_server(samples, tmp_path):
    col = build_collection(samples, {"100158": 1}, collection="NLST", series_per_study=1)
    with NbiaTestServer() as nbia, NbiaTestServer(series=fresh(col), name="nlst") as nlst:
        clients = [NbiaClient(s.server_url, retries=0) for s in (nbia, nlst)]
        [res] = download_series(clients, list(col), tmp_path / "series")
        assert res.status == "downloaded" and res.server == nlst.server_url
        [gone] = download_series(clients, ["1.2.826.0.1.3680043.8.498.1"], tmp_path / "series")
        assert gone.status == "missing" and nbia.server_url in gone.message and nlst.server_url in gone.message


# ------------------------------------------------------------ NBIA versions deployed (point 2)
@pytest.mark.parametrize("release", ["2025-11", "2025-04", "2025-03", "9.0"])
def test_every_deployed_nbia_release_downloads_everything(samples, tmp_path, release):
    col = build_collection(samples, {"REL-1": 1}, files_per_series=2)
    with NbiaTestServer(series=fresh(col), release=release) as nbia:
        client = NbiaClient(nbia.server_url, retries=0)
        res = download_series(client, list(col), tmp_path / "series")
        assert [r.status for r in res] == ["downloaded"] * len(col), [r.message for r in res]
        asked = {(v, e) for v, e, _ in nbia.requests}
        if release in ("2025-11", "2025-04"):
            assert asked == {("v4", "getSeries"), ("v4", "getImageWithMD5Hash")}
            assert client.notes == []
        else:  # v4 answers 404 there: the rest goes to v1, and the run is told
            assert ("v1", "getImageWithMD5Hash") in asked and client.version == "v1"
            assert "no v4" in client.notes[0] and "v1" in client.notes[0]


def test_a_pre_2025_11_nbia_refuses_includemd5_as_the_old_client_sent_it(samples):
    col = build_collection(samples, {"REL-2": 1}, series_per_study=1)
    uid = next(iter(col))
    with NbiaTestServer(series=fresh(col), release="2025-04") as nbia:
        import urllib.error
        import urllib.request

        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{nbia.api('v4')}/getImage?SeriesInstanceUID={uid}&IncludeMD5=yes")
        assert err.value.code == 400 and b"Invalid query parameter: 'IncludeMD5'" in err.value.read()


# ----------------------------------------------------------------- annotations (point 5)
def test_annotations_are_fetched_with_the_series_and_kept(samples, tmp_path):
    col = build_collection(samples, {"LIDC-IDRI-0001": 1}, series_per_study=1)
    uid = next(iter(col))
    xml = b'<?xml version="1.0"?><LidcReadMessage><ResponseHeader/></LidcReadMessage>\n'
    col[uid].annotations = {"069.xml": xml}
    with NbiaTestServer(series=fresh(col)) as nbia:
        [res] = download_series(NbiaClient(nbia.server_url, retries=0), [uid], tmp_path / "s", annotations=True)
        assert res.status == "downloaded" and res.annotations == 1
        _, e, q = nbia.requests[-1]
        assert (e, q["IncludeAnnotation"], q["MD5Verification"]) == ("getDCMImage", "true", "true")
        import zipfile

        with zipfile.ZipFile(tmp_path / "s" / f"{uid}.zip") as zf:
            assert zf.read("069.xml") == xml
        assert json.loads((tmp_path / "s" / f"{uid}.json").read_text())["annotation_files"] == ["069.xml"]
        # an unlisted DICOM under an annotation's place is refused: it would escape verification
        nbia.series[uid].annotations = {"extra.dcm": next(iter(col[uid].files.values()))}
        [bad] = download_series(NbiaClient(nbia.server_url, retries=0), [uid], tmp_path / "t", annotations=True)
        assert bad.status == "failed" and "is a DICOM not listed in md5hashes.csv" in bad.message


# ------------------------------------------------------- studies across manifests (point 3)
def test_a_patient_split_over_manifests_keeps_every_study_and_every_published_name(demo_root, instance, samples):
    """NLST-like: T0 in one manifest, T1 and T2 in another, the later one run first."""
    col = build_collection(samples, {"100012": 3}, collection="NLST", series_per_study=1)
    by_study: dict[str, list[str]] = {}
    for u, s in col.items():
        by_study.setdefault(s.info["StudyInstanceUID"], []).append(u)
    t0, t1, t2 = sorted(by_study, key=lambda st: col[by_study[st][0]].info["StudyDate"])
    tcia_dir = demo_root / "downloads" / "tcia"
    with NbiaTestServer(series=fresh(col), name="nlst") as nlst:
        write_manifest(tcia_dir, "later.tcia", manifest_text(by_study[t1] + by_study[t2], nlst.server_url))
        write_manifest(tcia_dir, "baseline.tcia", manifest_text(by_study[t0], nlst.server_url))
        res = resources(demo_root, nlst)
        assert materialize_manifest(instance, res, "later").success
        first = {r["StudyInstanceUID"]: r["visit"] for r in read_resolved(tcia_dir / "later" / "resolved.csv")}
        assert first == {t1: "100012_ses-01", t2: "100012_ses-02"}
        result = materialize_manifest(instance, res, "baseline")
        assert result.success
        md = result.asset_materializations_for_node("tcia_series")[0].metadata
        assert "comes before visits already given" in md["out_of_order"].value
        # a re-run of the first manifest renames nothing
        assert materialize_manifest(instance, res, "later").success
    again = {r["StudyInstanceUID"]: r["visit"] for r in read_resolved(tcia_dir / "later" / "resolved.csv")}
    assert again == first
    base = read_resolved(tcia_dir / "baseline" / "resolved.csv")
    assert [(r["StudyInstanceUID"], r["visit"], r["session_label"]) for r in base] == \
        [(t0, "100012_ses-03", "100012_02")]
    register = read_studies(demo_root / "tabular" / "tcia_studies.csv")
    assert sorted((r["StudyInstanceUID"], r["visit"]) for r in register) == sorted(
        [(t0, "100012_ses-03"), (t1, "100012_ses-01"), (t2, "100012_ses-02")])


def test_in_date_order_the_split_patient_gets_date_labels(demo_root, instance, samples):
    col = build_collection(samples, {"100158": 3}, collection="NLST", series_per_study=1)
    ordered = sorted(col, key=lambda u: col[u].info["StudyDate"])
    tcia_dir = demo_root / "downloads" / "tcia"
    with NbiaTestServer(series=fresh(col), name="nlst") as nlst:
        write_manifest(tcia_dir, "t0.tcia", manifest_text(ordered[:1], nlst.server_url))
        write_manifest(tcia_dir, "t12.tcia", manifest_text(ordered[1:], nlst.server_url))
        for name in ("t0", "t12"):
            assert materialize_manifest(instance, resources(demo_root, nlst), name).success
    labels = [r["session_label"] for n in ("t0", "t12") for r in read_resolved(tcia_dir / n / "resolved.csv")]
    assert labels == ["100158", "100158_01", "100158_02"]


# --------------------------------------------------- one poisoned series (point 6), outages (7)
@pytest.mark.faults
def test_one_poisoned_series_leaves_the_other_visits_of_its_manifest_complete(demo_root, instance, samples):
    col = build_collection(samples, {"P-OK": 1, "P-BAD": 1, "P-OK2": 1}, series_per_study=2)
    poisoned = next(u for u, s in col.items() if s.info["PatientID"] == "P-BAD")
    tcia_dir = demo_root / "downloads" / "tcia"
    with NbiaTestServer(series=fresh(col)) as nbia:
        nbia.corrupt_next[poisoned] = 1000  # NBIA's md5 never matches this series
        write_manifest(tcia_dir, "basket.tcia", manifest_text(list(col), nbia.server_url))
        result = materialize_manifest(instance, resources(demo_root, nbia), "basket")
        message, md = failure_of(result)
    assert "1 of 6 series of basket could not be downloaded" in message and poisoned in message
    assert "1 visit(s) wait for them, 2 go on" in message
    assert md["visits_waiting"].value == 1
    assert {r["visit"] for r in read_resolved(tcia_dir / "basket" / "resolved.csv")} == {"POK_ses-01", "POK2_ses-01"}
    with (tcia_dir / "basket" / "series.csv").open(newline="") as fh:
        rows = {r["uid"]: r for r in csv.DictReader(fh)}
    assert rows[poisoned]["status"] == "failed" and rows[poisoned]["visit"] == ""
    assert "md5" in rows[poisoned]["message"] and rows[poisoned]["PatientID"] == "P-BAD"
    # the series table is a file the metadata links to, not an event's payload
    assert md["series_table"].value.endswith("series.csv") and "series" not in md


def test_retry_after_is_read_as_seconds_or_a_date():
    assert retry_after_seconds("120") == 120
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412460) == 20
    assert retry_after_seconds("soon") is None and retry_after_seconds(None) is None


@pytest.mark.faults
def test_an_outage_honours_retry_after_within_the_window(samples, tmp_path):
    col = build_collection(samples, {"OUT-1": 1}, series_per_study=1, files_per_series=2)
    with NbiaTestServer(series=fresh(col)) as nbia:
        nbia.outage(1.0, retry_after=1)
        waits = []
        import time as _time

        def sleep(s):
            waits.append(s)
            _time.sleep(s)

        client = NbiaClient(nbia.server_url, retries=0, backoff=0.01, retry_window=30, sleep=sleep)
        [res] = download_series(client, list(col), tmp_path / "series")
        assert res.status == "downloaded"
        assert waits and all(w == 1 for w in waits)  # the server's Retry-After, not the 0.01 s backoff


@pytest.mark.slow
@pytest.mark.faults
def test_a_maintenance_window_ends_with_every_visit_arriving_and_no_click(demo_root, instance, samples,
                                                                           monkeypatch):
    """The server answers 503 with Retry-After for longer than a run retries (time compressed:
    a 0.3 s window, a 2 s outage): the run fails, the sensor asks again once the retry delay
    has passed, and the visits arrive."""
    from dagster import Definitions, SensorResult

    from dicom_assets.definitions import tcia_sensor
    from dicom_assets.defs.jobs import tcia_job
    from dicom_assets.defs.tcia import tcia_series

    monkeypatch.setenv("TCIA_RETRY_FAILED_EVERY", "0")
    col = build_collection(samples, {"MAINT-1": 1, "MAINT-2": 1}, series_per_study=1, files_per_series=2)
    tcia_dir = demo_root / "downloads" / "tcia"
    with NbiaTestServer(series=fresh(col)) as nbia:
        write_manifest(tcia_dir, "maint.tcia", manifest_text(list(col), nbia.server_url))
        res = resources(demo_root, nbia, retry_window=0.3)
        ticker = Ticker(instance, tcia_sensor, res)

        def tick():
            result = ticker.tick()
            return (result.run_requests or []) if isinstance(result, SensorResult) else []

        job = Definitions(assets=[tcia_series], jobs=[tcia_job], resources=res).resolve_job_def(tcia_job.name)

        def run(req):  # what the daemon does with a request: a run of its job, tagged as the sensor asked
            return job.execute_in_process(partition_key=req.partition_key, instance=instance, tags=dict(req.tags),
                                          raise_on_error=False)

        assert tick() == []
        [req] = tick()
        nbia.outage(2.0, retry_after=1)
        assert not run(req).success
        assert not (tcia_dir / "maint" / "resolved.csv").exists()
        import time as _time

        _time.sleep(2.1)  # the maintenance ends
        [again] = [r for r in tick() if r.partition_key == "maint"]
        assert again.run_key.endswith(":retry1") and again.job_name == "tcia_download"
        assert run(again).success
        visits = sorted(r.partition_key for r in tick())
        assert visits == ["MAINT1_ses-01", "MAINT2_ses-01"]
        assert [r for r in tick() if r.job_name == "tcia_download"] == []  # a success is not retried


# ---------------------------------------------------------- manifest names (point 9)
def test_manifest_files_that_would_share_a_name_are_two_manifests(tmp_path):
    for n in ("Lung CT.tcia", "Lung_CT.tcia", "cart.tcia", "cart.csv", "CART.TCIA"):
        (tmp_path / n).write_text("x")
    files = manifest_files(tmp_path)
    assert len(files) == 5 and sorted(p.name for p in files.values()) == sorted(
        ["Lung CT.tcia", "Lung_CT.tcia", "cart.tcia", "cart.csv", "CART.TCIA"])
    assert manifest_name(tmp_path / "Lung_CT.tcia") == "Lung_CT" and manifest_name(tmp_path / "cart.tcia") == "cart"
    # a name never changes when another file arrives
    (tmp_path / "Lung  CT.tcia").write_text("x")
    assert {n: p.name for n, p in manifest_files(tmp_path).items() if p.name != "Lung  CT.tcia"} == \
        {n: p.name for n, p in files.items()}
    # a crafted stem equal to another's hashed name is refused naming both
    (tmp_path / f"{manifest_name(tmp_path / 'cart.csv')}.tcia").write_text("x")
    with pytest.raises(TciaManifestError, match="both map to manifest name"):
        manifest_files(tmp_path)


def test_participants_colliding_across_manifests_are_refused_naming_both(demo_root, instance, samples):
    col_a = build_collection(samples, {"TCGA-02-0001": 1}, series_per_study=1)
    col_b = build_collection(samples, {"TCGA-020-001": 1}, series_per_study=1, seed=7)
    tcia_dir = demo_root / "downloads" / "tcia"
    with NbiaTestServer(series={**fresh(col_a), **fresh(col_b)}) as nbia:
        write_manifest(tcia_dir, "a.tcia", manifest_text(list(col_a), nbia.server_url))
        write_manifest(tcia_dir, "b.tcia", manifest_text(list(col_b), nbia.server_url))
        assert materialize_manifest(instance, resources(demo_root, nbia), "a").success
        message, _ = failure_of(materialize_manifest(instance, resources(demo_root, nbia), "b"))
    assert "'TCGA-02-0001' and 'TCGA-020-001' both normalize" in message


# -------------------------------------------------------------- annotations (point 5)
@pytest.mark.slow
def test_annotations_ride_with_the_visit_into_tarball_datalad_and_xnat(demo_root, samples, instance, tmp_path):
    """Every real manifest says includeAnnotation=true: the annotation files NBIA sends with a
    series are in the visit's tarball (and its metadata), its DataLad dataset (retrievable from
    the tarball) and its XNAT session (resource ANNOTATIONS), never among its DICOMs."""
    import hashlib
    import subprocess
    import tarfile

    import jsonschema
    from dagster import materialize

    from dicom_assets.core.dataset import Dataset
    from dicom_assets.core.ids import parse_visit_key
    from dicom_assets.definitions import CHAIN_ASSETS
    from dicom_assets.defs.resources import XnatResource
    from dicom_assets.testing.xnat import XnatTestServer

    from .helpers import metadata_of
    from .test_archive import schema
    from .test_datalad import datalad

    coll = build_collection(samples, {"LIDC-IDRI-0001": 1}, collection="LIDC-IDRI")
    uids = sorted(coll)
    for k, uid in enumerate(uids):  # one name in both series: kept apart by series
        coll[uid].annotations = {"069.xml": lidc_annotation(uid, k)}
    coll[uids[0]].annotations["readme.txt"] = b"two readers\n"
    xsrv = XnatTestServer(samples.xnat_schemas, "admin", "pw", storage=tmp_path / "xnat").start()
    try:
        with NbiaTestServer(series=coll) as nbia:
            write_manifest(demo_root / "downloads" / "tcia", "lidc.tcia", manifest_text(uids, nbia.server_url))
            res = {**resources(demo_root, nbia), "xnat": XnatResource(server=xsrv.url, user="admin", password="pw")}
            assert materialize_manifest(instance, res, "lidc").success
            (visit,) = {r["visit"] for r in read_resolved(demo_root / "downloads" / "tcia" / "lidc" / "resolved.csv")}
            instance.add_dynamic_partitions("visits", [visit])
            result = materialize(CHAIN_ASSETS, partition_key=visit, resources=res, instance=instance)
            assert result.success
            again = materialize(CHAIN_ASSETS, partition_key=visit, resources=res, instance=instance)
    finally:
        xsrv.stop()
    expect = {f"{uid}/{name}": data for uid in uids for name, data in coll[uid].annotations.items()}
    ds = Dataset.open(demo_root)
    lay, v = ds.layout, parse_visit_key(visit)
    # organize: the annotations beside the flat DICOM folder, which holds DICOMs only
    notes_dir = lay.annotations_dir(v)
    assert {p.relative_to(notes_dir).as_posix(): p.read_bytes() for p in notes_dir.rglob("*") if p.is_file()} == expect
    assert all(p.suffix == ".dcm" for p in lay.dicom_dir(v).iterdir())
    with lay.organize_report_path(v).open(newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    assert sorted(r["dest"] for r in rows if r["decision"] == "annotation") == sorted(expect)
    # not "not_dicom": NBIA said what they are (its md5 list and licence are what is left out)
    assert {r["source"].rsplit("/", 1)[1] for r in rows if r["decision"] == "excluded"} <= {"md5hashes.csv", "LICENSE"}
    organized = metadata_of(result, "organized_dicoms")
    assert organized["annotations"] == len(expect)
    # the tarball: GNU tar reads them back, dated by the visit's latest DICOM time
    tar = lay.tarball_path(ds.study, v)
    listing = subprocess.run(["tar", "-tf", str(tar)], capture_output=True, text=True, check=True).stdout.split()
    assert sorted(n for n in listing if "/annotations/" in n) == sorted(f"{visit}/annotations/{k}" for k in expect)
    with tarfile.open(tar) as tf:
        members = {m.name: m for m in tf.getmembers() if m.isfile()}
        dicom_times = {m.mtime for n, m in members.items() if n.endswith(".dcm")}
        for k, data in expect.items():
            m = members[f"{visit}/annotations/{k}"]
            assert tf.extractfile(m).read() == data
            assert (m.mtime, m.mode, m.uname) == (max(dicom_times), 0o644, "root")
    # a re-run writes the same bytes
    assert metadata_of(again, "visit_tarball")["sha256"] == metadata_of(result, "visit_tarball")["sha256"]
    # the metadata: listed apart from the DICOMs, with their md5
    tj = json.loads(lay.metadata_tarball_path(ds.study, v).read_text())
    assert {a["path"]: a["md5"] for a in tj["annotations"]} == {
        f"{visit}/annotations/{k}": hashlib.md5(d).hexdigest() for k, d in expect.items()}
    assert tj["members"] == tj["dicoms"] + len(expect)
    jsonschema.validate(tj, schema("metadata_tarball"))
    dj = json.loads(lay.metadata_dicoms_path(ds.study, v).read_text())
    assert not [d for d in dj if "/annotations/" in d["path"]]
    # DataLad: a clone gets them out of the tarball, like the DICOMs
    clone = tmp_path / "clone"
    datalad("clone", str(lay.datalad_dir(ds.study, v)), str(clone), cwd=tmp_path)
    paths = [f"{visit}/annotations/{k}" for k in sorted(expect)]
    datalad("get", *paths, cwd=clone)
    assert {p: (clone / p).read_bytes() for p in paths} == {f"{visit}/annotations/{k}": d for k, d in expect.items()}
    assert metadata_of(result, "datalad_dataset")["annotation_files"] == len(expect)
    assert f"Annotation files: {len(expect)}" in lay.catalog_page_path.read_text()
    # XNAT: the session's resource ANNOTATIONS, by series
    label = metadata_of(result, "xnat_session")["session_label"]
    exp = xsrv.projects["QPN_DEMO"].subjects["LIDC-IDRI-0001"].experiments[label]
    assert {n: Path(p).read_bytes() for n, p in exp.resources["ANNOTATIONS"].items()} == expect
    assert metadata_of(again, "xnat_session")["session_resources"] == {"METADATA": 2, "ANNOTATIONS": len(expect)}
