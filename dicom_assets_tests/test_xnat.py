"""The xnat_session asset through the real xnatpy client against the XNAT-compatible test
server on loopback, which really unzips and parses what it receives."""

import json
import secrets

import pydicom
import pytest
from dagster import EnvVar

from dicom_assets.defs.publish import XnatResource
from dicom_assets.testing.xnat_server import XnatTestServer

from .helpers import AssetSelection, checks_of, metadata_of, run_chain

VISIT = "QPN001_ses-01"
USER = "site-uploader"


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
    assert (demo_root / "logs/xnat/QPN001_ses-01.json").exists()

    again = run_chain(instance, demo_root, VISIT, xnat=xnat_res, selection=only_xnat())
    assert metadata_of(again, "xnat_session")["status"] == "already_archived"
    assert server.imports == 1 and len(server.projects["QPN_DEMO"].subjects["QPN001"].experiments) == 1
    assert server.prearchive == {}


@pytest.mark.faults
@pytest.mark.parametrize("status", ["500", "503"])
def test_server_error_on_first_attempt_is_retried(instance, demo_root, server, xnat_res, status):
    run_chain(instance, demo_root, VISIT)
    server.inject("/data/services/import", status)
    result = run_chain(instance, demo_root, VISIT, xnat=xnat_res, selection=only_xnat())
    assert result.success and metadata_of(result, "xnat_session")["status"] == "uploaded"
    assert sum(1 for m, p in server.requests if p == "/data/services/import") == 2  # refused, then retried
    assert server.imports == 1
    assert any(e.event_type_value == "STEP_UP_FOR_RETRY" for e in result.all_events)


@pytest.mark.faults
def test_timeout_is_retried_without_a_duplicate_session(instance, demo_root, server, password, monkeypatch):
    """XNAT answers too late (it still archives the first upload): the retry finds the session
    complete and sends nothing again."""
    run_chain(instance, demo_root, VISIT)
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
def test_dropped_connection_mid_upload_leaves_no_half_session(instance, demo_root, server, xnat_res):
    run_chain(instance, demo_root, VISIT)
    server.inject("/data/services/import", "drop")
    result = run_chain(instance, demo_root, VISIT, xnat=xnat_res, selection=only_xnat())
    assert result.success
    exps = server.projects["QPN_DEMO"].subjects["QPN001"].experiments
    assert list(exps) == ["QPN001_ses-01"]
    assert {k: len(s.files) for k, s in exps["QPN001_ses-01"].scans.items()} == kept_series(demo_root)


@pytest.mark.faults
def test_wrong_password_fails_at_once_with_a_clear_message(instance, demo_root, server, monkeypatch, capsys):
    run_chain(instance, demo_root, VISIT)
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
        run_chain(instance, demo_root, VISIT)
        res = XnatResource(server=srv.url, user=USER, password=password)
        result = run_chain(instance, demo_root, VISIT, xnat=res, selection=only_xnat(), raise_on_error=False)
        failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
        assert "(403): the user lacks the right" in failure.event_specific_data.error.message
    finally:
        srv.stop()


@pytest.mark.faults
def test_existing_session_with_other_content_follows_the_policy(instance, demo_root, server, xnat_res):
    run_chain(instance, demo_root, VISIT, xnat=xnat_res)
    exp = server.projects["QPN_DEMO"].subjects["QPN001"].experiments["QPN001_ses-01"]
    scan = next(iter(exp.scans.values()))
    scan.files.pop(next(iter(scan.files)))  # someone removed a file on XNAT
    result = run_chain(instance, demo_root, VISIT, xnat=xnat_res, selection=only_xnat(), raise_on_error=False)
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert "already exists in XNAT project QPN_DEMO with different content" in failure.event_specific_data.error.message
    cfg = json.loads((demo_root / "global_config.json").read_text())
    cfg["xnat_duplicate_policy"] = "append"
    (demo_root / "global_config.json").write_text(json.dumps(cfg))
    result = run_chain(instance, demo_root, VISIT, xnat=xnat_res, selection=only_xnat())
    assert metadata_of(result, "xnat_session")["status"] == "appended"
    assert checks_of(result)["scans_match_series"] is True


@pytest.mark.faults
def test_xnat_down_is_reported_clearly(instance, demo_root):
    run_chain(instance, demo_root, VISIT)
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
