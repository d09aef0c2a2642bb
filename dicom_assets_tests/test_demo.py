"""The demo/benchmark builder: real files, new identities, reproducible bytes."""

import io
import tarfile
import zipfile

import numpy as np
import pydicom
import pytest

from dicom_assets.core.dataset import Dataset
from dicom_assets.testing.demo import build_corpus, build_demo_dataset, tree_digest


def _dicoms_of_zip(path):
    with zipfile.ZipFile(path) as zf:
        for name in zf.namelist():
            data = zf.read(name)
            if len(data) > 132 and data[128:132] == b"DICM" and not name.endswith("DICOMDIR"):
                yield name, pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)


def test_demo_dataset_is_valid_and_complete(pristine_demo):
    ds = Dataset.open(pristine_demo)
    assert ds.config.sessions == ("ses-01", "ses-02")
    assert len(ds.manifest.visits) == 8  # 4 participants x 2 sessions; QPN_004 has no download
    items = sorted(p.name for p in (pristine_demo / "downloads").glob("*/*"))
    assert items == ["QPN_001_MR.zip", "QPN_001_MR.zip", "QPN_002_MR.tar", "QPN_002_MR.tar.gz",
                     "QPN_003_MR", "QPN_003_MR.zip"]


def test_demo_dicoms_carry_new_identities(pristine_demo, samples):
    dump = pristine_demo / "downloads" / "ses-01" / "QPN_001_MR.zip"
    found = list(_dicoms_of_zip(dump))
    assert len(found) > 20
    studies = {d.StudyInstanceUID for _, d in found}
    assert len(studies) == 1  # one visit, one study
    assert {d.PatientID for _, d in found} == {"QPN_001"}
    series = {d.SeriesInstanceUID for _, d in found}
    assert 4 <= len({d.SeriesNumber for _, d in found}) <= 12
    assert len(series) == len({d.SeriesNumber for _, d in found})
    # IM9998 is the demo's truncated transfer of an existing slice: same SOP, cut short
    sops = [d.SOPInstanceUID for n, d in found if not n.endswith("IM9998")]
    assert len(set(sops)) == len(sops)
    # none of the source files' identities survive
    src = pydicom.dcmread(next((samples.xnat_case001 / "scans").glob("5_*/DICOM/*.dcm")), stop_before_pixels=True)
    assert src.StudyInstanceUID not in studies and src.SOPInstanceUID not in sops
    # every header is real scanner content: the GE files keep their manufacturer
    assert any(d.get("Manufacturer", "").startswith("GE") for _, d in found)
    # the study date is set on every DICOM, so the visit has a time
    assert {d.StudyDate for _, d in found} and all(len(d.StudyDate) == 8 for _, d in found)


def test_demo_t1w_is_one_volume(pristine_demo):
    """The T1w of a dump (the preamble-less IM9999 included, the truncated IM9998 left out) is a
    stack of a real volume: each slice at its own position, one step between neighbours, its
    InstanceNumbers 1..n in slice order; dcm2niix converts it as it is."""
    with zipfile.ZipFile(pristine_demo / "downloads/ses-01/QPN_001_MR.zip") as zf:
        t1 = {n: pydicom.dcmread(io.BytesIO(zf.read(n)), stop_before_pixels=True, force=True)
              for n in zf.namelist() if "/03_T1w_MPRAGE/" in n and not n.endswith("IM9998")}
    assert sorted(n.rsplit("/", 1)[1] for n in t1) == [f"IM{i:04d}" for i in range(1, 9)] + ["IM9999"]
    slices = sorted((int(d.InstanceNumber), [float(x) for x in d.ImagePositionPatient]) for d in t1.values())
    assert [i for i, _ in slices] == list(range(1, 10))
    positions = [p for _, p in slices]
    assert len({tuple(p) for p in positions}) == 9
    steps = {round(b[0] - a[0], 3) for a, b in zip(positions, positions[1:])}
    assert len(steps) == 1 and steps.pop() != 0 and all(p[1:] == positions[0][1:] for p in positions)  # sagittal


def test_other_session_is_another_study(pristine_demo):
    a = {d.StudyInstanceUID for _, d in _dicoms_of_zip(pristine_demo / "downloads/ses-01/QPN_001_MR.zip")}
    b = {d.StudyInstanceUID for _, d in _dicoms_of_zip(pristine_demo / "downloads/ses-02/QPN_001_MR.zip")}
    assert a and b and a.isdisjoint(b)


def test_tar_dump_is_readable(pristine_demo):
    with tarfile.open(pristine_demo / "downloads/ses-01/QPN_002_MR.tar.gz") as tf:
        names = tf.getnames()
    assert any(n.endswith("DICOMDIR") for n in names) and any("/.DS_Store" in n for n in names)


@pytest.mark.slow
def test_same_seed_same_bytes_other_seed_differs(samples, tmp_path, pristine_demo):
    again = build_demo_dataset(tmp_path / "again", samples, seed=0)
    assert tree_digest(again) == tree_digest(pristine_demo)
    other = build_demo_dataset(tmp_path / "other", samples, seed=1)
    a, b = tree_digest(other), tree_digest(pristine_demo)
    assert a["downloads/ses-01/QPN_001_MR.zip"] != b["downloads/ses-01/QPN_001_MR.zip"]


def test_corpus_files_are_large_real_images(samples, tmp_path):
    out = build_corpus(tmp_path / "c", samples, n_files=12, file_kb=256, series_count=3)
    files = sorted(p for p in out.rglob("*") if p.is_file())
    assert len(files) == 12
    sizes = [p.stat().st_size for p in files]
    assert all(250 * 1024 < s < 270 * 1024 for s in sizes), sizes
    ds = pydicom.dcmread(files[0])
    arr = ds.pixel_array
    assert arr.shape == (362, 362)
    assert np.count_nonzero(arr) > arr.size // 4 and arr.std() > 10  # anatomy, not zeros
    assert len({pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID for p in files}) == 3
    again = build_corpus(tmp_path / "d", samples, n_files=12, file_kb=256, series_count=3)
    assert tree_digest(out) == tree_digest(again)
