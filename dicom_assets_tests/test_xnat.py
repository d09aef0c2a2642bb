"""The xnat_session asset through the real xnatpy client against the XNAT-compatible test
server on loopback, which really unzips and parses what it receives and fails where XNAT
fails (the XNAT class each behaviour follows is named in dicom_assets/testing/xnat_server.py).

The visit's archive chain runs once per test session (``archived_demo``); each test gets its
own copy of that root and runs xnat_session alone, except the first, which runs the whole
chain with XNAT as the sensor's run does."""

import json
import secrets
import shutil

import pydicom
import pytest
from dagster import EnvVar

from dicom_assets.defs.resources import XnatResource
from dicom_assets.testing.xnat_server import XnatTestServer

from .conftest import ARCHIVED_VISIT
from .helpers import AssetSelection, checks_of, metadata_of, run_chain

VISIT = ARCHIVED_VISIT
USER = "site-uploader"


@pytest.fixture
def demo_root(archived_demo, tmp_path):
    """The demo root with VISIT archived (tarball, metadata), this test's own copy."""
    root = tmp_path / "dataset"
    shutil.copytree(archived_demo, root, symlinks=True)
    return root


@pytest.fixture
def password():
    return "pw-" + secrets.token_hex(8)


@pytest.fixture
def server(samples, password, tmp_path):
    srv = XnatTestServer(samples.xnat_schemas, USER, password, storage=tmp_path / "xnat-storage").start()
    yield srv
    srv.stop()


@pytest.fixture
def xnat_res(server, password, monkeypatch):
    monkeypatch.setenv("XNAT_USER", USER)
    monkeypatch.setenv("XNAT_PASSWORD", password)
    return XnatResource(server=server.url, user=EnvVar("XNAT_USER"), password=EnvVar("XNAT_PASSWORD"))


def kept_series(demo_root):
    dj = json.loads((demo_root / "store/QPN/QPN001_ses-01_metadata_dicoms.json").read_text())
    out = {}
    for d in dj:
        out[str(d["SeriesNumber"])] = out.get(str(d["SeriesNumber"]), 0) + 1
    return out


def only_xnat():
    return AssetSelection.assets("xnat_session")


@pytest.mark.slow
def test_visit_arrives_in_xnat_and_rerun_does_not_duplicate(instance, demo_root, server, xnat_res):
    result = run_chain(instance, demo_root, VISIT, xnat=xnat_res)
    assert result.success
    md = metadata_of(result, "xnat_session")
    assert md["status"] == "uploaded" and md["project"] == "QPN_DEMO"
    assert md["xnat_session"].startswith(server.url + "/data/projects/QPN_DEMO/")
    assert "QPN_DEMO" in server.projects  # created on the fly
    exp = server.projects["QPN_DEMO"].subjects["QPN001"].experiments["QPN001_ses-01"]
    on_server = {sid: len(scan.files) for sid, scan in exp.scans.items()}
    assert on_server == kept_series(demo_root)
    assert md["files_sent"] == sum(on_server.values())
    # what arrived is real DICOM of this visit, and excluded series never left the site
    descs = {scan.series_description for scan in exp.scans.values()}
    assert "T1w_MPRAGE" in descs and not any("Localizer" in d or "AAHEAD" in d for d in descs)
    one = next(iter(next(iter(exp.scans.values())).files.values()))
    assert pydicom.dcmread(one, stop_before_pixels=True).PatientID == "QPN_001"
    assert set(exp.resources["METADATA"]) == {"QPN001_ses-01_metadata_tarball.json", "QPN001_ses-01_metadata_dicoms.json"}
    assert checks_of(result)["scans_match_series"] is True
    marker = json.loads((demo_root / "logs/xnat/QPN001_ses-01.json").read_text())
    assert marker["labels"]["session"] == {"given": "QPN001_ses-01", "xnat": "QPN001_ses-01"}
    assert marker["filtered_by_xnat"] == [] and marker["warnings"] == []
    assert server.prearchive == {}  # staged in the prearchive, archived, row gone

    again = run_chain(instance, demo_root, VISIT, xnat=xnat_res, selection=only_xnat())
    assert metadata_of(again, "xnat_session")["status"] == "already_archived"
    assert server.imports == 1 and len(server.projects["QPN_DEMO"].subjects["QPN001"].experiments) == 1
    assert server.prearchive == {}


@pytest.mark.faults
@pytest.mark.parametrize("status", ["500", "503"])
@pytest.mark.slow
def test_server_error_on_first_attempt_is_retried(instance, demo_root, server, xnat_res, status):
    server.inject("/data/services/import", status)
    result = run_chain(instance, demo_root, VISIT, xnat=xnat_res, selection=only_xnat())
    assert result.success and metadata_of(result, "xnat_session")["status"] == "uploaded"
    assert sum(1 for m, p in server.requests if p == "/data/services/import") == 2  # refused, then retried
    assert server.imports == 1
    assert any(e.event_type_value == "STEP_UP_FOR_RETRY" for e in result.all_events)


@pytest.mark.faults
@pytest.mark.slow
def test_timeout_is_retried_without_a_duplicate_session(instance, demo_root, server, password, monkeypatch):
    """XNAT answers too late (it still archives the first upload): the retry finds the session
    complete and sends nothing again."""
    server.slow_seconds = 1.5  # archived at ~2 s; the retry (2 s delay) looks after that
    server.inject("/data/services/import", "slow")
    res = XnatResource(server=server.url, user=USER, password=password, timeout=1)
    result = run_chain(instance, demo_root, VISIT, xnat=res, selection=only_xnat())
    assert result.success
    assert any(e.event_type_value == "STEP_UP_FOR_RETRY" for e in result.all_events)
    exps = server.projects["QPN_DEMO"].subjects["QPN001"].experiments
    assert list(exps) == ["QPN001_ses-01"]
    assert {k: len(s.files) for k, s in exps["QPN001_ses-01"].scans.items()} == kept_series(demo_root)


@pytest.mark.faults
@pytest.mark.slow
def test_dropped_connection_mid_upload_leaves_no_half_session(instance, demo_root, server, xnat_res):
    server.inject("/data/services/import", "drop")
    result = run_chain(instance, demo_root, VISIT, xnat=xnat_res, selection=only_xnat())
    assert result.success
    exps = server.projects["QPN_DEMO"].subjects["QPN001"].experiments
    assert list(exps) == ["QPN001_ses-01"]
    assert {k: len(s.files) for k, s in exps["QPN001_ses-01"].scans.items()} == kept_series(demo_root)


@pytest.mark.faults
def test_wrong_password_fails_at_once_with_a_clear_message(instance, demo_root, server, monkeypatch, capsys):
    monkeypatch.setenv("XNAT_USER", USER)
    monkeypatch.setenv("XNAT_PASSWORD", "not-the-password-123")
    bad = XnatResource(server=server.url, user=EnvVar("XNAT_USER"), password=EnvVar("XNAT_PASSWORD"))
    result = run_chain(instance, demo_root, VISIT, xnat=bad, selection=only_xnat(), raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert "check XNAT_USER/XNAT_PASSWORD" in failure.event_specific_data.error.message
    assert not any(e.event_type_value == "STEP_UP_FOR_RETRY" for e in result.all_events)
    assert sum(1 for m, p in server.requests if p == "/data/services/auth") == 1
    assert server.imports == 0


def test_password_never_reaches_logs_or_event_log(instance, demo_root, server, xnat_res, password, capsys, caplog):
    result = run_chain(instance, demo_root, VISIT, xnat=xnat_res)
    assert result.success
    out = capsys.readouterr()
    assert password not in out.out + out.err + caplog.text
    for run in instance.get_runs():
        for entry in instance.all_logs(run.run_id):
            assert password not in str(entry)
        assert password not in json.dumps(run.run_config, default=str) and password not in str(run.tags)
        assert run.run_id  # runs were checked
    assert password not in (demo_root / "logs/xnat/QPN001_ses-01.json").read_text()


@pytest.mark.faults
def test_no_right_to_create_the_project(instance, demo_root, samples, tmp_path, password, monkeypatch):
    srv = XnatTestServer(samples.xnat_schemas, USER, password, can_create_projects=False,
                         storage=tmp_path / "s").start()
    try:
        res = XnatResource(server=srv.url, user=USER, password=password)
        result = run_chain(instance, demo_root, VISIT, xnat=res, selection=only_xnat(), raise_on_error=False)
        failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
        message = failure.event_specific_data.error.message
        # ProjectResource.handlePut: non-admins may not create projects on this site
        assert (f"XNAT project QPN_DEMO is not visible to this user and XNAT refused to create it (403: User {USER} "
                "doesn't have permission to create projects on this system)") in message
        assert "or the user may not create projects (ask an XNAT admin to create it)" in message
    finally:
        srv.stop()


@pytest.mark.faults
@pytest.mark.slow
def test_existing_session_with_other_content_follows_the_policy(instance, demo_root, server, xnat_res):
    run_chain(instance, demo_root, VISIT, xnat=xnat_res, selection=only_xnat())
    exp = server.projects["QPN_DEMO"].subjects["QPN001"].experiments["QPN001_ses-01"]
    scan = next(iter(exp.scans.values()))
    removed = sorted(scan.files)[0]
    server.remove_file(exp, scan.id, removed)  # someone removed a file on XNAT
    result = run_chain(instance, demo_root, VISIT, xnat=xnat_res, selection=only_xnat(), raise_on_error=False)
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert "already exists in XNAT project QPN_DEMO with different content" in failure.event_specific_data.error.message
    cfg = json.loads((demo_root / "global_config.json").read_text())
    cfg["xnat_duplicate_policy"] = "append"
    (demo_root / "global_config.json").write_text(json.dumps(cfg))
    result = run_chain(instance, demo_root, VISIT, xnat=xnat_res, selection=only_xnat())
    md = metadata_of(result, "xnat_session")
    # XNAT refuses files the session already holds ("Session already exists with matching files."): only
    # the missing instance is sent, and the session is complete again
    assert md["status"] == "appended" and md["files_sent"] == 1
    assert removed in scan.files and checks_of(result)["scans_match_series"] is True
    assert server.prearchive == {}
    again = run_chain(instance, demo_root, VISIT, xnat=xnat_res, selection=only_xnat())
    assert metadata_of(again, "xnat_session")["status"] == "already_archived" and server.imports == 2


@pytest.mark.faults
@pytest.mark.slow
def test_xnat_down_is_reported_clearly(instance, demo_root):
    res = XnatResource(server="http://127.0.0.1:9", user=USER, password="x", timeout=5)
    result = run_chain(instance, demo_root, VISIT, xnat=res, selection=only_xnat(), raise_on_error=False)
    assert not result.success
    def chain(err):
        while err is not None:
            yield err.message
            err = err.cause
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    messages = list(chain(failure.event_specific_data.error))
    assert any("XNAT at http://127.0.0.1:9 is unavailable or failed" in m for m in messages), messages
    assert sum(e.event_type_value == "STEP_UP_FOR_RETRY" for e in result.all_events) == 3


@pytest.mark.slow
def test_classic_tree_upload_cli(samples, server, password, tmp_path, monkeypatch, capsys):
    """A site migrating from the classic script: <root>/<subject>/<session>/<series folders>."""
    import shutil

    from dicom_assets.cli import main

    tree = tmp_path / "tree"
    shutil.copytree(samples.xnat_case001 / "scans", tree / "Case001" / "Case001_MR1")
    (tree / "Case001" / "Case001_MR1" / "notes.txt").write_text("not a DICOM, never sent")
    excl = tmp_path / "exclusions.json"
    excl.write_text(json.dumps({"Exclude": ["LOCALIZER"]}))
    server.add_project("MIGR", owner=USER)  # an existing project of the site
    monkeypatch.setenv("XNAT_USER", USER)
    monkeypatch.setenv("XNAT_PASSWORD", password)
    code = main(["xnat-upload", str(tree), "--project", "MIGR", "--config", str(excl), "--server", server.url])
    out = capsys.readouterr().out
    assert code == 0, out
    exp = server.projects["MIGR"].subjects["Case001"].experiments["Case001_MR1"]
    assert {k: len(v.files) for k, v in exp.scans.items()} == {"2": 20, "3": 20, "5": 60, "6": 60, "7": 60, "8": 20,
                                                               "9": 32, "10": 20}
    assert "Case001/Case001_MR1: uploaded, 292 files sent" in out
    assert password not in out
    # a second run sends nothing
    assert main(["xnat-upload", str(tree), "--project", "MIGR", "--config", str(excl), "--server", server.url]) == 0
    assert "already_archived" in capsys.readouterr().out and server.imports == 1


# ------------------------------------------------------------------ XNAT as a real XNAT behaves
def set_config(demo_root, **fields):
    cfg = json.loads((demo_root / "global_config.json").read_text())
    cfg.update(fields)
    (demo_root / "global_config.json").write_text(json.dumps(cfg))


def xnatpy_session(server, user, password):
    import xnat

    return xnat.connect(server.url, user=user, password=password, loglevel="ERROR")


def one_series_zip(samples, tmp_path):
    """A zip of one real series (20 files of the xnat sdist's GE session), as the client sends."""
    import zipfile

    z = tmp_path / "series.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for f in sorted((samples.xnat_case001 / "scans").glob("2_*/DICOM/*.dcm")):
            zf.write(f, f.name)
    return z


@pytest.mark.faults
def test_import_service_refuses_what_xnat_refuses(samples, server, password, tmp_path):
    """The server alone, as XNAT's importer answers: application/zip only; Direct-Archive with
    a dest fails; an upload is staged in the prearchive; a row being archived cannot be deleted."""
    import xnat.exceptions as xe

    z = one_series_zip(samples, tmp_path)
    server.add_project("P1", owner=USER)
    with xnatpy_session(server, USER, password) as s:
        with pytest.raises(xe.XNATUploadError, match="Status code 400, response text Unsupported format"):
            s.services.import_(z, project="P1", subject="S1", experiment="E1", import_handler="DICOM-zip",
                               content_type="application/octet-stream", destination="/archive")
        with pytest.raises(xe.XNATUploadError, match="Status code 400, response text Failed to archive 1 of 1 session"):
            s.services.import_(z, project="P1", subject="S1", experiment="E1", import_handler="DICOM-zip",
                               content_type="application/zip", destination="/archive", direct_archive=True)
        assert server.projects["P1"].subjects == {}
        staged = s.services.import_(z, project="P1", subject="S1", experiment="E1", import_handler="DICOM-zip",
                                    content_type="application/zip", destination="/prearchive")
        assert staged.status == "READY" and staged.label == "E1" and server.projects["P1"].subjects == {}
        row = next(iter(server.prearchive.values()))
        row.status = "_ARCHIVING"  # what XNAT shows while it archives the row
        r = s.delete(f"/data/prearchive/projects/{row.key}", accepted_status=[200, 409])
        assert r.status_code == 409 and "locked" in r.text and row.key in server.prearchive
        s.post("/data/services/prearchive/delete", query={"src": f"/prearchive/projects/{row.key}"})
        assert row.key in server.prearchive  # PrearchiveBatchDelete leaves a locked row
        row.status = "READY"
        s.post("/data/services/prearchive/delete", query={"src": f"/prearchive/projects/{row.key}"})
        assert server.prearchive == {}


@pytest.mark.slow
def test_other_resources_of_a_scan_do_not_count(instance, demo_root, server, xnat_res):
    """Pipelines add SNAPSHOTS/NIFTI resources to scans: only the DICOM resource is compared."""
    run_chain(instance, demo_root, VISIT, xnat=xnat_res, selection=only_xnat())
    exp = server.projects["QPN_DEMO"].subjects["QPN001"].experiments["QPN001_ses-01"]
    for sid in exp.scans:
        server.add_scan_resource(exp, sid, "SNAPSHOTS", {f"{sid}_qc.gif": b"GIF89a", f"{sid}_qc_t.gif": b"GIF89a"})
    server.add_scan_resource(exp, next(iter(exp.scans)), "NIFTI", {"vol.nii.gz": b"\x1f\x8b"})
    again = run_chain(instance, demo_root, VISIT, xnat=xnat_res, selection=only_xnat())
    md = metadata_of(again, "xnat_session")
    assert md["status"] == "already_archived" and md["files_sent"] == 0 and server.imports == 1
    assert checks_of(again)["scans_match_series"] is True


@pytest.mark.slow
def test_files_xnat_filters_are_reported_not_different_content(instance, demo_root, server, xnat_res):
    """XNAT's series import filter drops files on receipt: reported, remembered, not re-sent."""
    server.series_import_filter = r"^T2w"
    result = run_chain(instance, demo_root, VISIT, xnat=xnat_res, selection=only_xnat())
    md = metadata_of(result, "xnat_session")
    exp = server.projects["QPN_DEMO"].subjects["QPN001"].experiments["QPN001_ses-01"]
    assert not any(s.series_description.startswith("T2w") for s in exp.scans.values())
    t2 = sum(v for k, v in kept_series(demo_root).items() if k not in exp.scans)
    assert t2 > 0 and md["filtered_by_xnat"] == t2 and md["files_sent"] == sum(kept_series(demo_root).values())
    assert checks_of(result)["scans_match_series"] is True
    marker = json.loads((demo_root / "logs/xnat/QPN001_ses-01.json").read_text())
    assert len(marker["filtered_by_xnat"]) == t2
    again = run_chain(instance, demo_root, VISIT, xnat=xnat_res, selection=only_xnat())
    assert metadata_of(again, "xnat_session")["status"] == "already_archived" and server.imports == 1


@pytest.mark.slow
def test_labels_are_cleaned_as_xnat_cleans_them(instance, demo_root, server, xnat_res):
    """XNAT files 'QPN001.ses-01' as 'QPN001_ses-01' (cleanValue): found, reported, not re-sent."""
    set_config(demo_root, session_label_pattern="{participant}.{session}")
    result = run_chain(instance, demo_root, VISIT, xnat=xnat_res, selection=only_xnat())
    md = metadata_of(result, "xnat_session")
    assert md["status"] == "uploaded" and md["session_label"] == "QPN001_ses-01"
    assert md["xnat_labels"]["session"] == {"given": "QPN001.ses-01", "xnat": "QPN001_ses-01"}
    assert list(server.projects["QPN_DEMO"].subjects["QPN001"].experiments) == ["QPN001_ses-01"]
    marker = json.loads((demo_root / "logs/xnat/QPN001_ses-01.json").read_text())
    assert marker["labels"]["session"]["given"] == "QPN001.ses-01" and marker["session_label"] == "QPN001_ses-01"
    again = run_chain(instance, demo_root, VISIT, xnat=xnat_res, selection=only_xnat())
    assert metadata_of(again, "xnat_session")["status"] == "already_archived" and server.imports == 1


@pytest.mark.slow
def test_subject_is_matched_case_insensitively(instance, demo_root, server, xnat_res):
    """XNAT files the session under its existing subject 'qpn001'; the client finds it there."""
    server.add_project("QPN_DEMO", owner=USER)
    server.add_subject("QPN_DEMO", "qpn001")
    result = run_chain(instance, demo_root, VISIT, xnat=xnat_res, selection=only_xnat())
    md = metadata_of(result, "xnat_session")
    assert md["status"] == "uploaded" and md["xnat_labels"]["subject"] == {"given": "QPN001", "xnat": "qpn001"}
    assert list(server.projects["QPN_DEMO"].subjects) == ["qpn001"]
    assert checks_of(result)["scans_match_series"] is True
    again = run_chain(instance, demo_root, VISIT, xnat=xnat_res, selection=only_xnat())
    assert metadata_of(again, "xnat_session")["status"] == "already_archived" and server.imports == 1


@pytest.mark.faults
@pytest.mark.parametrize("owner,uid,says", [
    ("OTHER", "", "is already used in XNAT project QPN_DEMO by subject OTHER"),
    ("QPN001", "1.2.826.0.1.3680043.8.498.1", "holds another study (StudyInstanceUID 1.2.826.0.1.3680043.8.498.1"),
])
def test_session_label_is_unique_per_project(instance, demo_root, server, xnat_res, owner, uid, says):
    """XNAT answers 409 when the label exists under another subject or study: the client says
    so before sending anything."""
    server.add_project("QPN_DEMO", owner=USER)
    server.add_experiment("QPN_DEMO", owner, "QPN001_ses-01", uid)
    result = run_chain(instance, demo_root, VISIT, xnat=xnat_res, selection=only_xnat(), raise_on_error=False)
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert says in failure.event_specific_data.error.message
    assert "labels are unique per project" in failure.event_specific_data.error.message
    assert server.imports == 0 and not any(e.event_type_value == "STEP_UP_FOR_RETRY" for e in result.all_events)


@pytest.mark.faults
@pytest.mark.slow
def test_failed_upload_cleans_only_its_own_prearchive_rows(instance, demo_root, server, xnat_res):
    """Archiving fails once (row left in ERROR, 500): the retry's client removes that row only;
    a scanner's row of the same label and another visit's row stay."""
    server.add_project("QPN_DEMO", owner=USER)
    scanner = server.add_prearchive_row("QPN_DEMO", "QPN001_ses-01", "1.2.826.0.1.3680043.8.498.77", "READY")
    other = server.add_prearchive_row("QPN_DEMO", "QPN002_ses-01", "1.2.826.0.1.3680043.8.498.78", "ERROR")
    server.inject("/data/services/import", "archive_error")
    result = run_chain(instance, demo_root, VISIT, xnat=xnat_res, selection=only_xnat())
    assert result.success and metadata_of(result, "xnat_session")["status"] == "uploaded"
    assert any(e.event_type_value == "STEP_UP_FOR_RETRY" for e in result.all_events)
    assert sorted(server.prearchive) == sorted([scanner.key, other.key])
    assert server.imports == 2 and checks_of(result)["scans_match_series"] is True


@pytest.mark.faults
@pytest.mark.slow
def test_proxy_504_while_xnat_keeps_archiving(instance, demo_root, server, xnat_res):
    """A reverse proxy answers 504 after 1 s; XNAT finishes archiving at ~2.5 s. The client
    polls instead of resending or deleting the row XNAT is archiving."""
    server.proxy_timeout, server.import_seconds = 1.0, 2.5
    result = run_chain(instance, demo_root, VISIT, xnat=xnat_res, selection=only_xnat())
    md = metadata_of(result, "xnat_session")
    assert result.success and md["status"] == "uploaded" and server.imports == 1
    assert not any(e.event_type_value == "STEP_UP_FOR_RETRY" for e in result.all_events)
    exp = server.projects["QPN_DEMO"].subjects["QPN001"].experiments["QPN001_ses-01"]
    assert {k: len(s.files) for k, s in exp.scans.items()} == kept_series(demo_root)
    assert server.prearchive == {} and checks_of(result)["scans_match_series"] is True


@pytest.mark.faults
def test_project_resources_need_the_owner_role(samples, server, password, tmp_path):
    """A project member may upload sessions but not project resources: the session is uploaded
    first, the refused TCIA resource is a warning."""
    import shutil

    from dicom_assets.core.dicomscan import Rules
    from dicom_assets.core.organize import classify_tree
    from dicom_assets.core.xnat import files_from_records, upload_visit

    server.add_user("pi", "pi-pw")
    server.add_project("TCIA_P", owner="pi", members=(USER,))
    folder = tmp_path / "visit"
    shutil.copytree(next((samples.xnat_case001 / "scans").glob("2_*")), folder)
    files = files_from_records(classify_tree(folder, Rules()), folder)
    manifest = tmp_path / "basket.tcia"
    manifest.write_text("downloadServerUrl=https://example.org\n")
    logs = []
    with xnatpy_session(server, USER, password) as s:
        res = upload_visit(s, server=server.url, project="TCIA_P", subject="Case001", session_label="Case001_MR1",
                           files=files, excluded=[], metadata_files=[], log=logs.append,
                           project_files={"TCIA": [manifest]})
    assert res.status == "uploaded" and res.files_sent == 20
    assert [len(s.files) for s in server.projects["TCIA_P"].subjects["Case001"].experiments["Case001_MR1"].scans.values()] == [20]
    assert len(res.warnings) == 1 and "project resource TCIA of TCIA_P not attached" in res.warnings[0]
    assert "owner role" in res.warnings[0] and res.warnings[0] in logs
    assert server.projects["TCIA_P"].resources == {}


@pytest.mark.slow
def test_site_anonymization_rewrites_patient_id(instance, demo_root, server, xnat_res):
    """XNAT's default site-wide script sets PatientID to the session label: the client compares
    instance names, never bytes, so a re-run still sends nothing."""
    server.site_anonymization = True
    run_chain(instance, demo_root, VISIT, xnat=xnat_res, selection=only_xnat())
    exp = server.projects["QPN_DEMO"].subjects["QPN001"].experiments["QPN001_ses-01"]
    one = next(iter(next(iter(exp.scans.values())).files.values()))
    ds = pydicom.dcmread(one, stop_before_pixels=True)
    assert ds.PatientID == "QPN001_ses-01" and str(ds.PatientName) == "QPN001"
    again = run_chain(instance, demo_root, VISIT, xnat=xnat_res, selection=only_xnat())
    assert metadata_of(again, "xnat_session")["status"] == "already_archived" and server.imports == 1


# ------------------------------------------------- project accessibility, importer refusals, labels
def write_zip_of(files, dest):
    from dicom_assets.core.xnat import write_zip

    write_zip(files, dest)


def visit_folder(samples, tmp_path, edit=None):
    """One real series as organize keeps it, and its files to send; ``edit(ds)`` changes the
    first file's header."""
    import shutil

    from dicom_assets.core.dicomscan import Rules
    from dicom_assets.core.organize import classify_tree
    from dicom_assets.core.xnat import files_from_records

    folder = tmp_path / "visit"
    shutil.copytree(next((samples.xnat_case001 / "scans").glob("2_*")), folder)
    if edit:
        first = sorted(folder.rglob("*.dcm"))[0]
        ds = pydicom.dcmread(first)
        edit(ds)
        ds.save_as(first)
    return files_from_records(classify_tree(folder, Rules()), folder)


def upload(server, password, files, *, project="QPN_DEMO", subject="Case001", label="Case001_MR1", **kw):
    from dicom_assets.core.xnat import upload_visit

    with xnatpy_session(server, USER, password) as s:
        return upload_visit(s, server=server.url, project=project, subject=subject, session_label=label,
                            files=files, excluded=[], metadata_files=[], **kw)


@pytest.mark.faults
def test_projects_are_seen_as_their_accessibility_allows(server, password):
    """ProjectResource / DefaultUserProjectCache.get / Permissions.canReadProject: a private
    project of others looks absent (GET 404; a PUT is a creation XNAT refuses with 403), a
    protected or public one is listed and readable, its data only when public; only owners and
    members may create data (ProjectListResource's permissions query)."""
    server.add_user("pi", "pi-pw")
    server.add_project("PRIV", owner="pi", accessibility="private")
    server.add_project("PROT", owner="pi")  # XNAT's default accessibility
    server.add_project("PUB", owner="pi", accessibility="public")
    for pid in ("PROT", "PUB"):
        server.add_subject(pid, "S1")
    with xnatpy_session(server, USER, password) as s:
        assert {r["ID"] for r in s.get_json("/data/projects")["ResultSet"]["Result"]} == {"PROT", "PUB"}
        r = s.get("/data/projects/PRIV", accepted_status=[404])
        assert r.text == "Unable to find the specified experiment."  # ProjectResource.represent, sic
        assert s.get_json("/data/projects/PROT")["items"][0]["data_fields"]["ID"] == "PROT"
        r = s.put("/data/projects/PRIV", accepted_status=[403])
        assert r.text == "User account doesn't have permission to edit this project."
        r = s.put("/data/projects/PROT", accepted_status=[403])
        assert r.text == f"User {USER} doesn't have permission to edit the project PROT"
        assert s.get_json("/data/projects/PROT/subjects")["ResultSet"]["Result"] == []
        assert [r["label"] for r in s.get_json("/data/projects/PUB/subjects")["ResultSet"]["Result"]] == ["S1"]
        allowed = s.get_json("/data/projects", query={"permissions": "create", "dataType": "xnat:subjectData"})
        assert allowed["ResultSet"]["Result"] == []
        s.put("/data/projects/MINE")  # a new project: protected, the creator its owner
        assert server.projects["MINE"].accessibility == "protected" and server.projects["MINE"].roles == {USER: "owner"}
        allowed = s.get_json("/data/projects", query={"permissions": "create", "dataType": "xnat:subjectData"})
        assert [r["id"] for r in allowed["ResultSet"]["Result"]] == ["MINE"]
        r = s.put("/data/projects/MY%20PROJ", accepted_status=[417])
        assert r.text == "Invalid character in project ID."


@pytest.mark.faults
@pytest.mark.parametrize("project,accessibility,says", [
    ("PRIV", "private", "is not visible to this user and XNAT refused to create it (403: User account doesn't have "
                        "permission to edit this project.): either it exists as a private project"),
    ("PROT", "protected", "is visible to this user, but the user may not add data to it"),
    ("PUB", "public", "is visible to this user, but the user may not add data to it"),
    ("MY PROJ", None, "XNAT project IDs hold only letters, digits, '_' and '-'"),
])
def test_a_project_the_user_cannot_upload_to_fails_before_sending(samples, server, password, tmp_path, project,
                                                                 accessibility, says):
    from dicom_assets.core.xnat import XnatError

    server.add_user("pi", "pi-pw")
    if accessibility:
        server.add_project(project, owner="pi", accessibility=accessibility)
    files = visit_folder(samples, tmp_path)
    with pytest.raises(XnatError) as err:
        upload(server, password, files, project=project)
    assert says in str(err.value) and project in str(err.value)
    assert server.imports == 0
    if accessibility:
        assert server.projects[project].subjects == {}
    else:  # refused before asking XNAT to create it
        assert project not in server.projects and not any(p.startswith("/data/projects") for _, p in server.requests)


@pytest.mark.faults
def test_importer_refuses_a_dicom_without_sop_class_uid(samples, server, password, tmp_path):
    """GradualDicomImporter.call: no SOPClassUID (MediaStorageSOPClassUID does not count) is a
    400 naming the file; under Ignore-Unparsable the file is dropped and the rest archived. A
    file without StudyInstanceUID is accepted (XNAT does not require it)."""
    import zipfile

    import xnat.exceptions as xe

    files = visit_folder(samples, tmp_path, edit=lambda ds: delattr(ds, "SOPClassUID"))
    bad = next(f for f in files if pydicom.dcmread(f.path, stop_before_pixels=True).get("SOPClassUID") is None)
    assert pydicom.dcmread(bad.path).file_meta.MediaStorageSOPClassUID  # the file meta still names it
    z = tmp_path / "upload.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for f in sorted(files, key=lambda f: f.arcname == bad.arcname):  # the refused file last
            zf.write(f.path, f.arcname)
    server.add_project("P1", owner=USER)
    kw = dict(project="P1", subject="S1", experiment="E1", import_handler="DICOM-zip",
              content_type="application/zip", destination="/archive")
    with xnatpy_session(server, USER, password) as s:
        with pytest.raises(xe.XNATUploadError, match=f"response text object {bad.arcname} contains no SOP Class UID"):
            s.services.import_(z, **kw)
        row = next(iter(server.prearchive.values()))  # what was read before it stays, RECEIVING
        assert row.status == "RECEIVING" and len(row.files) == len(files) - 1
        server.prearchive.clear()
        s.services.import_(z, ignore_unparsable=True, **kw)
        scans = server.projects["P1"].subjects["S1"].experiments["E1"].scans
        kept = {name for sc in scans.values() for name in sc.files}
        assert len(kept) == len(files) - 1 and bad.arcname not in kept
    ds = pydicom.dcmread(next(f for f in files if f is not bad).path)
    del ds.StudyInstanceUID
    ds.save_as(tmp_path / "no-study.dcm")
    z2 = tmp_path / "no-study.zip"
    with zipfile.ZipFile(z2, "w") as zf:
        zf.write(tmp_path / "no-study.dcm", "no-study.dcm")
    with xnatpy_session(server, USER, password) as s:
        s.services.import_(z2, **{**kw, "experiment": "E2", "destination": "/prearchive"})
    assert [r.tag for r in server.prearchive.values()] == [""]


@pytest.mark.faults
def test_client_refuses_to_send_a_dicom_xnat_would_drop(samples, server, password, tmp_path):
    """Under Ignore-Unparsable XNAT drops a file without SOPClassUID silently: the client says
    so, naming the file, before anything is sent."""
    from dicom_assets.core.xnat import XnatError

    files = visit_folder(samples, tmp_path, edit=lambda ds: setattr(ds, "SOPClassUID", ""))
    with pytest.raises(XnatError) as err:
        upload(server, password, files)
    assert "1 of the 20 files of Case001_MR1 would be refused by XNAT's importer" in str(err.value)
    assert "(no SOP Class UID (0008,0016))" in str(err.value) and "nothing was sent" in str(err.value)
    assert server.imports == 0 and "QPN_DEMO" not in server.projects


@pytest.mark.faults
def test_subject_put_keeps_the_label_as_xnat_does(server, password):
    """SubjectResource.handlePut: the label is not cleaned nor refused for its characters
    (validateSubject checks the generated ID); it is looked up exactly; XFT's 255-character
    limit is the only refusal."""
    server.add_project("P1", owner=USER)
    with xnatpy_session(server, USER, password) as s:
        r = s.put("/data/projects/P1/subjects/QPN.001 (b)", accepted_status=[201])
        assert list(server.projects["P1"].subjects) == ["QPN.001%20(b)"]  # the URI attribute, not decoded
        assert r.text == server.projects["P1"].subjects["QPN.001%20(b)"].id
        assert s.put("/data/projects/P1/subjects/QPN.001%20(b)", accepted_status=[200]).text == r.text
        s.put("/data/projects/P1/subjects/qpn.001%20(b)", accepted_status=[201])  # another subject
        assert len(server.projects["P1"].subjects) == 2
        r = s.put("/data/projects/P1/subjects/" + "x" * 256, accepted_status=[400])
        assert r.text == "Must Be Less Than 255 Characters : Current Length (256)\n"
        r = s.put("/data/projects/NOPE/subjects/S1", accepted_status=[422])
        assert r.text == "Submitted subject record must include the project attribute."


@pytest.mark.faults
def test_label_longer_than_xnat_stores_fails_before_sending(samples, server, password, tmp_path):
    from dicom_assets.core.xnat import XnatError

    files = visit_folder(samples, tmp_path)
    with pytest.raises(XnatError, match="has 300 characters; XNAT stores labels of at most 255"):
        upload(server, password, files, label="V" * 300)
    assert server.imports == 0 and not any(p.startswith("/data/projects") for _, p in server.requests)


# ------------------------------------------ the project's prearchive code, session merging
def series_zips(samples, tmp_path):
    """Zips of one real series (20 files): its first half, its second half, all of it."""
    import zipfile

    files = sorted((samples.xnat_case001 / "scans").glob("2_*/DICOM/*.dcm"))
    out = {}
    for name, part in (("first", files[:10]), ("second", files[10:]), ("all", files)):
        out[name] = tmp_path / f"{name}.zip"
        with zipfile.ZipFile(out[name], "w") as zf:
            for f in part:
                zf.write(f, f.name)
    return out


def raw_import(server, password, z, **query):
    """POST /data/services/import as XNAT sees it (any query, the answer unparsed)."""
    import requests

    q = {"import-handler": "DICOM-zip", "dest": "/archive", "subject": "S1", "session": "E1", **query}
    with open(z, "rb") as fh:
        return requests.post(f"{server.url}/data/services/import", params=q, data=fh,
                             headers={"Content-Type": "application/zip"}, auth=(USER, password), timeout=60)


@pytest.mark.faults
def test_project_prearchive_code_as_xnat_keeps_it(samples, server, password, tmp_path):
    """ProjectResource: /data/projects/<id>/prearchive_code gives the code; a new project has the
    site default 4 (BaseXnatProjectdata.initArcProjectImpl); only owners set it. An import with
    dest=/archive is archived at once even in a Manual (0) project: the dest overrides the code
    (DicomZipImporter.determiningDestination); dest=/prearchive stays, its row marked Manual."""
    z = series_zips(samples, tmp_path)["all"]
    server.add_user("pi", "pi-pw")
    server.add_project("THEIRS", owner="pi", members=(USER,))
    with xnatpy_session(server, USER, password) as s:
        s.put("/data/projects/P0")
        assert s.get("/data/projects/P0/prearchive_code").text == "4"
        s.put("/data/projects/P0/prearchive_code/0")
        assert s.get("/data/projects/P0/prearchive_code").text == "0" and server.projects["P0"].prearchive_code == 0
        r = s.put("/data/projects/P0/prearchive_code/auto", accepted_status=[400])
        assert r.text == "The submitted code auto is invalid: must be an integer."
        assert s.get("/data/projects/THEIRS/prearchive_code").text == "4"
        r = s.put("/data/projects/THEIRS/prearchive_code/0", accepted_status=[403])  # a member, not an owner
        assert r.text == "User account doesn't have permission to edit this project."
    r = raw_import(server, password, z, project="P0")
    assert r.status_code == 200 and r.text.startswith("/data/archive/projects/P0/")
    assert len(server.projects["P0"].subjects["S1"].experiments["E1"].scans["2"].files) == 20
    assert server.prearchive == {}
    r = raw_import(server, password, z, project="P0", session="E2", dest="/prearchive")
    assert r.status_code == 200 and r.text.startswith("/data/prearchive/projects/P0/")
    with xnatpy_session(server, USER, password) as s:
        rows = s.get_json("/data/prearchive/projects/P0")["ResultSet"]["Result"]
    assert [(r["name"], r["status"], r["autoarchive"]) for r in rows] == [("E2", "READY", "Manual")]


@pytest.mark.faults
def test_import_merges_as_xnats_importer_decides(samples, server, password, tmp_path):
    """Whether an import with dest=/archive merges into an existing session of the label:
    Importer.parseOverrideValue makes ``overwrite`` (any value, "none" too) allowSessionMerge and
    ignores an allowSessionMerge of the query; without it DicomZipImporter.archiveSession merges
    only when the row's prearchive code is not Manual. A refusal leaves the row in CONFLICT and
    the import answers 400 "Failed to archive 1 of 1 session(s)"; files the session holds are
    refused unless the code is 5 or overwrite=delete (MergeSessionsA.checkForConflict)."""
    zips = series_zips(samples, tmp_path)
    cases = [  # (prearchive code, query of the second import, what it sends, merged?)
        (0, {}, "second", False),
        (0, {"allowSessionMerge": "true"}, "second", False),
        (0, {"overwrite": "append"}, "second", True),
        (0, {"overwrite": "none"}, "second", True),
        (4, {}, "second", True),
        (4, {}, "all", False),  # 10 files the session holds
        (4, {"overwrite": "append"}, "all", False),
        (4, {"overwrite": "delete"}, "all", True),
        (5, {}, "all", True),
    ]
    outcome = []
    for i, (code, query, part, merged) in enumerate(cases):
        pid = f"P{i}"
        server.add_project(pid, owner=USER).prearchive_code = code
        first = raw_import(server, password, zips["first"], project=pid)
        assert first.status_code == 200 and first.text.startswith(f"/data/archive/projects/{pid}/"), first.text
        r = raw_import(server, password, zips[part], project=pid, **query)
        scan = server.projects[pid].subjects["S1"].experiments["E1"].scans["2"]
        rows = [e for e in server.prearchive.values() if e.project == pid]
        if merged:
            ok = r.status_code == 200 and len(scan.files) == 20 and rows == []
        else:
            ok = (r.status_code, r.text) == (400, "Failed to archive 1 of 1 session(s)") and len(scan.files) == 10 \
                and [e.status for e in rows] == ["CONFLICT"]
        outcome.append((code, query, part, ok))
    assert [c for c in outcome if not c[3]] == []


@pytest.mark.faults
def test_session_rebuilder_archives_an_interrupted_build_only_on_auto_archive_projects(samples, server, password,
                                                                                      tmp_path):
    """PrearchiveRebuildHandler.rebuild gives way when more data arrives while it builds: the row
    goes back to RECEIVING and the import answers 200 with no URI. SessionXMLRebuilder later
    rebuilds idle rows and archives them only when their code is 4/5; a Manual row stays READY
    until someone archives it (/data/services/archive, which merges)."""
    z = series_zips(samples, tmp_path)["all"]
    server.add_project("PM", owner=USER).prearchive_code = 0
    server.add_project("PA", owner=USER)  # the site default, 4
    server.inject("/data/services/import", "receiving_interrupt", times=2)
    for pid in ("PM", "PA"):
        r = raw_import(server, password, z, project=pid)
        assert (r.status_code, r.text) == (200, "")
    assert sorted((e.project, e.status) for e in server.prearchive.values()) == [("PA", "RECEIVING"),
                                                                                 ("PM", "RECEIVING")]
    assert server.projects["PM"].subjects == {} and server.projects["PA"].subjects == {}
    assert len(server.rebuild_idle_sessions(idle_seconds=0)) == 2
    assert len(server.projects["PA"].subjects["S1"].experiments["E1"].scans["2"].files) == 20
    (row,) = server.prearchive.values()
    assert (row.project, row.status) == ("PM", "READY") and server.projects["PM"].subjects == {}
    with xnatpy_session(server, USER, password) as s:
        s.post("/data/services/archive", query={"src": f"/prearchive/projects/{row.key}"})
    assert len(server.projects["PM"].subjects["S1"].experiments["E1"].scans["2"].files) == 20
    assert server.prearchive == {}


@pytest.mark.faults
def test_upload_kept_in_the_prearchive_of_a_manual_project_fails_clearly(samples, server, password, tmp_path):
    """XNAT's build gives way to more data for the row: the import answers 200 without a URI.
    In a project set to "all to prearchive" (0) its session rebuilder leaves the row READY: the
    client waits while XNAT works on the row, then fails naming the row and what the site admin
    can do, and leaves the row; a re-run sends the files again into that row and completes."""
    from dicom_assets.core.xnat import XnatError

    files = visit_folder(samples, tmp_path)
    server.add_project("QPN_DEMO", owner=USER, prearchive_code=0)
    server.inject("/data/services/import", "receiving_interrupt")
    server.start_session_rebuilder(idle_seconds=0.5)
    logs = []
    with pytest.raises(XnatError) as err:
        upload(server, password, files, log=logs.append, poll_seconds=0.1)
    (row,) = server.prearchive.values()
    assert row.status == "READY" and server.projects["QPN_DEMO"].subjects == {}
    msg = str(err.value)
    assert f"kept the upload in its prearchive (/prearchive/projects/{row.key}, READY)" in msg
    assert "prearchive setting is 0 (everything to the prearchive, for review)" in msg
    assert f"POST /data/services/archive?src=/prearchive/projects/{row.key}" in msg
    assert "PUT /data/projects/QPN_DEMO/prearchive_code/4" in msg and "A re-run without either" in msg
    assert any("waiting while XNAT still works on it" in m for m in logs)
    res = upload(server, password, files, poll_seconds=0.1)
    assert res.status == "uploaded" and server.imports == 2 and server.prearchive == {}
    assert len(server.projects["QPN_DEMO"].subjects["Case001"].experiments["Case001_MR1"].scans["2"].files) == 20


@pytest.mark.faults
def test_upload_kept_in_the_prearchive_of_an_auto_archive_project_is_waited_for(samples, server, password, tmp_path):
    """The same answer without a URI in a project set to auto-archive (the default, 4): XNAT's
    session rebuilder archives the row later; the client waits for it and reports the upload."""
    files = visit_folder(samples, tmp_path)
    server.add_project("QPN_DEMO", owner=USER)
    server.inject("/data/services/import", "receiving_interrupt")
    server.start_session_rebuilder(idle_seconds=0.5)
    logs = []
    res = upload(server, password, files, log=logs.append, poll_seconds=0.1)
    assert res.status == "uploaded" and res.files_sent == 20 and server.imports == 1
    assert len(server.projects["QPN_DEMO"].subjects["Case001"].experiments["Case001_MR1"].scans["2"].files) == 20
    assert server.prearchive == {} and any("archived Case001_MR1 by itself" in m for m in logs)


@pytest.mark.faults
def test_merge_refused_when_a_session_appears_meanwhile(samples, server, password, tmp_path):
    """Another sender archives the label between the client's look and its import, in a project
    set to "all to prearchive": the import did not ask to merge, so XNAT refuses (row CONFLICT,
    400). The client says so and removes its row; a re-run with policy 'append' sends what the
    session lacks with overwrite=append, which XNAT needs to merge there, and completes."""
    from dicom_assets.core.xnat import XnatError

    files = visit_folder(samples, tmp_path)
    server.add_project("QPN_DEMO", owner=USER, prearchive_code=0)

    def scanner(row):
        server.on_archive = None
        server.add_experiment("QPN_DEMO", "Case001", "Case001_MR1", row.tag)

    server.on_archive = scanner
    with pytest.raises(XnatError) as err:
        upload(server, password, files)
    msg = str(err.value)
    # XNAT's own reason, from the row's log (LockAndSync -> PrearcUtils.log), is quoted
    assert "XNAT refused to archive Case001_MR1 into project QPN_DEMO (HTTP 400; its prearchive row went to " \
           "CONFLICT; XNAT says: Session already exists, retry with overwrite enabled): a session Case001_MR1 " \
           "appeared there after the client looked" in msg
    assert "prearchive setting is 0 (everything to the prearchive, for review)" in msg
    assert "nothing of this upload was archived" in msg and "'append' sends the instances it lacks" in msg
    assert server.prearchive == {} and server.projects["QPN_DEMO"].subjects["Case001"].experiments[
        "Case001_MR1"].scans == {}
    assert "overwrite" not in server.import_queries[-1]
    res = upload(server, password, files, policy="append")
    assert res.status == "appended" and res.files_sent == 20 and server.import_queries[-1]["overwrite"] == "append"
    assert len(server.projects["QPN_DEMO"].subjects["Case001"].experiments["Case001_MR1"].scans["2"].files) == 20
    assert server.prearchive == {}


# ------------------------------- partial sessions: a file is "filtered" only when XNAT's filter drops it
def step_failure(result):
    return next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE").event_specific_data.error.message


def visit_session(server):
    return server.projects["QPN_DEMO"].subjects["QPN001"].experiments["QPN001_ses-01"]


def cut_short_and_resend_refused(instance, demo_root, server):
    """The visit made up to its metadata; XNAT will take part of the next upload (the connection
    breaks mid-stream, the session rebuilder archives what arrived) and drop the files sent again
    (its importer cannot write them; under Ignore-Unparsable it says nothing and answers 200)."""
    server.inject("/data/services/import", "drop_mid_stream")
    server.inject("/data/services/import", "storage_error")
    server.start_session_rebuilder(idle_seconds=0.5)


def t2w_files(demo_root):
    """The kept files of the visit's T2w series (what the filters below drop)."""
    dj = json.loads((demo_root / "store/QPN/QPN001_ses-01_metadata_dicoms.json").read_text())
    return {d["SOPInstanceUID"] + ".dcm" for d in dj if (d.get("SeriesDescription") or "").lower().startswith("t2w")}


@pytest.mark.faults
@pytest.mark.slow
def test_upload_cut_short_and_archived_partially_is_completed(instance, demo_root, server, xnat_res):
    """The connection breaks halfway through the upload: XNAT keeps the files it read in a
    RECEIVING row, which its session rebuilder archives as a partial session (the project is
    set to auto-archive, the default 4). The files XNAT's series import filter does not explain
    are missing, not filtered: the client sends them again, only them, with overwrite=append,
    and the session ends complete; nothing is reported as filtered."""
    server.inject("/data/services/import", "drop_mid_stream")
    server.start_session_rebuilder(idle_seconds=0.5)
    result = run_chain(instance, demo_root, VISIT, xnat=xnat_res, selection=only_xnat())
    assert result.success
    md = metadata_of(result, "xnat_session")
    total = sum(kept_series(demo_root).values())
    assert {k: len(s.files) for k, s in visit_session(server).scans.items()} == kept_series(demo_root)
    assert md["status"] == "uploaded" and md["filtered_by_xnat"] == 0
    assert checks_of(result)["scans_match_series"] is True
    marker = json.loads((demo_root / "logs/xnat/QPN001_ses-01.json").read_text())
    assert marker["filtered_by_xnat"] == []
    # the first import was cut short (about half arrived); the second sent only what was missing
    assert server.imports == 2 and [q.get("overwrite") for q in server.import_queries] == ["append"]
    assert total < md["files_sent"] < 2 * total
    assert server.prearchive == {}
    again = run_chain(instance, demo_root, VISIT, xnat=xnat_res, selection=only_xnat())
    assert metadata_of(again, "xnat_session")["status"] == "already_archived" and server.imports == 2


@pytest.mark.faults
@pytest.mark.slow
def test_missing_files_that_cannot_be_delivered_fail_the_step(instance, demo_root, server, xnat_res):
    """The upload is cut short and archived partially, and XNAT drops the files sent again (its
    importer cannot write them, and says nothing under Ignore-Unparsable): the step fails, saying
    how many files of which series are missing, and nothing is recorded as filtered."""
    cut_short_and_resend_refused(instance, demo_root, server)
    result = run_chain(instance, demo_root, VISIT, xnat=xnat_res, selection=only_xnat(), raise_on_error=False)
    assert not result.success
    assert not any(e.event_type_value == "STEP_UP_FOR_RETRY" for e in result.all_events)
    on_server = {k: len(s.files) for k, s in visit_session(server).scans.items()}
    missing = sum(kept_series(demo_root).values()) - sum(on_server.values())
    assert missing > 0
    message = step_failure(result)
    assert f"XNAT session QPN001_ses-01 in project QPN_DEMO is incomplete: {missing} of this visit's" in message
    short = sorted(k for k, n in kept_series(demo_root).items() if on_server.get(k, 0) < n)
    assert all(f"series {k} (" in message for k in short), message
    assert "no series import filter is set for the site or the project" in message
    # every file of the resend dropped: XNAT answers with the last refusal it kept (DicomZipImporter)
    assert "XNAT did not take them" in message and "unable to read DICOM object" in message
    assert "Nothing was recorded as filtered" in message
    assert "'append' sends only the missing files" in message
    assert not (demo_root / "logs/xnat/QPN001_ses-01.json").exists()
    assert [q.get("overwrite") for q in server.import_queries] == ["append"] and server.prearchive == {}


@pytest.mark.faults
@pytest.mark.slow
def test_rerun_completes_a_partial_session_an_older_client_called_filtered(instance, demo_root, server, xnat_res):
    """A partial session is in XNAT (an upload cut short, its resending refused) and the marker
    of an earlier upload lists the missing files as "filtered by XNAT", as the older client
    recorded them. The re-run trusts neither: by default it fails naming the missing files'
    series; with policy 'append' it sends only the missing ones and reports none as filtered."""
    cut_short_and_resend_refused(instance, demo_root, server)
    run_chain(instance, demo_root, VISIT, xnat=xnat_res, selection=only_xnat(), raise_on_error=False)  # fails
    # the older client kept no record of what it was sending (with one, the re-run completes its own upload)
    (demo_root / "logs/xnat/QPN001_ses-01.pending.json").unlink()
    exp = visit_session(server)
    have = {name for scan in exp.scans.values() for name in scan.files}
    dj = json.loads((demo_root / "store/QPN/QPN001_ses-01_metadata_dicoms.json").read_text())
    kept = {d["SOPInstanceUID"] + ".dcm" for d in dj if str(d["SeriesNumber"]) in kept_series(demo_root)}
    absent = sorted(kept - have)
    assert absent
    marker = demo_root / "logs/xnat/QPN001_ses-01.json"
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"project": "QPN_DEMO", "subject": "QPN001", "session_label": "QPN001_ses-01",
                                  "status": "uploaded", "filtered_by_xnat": absent, "warnings": []}))
    result = run_chain(instance, demo_root, VISIT, xnat=xnat_res, selection=only_xnat(), raise_on_error=False)
    assert not result.success and server.imports == 2
    message = step_failure(result)
    assert f"{len(absent)} of this visit's {len(kept)} files missing: series " in message
    assert "'append' (sends only the missing files)" in message
    set_config(demo_root, xnat_duplicate_policy="append")
    result = run_chain(instance, demo_root, VISIT, xnat=xnat_res, selection=only_xnat())
    md = metadata_of(result, "xnat_session")
    assert md["status"] == "appended" and md["files_sent"] == len(absent) and md["filtered_by_xnat"] == 0
    assert server.import_queries[-1]["overwrite"] == "append" and server.imports == 3
    assert {k: len(s.files) for k, s in exp.scans.items()} == kept_series(demo_root)
    assert checks_of(result)["scans_match_series"] is True
    assert json.loads(marker.read_text())["filtered_by_xnat"] == []


@pytest.mark.faults
@pytest.mark.slow
def test_only_files_xnats_filter_drops_are_filtered_in_a_partial_session(instance, demo_root, server, xnat_res):
    """The project's series import filter (read from XNAT's configuration, with the site-wide one)
    drops the T2w series, and the upload is cut short and archived partially: the T2w files are
    reported as filtered, every other missing file is sent again. A disabled filter does not
    apply."""
    server.add_project("QPN_DEMO", owner=USER)
    server.set_series_import_filter("# keep every series but T2w\n[SeriesDescription]\n^(?!t2w)", mode="whitelist",
                                    project="QPN_DEMO")
    server.set_series_import_filter(".", enabled=False)  # a site-wide blacklist of everything, disabled
    server.inject("/data/services/import", "drop_mid_stream")
    server.start_session_rebuilder(idle_seconds=0.5)
    result = run_chain(instance, demo_root, VISIT, xnat=xnat_res, selection=only_xnat())
    md = metadata_of(result, "xnat_session")
    t2 = t2w_files(demo_root)
    assert t2 and md["filtered_by_xnat"] == len(t2)
    exp = visit_session(server)
    assert not any(s.series_description.lower().startswith("t2w") for s in exp.scans.values())
    assert {k: len(s.files) for k, s in exp.scans.items()} == {
        k: n for k, n in kept_series(demo_root).items() if any(s.id == k for s in exp.scans.values())}
    assert sum(len(s.files) for s in exp.scans.values()) == sum(kept_series(demo_root).values()) - len(t2)
    assert sorted(json.loads((demo_root / "logs/xnat/QPN001_ses-01.json").read_text())["filtered_by_xnat"]) == sorted(t2)
    assert checks_of(result)["scans_match_series"] is True and server.imports == 2
    again = run_chain(instance, demo_root, VISIT, xnat=xnat_res, selection=only_xnat())
    assert metadata_of(again, "xnat_session")["status"] == "already_archived" and server.imports == 2


@pytest.mark.faults
def test_files_xnat_cannot_write_are_dropped_silently_and_sent_again(samples, server, password, tmp_path):
    """XNAT's disk fills after 5 files: GradualDicomImporter.call's catch-all turns each failed
    write into a refused object, which Ignore-Unparsable drops without a word, and XNAT answers
    200 with the URI of a session of 5 files. The client sees 15 missing, not filtered, sends
    them again (only them) and the session ends complete."""
    files = visit_folder(samples, tmp_path)
    server.add_project("QPN_DEMO", owner=USER)
    server.storage_error_after = 5
    server.inject("/data/services/import", "storage_error")
    logs = []
    res = upload(server, password, files, log=logs.append)
    assert res.status == "uploaded" and res.files_sent == 35 and res.filtered == []
    assert any("lacks 15 of the files sent" in m for m in logs)
    assert [q.get("overwrite") for q in server.import_queries] == [None, "append"]
    assert server.prearchive == {}


@pytest.mark.faults
def test_import_stopped_mid_zip_leaves_no_partial_session(samples, server, password, tmp_path):
    """Without Ignore-Unparsable XNAT stops the import at the first file it cannot write (400),
    after staging 5 files in a RECEIVING row: as the client would meet it from an XNAT before
    1.8.3. A client removing its rows leaves the rebuilder no partial session to archive."""
    import xnat

    files = visit_folder(samples, tmp_path)
    server.add_project("QPN_DEMO", owner=USER)
    server.storage_error_after = 5
    server.inject("/data/services/import", "storage_error")
    z = tmp_path / "all.zip"
    write_zip_of(files, z)
    with xnat.connect(server.url, user=USER, password=password, loglevel="ERROR") as s:
        r = s.post("/data/services/import", query={"import-handler": "DICOM-zip", "dest": "/archive",
                                                   "project": "QPN_DEMO", "subject": "S", "session": "V"},
                   data=z.read_bytes(), headers={"Content-Type": "application/zip"}, accepted_status=[400])
        assert "unable to read DICOM object" in r.text
        rows = s.get_json("/data/prearchive/projects/QPN_DEMO")["ResultSet"]["Result"]
        assert [row["status"] for row in rows] == ["RECEIVING"]


@pytest.mark.faults
def test_series_import_filters_as_xnat_keeps_and_applies_them(samples, server, password, tmp_path):
    """DicomFilterService / ConfigResource / RegExBasedSeriesImportFilter: the site-wide and the
    project's filter are configurations any reader of the project may read (404 when none); an
    object must pass both; patterns are case-insensitive and searched; [tag] sections and
    EXISTS apply to other headers; a disabled filter does not apply. The client reads them and
    explains a drop only when a filter it read drops the file."""
    from dicom_assets.core.xnat import series_import_filters

    files = visit_folder(samples, tmp_path)
    z = series_zips(samples, tmp_path)["all"]
    desc = pydicom.dcmread(files[0].path, stop_before_pixels=True).SeriesDescription
    server.add_user("pi", "pi-pw")
    server.add_project("P1", owner=USER)
    server.add_project("THEIRS", owner="pi")
    with xnatpy_session(server, USER, password) as s:
        assert s.get("/data/config/seriesImportFilter/config", accepted_status=[404]).status_code == 404
        assert series_import_filters(s, "P1").describe() == "no series import filter is set for the site or the project"
        r = s.get("/data/projects/THEIRS/config/seriesImportFilter/config", accepted_status=[403])
        assert r.text == f"User {USER} can not access project THEIRS"
        cases = [  # (site filter, project filter, files kept)
            ((desc.upper(), "blacklist", True), None, 0),
            ((desc.upper(), "blacklist", False), None, 20),
            (None, ("[0008,0060]\nEXISTS", "whitelist", True), 20),  # Modality is present
            (None, ("[(0018,9999)]\nEXISTS", "whitelist", True), 0),
            (("nothing-matches", "blacklist", True), ("^" + desc[:3].lower(), "whitelist", True), 20),
            (("nothing-matches", "blacklist", True), ("^zzz", "whitelist", True), 0),
        ]
        for i, (site, proj, kept) in enumerate(cases):
            server.series_filters.clear()
            if site:
                server.set_series_import_filter(site[0], mode=site[1], enabled=site[2])
            if proj:
                server.set_series_import_filter(proj[0], mode=proj[1], enabled=proj[2], project="P1")
            r = raw_import(server, password, z, project="P1", session=f"E{i}")
            assert r.status_code == 200
            exp = server.projects["P1"].subjects["S1"].experiments.get(f"E{i}") if kept else None
            assert (sum(len(sc.files) for sc in exp.scans.values()) if exp else 0) == kept, (i, r.text)
            assert series_import_filters(s, "P1").drops(files[0]) == (kept == 0), i
        rows = s.get_json("/data/projects/P1/config/seriesImportFilter/config")["ResultSet"]["Result"]
        assert rows[0]["status"] == "enabled" and json.loads(rows[0]["contents"])["mode"] == "whitelist"
        server.set_series_import_filter("x", mode="whitelist", enabled=False)
        assert s.get("/data/config/seriesImportFilter/config", query={"contents": "true"},
                     accepted_status=[404]).status_code == 404


# ------------------------------------------------- a retry completes its own unfinished upload
def wait_for_session(server, label="Case001_MR1", seconds=10.0):
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        subj = server.projects["QPN_DEMO"].subjects.get("Case001")
        if subj is not None and label in subj.experiments and not server.prearchive:
            return subj.experiments[label]
        time.sleep(0.05)
    raise AssertionError("XNAT's session rebuilder did not archive the partial row")


@pytest.mark.faults
def test_retry_completes_its_own_partial_session_under_the_default_policy(samples, server, password, tmp_path):
    """The connection breaks mid-upload and the client's wait for XNAT's RECEIVING row runs out
    (a transient failure: Dagster retries); XNAT's session rebuilder then archives the row as a
    partial session. The retry, under the default policy 'fail', finds that every file of the
    session is one this client recorded as being sent for the visit: its own unfinished upload.
    It sends only the missing files (overwrite=append), records none as filtered, and removes the
    record once the session is complete."""
    from dicom_assets.core.xnat import XnatTransientError

    files = visit_folder(samples, tmp_path)
    pending = tmp_path / "logs/xnat/visit.pending.json"
    server.add_project("QPN_DEMO", owner=USER)
    server.inject("/data/services/import", "drop_mid_stream")
    with pytest.raises(XnatTransientError, match="still receiving"):
        upload(server, password, files, pending_path=pending, wait_seconds=0.2, poll_seconds=0.05)
    record = json.loads(pending.read_text())
    assert record["project"] == "QPN_DEMO" and record["session_label"] == "Case001_MR1"
    assert set(record["files"]) == {f.arcname for f in files} and password not in pending.read_text()
    server.start_session_rebuilder(idle_seconds=0.3)
    exp = wait_for_session(server)
    partial = {n for scan in exp.scans.values() for n in scan.files}
    assert 0 < len(partial) < len(files)
    res = upload(server, password, files, pending_path=pending, wait_seconds=5, poll_seconds=0.05)
    assert res.status == "appended" and res.files_sent == len(files) - len(partial) and res.filtered == []
    assert {n for scan in exp.scans.values() for n in scan.files} == {f.arcname for f in files}
    assert [q.get("overwrite") for q in server.import_queries][-1] == "append"
    assert not pending.exists() and server.prearchive == {}


@pytest.mark.faults
def test_partial_session_with_a_file_not_being_sent_follows_the_policy(samples, server, password, tmp_path):
    """A partial session holding a file this client did not record as being sent for the visit
    is someone else's data: policy 'fail' fails as before, and the record stays."""
    from dicom_assets.core.xnat import XnatError, write_pending

    files = visit_folder(samples, tmp_path)
    server.add_project("QPN_DEMO", owner=USER)
    upload(server, password, files[:8])  # someone else's session: 8 files, two of them not of this visit
    pending = tmp_path / "logs/xnat/visit.pending.json"
    write_pending(pending, project="QPN_DEMO", subject="Case001", label="Case001_MR1", tag=files[0].study_instance_uid,
                  files=files[2:])
    with pytest.raises(XnatError, match="already exists in XNAT project QPN_DEMO with different content .*12 of this "
                                        "visit's 18 files missing.*2 files this visit does not have"):
        upload(server, password, files[2:], pending_path=pending)
    assert pending.exists() and server.imports == 1


@pytest.mark.faults
@pytest.mark.slow
def test_asset_rerun_completes_its_own_partial_session_and_removes_the_record(instance, demo_root, server, xnat_res):
    """Through the asset: an upload cut short whose resending XNAT refuses fails the step and
    leaves the partial session and the record of what was being sent (beside the marker). The
    re-run, under the default policy 'fail', completes its own session with only the missing
    files, records none as filtered, and removes the record once the session is verified."""
    cut_short_and_resend_refused(instance, demo_root, server)
    first = run_chain(instance, demo_root, VISIT, xnat=xnat_res, selection=only_xnat(), raise_on_error=False)
    assert not first.success
    pending = demo_root / "logs/xnat/QPN001_ses-01.pending.json"
    record = json.loads(pending.read_text())
    dj = json.loads((demo_root / "store/QPN/QPN001_ses-01_metadata_dicoms.json").read_text())
    kept = {d["SOPInstanceUID"] + ".dcm" for d in dj if str(d["SeriesNumber"]) in kept_series(demo_root)}
    assert set(record["files"]) == kept and record["session_label"] == "QPN001_ses-01"
    exp = visit_session(server)
    absent = kept - {name for scan in exp.scans.values() for name in scan.files}
    assert absent
    result = run_chain(instance, demo_root, VISIT, xnat=xnat_res, selection=only_xnat())
    md = metadata_of(result, "xnat_session")
    assert md["status"] == "appended" and md["files_sent"] == len(absent) and md["filtered_by_xnat"] == 0
    assert {k: len(s.files) for k, s in exp.scans.items()} == kept_series(demo_root)
    assert checks_of(result)["scans_match_series"] is True
    assert not pending.exists() and server.prearchive == {}
    assert json.loads((demo_root / "logs/xnat/QPN001_ses-01.json").read_text())["filtered_by_xnat"] == []
