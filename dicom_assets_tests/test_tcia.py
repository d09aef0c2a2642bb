"""TCIA manifests: parsing, downloads through a real NBIA-compatible HTTP server on loopback
(zips of real DICOM files), resume, stable labels, and the chain to XNAT."""

import csv

import pytest

from dicom_assets.core.tcia import (
    NbiaClient,
    TciaManifestError,
    download_series,
    group_visits,
    parse_manifest,
    read_resolved,
    write_resolved,
)
from dicom_assets.testing.nbia_server import NbiaTestServer, build_collection, manifest_text

from .helpers import Ticker


@pytest.fixture(scope="module")
def collection(samples):
    # P-A: one study; P-B: three studies
    return build_collection(samples, {"TCIA-A": 1, "TCIA-B": 3})


@pytest.fixture
def nbia(collection):
    with NbiaTestServer(series=dict(collection)) as server:
        yield server


def client_for(server):
    return NbiaClient(server.url, retries=3, backoff=0.01)


def test_tcia_manifest_with_crlf_parses(tmp_path, collection):
    p = tmp_path / "m.tcia"
    p.write_bytes(manifest_text(list(collection), "https://nbia.example/api", crlf=True).encode())
    m = parse_manifest(p)
    assert m.series == tuple(collection)
    assert m.header["downloadServerUrl"] == "https://nbia.example/api"
    assert m.header["manifestVersion"] == "3.0"


def test_csv_manifest_form(tmp_path, collection):
    p = tmp_path / "m.csv"
    rows = ["study_instance_uid,series_instance_uid"] + [f"{s.info['StudyInstanceUID']},{u}"
                                                          for u, s in collection.items()]
    p.write_text("\r\n".join(rows) + "\r\n")
    m = parse_manifest(p)
    assert m.series == tuple(collection)
    assert all(m.study_of[u] == s.info["StudyInstanceUID"] for u, s in collection.items())


@pytest.mark.faults
@pytest.mark.parametrize("body, message", [
    ("downloadServerUrl=x\nListOfSeriesToDownload=\n1.2.3\nnot-a-uid\n", "line 4: 'not-a-uid' is not a DICOM UID"),
    ("downloadServerUrl=x\nListOfSeriesToDownload=\n1.2.3\n1.2.4\n1.2.3\n", "line 5: series 1.2.3 already listed on line 3"),
    ("downloadServerUrl=x\nthis line is wrong\nListOfSeriesToDownload=\n1.2.3\n", "line 2: expected 'key=value'"),
    ("downloadServerUrl=x\nmanifestVersion=3.0\n", "no 'ListOfSeriesToDownload=' line"),
    ("downloadServerUrl=x\nListOfSeriesToDownload=\n", "lists no series"),
])
def test_malformed_manifest_gets_a_line_numbered_error(tmp_path, body, message):
    p = tmp_path / "bad.tcia"
    p.write_text(body)
    with pytest.raises(TciaManifestError, match=message.replace(".", r"\.").replace("(", r"\(")):
        parse_manifest(p)


def test_labels_for_one_and_three_studies_do_not_depend_on_order(nbia, collection, tmp_path):
    uids = list(collection)
    results = download_series(client_for(nbia), uids, tmp_path / "series")
    assert {r.status for r in results} == {"downloaded"}
    visits = group_visits(results)
    again = group_visits(list(reversed(results)))  # another download order
    assert visits == again
    labels = {v.session_label: v for v in visits}
    assert sorted(labels) == ["TCIA-A", "TCIA-B", "TCIA-B_01", "TCIA-B_02"]
    assert labels["TCIA-A"].visit == "TCIAA_ses-01"
    assert [labels[k].visit for k in ("TCIA-B", "TCIA-B_01", "TCIA-B_02")] == [
        "TCIAB_ses-01", "TCIAB_ses-02", "TCIAB_ses-03"]
    # each visit holds the series of one study, ordered by StudyDate
    for v in visits:
        assert {collection[s].info["StudyInstanceUID"] for s in v.series} == {v.study_uid}
    dates = [collection[labels[k].series[0]].info["StudyDate"] for k in ("TCIA-B", "TCIA-B_01", "TCIA-B_02")]
    assert dates == sorted(dates)
    # the resolved manifest
    out = tmp_path / "resolved.csv"
    write_resolved(out, visits)
    rows = read_resolved(out)
    assert len(rows) == len(uids)
    assert {r["SeriesInstanceUID"]: r["session_label"] for r in rows} == {
        s: v.session_label for v in visits for s in v.series}
    assert list(csv.reader(out.open()))[0] == ["SeriesInstanceUID", "PatientID", "StudyInstanceUID", "visit",
                                               "session_label"]


@pytest.mark.faults
def test_resume_after_a_failed_download_fetches_only_what_is_missing(nbia, collection, tmp_path):
    uids = list(collection)
    flaky = uids[1]
    nbia.fail_next[flaky] = 10  # more 503s than the client retries
    first = {r.uid: r for r in download_series(client_for(nbia), uids, tmp_path / "series")}
    assert first[flaky].status == "failed" and "503" in first[flaky].message
    assert all(first[u].status == "downloaded" for u in uids if u != flaky)
    assert not (tmp_path / "series" / f"{flaky}.zip").exists()  # no half file
    nbia.fail_next.clear()
    before = nbia.count("getImage")
    second = {r.uid: r for r in download_series(client_for(nbia), uids, tmp_path / "series")}
    assert second[flaky].status == "downloaded"
    assert all(second[u].status == "cached" for u in uids if u != flaky)
    assert nbia.count("getImage") - before == 1  # only the failed series again


@pytest.mark.faults
def test_transient_errors_are_retried_and_a_short_zip_is_refused(nbia, collection, tmp_path):
    uids = list(collection)
    nbia.fail_next[uids[0]] = 2  # fewer than the retries: goes through
    nbia.truncate_next[uids[2]] = 1  # one file short of ImageCount: refused, not kept
    res = {r.uid: r for r in download_series(client_for(nbia), uids[:3], tmp_path / "series")}
    assert res[uids[0]].status == "downloaded"
    assert res[uids[2]].status == "failed" and "ImageCount" in res[uids[2]].message
    assert not (tmp_path / "series" / f"{uids[2]}.zip").exists()


@pytest.mark.faults
def test_unknown_series_is_reported_and_the_rest_goes_on(nbia, collection, tmp_path):
    uids = list(collection)
    unknown = "1.2.826.0.1.3680043.8.498.999999"
    res = {r.uid: r for r in download_series(client_for(nbia), [unknown, *uids], tmp_path / "series")}
    assert res[unknown].status == "missing" and "unknown" in res[unknown].message
    assert all(res[u].status == "downloaded" for u in uids)
    assert len(group_visits(list(res.values()))) == 4


def test_manifest_in_downloads_ends_as_labelled_xnat_sessions(demo_root, samples, collection, instance, tmp_path,
                                                              monkeypatch):
    """Drop a .tcia manifest; the sensor and the jobs it starts take it to XNAT, no click."""
    from dagster import SensorResult, materialize

    from dicom_assets.definitions import CHAIN_ASSETS, tcia_sensor
    from dicom_assets.defs.publish import XnatResource
    from dicom_assets.defs.resources import DatasetResource
    from dicom_assets.defs.tcia import TciaResource, tcia_series
    from dicom_assets.testing.xnat_server import XnatTestServer

    xsrv = XnatTestServer(samples.xnat_schemas, "admin", "pw", storage=tmp_path / "xnat").start()
    try:
        with NbiaTestServer(series=dict(collection)) as nbia:
            tcia_dir = demo_root / "downloads" / "tcia"
            tcia_dir.mkdir(parents=True)
            unknown = "1.2.826.0.1.3680043.8.498.424242"
            text = manifest_text([*collection, unknown], nbia.url, crlf=True)
            (tcia_dir / "demo-basket.tcia").write_bytes(text.encode())
            resources = {"dataset": DatasetResource(root=str(demo_root)),
                         "tcia": TciaResource(api_url=nbia.url, backoff=0.01),
                         "xnat": XnatResource(server=xsrv.url, user="admin", password="pw")}
            ticker = Ticker(instance, tcia_sensor, resources)

            def tick():
                result = ticker.tick()
                return (result.run_requests or []) if isinstance(result, SensorResult) else []

            assert tick() == []  # seen once: waits for the manifest to settle
            reqs = tick()
            assert [(r.job_name, r.partition_key) for r in reqs] == [("tcia_download", "demo-basket")]
            assert materialize([tcia_series], partition_key="demo-basket", resources=resources,
                               instance=instance).success
            reqs = tick()
            visits = sorted(r.partition_key for r in reqs)
            assert visits == ["TCIAA_ses-01", "TCIAB_ses-01", "TCIAB_ses-02", "TCIAB_ses-03"]
            assert {r.job_name for r in reqs} == {"visit_chain"}
            for v in visits:  # what the daemon would run for each request
                assert materialize(CHAIN_ASSETS, partition_key=v, resources=resources, instance=instance).success
            assert tick() == []  # nothing twice
    finally:
        xsrv.stop()
    # the original manifest untouched, the resolved one beside the visits
    assert (tcia_dir / "demo-basket.tcia").read_bytes() == text.encode()
    rows = read_resolved(tcia_dir / "demo-basket" / "resolved.csv")
    assert {r["SeriesInstanceUID"] for r in rows} == set(collection)  # the unknown series reported, not kept
    # XNAT: subject = PatientID, sessions labelled the XNAT-TCIA way, every series with its files
    project = xsrv.projects["QPN_DEMO"]
    assert sorted(project.subjects) == ["TCIA-A", "TCIA-B"]
    assert sorted(project.subjects["TCIA-B"].experiments) == ["TCIA-B", "TCIA-B_01", "TCIA-B_02"]
    assert sorted(project.subjects["TCIA-A"].experiments) == ["TCIA-A"]
    for uid, s in collection.items():
        label = next(r["session_label"] for r in rows if r["SeriesInstanceUID"] == uid)
        exp = project.subjects[s.info["PatientID"]].experiments[label]
        assert len(exp.scans[s.info["SeriesNumber"]].files) == s.info["ImageCount"]
    assert sorted(project.resources["TCIA"]) == ["demo-basket.tcia", "resolved.csv"]
