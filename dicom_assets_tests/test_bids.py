"""BIDS: real demo visits (GE and Siemens files) converted by dcm2bids + dcm2niix through the
``bids_session`` asset, checked by the official BIDS validator; bad input (a series dcm2niix
cannot decode, a slice sent twice, malformed configs, two sessions of one participant at once)."""

import csv
import gzip
import io
import json
import os
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pydicom
import pytest
from dagster import materialize
from pydicom.uid import generate_uid

from dicom_assets.core import bids, fsutil
from dicom_assets.core.dataset import Dataset
from dicom_assets.core.fsutil import tree_digests
from dicom_assets.core.ids import Visit
from dicom_assets.core.layout import DatasetLayout
from dicom_assets.core.versions import digests_version, tree_version
from dicom_assets.defs.bids import bids_session
from dicom_assets.defs.ingest import organized_dicoms, raw_dicoms
from dicom_assets.defs.resources import DatasetResource
from dicom_assets.testing.demo import DEMO_DCM2BIDS_CONFIG, rewrite_dicom, write_dcm2bids_config

from .helpers import checks_of, metadata_of

REPO = Path(__file__).resolve().parents[1]


def run_bids(instance, root, visit, assets=None, raise_on_error=True):
    if visit not in instance.get_dynamic_partitions("visits"):
        instance.add_dynamic_partitions("visits", [visit])
    return materialize(assets or [raw_dicoms, organized_dicoms, bids_session], partition_key=visit,
                       resources={"dataset": DatasetResource(root=str(root))}, instance=instance,
                       raise_on_error=raise_on_error)


def data_version_of(result) -> str | None:
    """The data version the run recorded for bids_session (what the UI's lineage compares)."""
    from dagster._core.definitions.data_version import DATA_VERSION_TAG

    evs = [e for e in result.get_asset_materialization_events() if e.asset_key.to_user_string() == "bids_session"]
    return evs[-1].materialization.tags.get(DATA_VERSION_TAG)


def official_validator(bids_root: Path) -> list[dict]:
    """The validator as its PyPI package launches it (``bids-validator-deno``), no wrapper of ours."""
    proc = subprocess.run([str(Path(sys.executable).with_name("bids-validator-deno")), str(bids_root), "--format",
                           "json"], capture_output=True, env={**os.environ, "DENO_NO_UPDATE_CHECK": "1"}, timeout=300)
    return json.loads(proc.stdout)["issues"]["issues"]


def snapshot(root: Path) -> dict:
    """Every path under root with its inode, size and mtime: any write shows."""
    out = {}
    for dirpath, dirs, names in os.walk(root):
        for n in dirs + names:
            st = os.lstat(Path(dirpath) / n)
            out[str(Path(dirpath, n).relative_to(root))] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return out


@pytest.mark.slow
def test_demo_visits_become_a_valid_bids_dataset(instance, demo_root):
    lay = DatasetLayout(demo_root)
    metas = {}
    for key in ("QPN001_ses-01", "QPN001_ses-02", "QPN003_ses-02"):
        result = run_bids(instance, demo_root, key)
        assert result.success
        assert checks_of(result)["bids_valid"] is True
        metas[key] = metadata_of(result, "bids_session")
    m = metas["QPN001_ses-01"]
    # GE 3D T1w + SE T1w + T2w, Siemens mosaic bold + DTI
    assert m["files_per_datatype"] == {"anat": 6, "dwi": 4, "func": 2}
    ses = lay.bids_session_dir(Visit("QPN001", "ses-01"))
    assert {p.relative_to(ses).as_posix() for p in ses.rglob("*.nii.gz")} == {
        "anat/sub-QPN001_ses-01_acq-mprage_T1w.nii.gz", "anat/sub-QPN001_ses-01_acq-se_T1w.nii.gz",
        "anat/sub-QPN001_ses-01_T2w.nii.gz", "func/sub-QPN001_ses-01_task-rest_bold.nii.gz",
        "dwi/sub-QPN001_ses-01_dwi.nii.gz"}
    assert json.loads((ses / "func" / "sub-QPN001_ses-01_task-rest_bold.json").read_text())["TaskName"] == "rest"
    assert (ses / "dwi" / "sub-QPN001_ses-01_dwi.bval").is_file()
    status = {r.data["series_description"]: r.data["status"] for r in m["series"].records}
    assert status == {"T1w_MPRAGE": "converted", "T2w_PD_dual_echo": "converted", "T1_SE_axial": "converted",
                      "SWI_HEME": "unmatched", "fmap_acq-3mm": "unmatched", "rsfMRI_mosaic": "converted",
                      "DTI_64dir": "converted"}
    assert {r.data["series_description"] for r in m["unmatched_series"].records} == {"SWI_HEME", "fmap_acq-3mm"}
    # the demo T1w: 9 slices of a real GE 3D volume, each at its own position (one of them the
    # preamble-less IM9999), stacked by dcm2niix into one 3D image of 9 slices of 256 x 256
    t1 = next(r.data for r in m["series"].records if r.data["series_description"] == "T1w_MPRAGE")
    assert t1["dicoms"] == 9 and t1["bids_files"] == "sub-QPN001_ses-01_acq-mprage_T1w.nii.gz"
    with gzip.open(ses / "anat" / "sub-QPN001_ses-01_acq-mprage_T1w.nii.gz") as fh:
        dim = struct.unpack("<8h", fh.read(56)[40:56])  # NIfTI-1 dim[] (dcm2niix turns the sagittal stack)
    assert dim[0] == 3 and sorted(dim[1:4]) == [9, 256, 256]
    assert checks_of(result)["all_series_converted"] is True
    assert any("GE protocol data block" in r.data["message"] for r in m["dcm2niix_warnings"].records)
    assert "0 errors" in m["validator"]
    # dataset files, current for all three visits
    assert (lay.bids_root / "participants.tsv").read_text() == "participant_id\nsub-QPN001\nsub-QPN003\n"
    sessions = (lay.bids_root / "sub-QPN001" / "sub-QPN001_sessions.tsv").read_text().splitlines()
    assert sessions[0] == "session_id\tacq_time" and [s.split("\t")[0] for s in sessions[1:]] == ["ses-01", "ses-02"]
    assert sessions[1].split("\t")[1].startswith("2024-")
    assert json.loads((lay.bids_root / "dataset_description.json").read_text())["Name"] == "qpn-demo"
    status = {r["visit"]: r for r in csv.DictReader(open(lay.curation_status_path), delimiter="\t")}
    assert status["QPN001_ses-02"]["in_bids"] == "true" and status["QPN002_ses-01"]["in_bids"] == "false"
    # the scratch of every conversion is gone, dcm2bids' tmp_dcm2bids with it
    assert [p.name for p in lay.bids_scratch_root.iterdir()] == [".bids.lock"]
    assert not list(lay.bids_root.rglob("tmp_dcm2bids"))
    # the same bytes as dcm2bids run by hand on the same DICOMs (dcm2niix on the whole folder)
    by_hand = demo_root.parent / "by_hand"
    bids._seed_version_cache(by_hand)  # no GitHub version check
    dicom_dir = lay.dicom_dir(Visit("QPN001", "ses-01"))
    proc = subprocess.run([sys.executable, "-m", "dcm2bids.cli.dcm2bids", "-d", str(dicom_dir),
                           "-p", "QPN001", "-s", "01", "-c", str(lay.dcm2bids_config_path), "-o", str(by_hand)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"})
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert tree_digests(by_hand / "sub-QPN001" / "ses-01") == tree_digests(ses)
    # the official validator, as its package launches it: no error on the demo's dataset
    issues = official_validator(lay.bids_root)
    assert [i for i in issues if i["severity"] == "error"] == []
    assert issues  # it did run (warnings: no authors, recommended sidecar keys...)


def _counting(fn, calls: list):
    def digest(path, *args, **kw):
        calls.append(Path(path))
        return fn(path, *args, **kw)
    return digest


@pytest.mark.slow
def test_rerun_of_an_unchanged_visit_writes_nothing_and_a_changed_one_replaces_its_session(instance, demo_root,
                                                                                          monkeypatch):
    lay, v = DatasetLayout(demo_root), Visit("QPN002", "ses-01")
    first = data_version_of(run_bids(instance, demo_root, v.key))
    # the data version Dagster records is the session's content: names and bytes of its files,
    # as the conversion hashed them (its record) and as they are on disk
    assert first == tree_version(lay.bids_session_dir(v))
    assert first == digests_version(json.loads(lay.bids_record_path(v).read_text())["tree"])
    before = snapshot(lay.bids_root)
    hashed = []  # every file hashed on the re-run: each file of the session once, no more
    monkeypatch.setattr(fsutil, "file_digest", _counting(fsutil.file_digest, hashed))
    monkeypatch.setattr(bids, "file_digest", _counting(bids.file_digest, hashed))
    result = run_bids(instance, demo_root, v.key, assets=[bids_session])
    monkeypatch.undo()
    ses = lay.bids_session_dir(v)
    assert sorted(hashed) == sorted(p for p in ses.rglob("*") if p.is_file())
    meta = metadata_of(result, "bids_session")
    assert meta["state"] == "unchanged (nothing written)" and snapshot(lay.bids_root) == before
    assert data_version_of(result) == first  # unchanged visit: same version, nothing downstream stale
    assert checks_of(result)["bids_valid"] is True
    # without the record of the last conversion, the visit is converted again: same bytes, nothing written
    lay.bids_record_path(v).unlink()
    meta = metadata_of(run_bids(instance, demo_root, v.key, assets=[bids_session]), "bids_session")
    assert meta["state"] == "unchanged (nothing written)" and snapshot(lay.bids_root) == before
    # a session folder changed by hand is converted again and replaced whole
    (ses / "anat" / "notes.txt").write_text("x")
    run_bids(instance, demo_root, v.key, assets=[bids_session])
    assert not (ses / "anat" / "notes.txt").exists() and (ses / "dwi").is_dir()
    # a new config (no DWI entry): the session is replaced whole, its dwi/ folder gone
    cfg = json.loads(json.dumps(DEMO_DCM2BIDS_CONFIG))
    cfg["descriptions"] = [d for d in cfg["descriptions"] if d["datatype"] != "dwi"]
    cfg["descriptions"].append({"datatype": "anat", "suffix": "PDw", "criteria": {"SeriesDescription": "T2w_PD*"}})
    write_dcm2bids_config(demo_root, cfg)
    inode = ses.stat().st_ino
    result = run_bids(instance, demo_root, v.key, assets=[bids_session])
    meta = metadata_of(result, "bids_session")
    assert meta["state"] == "written" and "files_dwi" not in meta
    assert data_version_of(result) not in (None, first)
    assert not (ses / "dwi").exists() and (ses / "anat").is_dir() and ses.stat().st_ino != inode
    rows = {r.data["series_description"]: r.data for r in meta["series"].records}
    assert rows["DTI_64dir"]["status"] == "unmatched"
    # two entries match the T2w series: dcm2bids converts it under neither, and says so
    assert rows["T2w_PD_dual_echo"]["status"] == "several_matches" and not list(ses.rglob("*T2w*"))
    assert {r.data["series_description"] for r in meta["unmatched_series"].records} >= {"DTI_64dir", "T2w_PD_dual_echo"}
    assert not [p for p in ses.parent.iterdir() if p.name.startswith(".")]  # no staged or old folder left


def test_sensor_runs_include_bids_session_only_with_a_config_read_at_each_tick(demo_root, tmp_path, monkeypatch):
    """The job holds every step; the sensor's run asks for bids_session only while the dataset
    root has a dcm2bids config, looked at on each tick (never when the code location loads)."""
    from dicom_assets.defs.sensors import run_selection

    monkeypatch.delenv("XNAT_HOST", raising=False)
    lay = DatasetLayout(demo_root)
    assert "bids_session" in {k.to_user_string() for k in run_selection(lay)}
    saved = lay.dcm2bids_config_path.read_bytes()
    lay.dcm2bids_config_path.unlink()
    assert "bids_session" not in {k.to_user_string() for k in run_selection(lay)}
    lay.dcm2bids_config_path.write_bytes(saved)  # added later: the next tick's runs convert
    assert "bids_session" in {k.to_user_string() for k in run_selection(lay)}


def test_without_a_config_bids_session_records_nothing_and_says_why(instance, demo_root):
    lay, v = DatasetLayout(demo_root), Visit("QPN003", "ses-01")
    lay.dcm2bids_config_path.unlink()
    result = run_bids(instance, demo_root, v.key)
    assert result.success
    assert not [e for e in result.get_asset_materialization_events() if e.asset_key.to_user_string() == "bids_session"]
    checks = [e.event_specific_data for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"
              and e.event_specific_data.asset_key.to_user_string() == "bids_session"]
    assert {c.check_name for c in checks} == {"bids_valid", "all_series_converted"}
    assert all(c.description.startswith("not applicable: no dcm2bids config") for c in checks)
    assert not lay.bids_root.exists()


# --------------------------------------------------------------------------- bad input
def _add_undecodable_series(root: Path, visit: Visit, samples) -> None:
    """A second dump for the visit holding a real JPEG (12/16-bit, 1.2.840.10008.1.2.4.51) image
    with the visit's identity: dcm2niix (built with OpenJPEG and CharLS) cannot decode it; and a
    slice of the T1w sent twice, under a second SOPInstanceUID (one position twice in a series)."""
    lay = DatasetLayout(root)
    kept = next(lay.dicom_dir(visit).iterdir())
    ref = pydicom.dcmread(kept, stop_before_pixels=True)
    src = samples.pydicom_files / "JPEG-lossy.dcm"
    data = rewrite_dicom(src, patient_id=str(ref.PatientID), patient_name=str(ref.PatientName),
                         study_uid=ref.StudyInstanceUID,
                         series_uid=generate_uid(entropy_srcs=[ref.StudyInstanceUID, "20"]),
                         sop_uid=generate_uid(entropy_srcs=[ref.StudyInstanceUID, "20", "1"]), series_number=20,
                         series_description="T1w_MPR_cor",
                         instance_number=1, study_date=ref.StudyDate, study_time=ref.StudyTime,
                         image_type=("ORIGINAL", "PRIMARY", "M", "ND"))
    ds = pydicom.dcmread(io.BytesIO(data))  # stored as an MR image (the sample is a secondary capture)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.MRImageStorage
    ds.Modality = "MR"
    extra = root / "downloads" / visit.session / "QPN_001_extra" / "20_T1w_MPR_cor"
    extra.mkdir(parents=True)
    ds.save_as(extra / "IM0001")
    with open(lay.organize_report_path(visit), newline="", encoding="utf-8") as fh:
        t1 = sorted(r["dest"] for r in csv.DictReader(fh, delimiter="\t")
                    if r["decision"] == "kept" and r["series_description"] == "T1w_MPRAGE")
    again = pydicom.dcmread(lay.dicom_dir(visit) / t1[0])
    again.SOPInstanceUID = again.file_meta.MediaStorageSOPInstanceUID = generate_uid(
        entropy_srcs=[again.SOPInstanceUID, "again"])
    (extra.parent / "03_T1w_MPRAGE").mkdir()
    again.save_as(extra.parent / "03_T1w_MPRAGE" / "IM0001")


@pytest.mark.faults
def test_undecodable_series_and_repeated_slice_are_reported_and_the_rest_converted(instance, demo_root, samples):
    lay, v = DatasetLayout(demo_root), Visit("QPN001", "ses-01")
    run_bids(instance, demo_root, v.key, assets=[raw_dicoms, organized_dicoms])
    _add_undecodable_series(demo_root, v, samples)
    result = run_bids(instance, demo_root, v.key)
    assert result.success
    # organize keeps the slice sent twice (another SOPInstanceUID: another instance, not a copy
    # of one): the data problem is not hidden there
    assert metadata_of(result, "organized_dicoms")["kept"] == 42
    meta = metadata_of(result, "bids_session")
    rows = {r.data["series_number"]: r.data for r in meta["series"].records}
    assert rows[20]["status"] == "not_converted"
    assert "1.2.840.10008.1.2.4.51" in rows[20]["detail"] and "exit status" in rows[20]["detail"]
    # the T1w with one position twice: dcm2niix stacks it all the same, and its warning is listed
    # for the series, so the data problem shows
    assert rows[3]["dicoms"] == 10
    assert [w.data["message"] for w in meta["dcm2niix_warnings"].records if w.data["series_number"] == 3
            and "Interslice distance varies" in w.data["message"]]
    assert meta["files_per_datatype"] == {"anat": 6, "dwi": 4, "func": 2}
    assert not list(lay.bids_root.rglob("*acq-cor*"))  # the config matches it: it would be there if converted
    checks = checks_of(result)
    assert checks["all_series_converted"] is False and checks["bids_valid"] is True
    assert [p.name for p in lay.bids_scratch_root.iterdir()] == [".bids.lock"]


@pytest.mark.faults
@pytest.mark.parametrize("change, expected", [
    (lambda c: c["descriptions"][3].pop("criteria"), "descriptions[3] (id 't2w'): required key 'criteria' is missing"),
    (lambda c: c["descriptions"][1].update(dataType="anat"),
     "descriptions[1] (id 't1w_se'): 'dataType' is a dcm2bids 2.x key"),
    (lambda c: c["descriptions"][5].update(datatype="diffusion"), "descriptions[5] (id 'dwi'): 'datatype' 'diffusion'"),
    (lambda c: c["descriptions"][4].update(custom_entities="task rest"),
     "descriptions[4] (id 'task_rest'): 'custom_entities'"),
    (lambda c: c.update(search_method="re") or c["descriptions"][0].update(criteria={"SeriesDescription": "T1w_(MP"}),
     "descriptions[0] (id 't1w_mprage'): criteria 'SeriesDescription'"),
    (lambda c: c["descriptions"].append(dict(c["descriptions"][0])),
     "descriptions[6] (id 't1w_mprage'): id already used"),
    (lambda c: c.update(Descriptions=[]), "unknown key(s) 'Descriptions'"),
])
def test_malformed_config_is_one_error_naming_the_file_and_the_entry(tmp_path, change, expected):
    cfg = json.loads(json.dumps(DEMO_DCM2BIDS_CONFIG))
    change(cfg)
    path = write_dcm2bids_config(tmp_path, cfg)
    with pytest.raises(bids.BidsConfigError) as err:
        bids.load_dcm2bids_config(path)
    assert str(err.value).startswith(f"{path}: ") and expected in str(err.value)


@pytest.mark.faults
def test_bad_config_fails_the_asset_and_a_missing_one_leaves_the_session(instance, demo_root):
    lay, v = DatasetLayout(demo_root), Visit("QPN003", "ses-01")
    run_bids(instance, demo_root, v.key)
    before = snapshot(lay.bids_root)
    lay.dcm2bids_config_path.write_text('{"descriptions": [\n  {"datatype": "anat",}\n]}\n')
    result = run_bids(instance, demo_root, v.key, assets=[bids_session], raise_on_error=False)
    failure = next(ev for ev in result.all_events if ev.event_type_value == "STEP_FAILURE")
    assert f"{lay.dcm2bids_config_path}: not valid JSON (line 2" in failure.event_specific_data.error.message
    lay.dcm2bids_config_path.unlink()  # no config: nothing to do, and nothing written or removed
    result = run_bids(instance, demo_root, v.key, assets=[bids_session])
    assert result.success and not result.get_asset_materialization_events()
    assert snapshot(lay.bids_root) == before


@pytest.mark.faults
def test_two_sessions_of_one_participant_converted_at_once(instance, demo_root):
    ds = Dataset.open(demo_root)
    lay = ds.layout
    visits = [Visit("QPN002", "ses-01"), Visit("QPN002", "ses-02")]
    for v in visits:
        run_bids(instance, demo_root, v.key, assets=[raw_dicoms, organized_dicoms])
    config = bids.load_dcm2bids_config(lay.dcm2bids_config_path)
    barrier, results, errors = threading.Barrier(2), {}, []

    def convert(v):
        barrier.wait()
        try:
            results[v.key] = bids.convert_visit(visit=v, layout=lay, dicom_dir=lay.dicom_dir(v), config=config,
                                                dataset_name=ds.config.dataset_name)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=convert, args=(v,)) for v in visits]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(r.changed for r in results.values())
    sub = lay.bids_root / "sub-QPN002"
    assert sorted(p.name for p in sub.iterdir()) == ["ses-01", "ses-02", "sub-QPN002_sessions.tsv"]
    assert [ln.split("\t")[0] for ln in (sub / "sub-QPN002_sessions.tsv").read_text().splitlines()] == [
        "session_id", "ses-01", "ses-02"]
    for v in visits:  # each session holds its own visit's files only
        names = {p.name for p in lay.bids_session_dir(v).rglob("*.nii.gz")}
        assert names and all(n.startswith(f"sub-QPN002_{v.session}_") for n in names)
    assert [p.name for p in lay.bids_scratch_root.iterdir()] == [".bids.lock"]
    val = bids.validate(lay.bids_root, "QPN002", "ses-02")
    assert val.passed and val.other_errors == 0


_OFFLINE = """
import json, sys
from dicom_assets.core import bids
from dicom_assets.core.ids import parse_visit_key
from dicom_assets.core.dataset import Dataset
ds = Dataset.open(sys.argv[1]); lay = ds.layout; v = parse_visit_key(sys.argv[2])
r = bids.convert_visit(visit=v, layout=lay, dicom_dir=lay.dicom_dir(v),
    config=bids.load_dcm2bids_config(lay.dcm2bids_config_path), dataset_name=ds.config.dataset_name)
val = bids.validate(lay.bids_root, v.participant, v.session)
print(json.dumps({"files": r.files_per_datatype(), "errors": len(val.errors), "warnings": len(val.warnings)}))
"""


def test_conversion_and_validation_need_no_network(instance, demo_root):
    """dcm2bids (its GitHub version check answered from a seeded cache), dcm2niix and the
    validator (deno without --allow-net) in a network namespace with no network at all."""
    if subprocess.run(["unshare", "-rn", "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare -rn (a user and network namespace) is not allowed here")
    v = Visit("QPN003", "ses-02")
    run_bids(instance, demo_root, v.key, assets=[raw_dicoms, organized_dicoms])
    proc = subprocess.run(["unshare", "-rn", sys.executable, "-c", _OFFLINE, str(demo_root), v.key],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["errors"] == 0 and out["warnings"] > 0 and out["files"] == {"anat": 4, "dwi": 4, "func": 2}


@pytest.mark.faults
@pytest.mark.slow
def test_validator_errors_fail_the_blocking_check_of_their_session_only(instance, demo_root):
    lay = DatasetLayout(demo_root)
    for key in ("QPN001_ses-01", "QPN003_ses-02"):
        run_bids(instance, demo_root, key)
    (lay.bids_session_dir(Visit("QPN003", "ses-02")) / "anat" / "scanner_notes.txt").write_text("x\n")
    result = run_bids(instance, demo_root, "QPN001_ses-01", assets=[bids_session])
    check = next(ev for ev in result.get_asset_check_evaluations() if ev.check_name == "bids_valid")
    assert check.passed and check.metadata["errors_in_other_sessions"].value >= 1
    # the session with the stray file no longer matches its record: converted again, replaced whole
    result = run_bids(instance, demo_root, "QPN003_ses-02", assets=[bids_session])
    assert checks_of(result)["bids_valid"] is True and not list(lay.bids_root.rglob("scanner_notes.txt"))
    # a dataset-level error (BIDSVersion removed from the site's dataset_description.json) fails the check
    (lay.bids_root / "dataset_description.json").write_text('{"Name": "qpn-demo"}\n')
    result = run_bids(instance, demo_root, "QPN001_ses-01", assets=[bids_session], raise_on_error=False)
    assert not result.success and checks_of(result)["bids_valid"] is False
    check = next(ev for ev in result.get_asset_check_evaluations() if ev.check_name == "bids_valid")
    assert "BIDSVersion" in str(check.metadata["issues"].value.records)
    assert json.loads((lay.bids_root / "dataset_description.json").read_text()) == {"Name": "qpn-demo"}
