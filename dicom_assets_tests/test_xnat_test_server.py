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


def test_dicomedit_subset_as_the_server_runs_it():
    """The DicomEdit 6 statements the test server runs (dicomedit.py): assignments with XNAT's
    variables and hashUID, removal, reject alone or in a conditional (= != ~ !~, ~ matching the
    whole value as Java's String.matches), comments; anything else is a script error
    (AnonymizationResultError)."""
    from pydicom.dataset import Dataset

    from dicom_assets.testing.xnat.dicomedit import DEFAULT_SITE_SCRIPT, REJECTED, ScriptError, hash_uid, run_script

    def ds(desc="T1w", uid="1.2.3"):
        d = Dataset()
        d.SeriesDescription, d.StudyInstanceUID, d.PatientName, d.PatientID = desc, uid, "Doe^J", "123"
        return d

    d = ds()
    assert run_script(DEFAULT_SITE_SCRIPT, d, "PRJ", "P1", "V1") is None
    assert (d.StudyDescription, str(d.PatientName), d.PatientID) == ("PRJ", "P1", "V1")
    d = ds()
    run_script('version "6.1"\n(0020,000D) := hashUID[(0020,000D)] // a comment\n- (0010,0020)\n', d, "", "", "")
    assert d.StudyInstanceUID == hash_uid("1.2.3") and "PatientID" not in d
    for script, desc, out in [
        ('(0008,103E) = "Dose Report" ? reject', "Dose Report", REJECTED),
        ('(0008,103E) = "Dose Report" ? reject', "Dose Report 2", None),
        ('(0008,103E) ~ "Dose" ? reject', "Dose Report", None),  # a whole match
        ('(0008,103E) ~ "Dose.*" ? reject', "Dose Report", REJECTED),
        ('(0008,103E) !~ "T1.*" ? reject', "T2w", REJECTED),
        ('(0008,103E) != "T1w" ? (0008,1030) := "kept" : reject', "T1w", REJECTED),
        ('reject\n(0008,103E) := "never"', "T1w", REJECTED),
    ]:
        assert run_script(script, ds(desc), "", "", "") == out, (script, desc)
    with pytest.raises(ScriptError):
        run_script("(0010,0010) := lowercase[(0010,0010)]", ds(), "", "", "")


@pytest.mark.parametrize("script,header,rejects", [
    ('(0008,103E) = "Dose Report" ? reject', {"SeriesDescription": "Dose Report"}, True),
    ('(0008,103E) = "Dose Report" ? reject', {"SeriesDescription": "T1w"}, False),
    ('(0008,0060) ~ "S[RC]" ? reject', {"Modality": "SR"}, True),
    ('(0008,0060) !~ "MR|CT" ? reject', {"Modality": "MR"}, False),
    ("reject", {}, True),
    ('(0008,103E) := "x"\n(0008,103E) = "x" ? reject', {"SeriesDescription": "T1w"}, None),  # set before: cannot say
    ('project = "P" ? reject', {}, None),
    ('(0008,103E) != "T1w" ? (0008,1030) := "k" : reject', {"SeriesDescription": "T1w"}, None),
    ('(0008,103E) := "rejected" // reject', {}, "none"),
])
def test_the_client_reads_a_scripts_rejects(script, header, rejects):
    """What the client makes of an anonymization script's ``reject`` (core/xnat/anon.py): the
    simple forms evaluated on a header, the others "may reject" (None), no rule at all ("none")."""
    from pydicom.dataset import Dataset

    from dicom_assets.core.xnat.anon import parse_rejects

    rules = parse_rejects("site-wide", 'version "6.1"\n' + script)
    if rejects == "none":
        assert rules == []
        return
    assert len(rules) == 1
    ds = Dataset()
    for k, v in header.items():
        setattr(ds, k, v)
    assert (rules[0].rejects(ds) if rules[0].evaluable else None) == rejects
