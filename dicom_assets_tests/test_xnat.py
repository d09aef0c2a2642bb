"""The xnat_session asset through the real xnatpy client against an XNAT: the XNAT-compatible
test server on loopback by default (it really unzips and parses what it receives and fails where
XNAT fails; the XNAT class each behaviour follows is named in dicom_assets/testing/xnat/), or a
site's own XNAT with ``XNAT_TEST_URL`` (``xnat_target.py``). These are contract tests: what XNAT
holds is read through its REST API only (``xnat_rest.py``), as xnatpy reads it; a test that needs
what only the test server can do (inject a fault, switch a filter on, count requests) asks for it
through ``target.test_server(why)`` and is skipped on a real XNAT.

The visit's archive chain runs once per test session (``archived_demo``); each test gets its
own copy of that root and runs xnat_session alone, except the first, which runs the whole
chain with XNAT as the sensor's run does."""

import json
import shutil

import pytest
from dagster import EnvVar

from dicom_assets.defs.resources import XnatResource

from .conftest import ARCHIVED_VISIT
from .helpers import AssetSelection, checks_of, metadata_of, run_chain
from .xnat_rest import (
    call,
    create_project,
    delete_scan_file,
    dicom_counts,
    dicom_names,
    experiment,
    experiment_labels,
    experiment_resources,
    first_dicom,
    prearchive_rows,
    project_ids,
    project_resources,
    rest_scans,
    said,
    scan_resource_upload,
    series_descriptions,
    subject_labels,
)
from .xnat_target import XnatTarget

VISIT = ARCHIVED_VISIT
LABEL = "QPN001_ses-01"


@pytest.fixture
def target(xnat_target):
    return xnat_target


@pytest.fixture
def project(target):
    """The visit's XNAT project: QPN_DEMO on the test server, a throwaway one on a real XNAT."""
    return target.project("QPN_DEMO")


@pytest.fixture
def demo_root(archived_demo, tmp_path, project):
    """The demo root with VISIT archived (tarball, metadata), this test's own copy, uploading to ``project``."""
    root = tmp_path / "dataset"
    shutil.copytree(archived_demo, root, symlinks=True)
    if project != "QPN_DEMO":
        set_config(root, xnat_project=project)
    return root


@pytest.fixture
def password(target):
    return target.password


@pytest.fixture
def xnat_res(target, monkeypatch):
    monkeypatch.setenv("XNAT_USER", target.user)
    monkeypatch.setenv("XNAT_PASSWORD", target.password)
    return XnatResource(server=target.url, user=EnvVar("XNAT_USER"), password=EnvVar("XNAT_PASSWORD"))


def kept_series(demo_root):
    dj = json.loads((demo_root / "store/QPN/QPN001_ses-01_metadata_dicoms.json").read_text())
    out = {}
    for d in dj:
        out[str(d["SeriesNumber"])] = out.get(str(d["SeriesNumber"]), 0) + 1
    return out


def only_xnat():
    return AssetSelection.assets("xnat_session")


def as_user(target, user, password):
    """The same XNAT seen by another user (the REST helpers take a target)."""
    return XnatTarget(target.url, user, password, server=target.server)


@pytest.mark.slow
def test_visit_arrives_in_xnat_and_rerun_does_not_duplicate(instance, demo_root, target, project, xnat_res):
    result = run_chain(instance, demo_root, VISIT, xnat=xnat_res)
    assert result.success
    md = metadata_of(result, "xnat_session")
    assert md["status"] == "uploaded" and md["project"] == project
    assert md["xnat_session"].startswith(f"{target.url}/data/projects/{project}/")
    assert project in project_ids(target)  # created on the fly
    assert experiment_labels(target, project, "QPN001") == [LABEL]
    on_server = dicom_counts(target, project, LABEL)
    assert on_server == kept_series(demo_root)
    assert md["files_sent"] == sum(on_server.values())
    # what arrived is real DICOM of this visit, and excluded series never left the site
    descs = set(series_descriptions(target, project, LABEL).values())
    assert "T1w_MPRAGE" in descs and not any("Localizer" in d or "AAHEAD" in d for d in descs)
    assert first_dicom(target, project, LABEL).PatientID == "QPN_001"
    assert experiment_resources(target, project, LABEL)["METADATA"] == {
        "QPN001_ses-01_metadata_tarball.json", "QPN001_ses-01_metadata_dicoms.json"}
    assert checks_of(result)["scans_match_series"] is True
    marker = json.loads((demo_root / "logs/xnat/QPN001_ses-01.json").read_text())
    assert marker["labels"]["session"] == {"given": LABEL, "xnat": LABEL}
    assert marker["filtered_by_xnat"] == [] and marker["warnings"] == []
    assert prearchive_rows(target, project) == []  # staged in the prearchive, archived, row gone

    again = run_chain(instance, demo_root, VISIT, xnat=xnat_res, selection=only_xnat())
    md = metadata_of(again, "xnat_session")
    assert md["status"] == "already_archived" and md["files_sent"] == 0
    assert experiment_labels(target, project) == [LABEL] and dicom_counts(target, project, LABEL) == on_server
    assert prearchive_rows(target, project) == []


@pytest.mark.faults
@pytest.mark.parametrize("status", ["500", "503"])
@pytest.mark.slow
def test_server_error_on_first_attempt_is_retried(instance, demo_root, target, project, xnat_res, status):
    server = target.test_server(f"an injected {status} answer to the import, and the count of import requests")
    server.inject("/data/services/import", status)
    result = run_chain(instance, demo_root, VISIT, xnat=xnat_res, selection=only_xnat())
    assert result.success and metadata_of(result, "xnat_session")["status"] == "uploaded"
    assert sum(1 for m, p in server.requests if p == "/data/services/import") == 2  # refused, then retried
    assert server.imports == 1
    assert any(e.event_type_value == "STEP_UP_FOR_RETRY" for e in result.all_events)
    assert dicom_counts(target, project, LABEL) == kept_series(demo_root)


@pytest.mark.faults
@pytest.mark.slow
def test_timeout_is_retried_without_a_duplicate_session(instance, demo_root, target, project):
    """XNAT answers too late (it still archives the first upload): the retry finds the session
    complete and sends nothing again."""
    server = target.test_server("an import answered after the client's timeout")
    server.slow_seconds = 1.5  # archived at ~2 s; the retry (2 s delay) looks after that
    server.inject("/data/services/import", "slow")
    res = XnatResource(server=target.url, user=target.user, password=target.password, timeout=1)
    result = run_chain(instance, demo_root, VISIT, xnat=res, selection=only_xnat())
    assert result.success
    assert any(e.event_type_value == "STEP_UP_FOR_RETRY" for e in result.all_events)
    assert experiment_labels(target, project, "QPN001") == [LABEL]
    assert dicom_counts(target, project, LABEL) == kept_series(demo_root)


@pytest.mark.faults
@pytest.mark.slow
def test_dropped_connection_mid_upload_leaves_no_half_session(instance, demo_root, target, project, xnat_res):
    server = target.test_server("a connection dropped during the import")
    server.inject("/data/services/import", "drop")
    result = run_chain(instance, demo_root, VISIT, xnat=xnat_res, selection=only_xnat())
    assert result.success
    assert experiment_labels(target, project, "QPN001") == [LABEL]
    assert dicom_counts(target, project, LABEL) == kept_series(demo_root)


@pytest.mark.faults
def test_wrong_password_fails_at_once_with_a_clear_message(instance, demo_root, target, project, monkeypatch, capsys):
    server = target.test_server("counting the login requests")
    monkeypatch.setenv("XNAT_USER", target.user)
    monkeypatch.setenv("XNAT_PASSWORD", "not-the-password-123")
    bad = XnatResource(server=target.url, user=EnvVar("XNAT_USER"), password=EnvVar("XNAT_PASSWORD"))
    result = run_chain(instance, demo_root, VISIT, xnat=bad, selection=only_xnat(), raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert "check XNAT_USER/XNAT_PASSWORD" in failure.event_specific_data.error.message
    assert not any(e.event_type_value == "STEP_UP_FOR_RETRY" for e in result.all_events)
    assert sum(1 for m, p in server.requests if p == "/data/services/auth") == 1
    assert server.imports == 0 and project not in project_ids(target)


def test_password_never_reaches_logs_or_event_log(instance, demo_root, xnat_res, password, capsys, caplog):
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
def test_no_right_to_create_the_project(instance, demo_root, target, project, xnat_res):
    server = target.test_server("a site where only admins create projects (uiAllowNonAdminProjectCreation off)")
    server.can_create_projects = False
    result = run_chain(instance, demo_root, VISIT, xnat=xnat_res, selection=only_xnat(), raise_on_error=False)
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    message = failure.event_specific_data.error.message
    # ProjectResource.handlePut: non-admins may not create projects on this site
    assert (f"XNAT project {project} is not visible to this user and XNAT refused to create it (403: User "
            f"{target.user} doesn't have permission to create projects on this system)") in message
    assert "or the user may not create projects (ask an XNAT admin to create it)" in message
    assert "<html" not in message and "Status page" not in message  # XNAT's HTML status page, read
    assert project not in project_ids(target)


@pytest.mark.faults
@pytest.mark.slow
def test_existing_session_with_other_content_follows_the_policy(instance, demo_root, target, project, xnat_res):
    run_chain(instance, demo_root, VISIT, xnat=xnat_res, selection=only_xnat())
    scans, exp = rest_scans(target, project, LABEL)
    scan_id = sorted(scans)[0]
    removed = sorted(scans[scan_id]["DICOM"])[0]
    delete_scan_file(target, exp["ID"], scan_id, removed)  # someone removed a file on XNAT
    assert removed not in dicom_names(target, project, LABEL)
    result = run_chain(instance, demo_root, VISIT, xnat=xnat_res, selection=only_xnat(), raise_on_error=False)
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert f"already exists in XNAT project {project} with different content" in failure.event_specific_data.error.message
    assert removed not in dicom_names(target, project, LABEL)  # the refusal sent nothing
    set_config(demo_root, xnat_duplicate_policy="append")
    result = run_chain(instance, demo_root, VISIT, xnat=xnat_res, selection=only_xnat())
    md = metadata_of(result, "xnat_session")
    # XNAT refuses files the session already holds ("Session already exists with matching files."): only
    # the missing instance is sent, and the session is complete again
    assert md["status"] == "appended" and md["files_sent"] == 1
    assert removed in dicom_names(target, project, LABEL) and checks_of(result)["scans_match_series"] is True
    assert dicom_counts(target, project, LABEL) == kept_series(demo_root)
    assert prearchive_rows(target, project) == []
    again = run_chain(instance, demo_root, VISIT, xnat=xnat_res, selection=only_xnat())
    md = metadata_of(again, "xnat_session")
    assert md["status"] == "already_archived" and md["files_sent"] == 0


@pytest.mark.faults
@pytest.mark.slow
def test_xnat_down_is_reported_clearly(instance, demo_root):
    res = XnatResource(server="http://127.0.0.1:9", user="nobody", password="x", timeout=5)
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
def test_classic_tree_upload_cli(samples, target, tmp_path, monkeypatch, capsys):
    """A site migrating from the classic script: <root>/<subject>/<session>/<series folders>."""
    from dicom_assets.cli import main

    tree = tmp_path / "tree"
    shutil.copytree(samples.xnat_case001 / "scans", tree / "Case001" / "Case001_MR1")
    (tree / "Case001" / "Case001_MR1" / "notes.txt").write_text("not a DICOM, never sent")
    excl = tmp_path / "exclusions.json"
    excl.write_text(json.dumps({"Exclude": ["LOCALIZER"]}))
    pid = create_project(target, "MIGR")  # an existing project of the site
    monkeypatch.setenv("XNAT_USER", target.user)
    monkeypatch.setenv("XNAT_PASSWORD", target.password)
    code = main(["xnat-upload", str(tree), "--project", pid, "--config", str(excl), "--server", target.url])
    out = capsys.readouterr().out
    assert code == 0, out
    held = {"2": 20, "3": 20, "5": 60, "6": 60, "7": 60, "8": 20, "9": 32, "10": 20}
    assert experiment_labels(target, pid, "Case001") == ["Case001_MR1"]
    assert dicom_counts(target, pid, "Case001_MR1") == held
    assert "Case001/Case001_MR1: uploaded, 292 files sent" in out
    assert target.password not in out
    # a second run sends nothing
    assert main(["xnat-upload", str(tree), "--project", pid, "--config", str(excl), "--server", target.url]) == 0
    assert "Case001/Case001_MR1: already_archived, 0 files sent" in capsys.readouterr().out
    assert dicom_counts(target, pid, "Case001_MR1") == held


# ------------------------------------------------------------------ XNAT as a real XNAT behaves
def set_config(demo_root, **fields):
    cfg = json.loads((demo_root / "global_config.json").read_text())
    cfg.update(fields)
    (demo_root / "global_config.json").write_text(json.dumps(cfg))


def one_series_zip(samples, tmp_path):
    """A zip of one real series (20 files of the xnat sdist's GE session), as the client sends."""
    import zipfile

    z = tmp_path / "series.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for f in sorted((samples.xnat_case001 / "scans").glob("2_*/DICOM/*.dcm")):
            zf.write(f, f.name)
    return z


@pytest.mark.faults
def test_import_service_refuses_what_xnat_refuses(samples, target, tmp_path):
    """The server alone, as XNAT's importer answers: application/zip only; Direct-Archive with
    a dest fails; an upload is staged in the prearchive; a row being archived cannot be deleted."""
    import xnat.exceptions as xe

    server = target.test_server("a prearchive row held locked, as while XNAT archives it")
    z = one_series_zip(samples, tmp_path)
    pid = create_project(target, "P1")
    with target.connect() as s:
        with pytest.raises(xe.XNATUploadError, match=r"(?s)Status code 400, response text .*<h3>Unsupported format"):
            s.services.import_(z, project=pid, subject="S1", experiment="E1", import_handler="DICOM-zip",
                               content_type="application/octet-stream", destination="/archive")
        with pytest.raises(xe.XNATUploadError, match=r"(?s)Status code 400, response text .*<h3>Failed to archive 1 of 1 session"):
            s.services.import_(z, project=pid, subject="S1", experiment="E1", import_handler="DICOM-zip",
                               content_type="application/zip", destination="/archive", direct_archive=True)
        assert s.get_json(f"/data/projects/{pid}/subjects")["ResultSet"]["Result"] == []
        staged = s.services.import_(z, project=pid, subject="S1", experiment="E1", import_handler="DICOM-zip",
                                    content_type="application/zip", destination="/prearchive")
        assert staged.status == "READY" and staged.label == "E1"
        assert s.get_json(f"/data/projects/{pid}/subjects")["ResultSet"]["Result"] == []
        (row,) = s.get_json(f"/data/prearchive/projects/{pid}")["ResultSet"]["Result"]
        key = row["url"].replace("/prearchive/projects/", "")
        server.prearchive[key].status = "_ARCHIVING"  # what XNAT shows while it archives the row
        r = call(target, "DELETE", f"/data/prearchive/projects/{key}")
        assert r.status_code == 409 and "locked" in said(r)
        assert [x["url"] for x in s.get_json(f"/data/prearchive/projects/{pid}")["ResultSet"]["Result"]] == [row["url"]]
        s.post("/data/services/prearchive/delete", query={"src": row["url"]})
        (locked,) = s.get_json(f"/data/prearchive/projects/{pid}")["ResultSet"]["Result"]  # PrearchiveBatchDelete
        assert locked["url"] == row["url"] and locked["status"] == "ARCHIVING"  # leaves a locked row
        server.prearchive[key].status = "READY"
        s.post("/data/services/prearchive/delete", query={"src": row["url"]})
        assert s.get_json(f"/data/prearchive/projects/{pid}")["ResultSet"]["Result"] == []


@pytest.mark.slow
def test_other_resources_of_a_scan_do_not_count(instance, demo_root, target, project, xnat_res):
    """Pipelines add SNAPSHOTS/NIFTI resources to scans: only the DICOM resource is compared."""
    run_chain(instance, demo_root, VISIT, xnat=xnat_res, selection=only_xnat())
    scans, exp = rest_scans(target, project, LABEL)
    for sid in scans:
        scan_resource_upload(target, exp["ID"], sid, "SNAPSHOTS", {f"{sid}_qc.gif": b"GIF89a", f"{sid}_qc_t.gif": b"GIF89a"})
    scan_resource_upload(target, exp["ID"], sorted(scans)[0], "NIFTI", {"vol.nii.gz": b"\x1f\x8b"})
    with_pipelines, _ = rest_scans(target, project, LABEL)
    assert all({"DICOM", "SNAPSHOTS"} <= set(v) for v in with_pipelines.values())
    again = run_chain(instance, demo_root, VISIT, xnat=xnat_res, selection=only_xnat())
    md = metadata_of(again, "xnat_session")
    assert md["status"] == "already_archived" and md["files_sent"] == 0
    assert checks_of(again)["scans_match_series"] is True
    assert rest_scans(target, project, LABEL)[0] == with_pipelines


@pytest.mark.slow
def test_files_xnat_filters_are_reported_not_different_content(instance, demo_root, target, project, xnat_res):
    """XNAT's series import filter drops files on receipt: reported, remembered, not re-sent."""
    server = target.test_server("a site-wide series import filter set")
    server.series_import_filter = r"^T2w"
    result = run_chain(instance, demo_root, VISIT, xnat=xnat_res, selection=only_xnat())
    md = metadata_of(result, "xnat_session")
    descs = series_descriptions(target, project, LABEL)
    assert not any(d.startswith("T2w") for d in descs.values())
    t2 = sum(v for k, v in kept_series(demo_root).items() if k not in descs)
    assert t2 > 0 and md["filtered_by_xnat"] == t2 and md["files_sent"] == sum(kept_series(demo_root).values())
    assert checks_of(result)["scans_match_series"] is True
    marker = json.loads((demo_root / "logs/xnat/QPN001_ses-01.json").read_text())
    assert len(marker["filtered_by_xnat"]) == t2
    again = run_chain(instance, demo_root, VISIT, xnat=xnat_res, selection=only_xnat())
    assert metadata_of(again, "xnat_session")["status"] == "already_archived" and server.imports == 1


@pytest.mark.slow
def test_labels_are_cleaned_as_xnat_cleans_them(instance, demo_root, target, project, xnat_res):
    """XNAT files 'QPN001.ses-01' as 'QPN001_ses-01' (cleanValue): found, reported, not re-sent."""
    set_config(demo_root, session_label_pattern="{participant}.{session}")
    result = run_chain(instance, demo_root, VISIT, xnat=xnat_res, selection=only_xnat())
    md = metadata_of(result, "xnat_session")
    assert md["status"] == "uploaded" and md["session_label"] == LABEL
    assert md["xnat_labels"]["session"] == {"given": "QPN001.ses-01", "xnat": LABEL}
    assert experiment_labels(target, project, "QPN001") == [LABEL]
    marker = json.loads((demo_root / "logs/xnat/QPN001_ses-01.json").read_text())
    assert marker["labels"]["session"]["given"] == "QPN001.ses-01" and marker["session_label"] == LABEL
    again = run_chain(instance, demo_root, VISIT, xnat=xnat_res, selection=only_xnat())
    md = metadata_of(again, "xnat_session")
    assert md["status"] == "already_archived" and md["files_sent"] == 0
    assert experiment_labels(target, project) == [LABEL]


@pytest.mark.slow
def test_subject_is_matched_case_insensitively(instance, demo_root, target, project, xnat_res):
    """XNAT files the session under its existing subject 'qpn001'; the client finds it there."""
    create_project(target, "QPN_DEMO")
    with target.connect() as s:
        s.put(f"/data/projects/{project}/subjects/qpn001")
    result = run_chain(instance, demo_root, VISIT, xnat=xnat_res, selection=only_xnat())
    md = metadata_of(result, "xnat_session")
    assert md["status"] == "uploaded" and md["xnat_labels"]["subject"] == {"given": "QPN001", "xnat": "qpn001"}
    assert subject_labels(target, project) == ["qpn001"]
    assert experiment_labels(target, project, "qpn001") == [LABEL]
    assert checks_of(result)["scans_match_series"] is True
    again = run_chain(instance, demo_root, VISIT, xnat=xnat_res, selection=only_xnat())
    md = metadata_of(again, "xnat_session")
    assert md["status"] == "already_archived" and md["files_sent"] == 0
    assert subject_labels(target, project) == ["qpn001"]


@pytest.mark.faults
@pytest.mark.parametrize("owner,uid,says", [
    ("OTHER", "", "is already used in XNAT project {project} by subject OTHER"),
    ("QPN001", "1.2.826.0.1.3680043.8.498.1", "holds another study (StudyInstanceUID 1.2.826.0.1.3680043.8.498.1"),
])
def test_session_label_is_unique_per_project(instance, demo_root, target, project, xnat_res, owner, uid, says):
    """XNAT answers 409 when the label exists under another subject or study: the client says
    so before sending anything."""
    server = target.test_server("a session without scans of a given StudyInstanceUID made in XNAT")
    create_project(target, "QPN_DEMO")
    server.add_experiment(project, owner, LABEL, uid)
    result = run_chain(instance, demo_root, VISIT, xnat=xnat_res, selection=only_xnat(), raise_on_error=False)
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert says.format(project=project) in failure.event_specific_data.error.message
    assert "labels are unique per project" in failure.event_specific_data.error.message
    assert server.imports == 0 and not any(e.event_type_value == "STEP_UP_FOR_RETRY" for e in result.all_events)
    assert rest_scans(target, project, LABEL)[0] == {} and prearchive_rows(target, project) == []


@pytest.mark.faults
@pytest.mark.slow
def test_failed_upload_cleans_only_its_own_prearchive_rows(instance, demo_root, target, project, xnat_res):
    """Archiving fails once (row left in ERROR, 500): the retry's client removes that row only;
    a scanner's row of the same label and another visit's row stay."""
    server = target.test_server("prearchive rows from a scanner, and an injected archiving failure")
    create_project(target, "QPN_DEMO")
    scanner = server.add_prearchive_row(project, LABEL, "1.2.826.0.1.3680043.8.498.77", "READY")
    other = server.add_prearchive_row(project, "QPN002_ses-01", "1.2.826.0.1.3680043.8.498.78", "ERROR")
    server.inject("/data/services/import", "archive_error")
    result = run_chain(instance, demo_root, VISIT, xnat=xnat_res, selection=only_xnat())
    assert result.success and metadata_of(result, "xnat_session")["status"] == "uploaded"
    assert any(e.event_type_value == "STEP_UP_FOR_RETRY" for e in result.all_events)
    rows = prearchive_rows(target, project)
    assert sorted(r["url"] for r in rows) == sorted(f"/prearchive/projects/{e.key}" for e in (scanner, other))
    assert server.imports == 2 and checks_of(result)["scans_match_series"] is True
    assert dicom_counts(target, project, LABEL) == kept_series(demo_root)


@pytest.mark.faults
@pytest.mark.slow
def test_proxy_504_while_xnat_keeps_archiving(instance, demo_root, target, project, xnat_res):
    """A reverse proxy answers 504 after 1 s; XNAT finishes archiving at ~2.5 s. The client
    polls instead of resending or deleting the row XNAT is archiving."""
    server = target.test_server("a reverse proxy's timeout shorter than XNAT's archiving")
    server.proxy_timeout, server.import_seconds = 1.0, 2.5
    result = run_chain(instance, demo_root, VISIT, xnat=xnat_res, selection=only_xnat())
    md = metadata_of(result, "xnat_session")
    assert result.success and md["status"] == "uploaded" and server.imports == 1
    assert not any(e.event_type_value == "STEP_UP_FOR_RETRY" for e in result.all_events)
    assert dicom_counts(target, project, LABEL) == kept_series(demo_root)
    assert prearchive_rows(target, project) == [] and checks_of(result)["scans_match_series"] is True


@pytest.mark.faults
def test_project_resources_need_the_owner_role(samples, target, tmp_path):
    """A project member may upload sessions but not project resources: the session is uploaded
    first, the refused TCIA resource is a warning."""
    from dicom_assets.core.dicomscan import Rules
    from dicom_assets.core.organize import classify_tree
    from dicom_assets.core.xnat import files_from_records, upload_visit

    server = target.test_server("a second user owning a project the uploader is a member of")
    server.add_user("pi", "pi-pw")
    server.add_project("TCIA_P", owner="pi", members=(target.user,))
    folder = tmp_path / "visit"
    shutil.copytree(next((samples.xnat_case001 / "scans").glob("2_*")), folder)
    files = files_from_records(classify_tree(folder, Rules()), folder)
    manifest = tmp_path / "basket.tcia"
    manifest.write_text("downloadServerUrl=https://example.org\n")
    logs = []
    with target.connect() as s:
        res = upload_visit(s, server=target.url, project="TCIA_P", subject="Case001", session_label="Case001_MR1",
                           files=files, excluded=[], metadata_files=[], log=logs.append,
                           project_files={"TCIA": [manifest]})
    assert res.status == "uploaded" and res.files_sent == 20
    assert list(dicom_counts(target, "TCIA_P", "Case001_MR1").values()) == [20]
    assert len(res.warnings) == 1 and "project resource TCIA of TCIA_P not attached" in res.warnings[0]
    assert "owner role" in res.warnings[0] and res.warnings[0] in logs
    assert project_resources(as_user(target, "pi", "pi-pw"), "TCIA_P") == {}


@pytest.mark.slow
def test_site_anonymization_rewrites_patient_id(instance, demo_root, target, project, xnat_res):
    """XNAT's default site-wide script sets PatientID to the session label: the client compares
    instance names, never bytes, so a re-run still sends nothing."""
    server = target.test_server("XNAT's default site-wide anonymization script switched on")
    server.site_anonymization = True
    run_chain(instance, demo_root, VISIT, xnat=xnat_res, selection=only_xnat())
    ds = first_dicom(target, project, LABEL)
    assert ds.PatientID == LABEL and str(ds.PatientName) == "QPN001"
    again = run_chain(instance, demo_root, VISIT, xnat=xnat_res, selection=only_xnat())
    md = metadata_of(again, "xnat_session")
    assert md["status"] == "already_archived" and md["files_sent"] == 0 and server.imports == 1


# ------------------------------------------------- project accessibility, importer refusals, labels
def write_zip_of(files, dest):
    from dicom_assets.core.xnat import write_zip

    write_zip(files, dest)


def visit_folder(samples, tmp_path, edit=None):
    """One real series as organize keeps it, and its files to send; ``edit(ds)`` changes the
    first file's header."""
    import pydicom

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


def upload(target, files, *, project, subject="Case001", label="Case001_MR1", **kw):
    from dicom_assets.core.xnat import upload_visit

    with target.connect() as s:
        return upload_visit(s, server=target.url, project=project, subject=subject, session_label=label,
                            files=files, excluded=[], metadata_files=[], **kw)


@pytest.mark.faults
def test_projects_are_seen_as_their_accessibility_allows(target):
    """ProjectResource / DefaultUserProjectCache.get / Permissions.canReadProject: a private
    project of others looks absent (GET 404; a PUT is a creation XNAT refuses with 403), a
    protected or public one is listed and readable, its data only when public; only owners and
    members may create data (ProjectListResource's permissions query)."""
    server = target.test_server("a second user owning private, protected and public projects")
    server.add_user("pi", "pi-pw")
    server.add_project("PRIV", owner="pi", accessibility="private")
    server.add_project("PROT", owner="pi")  # XNAT's default accessibility
    server.add_project("PUB", owner="pi", accessibility="public")
    pi = as_user(target, "pi", "pi-pw")
    with pi.connect() as s:  # the owner creates their subjects over REST
        for pid in ("PROT", "PUB"):
            s.put(f"/data/projects/{pid}/subjects/S1")
    with target.connect() as s:
        assert {r["ID"] for r in s.get_json("/data/projects")["ResultSet"]["Result"]} == {"PROT", "PUB"}
        r = call(target, "GET", "/data/projects/PRIV")
        assert r.status_code == 404
        assert said(r) == "Unable to find the specified experiment."  # ProjectResource.represent, sic
        assert s.get_json("/data/projects/PROT")["items"][0]["data_fields"]["ID"] == "PROT"
        r = call(target, "PUT", "/data/projects/PRIV")
        assert r.status_code == 403
        assert said(r) == "User account doesn't have permission to edit this project."
        r = call(target, "PUT", "/data/projects/PROT")
        assert r.status_code == 403
        assert said(r) == f"User {target.user} doesn't have permission to edit the project PROT"
        assert s.get_json("/data/projects/PROT/subjects")["ResultSet"]["Result"] == []
        assert [r["label"] for r in s.get_json("/data/projects/PUB/subjects")["ResultSet"]["Result"]] == ["S1"]
        allowed = s.get_json("/data/projects", query={"permissions": "create", "dataType": "xnat:subjectData"})
        assert allowed["ResultSet"]["Result"] == []
        s.put("/data/projects/MINE")  # a new project: protected, the creator its owner
        s.put("/data/projects/MINE/subjects/S1")
        allowed = s.get_json("/data/projects", query={"permissions": "create", "dataType": "xnat:subjectData"})
        assert [r["id"] for r in allowed["ResultSet"]["Result"]] == ["MINE"]
        s.put("/data/projects/MINE/prearchive_code/4")  # for owners only (ProjectResource)
        r = call(target, "PUT", "/data/projects/MY%20PROJ")
        assert r.status_code == 417
        assert said(r) == "Invalid character in project ID."
    # protected: others see the project, not its data
    assert "MINE" in project_ids(pi) and subject_labels(pi, "MINE") == []
    assert subject_labels(target, "MINE") == ["S1"]


@pytest.mark.faults
@pytest.mark.parametrize("project,accessibility,says", [
    ("PRIV", "private", "is not visible to this user and XNAT refused to create it (403: User account doesn't have "
                        "permission to edit this project.): either it exists as a private project"),
    ("PROT", "protected", "is visible to this user, but the user may not add data to it"),
    ("PUB", "public", "is visible to this user, but the user may not add data to it"),
    ("MY PROJ", None, "XNAT project IDs hold only letters, digits, '_' and '-'"),
])
def test_a_project_the_user_cannot_upload_to_fails_before_sending(samples, target, tmp_path, project,
                                                                 accessibility, says):
    from dicom_assets.core.xnat import XnatError

    server = target.test_server("a second user owning projects of each accessibility; counting requests")
    server.add_user("pi", "pi-pw")
    if accessibility:
        server.add_project(project, owner="pi", accessibility=accessibility)
    files = visit_folder(samples, tmp_path)
    with pytest.raises(XnatError) as err:
        upload(target, files, project=project)
    assert says in str(err.value) and project in str(err.value)
    assert server.imports == 0
    if accessibility:
        assert subject_labels(as_user(target, "pi", "pi-pw"), project) == []
    else:  # refused before asking XNAT to create it
        assert not any(p.startswith("/data/projects") for _, p in server.requests)
        assert project not in project_ids(target)


@pytest.mark.faults
def test_importer_refuses_a_dicom_without_sop_class_uid(samples, target, tmp_path):
    """GradualDicomImporter.call: no SOPClassUID (MediaStorageSOPClassUID does not count) is a
    400 naming the file; under Ignore-Unparsable the file is dropped and the rest archived. A
    file without StudyInstanceUID is accepted (XNAT does not require it)."""
    import zipfile

    import pydicom
    import xnat.exceptions as xe

    files = visit_folder(samples, tmp_path, edit=lambda ds: delattr(ds, "SOPClassUID"))
    bad = next(f for f in files if pydicom.dcmread(f.path, stop_before_pixels=True).get("SOPClassUID") is None)
    assert pydicom.dcmread(bad.path).file_meta.MediaStorageSOPClassUID  # the file meta still names it
    z = tmp_path / "upload.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for f in sorted(files, key=lambda f: f.arcname == bad.arcname):  # the refused file last
            zf.write(f.path, f.arcname)
    pid = create_project(target, "P1")
    kw = dict(project=pid, subject="S1", experiment="E1", import_handler="DICOM-zip",
              content_type="application/zip", destination="/archive")
    with target.connect() as s:
        with pytest.raises(xe.XNATUploadError, match=rf"(?s)response text .*<h3>object {bad.arcname} contains no SOP Class UID"):
            s.services.import_(z, **kw)
        # what was read before it stays, RECEIVING; archived by hand it holds every file but the refused one
        (row,) = s.get_json(f"/data/prearchive/projects/{pid}")["ResultSet"]["Result"]
        assert row["status"] == "RECEIVING"
        s.post("/data/services/archive", query={"src": row["url"]})
        staged = dicom_names(target, pid, "E1")
        assert len(staged) == len(files) - 1 and bad.arcname not in staged
        s.services.import_(z, ignore_unparsable=True, **{**kw, "experiment": "E2"})
        kept = dicom_names(target, pid, "E2")
        assert len(kept) == len(files) - 1 and bad.arcname not in kept
        assert s.get_json(f"/data/prearchive/projects/{pid}")["ResultSet"]["Result"] == []
    ds = pydicom.dcmread(next(f for f in files if f is not bad).path)
    del ds.StudyInstanceUID
    ds.save_as(tmp_path / "no-study.dcm")
    z2 = tmp_path / "no-study.zip"
    with zipfile.ZipFile(z2, "w") as zf:
        zf.write(tmp_path / "no-study.dcm", "no-study.dcm")
    with target.connect() as s:
        s.services.import_(z2, **{**kw, "experiment": "E3", "destination": "/prearchive"})
    assert [r["tag"] for r in prearchive_rows(target, pid)] == [""]


@pytest.mark.faults
def test_client_refuses_to_send_a_dicom_xnat_would_drop(samples, target, project, tmp_path):
    """Under Ignore-Unparsable XNAT drops a file without SOPClassUID silently: the client says
    so, naming the file, before anything is sent."""
    from dicom_assets.core.xnat import XnatError

    files = visit_folder(samples, tmp_path, edit=lambda ds: setattr(ds, "SOPClassUID", ""))
    with pytest.raises(XnatError) as err:
        upload(target, files, project=project)
    assert "1 of the 20 files of Case001_MR1 would be refused by XNAT's importer" in str(err.value)
    assert "(no SOP Class UID (0008,0016))" in str(err.value) and "nothing was sent" in str(err.value)
    assert project not in project_ids(target)  # not even the project was made


@pytest.mark.faults
def test_subject_put_keeps_the_label_as_xnat_does(target):
    """SubjectResource.handlePut: the label is not cleaned nor refused for its characters
    (validateSubject checks the generated ID); it is looked up exactly; XFT's 255-character
    limit is the only refusal."""
    pid = create_project(target, "P1")
    with target.connect() as s:
        r = s.put(f"/data/projects/{pid}/subjects/QPN.001 (b)", accepted_status=[201])
        rows = s.get_json(f"/data/projects/{pid}/subjects")["ResultSet"]["Result"]
        assert [(x["label"], x["ID"]) for x in rows] == [("QPN.001%20(b)", r.text)]  # the URI attribute, not decoded
        assert s.put(f"/data/projects/{pid}/subjects/QPN.001%20(b)", accepted_status=[200]).text == r.text
        s.put(f"/data/projects/{pid}/subjects/qpn.001%20(b)", accepted_status=[201])  # another subject
        assert len(subject_labels(target, pid)) == 2
        r = call(target, "PUT", f"/data/projects/{pid}/subjects/" + "x" * 256)
        assert r.status_code == 400
        assert said(r) == "Must Be Less Than 255 Characters : Current Length (256)\n"
        r = call(target, "PUT", f"/data/projects/{target.project('NOPE')}/subjects/S1")
        assert r.status_code == 422
        assert said(r) == "Submitted subject record must include the project attribute."


@pytest.mark.faults
def test_label_longer_than_xnat_stores_fails_before_sending(samples, target, project, tmp_path):
    from dicom_assets.core.xnat import XnatError

    files = visit_folder(samples, tmp_path)
    with pytest.raises(XnatError, match="has 300 characters; XNAT stores labels of at most 255"):
        upload(target, files, project=project, label="V" * 300)
    assert project not in project_ids(target)  # nothing asked of XNAT, not even the project


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


def raw_import(target, z, **query):
    """POST /data/services/import as XNAT sees it (any query, the answer unparsed)."""
    import requests

    q = {"import-handler": "DICOM-zip", "dest": "/archive", "subject": "S1", "session": "E1", **query}
    with open(z, "rb") as fh:
        return requests.post(f"{target.url}/data/services/import", params=q, data=fh,
                             headers={"Content-Type": "application/zip"}, auth=(target.user, target.password),
                             timeout=60)


@pytest.mark.faults
def test_project_prearchive_code_as_xnat_keeps_it(samples, target, tmp_path):
    """ProjectResource: /data/projects/<id>/prearchive_code gives the code; a new project has the
    site default 4 (BaseXnatProjectdata.initArcProjectImpl); only owners set it. An import with
    dest=/archive is archived at once even in a Manual (0) project: the dest overrides the code
    (DicomZipImporter.determiningDestination); dest=/prearchive stays, its row marked Manual."""
    server = target.test_server("a second user owning a project the uploader is a member of")
    z = series_zips(samples, tmp_path)["all"]
    server.add_user("pi", "pi-pw")
    server.add_project("THEIRS", owner="pi", members=(target.user,))
    with target.connect() as s:
        s.put("/data/projects/P0")
        assert s.get("/data/projects/P0/prearchive_code").text == "4"
        s.put("/data/projects/P0/prearchive_code/0")
        assert s.get("/data/projects/P0/prearchive_code").text == "0"
        r = call(target, "PUT", "/data/projects/P0/prearchive_code/auto")
        assert r.status_code == 400
        assert said(r) == "The submitted code auto is invalid: must be an integer."
        assert s.get("/data/projects/P0/prearchive_code").text == "0"
        assert s.get("/data/projects/THEIRS/prearchive_code").text == "4"
        r = call(target, "PUT", "/data/projects/THEIRS/prearchive_code/0")  # a member, not an owner
        assert r.status_code == 403
        assert said(r) == "User account doesn't have permission to edit this project."
        assert s.get("/data/projects/THEIRS/prearchive_code").text == "4"
    r = raw_import(target, z, project="P0")
    assert r.status_code == 200 and r.text.startswith("/data/archive/projects/P0/")
    assert dicom_counts(target, "P0", "E1") == {"2": 20}
    assert prearchive_rows(target, "P0") == []
    r = raw_import(target, z, project="P0", session="E2", dest="/prearchive")
    assert r.status_code == 200 and r.text.startswith("/data/prearchive/projects/P0/")
    rows = prearchive_rows(target, "P0")
    assert [(r["name"], r["status"], r["autoarchive"]) for r in rows] == [("E2", "READY", "Manual")]


@pytest.mark.faults
def test_import_merges_as_xnats_importer_decides(samples, target, tmp_path):
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
        pid = create_project(target, f"P{i}", prearchive_code=code)
        first = raw_import(target, zips["first"], project=pid)
        assert first.status_code == 200 and first.text.startswith(f"/data/archive/projects/{pid}/"), first.text
        r = raw_import(target, zips[part], project=pid, **query)
        held = dicom_counts(target, pid, "E1")
        rows = prearchive_rows(target, pid)
        if merged:
            ok = r.status_code == 200 and held == {"2": 20} and rows == []
        else:
            ok = (r.status_code, said(r)) == (400, "Failed to archive 1 of 1 session(s)") and held == {"2": 10} \
                and [e["status"] for e in rows] == ["CONFLICT"]
        outcome.append((code, query, part, ok))
    assert [c for c in outcome if not c[3]] == []


@pytest.mark.faults
def test_session_rebuilder_archives_an_interrupted_build_only_on_auto_archive_projects(samples, target, tmp_path):
    """PrearchiveRebuildHandler.rebuild gives way when more data arrives while it builds: the row
    goes back to RECEIVING and the import answers 200 with no URI. SessionXMLRebuilder later
    rebuilds idle rows and archives them only when their code is 4/5; a Manual row stays READY
    until someone archives it (/data/services/archive, which merges)."""
    server = target.test_server("a build interrupted by more data, and a run of the session rebuilder")
    z = series_zips(samples, tmp_path)["all"]
    create_project(target, "PM", prearchive_code=0)
    create_project(target, "PA")  # the site default, 4
    server.inject("/data/services/import", "receiving_interrupt", times=2)
    for pid in ("PM", "PA"):
        r = raw_import(target, z, project=pid)
        assert (r.status_code, r.text) == (200, "")
    assert [r["status"] for r in prearchive_rows(target, "PM") + prearchive_rows(target, "PA")] == ["RECEIVING"] * 2
    assert subject_labels(target, "PM") == [] and subject_labels(target, "PA") == []
    assert len(server.rebuild_idle_sessions(idle_seconds=0)) == 2
    assert dicom_counts(target, "PA", "E1") == {"2": 20} and prearchive_rows(target, "PA") == []
    (row,) = prearchive_rows(target, "PM")
    assert row["status"] == "READY" and subject_labels(target, "PM") == []
    with target.connect() as s:
        s.post("/data/services/archive", query={"src": row["url"]})
    assert dicom_counts(target, "PM", "E1") == {"2": 20}
    assert prearchive_rows(target, "PM") == []


@pytest.mark.faults
def test_upload_kept_in_the_prearchive_of_a_manual_project_fails_clearly(samples, target, project, tmp_path):
    """XNAT's build gives way to more data for the row: the import answers 200 without a URI.
    In a project set to "all to prearchive" (0) its session rebuilder leaves the row READY: the
    client waits while XNAT works on the row, then fails naming the row and what the site admin
    can do, and leaves the row; a re-run sends the files again into that row and completes."""
    from dicom_assets.core.xnat import XnatError

    server = target.test_server("a build interrupted by more data, and XNAT's session rebuilder sped up")
    files = visit_folder(samples, tmp_path)
    create_project(target, "QPN_DEMO", prearchive_code=0)
    server.inject("/data/services/import", "receiving_interrupt")
    server.start_session_rebuilder(idle_seconds=0.5)
    logs = []
    with pytest.raises(XnatError) as err:
        upload(target, files, project=project, log=logs.append, poll_seconds=0.1)
    (row,) = prearchive_rows(target, project)
    assert row["status"] == "READY" and subject_labels(target, project) == []
    msg = str(err.value)
    assert f"kept the upload in its prearchive ({row['url']}, READY)" in msg
    assert "prearchive setting is 0 (everything to the prearchive, for review)" in msg
    assert f"POST /data/services/archive?src={row['url']}" in msg
    assert f"PUT /data/projects/{project}/prearchive_code/4" in msg and "A re-run without either" in msg
    assert any("waiting while XNAT still works on it" in m for m in logs)
    res = upload(target, files, project=project, poll_seconds=0.1)
    assert res.status == "uploaded" and server.imports == 2 and prearchive_rows(target, project) == []
    assert dicom_counts(target, project, "Case001_MR1") == {"2": 20}


@pytest.mark.faults
def test_upload_kept_in_the_prearchive_of_an_auto_archive_project_is_waited_for(samples, target, project, tmp_path):
    """The same answer without a URI in a project set to auto-archive (the default, 4): XNAT's
    session rebuilder archives the row later; the client waits for it and reports the upload."""
    server = target.test_server("a build interrupted by more data, and XNAT's session rebuilder sped up")
    files = visit_folder(samples, tmp_path)
    create_project(target, "QPN_DEMO")
    server.inject("/data/services/import", "receiving_interrupt")
    server.start_session_rebuilder(idle_seconds=0.5)
    logs = []
    res = upload(target, files, project=project, log=logs.append, poll_seconds=0.1)
    assert res.status == "uploaded" and res.files_sent == 20 and server.imports == 1
    assert dicom_counts(target, project, "Case001_MR1") == {"2": 20}
    assert prearchive_rows(target, project) == [] and any("archived Case001_MR1 by itself" in m for m in logs)


@pytest.mark.faults
def test_merge_refused_when_a_session_appears_meanwhile(samples, target, project, tmp_path):
    """Another sender archives the label between the client's look and its import, in a project
    set to "all to prearchive": the import did not ask to merge, so XNAT refuses (row CONFLICT,
    400). The client says so and removes its row; a re-run with policy 'append' sends what the
    session lacks with overwrite=append, which XNAT needs to merge there, and completes."""
    from dicom_assets.core.xnat import XnatError

    server = target.test_server("another sender archiving the label while the import runs")
    files = visit_folder(samples, tmp_path)
    create_project(target, "QPN_DEMO", prearchive_code=0)

    def scanner(row):
        server.on_archive = None
        server.add_experiment(project, "Case001", "Case001_MR1", row.tag)

    server.on_archive = scanner
    with pytest.raises(XnatError) as err:
        upload(target, files, project=project)
    msg = str(err.value)
    # XNAT's own reason, from the row's log (LockAndSync -> PrearcUtils.log), is quoted
    assert f"XNAT refused to archive Case001_MR1 into project {project} (HTTP 400; its prearchive row went to " \
           "CONFLICT; XNAT says: Session already exists, retry with overwrite enabled): a session Case001_MR1 " \
           "appeared there after the client looked" in msg
    assert "prearchive setting is 0 (everything to the prearchive, for review)" in msg
    assert "nothing of this upload was archived" in msg and "'append' sends the instances it lacks" in msg
    assert prearchive_rows(target, project) == [] and rest_scans(target, project, "Case001_MR1")[0] == {}
    assert "overwrite" not in server.import_queries[-1]
    res = upload(target, files, project=project, policy="append")
    assert res.status == "appended" and res.files_sent == 20 and server.import_queries[-1]["overwrite"] == "append"
    assert dicom_counts(target, project, "Case001_MR1") == {"2": 20}
    assert prearchive_rows(target, project) == []


# ------------------------------- partial sessions: a file is "filtered" only when XNAT's filter drops it
def step_failure(result):
    return next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE").event_specific_data.error.message


def cut_short_and_resend_refused(target):
    """XNAT will take part of the next upload (the connection breaks mid-stream, the session
    rebuilder archives what arrived) and drop the files sent again (its importer cannot write
    them; under Ignore-Unparsable it says nothing and answers 200). The test server, for it."""
    server = target.test_server("an upload cut short mid-stream, files XNAT cannot write, its session rebuilder")
    server.inject("/data/services/import", "drop_mid_stream")
    server.inject("/data/services/import", "storage_error")
    server.start_session_rebuilder(idle_seconds=0.5)
    return server


def t2w_files(demo_root):
    """The kept files of the visit's T2w series (what the filters below drop)."""
    dj = json.loads((demo_root / "store/QPN/QPN001_ses-01_metadata_dicoms.json").read_text())
    return {d["SOPInstanceUID"] + ".dcm" for d in dj if (d.get("SeriesDescription") or "").lower().startswith("t2w")}


def kept_names(demo_root):
    dj = json.loads((demo_root / "store/QPN/QPN001_ses-01_metadata_dicoms.json").read_text())
    return {d["SOPInstanceUID"] + ".dcm" for d in dj if str(d["SeriesNumber"]) in kept_series(demo_root)}


@pytest.mark.faults
@pytest.mark.slow
def test_upload_cut_short_and_archived_partially_is_completed(instance, demo_root, target, project, xnat_res):
    """The connection breaks halfway through the upload: XNAT keeps the files it read in a
    RECEIVING row, which its session rebuilder archives as a partial session (the project is
    set to auto-archive, the default 4). The files XNAT's series import filter does not explain
    are missing, not filtered: the client sends them again, only them, with overwrite=append,
    and the session ends complete; nothing is reported as filtered."""
    server = target.test_server("an upload cut short mid-stream, and XNAT's session rebuilder sped up")
    server.inject("/data/services/import", "drop_mid_stream")
    server.start_session_rebuilder(idle_seconds=0.5)
    result = run_chain(instance, demo_root, VISIT, xnat=xnat_res, selection=only_xnat())
    assert result.success
    md = metadata_of(result, "xnat_session")
    total = sum(kept_series(demo_root).values())
    assert dicom_counts(target, project, LABEL) == kept_series(demo_root)
    assert md["status"] == "uploaded" and md["filtered_by_xnat"] == 0
    assert checks_of(result)["scans_match_series"] is True
    marker = json.loads((demo_root / "logs/xnat/QPN001_ses-01.json").read_text())
    assert marker["filtered_by_xnat"] == []
    # the first import was cut short (about half arrived); the second sent only what was missing
    assert server.imports == 2 and [q.get("overwrite") for q in server.import_queries] == ["append"]
    assert total < md["files_sent"] < 2 * total
    assert prearchive_rows(target, project) == []
    again = run_chain(instance, demo_root, VISIT, xnat=xnat_res, selection=only_xnat())
    assert metadata_of(again, "xnat_session")["status"] == "already_archived" and server.imports == 2


@pytest.mark.faults
@pytest.mark.slow
def test_missing_files_that_cannot_be_delivered_fail_the_step(instance, demo_root, target, project, xnat_res):
    """The upload is cut short and archived partially, and XNAT drops the files sent again (its
    importer cannot write them, and says nothing under Ignore-Unparsable): the step fails, saying
    how many files of which series are missing, and nothing is recorded as filtered."""
    server = cut_short_and_resend_refused(target)
    result = run_chain(instance, demo_root, VISIT, xnat=xnat_res, selection=only_xnat(), raise_on_error=False)
    assert not result.success
    assert not any(e.event_type_value == "STEP_UP_FOR_RETRY" for e in result.all_events)
    on_server = dicom_counts(target, project, LABEL)
    missing = sum(kept_series(demo_root).values()) - sum(on_server.values())
    assert missing > 0
    message = step_failure(result)
    assert f"XNAT session QPN001_ses-01 in project {project} is incomplete: {missing} of this visit's" in message
    short = sorted(k for k, n in kept_series(demo_root).items() if on_server.get(k, 0) < n)
    assert all(f"series {k} (" in message for k in short), message
    assert "no series import filter is set for the site or the project" in message
    # every file of the resend dropped: XNAT answers with the last refusal it kept (DicomZipImporter)
    assert "XNAT did not take them" in message and "unable to read DICOM object" in message
    assert "<html" not in message and "<h3>" not in message  # the status text of XNAT's page, not the page
    assert "Nothing was recorded as filtered" in message
    assert "'append' sends only the missing files" in message
    assert not (demo_root / "logs/xnat/QPN001_ses-01.json").exists()
    assert [q.get("overwrite") for q in server.import_queries] == ["append"] and prearchive_rows(target, project) == []


@pytest.mark.faults
@pytest.mark.slow
def test_rerun_completes_a_partial_session_an_older_client_called_filtered(instance, demo_root, target, project,
                                                                           xnat_res):
    """A partial session is in XNAT (an upload cut short, its resending refused) and the marker
    of an earlier upload lists the missing files as "filtered by XNAT", as the older client
    recorded them. The re-run trusts neither: by default it fails naming the missing files'
    series; with policy 'append' it sends only the missing ones and reports none as filtered."""
    server = cut_short_and_resend_refused(target)
    run_chain(instance, demo_root, VISIT, xnat=xnat_res, selection=only_xnat(), raise_on_error=False)  # fails
    # the older client kept no record of what it was sending (with one, the re-run completes its own upload)
    (demo_root / "logs/xnat/QPN001_ses-01.pending.json").unlink()
    kept = kept_names(demo_root)
    absent = sorted(kept - dicom_names(target, project, LABEL))
    assert absent
    marker = demo_root / "logs/xnat/QPN001_ses-01.json"
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"project": project, "subject": "QPN001", "session_label": LABEL,
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
    assert dicom_counts(target, project, LABEL) == kept_series(demo_root)
    assert checks_of(result)["scans_match_series"] is True
    assert json.loads(marker.read_text())["filtered_by_xnat"] == []


@pytest.mark.faults
@pytest.mark.slow
def test_only_files_xnats_filter_drops_are_filtered_in_a_partial_session(instance, demo_root, target, project,
                                                                        xnat_res):
    """The project's series import filter (read from XNAT's configuration, with the site-wide one)
    drops the T2w series, and the upload is cut short and archived partially: the T2w files are
    reported as filtered, every other missing file is sent again. A disabled filter does not
    apply."""
    server = target.test_server("series import filters set, an upload cut short, XNAT's session rebuilder sped up")
    create_project(target, "QPN_DEMO")
    server.set_series_import_filter("# keep every series but T2w\n[SeriesDescription]\n^(?!t2w)", mode="whitelist",
                                    project=project)
    server.set_series_import_filter(".", enabled=False)  # a site-wide blacklist of everything, disabled
    server.inject("/data/services/import", "drop_mid_stream")
    server.start_session_rebuilder(idle_seconds=0.5)
    result = run_chain(instance, demo_root, VISIT, xnat=xnat_res, selection=only_xnat())
    md = metadata_of(result, "xnat_session")
    t2 = t2w_files(demo_root)
    assert t2 and md["filtered_by_xnat"] == len(t2)
    descs = series_descriptions(target, project, LABEL)
    assert not any(d.lower().startswith("t2w") for d in descs.values())
    held = dicom_counts(target, project, LABEL)
    assert held == {k: n for k, n in kept_series(demo_root).items() if k in descs}
    assert sum(held.values()) == sum(kept_series(demo_root).values()) - len(t2)
    assert sorted(json.loads((demo_root / "logs/xnat/QPN001_ses-01.json").read_text())["filtered_by_xnat"]) == sorted(t2)
    assert checks_of(result)["scans_match_series"] is True and server.imports == 2
    again = run_chain(instance, demo_root, VISIT, xnat=xnat_res, selection=only_xnat())
    assert metadata_of(again, "xnat_session")["status"] == "already_archived" and server.imports == 2


@pytest.mark.faults
def test_files_xnat_cannot_write_are_dropped_silently_and_sent_again(samples, target, project, tmp_path):
    """XNAT's disk fills after 5 files: GradualDicomImporter.call's catch-all turns each failed
    write into a refused object, which Ignore-Unparsable drops without a word, and XNAT answers
    200 with the URI of a session of 5 files. The client sees 15 missing, not filtered, sends
    them again (only them) and the session ends complete."""
    server = target.test_server("XNAT's storage failing after 5 files")
    files = visit_folder(samples, tmp_path)
    create_project(target, "QPN_DEMO")
    server.storage_error_after = 5
    server.inject("/data/services/import", "storage_error")
    logs = []
    res = upload(target, files, project=project, log=logs.append)
    assert res.status == "uploaded" and res.files_sent == 35 and res.filtered == []
    assert any("lacks 15 of the files sent" in m for m in logs)
    assert [q.get("overwrite") for q in server.import_queries] == [None, "append"]
    assert prearchive_rows(target, project) == [] and dicom_counts(target, project, "Case001_MR1") == {"2": 20}


@pytest.mark.faults
def test_import_stopped_mid_zip_leaves_no_partial_session(samples, target, project, tmp_path):
    """Without Ignore-Unparsable XNAT stops the import at the first file it cannot write (400),
    after staging 5 files in a RECEIVING row: as the client would meet it from an XNAT before
    1.8.3. A client removing its rows leaves the rebuilder no partial session to archive."""
    server = target.test_server("XNAT's storage failing after 5 files")
    files = visit_folder(samples, tmp_path)
    create_project(target, "QPN_DEMO")
    server.storage_error_after = 5
    server.inject("/data/services/import", "storage_error")
    z = tmp_path / "all.zip"
    write_zip_of(files, z)
    with target.connect() as s:
        r = call(target, "POST", "/data/services/import", params={"import-handler": "DICOM-zip", "dest": "/archive",
                                                                   "project": project, "subject": "S", "session": "V"},
                 data=z.read_bytes(), headers={"Content-Type": "application/zip"})
        assert r.status_code == 400
        assert "unable to read DICOM object" in said(r)
        rows = s.get_json(f"/data/prearchive/projects/{project}")["ResultSet"]["Result"]
        assert [row["status"] for row in rows] == ["RECEIVING"]


@pytest.mark.faults
def test_series_import_filters_as_xnat_keeps_and_applies_them(samples, target, tmp_path):
    """DicomFilterService / ConfigResource / RegExBasedSeriesImportFilter: the site-wide and the
    project's filter are configurations any reader of the project may read (404 when none); an
    object must pass both; patterns are case-insensitive and searched; [tag] sections and
    EXISTS apply to other headers; a disabled filter does not apply. The client reads them and
    explains a drop only when a filter it read drops the file."""
    import pydicom

    from dicom_assets.core.xnat import series_import_filters

    server = target.test_server("site-wide and project series import filters switched between imports")
    files = visit_folder(samples, tmp_path)
    z = series_zips(samples, tmp_path)["all"]
    desc = pydicom.dcmread(files[0].path, stop_before_pixels=True).SeriesDescription
    server.add_user("pi", "pi-pw")
    create_project(target, "P1")
    server.add_project("THEIRS", owner="pi")
    with target.connect() as s:
        assert call(target, "GET", "/data/config/seriesImportFilter/config").status_code == 404
        assert series_import_filters(s, "P1").describe() == "no series import filter is set for the site or the project"
        r = call(target, "GET", "/data/projects/THEIRS/config/seriesImportFilter/config")
        assert r.status_code == 403
        assert said(r) == f"User {target.user} can not access project THEIRS"
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
            r = raw_import(target, z, project="P1", session=f"E{i}")
            assert r.status_code == 200
            held = sum(dicom_counts(target, "P1", f"E{i}").values()) if experiment(target, "P1", f"E{i}") else 0
            assert held == kept, (i, r.text)
            assert series_import_filters(s, "P1").drops(files[0]) == (kept == 0), i
        rows = s.get_json("/data/projects/P1/config/seriesImportFilter/config")["ResultSet"]["Result"]
        assert rows[0]["status"] == "enabled" and json.loads(rows[0]["contents"])["mode"] == "whitelist"
        server.set_series_import_filter("x", mode="whitelist", enabled=False)
        assert call(target, "GET", "/data/config/seriesImportFilter/config",
                    params={"contents": "true"}).status_code == 404


# ------------------------------------------------- a retry completes its own unfinished upload
def wait_for_session(target, project, label="Case001_MR1", seconds=10.0):
    """The session XNAT's session rebuilder archives, as REST shows it (its DICOM file names)."""
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if experiment(target, project, label) is not None and not prearchive_rows(target, project):
            return dicom_names(target, project, label)
        time.sleep(0.05)
    raise AssertionError("XNAT's session rebuilder did not archive the partial row")


@pytest.mark.faults
def test_retry_completes_its_own_partial_session_under_the_default_policy(samples, target, project, tmp_path):
    """The connection breaks mid-upload and the client's wait for XNAT's RECEIVING row runs out
    (a transient failure: Dagster retries); XNAT's session rebuilder then archives the row as a
    partial session. The retry, under the default policy 'fail', finds that every file of the
    session is one this client recorded as being sent for the visit: its own unfinished upload.
    It sends only the missing files (overwrite=append), records none as filtered, and removes the
    record once the session is complete."""
    from dicom_assets.core.xnat import XnatTransientError

    server = target.test_server("an upload cut short mid-stream, then XNAT's session rebuilder sped up")
    files = visit_folder(samples, tmp_path)
    pending = tmp_path / "logs/xnat/visit.pending.json"
    create_project(target, "QPN_DEMO")
    server.inject("/data/services/import", "drop_mid_stream")
    with pytest.raises(XnatTransientError, match="still receiving"):
        upload(target, files, project=project, pending_path=pending, wait_seconds=0.2, poll_seconds=0.05)
    record = json.loads(pending.read_text())
    assert record["project"] == project and record["session_label"] == "Case001_MR1"
    assert set(record["files"]) == {f.arcname for f in files} and target.password not in pending.read_text()
    server.start_session_rebuilder(idle_seconds=0.3)
    partial = wait_for_session(target, project)
    assert 0 < len(partial) < len(files)
    res = upload(target, files, project=project, pending_path=pending, wait_seconds=5, poll_seconds=0.05)
    assert res.status == "appended" and res.files_sent == len(files) - len(partial) and res.filtered == []
    assert dicom_names(target, project, "Case001_MR1") == {f.arcname for f in files}
    assert [q.get("overwrite") for q in server.import_queries][-1] == "append"
    assert not pending.exists() and prearchive_rows(target, project) == []


@pytest.mark.faults
def test_partial_session_with_a_file_not_being_sent_follows_the_policy(samples, target, project, tmp_path):
    """A partial session holding a file this client did not record as being sent for the visit
    is someone else's data: policy 'fail' fails as before, sending nothing, and the record stays."""
    from dicom_assets.core.xnat import XnatError, write_pending

    files = visit_folder(samples, tmp_path)
    create_project(target, "QPN_DEMO")
    upload(target, files[:8], project=project)  # someone else's session: 8 files, two of them not of this visit
    before = dicom_names(target, project, "Case001_MR1")
    pending = tmp_path / "logs/xnat/visit.pending.json"
    write_pending(pending, project=project, subject="Case001", label="Case001_MR1", tag=files[0].study_instance_uid,
                  files=files[2:])
    with pytest.raises(XnatError, match=f"already exists in XNAT project {project} with different content .*12 of "
                                        "this visit's 18 files missing.*2 files this visit does not have"):
        upload(target, files[2:], project=project, pending_path=pending)
    assert pending.exists() and len(before) == 8
    assert dicom_names(target, project, "Case001_MR1") == before and prearchive_rows(target, project) == []


@pytest.mark.faults
@pytest.mark.slow
def test_asset_rerun_completes_its_own_partial_session_and_removes_the_record(instance, demo_root, target, project,
                                                                             xnat_res):
    """Through the asset: an upload cut short whose resending XNAT refuses fails the step and
    leaves the partial session and the record of what was being sent (beside the marker). The
    re-run, under the default policy 'fail', completes its own session with only the missing
    files, records none as filtered, and removes the record once the session is verified."""
    cut_short_and_resend_refused(target)
    first = run_chain(instance, demo_root, VISIT, xnat=xnat_res, selection=only_xnat(), raise_on_error=False)
    assert not first.success
    pending = demo_root / "logs/xnat/QPN001_ses-01.pending.json"
    record = json.loads(pending.read_text())
    kept = kept_names(demo_root)
    assert set(record["files"]) == kept and record["session_label"] == LABEL
    absent = kept - dicom_names(target, project, LABEL)
    assert absent
    result = run_chain(instance, demo_root, VISIT, xnat=xnat_res, selection=only_xnat())
    md = metadata_of(result, "xnat_session")
    assert md["status"] == "appended" and md["files_sent"] == len(absent) and md["filtered_by_xnat"] == 0
    assert dicom_counts(target, project, LABEL) == kept_series(demo_root)
    assert checks_of(result)["scans_match_series"] is True
    assert not pending.exists() and prearchive_rows(target, project) == []
    assert json.loads((demo_root / "logs/xnat/QPN001_ses-01.json").read_text())["filtered_by_xnat"] == []


# ------------------------------------------------- why XNAT refuses to create a project
@pytest.mark.faults
def test_a_deleted_projects_id_is_refused_by_name(samples, target, project, tmp_path):
    """ProjectResource.handlePut: a new project whose ID is in xnat_projectdata_history (a
    project of that ID was deleted) is refused with 403; the client says so, not "not visible"."""
    from dicom_assets.core.xnat import XnatAuthError, XnatError

    create_project(target, "QPN_DEMO")
    with target.connect() as s:
        s.delete(f"/data/projects/{project}", query={"removeFiles": "true"})
    assert project not in project_ids(target)
    with pytest.raises(XnatError) as err:
        upload(target, visit_folder(samples, tmp_path), project=project)
    message = str(err.value)
    assert not isinstance(err.value, XnatAuthError)
    assert f"XNAT project {project} cannot be created: XNAT refused the ID because a project of that ID was " \
           f"deleted (403: Project '{project}' was used in a previously deleted project and cannot be reused.)" in message
    assert "set xnat_project to another ID" in message and project not in project_ids(target)


@pytest.mark.faults
@pytest.mark.parametrize("field", ["secondary_ID", "name"])
def test_an_id_another_project_holds_is_refused_by_name(samples, target, project, tmp_path, field):
    """XnatProjectdata.validateProjectFields: the new ID may not be another project's running
    title (secondary_ID) or title, case-insensitively: 409 naming the conflict; the client says
    which and why."""
    from dicom_assets.core.xnat import XnatError

    other = target.project("OTHER")
    with target.connect() as s:
        s.put(f"/data/projects/{other}", query={field: project.lower()})
    with pytest.raises(XnatError) as err:
        upload(target, visit_folder(samples, tmp_path), project=project)
    message = str(err.value)
    assert f"XNAT project {project} cannot be created: its ID is already used by another project" in message
    assert (f"(409: Requested new project conflicts with existing projects: Invalid Project Id: '{project.lower()}' "
            "is already being used.)") in message
    assert project not in project_ids(target)


# ------------------------------------------------- a merge XNAT refuses across modalities
def as_ct(samples, tmp_path, count=10):
    """``count`` of the series' files as a CT exam (CT Image Storage, Modality CT), same names."""
    import pydicom
    from pydicom.uid import CTImageStorage

    from dicom_assets.core.dicomscan import Rules
    from dicom_assets.core.organize import classify_tree
    from dicom_assets.core.xnat import files_from_records

    folder = tmp_path / "ct"
    shutil.copytree(next((samples.xnat_case001 / "scans").glob("2_*")), folder)
    for path in sorted(folder.rglob("*.dcm"))[count:]:
        path.unlink()
    for path in folder.rglob("*.dcm"):
        ds = pydicom.dcmread(path)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.Modality = "CT"
        ds.save_as(path)
    return files_from_records(classify_tree(folder, Rules()), folder)


@pytest.mark.faults
def test_an_append_of_another_modality_is_refused_by_name(samples, target, project, tmp_path):
    """PrearcSessionArchiver.checkForConflicts under preventCrossModalityMerge (on by default):
    the MR files appended to a CT session of the label make a session of another data type, so
    XNAT refuses the merge (409, row CONFLICT, 400); the client says so by name and removes its
    row; the CT session stays as it was."""
    from dicom_assets.core.xnat import XnatError

    ct = as_ct(samples, tmp_path)
    assert upload(target, ct, project=project).status == "uploaded"
    assert experiment(target, project, "Case001_MR1")["xsiType"] == "xnat:ctSessionData"
    mr = visit_folder(samples, tmp_path)
    with pytest.raises(XnatError) as err:
        upload(target, mr, project=project, policy="append")
    message = str(err.value)
    assert f"XNAT refused to merge this upload into session Case001_MR1 of project {project}: the upload builds a " \
           "session of another modality than the one XNAT holds" in message
    assert "Invalid modification of session modality via archive process" in message
    assert "preventCrossModalityMerge" in message and "conflict with the session" not in message
    assert dicom_names(target, project, "Case001_MR1") == {f.arcname for f in ct}
    assert prearchive_rows(target, project) == []
