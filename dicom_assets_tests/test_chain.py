"""The chain of one visit through materialize() on a real instance, as the UI runs it."""

import csv
import hashlib
import os
import shutil

import pytest

from dicom_assets.core.ids import Visit
from dicom_assets.core.layout import DatasetLayout

from .helpers import AssetSelection, checks_of, metadata_of, run_chain

VISIT = "QPN001_ses-01"


def digest(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_visit_runs_through_the_chain(instance, demo_root):
    downloads_before = {p: digest(p) for p in (demo_root / "downloads").rglob("*") if p.is_file()}
    result = run_chain(instance, demo_root, VISIT)
    assert result.success
    lay, v = DatasetLayout(demo_root), Visit("QPN001", "ses-01")

    raw = metadata_of(result, "raw_dicoms")
    assert raw["files"] > 40 and raw["path"] == str(lay.raw_dir(v))

    org = metadata_of(result, "organized_dicoms")
    assert org["found"] == org["kept"] + org["excluded"]
    assert org["excluded_not_dicom"] == 2  # .DS_Store, scanner_notes.txt
    assert org["excluded_unreadable"] == 1  # the truncated transfer
    assert org["excluded_no_pixel_data"] == 2  # DICOMDIR, Phoenix report
    assert org["excluded_excluded_series"] == 5  # Localizers, AAHEAD scout
    assert org["kept"] == len(os.listdir(lay.dicom_dir(v)))
    assert "data:image/png;base64," in org["qc_montage"]
    assert org["qc_montage_png"] == str(lay.qc_path(v)) and lay.qc_path(v).stat().st_size > 10000
    series = org["series"].records
    assert {r.data["series_description"] for r in series} >= {"T1w_MPRAGE", "Localizers", "rsfMRI_mosaic"}
    assert sum(r.data["files"] for r in series) == org["kept"]

    tar = metadata_of(result, "visit_tarball")
    assert tar["members"] == org["kept"]
    assert tar["sha256"] == hashlib.sha256(lay.tarball_path("QPN", v).read_bytes()).hexdigest()
    meta = metadata_of(result, "visit_metadata")
    assert meta["dicoms"] == org["kept"] and meta["sha256"] == tar["sha256"]
    assert meta["md5"] == hashlib.md5(lay.tarball_path("QPN", v).read_bytes()).hexdigest()
    assert all(checks_of(result).values()) and len(checks_of(result)) == 6

    status = {r["visit"]: r for r in csv.DictReader(open(lay.curation_status_path), delimiter="\t")}
    assert status[VISIT]["in_store"] == "true" and status[VISIT]["in_organized"] == "true"
    assert status["QPN002_ses-01"]["in_raw_dicoms"] == "false"
    assert status["QPN004_ses-01"]["in_downloads"] == "false"
    # nothing of the downloads was changed, moved or lost
    assert {p: digest(p) for p in (demo_root / "downloads").rglob("*") if p.is_file()} == downloads_before


def test_rematerializing_gives_the_same_result(instance, demo_root):
    lay, v = DatasetLayout(demo_root), Visit("QPN002", "ses-01")
    run_chain(instance, demo_root, v.key)
    files1 = sorted(os.listdir(lay.dicom_dir(v)))
    tar1 = lay.tarball_path("QPN", v).read_bytes()
    js1 = lay.metadata_dicoms_path("QPN", v).read_bytes(), lay.metadata_tarball_path("QPN", v).read_bytes()
    run_chain(instance, demo_root, v.key)
    assert sorted(os.listdir(lay.dicom_dir(v))) == files1
    assert lay.tarball_path("QPN", v).read_bytes() == tar1
    assert (lay.metadata_dicoms_path("QPN", v).read_bytes(), lay.metadata_tarball_path("QPN", v).read_bytes()) == js1
    assert [p.name for p in lay.dicom_dir(v).parent.iterdir()] == ["QPN002"]


def test_copied_dataset_root_gives_identical_archive(instance, demo_root, tmp_path):
    v = Visit("QPN003", "ses-01")  # the folder-form dump
    run_chain(instance, demo_root, v.key)
    elsewhere = tmp_path / "another" / "place"
    shutil.copytree(demo_root / "downloads", elsewhere / "downloads")
    shutil.copytree(demo_root / "tabular", elsewhere / "tabular", ignore=shutil.ignore_patterns("curation*"))
    shutil.copy(demo_root / "global_config.json", elsewhere)
    run_chain(instance, elsewhere, v.key)
    a, b = DatasetLayout(demo_root), DatasetLayout(elsewhere)
    assert digest(a.tarball_path("QPN", v)) == digest(b.tarball_path("QPN", v))
    assert a.metadata_tarball_path("QPN", v).read_bytes() == b.metadata_tarball_path("QPN", v).read_bytes()
    assert a.metadata_dicoms_path("QPN", v).read_bytes() == b.metadata_dicoms_path("QPN", v).read_bytes()


@pytest.mark.faults
def test_checks_fail_on_a_tampered_tarball(instance, demo_root):
    run_chain(instance, demo_root, VISIT)
    tar = DatasetLayout(demo_root).tarball_path("QPN", Visit("QPN001", "ses-01"))
    data = bytearray(tar.read_bytes())
    data[5000] ^= 0xFF
    tar.write_bytes(bytes(data))
    # describing the tampered tarball again: the md5 no longer matches the one recorded at writing
    result = run_chain(instance, demo_root, VISIT, selection=AssetSelection.assets("visit_metadata"),
                       raise_on_error=False)
    assert checks_of(result)["tarball_unchanged"] is False
    # re-materializing the tarball repairs it
    result = run_chain(instance, demo_root, VISIT, selection=AssetSelection.assets("visit_tarball", "visit_metadata"))
    assert all(checks_of(result).values())


@pytest.mark.faults
def test_visit_with_nothing_to_keep_fails_its_blocking_check(instance, demo_root):
    ses = demo_root / "downloads" / "ses-01"
    (ses / "QPN_004").mkdir()
    (ses / "QPN_004" / "readme.txt").write_text("the scanner export failed\n")
    result = run_chain(instance, demo_root, "QPN004_ses-01", raise_on_error=False)
    assert not result.success
    assert checks_of(result)["has_kept_dicoms"] is False
    materialized = {ev.asset_key.to_user_string() for ev in result.get_asset_materialization_events()}
    assert "visit_tarball" not in materialized  # the blocking check stopped the chain


@pytest.mark.faults
def test_unsafe_download_fails_with_clear_message(instance, demo_root):
    import zipfile

    with zipfile.ZipFile(demo_root / "downloads" / "ses-02" / "QPN_004_MR.zip", "w") as zf:
        zf.writestr("../../../escape.dcm", b"x")
    result = run_chain(instance, demo_root, "QPN004_ses-02", raise_on_error=False)
    assert not result.success
    failure = next(ev for ev in result.all_events if ev.event_type_value == "STEP_FAILURE")
    assert "points outside the target" in failure.event_specific_data.error.message
    assert not (demo_root.parent / "escape.dcm").exists()


@pytest.mark.faults
def test_two_dumps_for_one_visit_are_both_kept(instance, demo_root):
    """A visit exported in two parts: both are extracted, identical files de-duplicated."""
    ses = demo_root / "downloads" / "ses-01"
    shutil.copy(ses / "QPN_001_MR.zip", ses / "QPN_001_part2.zip")
    result = run_chain(instance, demo_root, VISIT)
    raw = metadata_of(result, "raw_dicoms")
    assert [r.data["item"].rsplit("/", 1)[-1] for r in raw["downloads"].records] == ["QPN_001_MR.zip",
                                                                                  "QPN_001_part2.zip"]
    org = metadata_of(result, "organized_dicoms")
    assert org["excluded_duplicate"] == org["kept"]  # every DICOM of part 2 is a copy of part 1
    assert checks_of(result)["no_conflicting_duplicates"] is True
