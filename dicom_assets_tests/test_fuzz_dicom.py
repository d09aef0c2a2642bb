"""Fuzz layer, DICOM half: reading, organize, the tarball and the metadata under hostile input.

Real sample files are the seeds; Hypothesis mutates them (truncation at any offset, byte
flips in the header region, random tag values: dates of any year or none, UIDs of any
length and character, non-ASCII descriptions) and names them with random bytes, non-UTF-8
included. Invariants, for every generated input:

* organize succeeds and accounts for every file: one report row each, kept or excluded with
  a reason of the fixed vocabulary, the report valid UTF-8, the flat folder = the kept names;
* the raw inputs' bytes (and names) are unchanged;
* after an injected failure the previous good ``dicom/`` folder, report and tarball are intact;
* the tarball and the metadata either succeed reproducibly (same sha256 twice) or fail with
  a ``DicomAssetsError`` naming the file.

Bounded for CI by the ``ci`` profile of ``fuzz.py``; ``DICOM_ASSETS_FUZZ=long`` runs many more.
"""

from __future__ import annotations

import csv
import datetime
import hashlib
import io
import os
import shutil
import string
import tempfile
import warnings
from pathlib import Path

import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dicom_assets.core.dicomscan import KEPT, REASONS, Rules, is_image_storage, read_record
from dicom_assets.core.errors import DicomAssetsError
from dicom_assets.core.metadata import describe_tarball, dump_json
from dicom_assets.core.organize import MAX_NAME, organize_visit, read_kept
from dicom_assets.core.tarball import organized_files, write_tarball
from dicom_assets.testing.demo import preambleless

from .fuzz import tried

pytestmark = [pytest.mark.fuzz, pytest.mark.filterwarnings("ignore::UserWarning")]  # pydicom warns on hostile values
# examples per property, relative to the profile of fuzz.py (ci: 40, long: 1500)
BASE = settings.default.max_examples

RULES = Rules(exclude_series=("Localizers",))
VOCABULARY = {KEPT, *REASONS}

# small real files, one per encoding or object kind the reader must handle
SEED_FILES = (
    "pydicom:MR_small.dcm",  # explicit VR little endian
    "pydicom:MR_small_implicit.dcm",
    "pydicom:MR_small_bigendian.dcm",  # through pydicom
    "pydicom:image_dfl.dcm",  # deflated data set
    "pydicom:MR_small_jp2klossless.dcm",  # encapsulated pixel data
    "pydicom:SC_rgb_rle.dcm",  # secondary capture (derived)
    "pydicom:rtplan.dcm",  # non-image object
    "pydicom:test-SR.dcm",
    "pydicom:nested_priv_SQ.dcm",  # sequences of undefined length
    "pydicom:ExplVR_LitEndNoMeta.dcm",  # no preamble, no file meta
    "nibabel:csa_slice_norm.dcm",  # Siemens with a CSA header
    "ge",  # the GE session's T1 (xnat Case001)
    "preambleless",  # the GE file as old exporters write it
)
# seeds pydicom can read and write back with new tag values
TAG_SEEDS = ("pydicom:MR_small.dcm", "pydicom:MR_small_implicit.dcm", "pydicom:image_dfl.dcm",
             "pydicom:MR_small_jp2klossless.dcm", "ge")


class Blobs:
    """Seed bytes by key, with a short repr (Hypothesis prints a failing example's arguments)."""

    def __init__(self, blobs):
        self.blobs = blobs

    def __getitem__(self, key):
        return self.blobs[key]

    def __repr__(self) -> str:
        return f"<{len(self.blobs)} real DICOM seeds>"


@pytest.fixture(scope="module")
def seeds(samples) -> Blobs:
    ge = sorted((samples.xnat_case001 / "scans").glob("5_*/DICOM/*.dcm"))[0].read_bytes()
    out = {"ge": ge, "preambleless": preambleless(ge)}
    for key in SEED_FILES:
        kind, _, name = key.partition(":")
        if kind == "pydicom":
            out[key] = (samples.pydicom_files / name).read_bytes()
        elif kind == "nibabel":
            out[key] = (samples.nibabel_data / name).read_bytes()
    return Blobs(out)


# ------------------------------------------------------------------ strategies
@st.composite
def mutated(draw, seeds_keys=SEED_FILES):
    """(seed key, mutation, offset) — applied to the seed's bytes by ``mutate``."""
    key = draw(st.sampled_from(seeds_keys))
    kind = draw(st.sampled_from(["truncate", "flip_header", "flip_any", "both"]))
    offsets = draw(st.lists(st.integers(0, 1 << 20), min_size=1, max_size=6))
    values = draw(st.lists(st.integers(0, 255), min_size=6, max_size=6))
    return key, kind, offsets, values


def mutate(data: bytes, kind: str, offsets: list[int], values: list[int]) -> bytes:
    b = bytearray(data)
    if kind in ("flip_header", "flip_any", "both"):
        # the header region: the preamble's end, the file meta and the first data elements
        span = min(len(b), 2048) if kind != "flip_any" else len(b)
        for off, v in zip(offsets, values):
            if span:
                i = off % span if kind == "flip_any" else 120 + off % max(1, span - 120)
                if i < len(b):
                    b[i] = v
    if kind in ("truncate", "both"):
        b = b[: offsets[-1] % (len(b) + 1)]
    return bytes(b)


# names: any bytes but "/" and NUL, not "." or "..", at most 100 bytes (a folder level each)
name_bytes = st.binary(min_size=1, max_size=40).map(
    lambda b: b.replace(b"/", b"_").replace(b"\x00", b"_")).filter(lambda b: b not in (b".", b".."))
rel_paths = st.lists(name_bytes, min_size=1, max_size=3).map(lambda parts: b"/".join(parts))

uid_text = st.text(alphabet=string.digits + "." , min_size=1, max_size=64) | st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E, blacklist_characters="\\"),
    min_size=0, max_size=400)
date_text = (st.dates(min_value=datetime.date(1, 1, 1)).map(lambda d: f"{d.year:04d}{d.month:02d}{d.day:02d}")
             | st.text(alphabet=string.digits + "-.: ", max_size=10) | st.just(""))
time_text = st.text(alphabet=string.digits + ".:", max_size=14) | st.just("")
description = st.text(max_size=80, alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\\\x00"))


# ------------------------------------------------------------------ helpers
def _write(root: Path, rel: bytes, data: bytes) -> bytes:
    path = os.fsencode(root) + b"/" + rel
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data)
    return path


def _digest(root: Path) -> dict[bytes, str]:
    """sha256 of every file under root, by (byte) path: the raw inputs' names and bytes."""
    out = {}
    for dirpath, _dirs, names in os.walk(os.fsencode(root)):
        for n in names:
            p = os.path.join(dirpath, n)
            if os.path.islink(p):
                out[p] = os.readlink(p)
                continue
            with open(p, "rb") as fh:
                out[p] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _report_rows(path: Path) -> list[dict]:
    text = path.read_bytes().decode("utf-8")  # always valid UTF-8, whatever the file names
    return list(csv.DictReader(io.StringIO(text, newline=""), delimiter="\t"))


def _check_organized(result, raw: Path, out: Path, report: Path) -> None:
    """Every file accounted for, in the report and in the flat folder."""
    n_files = sum(len(files) + sum(os.path.islink(os.path.join(d, s)) for s in subs)  # links to folders too
                  for d, subs, files in os.walk(os.fsencode(raw)))
    assert len(result.records) == n_files
    rows = _report_rows(report)
    assert len(rows) == n_files
    assert all(r["reason"] in VOCABULARY for r in rows), {r["reason"] for r in rows}
    assert all(r["detail"] for r in rows if r["decision"] != KEPT)  # every exclusion says why
    kept = sorted(r.dest for r in result.kept)
    assert sorted(os.listdir(out)) == kept == read_kept(report)
    assert all(len(n) <= MAX_NAME for n in kept)
    for rec in result.kept:  # each flat name holds the bytes of its raw file
        with open(os.fsencode(raw) + b"/" + os.fsencode(rec.source), "rb") as fh:
            assert (out / rec.dest).read_bytes() == fh.read()


def _archive_twice(out: Path, work: Path, report: Path) -> None:
    """Tarball and metadata: reproducible, or a DicomAssetsError naming the file."""
    try:
        files = organized_files(out, expected=read_kept(report))
        a = write_tarball(files, work / "a" / "V_dicom.tar", "V")
        b = write_tarball(files, work / "b" / "V_dicom.tar", "V")
    except DicomAssetsError as exc:
        assert str(out) in str(exc), exc
        tried("tarball: a clear DicomAssetsError naming the file")
        return
    assert a.sha256 == b.sha256 and a.members == len(files)
    tried("tarball: same sha256 twice")
    ma = describe_tarball(Path(a.path), visit="V", study="S", participant="P", session="s", tool_version="0")
    mb = describe_tarball(Path(b.path), visit="V", study="S", participant="P", session="s", tool_version="0")
    assert dump_json(ma.dicoms) == dump_json(mb.dicoms) and ma.tarball["sha256"] == a.sha256
    assert ma.tarball["members"] == len(files)
    tried("metadata: same JSON twice, one record per member")


def _organize_checked(raw: Path, out: Path, report: Path):
    """organize_visit of the fuzzed visit, every file accounted for (:func:`_check_organized`)."""
    result = organize_visit("P1_ses-01", raw, out, RULES, report_path=report)
    _check_organized(result, raw, out, report)
    tried("organize: every file kept or excluded with a reason, in the report")
    return result


def _raw_unchanged(raw: Path, before) -> None:
    assert _digest(raw) == before
    tried("raw inputs: bytes and names unchanged")


def _fresh(tmp_path: Path) -> Path:
    return Path(tempfile.mkdtemp(dir=tmp_path))


def _records_by_both_readers(tmp_path: Path, data: bytes) -> list:
    """``data`` as a file, read by the fast reader and by pydicom (``force_pydicom``)."""
    work = _fresh(tmp_path)
    try:
        path = work / "f.dcm"
        path.write_bytes(data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return [read_record(path, "f.dcm", force_pydicom=force) for force in (False, True)]
    finally:
        shutil.rmtree(work)


# ------------------------------------------------------------------ properties
@settings(max_examples=BASE * 5)
@given(case=mutated())
def test_reader_classifies_any_mutated_file(seeds, tmp_path, case):
    """Truncated or flipped real files: both readers give a record, never an exception."""
    key, kind, offsets, values = case
    for rec in _records_by_both_readers(tmp_path, mutate(seeds[key], kind, offsets, values)):
        assert rec.reason in VOCABULARY and (rec.reason == KEPT or rec.detail)
    tried("reader: a record with a reason for any mutated file")


@settings(max_examples=BASE * 2)
@given(files=st.lists(st.tuples(rel_paths, mutated()), min_size=1, max_size=6),
       good=st.integers(0, 3), links=st.lists(st.sampled_from(["broken", "to_folder", "to_file"]), max_size=2))
def test_organize_accounts_for_every_file_of_a_hostile_tree(seeds, t1_bytes, tmp_path, files, good, links):
    """A tree of mutated real files under random (non-UTF-8 too) names, beside good ones
    and links (broken, to a folder, to a file)."""
    work = _fresh(tmp_path)
    try:
        raw, out, report = work / "raw", work / "dicom" / "P1", work / "logs" / "P1_files.tsv"
        raw.mkdir()
        for i in range(good):
            _write(raw, b"good/IM%d" % i, t1_bytes[i])
        for i, (rel, (key, kind, offsets, values)) in enumerate(files):
            _write(raw, b"%d/" % i + rel, mutate(seeds[key], kind, offsets, values))
        for i, kind in enumerate(links):
            target = {"broken": b"gone", "to_folder": b"..", "to_file": b""}[kind]
            os.makedirs(raw / "links", exist_ok=True)
            if kind == "to_file":
                target = b"../0/" + files[0][0]
            os.symlink(target, os.fsencode(raw / "links") + b"/l%d" % i)
        before = _digest(raw)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = _organize_checked(raw, out, report)
            assert len(result.kept) >= good
            again = organize_visit("P1_ses-01", raw, out, RULES, report_path=report)
            assert [(r.source, r.reason, r.dest) for r in again.records] == \
                [(r.source, r.reason, r.dest) for r in result.records]
            tried("organize: same records and names on a re-run")
            _archive_twice(out, work, report)
        _raw_unchanged(raw, before)
    finally:
        shutil.rmtree(work)


@pytest.fixture(scope="module")
def t1_bytes(samples) -> Blobs:
    from dicom_assets.testing.demo import rewrite_dicom

    srcs = sorted((samples.xnat_case001 / "scans").glob("5_*/DICOM/*.dcm"))[:3]
    return Blobs([rewrite_dicom(src, patient_id="P1", patient_name="x^y", study_uid="1.2.3", series_uid="1.2.3.5",
                          sop_uid=f"1.2.3.5.{i}", series_number=5, series_description="T1w", instance_number=i,
                          study_date="20240304", study_time="101010") for i, src in enumerate(srcs)])


def _retag(data: bytes, values: dict) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(data), force=True)
    for kw, v in values.items():
        setattr(ds, kw, v)
    if any(not v.isascii() for v in values.values()):
        ds.SpecificCharacterSet = "ISO_IR 192"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=getattr(ds, "preamble", None) is not None)
    return buf.getvalue()


@settings(max_examples=BASE * 2)
@given(seed=st.sampled_from(TAG_SEEDS), sop=uid_text, series_uid=uid_text, study_date=date_text,
       study_time=time_text, series_date=date_text, desc=description, protocol=description)
def test_random_tag_values_organize_and_archive_reproducibly(seeds, t1_bytes, tmp_path, seed, sop, series_uid,
                                                             study_date, study_time, series_date, desc, protocol):
    """Dates of any year (or none, or garbage), UIDs of any length, non-ASCII descriptions."""
    work = _fresh(tmp_path)
    try:
        raw, out, report = work / "raw", work / "dicom" / "P1", work / "logs" / "P1_files.tsv"
        values = {"SOPInstanceUID": sop, "SeriesInstanceUID": series_uid, "StudyDate": study_date,
                  "StudyTime": study_time, "SeriesDate": series_date, "AcquisitionDate": study_date,
                  "SeriesDescription": desc, "ProtocolName": protocol}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = _retag(seeds[seed], values)
            _write(raw, b"dump/odd", data)
            _write(raw, b"dump/good", t1_bytes[0])
            before = _digest(raw)
            _organize_checked(raw, out, report)
            _archive_twice(out, work, report)
        _raw_unchanged(raw, before)
    finally:
        shutil.rmtree(work)


@settings(max_examples=BASE * 2)
@given(files=st.lists(st.tuples(rel_paths, mutated()), min_size=1, max_size=5), fail_at=st.integers(0, 8),
       where=st.sampled_from(["link", "report", "tarball"]))
def test_a_failure_leaves_the_previous_good_output_intact(seeds, t1_bytes, tmp_path, monkeypatch, files, fail_at,
                                                         where):
    """A first good run, then a new hostile delivery whose run fails part-way (disk full while
    linking, while writing the report, while writing the tarball): the previous dicom/,
    report and tarball are byte for byte what they were."""
    import errno

    from dicom_assets.core import organize as organize_mod
    from dicom_assets.core import tarball as tarball_mod

    work = _fresh(tmp_path)
    try:
        raw, out, report = work / "raw", work / "dicom" / "P1", work / "logs" / "P1_files.tsv"
        tar = work / "store" / "V_dicom.tar"
        for i, data in enumerate(t1_bytes.blobs):
            _write(raw, b"good/IM%d" % i, data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            organize_visit("P1_ses-01", raw, out, RULES, report_path=report)
            first_tar = write_tarball(organized_files(out, read_kept(report)), tar, "V")
            previous = {n: os.readlink(out / n) for n in os.listdir(out)}
            previous_report = report.read_bytes()
            for i, (rel, (key, kind, offsets, values)) in enumerate(files):
                _write(raw, b"new%d/" % i + rel, mutate(seeds[key], kind, offsets, values))
            calls = {"n": 0}

            def full_disk(*_a, **_k):
                calls["n"] += 1
                if calls["n"] > fail_at:
                    raise OSError(errno.ENOSPC, "No space left on device")

            if where == "link":
                real = os.symlink
                monkeypatch.setattr(organize_mod.os, "symlink", lambda *a: (full_disk(), real(*a)))
            elif where == "report":
                real_row = organize_mod._row
                monkeypatch.setattr(organize_mod, "_row", lambda r: (full_disk(), real_row(r))[1])
            else:
                real_writev = os.writev
                monkeypatch.setattr(tarball_mod.os, "writev", lambda fd, v: (full_disk(), real_writev(fd, v))[1])
            try:
                organize_visit("P1_ses-01", raw, out, RULES, report_path=report)
                write_tarball(organized_files(out, read_kept(report)), tar, "V")
                failed = False
            except OSError as exc:
                assert "No space left" in str(exc)
                failed = True
            finally:
                monkeypatch.undo()
        if failed:
            if where in ("link", "report"):
                assert {n: os.readlink(out / n) for n in os.listdir(out)} == previous
                assert report.read_bytes() == previous_report
            assert hashlib.sha256(tar.read_bytes()).hexdigest() == first_tar.sha256
            assert sorted(p.name for p in out.parent.iterdir()) == ["P1"]  # no staging left
            assert sorted(p.name for p in tar.parent.iterdir()) == ["V_dicom.tar"]  # no partial tarball
            tried(f"previous good output intact after a failure ({where})")
        else:
            tried(f"no failure injected ({where}): the new output is complete")
            _check_organized(organize_visit("P1_ses-01", raw, out, RULES, report_path=report), raw, out, report)
    finally:
        shutil.rmtree(work)


@settings(max_examples=BASE)
@given(entries=st.lists(st.tuples(name_bytes, st.sampled_from(["file", "broken", "dir", "dicom", "link_to_dir"])),
                        min_size=1, max_size=6, unique_by=lambda e: e[0]))
def test_tarball_of_a_hostile_organized_folder(seeds, tmp_path, entries):
    """An organized folder with broken links, sub-folders, links to folders, odd names: the
    tarball either holds every entry, reproducibly, or fails naming the entry at fault."""
    work = _fresh(tmp_path)
    try:
        out = work / "org"
        out.mkdir()
        bad = []
        for name, kind in entries:
            p = os.fsencode(out) + b"/" + name
            if kind in ("file", "dicom"):
                with open(p, "wb") as fh:
                    fh.write(seeds["pydicom:MR_small.dcm"] if kind == "dicom" else name * 3)
            elif kind == "broken":
                os.symlink(b"../raw/" + name, p)
                bad.append(name)
            elif kind == "dir":
                os.mkdir(p)
                bad.append(name)
            else:
                os.symlink(os.fsencode(work), p)
                bad.append(name)
        try:
            files = organized_files(out)
        except DicomAssetsError as exc:
            shown = [n.decode("utf-8", "backslashreplace") for n in bad]
            odd = [n.decode("utf-8", "backslashreplace") for n, _ in entries  # names that are not UTF-8
                   if n.decode("utf-8", "replace") != n.decode("utf-8", "backslashreplace")]
            assert any(n in str(exc) for n in shown + odd), exc
            tried("tarball: a clear DicomAssetsError naming the entry")
            return
        assert not bad and len(files) == len(entries)
        try:
            a = write_tarball(files, work / "a.tar", "V")
            b = write_tarball(files, work / "b.tar", "V")
        except DicomAssetsError as exc:  # pragma: no cover - nothing here should fail
            raise AssertionError(f"unexpected failure: {exc}")
        assert a.sha256 == b.sha256 and a.members == len(entries)
        tried("tarball: same sha256 twice")
    finally:
        shutil.rmtree(work)


# ------------------------------------------------------------------ truthful reasons (issue 25, item 6)
@settings(max_examples=BASE * 2)
@given(garbage=st.binary(min_size=0, max_size=4096), meta=st.booleans())
def test_a_dicm_marker_followed_by_garbage_is_unreadable_never_no_pixel_data(tmp_path, garbage, meta):
    """128 bytes of preamble and "DICM", then anything: whatever pydicom's forced read makes of
    it, the reason a curator reads is about the file's damage, never its content."""
    # with meta: a real-looking file meta group start, then garbage
    head = b"\0" * 128 + b"DICM" + (b"\x02\x00\x00\x00UL\x04\x00\x10\x00\x00\x00" if meta else b"")
    for rec in _records_by_both_readers(tmp_path, head + garbage):
        assert rec.reason != "no_pixel_data", (rec.reason, rec.detail)
        assert rec.reason in {"unreadable", "not_dicom", KEPT}, (rec.reason, rec.detail)
    tried("reader: DICM then garbage is never called a non-image object")


IMAGE_SEEDS = ("pydicom:MR_small.dcm", "pydicom:MR_small_implicit.dcm", "ge")


@settings(max_examples=BASE * 3)
@given(case=mutated(IMAGE_SEEDS))
def test_a_damaged_image_header_never_yields_a_content_reason(seeds, tmp_path, case):
    """A real image file (MR, CT) truncated or flipped: the record says what is wrong with the
    file (unreadable, not a DICOM, missing its UID...), or keeps it when it still reads whole;
    never "no pixel data", which is a statement about the object's content."""
    key, kind, offsets, values = case
    for rec in _records_by_both_readers(tmp_path, mutate(seeds[key], kind, offsets, values)):
        if rec.reason == "no_pixel_data":  # only a flip that made the SOP class a non-image one
            assert "non-image object" in rec.detail and not is_image_storage(rec.sop_class_uid), rec.detail
    tried("reader: a damaged image header never yields a content-based reason")
