"""Fuzz layer, archives / downloads / folders / manifest half (issue 13).

Hostile inputs are generated from real sample DICOM files (the seeds) and every one is held
to the same invariants:

* the step either succeeds with every file accounted for (each regular member extracted with
  its bytes, each link and skipped entry counted) or raises a ``DicomAssetsError`` naming the
  input; never another exception;
* the download's bytes are unchanged;
* a previous good output in ``scratch/`` is untouched after a failure;
* nothing is written outside the target (the whole work folder around it is compared, and no
  stray temporary folder is left beside it).

Truncation of a small real tar is tried at every 512-byte block (exhaustive, not sampled);
the rest is Hypothesis (profiles ``ci`` and ``long`` in :mod:`dicom_assets_tests.fuzz`).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import os
import stat
import tarfile
import tempfile
import warnings
import zipfile
from collections import Counter
from pathlib import Path, PurePosixPath

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from dicom_assets.core.downloads import DONE_SUFFIX, DownloadItem, is_partial_name, scan_downloads
from dicom_assets.core.errors import DicomAssetsError, ManifestError
from dicom_assets.core.extract import ExtractLimits, extract_visit
from dicom_assets.core.ids import normalize_participant_id, normalize_session_id
from dicom_assets.core.layout import DatasetLayout
from dicom_assets.core.manifest import read_manifest

from .fuzz import tried

pytestmark = [pytest.mark.fuzz]

LONG = os.environ.get("DICOM_ASSETS_FUZZ") == "long"
LIMITS = ExtractLimits(max_extract_bytes=64 << 20, max_members=2000, max_compression_ratio=1000)
SEED_FILES = ("rtplan.dcm", "SC_rgb_rle.dcm", "rtstruct.dcm", "priv_SQ.dcm", "UN_sequence.dcm")


def _seeds() -> list[bytes]:
    from dicom_assets.testing.samples import ensure_samples

    cache = os.environ.get("DICOM_ASSETS_CACHE", str(Path(__file__).resolve().parents[1] / ".cache"))
    files = ensure_samples(cache).pydicom_files
    return [(files / n).read_bytes() for n in SEED_FILES]


SEEDS = _seeds()  # real DICOM bytes; loaded at collection, as Hypothesis strategies need them


# --------------------------------------------------------------------------- the invariants
def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under root, links not followed: kind and content (file sha, link target)."""
    out: dict[str, tuple] = {}
    for dirpath, dirs, files in os.walk(root):
        for n in dirs + files:
            p = os.path.join(dirpath, n)
            rel = os.path.relpath(p, root)
            st_ = os.lstat(p)
            if stat.S_ISLNK(st_.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st_.st_mode):
                out[rel] = ("dir",)
            elif stat.S_ISREG(st_.st_mode):
                out[rel] = ("file", _digest(Path(p)))
            else:
                out[rel] = ("special", stat.S_IFMT(st_.st_mode))
    return out


def _state(item: Path):
    """What the download is, to compare before and after: its bytes, its tree, or its link."""
    if item.is_symlink():
        return ("link", os.readlink(item))
    if item.is_dir():
        return snapshot(item)
    return _digest(item) if item.exists() else None


def run_step(work: Path, item: Path, kind: str):
    """Extract ``item`` into ``work/scratch/raw/P1`` over a previous good output and check the
    invariants common to every input. Returns the report (success) or the error (refusal)."""
    target = work / "scratch" / "raw" / "P1"
    (target / "OLD").mkdir(parents=True)
    (target / "OLD" / "IM1").write_bytes(SEEDS[0])  # the previous good extraction
    before = snapshot(work)
    item_before = _state(item)
    inside = f"scratch{os.sep}raw{os.sep}P1"
    try:
        result = extract_visit([DownloadItem(item, "ses-01", kind)], target, LIMITS)
    except DicomAssetsError as exc:
        result = exc
        assert item.name in str(exc), f"the error does not name the input {item.name!r}: {exc}"
        str(exc).encode("utf-8")  # loggable and storable as it is (no lone surrogate of a raw name)
        assert snapshot(target) == {k[len(inside) + 1:]: v for k, v in before.items() if k.startswith(inside + os.sep)}
    after = snapshot(work)
    outside_before = {k: v for k, v in before.items() if k != inside and not k.startswith(inside + os.sep)}
    outside_after = {k: v for k, v in after.items() if k != inside and not k.startswith(inside + os.sep)}
    assert outside_after == outside_before, "something was written outside the target (or the input changed)"
    assert sorted(os.listdir(target.parent)) == ["P1"], "a stray temporary folder was left beside the target"
    assert _state(item) == item_before, "the download changed"
    if not isinstance(result, Exception):
        "\n".join(result.skipped + [i.item for i in result.items]).encode("utf-8")
    return result


def output_of(result, work: Path) -> dict[str, bytes]:
    """The regular files extracted (links not followed), by path inside the item's folder."""
    folder = work / "scratch" / "raw" / "P1" / result.items[0].folder
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*")
            if p.is_file() and not p.is_symlink()}


def _norm(name: str) -> PurePosixPath | None:
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    return PurePosixPath(*parts) if parts else None


# --------------------------------------------------------------------------- seeds as archives
def seed_members(n: int = 3) -> dict[str, bytes]:
    return {f"s{i}/{SEED_FILES[i]}": SEEDS[i] for i in range(n)}


def seed_tar(fmt=tarfile.USTAR_FORMAT, members: dict[str, bytes] | None = None) -> tuple[bytes, list[int]]:
    """A tar of real DICOMs, and the offset of each member's header."""
    buf = io.BytesIO()
    headers = []
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for name, data in (members or seed_members()).items():
            headers.append(tf.offset)
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1_600_000_000
            tf.addfile(info, io.BytesIO(data))
        end = tf.offset
    return buf.getvalue(), headers + [end]


def seed_zip(members: dict[str, bytes] | None = None, method=zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as zf:
        for name, data in (members or seed_members()).items():
            zf.writestr(zipfile.ZipInfo(name, (2020, 1, 1, 0, 0, 0)), data, compress_type=method)
    return buf.getvalue()


def _work() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="fuzz_extract_")


# --------------------------------------------------------------------------- truncation, exhaustive
@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT],
                         ids=["ustar", "gnu", "pax"])
def test_tar_cut_at_every_block_is_complete_or_refused(fmt):
    """Every 512-byte prefix of a real tar: with the end-of-archive marker it extracts exactly,
    without it it is refused naming the download. Not sampled: every block boundary."""
    members = seed_members()
    if fmt == tarfile.PAX_FORMAT:  # non-ASCII and long names: pax headers in front of members
        members = {f"Überweisung/{'n' * 120}/{k}": v for k, v in members.items()}
    data, offsets = seed_tar(fmt, members)
    end_of_members = offsets[-1]
    for cut in range(0, len(data) + 1, tarfile.BLOCKSIZE):
        with _work() as w:
            case = Path(w)
            item = case / "P1.tar"
            item.write_bytes(data[:cut])
            result = run_step(case, item, "tar")
            if cut >= end_of_members + tarfile.BLOCKSIZE:  # the first zero block is there
                assert not isinstance(result, Exception), f"cut at {cut}: {result}"
                assert output_of(result, case) == members
            else:
                assert isinstance(result, DicomAssetsError), f"cut at byte {cut} of {len(data)} was accepted"
            tried("tar cut at a block boundary: complete and exact, or refused naming it")


def test_gzip_cut_anywhere_is_refused():
    """Every proper prefix of a real .tar.gz (every 13th byte in CI, every byte in the long
    profile, and the last 40 bytes always) is refused: the gzip trailer is checked."""
    data, _ = seed_tar()
    gz = gzip.compress(data, mtime=0)
    step = 1 if LONG else 13
    cuts = sorted(set(range(0, len(gz), step)) | set(range(max(0, len(gz) - 40), len(gz))))
    for cut in cuts:
        with _work() as w:
            case = Path(w)
            item = case / "P1.tar.gz"
            item.write_bytes(gz[:cut])
            result = run_step(case, item, "tar.gz")
            assert isinstance(result, DicomAssetsError), f"gzip cut at byte {cut} of {len(gz)} was accepted"
            tried("tar.gz cut anywhere: refused naming it")
    with _work() as w:  # and the whole stream is fine
        case = Path(w)
        (case / "P1.tar.gz").write_bytes(gz)
        assert output_of(run_step(case, case / "P1.tar.gz", "tar.gz"), case) == seed_members()


# --------------------------------------------------------------------------- byte flips
_TAR, _TAR_HEADERS = seed_tar()


@given(header=st.integers(0, len(_TAR_HEADERS) - 2), pos=st.integers(0, 511), value=st.integers(0, 255))
def test_tar_header_byte_change_is_exact_or_refused(header, pos, value):
    """One byte of a member header changed: the checksum catches it (refused) or it changed
    nothing that matters (then the extraction is exact)."""
    off = _TAR_HEADERS[header] + pos
    assume(_TAR[off] != value)
    data = bytearray(_TAR)
    data[off] = value
    with _work() as w:
        case = Path(w)
        (case / "P1.tar").write_bytes(bytes(data))
        result = run_step(case, case / "P1.tar", "tar")
        if not isinstance(result, Exception):
            assert output_of(result, case) == seed_members()
    tried("tar header byte changed: exact or refused naming it")


@given(flips=st.lists(st.tuples(st.integers(0, len(_TAR) // 512 - 1), st.integers(0, 511)), min_size=1,
                     max_size=4, unique_by=lambda f: f[0]),
       value=st.integers(1, 255))
def test_tar_byte_flips_anywhere_never_lose_a_file(flips, value):
    """Bytes flipped anywhere, at most one per 512-byte block (data, headers, end marker): no
    member is silently dropped or cut; a flip inside data may change content (tar has no data
    checksum), never sizes. (Two flips in one header can cancel out in its checksum, which is
    a plain byte sum: no reader can see those, so they are not generated.)"""
    data = bytearray(_TAR)
    for block, pos in flips:
        data[block * 512 + pos] ^= value
    with _work() as w:
        case = Path(w)
        (case / "P1.tar").write_bytes(bytes(data))
        result = run_step(case, case / "P1.tar", "tar")
        if not isinstance(result, Exception):
            out = output_of(result, case)
            expected = seed_members()
            assert result.files == len(expected) and len(out) == len(expected)
            assert sorted(len(v) for v in out.values()) == sorted(len(v) for v in expected.values())
    tried("tar bytes flipped anywhere: no file lost, or refused naming it")


_ZIP = seed_zip()
_ZIP_STORED = seed_zip(method=zipfile.ZIP_STORED)


@given(stored=st.booleans(), off=st.integers(0, 10**6), value=st.integers(0, 255))
def test_zip_byte_change_is_exact_or_refused(stored, off, value):
    """One byte of a real zip changed anywhere: CRC, names in both directories and sizes catch
    it (refused naming the zip), or nothing that matters changed (exact extraction)."""
    src = _ZIP_STORED if stored else _ZIP
    off %= len(src)
    assume(src[off] != value)
    data = bytearray(src)
    data[off] = value
    with _work() as w:
        case = Path(w)
        (case / "P1.zip").write_bytes(bytes(data))
        result = run_step(case, case / "P1.zip", "zip")
        if not isinstance(result, Exception):
            assert output_of(result, case) == seed_members()
    tried("zip byte changed: exact or refused naming it")


# --------------------------------------------------------------------------- random members
_SEGMENTS = st.one_of(
    st.sampled_from(["a", "b", "IM1", "s1", "Überweisung", "ß.dcm", "..", ".", "", "a\\b", "C:", "n" * 256,
                     "with space", "DICOMDIR"]),
    st.binary(min_size=1, max_size=6).map(lambda b: os.fsdecode(b.replace(b"/", b"_").replace(b"\0", b"_"))),
)
_NAMES = st.builds(lambda segs, lead: ("/" if lead else "") + "/".join(segs),
                   st.lists(_SEGMENTS, min_size=1, max_size=3), st.booleans())
_MEMBER = st.tuples(st.sampled_from(["file", "file", "file", "dir", "symlink", "hardlink"]), _NAMES,
                    st.integers(0, len(SEEDS) - 1), st.one_of(_NAMES, st.sampled_from(["../x", "/etc/passwd", ""])))


def _tar_of(members, fmt) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, encoding="utf-8", errors="surrogateescape") as tf:
        for kind, name, seed, link in members:
            info = tarfile.TarInfo(name)
            info.mtime = 1_600_000_000
            if kind == "file":
                info.size = len(SEEDS[seed])
                tf.addfile(info, io.BytesIO(SEEDS[seed]))
                continue
            info.type = {"dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE}[kind]
            info.linkname = link if kind != "dir" else ""
            tf.addfile(info)
    return buf.getvalue()


@given(members=st.lists(_MEMBER, min_size=1, max_size=6),
       fmt=st.sampled_from([tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]),
       compress=st.sampled_from(["tar", "tar.gz", "tar.xz"]))
def test_tar_with_hostile_members_accounts_for_every_file(members, fmt, compress):
    """Random names (non-UTF-8 bytes, '..', absolute, drive letters, over-long, duplicates),
    folders, symlinks and hard links: extracted with every member accounted for, or refused."""
    try:
        data = _tar_of(members, fmt)
    except (ValueError, UnicodeError):
        assume(False)  # the writer itself refuses the name (e.g. a NUL in a ustar field)
    if compress == "tar.gz":
        data = gzip.compress(data, mtime=0)
    elif compress == "tar.xz":
        import lzma
        data = lzma.compress(data)
    with _work() as w:
        case = Path(w)
        item = case / f"P1.{compress}"
        item.write_bytes(data)
        result = run_step(case, item, compress)
        if not isinstance(result, Exception):
            files = [m for m in members if m[0] == "file" and _norm(m[1]) is not None]
            links = [m for m in members if m[0] in ("symlink", "hardlink") and _norm(m[1]) is not None]
            hard = [m for m in links if m[0] == "hardlink"]
            assert result.files == len(files) and result.items[0].links == len(links)
            out = output_of(result, case)
            assert len(out) == len(files) + len(hard)
            assert not Counter(SEEDS[m[2]] for m in files) - Counter(out.values())
            folder = case / "scratch" / "raw" / "P1" / result.items[0].folder
            for p in folder.rglob("*"):
                assert os.path.realpath(p).startswith(str(folder.resolve()) + os.sep)
    tried("tar with hostile members: every file accounted for, or refused naming it")


@given(members=st.lists(st.tuples(st.sampled_from(["file", "file", "dir"]), _NAMES, st.integers(0, len(SEEDS) - 1)),
                        min_size=1, max_size=6),
       method=st.sampled_from([zipfile.ZIP_DEFLATED, zipfile.ZIP_STORED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA]),
       break_utf8=st.booleans())
def test_zip_with_hostile_members_accounts_for_every_file(members, method, break_utf8):
    """Random names (incl. duplicates, 'a' and 'a/', names marked UTF-8 that are not), four
    compression methods: every file accounted for, or refused naming the zip."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Duplicate name": that is the point
        with zipfile.ZipFile(buf, "w", method) as zf:
            for kind, name, seed in members:
                name = name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
                if kind == "dir":
                    name = name.rstrip("/") + "/"
                zf.writestr(zipfile.ZipInfo(name, (2020, 1, 1, 0, 0, 0)), b"" if kind == "dir" else SEEDS[seed],
                            compress_type=method)
    data = buf.getvalue()
    if break_utf8:  # 'Ü' (c3 9c) in a name flagged UTF-8 becomes bytes that are no UTF-8
        data = data.replace("Ü".encode(), b"\xff\xfe")
    with _work() as w:
        case = Path(w)
        (case / "P1.zip").write_bytes(data)
        result = run_step(case, case / "P1.zip", "zip")
        if not isinstance(result, Exception):
            files = [m for m in members if m[0] == "file" and _norm(m[1]) is not None]
            out = output_of(result, case)
            assert result.files == len(files) == len(out)
            assert Counter(SEEDS[m[2]] for m in files) == Counter(out.values())
    tried("zip with hostile members: every file accounted for, or refused naming it")


# --------------------------------------------------------------------------- folder trees
_TREE_OPS = st.lists(st.tuples(
    st.sampled_from(["file", "file", "dir", "link-file", "link-dir", "link-out", "link-broken", "link-loop",
                     "link-self-dir"]),
    st.lists(st.one_of(st.sampled_from(["a", "b", "s1", "IM1", "Überweisung"]),
                       st.binary(min_size=1, max_size=5).map(
                           lambda b: os.fsdecode(b.replace(b"/", b"_").replace(b"\0", b"_")))),
             min_size=1, max_size=3),
    st.integers(0, len(SEEDS) - 1)), min_size=1, max_size=10)


def _build_tree(root: Path, ops) -> None:
    root.mkdir()
    made_files: list[Path] = []
    for kind, segs, seed in ops:
        segs = [s if s not in (".", "..") else s + "_" for s in segs]
        p = root.joinpath(*segs)
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            if p.exists() or p.is_symlink():
                continue
            if kind == "file":
                p.write_bytes(SEEDS[seed])
                made_files.append(p)
            elif kind == "dir":
                p.mkdir()
            elif kind == "link-file" and made_files:
                os.symlink(os.path.relpath(made_files[seed % len(made_files)], p.parent), p)
            elif kind == "link-dir":
                os.symlink(os.path.relpath(root, p.parent), p)
            elif kind == "link-out":
                os.symlink(root.parent / "outside.txt", p)
            elif kind == "link-broken":
                os.symlink("nothing-here", p)
            elif kind == "link-loop":
                os.symlink(p.name, p)
            elif kind == "link-self-dir":
                os.symlink(".", p)
        except (NotADirectoryError, FileExistsError, OSError):
            continue  # a segment is already a file or link: that tree is not buildable


@given(ops=_TREE_OPS)
def test_folder_tree_accounts_for_every_file(ops):
    """Random folder dumps (non-UTF-8 names, links to files, folders, outside, broken, loops):
    every regular file copied with its bytes (never hard-linked), every link counted or
    reported skipped, or refused naming the dump; the dump is never changed."""
    with _work() as w:
        case = Path(w)
        (case / "outside.txt").write_text("secret")
        src = case / "P1_MR"
        _build_tree(src, ops)
        regular, links = {}, 0
        for dirpath, dirs, files in os.walk(src):
            for n in files:
                p = Path(dirpath) / n
                if p.is_symlink():
                    links += 1
                else:
                    regular[str(p.relative_to(src))] = p.read_bytes()
            links += sum(1 for d in dirs if (Path(dirpath) / d).is_symlink())
        result = run_step(case, src, "folder")
        if not isinstance(result, Exception):
            rep = result.items[0]
            out = output_of(result, case)
            assert {k: out[k] for k in regular if k in out} == regular and set(regular) <= set(out)
            assert rep.files == len(regular) + rep.links and len(out) == rep.files
            assert rep.links + len(rep.skipped) == links  # every link copied or reported
            for p in src.rglob("*"):
                if p.is_file() and not p.is_symlink():
                    assert p.stat().st_nlink == 1, "a download file is hard-linked into scratch/"
    tried("folder dump: every file and link accounted for, or refused naming it")


def test_folder_vanished_or_replaced_keeps_previous_output():
    """The dump deleted, or replaced by a file or a link, after a good extraction: refused,
    the previous output untouched (run_step checks it)."""
    for change in ("deleted", "file", "link"):
        with _work() as w:
            case = Path(w)
            src = case / "P1_MR"
            if change == "file":
                src.write_bytes(SEEDS[0])
            elif change == "link":
                (case / "real").mkdir()
                (case / "real" / "IM1").write_bytes(SEEDS[0])
                os.symlink(case / "real", src)
            result = run_step(case, src, "folder")
            assert isinstance(result, DicomAssetsError), change
            tried("folder dump vanished or replaced: refused naming it, previous output kept")


# --------------------------------------------------------------------------- the downloads scan
_ENTRY = st.tuples(
    st.one_of(st.sampled_from(["QPN_001", "QPN_002_MR", "sub-QPN003", "XYZ", "QPN_001_ses-02", "QPN_002_ses-01",
                               "QPN001", "qpn-004 scan", "notes"]),
              st.text(st.characters(codec="utf-8", exclude_characters="/\0"), min_size=1, max_size=8)),
    st.sampled_from([".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".txz", ".7z", ".rar", ".tar.zst",
                     ".zst", ".txt", "", ".zip.part", ".zip.done", ".dcm", ".gz"]),
    st.sampled_from(["file", "file", "dir", "link"]))


@given(entries=st.lists(_ENTRY, min_size=1, max_size=12))
def test_downloads_scan_accounts_for_every_entry(entries):
    """Every entry of a session folder is taken (with one visit) or reported with a reason;
    only hidden names, .done markers and partial names pass without a word."""
    participants = {"QPN001", "QPN002", "QPN003", "QPN004"}
    with _work() as w:
        root = Path(w)
        ses = DatasetLayout(root).downloads_dir("ses-01")
        ses.mkdir(parents=True)
        for stem, suffix, kind in entries:
            p = ses / (stem + suffix)
            if p.exists() or p.is_symlink():
                continue
            try:
                if kind == "dir":
                    p.mkdir()
                elif kind == "link":
                    os.symlink(root, p)
                else:
                    p.write_bytes(b"x")
            except OSError:
                continue
        scanned = scan_downloads(DatasetLayout(root), ("ses-01",), participants)
        names = [s.item.name for s in scanned]
        assert len(names) == len(set(names))
        expected = {n for n in os.listdir(ses)
                    if not n.startswith(".") and not n.endswith(DONE_SUFFIX) and not is_partial_name(n)}
        assert set(names) == expected
        for s in scanned:
            assert (s.visit is None) != (s.problem is None), s
            if s.problem:
                assert f"'ses-01/{s.item.name}'" in s.problem
            else:
                assert s.visit.session == "ses-01" and s.visit.participant in participants
    tried("downloads scan: every entry taken or reported with a reason")


# --------------------------------------------------------------------------- the manifest
_RAW_ID = st.text(st.sampled_from("QPN_0123-ab é,\"\n"), min_size=0, max_size=8)
_ROW = st.tuples(_RAW_ID, st.sampled_from(["ses-01", "01", "ses_02", "2", "", "ses-x y"]),
                 st.text(st.characters(codec="utf-8", exclude_characters="\0\r"), max_size=6))


def _model(rows, sessions):
    """What read_manifest must answer for well-formed CSV rows: the visits, or 'error'."""
    seen, raw_of, visits = set(), {}, []
    for raw_p, raw_s, _ in rows:
        try:
            p, s = normalize_participant_id(raw_p), normalize_session_id(raw_s)
        except ValueError:
            return "error"
        if s not in sessions or (p, s) in seen or raw_of.setdefault(p, raw_p) != raw_p:
            return "error"
        seen.add((p, s))
        visits.append((p, s))
    return visits


@given(rows=st.lists(_ROW, max_size=8), bom=st.booleans(), crlf=st.booleans())
def test_manifest_roundtrip_is_exact_or_a_named_error(rows, bom, crlf):
    """Any well-formed CSV (quotes, commas, newlines in values, BOM, CRLF): read exactly as
    written, or a ManifestError naming the file."""
    sessions = ("ses-01", "ses-02", "ses-2")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\r\n" if crlf else "\n")
    writer.writerow(["participant_id", "session_id", "notes"])
    writer.writerows(rows)
    with _work() as w:
        p = Path(w) / "manifest.csv"
        p.write_bytes((b"\xef\xbb\xbf" if bom else b"") + buf.getvalue().encode())
        model = _model(rows, sessions)
        try:
            m = read_manifest(p, sessions)
        except ManifestError as exc:
            assert str(p) in str(exc)
            assert model == "error", f"a good manifest was refused: {exc}"
        else:
            assert model != "error"
            assert [(v.participant, v.session) for v in m.visits] == model
            assert list(m.table["notes"]) == [r[2] for r in rows]
    tried("manifest, well-formed: exact, or a ManifestError naming it")


@given(n=st.integers(1, 6), bad=st.integers(0, 5), extra=st.integers(-2, 2).filter(bool),
       junk=st.sampled_from([b"", b"\x00", b"\xff\xfe", b'"', b"\n\n"]))
def test_manifest_ragged_or_damaged_row_names_its_line(n, bad, extra, junk):
    """A row with too many or too few fields (or a NUL, a stray quote, bytes that are not
    UTF-8) is a ManifestError naming that row's line; never a shifted table."""
    bad %= n
    lines = [b"participant_id,session_id,datatype"]
    for i in range(n):
        fields = [f"QPN_{i:03d}".encode(), b"ses-01", b"anat"]
        if i == bad:
            fields = fields + [b"x"] * extra if extra > 0 else fields[:extra]
            fields[0] += junk if junk != b"\n\n" else b""
        lines.append(b",".join(fields))
    with _work() as w:
        p = Path(w) / "manifest.csv"
        p.write_bytes(b"\n".join(lines) + b"\n")
        with pytest.raises(ManifestError) as err:
            read_manifest(p)
        assert str(p) in str(err.value) and f"line {bad + 2}:" in str(err.value), str(err.value)
    tried("manifest, a ragged or damaged row: ManifestError naming its line")
