"""How XNAT builds a session out of what it receives (scan IDs, the ``secondary`` resource,
UIDs rewritten by a project's anonymization script), and the client's completeness check
against it (the test server's own rules are tested in test_xnat_test_server.py). These are
contract tests: they read XNAT only through its REST API, as xnatpy does,
and run against the test server, or a real XNAT with ``XNAT_TEST_URL`` (``xnat_target.py``)."""

from __future__ import annotations

import shutil

import pydicom
import pytest
from pydicom.uid import SecondaryCaptureImageStorage, generate_uid

from dicom_assets.core.dicomscan import Rules
from dicom_assets.core.organize import classify_tree
from dicom_assets.core.xnat import compare_series, files_from_records, upload_visit
from dicom_assets.testing.xnat.dicomedit import HASH_UIDS_SCRIPT

from .xnat_rest import call, file_count, imports, prearchive_rows, rest_scans, subject_labels


# --------------------------------------------------------------------------- a visit XNAT splits up
def tricky_visit(samples, tmp_path):
    """20 real MR files split into what scanners and TCIA deliver: two series sharing number 3, a
    series without a SeriesNumber, and a Secondary Capture series (a dose report's kind)."""
    folder = tmp_path / "visit"
    shutil.copytree(next((samples.xnat_case001 / "scans").glob("2_*")), folder)
    files = sorted(folder.rglob("*.dcm"))
    groups = [("3", "T1 run 1", None), ("3", "T1 run 2", None), ("", "no number", None),
              ("9", "Dose Report", SecondaryCaptureImageStorage)]
    for g, (number, desc, sop_class) in enumerate(groups):
        uid = generate_uid()
        for path in files[g * 5:(g + 1) * 5]:
            ds = pydicom.dcmread(path)
            ds.SeriesInstanceUID, ds.SeriesDescription = uid, desc
            if number:
                ds.SeriesNumber = number
            elif "SeriesNumber" in ds:
                del ds.SeriesNumber
            if sop_class:
                ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
                ds.Modality = "OT"
            ds.save_as(path)
    records = classify_tree(folder, Rules(exclude_derived=False))  # a site that keeps its dose reports
    kept = files_from_records(records, folder)
    assert len(kept) == 20, [(r.source, r.reason) for r in records if r.decision != "kept"]
    return kept



def upload(target, project, files, label="V1", **kw):
    with target.connect() as s:
        return upload_visit(s, server=target.url, project=project, subject="P1", session_label=label, files=files,
                            excluded=[], metadata_files=[], **kw)




def import_zip(target, project, files, zpath, session="V1", accepted=(200,)):
    """The visit's files zipped and POSTed to XNAT's import service as the client does (no
    client logic: the request alone), after the project is made; XNAT's answer."""
    from dicom_assets.core.xnat import write_zip

    write_zip(files, zpath)
    with target.connect() as s:
        s.put(f"/data/projects/{project}")
    r = call(target, "POST", "/data/services/import", params={"import-handler": "DICOM-zip", "dest": "/archive",
                                                              "project": project, "subject": "P1", "session": session},
             data=zpath.read_bytes(), headers={"Content-Type": "application/zip"})
    assert r.status_code in accepted, (r.status_code, r.text)
    return r



def test_shared_numbers_a_blank_number_and_a_secondary_capture_upload_complete(samples, xnat_target, tmp_path):
    project = xnat_target.project("BUILD")
    files = tricky_visit(samples, tmp_path)
    res = upload(xnat_target, project, files)
    assert res.status == "uploaded" and res.files_sent == 20
    scans, _exp = rest_scans(xnat_target, project, "V1")
    blank_uid = next(f.series_instance_uid for f in files if f.series_number is None)
    # XNAT's scan IDs, not the series numbers: 3-MR1/3-MR2 (no plain 3), the UID for the blank one
    assert sorted(scans) == sorted(["3-MR1", "3-MR2", "9", blank_uid.replace(".", "_")])
    assert set(scans["9"]) == {"secondary"} and len(scans["9"]["secondary"]) == 5  # Secondary Capture
    assert all(set(v) == {"DICOM"} and len(v["DICOM"]) == 5 for k, v in scans.items() if k != "9")
    # the check of the asset: every series whole on XNAT, matched by its instances
    rows = compare_series(files, res.held)
    assert [(r["series_number"], r["expected"], r["on_xnat"]) for r in rows] == [
        (3, 5, 5), (3, 5, 5), (9, 5, 5), (None, 5, 5)]
    assert {r["scans"] for r in rows if r["series_number"] == 3} == {"3-MR1", "3-MR2"}
    again = upload(xnat_target, project, files)
    assert again.status == "already_archived" and again.files_sent == 0
    assert imports(xnat_target, project) in (None, 1)


@pytest.mark.slow
def test_a_rerun_appends_only_what_is_missing_into_xnats_own_scans(samples, xnat_target, tmp_path):
    project = xnat_target.project("BUILD")
    files = tricky_visit(samples, tmp_path)
    first = [f for f in files if f.series_number is not None and f.series_description != "T1 run 2"]
    upload(xnat_target, project, first)
    res = upload(xnat_target, project, files, policy="append")
    assert res.status == "appended" and res.files_sent == 10
    scans, _ = rest_scans(xnat_target, project, "V1")
    # the new series sharing number 3 gets its own scan on the merge (correctScanID), every file once
    assert file_count(scans) == 20
    assert all(r["on_xnat"] == r["expected"] for r in compare_series(files, res.held))
    assert upload(xnat_target, project, files).status == "already_archived"


@pytest.mark.slow
def test_uids_rewritten_by_a_project_script_still_a_complete_session(samples, xnat_target, tmp_path):
    server = xnat_target.test_server("a project anonymization script that hashUIDs the study, series and SOP UIDs")
    project = xnat_target.project("BUILD")
    server.add_project(project, owner=xnat_target.user)
    server.set_anon_script(HASH_UIDS_SCRIPT, project=project)
    files = tricky_visit(samples, tmp_path)
    res = upload(xnat_target, project, files)
    assert res.status == "uploaded"
    scans, _exp = rest_scans(xnat_target, project, "V1")
    with xnat_target.connect() as s:  # the session's StudyInstanceUID, as XNAT reports it
        uid = s.get_json(f"/data/experiments/{_exp['ID']}")["items"][0]["data_fields"]["UID"]
    assert uid.startswith("2.25.") and uid != files[0].study_instance_uid  # XNAT holds other UIDs now
    assert file_count(scans) == 20
    again = upload(xnat_target, project, files)
    assert again.status == "already_archived" and again.files_sent == 0 and imports(xnat_target, project) == 1


# --------------------------------------------------------------------------- several studies, busy sessions
def two_study_visit(samples, tmp_path):
    """The 20 files as two studies of one visit (a scanner that split the exam)."""
    files = tricky_visit(samples, tmp_path)
    second = generate_uid()
    for f in files[10:]:
        ds = pydicom.dcmread(f.path)
        ds.StudyInstanceUID = second
        ds.save_as(f.path)
    return files_from_records(classify_tree(files[0].path.parents[1], Rules(exclude_derived=False)),
                              files[0].path.parents[1])


def test_xnat_archives_the_first_of_two_studies_and_refuses_the_next(samples, xnat_target, tmp_path):
    """What XNAT does with a zip of two studies under one label (PrearcDatabase: one row per
    study; DicomZipImporter.xmlBuild archives them in turn): the first is archived, the second's
    row goes to CONFLICT with XNAT's reason in its log, and the import answers 400."""
    project = xnat_target.project("BUILD")
    r = import_zip(xnat_target, project, two_study_visit(samples, tmp_path), tmp_path / "two.zip", accepted=[400])
    assert r.status_code == 400
    with xnat_target.connect() as s:
        rows = s.get_json(f"/data/prearchive/projects/{project}")["ResultSet"]["Result"]
        assert [row["status"] for row in rows] == ["CONFLICT"]
        reason = s.get(f"/data{rows[0]['url']}/logs/last").text
        assert "Invalid modification of session UID" in reason
        s.post("/data/services/prearchive/delete", query={"src": rows[0]["url"]})
    scans, _ = rest_scans(xnat_target, project, "V1")
    assert file_count(scans) == 10  # the first study only


def test_the_client_refuses_a_visit_of_two_studies_before_sending(samples, xnat_target, tmp_path):
    from dicom_assets.core.xnat import XnatError

    project = xnat_target.project("BUILD")
    files = two_study_visit(samples, tmp_path)
    with pytest.raises(XnatError) as err:
        upload(xnat_target, project, files)
    message = str(err.value)
    assert "V1 holds 2 studies" in message and "10 files" in message and "nothing was sent" in message
    assert imports(xnat_target, project) in (None, 0) and prearchive_rows(xnat_target, project) == []


@pytest.mark.slow
def test_a_busy_session_is_waited_for_then_completed(samples, xnat_target, tmp_path):
    """An automation run on archive keeps a workflow open on the session: XNAT refuses the merge
    (PrearcSessionArchiver.preventConcurrentArchiving); the client names it, waits, sends again."""
    server = xnat_target.test_server("a workflow opened on the session and closed while the client waits")
    project = xnat_target.project("BUILD")
    files = tricky_visit(samples, tmp_path)
    upload(xnat_target, project, files[:10])
    _, exp = rest_scans(xnat_target, project, "V1")
    session = server.find_experiment(exp["ID"])
    server.open_workflow(session)
    logs = []

    def log(message):  # the automation finishes while the client waits
        logs.append(message)
        if "is busy in XNAT" in message:
            server.close_workflows(session)

    res = upload(xnat_target, project, files, policy="append", poll_seconds=0.3, wait_seconds=20, log=log)
    assert res.status == "appended" and res.files_sent == 10
    assert any("is busy in XNAT" in m for m in logs)
    assert prearchive_rows(xnat_target, project) == []  # the refused rows were removed each time


@pytest.mark.slow
def test_a_session_busy_for_good_fails_naming_the_workflow(samples, xnat_target, tmp_path):
    from dicom_assets.core.xnat import XnatBusyError

    server = xnat_target.test_server("a workflow left open on the session")
    project = xnat_target.project("BUILD")
    files = tricky_visit(samples, tmp_path)
    upload(xnat_target, project, files[:10])
    _, exp = rest_scans(xnat_target, project, "V1")
    server.open_workflow(server.find_experiment(exp["ID"]), pipeline="dcm2niix-container")
    with pytest.raises(XnatBusyError) as err:
        upload(xnat_target, project, files, policy="append", poll_seconds=0.2, wait_seconds=0.5)
    message = str(err.value)
    assert "is busy" in message and "dcm2niix-container" in message and "conflict with" not in message
    assert prearchive_rows(xnat_target, project) == []


@pytest.mark.slow
def test_contract_tests_need_nothing_but_the_rest_api(samples, tmp_path):
    """This module and test_xnat.py against an XNAT they can only reach over HTTP (the test server
    in a process of its own, given as XNAT_TEST_URL, as a site gives its own XNAT): every test
    passes or says it needs the test server; none touches the server's internals."""
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    from .helpers import free_port

    repo = Path(__file__).resolve().parents[1]
    port, password = free_port(), "pw-contract"
    env = {**os.environ, "XNAT_PASSWORD": password}
    # its log to a file: a pipe nobody reads fills up and blocks the server
    log = open(tmp_path / "xnat-server.log", "wb")
    server = subprocess.Popen([str(Path(sys.executable).with_name("dicom-assets-testing")), "xnat-server", "--port",
                               str(port), "--user", "admin"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        import requests

        for _ in range(100):
            try:
                requests.get(f"http://127.0.0.1:{port}/data/version", timeout=1)
                break
            except requests.ConnectionError:
                time.sleep(0.2)
        run_env = {**os.environ, "XNAT_TEST_URL": f"http://127.0.0.1:{port}", "XNAT_TEST_USER": "admin",
                   "XNAT_TEST_PASSWORD": password}
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                               str(Path(__file__)), str(Path(__file__).with_name("test_xnat.py")),
                               "-k", "not contract_tests_need"],
                              cwd=repo, env=run_env, capture_output=True, text=True, timeout=600)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)
        log.close()
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:]
    assert "skipped" in out and "needs the XNAT test server" in out  # the fault cases say why
    assert " passed" in out


@pytest.mark.slow
def test_a_login_that_expires_mid_upload_is_renewed_once(samples, xnat_target, tmp_path):
    """XNAT ends the login while the upload is archived (sessionTimeout, or a restart): its next
    answer is 401 although the credentials are right. The client logs in again once and goes
    on: the session is found complete, nothing is sent twice; without a way to log in again the
    401 fails the step as a credentials error, as before."""
    from dicom_assets.core.xnat import XnatAuthError

    server = xnat_target.test_server("ending XNAT's login sessions during an upload")
    project = xnat_target.project("BUILD")
    files = tricky_visit(samples, tmp_path)
    server.on_archive = lambda row: server.expire_logins()
    logs, logins = [], []

    def reconnect():
        import xnat

        logins.append(1)
        return xnat.connect(xnat_target.url, user=xnat_target.user, password=xnat_target.password, loglevel="ERROR")

    res = upload(xnat_target, project, files, log=logs.append, reconnect=reconnect)
    assert res.status == "uploaded" and res.files_sent == 20 and logins == [1]
    assert any("logging in again, once" in m for m in logs)
    assert imports(xnat_target, project) == 1
    with pytest.raises(XnatAuthError, match="401"):
        upload(xnat_target, project, files, label="V2")


def test_a_file_without_study_uid_xnat_cannot_build_is_refused_before_sending(samples, xnat_target, tmp_path):
    """XNAT's importer takes a DICOM without StudyInstanceUID, but its session builder cannot
    build a session of it (DICOMSessionBuilder: NoUniqueSessionException) and the archive fails:
    the client refuses such a visit before sending, naming the files."""
    from dicom_assets.core.xnat import XnatError

    project = xnat_target.project("BUILD")
    files = tricky_visit(samples, tmp_path)
    ds = pydicom.dcmread(files[0].path)
    del ds.StudyInstanceUID
    ds.save_as(files[0].path)
    files = files_from_records(classify_tree(files[0].path.parents[1], Rules(exclude_derived=False)),
                               files[0].path.parents[1])
    with pytest.raises(XnatError, match="1 files of V1 carry no StudyInstanceUID"):
        upload(xnat_target, project, files)
    assert imports(xnat_target, project) in (None, 0)
    lone = [f for f in files if not f.study_instance_uid]
    # what XNAT does with it: taken, then the archive fails
    r = import_zip(xnat_target, project, lone, tmp_path / "lone.zip", session="V9", accepted=[400])
    assert r.status_code == 400
    with xnat_target.connect() as s:
        rows = s.get_json(f"/data/prearchive/projects/{project}")["ResultSet"]["Result"]
        assert [row["status"] for row in rows] == ["ERROR"]
        s.post("/data/services/prearchive/delete", query={"src": rows[0]["url"]})


def test_the_import_answers_the_archived_session_by_its_labels(samples, xnat_target, tmp_path):
    """PrearcSessionArchiver.buildURI: /archive/projects/<project>/subjects/<subject label>/
    experiments/<session label>, labels not accession IDs (a client must not parse IDs out of it)."""
    project = xnat_target.project("BUILD")
    files = [f for f in tricky_visit(samples, tmp_path) if f.series_description == "T1 run 1"]
    r = import_zip(xnat_target, project, files, tmp_path / "one.zip")
    assert r.text.strip().endswith(f"/archive/projects/{project}/subjects/P1/experiments/V1")


# --------------------------------------------------------------------------- anonymization's reject
DOSE_REJECT = 'version "6.1"\n// dose reports stay at the scanner\n(0008,103E) = "Dose Report" ? reject\n'


@pytest.mark.parametrize("scope,script,says", [
    ("site", DOSE_REJECT, "the site-wide anonymization script's statement `(0008,103E) = \"Dose Report\" ? reject`"),
    ("project", 'version "6.1"\n(0008,103E) ~ "Dose.*" ? reject\n(0010,0010) := subject\n',
     "the project BUILD anonymization script's statement `(0008,103E) ~ \"Dose.*\" ? reject`"),
], ids=["site", "project"])
def test_files_an_anonymization_script_rejects_are_named_not_sent_again(samples, xnat_target, tmp_path, scope,
                                                                          script, says):
    """A site-wide script's reject drops the file as it arrives (GradualDicomImporter), a
    project's deletes it from the session as XNAT archives it (MergeUtils.deleteRejectedFiles):
    XNAT answers 200 with the session either way. The client reads the scripts, evaluates the
    reject's condition on the missing files' headers and names the script and the series; it
    sends them neither again now nor on a re-run."""
    from dicom_assets.core.xnat import XnatError

    server = xnat_target.test_server("an anonymization script that rejects a series (set by an XNAT admin)")
    project = xnat_target.project("BUILD")
    server.add_project(project, owner=xnat_target.user)
    server.set_anon_script('version "6.1"\nreject\n', project=None if scope == "project" else project,
                           enabled=False)  # a disabled script rejects nothing
    server.set_anon_script(script, project=project if scope == "project" else None)
    files = [f for f in tricky_visit(samples, tmp_path) if f.series_description in ("T1 run 1", "Dose Report")]
    for _attempt in (1, 2) if scope == "site" else (1,):  # a re-run: the same error, nothing sent
        with pytest.raises(XnatError) as err:
            upload(xnat_target, project, files)
        message = str(err.value)
        assert says in message and "series 9 (Dose Report): 5 of 5 files" in message, message
        assert "does not send again" in message and "exclude_series" in message
        assert imports(xnat_target, project) == 1  # the first upload only: nothing sent again
    scans, _ = rest_scans(xnat_target, project, "V1")
    assert file_count(scans) == 5 and "9" not in scans
    with xnat_target.connect() as s:  # where XNAT keeps the scripts (ConfigResource, tool anon)
        uri = "/data/config/anon/script" if scope == "site" else f"/data/projects/{project}/config/anon/projects/{project}"
        row = s.get_json(uri)["ResultSet"]["Result"][0]
    assert row["status"] == "enabled" and "reject" in row["contents"]


def test_a_visit_the_site_script_rejects_whole_fails_at_once(samples, xnat_target, tmp_path):
    """Every file rejected as it arrives: XNAT leaves the empty row it made for them (RECEIVING)
    and answers no URI. The client does not wait on that row: it removes it and names the script."""
    from dicom_assets.core.xnat import XnatError

    server = xnat_target.test_server("a site-wide anonymization script that rejects every file of a visit")
    project = xnat_target.project("BUILD")
    server.add_project(project, owner=xnat_target.user)
    server.set_anon_script(DOSE_REJECT)
    files = [f for f in tricky_visit(samples, tmp_path) if f.series_description == "Dose Report"]
    with pytest.raises(XnatError) as err:
        upload(xnat_target, project, files, wait_seconds=30)
    assert "the site-wide anonymization script's statement" in str(err.value) and "5 of 5 files" in str(err.value)
    assert prearchive_rows(xnat_target, project) == [] and imports(xnat_target, project) == 1
    assert subject_labels(xnat_target, project) == []


@pytest.mark.slow
def test_an_append_into_a_session_whose_uids_a_project_script_rewrote_is_named(samples, xnat_target, tmp_path):
    """XNAT checks a merge's StudyInstanceUID before the project's script runs
    (PrearcSessionArchiver.checkForConflicts, then MergePrearcToArchiveSession): in a project
    whose script hashes UIDs every append into an archived session is refused (UID_MOD, unless
    the project's session merging setting allows it). The client names that cause."""
    from dicom_assets.core.xnat import XnatError

    server = xnat_target.test_server("a project anonymization script that hashUIDs the study, series and SOP UIDs")
    project = xnat_target.project("BUILD")
    server.add_project(project, owner=xnat_target.user)
    server.set_anon_script(HASH_UIDS_SCRIPT, project=project)
    files = tricky_visit(samples, tmp_path)
    upload(xnat_target, project, files[:10])
    with pytest.raises(XnatError) as err:
        upload(xnat_target, project, files, policy="append")
    message = str(err.value)
    assert "Invalid modification of session UID" in message and "sessionmerging_uid_mod" in message, message
    assert prearchive_rows(xnat_target, project) == []


def test_a_reject_the_client_cannot_evaluate_is_named_as_a_possible_cause(samples, xnat_target, tmp_path):
    """A reject under a condition the client does not evaluate (here the ``else`` of a
    conditional): the files are sent again once, then the error says the script may reject them."""
    from dicom_assets.core.xnat import XnatError

    server = xnat_target.test_server("a project anonymization script that rejects in a conditional's else")
    project = xnat_target.project("BUILD")
    server.add_project(project, owner=xnat_target.user)
    server.set_anon_script('version "6.1"\n(0008,103E) != "Dose Report" ? (0008,1030) := "kept" : reject\n',
                           project=project)
    with pytest.raises(XnatError) as err:
        upload(xnat_target, project, tricky_visit(samples, tmp_path))
    message = str(err.value)
    assert "which the client cannot evaluate, may reject series 9 (Dose Report): 5 of 5 files" in message, message
    assert imports(xnat_target, project) == 2  # sent again once, never more


# --------------------------------------------------------------------------- the subject fixSubject leaves
@pytest.mark.parametrize("cause", ["another subject's session", "a project script error", "a member uploads"])
def test_a_refused_archive_leaves_no_empty_subject_behind(samples, xnat_target, tmp_path, cause):
    """XNAT creates the subject before it checks for conflicts (PrearcSessionArchiver.call:
    fixSubject, then checkForConflicts or the project's script): a refused archive leaves an
    empty subject. The client, whose subject did not exist, removes it and says so (or says it
    could not: deleting a subject is the project owner's), so a re-run starts from the same state."""
    from dicom_assets.core.xnat import XnatError

    server = xnat_target.test_server(f"an archive XNAT refuses after creating the subject ({cause})")
    project = xnat_target.project("BUILD")
    if cause == "a member uploads":
        server.add_user("pi", "pi-pw")
        server.add_project(project, owner="pi", members=(xnat_target.user,))
    else:
        server.add_project(project, owner=xnat_target.user)
    if cause == "a project script error":
        server.set_anon_script('version "6.1"\n(0010,0010) := lowercase[(0010,0010)]\n', project=project)
    else:  # another upload archives V1 under another subject just before XNAT archives this one
        server.on_archive = lambda row: server.add_experiment(project, "OTHER", "V1", row.tag)
    files = [f for f in tricky_visit(samples, tmp_path) if f.series_description == "T1 run 1"]
    with pytest.raises(XnatError) as err:
        upload(xnat_target, project, files)
    message = str(err.value)
    assert "XNAT had created subject P1" in message and "fixSubject" in message, message
    if cause == "a member uploads":
        assert "could not remove it (403" in message and "project owner role" in message
        assert subject_labels(xnat_target, project) == ["OTHER", "P1"]
        return
    assert "removed that empty subject" in message
    assert "P1" not in subject_labels(xnat_target, project) and prearchive_rows(xnat_target, project) == []
    if cause == "another subject's session":
        assert "under another subject" in message and "Invalid modification of session subject" in message
    else:
        assert "the project's anonymization script" in message and "Anonymization failed for prearcSession" in message
    server.on_archive = None
    with pytest.raises(XnatError):  # the re-run: the same refusal, the same state
        upload(xnat_target, project, files)
    assert "P1" not in subject_labels(xnat_target, project)
