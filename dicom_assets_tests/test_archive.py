"""The reproducible tarball and the metadata JSON, at the core level."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from importlib import resources
from pathlib import Path

import jsonschema
import pydicom
import pytest

from dicom_assets.core.metadata import describe_tarball, write_metadata
from dicom_assets.core.tarball import organized_files, parse_da_tm, write_tarball
from dicom_assets.testing.demo import rewrite_dicom


def schema(name):
    return json.loads(resources.files("dicom_assets").joinpath(f"schemas/{name}.schema.json").read_text())


@pytest.fixture
def visit_dir(samples, tmp_path):
    """An organized visit: symlinks to real GE DICOMs rewritten with known dates."""
    raw, org = tmp_path / "raw", tmp_path / "org"
    raw.mkdir(), org.mkdir()
    srcs = sorted((samples.xnat_case001 / "scans").glob("5_*/DICOM/*.dcm"))[:5]
    times = ["101010.123456", "101011", "1010", "", "10:10:15.5"]
    for i, (src, tm) in enumerate(zip(srcs, times)):
        data = rewrite_dicom(src, patient_id="P", patient_name="P", study_uid="1.2.3", series_uid="1.2.3.1",
                             sop_uid=f"1.2.3.1.{i}", series_number=1, series_description="T1", instance_number=i,
                             study_date="20240304", study_time=tm)
        (raw / f"IM{i}").write_bytes(data)
        os.symlink(f"../raw/IM{i}", org / f"1.2.3.1.{i}.dcm")
    return org


def sha(p):
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def test_members_have_fixed_attributes_and_dicom_times(visit_dir, tmp_path):
    res = write_tarball(organized_files(visit_dir), tmp_path / "store" / "V_dicom.tar", "V")
    with tarfile.open(res.path) as tf:
        members = tf.getmembers()
    assert members[0].name == "V" and members[0].isdir() and members[0].mode == 0o755
    files = members[1:]
    assert [m.name for m in files] == sorted(m.name for m in files)
    for m in files:
        assert m.isfile() and not m.issym()  # the content of the links, not the links
        assert (m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, "root", "root", 0o644)
        assert m.devmajor == 0 and m.devminor == 0 and m.pax_headers == {}
    expected = [parse_da_tm("20240304", t) for t in ["101010", "101011", "1010", "", "101015"]]
    assert [m.mtime for m in files] == expected
    assert expected[0] == 1709547010  # 2024-03-04T10:10:10Z: read as UTC
    with tarfile.open(res.path) as tf:
        for m in files:
            assert tf.extractfile(m).read() == (visit_dir / Path(m.name).name).read_bytes()
    assert res.size == Path(res.path).stat().st_size and res.size % 10240 == 0
    assert res.sha256 == sha(res.path)


def test_same_bytes_in_any_time_zone_and_python_process(visit_dir, tmp_path):
    a = write_tarball(organized_files(visit_dir), tmp_path / "a.tar", "V")
    code = ("import sys; from pathlib import Path; from dicom_assets.core.tarball import write_tarball, organized_files;"
            "print(write_tarball(organized_files(Path(sys.argv[1])), Path(sys.argv[2]), 'V').sha256)")
    for tz in ("Asia/Tokyo", "America/Los_Angeles"):
        out = subprocess.run([sys.executable, "-c", code, str(visit_dir), str(tmp_path / f"{tz[:4]}.tar")],
                             env={**os.environ, "TZ": tz}, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == a.sha256


def test_gnu_tar_reads_it_and_extracts_identical_files(visit_dir, tmp_path):
    if shutil.which("tar") is None:
        pytest.skip("GNU tar is not installed")
    res = write_tarball(organized_files(visit_dir), tmp_path / "v.tar", "V")
    listing = subprocess.run(["tar", "--utc", "-tvf", res.path], capture_output=True, text=True, check=True).stdout
    assert "root/root" in listing and "2024-03-04 10:10" in listing
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(["tar", "-xf", res.path, "-C", str(out)], check=True)
    for f in (out / "V").iterdir():
        assert f.read_bytes() == (visit_dir / f.name).read_bytes()


def test_files_without_dates_get_the_latest_dicom_time(visit_dir, samples, tmp_path):
    ge = sorted((samples.xnat_case001 / "scans").glob("2_*/DICOM/*.dcm"))[0]  # no date tags at all
    assert "StudyDate" not in pydicom.dcmread(ge, stop_before_pixels=True)
    os.symlink(ge, visit_dir / "zz_nodate.dcm")
    (visit_dir / "notes.txt").write_text("not a DICOM")
    res = write_tarball(organized_files(visit_dir), tmp_path / "v.tar", "V")
    with tarfile.open(res.path) as tf:
        times = {Path(m.name).name: m.mtime for m in tf.getmembers()}
    latest = max(parse_da_tm("20240304", t) for t in ["101010", "101011", "1010", "101015"])
    assert times["zz_nodate.dcm"] == times["notes.txt"] == times["V"] == latest == res.content_time


@pytest.mark.faults
def test_a_visit_without_any_date_still_archives(samples, tmp_path):
    org = tmp_path / "org"
    org.mkdir()
    for p in sorted((samples.xnat_case001 / "scans").glob("4_*/DICOM/*.dcm")):
        os.symlink(p, org / p.name)
    res = write_tarball(organized_files(org), tmp_path / "v.tar", "V")
    with tarfile.open(res.path) as tf:
        assert {m.mtime for m in tf.getmembers()} == {0}


@pytest.mark.parametrize("da,tm,expected", [
    ("20240304", "235959.999999", "2024-03-04T23:59:59"),
    ("20240304", "23", "2024-03-04T23:00:00"),
    ("20240304", None, "2024-03-04T00:00:00"),
    ("20240304", "99:99", "2024-03-04T00:00:00"),  # invalid time (nibabel's JPEG 2000 file): midnight
    ("2024-03-04", "120000", "2024-03-04T12:00:00"),
    ("20241304", "120000", None),
    ("", "120000", None),
])
def test_dicom_date_time_parsing(da, tm, expected):
    from datetime import datetime, timezone
    ts = parse_da_tm(da, tm)
    if expected is None:
        assert ts is None
    else:
        assert datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S") == expected


@pytest.mark.faults
def test_crash_mid_write_keeps_the_previous_tarball(visit_dir, tmp_path):
    dest = tmp_path / "store" / "V_dicom.tar"
    first = write_tarball(organized_files(visit_dir), dest, "V")
    (visit_dir / "extra.dcm").symlink_to(os.readlink(next(visit_dir.iterdir())))
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_tarball(organized_files(visit_dir), dest, "V", fail_after=3)
    assert sha(dest) == first.sha256
    assert sorted(p.name for p in dest.parent.iterdir()) == ["V_dicom.tar"]  # the temporary file is gone
    # a crash that leaves a stray temporary file behind (kill -9) is cleaned by the next run
    (dest.parent / ".V_dicom.tar.tmp-deadbeef").write_bytes(b"half")
    second = write_tarball(organized_files(visit_dir), dest, "V")
    assert second.members == first.members + 1
    assert sorted(p.name for p in dest.parent.iterdir()) == ["V_dicom.tar"]


@pytest.mark.faults
def test_disk_full_during_tar_is_clear_and_keeps_the_previous_tarball(visit_dir, tmp_path, monkeypatch):
    import errno

    from dicom_assets.core import tarball as tarball_mod

    dest = tmp_path / "store" / "V_dicom.tar"
    first = write_tarball(organized_files(visit_dir), dest, "V")
    inputs = {p.name: sha(p) for p in visit_dir.iterdir()}
    calls = {"n": 0}
    real = os.writev

    def full_disk(fd, views):
        calls["n"] += 1
        if calls["n"] > 3:  # the disk fills up after a few writes
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, views)

    monkeypatch.setattr(tarball_mod.os, "writev", full_disk)
    with pytest.raises(OSError, match="No space left on device"):
        write_tarball(organized_files(visit_dir), dest, "V")
    monkeypatch.undo()
    assert sha(dest) == first.sha256  # the previous tarball is intact
    assert sorted(p.name for p in dest.parent.iterdir()) == ["V_dicom.tar"]  # no partial file left
    assert {p.name: sha(p) for p in visit_dir.iterdir()} == inputs  # inputs untouched
    assert write_tarball(organized_files(visit_dir), dest, "V").sha256 == first.sha256  # space back: same bytes


@pytest.mark.faults
def test_process_killed_mid_tarball_loses_nothing(visit_dir, tmp_path):
    """A real SIGKILL in the middle of writing (no Python cleanup runs): the previous tarball
    stays, the stray temporary file is removed by the next run, which gives the same bytes."""
    dest = tmp_path / "store" / "V_dicom.tar"
    first = write_tarball(organized_files(visit_dir), dest, "V")
    child = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from dicom_assets.core import tarball as t\n"
        "real, n = os.writev, [0]\n"
        "def dying(fd, views):\n"
        "    n[0] += 1\n"
        "    if n[0] == 3: os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(fd, views)\n"
        "t.os.writev = dying\n"
        "t.write_tarball(t.organized_files(Path(sys.argv[1])), Path(sys.argv[2]), 'V')\n")
    proc = subprocess.run([sys.executable, "-c", child, str(visit_dir), str(dest)], capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    strays = [p.name for p in dest.parent.iterdir() if p.name != "V_dicom.tar"]
    assert strays and all(n.startswith(".V_dicom.tar.tmp-") for n in strays)
    assert sha(dest) == first.sha256
    again = write_tarball(organized_files(visit_dir), dest, "V")
    assert again.sha256 == first.sha256
    assert sorted(p.name for p in dest.parent.iterdir()) == ["V_dicom.tar"]


def test_long_paths_use_a_deterministic_pax_header(tmp_path):
    d = tmp_path / "org"
    d.mkdir()
    long = "x" * 180 + ".dcm"
    (d / long).write_bytes(b"data")
    a = write_tarball(organized_files(d), tmp_path / "a.tar", "V")
    b = write_tarball(organized_files(d), tmp_path / "b.tar", "V")
    assert a.sha256 == b.sha256
    with tarfile.open(a.path) as tf:
        assert tf.getnames() == ["V", f"V/{long}"]
        assert tf.extractfile(f"V/{long}").read() == b"data"


def test_metadata_describes_exactly_the_tarball(visit_dir, tmp_path):
    res = write_tarball(organized_files(visit_dir), tmp_path / "QPN" / "P1_ses-01_dicom.tar", "P1_ses-01")
    meta = describe_tarball(Path(res.path), visit="P1_ses-01", study="QPN", participant="P1", session="ses-01",
                            tool_version="9.9")
    tj, dj = tmp_path / "t.json", tmp_path / "d.json"
    write_metadata(meta, tj, dj)
    t, d = json.loads(tj.read_text()), json.loads(dj.read_text())
    jsonschema.validate(t, schema("metadata_tarball"))
    jsonschema.validate(d, schema("metadata_dicoms"))
    assert (t["sha256"], t["size"]) == (res.sha256, res.size)
    assert t["md5"] == hashlib.md5(Path(res.path).read_bytes()).hexdigest()
    assert t["storepath"] == "QPN/P1_ses-01_dicom.tar" and t["dspath"] == "icf/P1_ses-01_dicom.tar"
    assert t["content_time"] == "2024-03-04T10:10:15Z"
    assert t["dicoms"] == len(d) == 5
    for rec in d:
        src = visit_dir / Path(rec["path"]).name
        assert rec["md5"] == hashlib.md5(src.read_bytes()).hexdigest() and rec["size"] == src.stat().st_size
        ds = pydicom.dcmread(src, stop_before_pixels=True)
        assert rec["SOPInstanceUID"] == ds.SOPInstanceUID and rec["SeriesNumber"] == 1
        assert rec["Manufacturer"] == ds.Manufacturer and rec["ImageType"] == list(ds.ImageType)
        assert rec["PulseSequenceName"] is None  # absent tags are null, never a crash
    # keys sorted, stable bytes
    assert tj.read_text() == json.dumps(t, indent=2, sort_keys=True) + "\n"
    import pandas as pd
    assert len(pd.read_json(dj)) == 5  # readable by pandas


# ----------------------------------------------------------------- hostile input (issue 13)
def _dated(samples, tmp_path, dates):
    org = tmp_path / "org"
    org.mkdir()
    src = sorted((samples.xnat_case001 / "scans").glob("5_*/DICOM/*.dcm"))[0]
    for i, (da, tm) in enumerate(dates):
        (org / f"1.2.3.{i}.dcm").write_bytes(rewrite_dicom(
            src, patient_id="P", patient_name="P", study_uid="1.2.3", series_uid="1.2.3.1", sop_uid=f"1.2.3.{i}",
            series_number=1, series_description="T1", instance_number=i, study_date=da, study_time=tm))
    return org


@pytest.mark.faults
def test_dates_outside_the_tar_range_are_clamped_reproducibly(samples, tmp_path):
    """A StudyDate past 2242 overflows ustar's 12-byte mtime (was: a raw ValueError); before
    1970 it would be negative. Both are clamped, the tarball stays reproducible and readable."""
    org = _dated(samples, tmp_path, [("99991231", "235959"), ("18500101", "000000"), ("2024\u00b2304", "1\u00b3"),
                                     ("20240304", "101010")])
    a = write_tarball(organized_files(org), tmp_path / "a.tar", "V")
    b = write_tarball(organized_files(org), tmp_path / "b.tar", "V")
    assert a.sha256 == b.sha256
    with tarfile.open(a.path) as tf:
        times = {Path(m.name).name: m.mtime for m in tf.getmembers()}
    max_mtime = 8**11 - 1  # tarball.MAX_MTIME: 2242-03-16T12:56:31Z
    assert times["1.2.3.0.dcm"] == max_mtime
    assert times["1.2.3.1.dcm"] == 0
    assert times["1.2.3.2.dcm"] == times["V"] == max_mtime  # not a date ("²" is no digit): the latest time
    assert times["1.2.3.3.dcm"] == parse_da_tm("20240304", "101010")
    meta = describe_tarball(Path(a.path), visit="V", study="S", participant="P", session="s", tool_version="1")
    assert meta.tarball["content_time"] == "2242-03-16T12:56:31Z"


@pytest.mark.faults
def test_broken_link_in_the_organized_folder_fails_naming_it(visit_dir, tmp_path):
    """A link whose raw file vanished was skipped by organized_files, so the tarball silently
    missed a member while a count from the same listing agreed."""
    from dicom_assets.core.errors import DicomAssetsError

    victim = sorted(visit_dir.iterdir())[2]
    (visit_dir / os.readlink(victim)).unlink()  # the raw file behind the link is gone
    with pytest.raises(DicomAssetsError, match=f"{victim.name}: a broken link"):
        organized_files(visit_dir)
    assert not (tmp_path / "v.tar").exists()


@pytest.mark.faults
def test_organized_folder_is_checked_against_an_independent_list(visit_dir):
    from dicom_assets.core.errors import OrganizedFolderError

    names = sorted(p.name for p in visit_dir.iterdir())
    assert [n for _, n in organized_files(visit_dir, expected=names)] == names
    (visit_dir / names[0]).unlink()  # a kept file removed from the folder, no broken link left
    with pytest.raises(OrganizedFolderError, match=f"1 kept file.s. missing .first '{names[0]}'"):
        organized_files(visit_dir, expected=names)
    (visit_dir / "sub").mkdir()
    with pytest.raises(OrganizedFolderError, match="sub: a folder"):
        organized_files(visit_dir, expected=names)


@pytest.mark.faults
def test_member_vanishing_while_archived_is_a_named_error(visit_dir, tmp_path, monkeypatch):
    from dicom_assets.core import tarball as tarball_mod
    from dicom_assets.core.errors import DicomAssetsError

    dest = tmp_path / "store" / "V_dicom.tar"
    first = write_tarball(organized_files(visit_dir), dest, "V")
    files = organized_files(visit_dir)
    real = tarball_mod.scan_members

    def then_vanish(fs):
        members = real(fs)
        os.unlink(visit_dir / os.readlink(fs[1][0]))
        return members

    monkeypatch.setattr(tarball_mod, "scan_members", then_vanish)
    with pytest.raises(DicomAssetsError, match=f"{files[1][1]}: the organized file is a broken link or vanished"):
        write_tarball(files, dest, "V")
    assert sha(dest) == first.sha256


def test_deflated_dicom_is_archived_and_described(samples, tmp_path):
    org = tmp_path / "org"
    org.mkdir()
    src = samples.pydicom_files / "image_dfl.dcm"
    ds = pydicom.dcmread(src)
    os.symlink(src, org / f"{ds.SOPInstanceUID}.dcm")
    res = write_tarball(organized_files(org), tmp_path / "v.tar", "V")
    meta = describe_tarball(Path(res.path), visit="V", study="S", participant="P", session="s", tool_version="1")
    (rec,) = meta.dicoms
    assert rec["SOPInstanceUID"] == ds.SOPInstanceUID and rec["Modality"] == ds.Modality


@pytest.mark.faults
def test_chain_fails_on_a_broken_link_and_counts_from_the_report(instance, demo_root):
    """At the asset level: the tarball step fails naming the broken link (was: a tarball one
    member short and a count check that passed, both from the same folder listing)."""
    from dicom_assets.core.ids import Visit
    from dicom_assets.core.layout import DatasetLayout

    from .helpers import AssetSelection, checks_of, run_chain

    visit = "QPN002_ses-01"
    lay, v = DatasetLayout(demo_root), Visit("QPN002", "ses-01")
    assert run_chain(instance, demo_root, visit).success
    tar_before = sha(lay.tarball_path("QPN", v))
    link = sorted(lay.dicom_dir(v).iterdir())[3]
    link.resolve().unlink()  # the scratch copy behind one organized link is gone
    result = run_chain(instance, demo_root, visit, selection=AssetSelection.assets("visit_tarball"),
                       raise_on_error=False)
    assert not result.success
    failure = next(ev for ev in result.all_events if ev.event_type_value == "STEP_FAILURE")
    assert f"{link.name}: a broken link" in failure.event_specific_data.error.message
    assert sha(lay.tarball_path("QPN", v)) == tar_before  # the previous tarball is intact
    # a link removed outright (no broken link left): the report still knows it was kept
    link.unlink()
    result = run_chain(instance, demo_root, visit, selection=AssetSelection.assets("visit_tarball"),
                       raise_on_error=False)
    failure = next(ev for ev in result.all_events if ev.event_type_value == "STEP_FAILURE")
    assert f"1 kept file(s) missing (first '{link.name}')" in failure.event_specific_data.error.message
    # describing the previous tarball: the count check compares with the report, which agrees
    result = run_chain(instance, demo_root, visit, selection=AssetSelection.assets("visit_metadata"))
    assert checks_of(result)["dicom_count_matches"] is True


@pytest.mark.faults
def test_tarball_of_a_visit_never_organized_says_what_to_run_first(instance, demo_root):
    """visit_tarball (and bids_session, which shares the check) run by hand on a visit whose
    DICOMs were never organized: one message naming the folder and the step to run, no tarball."""
    from dicom_assets.core.ids import Visit
    from dicom_assets.core.layout import DatasetLayout

    from .helpers import AssetSelection, run_chain

    lay, v = DatasetLayout(demo_root), Visit("QPN003", "ses-02")
    result = run_chain(instance, demo_root, v.key, selection=AssetSelection.assets("visit_tarball"),
                       raise_on_error=False)
    failure = next(ev for ev in result.all_events if ev.event_type_value == "STEP_FAILURE")
    message = failure.event_specific_data.error.message
    assert str(lay.dicom_dir(v)) in message and "materialize organized_dicoms first" in message
    assert not lay.tarball_path("QPN", v).exists()
