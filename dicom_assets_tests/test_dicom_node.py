"""The DICOM node as a source of visits, against a real Orthanc (Debian's ``/usr/sbin/Orthanc``)
on loopback, fed over the DICOM network by dcmtk's ``storescu`` as a scanner console pushes:
the ``dicom_node_sensor`` follows Orthanc's ``/changes`` log, ``dicom_node_study`` fetches a
stable study into ``downloads/dicom_node/<visit>/``, and the chain runs on it.

Every fault of the issue has its test here: Orthanc restarted mid-study or down, the sensor's
tick lost before its cursor was stored, the same study twice, two scanners at once, a series
sent later, an unknown participant, a large study, Orthanc's disk full and a fetch cut off.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import threading
import time
import zipfile
from pathlib import Path

import pytest
from dagster import materialize

from dicom_assets.core.config import SessionRule
from dicom_assets.core.dicomnode import (
    DicomNodeError,
    Mapped,
    OrthancClient,
    StudyInfo,
    Unmapped,
    fetch_study,
    map_study,
)
from dicom_assets.core.manifest import read_manifest
from dicom_assets.definitions import ARCHIVE_CHAIN
from dicom_assets.defs.dicomnode import STUDY_TAG, OrthancResource, dicom_node_retrieve, dicom_node_study
from dicom_assets.defs.ingest import downloads
from dicom_assets.defs.resources import DatasetResource
from dicom_assets.defs.sensors import dicom_node_sensor
from dicom_assets.testing.demo import build_demo_dataset, visit_spec, write_node_push
from dicom_assets.testing.orthanc import OrthancNode, dicom_env, missing_tools, storescu

from .helpers import Ticker, free_port, metadata_of

pytestmark = pytest.mark.skipif(bool(missing_tools()), reason=f"not installed: {', '.join(missing_tools())} "
                                "(scripts/system-deps.sh installs Orthanc and dcmtk)")


# --------------------------------------------------------------------------- the mapping, pure
class _Manifest:
    def __init__(self, visits):
        self.participants = {p: p for p, _ in visits}
        self._pairs = set(visits)

    def has_visit(self, visit):
        return (visit.participant, visit.session) in self._pairs


def _study(pid="QPN_004", uid="1.2.3", **tags):
    return StudyInfo("0" * 8 + "-aaaa", uid, pid, {"PatientID": pid, "StudyInstanceUID": uid, **tags})


SESSIONS = ("ses-01", "ses-02")
MANIFEST = _Manifest([("QPN004", "ses-01"), ("QPN004", "ses-02"), ("QPN005", "ses-01")])


@pytest.mark.parametrize("study,rule,expect", [
    (_study(StudyDescription="QPN ses-02"), SessionRule(), "QPN004_ses-02"),
    (_study(StudyDescription="brain ses-3"), SessionRule(), "session 'ses-3'"),
    (_study(StudyDescription="brain"), SessionRule(), "does not match"),
    (_study(), SessionRule(), "has no StudyDescription"),
    (_study(pid="XYZ_9", StudyDescription="ses-01"), SessionRule(), "no participant of the manifest"),
    (_study(pid="", StudyDescription="ses-01"), SessionRule(), "has no PatientID"),
    (_study(pid="QPN_005", StudyDescription="ses-02"), SessionRule(), "has no session ses-02 in the manifest"),
    (_study(PatientComments="Project: QPN Session: 01"),
     SessionRule(attribute="PatientComments", pattern=r"Session: *(\w+)"), "QPN004_ses-01"),
    (_study(StudyDescription="anything"), SessionRule(pattern=r"any"), "session 'ses-any'"),
])
def test_map_study_by_attribute(study, rule, expect):
    got = map_study(study, rule, MANIFEST, SESSIONS)
    if isinstance(got, Mapped):
        assert got.visit == expect
    else:
        assert isinstance(got, Unmapped) and expect in got.reason


def test_map_study_by_order_and_by_table():
    first = _study(uid="1.1", StudyDate="20240105", StudyTime="0900")
    second = _study(uid="1.2", StudyDate="20240705", StudyTime="0800")
    third = _study(uid="1.3", StudyDate="20250105")
    studies = {"QPN_004": [second, third, first]}
    order = SessionRule(kind="order")
    got = [map_study(s, order, MANIFEST, SESSIONS, studies_of=studies.get) for s in (first, second, third)]
    assert [getattr(g, "visit", None) for g in got[:2]] == ["QPN004_ses-01", "QPN004_ses-02"]
    assert "only 2 session(s)" in got[2].reason
    table = SessionRule(kind="table", path="tabular/sessions.tsv")
    assert map_study(first, table, MANIFEST, SESSIONS, table={"1.1": "02"}).visit == "QPN004_ses-02"
    assert "not in the session table" in map_study(second, table, MANIFEST, SESSIONS, table={"1.1": "02"}).reason


# --------------------------------------------------------------------------- a real node
@pytest.fixture
def node(tmp_path):
    n = OrthancNode(tmp_path / "orthanc", stable_age=1).start()
    yield n
    n.stop(signal.SIGKILL)  # nothing of it is needed after the test (a clean stop takes 3 s)


@pytest.fixture
def root(samples, tmp_path):
    return build_demo_dataset(tmp_path / "dataset", samples, with_downloads=False)


@pytest.fixture
def resources(root, node):
    return {"dataset": DatasetResource(root=str(root)),
            "dicom_node": OrthancResource(url=node.url, user=node.user, password=node.password)}


def push(node, samples, tmp_path, participant="QPN_004", session="ses-01", **kw):
    folder = tmp_path / f"push-{participant}-{session}-{time.monotonic_ns()}"
    files = write_node_push(folder, samples, visit_spec(participant, session, 0), **kw)
    storescu(node.dicom_port, node.aet, folder)
    return files


def wait_stable(node, timeout=30.0):
    """Until every study on the node is stable (Orthanc's StableAge has passed)."""
    client = node.client()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ids = client.get_json("/studies")
        if ids and all(client.get_json(f"/studies/{i}")["IsStable"] for i in ids):
            return ids
        time.sleep(0.2)
    raise AssertionError("studies did not become stable")


def run_request(instance, ticker_result, resources):
    """Execute one run the sensor requested, as the daemon would (its tags, its partition)."""
    return materialize([dicom_node_study, downloads] + ARCHIVE_CHAIN, partition_key=ticker_result.partition_key,
                       resources=resources, instance=instance, tags=ticker_result.tags)


def dicoms_in_tarball(root, visit):
    import tarfile

    tar = Path(root) / "store" / "QPN" / f"{visit}_dicom.tar"
    with tarfile.open(tar) as tf:
        return {m.name for m in tf.getmembers() if m.isfile()}


def data_version_of(result, asset):
    [ev] = [e for e in result.get_asset_materialization_events() if e.asset_key.to_user_string() == asset]
    return ev.materialization.tags["dagster/data_version"]


@pytest.mark.slow
def test_pushed_visit_is_fetched_counted_and_archived(instance, samples, tmp_path, node, root, resources):
    files = push(node, samples, tmp_path)
    wait_stable(node)
    ticker = Ticker(instance, dicom_node_sensor, resources)
    result = ticker.tick()
    [req] = result.run_requests
    assert req.partition_key == "QPN004_ses-01" and req.tags[STUDY_TAG]
    assert req.asset_selection[0].to_user_string() == "dicom_node_study" and req.job_name == "dicom_node_visit"
    assert "QPN004_ses-01" in instance.get_dynamic_partitions("visits")
    out = run_request(instance, req, resources)
    assert out.success
    md = metadata_of(out, "dicom_node_study")
    stats = node.client().get_json(f"/studies/{req.tags[STUDY_TAG]}/statistics")
    assert md["instances"] == stats["CountInstances"] == len(files)
    zips = list((root / "downloads" / "dicom_node" / "QPN004_ses-01").glob("*.zip"))
    assert len(zips) == 1 and len([i for i in zipfile.ZipFile(zips[0]).infolist() if not i.is_dir()]) == len(files)
    assert metadata_of(out, "raw_dicoms")["files"] == len(files)
    # every image pushed is in the visit tarball (those the exclusion rules keep), read back by UID
    members = dicoms_in_tarball(root, "QPN004_ses-01")
    kept = metadata_of(out, "organized_dicoms")["kept"]
    assert kept == len(members) > 0
    # a tick with nothing new requests nothing, and the cursor is Orthanc's last Seq
    again = ticker.tick()
    assert not again.run_requests and "no newly stable study" in again.skip_reason.skip_message
    assert json.loads(ticker.cursor)["seq"] == node.client().last_seq()


@pytest.mark.slow
def test_unknown_participant_is_listed_then_taken_once_the_manifest_knows_it(instance, samples, tmp_path, node,
                                                                             root, resources, capsys):
    push(node, samples, tmp_path, participant="QPN_009")
    wait_stable(node)
    ticker = Ticker(instance, dicom_node_sensor, resources)
    result = ticker.tick()
    assert not result.run_requests
    assert "map to no visit" in result.skip_reason.skip_message and "QPN_009" in result.skip_reason.skip_message
    listed = (root / "logs" / "dicom_node" / "unmapped.tsv").read_text().splitlines()
    assert len(listed) == 2 and "no participant of the manifest" in listed[1] and "QPN_009" in listed[1]
    assert not ticker.tick().run_requests  # kept, not retried on every tick, never dropped
    from dicom_assets.cli import main as cli

    assert cli(["status", str(root)]) == 0
    status = capsys.readouterr().out
    assert "1 study(ies) on the DICOM node map to no visit" in status and "QPN_009" in status
    # the site adds the participant: the next tick takes the study
    manifest = root / "tabular" / "demographics" / "mr_proc_manifest.csv"
    manifest.write_text(manifest.read_text() + "QPN_009,01,ses-01,\"['anat']\"\n")
    [req] = ticker.tick().run_requests
    assert req.partition_key == "QPN009_ses-01"
    assert (root / "logs" / "dicom_node" / "unmapped.tsv").read_text().splitlines()[1:] == []
    assert run_request(instance, req, resources).success


@pytest.mark.slow
def test_series_sent_later_amends_the_same_visit(instance, samples, tmp_path, node, root, resources):
    first = push(node, samples, tmp_path, series=(1, 2, 3, 4))
    wait_stable(node)
    ticker = Ticker(instance, dicom_node_sensor, resources)
    [req] = ticker.tick().run_requests
    out = run_request(instance, req, resources)
    v1 = data_version_of(out, "dicom_node_study")
    n1 = len(dicoms_in_tarball(root, "QPN004_ses-01"))
    late = push(node, samples, tmp_path, series=(5, 6, 7, 8, 9, 10, 11, 99))  # minutes later, the rest
    assert late
    wait_stable(node)
    [req2] = ticker.tick().run_requests
    assert req2.partition_key == req.partition_key and req2.run_key != req.run_key
    out2 = run_request(instance, req2, resources)
    md = metadata_of(out2, "dicom_node_study")
    assert md["instances"] == len(first) + len(late) and md["fetched"] == 1
    v2 = data_version_of(out2, "dicom_node_study")
    assert v2 != v1
    assert len(dicoms_in_tarball(root, "QPN004_ses-01")) > n1
    # one visit, one download of the study: amended, never a second visit
    assert instance.get_dynamic_partitions("visits") == ["QPN004_ses-01"]
    assert len(list((root / "downloads" / "dicom_node" / "QPN004_ses-01").glob("*.zip"))) == 1


@pytest.mark.slow
def test_same_study_pushed_twice_is_one_download(instance, samples, tmp_path, node, root, resources):
    push(node, samples, tmp_path)
    wait_stable(node)
    ticker = Ticker(instance, dicom_node_sensor, resources)
    [req] = ticker.tick().run_requests
    assert run_request(instance, req, resources).success
    zip_path = next((root / "downloads" / "dicom_node" / "QPN004_ses-01").glob("*.zip"))
    before = zip_path.stat()
    push(node, samples, tmp_path)  # the console sends it again
    time.sleep(2)
    assert not ticker.tick().run_requests  # Orthanc logs no change for instances it has
    # and a fetch of it again (a run from the UI) keeps the download as it was
    again = materialize([dicom_node_study], partition_key="QPN004_ses-01", resources=resources, instance=instance)
    assert metadata_of(again, "dicom_node_study")["unchanged"] == 1
    assert zip_path.stat().st_mtime_ns == before.st_mtime_ns and zip_path.stat().st_ino == before.st_ino


@pytest.mark.slow
def test_two_scanners_at_once(instance, samples, tmp_path, node, root, resources):
    folders = {}
    for p in ("QPN004", "QPN001"):
        folder = tmp_path / f"push-{p}"
        folders[f"{p}_ses-02"] = (folder, write_node_push(folder, samples, visit_spec(p[:3] + "_" + p[3:], "ses-02", 0)))
    procs = [subprocess.Popen(["storescu", "-aet", f"SCANNER{i}", "-aec", node.aet, "+sd", "+r", "127.0.0.1",
                               str(node.dicom_port), str(f)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              env=dicom_env())
             for i, (f, _) in enumerate(folders.values())]
    assert [p.wait(120) for p in procs] == [0, 0]
    wait_stable(node)
    reqs = Ticker(instance, dicom_node_sensor, resources).tick().run_requests
    assert sorted(r.partition_key for r in reqs) == sorted(folders)
    for r in reqs:
        out = run_request(instance, r, resources)
        files = folders[r.partition_key][1]
        assert metadata_of(out, "dicom_node_study")["instances"] == len(files)
        assert metadata_of(out, "raw_dicoms")["files"] == len(files)


@pytest.mark.slow
def test_orthanc_restarted_mid_study_and_down_during_a_tick(instance, samples, tmp_path, node, root, resources):
    folder = tmp_path / "push"
    files = write_node_push(folder, samples, visit_spec("QPN_004", "ses-01", 0))
    half = len(files) // 2
    storescu(node.dicom_port, node.aet, files[:half])
    node.restart()  # the node restarts in the middle of the study
    storescu(node.dicom_port, node.aet, files[half:])
    wait_stable(node)
    ticker = Ticker(instance, dicom_node_sensor, resources)
    [req] = ticker.tick().run_requests
    cursor = ticker.cursor
    node.stop()
    down = ticker.tick().skip_message  # Orthanc down: a clear reason, and the cursor stays
    assert "unreachable" in down and "resumes from change" in down
    assert ticker.cursor == cursor and node.password not in down
    node.start()
    out = run_request(instance, req, resources)
    assert metadata_of(out, "dicom_node_study")["instances"] == len(files)
    assert not ticker.tick().run_requests


@pytest.mark.slow
def test_a_tick_lost_before_its_cursor_was_stored_requests_the_same_runs(instance, samples, tmp_path, node, root,
                                                                         resources):
    """The sensor's process killed after it read the changes and before the daemon stored the
    cursor: the next tick starts from the old cursor and asks for the same run keys, which
    Dagster runs once."""
    push(node, samples, tmp_path)
    wait_stable(node)
    ticker = Ticker(instance, dicom_node_sensor, resources)
    first = ticker.tick().run_requests
    ticker.cursor = None  # the tick's result never reached the daemon
    second = ticker.tick().run_requests
    assert [r.run_key for r in first] == [r.run_key for r in second] and len(first) == 1


class CuttingProxy:
    """A TCP proxy to Orthanc's HTTP port that cuts each answer after ``limit`` bytes (a network
    failure in the middle of a fetch)."""

    def __init__(self, port: int, limit: int):
        self.target, self.limit = port, limit
        self.port = free_port()
        self.sock = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._pipe, args=(client,), daemon=True).start()

    def _pipe(self, client):
        upstream = socket.create_connection(("127.0.0.1", self.target))
        threading.Thread(target=self._forward, args=(client, upstream, None), daemon=True).start()
        self._forward(upstream, client, self.limit)

    @staticmethod
    def _forward(src, dst, limit):
        sent = 0
        try:
            while limit is None or sent < limit:
                data = src.recv(65536)
                if not data:
                    break
                if limit is not None:
                    data = data[:limit - sent]
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self.sock.close()


@pytest.mark.slow
def test_fetch_cut_off_keeps_nothing_then_completes(samples, tmp_path, node):
    files = push(node, samples, tmp_path)
    wait_stable(node)
    client = node.client()
    study = client.study(client.get_json("/studies")[0])
    proxy = CuttingProxy(node.http_port, limit=600_000)  # the answers of the small calls pass, the ZIP is cut
    try:
        cut = OrthancClient(f"http://127.0.0.1:{proxy.port}", node.user, node.password)
        with pytest.raises(DicomNodeError) as err:
            fetch_study(cut, study, tmp_path / "dest", visit="QPN004_ses-01")
        assert err.value.transient and ("cut off" in str(err.value) or "incomplete" in str(err.value))
    finally:
        proxy.close()
    assert list((tmp_path / "dest").iterdir()) == []  # no partial ZIP, no record
    done = fetch_study(client, study, tmp_path / "dest", visit="QPN004_ses-01")
    assert done.status == "fetched" and done.instances == len(files)
    assert sorted(p.name for p in (tmp_path / "dest").iterdir()) == sorted([done.zip_path.name, done.record_path.name])


def test_wrong_credentials_and_a_missing_node_are_named(node):
    with pytest.raises(DicomNodeError, match="refused the credentials") as err:
        OrthancClient(node.url, node.user, "wrong-secret").system()
    assert "wrong-secret" not in str(err.value)
    with pytest.raises(DicomNodeError, match="unreachable") as err:
        OrthancClient(f"http://127.0.0.1:{free_port()}", "u", "p", timeout=2).system()
    assert err.value.transient


@pytest.mark.slow
def test_query_retrieve_from_a_pacs_peer(instance, samples, tmp_path, root):
    """A second Orthanc is the clinical PACS: the job asks it (C-FIND) and has it send the study
    (C-MOVE) to the node; the sensor runs the visit."""
    node_port, pacs_port = free_port(), free_port()
    node = OrthancNode(tmp_path / "node", aet="DANODE", dicom_port=node_port, stable_age=1,
                       peers={"pacs": ("PACS", pacs_port)}).start()
    pacs = OrthancNode(tmp_path / "pacs", aet="PACS", dicom_port=pacs_port, peers={"node": ("DANODE", node_port)}).start()
    try:
        files = push(pacs, samples, tmp_path, participant="QPN_002", session="ses-02")
        res = {"dataset": DatasetResource(root=str(root)),
               "dicom_node": OrthancResource(url=node.url, user=node.user, password=node.password)}
        got = dicom_node_retrieve.execute_in_process(
            run_config={"ops": {"retrieve_from_pacs": {"config": {"peer": "pacs", "patient_id": "QPN_002"}}}},
            resources={"dicom_node": res["dicom_node"]}, instance=instance)
        assert got.success and got.output_for_node("retrieve_from_pacs") == 1
        wait_stable(node)
        [req] = Ticker(instance, dicom_node_sensor, res).tick().run_requests
        assert req.partition_key == "QPN002_ses-02"
        out = run_request(instance, req, res)
        assert metadata_of(out, "dicom_node_study")["instances"] == len(files)
        refused = dicom_node_retrieve.execute_in_process(
            run_config={"ops": {"retrieve_from_pacs": {"config": {"peer": "pacs"}}}},
            resources={"dicom_node": res["dicom_node"]}, instance=instance, raise_on_error=False)
        assert not refused.success
    finally:
        node.stop()
        pacs.stop()


@pytest.mark.slow
def test_a_large_study(instance, samples, tmp_path, node, root, resources):
    """A study of 2,000 instances (real MR slices, each its own SOPInstanceUID): every one arrives."""
    from dicom_assets.testing.demo import write_large_push

    files = write_large_push(tmp_path / "large", samples, "QPN_004", "ses-02", n=2000)
    storescu(node.dicom_port, node.aet, tmp_path / "large")
    wait_stable(node, timeout=120)
    [req] = Ticker(instance, dicom_node_sensor, resources).tick().run_requests
    out = run_request(instance, req, resources)
    assert metadata_of(out, "dicom_node_study")["instances"] == len(files) == 2000
    assert metadata_of(out, "organized_dicoms")["kept"] == 2000


@pytest.mark.slow
def test_orthanc_disk_full(instance, samples, tmp_path, root):
    """Orthanc's storage (files and index) on a 3 MB file system: a first visit fits and is
    fetched; the next push is refused (the console is told OutOfResources, instance by
    instance, and keeps the study). Nothing already fetched is touched, no tick fails, and once
    the node has space and the console sends again, the visit arrives whole."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a small file system here (needs root)")
    node = None
    try:
        node = OrthancNode(mnt / "orthanc", stable_age=1).start()
        res = {"dataset": DatasetResource(root=str(root)),
               "dicom_node": OrthancResource(url=node.url, user=node.user, password=node.password)}
        ticker = Ticker(instance, dicom_node_sensor, res)
        push(node, samples, tmp_path, participant="QPN_001", series=(3,))  # a small visit that fits
        wait_stable(node)
        [first] = ticker.tick().run_requests
        assert run_request(instance, first, res).success
        first_zip = next((root / "downloads" / "dicom_node" / first.partition_key).glob("*.zip"))
        first_bytes = first_zip.read_bytes()
        folder = tmp_path / "push"
        files = write_node_push(folder, samples, visit_spec("QPN_004", "ses-01", 0))
        done = subprocess.run(["storescu", "-v", "-aec", node.aet, "+sd", "+r", "127.0.0.1", str(node.dicom_port),
                               str(folder)], capture_output=True, text=True, env=dicom_env(), timeout=120)
        assert "Refused: OutOfResources" in done.stderr  # the console is told
        time.sleep(2)
        during = ticker.tick()  # whatever Orthanc could log: no failed tick, nothing taken twice
        for req in during.run_requests or []:
            assert req.partition_key == "QPN004_ses-01"
        # the node gets a larger disk (its storage moved), the console sends the study again
        node.stop()
        big = tmp_path / "big"
        shutil.copytree(mnt / "orthanc", big)
        node.workdir = big
        node.start()
        storescu(node.dicom_port, node.aet, folder)
        wait_stable(node)
        [req] = ticker.tick().run_requests
        assert req.partition_key == "QPN004_ses-01"
        out = run_request(instance, req, res)
        assert metadata_of(out, "dicom_node_study")["instances"] == len(files)
        assert first_zip.read_bytes() == first_bytes
    finally:
        if node is not None:
            node.stop(signal.SIGKILL)
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_manifest_loader_is_the_one_the_mapping_reads(root):
    # the sensor maps PatientIDs as written by the site (QPN_004) through the manifest's normalization
    m = read_manifest(root / "tabular" / "demographics" / "mr_proc_manifest.csv")
    got = map_study(_study(pid="QPN_004", StudyDescription="qpn-demo ses-01"), SessionRule(), m, SESSIONS)
    assert got.visit == "QPN004_ses-01"


@pytest.mark.parametrize("rule,message", [
    ({"kind": "table"}, "kind 'table' needs a path"),
    ({"kind": "attribute", "pattern": "ses-("}, "is no regular expression"),
    ({"kind": "attribute", "pattern": "(a)(b)"}, "at most one group"),
    ({"kind": "attribute", "attribute": "Study Description"}, "must be a DICOM keyword"),
    ({"kind": "table", "path": "../elsewhere.tsv"}, "must be a path under the dataset root"),
    ({"kind": "guess"}, "must be one of attribute, order, table"),
    ({"kind": "order", "when": "date"}, "unknown field 'dicom_node.session_rule.when'; known: kind"),
])
def test_session_rule_config_errors_name_the_field(rule, message):
    from dicom_assets.core.config import parse_config
    from dicom_assets.core.errors import ConfigError

    base = {"dataset_name": "d", "study_id": "S", "sessions": ["01"]}
    with pytest.raises(ConfigError, match="dicom_node.session_rule") as err:
        parse_config({**base, "dicom_node": {"session_rule": rule}}, "global_config.json")
    assert message in str(err.value)


def test_session_table_is_read_as_csv_or_tsv(tmp_path):
    from dicom_assets.core.dicomnode import read_session_table

    tsv = tmp_path / "s.tsv"
    tsv.write_text("StudyInstanceUID\tsession_id\n1.2.3\t02\n")
    csv_ = tmp_path / "s.csv"
    csv_.write_text("\ufeffStudyInstanceUID,session_id\n1.2.4,ses-01\n")
    assert read_session_table(tsv) == {"1.2.3": "02"} and read_session_table(csv_) == {"1.2.4": "ses-01"}
    bad = tmp_path / "bad.csv"
    bad.write_text("uid,session\n1.2,01\n")
    with pytest.raises(DicomNodeError, match="needs the columns StudyInstanceUID and session_id"):
        read_session_table(bad)
    with pytest.raises(DicomNodeError, match="does not exist"):
        read_session_table(tmp_path / "none.tsv")
