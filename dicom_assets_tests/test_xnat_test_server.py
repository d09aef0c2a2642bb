"""The XNAT test server's own rules, each against the XNAT class it follows (named in
dicom_assets/testing/xnat/): how its session builder numbers scans and picks resources, how its
series import filter reads headers, and its routing table. The upload tests (test_xnat.py,
test_xnat_session_building.py) see the server only through XNAT's REST API."""

from __future__ import annotations

import pytest
from pydicom.uid import MRImageStorage, SecondaryCaptureImageStorage

from dicom_assets.testing.xnat.importer import (
    PRIMARY_SOP_UIDS,
    SeriesSeen,
    merged_scan_ids,
    resource_label,
    scan_ids,
    series_number_key,
)


def test_scan_ids_as_dicom_session_builder_numbers_them():
    seen = [SeriesSeen("3", "1.2.9", frozenset({"MR"})), SeriesSeen("3", "1.2.10", frozenset({"MR"})),
            SeriesSeen("4", "1.2.4", frozenset({"MR"})), SeriesSeen("3", "1.2.11", frozenset({"CT"}))]
    ids = scan_ids(seen)
    # a shared number: <number>-<modality><index> per UID in string order, counted per modality
    assert ids == {"1.2.10": "3-MR1", "1.2.9": "3-MR2", "1.2.11": "3-CT1", "1.2.4": "4"}
    assert "3" not in ids.values()


@pytest.mark.parametrize("number,uid,key", [
    ("7", "1.2.3", "7"), ("", "1.2.840.113619.2.1", "1_2_840_113619_2_1"), ("+5", "1.2", "_5"),
    ("  ", "1.2-3", "1_2_3"),
])
def test_series_number_key(number, uid, key):
    assert series_number_key(number, uid) == key


def test_merged_scan_ids_follow_correct_scan_id():
    existing = {"1.1": "3", "1.2": "4"}
    # a UID the session has keeps its scan; a new series whose ID is taken is renamed
    got = merged_scan_ids({"1.1": "5", "1.3": "4", "1.4": "6"}, {"1.1": "MR", "1.3": "MR", "1.4": "MR"}, existing)
    assert got == {"1.1": "3", "1.3": "4-MR1", "1.4": "6"}
    # Java's matches() is a full match: only a one-character stem is kept
    assert merged_scan_ids({"2.1": "3-MR1"}, {"2.1": "MR"}, {"9": "3-MR1"}) == {"2.1": "3-MR2"}
    assert merged_scan_ids({"2.1": "12-MR1"}, {"2.1": "MR"}, {"9": "12-MR1"}) == {"2.1": "12-MR1-MR1"}


def test_secondary_resource_follows_the_primary_sop_list():
    assert resource_label(MRImageStorage) == "DICOM"
    assert resource_label(SecondaryCaptureImageStorage) == "secondary"
    assert resource_label("1.2.840.10008.5.1.4.1.1.88.67") == "secondary"  # X-Ray Radiation Dose SR
    assert resource_label(SecondaryCaptureImageStorage, separate_secondary=False) == "DICOM"
    assert "1.2.840.10008.5.1.4.1.1.2" in PRIMARY_SOP_UIDS and len(PRIMARY_SOP_UIDS) >= 40  # CT, and the list


def test_series_filters_read_the_first_300_characters_of_a_header():
    """RegExBasedSeriesImportFilter reads a header through getValueAsString(characterSet, 300):
    a pattern that matches only past character 300 matches nothing, in the test server's filter
    and in the client's reading of it alike; a blank value is "" (EXISTS holds)."""
    from pydicom.dataset import Dataset

    from dicom_assets.core.xnat import parse_series_filter
    from dicom_assets.testing.xnat import SeriesImportFilter

    ds = Dataset()
    ds.SeriesDescription = "x" * 300 + "LOCALIZER"
    server_side = SeriesImportFilter("LOCALIZER", mode="blacklist")
    client_side = parse_series_filter("site-wide", '{"mode": "blacklist", "list": "LOCALIZER"}')
    assert server_side.includes(ds) and client_side.keeps(ds)
    ds.SeriesDescription = "LOCALIZER " + "x" * 300
    assert not server_side.includes(ds) and not client_side.keeps(ds)
    ds.SeriesDescription = " "
    assert not SeriesImportFilter("EXISTS").includes(ds) and SeriesImportFilter("!EXISTS").includes(ds)


# --------------------------------------------------------------------------- the routing table
@pytest.mark.parametrize("method,path,handler", [
    ("POST", "/data/services/import", "/data/services/import"),
    ("GET", "/data/projects/P1/config/seriesImportFilter/config", "/data(?:/projects/([^/]+))?/config/([^/]+)/(.+)"),
    ("GET", "/data/projects/P1/subjects/S1/experiments/E1/scans", "/data/projects/([^/]+)/subjects/([^/]+)(/.*)?"),
    ("PUT", "/data/projects/P1/subjects/S1", "/data/projects/([^/]+)/subjects/([^/]+)"),
    ("GET", "/data/projects/P1/prearchive_code", "/data/projects/([^/]+)/prearchive_code(?:/([^/]+))?"),
    ("GET", "/data/experiments/E1/scans/2/resources/DICOM/files", "/data/experiments/([^/]+)(/.*)?"),
])
def test_each_uri_has_one_route_as_xnat_application_attaches_it(method, path, handler):
    """XNATApplication attaches each URI to one restlet resource: the first row of the table
    that matches the method and the whole path answers."""
    from dicom_assets.testing.xnat.routes import ROUTES

    first = next(r for r in ROUTES if r.pattern.fullmatch(path) and (r.methods is None or method in r.methods))
    assert first.pattern.pattern == handler


def test_an_unknown_uri_needs_a_login_then_is_not_found(samples, tmp_path):
    import requests

    from dicom_assets.testing.xnat import XnatTestServer

    srv = XnatTestServer(samples.xnat_schemas, "u", "pw", storage=tmp_path / "s").start()
    try:
        assert requests.get(f"{srv.url}/data/nothing", timeout=10).status_code == 401
        r = requests.get(f"{srv.url}/data/nothing", auth=("u", "pw"), timeout=10)
        assert r.status_code == 404 and r.headers["Content-Type"] == "text/html"
        # Restlet's status page (StatusFilter), as XNAT answers an error status it set with a description
        assert r.text.startswith("<html>\n<head>\n   <title>Status page</title>\n</head>\n<body>\n<h3>Not found: "
                                 "/data/nothing</h3><p>You can get technical details <a href=")
        # /data/archive/... is the same URI as /data/... (XNATApplication.attachArchiveURI)
        requests.put(f"{srv.url}/data/projects/P1", auth=("u", "pw"), timeout=10).raise_for_status()
        r = requests.get(f"{srv.url}/data/archive/projects/P1", params={"format": "json"}, auth=("u", "pw"), timeout=10)
        assert r.json()["items"][0]["data_fields"]["ID"] == "P1"
        assert requests.get(f"{srv.url}/data/services/import", auth=("u", "pw"), timeout=10).status_code == 404
    finally:
        srv.stop()


def test_the_session_type_follows_the_lead_modality():
    """The data type a built session gets (PrearcSessionArchiver compares it under
    preventCrossModalityMerge): the modality most primary files hold; secondary captures do not
    count; a modality without a session type of its own is otherDicom."""
    from pydicom.dataset import Dataset
    from pydicom.uid import CTImageStorage

    from dicom_assets.testing.xnat.importer import session_xsi_type

    def ds(modality, sop=MRImageStorage):
        d = Dataset()
        d.Modality, d.SOPClassUID = modality, sop
        return ("f", b"", d)

    assert session_xsi_type([ds("MR"), ds("MR"), ds("OT", SecondaryCaptureImageStorage)] * 2) == "xnat:mrSessionData"
    assert session_xsi_type([ds("CT", CTImageStorage), ds("OT", SecondaryCaptureImageStorage)]) == "xnat:ctSessionData"
    assert session_xsi_type([ds("OT", SecondaryCaptureImageStorage)]) == "xnat:otherDicomSessionData"
    assert session_xsi_type([ds("SR", SecondaryCaptureImageStorage)], separate_secondary=False) == \
        "xnat:otherDicomSessionData"
