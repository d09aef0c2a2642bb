"""TCIA manifests against NBIA-compatible HTTP servers on loopback that answer as NBIA does
(CBIIT/NBIA-TCIA's restAPI classes; see dicom_assets/testing/nbia_server.py): two servers (main and
NLST-like), v1 and v4 paths, NBIA's zip layout and md5 list, cut-off streams, empty answers, 400s,
HTML and plain 500s. Zips of real DICOM files; parsing as the NBIA Data Retriever reads manifests;
resume, stable labels, and the chain to XNAT."""

import csv
import dataclasses
import io
import json
import threading
import time
import urllib.error
import urllib.request
import zipfile

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

UNKNOWN = "1.2.826.0.1.3680043.8.498.999999"
# A manifest as TCIA's portal exports it (NBIA's ManifestMaker): six header lines, then one
# SeriesInstanceUID per line, every line ended by "\n"; NLST's manifests name the nlst server.
PORTAL_NLST_HEADER = (
    "downloadServerUrl=https://nlst.cancerimagingarchive.net/nbia-download/servlet/DownloadServlet\n"
    "includeAnnotation=true\n"
    "noOfrRetry=4\n"
    "databasketId=manifest-1718000000000.tcia\n"
    "manifestVersion=3.0\n"
    "ListOfSeriesToDownload=\n"
)


@pytest.fixture(scope="module")
def collection(samples):
    # P-A: one study; P-B: three studies
    return build_collection(samples, {"TCIA-A": 1, "TCIA-B": 3})


@pytest.fixture(scope="module")
def nlst_collection(samples):
    return build_collection(samples, {"100012": 1, "100158": 1}, collection="NLST")


@pytest.fixture
def nbia(collection):
    with NbiaTestServer(series=fresh(collection)) as server:
        yield server


@pytest.fixture
def nlst(nlst_collection):
    with NbiaTestServer(series=fresh(nlst_collection), name="nlst") as server:
        yield server


def fresh(collection):
    """The collection's series as a server of one test may change them (public or not)."""
    return {u: dataclasses.replace(s) for u, s in collection.items()}


#: the zip endpoint the client asks for a series without annotations (V4_getImageWithMD5Hash)
IMAGE = "getImageWithMD5Hash"


def client_for(server, version="v4"):
    # an outage (502, 503) is retried for 0.2 s here, instead of minutes
    return NbiaClient(server.server_url, version, retries=3, backoff=0.01, retry_window=0.2)


def get(url):
    """(status, headers, body) of a GET, error answers included."""
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def write_manifest(tcia_dir, name, text):
    tcia_dir.mkdir(parents=True, exist_ok=True)
    (tcia_dir / name).write_bytes(text.encode())


def set_config(root, **fields):
    p = root / "global_config.json"
    data = json.loads(p.read_text())
    data.update(fields)
    p.write_text(json.dumps(data, indent=2))


def tcia_resources(root, *servers, **kw):
    from dicom_assets.defs.resources import DatasetResource, TciaResource

    return {"dataset": DatasetResource(root=str(root)),
            "tcia": TciaResource(servers=[s.server_url for s in servers], backoff=0.01, retries=2, **kw)}


def materialize_manifest(instance, resources, name):
    from dagster import materialize

    from dicom_assets.defs.tcia import TCIA_PARTITION_NAME, tcia_series

    if not instance.has_dynamic_partition(TCIA_PARTITION_NAME, name):
        instance.add_dynamic_partitions(TCIA_PARTITION_NAME, [name])
    return materialize([tcia_series], partition_key=name, resources=resources, instance=instance,
                       raise_on_error=False)


def failure_of(result):
    data = result.get_step_failure_events()[0].step_failure_data
    return data.error.message, (data.user_failure_data.metadata if data.user_failure_data else {})


# ------------------------------------------------------------------------ manifests (point 6)
def test_portal_manifest_is_written_and_read_as_nbia_does(tmp_path, nlst_collection):
    uids = list(nlst_collection)
    text = manifest_text(uids, "https://nlst.cancerimagingarchive.net", basket_id="manifest-1718000000000.tcia")
    assert text == PORTAL_NLST_HEADER + "".join(u + "\n" for u in uids)
    p = tmp_path / "manifest-1718000000000.tcia"
    p.write_text(text)
    m = parse_manifest(p)
    assert m.series == tuple(uids)
    assert m.server == "https://nlst.cancerimagingarchive.net"
    assert m.header["manifestVersion"] == "3.0" and m.header["databasketId"] == "manifest-1718000000000.tcia"


HEAD = "downloadServerUrl=https://nbia.cancerimagingarchive.net/nbia-download/servlet/DownloadServlet\n"


@pytest.mark.faults
@pytest.mark.parametrize("body, series", [
    # StandaloneDMDispatcher.getSeriesList: the list line in any case
    (HEAD + "manifestVersion=3.0\nlistofseriestodownload=\n1.2.3\n", ["1.2.3"]),
    # ... a line without digits (a 'Series ID' heading, as in NBIA's own deploy/*.tcia) skipped
    (HEAD + "manifestVersion=3.0\nListOfSeriesToDownload=\nSeries ID\n1.2.3\n\n1.2.4", ["1.2.3", "1.2.4"]),
    # ... a UID listed twice is one series; separators around a UID are not part of it
    (HEAD + "manifestVersion=3.0\nListOfSeriesToDownload=\n1.2.3,\n \"1.2.4\" \n1.2.3\n", ["1.2.3", "1.2.4"]),
    # java.util.Properties.load: 'key: value', 'key value', '!' and '#' comments, CR line ends
    ("! exported by hand\r# note\rdownloadServerUrl: https://nbia.cancerimagingarchive.net/nbia-download/servlet/"
     "DownloadServlet\rmanifestVersion 3.0\rListOfSeriesToDownload=\r1.2.3\r", ["1.2.3"]),
])
def test_manifest_is_read_as_the_data_retriever_reads_it(tmp_path, body, series):
    p = tmp_path / "m.tcia"
    p.write_bytes(body.encode())
    m = parse_manifest(p)
    assert list(m.series) == series
    assert m.server == "https://nbia.cancerimagingarchive.net"


@pytest.mark.faults
@pytest.mark.parametrize("body, message", [
    ("manifestVersion=3.0\nListOfSeriesToDownload=\n1.2.3\n", "no 'downloadServerUrl=' line"),
    ("downloadserverurl=https://nbia.cancerimagingarchive.net/nbia-download/servlet/DownloadServlet\n"
     "manifestVersion=3.0\nListOfSeriesToDownload=\n1.2.3\n", "line 1 has 'downloadserverurl'"),
    ("downloadServerUrl=https://nbia.example/nbia-api/services/v1\nmanifestVersion=3.0\nListOfSeriesToDownload=\n"
     "1.2.3\n", "line 1: downloadServerUrl 'https://nbia.example/nbia-api/services/v1' is not an NBIA download"),
    (HEAD + "ListOfSeriesToDownload=\n1.2.3\n", "no 'manifestVersion=' line"),
    (HEAD + "manifestVersion=2.0\nListOfSeriesToDownload=\n1.2.3\n", "line 2: manifestVersion '2.0' is not 3.x"),
    (HEAD + "manifestVersion=3.0\nListOfSeriesToDownload= \n1.2.3\n", "line 3: 'ListOfSeriesToDownload= ' is not"),
    (HEAD + "manifestVersion=3.0\nListOfSeriesToDownload=1.2.3\n", "line 3: 'ListOfSeriesToDownload=1.2.3' is not"),
    (HEAD + "manifestVersion=3.0\n", "no 'ListOfSeriesToDownload=' line"),
    (HEAD + "manifestVersion=3.0\nListOfSeriesToDownload=\n1.2.3\n1.2.3abc4\n",
     "line 5: '1.2.3abc4' is not a SeriesInstanceUID .*'1.2.34'"),
    (HEAD + "manifestVersion=3.0\nListOfSeriesToDownload=\n1..2\n", "line 4: '1..2' is not a DICOM UID"),
    (HEAD + "manifestVersion=3.0\nListOfSeriesToDownload=\nSeries ID\n", "lists no series"),
])
def test_manifest_the_retriever_cannot_use_is_refused_with_its_line(tmp_path, body, message):
    p = tmp_path / "bad.tcia"
    p.write_text(body)
    with pytest.raises(TciaManifestError, match=message.replace("(", r"\(")):
        parse_manifest(p)


def test_tcia_portal_csv_exports_are_manifests(tmp_path, collection):
    # the cart's "Download CSV" (NBIA v4 getSeriesMetadata, FormatOutput.toCsvQuoted) ...
    cols = ["PatientID", "PatientName", "StudyInstanceUID", "StudyDate", "SeriesInstanceUID", "Collection",
            "Modality", "ImageCount", "Authorized"]
    rows = ["\"" + "\",\"".join(cols) + "\""] + [
        "\"" + "\",\"".join([s.info["PatientID"], s.info["PatientID"], s.info["StudyInstanceUID"], "2020-01-06",
                            u, "DEMO-TCIA", "MR", "3", "1"]) + "\"" for u, s in collection.items()]
    p = tmp_path / "series-data1718000000000.csv"
    p.write_text("\n".join(rows) + "\n")
    m = parse_manifest(p)
    assert m.series == tuple(collection) and m.server is None
    # it names no server: its series are asked at every configured one, the first first
    from dicom_assets.core.tcia import manifest_servers

    assert manifest_servers(m, ["https://nbia.cancerimagingarchive.net/", "https://nlst.cancerimagingarchive.net"]) \
        == ["https://nbia.cancerimagingarchive.net", "https://nlst.cancerimagingarchive.net"]
    assert all(m.study_of[u] == s.info["StudyInstanceUID"] for u, s in collection.items())
    # ... and its older cart CSV (nbia-search csvFormatCart)
    old = ["Patient ID,Study UID,Study Date,Study Description,Series ID,Series Description,Number of images,"
           "File Size,Annotation File Size"] + [f"{s.info['PatientID']},{s.info['StudyInstanceUID']},01/06/2020,"
                                                f"MR,{u},T1,3,1000,0" for u, s in collection.items()]
    p.write_text("\r\n".join(old) + "\r\n")
    assert parse_manifest(p).series == tuple(collection)


def test_tcia_manifest_with_crlf_parses(tmp_path, collection):
    p = tmp_path / "m.tcia"
    p.write_bytes(manifest_text(list(collection), "https://nbia.cancerimagingarchive.net", crlf=True).encode())
    m = parse_manifest(p)
    assert m.series == tuple(collection)
    assert m.header["manifestVersion"] == "3.0"


# --------------------------------------------------------------------- hosts (point 1)
def test_nlst_manifest_downloads_from_the_server_it_names(demo_root, instance, nbia, nlst, nlst_collection):
    """A portal manifest naming the NLST-like server: its series come from there, not the main one."""
    tcia_dir = demo_root / "downloads" / "tcia"
    uids = list(nlst_collection)
    write_manifest(tcia_dir, "nlst-basket.tcia", manifest_text(uids, nlst.server_url))
    result = materialize_manifest(instance, tcia_resources(demo_root, nbia, nlst), "nlst-basket")
    assert result.success
    assert nbia.requests == []
    # the manifest says includeAnnotation=true: the Retriever's getDCMImage, annotations included
    assert {u for v, e, q in nlst.requests if e == "getDCMImage" for u in [q["SeriesInstanceUID"]]} == set(uids)
    rows = read_resolved(tcia_dir / "nlst-basket" / "resolved.csv")
    assert sorted({r["session_label"] for r in rows}) == ["100012", "100158"]
    # a manifest naming a server that is not configured is refused, nothing is asked anywhere
    write_manifest(tcia_dir, "elsewhere.tcia", manifest_text(uids, "http://127.0.0.1:9"))
    result = materialize_manifest(instance, tcia_resources(demo_root, nbia, nlst), "elsewhere")
    message, _ = failure_of(result)
    assert "names the server http://127.0.0.1:9, which is not one of the configured TCIA servers" in message


@pytest.mark.faults
def test_missing_series_fail_the_run_unless_the_dataset_allows_them(demo_root, instance, nbia, collection):
    tcia_dir = demo_root / "downloads" / "tcia"
    hidden = list(collection)[0]
    nbia.series[hidden].public = False  # known to NBIA, not public: getSeries answers nothing as well
    write_manifest(tcia_dir, "basket.tcia", manifest_text([*collection, UNKNOWN], nbia.server_url))
    result = materialize_manifest(instance, tcia_resources(demo_root, nbia), "basket")
    assert not result.success
    message, metadata = failure_of(result)
    assert "2 of 9 series of basket are unknown to" in message and "tcia_allow_missing_series" in message
    assert set(metadata["missing_series"].value.split("\n")) == {hidden, UNKNOWN}
    assert not (tcia_dir / "basket" / "resolved.csv").exists()
    set_config(demo_root, tcia_allow_missing_series=True)
    result = materialize_manifest(instance, tcia_resources(demo_root, nbia), "basket")
    assert result.success
    md = result.asset_materializations_for_node("tcia_series")[0].metadata
    assert set(md["missing_series"].value.split("\n")) == {hidden, UNKNOWN} and md["missing"].value == 2
    assert {r["SeriesInstanceUID"] for r in read_resolved(tcia_dir / "basket" / "resolved.csv")} == \
        set(collection) - {hidden}


# ------------------------------------------------------------------- API versions (point 2)
def test_v4_is_the_default_api_and_v1_an_option(nbia, collection, tmp_path):
    uids = list(collection)[:2]
    res = download_series(NbiaClient(nbia.server_url, retries=0), uids, tmp_path / "v4")
    assert [r.status for r in res] == ["downloaded", "downloaded"]
    assert {(v, e) for v, e, _ in nbia.requests} == {("v4", "getSeries"), ("v4", IMAGE)}
    nbia.requests.clear()
    res = download_series(NbiaClient(nbia.server_url, "v1", retries=0), uids, tmp_path / "v1")
    assert [r.status for r in res] == ["downloaded", "downloaded"]
    assert {(v, e) for v, e, _ in nbia.requests} == {("v1", "getSeries"), ("v1", "getImageWithMD5Hash")}


@pytest.mark.faults
def test_v4_answers_400_to_a_parameter_it_does_not_know(nbia, collection):
    uid = next(iter(collection))
    status, headers, body = get(f"{nbia.api('v4')}/getImage?SeriesInstanceUID={uid}&format=zip")
    assert status == 400 and body.startswith(b"Invalid query parameter: 'format'. Allowed parameters are: [")
    # V4_getImage sets no type on that answer: JAX-RS takes the method's @Produces
    assert headers["Content-Type"] == "application/octet-stream"
    status, headers, _ = get(f"{nbia.api('v4')}/getSeries?SeriesInstanceUID={uid}&IncludeMD5=yes")
    assert status == 400 and headers["Content-Type"] == "application/xml"  # V4_getSeries' first @Produces
    status, headers, body = get(f"{nbia.api('v4')}/getImage?NewFileNames=yes")  # checked after the parameters
    assert (status, headers["Content-Type"]) == (400, "application/json")
    assert body == b"A parameter, SeriesInstanceUID, is required for this API call."
    status, _, body = get(f"{nbia.api('v1')}/getImage?SeriesInstanceUID={uid}&format=zip")  # v1 ignores it
    assert status == 200 and zipfile.ZipFile(io.BytesIO(body)).namelist()[0] == "LICENSE"


# ------------------------------------------------------------------ zips and md5 (point 3)
def test_zips_are_laid_out_as_nbia_sends_them(nbia, collection):
    uid, s = next(iter(collection.items()))
    images = [f"{i:08d}.dcm" for i in range(1, s.info["ImageCount"] + 1)]

    def names(url):
        status, headers, body = get(url)
        assert status == 200 and headers["Content-Type"] == "application/octet-stream"
        assert headers["Transfer-Encoding"] == "chunked" and headers["Content-Disposition"].endswith(f'"{uid}.zip"')
        return zipfile.ZipFile(io.BytesIO(body))

    # no IncludeMD5: V4_getImage's includeHash.equalsIgnoreCase throws after the images, the zip
    # is closed complete, without the list
    assert names(f"{nbia.api('v4')}/getImage?SeriesInstanceUID={uid}").namelist() == ["LICENSE", *images]
    assert names(f"{nbia.api('v4')}/getImage?SeriesInstanceUID={uid}&IncludeMD5=YES").namelist()[-1] == "md5hashes.csv"
    assert names(f"{nbia.api('v1')}/getImage?SeriesInstanceUID={uid}").namelist() == ["LICENSE", *images]
    zf = names(f"{nbia.api('v4')}/getImage?SeriesInstanceUID={uid}&IncludeMD5=yes")
    assert zf.namelist() == ["LICENSE", *images, "md5hashes.csv"]
    rows = list(csv.reader(io.StringIO(zf.read("md5hashes.csv").decode())))
    assert rows[0] == ["Filename", "MD5Hash"] and sorted(r[0] for r in rows[1:]) == images
    assert names(f"{nbia.api('v1')}/getImageWithMD5Hash?SeriesInstanceUID={uid}").namelist() == [
        *images, "md5hashes.csv"]
    assert names(f"{nbia.api('v4')}/getImage?SeriesInstanceUID={uid}&NewFileNames=Yes").namelist() == [
        "LICENSE", *s.files]


@pytest.mark.faults
def test_md5_list_is_verified_as_nbia_writes_it(nbia, collection, tmp_path):
    uids = list(collection)
    nbia.corrupt_next[uids[0]] = 1  # once: the next download is right
    nbia.corrupt_next[uids[1]] = 10  # the stored file differs from NBIA's md5 every time
    res = {r.uid: r for r in download_series(client_for(nbia), uids[:3], tmp_path / "series")}
    assert res[uids[0]].status == "downloaded" and nbia.count(IMAGE, uids[0]) == 2
    assert res[uids[1]].status == "failed" and "00000001.dcm: md5" in res[uids[1]].message
    assert "of md5hashes.csv" in res[uids[1]].message
    assert res[uids[2]].status == "downloaded"
    kept = zipfile.ZipFile(tmp_path / "series" / f"{uids[0]}.zip").namelist()
    assert kept[-1] == "md5hashes.csv" and "LICENSE" not in kept  # V4_getImageWithMD5Hash writes none
    assert sorted(p.name for p in (tmp_path / "series").iterdir()) == sorted(
        [f"{uids[0]}.zip", f"{uids[0]}.json", f"{uids[2]}.zip", f"{uids[2]}.json"])


# ----------------------------------------------------------- streams and failures (point 4)
@pytest.mark.faults
def test_cut_off_stream_fails_only_its_series_and_is_retried(nbia, collection, tmp_path):
    uids = list(collection)
    nbia.cut_next[uids[0]] = 1  # once: the retry gets the zip
    nbia.cut_next[uids[1]] = 10  # more often than the client retries
    res = {r.uid: r for r in download_series(client_for(nbia), uids, tmp_path / "series")}
    assert res[uids[0]].status == "downloaded" and nbia.count(IMAGE, uids[0]) == 2
    assert res[uids[1]].status == "failed" and "stream cut off" in res[uids[1]].message
    assert "IncompleteRead" in res[uids[1]].message and nbia.count(IMAGE, uids[1]) == 4
    assert all(res[u].status == "downloaded" for u in uids[2:])
    assert not list((tmp_path / "series").glob(".*"))  # no temporary file left behind
    assert not (tmp_path / "series" / f"{uids[1]}.zip").exists()


@pytest.mark.faults
def test_zip_is_streamed_to_a_temporary_file_and_renamed_once_verified(nbia, collection, tmp_path):
    uid = next(iter(collection))
    nbia.pause[uid] = threading.Event()  # the server stops halfway until the event is set
    series = tmp_path / "series"
    done = []
    worker = threading.Thread(target=lambda: done.extend(download_series(client_for(nbia), [uid], series)))
    worker.start()
    try:
        deadline = time.monotonic() + 20
        partial = []
        while time.monotonic() < deadline and not partial:
            partial = [p for p in series.glob(f".{uid}.zip.*") if p.stat().st_size > 0]
            time.sleep(0.02)
        assert partial, "the first half of the zip is not on disk while the rest is on its way"
        assert not (series / f"{uid}.zip").exists()
    finally:
        nbia.pause[uid].set()
        worker.join(30)
    assert [r.status for r in done] == ["downloaded"]
    assert (series / f"{uid}.zip").is_file() and not list(series.glob(".*"))


@pytest.mark.faults
def test_resume_after_a_failed_download_fetches_only_what_is_missing(nbia, collection, tmp_path):
    uids = list(collection)
    flaky = uids[1]
    nbia.fail(flaky, 10, status=503)  # more 503s than the client retries
    first = {r.uid: r for r in download_series(client_for(nbia), uids, tmp_path / "series")}
    assert first[flaky].status == "failed" and "HTTP 503" in first[flaky].message
    assert all(first[u].status == "downloaded" for u in uids if u != flaky)
    assert not (tmp_path / "series" / f"{flaky}.zip").exists()  # no half file
    nbia.fail_next.clear()
    before = nbia.count(IMAGE)
    second = {r.uid: r for r in download_series(client_for(nbia), uids, tmp_path / "series")}
    assert second[flaky].status == "downloaded"
    assert all(second[u].status == "cached" for u in uids if u != flaky)
    assert nbia.count(IMAGE) - before == 1  # only the failed series again


@pytest.mark.faults
def test_html_and_plain_500s_are_retried_and_reported_readably(nbia, collection, tmp_path):
    uids = list(collection)
    nbia.fail(uids[0], 2, status=500, html=True)  # fewer than the retries: goes through
    nbia.fail(uids[1], 10, status=500, html=False)  # NBIA's own plain 500
    nbia.fail(uids[2], 10, status=502, html=True)  # a proxy's HTML page
    res = {r.uid: r for r in download_series(client_for(nbia), uids[:3], tmp_path / "series")}
    assert res[uids[0]].status == "downloaded"
    assert res[uids[1]].status == "failed"
    assert "HTTP 500 from" in res[uids[1]].message and "Server was not able to process your request" in \
        res[uids[1]].message
    assert res[uids[2]].status == "failed" and "HTTP 502 from" in res[uids[2]].message
    assert "HTTP Status 502 - Bad Gateway" in res[uids[2]].message and "<" not in res[uids[2]].message


@pytest.mark.faults
def test_a_zip_ended_early_is_retried_then_refused(nbia, collection, tmp_path):
    uids = list(collection)
    nbia.short_next[uids[0]] = 1  # an image missing on NBIA's storage once: the retry is whole
    nbia.short_next[uids[2]] = 10
    res = {r.uid: r for r in download_series(client_for(nbia), uids[:3], tmp_path / "series")}
    assert res[uids[0]].status == "downloaded"
    assert res[uids[2]].status == "failed" and "no md5hashes.csv" in res[uids[2]].message
    assert not (tmp_path / "series" / f"{uids[2]}.zip").exists()


# -------------------------------------------------------- unknown and non-public (point 5)
@pytest.mark.faults
def test_unknown_and_non_public_series_answer_as_nbia(nbia, collection):
    uid = next(iter(collection))
    nbia.series[uid].public = False
    for version in ("v1", "v4"):
        for series in (UNKNOWN, uid):
            status, headers, body = get(f"{nbia.api(version)}/getSeries?SeriesInstanceUID={series}")
            assert (status, body, headers["Content-Length"]) == (200, b"", "0")
    status, _, body = get(f"{nbia.api('v1')}/getImage?SeriesInstanceUID={uid}")
    assert status == 400 and body == f"Image with given SeriesInstanceUID,{uid}, is not in public domain.".encode()
    status, _, body = get(f"{nbia.api('v4')}/getImage?SeriesInstanceUID={UNKNOWN}")
    assert status == 400 and b"has not been granted the access to image" in body


@pytest.mark.faults
def test_unknown_series_is_missing_and_a_refused_one_fails_without_retry(nbia, collection, tmp_path):
    uids = list(collection)
    refused = uids[0]
    nbia.deny_image.add(refused)  # its metadata is public, its images are refused (400)
    res = {r.uid: r for r in download_series(client_for(nbia), [UNKNOWN, *uids], tmp_path / "series")}
    assert res[UNKNOWN].status == "missing" and "unknown to" in res[UNKNOWN].message
    assert res[refused].status == "failed" and "HTTP 400" in res[refused].message
    assert "has not been granted the access to image" in res[refused].message
    assert nbia.count(IMAGE, refused) == 1  # a 400 is not retried
    assert all(res[u].status == "downloaded" for u in uids[1:])


# ------------------------------------------------------------------- labels and the chain
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


@pytest.mark.slow
def test_manifest_in_downloads_ends_as_labelled_xnat_sessions(demo_root, samples, collection, instance, tmp_path):
    """Drop a .tcia manifest; the sensor and the jobs it starts take it to XNAT, no click."""
    from dagster import SensorResult, materialize

    from dicom_assets.definitions import CHAIN_ASSETS, tcia_sensor
    from dicom_assets.defs.resources import XnatResource
    from dicom_assets.defs.tcia import tcia_series
    from dicom_assets.testing.xnat import XnatTestServer

    set_config(demo_root, tcia_allow_missing_series=True)  # the unknown series below is reported, not fatal
    xsrv = XnatTestServer(samples.xnat_schemas, "admin", "pw", storage=tmp_path / "xnat").start()
    try:
        with NbiaTestServer(series=dict(collection)) as nbia:
            tcia_dir = demo_root / "downloads" / "tcia"
            tcia_dir.mkdir(parents=True)
            text = manifest_text([*collection, UNKNOWN], nbia.server_url, crlf=True)
            (tcia_dir / "demo-basket.tcia").write_bytes(text.encode())
            resources = {**tcia_resources(demo_root, nbia),
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
        assert len(exp.scans[str(s.info["SeriesNumber"])].files) == s.info["ImageCount"]
    assert sorted(project.resources["TCIA"]) == ["demo-basket.tcia", "resolved.csv"]
    # curation_status.tsv: each TCIA visit has its row, kept up to date by the chain's steps
    with (demo_root / "tabular" / "curation_status.tsv").open(newline="") as fh:
        status = {r["visit"]: r for r in csv.DictReader(fh, delimiter="\t")}
    for v in visits:
        assert status[v]["participant_id"] == ("TCIA-A" if v.startswith("TCIAA") else "TCIA-B")
        assert {k: status[v][k] for k in ("in_downloads", "in_raw_dicoms", "in_organized", "in_store", "in_xnat")} \
            == dict.fromkeys(("in_downloads", "in_raw_dicoms", "in_organized", "in_store", "in_xnat"), "true")


def _status(root):
    with (root / "tabular" / "curation_status.tsv").open(newline="") as fh:
        return {r["visit"]: r for r in csv.DictReader(fh, delimiter="\t")}


def test_tcia_visit_has_its_row_in_curation_status(demo_root):
    """One answer for a visit's source (core.sources): the assets' and the curation status's.
    A TCIA visit gets its row from the full recompute and from a step's update alike."""
    from dicom_assets.core.curation import update_curation_status, update_visit_status
    from dicom_assets.core.dataset import Dataset
    from dicom_assets.core.ids import parse_visit_key
    from dicom_assets.core.sources import visit_source
    from dicom_assets.core.tcia import TciaVisit

    ds = Dataset.open(demo_root)
    lay = ds.layout
    update_curation_status(ds)
    before = _status(demo_root)
    assert "TCIAA_ses-01" not in before
    lay.tcia_root.mkdir(parents=True)
    (lay.tcia_root / "basket.tcia").write_text("")
    write_resolved(lay.tcia_resolved_path("basket"),
                   [TciaVisit("TCIA-A", "1.2.3", "TCIAA_ses-01", "TCIA-A", ("1.2.3.4", "1.2.3.5"))])
    lay.tcia_series_dir("basket").mkdir(parents=True)
    lay.tcia_series_zip("basket", "1.2.3.4").write_bytes(b"zip")

    src = visit_source(ds, "TCIAA_ses-01")
    assert (src.kind, src.subject, src.session_label, src.raw_participant) == ("tcia", "TCIA-A", "TCIA-A", "TCIA-A")
    assert src.project_files == {"TCIA": [lay.tcia_root / "basket.tcia", lay.tcia_resolved_path("basket")]}
    assert [i.path for i in src.dumps(ds)] == [lay.tcia_series_zip("basket", "1.2.3.4")]
    assert src.missing_zips() == [lay.tcia_series_zip("basket", "1.2.3.5")]
    manifest_visit = visit_source(ds, "QPN001_ses-01")
    assert (manifest_visit.kind, manifest_visit.subject, manifest_visit.raw_participant) == ("dump", "QPN001", "QPN_001")
    assert visit_source(ds, "NOBODY_ses-01").kind == "unknown"

    # a step of the TCIA visit: its row appended, the others untouched
    update_visit_status(ds, parse_visit_key("TCIAA_ses-01"))
    after = _status(demo_root)
    assert {k: v for k, v in after.items() if k != "TCIAA_ses-01"} == before
    row = after["TCIAA_ses-01"]
    assert (row["participant_id"], row["session_id"], row["in_downloads"], row["in_store"]) == \
        ("TCIA-A", "ses-01", "false", "false")  # one of its two series zips is missing
    # the full recompute gives the same rows; with the second zip there, in_downloads is true
    update_curation_status(ds)
    assert _status(demo_root) == after
    lay.tcia_series_zip("basket", "1.2.3.5").write_bytes(b"zip")
    update_curation_status(ds)
    assert _status(demo_root)["TCIAA_ses-01"]["in_downloads"] == "true"
    # a step's update keeps in_downloads unless it knows it, as for a manifest visit
    update_visit_status(ds, parse_visit_key("TCIAA_ses-01"), in_downloads=False)
    assert _status(demo_root)["TCIAA_ses-01"]["in_downloads"] == "false"
