"""Organize: every file of a messy raw tree classified from its header, with a reason."""

import os
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest

from dicom_assets.core.dicomscan import REASONS, Rules
from dicom_assets.core.organize import organize_visit
from dicom_assets.testing.demo import preambleless, rewrite_dicom

RULES = Rules(exclude_series=("Localizers", "AAHEAD"))


def ident(i, series=3, study="1.2.3.4", patient="P1", desc="T1w", sop=None):
    return dict(patient_id=patient, patient_name="x^y", study_uid=study, series_uid=f"{study}.{series}",
                sop_uid=sop or f"{study}.{series}.{i}", series_number=series, series_description=desc,
                instance_number=i, study_date="20240304", study_time="101010.5")


@pytest.fixture
def t1_sources(samples):
    return sorted((samples.xnat_case001 / "scans").glob("5_*/DICOM/*.dcm"))[:6]


def write(root: Path, rel: str, data: bytes) -> Path:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return p


def by_source(result):
    return {r.source: r for r in result.records}


@pytest.mark.faults
def test_messy_tree_every_case_has_its_reason(samples, t1_sources, tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "dicom" / "P1"
    pf = samples.pydicom_files
    # two series whose files share names (IM0001 ...) in different folders
    for i, src in enumerate(t1_sources[:3], 1):
        write(raw, f"dump/s3/IM{i:04d}", rewrite_dicom(src, **ident(i, 3)))
    for i, src in enumerate(t1_sources[3:], 1):
        write(raw, f"dump/s4/IM{i:04d}", rewrite_dicom(src, **ident(i, 4, desc="T2w")))
    good = rewrite_dicom(t1_sources[0], **ident(9, 3))
    write(raw, "dump/s3/IM0009", good)
    write(raw, "dump/s3/IM0009_cut", good[: len(good) // 2])  # truncated (same SOP, excluded first)
    write(raw, "dump/copy/IM0009", good)  # identical duplicate
    other = rewrite_dicom(t1_sources[1], **ident(9, 3))  # same SOP UID, other bytes
    write(raw, "dump/zz/IM0009", other)
    write(raw, "dump/empty.dcm", b"")
    write(raw, "dump/notes.dcm", b"this is a text file named .dcm\n" * 20)
    write(raw, "dump/DICOMDIR", (pf / "dicomdirtests" / "DICOMDIR").read_bytes())
    write(raw, "dump/nometa", preambleless(rewrite_dicom(t1_sources[4], **ident(77, 3))))  # no preamble
    shutil.copy(pf / "no_meta.dcm", raw / "dump" / "no_meta_mangled")  # pydicom's: a stray byte first
    shutil.copy(pf / "dicomdirtests/98892003/MR700/4467", raw / "dump" / "derived")  # DERIVED\SECONDARY
    shutil.copy(pf / "MR_truncated.dcm", raw / "dump" / "MR_truncated.dcm")
    shutil.copy(samples.heudiconv_data / "Phoenix/99+PhoenixDocument/99+PhoenixDocument+00001.dcm", raw / "dump" / "report")
    write(raw, "dump/Localizers_3pl/IM0001", rewrite_dicom(t1_sources[0], **ident(1, 1, desc="scout")))
    write(raw, "dump/s2/IM0001", rewrite_dicom(t1_sources[0], **ident(1, 2, desc="AAHEAD_Scout_64ch")))
    write(raw, "dump/s3/._IM0001", b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")
    shutil.copy(samples.nibabel_data / "siemens_dwi_0.dcm.gz", raw / "dump" / "dwi.dcm.gz")
    # ImageType with DERIVED as a later value (the old scripts checked only the first one)
    write(raw, "dump/s5/IM0001", rewrite_dicom(t1_sources[2], **ident(1, 5, desc="MPR"),
                                                 image_type=("ORIGINAL", "PRIMARY", "DERIVED")))

    result = organize_visit("P1_ses-01", raw, out, RULES, report_path=tmp_path / "report.tsv")
    r = by_source(result)
    assert r["dump/s3/IM0001"].reason == "kept"
    assert r["dump/s3/IM0009_cut"].reason == "unreadable" and "truncated" in r["dump/s3/IM0009_cut"].detail
    assert r["dump/copy/IM0009"].reason == "kept"  # sorted first: dump/copy < dump/s3
    assert r["dump/s3/IM0009"].reason == "duplicate"
    assert r["dump/zz/IM0009"].reason == "duplicate_conflict"
    assert r["dump/empty.dcm"].reason == "not_dicom" and r["dump/empty.dcm"].detail == "empty file"
    assert r["dump/notes.dcm"].reason == "not_dicom"
    assert r["dump/DICOMDIR"].reason == "no_pixel_data" and "DICOMDIR" in r["dump/DICOMDIR"].detail
    assert r["dump/nometa"].reason == "kept"  # preamble-less files are DICOM too
    assert r["dump/no_meta_mangled"].reason == "not_dicom"
    assert r["dump/derived"].reason == "derived"
    assert r["dump/MR_truncated.dcm"].reason == "unreadable"
    assert r["dump/report"].reason == "no_pixel_data" and "Structured Report" in r["dump/report"].detail
    assert r["dump/Localizers_3pl/IM0001"].reason == "excluded_series"  # by folder name
    assert r["dump/s2/IM0001"].reason == "excluded_series"  # by series description
    assert r["dump/s3/._IM0001"].reason == "not_dicom"
    assert r["dump/dwi.dcm.gz"].reason == "not_dicom" and "gzip" in r["dump/dwi.dcm.gz"].detail
    assert r["dump/s5/IM0001"].reason == "derived"
    assert all(rec.reason in ("kept", *REASONS) for rec in result.records)
    assert len(result.conflicts) == 1

    # flat, unique, stable names; relative symlinks that resolve to the right bytes
    names = sorted(os.listdir(out))
    assert len(names) == len(result.kept) == 8
    for rec in result.kept:
        link = out / rec.dest
        assert link.is_symlink() and not os.path.isabs(os.readlink(link))
        assert link.read_bytes() == (raw / rec.source).read_bytes()
        assert rec.dest == f"{rec.sop_instance_uid}.dcm"
    # the report lists every file with its reason
    lines = (tmp_path / "report.tsv").read_text().splitlines()
    assert lines[0].startswith("source\tdecision\treason")
    assert len(lines) == 1 + len(result.records)


def test_ge_session_without_dates_and_odd_folder_names(samples, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(samples.xnat_case001, raw / "Case001")  # folders with spaces and ':'
    result = organize_visit("C_ses-01", raw, tmp_path / "dicom", Rules(("LOCALIZER",)))
    counts = result.counts()
    assert counts["kept"] == 324 - 29 - 3  # both SAG LOCALIZER series excluded
    assert counts["excluded_series"] == 32
    assert not result.mixed


def test_rerun_is_idempotent_and_atomic(samples, t1_sources, tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "dicom" / "P1"
    for i, src in enumerate(t1_sources, 1):
        write(raw, f"s/IM{i}", rewrite_dicom(src, **ident(i)))
    first = organize_visit("P1_ses-01", raw, out, RULES)
    listing = sorted((p.name, os.readlink(p)) for p in out.iterdir())
    (out / "stale.dcm").write_text("left over from a crash")
    second = organize_visit("P1_ses-01", raw, out, RULES)
    assert sorted((p.name, os.readlink(p)) for p in out.iterdir()) == listing
    assert [r.dest for r in first.kept] == [r.dest for r in second.kept]
    assert [p.name for p in out.parent.iterdir()] == ["P1"]  # no staging left behind


def test_copy_mode_and_moving_the_root(samples, t1_sources, tmp_path):
    root = tmp_path / "a"
    raw, out = root / "raw", root / "dicom" / "P1"
    for i, src in enumerate(t1_sources[:2], 1):
        write(raw, f"s/IM{i}", rewrite_dicom(src, **ident(i)))
    organize_visit("P1_ses-01", raw, out, RULES, mode="symlink")
    moved = tmp_path / "b"
    shutil.move(root, moved)  # relative links survive a move of the dataset root
    assert all(p.read_bytes()[128:132] == b"DICM" for p in (moved / "dicom" / "P1").iterdir())
    res = organize_visit("P1_ses-01", moved / "raw", moved / "copy", RULES, mode="copy")
    assert all(not (moved / "copy" / r.dest).is_symlink() for r in res.kept)


@pytest.mark.faults
def test_mixed_visit_is_flagged(t1_sources, tmp_path):
    raw = tmp_path / "raw"
    write(raw, "a/IM1", rewrite_dicom(t1_sources[0], **ident(1, study="1.2.3.4", patient="P1")))
    write(raw, "b/IM1", rewrite_dicom(t1_sources[1], **ident(1, study="1.2.3.5", patient="P2")))
    result = organize_visit("P1_ses-01", raw, tmp_path / "out", RULES)
    assert result.mixed and result.patient_ids == ["P1", "P2"] and len(result.study_uids) == 2


@pytest.mark.faults
def test_missing_raw_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="materialize raw_dicoms first"):
        organize_visit("P1_ses-01", tmp_path / "nope", tmp_path / "out", RULES)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to read as an unprivileged user")
@pytest.mark.faults
def test_unreadable_permission_is_reported_not_fatal(t1_sources):
    import tempfile

    from dicom_assets.core.organize import classify_tree

    from .helpers import as_nobody

    top = Path(tempfile.mkdtemp(prefix="dicom-assets-perm-", dir="/tmp"))
    raw = top / "raw"
    write(raw, "s/IM1", rewrite_dicom(t1_sources[0], **ident(1)))
    locked = write(raw, "s/IM2", rewrite_dicom(t1_sources[1], **ident(2)))
    locked.chmod(0o000)
    (raw / "t").mkdir()
    (raw / "t").chmod(0o700)  # a folder the reader cannot list
    for p in (top, raw, raw / "s"):
        p.chmod(0o755)
    (raw / "s" / "IM1").chmod(0o644)
    # read as uid 65534 in a forked child (the modules are already loaded: the checkout itself
    # may be unreadable to that user, e.g. a clone in a mktemp -d folder)
    res = as_nobody(lambda: {r.source: [r.reason, r.detail] for r in classify_tree(raw, Rules())})
    shutil.rmtree(top)
    assert res[0] == "ok", res
    out = res[1]
    assert out["s/IM2"] == ["unreadable", "permission denied"]
    assert out["s/IM1"][0] == "kept"
    assert out["t/"] == ["unreadable", "folder cannot be listed: Permission denied"]


def test_fast_and_pydicom_readers_classify_alike(samples, tmp_path):
    """Every real sample file, and truncated copies of some, get the same record either way."""
    from dataclasses import asdict

    from dicom_assets.core.dicomscan import read_record

    files = [p for p in sorted(samples.root.rglob("*")) if p.is_file()]
    for p in sorted((samples.xnat_case001 / "scans").rglob("*.dcm"))[:3] + [samples.pydicom_files / "MR_small.dcm"]:
        data = p.read_bytes()
        cut = tmp_path / f"cut_{p.name}"
        cut.write_bytes(data[: len(data) - 1000])
        files.append(cut)
    fast_used = 0
    import warnings
    for p in files:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            a = asdict(read_record(p, "x"))
            b = asdict(read_record(p, "x", force_pydicom=True))
        if a != b and a["reason"] == "unreadable" == b["reason"]:
            a["detail"] = b["detail"] = ""  # both unreadable; the wording may differ
        assert a == b, p
        fast_used += a["reason"] == "kept"
    assert fast_used > 300


# ----------------------------------------------------------------- hostile input (issue 13)
def _flip(data: bytes, at: int, value: int | None = None) -> bytes:
    b = bytearray(data)
    b[at] = b[at] ^ 0xFF if value is None else value
    return bytes(b)


@pytest.mark.faults
def test_one_corrupt_header_never_stops_the_visit(samples, t1_sources, tmp_path):
    """Whatever a damaged header makes the reader raise (zlib.error from a damaged deflated
    file, pydicom's BytesLengthException, NotImplementedError for a nonsense VR) excludes
    that file as unreadable; the other files of the visit are kept."""
    raw, out = tmp_path / "raw", tmp_path / "dicom" / "P1"
    pf = samples.pydicom_files
    for i, src in enumerate(t1_sources[:3], 1):
        write(raw, f"s/IM{i}", rewrite_dicom(src, **ident(i)))
    write(raw, "bad/deflate_damaged", _flip((pf / "image_dfl.dcm").read_bytes(), 319))  # zlib.error
    write(raw, "bad/bytes_length", _flip((pf / "MR_small.dcm").read_bytes(), 136, 0))  # BytesLengthException
    write(raw, "bad/unknown_vr", _flip((pf / "MR_small.dcm").read_bytes(), 163, 0))  # NotImplementedError
    before = {p: p.read_bytes() for p in raw.rglob("*") if p.is_file()}
    result = organize_visit("P1_ses-01", raw, out, RULES, report_path=tmp_path / "report.tsv")
    r = by_source(result)
    for bad in ("bad/deflate_damaged", "bad/bytes_length", "bad/unknown_vr"):
        assert r[bad].reason == "unreadable" and r[bad].detail, bad
    assert "deflated data set is corrupt" in r["bad/deflate_damaged"].detail
    assert [rec.source for rec in result.kept] == ["s/IM1", "s/IM2", "s/IM3"]
    assert sorted(os.listdir(out)) == sorted(rec.dest for rec in result.kept)
    assert {p: p.read_bytes() for p in raw.rglob("*") if p.is_file()} == before  # raw input untouched


def test_deflated_images_are_kept_by_both_readers(samples, tmp_path):
    """The deflated transfer syntax compresses the data set: the pixel data element is found
    in the inflated data, not looked up in the compressed stream (was: no_pixel_data)."""
    from dicom_assets.core.dicomscan import read_record

    src = samples.pydicom_files / "image_dfl.dcm"
    for force in (False, True):
        rec = read_record(src, "image_dfl.dcm", force_pydicom=force)
        assert (rec.reason, rec.sop_instance_uid) == ("kept", pydicom.dcmread(src).SOPInstanceUID), force
    data = src.read_bytes()
    cut = write(tmp_path, "cut.dcm", data[: len(data) - 40])  # the deflate stream ends early
    for force in (False, True):
        rec = read_record(cut, "cut.dcm", force_pydicom=force)
        assert rec.reason == "unreadable" and "cut short" in rec.detail, force


@pytest.mark.faults
def test_overlong_sop_uid_gets_a_short_unique_stable_name(t1_sources, tmp_path):
    """A 300-character SOPInstanceUID (was: 'File name too long', the whole organize failed)."""
    from dicom_assets.core.organize import dest_name

    raw, out = tmp_path / "raw", tmp_path / "dicom" / "P1"
    long_a = "1.2.3." + "4" * 300
    long_b = "1.2.3." + "4" * 299 + "5"  # same first 100 characters
    write(raw, "s/IM1", rewrite_dicom(t1_sources[0], **ident(1, sop=long_a)))
    write(raw, "s/IM2", rewrite_dicom(t1_sources[1], **ident(2, sop=long_b)))
    write(raw, "s/IM3", rewrite_dicom(t1_sources[2], **ident(3)))
    result = organize_visit("P1_ses-01", raw, out, RULES)
    assert len(result.kept) == 3
    names = sorted(os.listdir(out))
    assert len(set(names)) == 3 and all(len(n) <= 100 for n in names)  # organize.MAX_NAME
    assert {r.dest for r in result.kept} == set(names)
    assert dest_name(long_a) == dest_name(long_a) != dest_name(long_b)  # deterministic, distinct
    assert dest_name(long_a).startswith("1.2.3.444")
    assert dest_name("1.2.3.4") == "1.2.3.4.dcm"  # ordinary UIDs keep their plain name
    odd = "1.2.3 x/" + "9" * 200
    assert len(dest_name(odd)) <= 100 and "/" not in dest_name(odd)


@pytest.mark.faults
def test_non_utf8_file_name_is_reported_not_fatal(t1_sources, tmp_path):
    """A raw file named with bytes that are not UTF-8 (was: UnicodeEncodeError in the report
    writer, after dicom/ had been replaced)."""
    raw, out, report = tmp_path / "raw", tmp_path / "dicom" / "P1", tmp_path / "report.tsv"
    write(raw, "s/IM1", rewrite_dicom(t1_sources[0], **ident(1)))
    odd = os.fsencode(raw / "s") + b"/IM\xff\xfe2"
    with open(odd, "wb") as fh:
        fh.write(rewrite_dicom(t1_sources[1], **ident(2)))
    with open(os.fsencode(raw / "s") + b"/notes\xe9.txt", "wb") as fh:
        fh.write(b"not a dicom" * 20)
    write(raw, "s/IM\r\n\t3", rewrite_dicom(t1_sources[2], **ident(3)))  # found by the fuzz layer
    result = organize_visit("P1_ses-01", raw, out, RULES, report_path=report)
    assert len(result.kept) == 3 and len(result.records) == 4
    text = report.read_bytes().decode("utf-8")  # valid UTF-8 whatever the names on disk
    assert "s/IM\\xff\\xfe2\tkept" in text and "s/notes\\xe9.txt\texcluded\tnot_dicom" in text
    assert "s/IM\\x0d\\x0a\\x093\tkept" in text
    assert len(text.splitlines()) == 1 + 4  # one line per file


@pytest.mark.faults
def test_report_failure_leaves_the_previous_output_intact(t1_sources, tmp_path, monkeypatch):
    """The report is written before dicom/ is swapped: a report that cannot be written (disk
    full) leaves the previous organized folder and report as they were (was: dicom/ replaced
    first, then the report write failed)."""
    import csv
    import errno

    from dicom_assets.core import organize as organize_mod

    raw, out, report = tmp_path / "raw", tmp_path / "dicom" / "P1", tmp_path / "logs" / "report.tsv"
    write(raw, "s/IM1", rewrite_dicom(t1_sources[0], **ident(1)))
    organize_visit("P1_ses-01", raw, out, RULES, report_path=report)
    listing, old_report = sorted(os.listdir(out)), report.read_bytes()
    write(raw, "s/IM2", rewrite_dicom(t1_sources[1], **ident(2)))  # a new delivery ...

    real_writer = csv.writer

    class FullDisk:
        def __init__(self, fh, **kw):
            self.w = real_writer(fh, **kw)

        def writerow(self, row):
            if row[0] == "s/IM2":
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.w.writerow(row)

    monkeypatch.setattr(organize_mod.csv, "writer", FullDisk)
    with pytest.raises(OSError, match="No space left"):  # ... whose report cannot be written
        organize_visit("P1_ses-01", raw, out, RULES, report_path=report)
    monkeypatch.undo()
    assert sorted(os.listdir(out)) == listing  # the previous good output is intact
    assert report.read_bytes() == old_report
    assert sorted(p.name for p in out.parent.iterdir()) == ["P1"]  # no staging left behind
    assert sorted(p.name for p in report.parent.iterdir()) == ["report.tsv"]  # no temporary report either
    organize_visit("P1_ses-01", raw, out, RULES, report_path=report)  # space back: the new output
    assert len(os.listdir(out)) == 2 and report.read_text().count("\tkept\t") == 2


@pytest.mark.faults
def test_broken_links_and_fifos_in_the_raw_tree_are_reported(t1_sources, tmp_path):
    """Entries of the raw tree that are no regular file were skipped by the walk without a
    row in the report: now each is excluded with its reason."""
    raw = tmp_path / "raw"
    write(raw, "s/IM1", rewrite_dicom(t1_sources[0], **ident(1)))
    os.symlink("gone.dcm", raw / "s" / "IM2")  # its target vanished
    os.symlink("../s", raw / "s" / "loop")  # a link to a folder: not followed
    os.mkfifo(raw / "s" / "pipe")
    result = organize_visit("P1_ses-01", raw, tmp_path / "out", RULES, report_path=tmp_path / "r.tsv")
    r = by_source(result)
    assert r["s/IM1"].reason == "kept"
    assert (r["s/IM2"].reason, r["s/IM2"].detail) == ("unreadable", "a broken link (gone.dcm)")
    assert r["s/loop"].reason == "unreadable" and "link to a folder" in r["s/loop"].detail
    assert r["s/pipe"].reason == "unreadable" and "FIFO" in r["s/pipe"].detail
    assert len((tmp_path / "r.tsv").read_text().splitlines()) == 1 + 4


@pytest.mark.faults
def test_a_corrupt_length_swallowing_the_file_keeps_the_report_readable(samples, tmp_path):
    """Found by the fuzz layer: one zeroed byte makes a GE file's Modality 500 KB long; the
    report (read back by the tarball step) must stay within a CSV reader's field limit."""
    import csv

    from dicom_assets.core.organize import read_kept

    ge = sorted((samples.xnat_case001 / "scans").glob("5_*/DICOM/*.dcm"))[0].read_bytes()
    raw = tmp_path / "raw"
    write(raw, "IM1", _flip(ge, 440, 0))
    result = organize_visit("P1_ses-01", raw, tmp_path / "out", RULES, report_path=tmp_path / "r.tsv")
    assert len(result.records[0].modality) > 131072  # csv's default field limit
    (row,) = csv.DictReader(open(tmp_path / "r.tsv", newline="", encoding="utf-8"), delimiter="\t")
    assert row["modality"].endswith("more characters]") and len(row["modality"]) < 1100
    assert read_kept(tmp_path / "r.tsv") == []


def _hostile_tree(samples, t1_sources, raw):
    """Good files and every kind of bad one (damaged headers, a name that is not UTF-8, an
    empty file, a text file, a truncated image), in several series folders."""
    pf = samples.pydicom_files
    for i, src in enumerate(t1_sources * 4, 1):
        write(raw, f"s{i % 3}/IM{i:03d}", rewrite_dicom(src, **ident(i)))
    write(raw, "bad/deflate_damaged", _flip((pf / "image_dfl.dcm").read_bytes(), 319))
    write(raw, "bad/unknown_vr", _flip((pf / "MR_small.dcm").read_bytes(), 163, 0))
    good = rewrite_dicom(t1_sources[0], **ident(99))
    write(raw, "bad/cut", good[: len(good) // 2])
    write(raw, "bad/empty", b"")
    write(raw, "bad/notes.txt", b"not a dicom\n" * 30)
    with open(os.fsencode(raw / "bad") + b"/IM\xff\xfe", "wb") as fh:
        fh.write(rewrite_dicom(t1_sources[1], **ident(98)))


def _share_small_trees(monkeypatch, org):
    monkeypatch.setattr(org, "POOL_MIN_FILES", 2)
    monkeypatch.setattr(org, "HELPER_START_FILES", 0)
    monkeypatch.setattr(org, "MIN_SHARE", 1)


def test_header_reads_shared_with_helper_processes_give_the_same_records(samples, t1_sources, tmp_path, monkeypatch):
    """A large visit's headers are read by this process and helpers (thresholds lowered here so
    a small tree uses them): the records, the report and the folder are the same as when one
    process reads everything, hostile files included."""
    from dicom_assets.core import organize as org

    raw = tmp_path / "raw"
    _hostile_tree(samples, t1_sources, raw)
    one = organize_visit("P1_ses-01", raw, tmp_path / "d1" / "P1", RULES, report_path=tmp_path / "r1.tsv", workers=1)
    started = []
    real_popen = subprocess.Popen
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **kw: started.append(a) or real_popen(*a, **kw))
    _share_small_trees(monkeypatch, org)
    for workers in (2, 3):
        started.clear()
        many = organize_visit("P1_ses-01", raw, tmp_path / f"d{workers}" / "P1", RULES,
                              report_path=tmp_path / f"r{workers}.tsv", workers=workers)
        assert len(started) == workers - 1
        assert many.records == one.records
        assert (tmp_path / f"r{workers}.tsv").read_bytes() == (tmp_path / "r1.tsv").read_bytes()
        assert sorted(os.listdir(tmp_path / f"d{workers}" / "P1")) == sorted(os.listdir(tmp_path / "d1" / "P1"))


@pytest.mark.faults
@pytest.mark.parametrize("helper", ["import sys; sys.exit(3)", "import sys; sys.stdout.write('garbage')",
                                    "import os, signal; os.kill(os.getpid(), signal.SIGKILL)",
                                    "import pickle, sys; sys.stdout.buffer.write(pickle.dumps([1, 2]))"])
def test_a_helper_that_fails_has_its_share_read_here(samples, t1_sources, tmp_path, monkeypatch, helper):
    from dicom_assets.core import organize as org

    raw = tmp_path / "raw"
    _hostile_tree(samples, t1_sources, raw)
    one = organize_visit("P1_ses-01", raw, tmp_path / "d1" / "P1", RULES, workers=1)
    _share_small_trees(monkeypatch, org)
    monkeypatch.setattr(org, "_HELPER", helper)
    many = organize_visit("P1_ses-01", raw, tmp_path / "d2" / "P1", RULES, workers=2)
    assert many.records == one.records


# ------------------------------------------------------------ annotation files (TCIA)
def _with_annotations(t1_sources, tmp_path):
    raw = tmp_path / "raw"
    for i, src in enumerate(t1_sources[:2]):
        write(raw, f"1.2.3.4.3/1-{i:03d}.dcm", rewrite_dicom(src, **ident(i)))
    write(raw, "1.2.3.4.3/069.xml", b"<LidcReadMessage/>\n")
    write(raw, "1.2.3.4.3/md5hashes.csv", b"filename,md5\n")
    return raw, {"1.2.3.4.3/069.xml": "1.2.3.4.3/069.xml"}


def test_annotation_files_go_beside_the_flat_folder_never_into_it(t1_sources, tmp_path):
    from dicom_assets.core.organize import read_annotations, read_kept
    from dicom_assets.core.tarball import annotation_members

    raw, notes = _with_annotations(t1_sources, tmp_path)
    dest, notes_dir, report = tmp_path / "dicom", tmp_path / "annotations", tmp_path / "report.tsv"
    result = organize_visit("v", raw, dest, RULES, report_path=report, annotations=notes, annotations_dir=notes_dir)
    rec = by_source(result)
    assert rec["1.2.3.4.3/069.xml"].decision == "annotation"
    assert rec["1.2.3.4.3/md5hashes.csv"].reason == "not_dicom"  # what the source did not name stays excluded
    assert len(read_kept(report)) == 2 and all(p.suffix == ".dcm" for p in dest.iterdir())
    assert read_annotations(report) == ["1.2.3.4.3/069.xml"]
    assert (notes_dir / "1.2.3.4.3" / "069.xml").is_symlink()
    assert (notes_dir / "1.2.3.4.3" / "069.xml").read_bytes() == b"<LidcReadMessage/>\n"
    assert annotation_members(notes_dir, report) == [
        (notes_dir / "1.2.3.4.3" / "069.xml", "annotations/1.2.3.4.3/069.xml")]
    # a re-run whose source names none: the folder goes, the file is excluded as what it is
    result = organize_visit("v", raw, dest, RULES, report_path=report, annotations={}, annotations_dir=notes_dir)
    assert not notes_dir.exists() and by_source(result)["1.2.3.4.3/069.xml"].reason == "not_dicom"
    assert annotation_members(notes_dir, report) == []


@pytest.mark.faults
def test_annotation_folder_that_disagrees_with_the_report_is_named(t1_sources, tmp_path):
    from dicom_assets.core.errors import OrganizedFolderError
    from dicom_assets.core.organize import read_annotations
    from dicom_assets.core.tarball import annotation_members

    raw, notes = _with_annotations(t1_sources, tmp_path)
    dest, notes_dir, report = tmp_path / "dicom", tmp_path / "annotations", tmp_path / "report.tsv"
    organize_visit("v", raw, dest, RULES, report_path=report, annotations=notes, annotations_dir=notes_dir)
    listed = read_annotations(report)
    assert listed == ["1.2.3.4.3/069.xml"]
    (notes_dir / "1.2.3.4.3" / "stray.xml").write_bytes(b"x")  # e.g. a crash between the two swaps
    with pytest.raises(OrganizedFolderError, match="does not list.*stray.xml"):
        annotation_members(notes_dir, report)
    (notes_dir / "1.2.3.4.3" / "stray.xml").unlink()
    (raw / "1.2.3.4.3" / "069.xml").unlink()  # the link now dangles
    with pytest.raises(OrganizedFolderError, match="broken link"):
        annotation_members(notes_dir, report)
    # a source naming a file the dump lacks, or an unsafe place, is refused before anything moves
    with pytest.raises(OrganizedFolderError, match="not in the raw dump"):
        organize_visit("v", raw, dest, RULES, report_path=report, annotations=notes, annotations_dir=notes_dir)
    write(raw, "1.2.3.4.3/069.xml", b"<x/>")
    with pytest.raises(OrganizedFolderError, match="not a safe path"):
        organize_visit("v", raw, dest, RULES, report_path=report, annotations={"1.2.3.4.3/069.xml": "../069.xml"},
                       annotations_dir=notes_dir)
    assert read_annotations(report) == listed  # the failed runs left the report as it was
