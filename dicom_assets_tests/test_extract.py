"""Safe extraction: hostile and broken archives are refused with a clear message,
nothing outside the target is written, downloads are never changed."""

import hashlib
import io
import os
import shutil
import struct
import tarfile
import zipfile
from pathlib import Path

import pytest

from dicom_assets.core.downloads import DownloadItem
from dicom_assets.core.errors import UnsafeArchiveError
from dicom_assets.core.extract import ExtractLimits, extract_visit

from .helpers import as_nobody

# every refusal compares the archive's sha256 before and after (assert_refused)
pytestmark = [pytest.mark.faults, pytest.mark.checks_inputs]


def sha(path: Path) -> str:
    if path.is_dir():
        return hashlib.sha256("".join(sorted(f"{p.relative_to(path)}:{sha(p)}" for p in path.rglob("*")
                                             if p.is_file())).encode()).hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def make_tar(path: Path, build) -> Path:
    with tarfile.open(path, "w") as tf:
        build(tf)
    return path


def add_file(tf, name, data=b"x"):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def add_link(tf, name, target, kind=tarfile.SYMTYPE):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    tf.addfile(info)


def run(item_path: Path, kind: str, target: Path, limits=ExtractLimits()):
    return extract_visit([DownloadItem(item_path, "ses-01", kind)], target, limits)


def assert_refused(tmp_path, item, kind, match, limits=ExtractLimits()):
    before = sha(item)
    target = tmp_path / "raw" / "P1"
    with pytest.raises(UnsafeArchiveError, match=match):
        run(item, kind, target, limits)
    assert not target.exists()
    assert [p.name for p in (tmp_path / "raw").iterdir()] == []  # no stray temporary folder
    assert not (tmp_path / "evil").exists() and not Path("/tmp/evil_dicom_assets").exists()
    assert sha(item) == before  # the download is untouched


def test_good_zip_extracts_into_item_folder(tmp_path):
    z = make_zip(tmp_path / "P1_MR.zip", {"a/IM1": b"1", "b/IM1": b"2", "Überweisung/ß.dcm": b"3"})
    rep = run(z, "zip", tmp_path / "raw" / "P1")
    assert rep.files == 3
    assert (tmp_path / "raw/P1/P1_MR/a/IM1").read_bytes() == b"1"
    assert (tmp_path / "raw/P1/P1_MR/Überweisung/ß.dcm").read_bytes() == b"3"  # non-ASCII names kept
    assert z.exists()


def test_zip_slip_is_refused(tmp_path):
    z = make_zip(tmp_path / "P1.zip", {"ok/IM1": b"1", "../../evil/IM2": b"2"})
    assert_refused(tmp_path, z, "zip", r"member '../../evil/IM2' points outside the target")


def test_absolute_member_is_refused(tmp_path):
    z = make_zip(tmp_path / "P1.zip", {"/tmp/evil_dicom_assets": b"2"})
    assert_refused(tmp_path, z, "zip", "has an absolute path")


def test_tar_symlink_pointing_out_is_refused(tmp_path):
    t = make_tar(tmp_path / "P1.tar", lambda tf: (add_link(tf, "d/link", "../../../etc/passwd"),
                                                  add_file(tf, "d/IM1")))
    assert_refused(tmp_path, t, "tar", r"link 'd/link' -> '../../../etc/passwd' points outside")


def test_tar_absolute_symlink_is_refused(tmp_path):
    t = make_tar(tmp_path / "P1.tar", lambda tf: add_link(tf, "link", "/etc/passwd"))
    assert_refused(tmp_path, t, "tar", "points outside the target")


def test_tar_hardlink_pointing_out_is_refused(tmp_path):
    t = make_tar(tmp_path / "P1.tar", lambda tf: add_link(tf, "hl", "../outside", tarfile.LNKTYPE))
    assert_refused(tmp_path, t, "tar", "points outside the target")


def test_tar_device_is_refused(tmp_path):
    def build(tf):
        info = tarfile.TarInfo("dev/sda")
        info.type = tarfile.BLKTYPE
        tf.addfile(info)
    assert_refused(tmp_path, make_tar(tmp_path / "P1.tar", build), "tar", "device, fifo or other special file")


def test_tar_internal_links_are_kept(tmp_path):
    t = make_tar(tmp_path / "P1.tar", lambda tf: (add_file(tf, "s1/IM1", b"data"), add_link(tf, "s2/IM1", "../s1/IM1")))
    run(t, "tar", tmp_path / "raw" / "P1")
    assert (tmp_path / "raw/P1/P1/s2/IM1").read_bytes() == b"data"


def _patch_declared_size(path: Path, new_size: int) -> None:
    """Rewrite the uncompressed size in a one-member zip's central directory (a zip bomb's lie)."""
    data = bytearray(path.read_bytes())
    cd = data.rfind(b"PK\x01\x02")
    struct.pack_into("<I", data, cd + 24, new_size)
    path.write_bytes(bytes(data))


def test_zip_bomb_declared_size_is_refused_before_writing(tmp_path):
    z = make_zip(tmp_path / "P1.zip", {"big.dcm": b"\0" * 1000})
    _patch_declared_size(z, 0xFFFFFFF0)
    assert_refused(tmp_path, z, "zip", "possible zip bomb", ExtractLimits(max_extract_bytes=1 << 30))


def test_zip_bomb_ratio_is_refused(tmp_path):
    z = make_zip(tmp_path / "P1.zip", {"zeros.dcm": b"\0" * (8 << 20)})
    assert_refused(tmp_path, z, "zip", r"expands \d+x \(limit 100x\)", ExtractLimits(max_compression_ratio=100))


def test_total_size_limit_counts_real_bytes(tmp_path):
    t = make_tar(tmp_path / "P1.tar", lambda tf: [add_file(tf, f"IM{i}", os.urandom(4096)) for i in range(8)])
    assert_refused(tmp_path, t, "tar", "extracts to more than 10000 bytes", ExtractLimits(max_extract_bytes=10000))


def test_member_count_limit(tmp_path):
    z = make_zip(tmp_path / "P1.zip", {f"IM{i}": b"1" for i in range(20)})
    assert_refused(tmp_path, z, "zip", "more than 10 members", ExtractLimits(max_members=10))


def test_half_written_zip_is_refused_clearly(tmp_path):
    z = make_zip(tmp_path / "full.zip", {f"IM{i}": os.urandom(5000) for i in range(10)})
    half = tmp_path / "P1.zip"
    half.write_bytes(z.read_bytes()[: z.stat().st_size // 2])
    assert_refused(tmp_path, half, "zip", "not a readable zip file .*is the download complete")


def test_half_written_tgz_is_refused_clearly(tmp_path):
    full = tmp_path / "full.tar.gz"
    with tarfile.open(full, "w:gz") as tf:
        for i in range(10):
            add_file(tf, f"IM{i}", os.urandom(5000))
    half = tmp_path / "P1.tar.gz"
    half.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    assert_refused(tmp_path, half, "tar.gz", "damaged or incomplete")


def test_failed_extraction_keeps_previous_folder(tmp_path):
    good = make_zip(tmp_path / "P1.zip", {"IM1": b"good"})
    target = tmp_path / "raw" / "P1"
    run(good, "zip", target)
    bad = make_zip(tmp_path / "P1b.zip", {"../x": b"bad"})
    with pytest.raises(UnsafeArchiveError):
        run(bad, "zip", target)
    assert (target / "P1" / "IM1").read_bytes() == b"good"
    assert sorted(p.name for p in target.parent.iterdir()) == ["P1"]


def test_folder_items_are_copied_not_moved(tmp_path):
    src = tmp_path / "dl" / "P1_MR"
    (src / "s1").mkdir(parents=True)
    (src / "s1" / "IM1").write_bytes(b"abc")
    before = sha(src)
    run(src, "folder", tmp_path / "raw" / "P1")
    assert (tmp_path / "raw/P1/P1_MR/s1/IM1").read_bytes() == b"abc"
    assert sha(src) == before and (src / "s1" / "IM1").exists()


def test_folder_symlink_pointing_out_is_refused(tmp_path):
    src = tmp_path / "dl" / "P1_MR"
    src.mkdir(parents=True)
    (tmp_path / "secret").write_text("x")
    os.symlink(tmp_path / "secret", src / "IM1")
    with pytest.raises(UnsafeArchiveError, match="points outside the download"):
        run(src, "folder", tmp_path / "raw" / "P1")


def test_rerun_replaces_atomically(tmp_path):
    z = make_zip(tmp_path / "P1.zip", {"IM1": b"1"})
    target = tmp_path / "raw" / "P1"
    run(z, "zip", target)
    (target / "P1" / "stale").write_text("old")
    run(z, "zip", target)
    assert not (target / "P1" / "stale").exists()
    assert (target / "P1" / "IM1").read_bytes() == b"1"


# --------------------------------------------------------------------------- issue 13: hostile input
# Real sample DICOMs as members (no invented headers); small ones so cuts land in every place.
REAL = ("rtplan.dcm", "SC_rgb_rle.dcm", "rtstruct.dcm")


def real_members(samples) -> dict[str, bytes]:
    return {f"s{i}/{name}": (samples.pydicom_files / name).read_bytes() for i, name in enumerate(REAL)}


def real_tar(path: Path, samples, fmt=tarfile.USTAR_FORMAT) -> tuple[Path, list[int]]:
    """A tar of the real members; returns it and each member's end offset (header + padded data)."""
    ends = []
    with tarfile.open(path, "w", format=fmt) as tf:
        for name, data in real_members(samples).items():
            add_file(tf, name, data)
            ends.append(tf.offset)
    return path, ends


def extracted(target: Path) -> dict[str, bytes]:
    return {str(p.relative_to(target)): p.read_bytes() for p in sorted(target.rglob("*")) if p.is_file()}


def test_tar_xz_is_extracted(tmp_path, samples):
    t, _ = real_tar(tmp_path / "full.tar", samples)
    xz = tmp_path / "P1.tar.xz"
    import lzma
    xz.write_bytes(lzma.compress(t.read_bytes()))
    run(xz, "tar.xz", tmp_path / "raw" / "P1")
    assert extracted(tmp_path / "raw" / "P1" / "P1") == real_members(samples)


@pytest.mark.parametrize("cut", ["member-boundary", "inside-next-header", "damaged-next-header",
                                 "gzip-of-cut-tar", "gzip-trailer-cut"])
def test_truncated_tar_is_not_taken_for_complete(tmp_path, samples, cut):
    """tarfile takes a cut or damaged header after the first for the end of the archive: the
    files before it extracted 'successfully'. The end-of-archive marker is required."""
    import gzip
    full, ends = real_tar(tmp_path / "full.tar", samples)
    data = full.read_bytes()
    if cut == "member-boundary":
        bad, kind = data[: ends[0]], "tar"
    elif cut == "inside-next-header":
        bad, kind = data[: ends[0] + 300], "tar"
    elif cut == "damaged-next-header":
        b = bytearray(data)
        b[ends[0] + 10] ^= 0x20  # one bit of the second member's name: its checksum no longer matches
        bad, kind = bytes(b), "tar"
    elif cut == "gzip-of-cut-tar":
        bad, kind = gzip.compress(data[: ends[1]]), "tar.gz"
    else:
        bad, kind = gzip.compress(data)[:-4], "tar.gz"  # the gzip length field is missing
    item = tmp_path / ("P1." + kind)
    item.write_bytes(bad)
    assert_refused(tmp_path, item, kind, r"P1\.tar(\.gz)?: .*(cut|damaged|incomplete)")


def test_vanished_folder_keeps_the_previous_extraction(tmp_path, samples):
    src = tmp_path / "dl" / "P1_MR"
    src.mkdir(parents=True)
    for name, data in real_members(samples).items():
        (src / name).parent.mkdir(exist_ok=True)
        (src / name).write_bytes(data)
    target = tmp_path / "raw" / "P1"
    run(src, "folder", target)
    good = extracted(target)
    shutil.rmtree(src)  # the dump is deleted (or its disk unmounted) after a good extraction
    with pytest.raises(UnsafeArchiveError, match="P1_MR: the download folder vanished"):
        run(src, "folder", target)
    assert extracted(target) == good and len(good) == 3


def test_vanished_zip_is_named(tmp_path):
    with pytest.raises(UnsafeArchiveError, match="P1.zip: the download vanished"):
        run(tmp_path / "P1.zip", "zip", tmp_path / "raw" / "P1")
    assert not (tmp_path / "raw" / "P1").exists()



@pytest.mark.parametrize("unreadable, message", [
    ("s1", "P1_MR: folder 's1' of the download cannot be listed (Permission denied); its files would be missing"),
    ("s1/SC_rgb_rle.dcm", "P1_MR: 's1/SC_rgb_rle.dcm' cannot be copied (Permission denied)"),
], ids=["sub-folder", "file"])
def test_unreadable_part_of_a_folder_dump_fails_instead_of_missing_files(nobody_dir, samples, unreadable, message):
    """Permissions enforced (the step runs as an unprivileged user): a sub-folder os.walk
    cannot list was skipped without a word, and the dump extracted with files missing."""
    src = nobody_dir / "dl" / "P1_MR"
    for name, data in real_members(samples).items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    for p in [nobody_dir / "dl", *(nobody_dir / "dl").rglob("*")]:
        os.chown(p, 65534, 65534)
    before = sha(src)
    os.chmod(src / unreadable, 0o000)
    target = nobody_dir / "raw" / "P1"
    (target / "P1_MR").mkdir(parents=True)
    (target / "P1_MR" / "IM1").write_bytes(b"the previous good extraction")
    for p in (nobody_dir / "raw", target, target / "P1_MR", target / "P1_MR" / "IM1"):
        os.chown(p, 65534, 65534)
    res = as_nobody(lambda: run(src, "folder", target).files)
    assert res[:2] == ("error", "UnsafeArchiveError"), res
    assert message in res[2]
    assert extracted(target) == {"P1_MR/IM1": b"the previous good extraction"}
    assert os.listdir(nobody_dir / "raw") == ["P1"]
    os.chmod(src / unreadable, 0o755)
    assert sha(src) == before


def _set_zip_field(path: Path, local_off: int, central_off: int, fmt: str, value: int) -> None:
    """Rewrite one field of the (only) member, in its local header and in the central directory."""
    data = bytearray(path.read_bytes())
    struct.pack_into(fmt, data, data.find(b"PK\x03\x04") + local_off, value)
    struct.pack_into(fmt, data, data.rfind(b"PK\x01\x02") + central_off, value)
    path.write_bytes(bytes(data))


def _corrupt_deflate(path: Path) -> None:
    data = bytearray(path.read_bytes())
    start = data.find(b"PK\x03\x04")
    name_len, extra_len = struct.unpack_from("<HH", data, start + 26)
    data[start + 30 + name_len + extra_len + 1] ^= 0xFF  # the deflate block header
    path.write_bytes(bytes(data))


def test_zip_entry_swallowed_by_a_damaged_comment_length_is_refused(tmp_path, samples):
    """zipfile reads the central directory by byte size only: one entry's comment length
    changed so that it covers the next entry, and the zip opened with that member missing.
    (Found by the fuzz layer, long profile.)"""
    z = make_zip(tmp_path / "P1.zip", real_members(samples))
    data = bytearray(z.read_bytes())
    entries = [i for i in range(len(data)) if data.startswith(b"PK\x01\x02", i)]
    struct.pack_into("<H", data, entries[0] + 32, entries[2] - entries[1])  # swallow exactly entry 2
    z.write_bytes(bytes(data))
    assert_refused(tmp_path, z, "zip", r"^P1\.zip: the zip's directory lists 2 member\(s\) but its end record "
                                       r"declares 3")


def _tar_link_named_like_file(tf):
    add_file(tf, "s1/IM1", b"one")
    add_file(tf, "s1/IM2", b"two")
    add_link(tf, "s1/IM2", "IM1")


def _tar_file_under_file(tf):
    add_file(tf, "s1", b"a file")
    add_file(tf, "s1/IM1", b"under it")


@pytest.mark.parametrize("case", ["zip-encrypted", "zip-deflate64", "zip-file-and-folder", "zip-corrupt-deflate",
                                  "zip-folder-holding-data",
                                  "tar-link-named-like-file", "tar-file-under-file"])
def test_hostile_archive_gives_a_named_error_not_a_traceback(tmp_path, samples, case):
    dcm = (samples.pydicom_files / "rtplan.dcm").read_bytes()
    if case.startswith("zip"):
        item, kind = tmp_path / "P1.zip", "zip"
        members = ({"a": dcm, "a/": b""} if case == "zip-file-and-folder" else
                   {"IM1/": dcm} if case == "zip-folder-holding-data" else {"IM1": dcm})
        make_zip(item, members)
        if case == "zip-encrypted":
            _set_zip_field(item, 6, 8, "<H", 0x1)  # general purpose flag bit 0: encrypted
            match = "member 'IM1' is encrypted"
        elif case == "zip-deflate64":
            _set_zip_field(item, 8, 10, "<H", 9)  # compression method 9: Deflate64 (7-Zip, Windows)
            match = r"member 'IM1' uses zip compression method 9 \(Deflate64\)"
        elif case == "zip-file-and-folder":
            match = "member 'a/' is a folder with the name of a file"
        elif case == "zip-folder-holding-data":  # was dropped without a word (found by the fuzz layer)
            match = f"member 'IM1/' is named like a folder but holds {len(dcm)} bytes"
        else:
            _corrupt_deflate(item)
            match = "member 'IM1' cannot be read .*is the download complete"
    else:
        item, kind = tmp_path / "P1.tar", "tar"
        build = _tar_link_named_like_file if case == "tar-link-named-like-file" else _tar_file_under_file
        make_tar(item, build)
        match = ("member 's1/IM2' is a link with the name of a file" if case == "tar-link-named-like-file"
                 else "member 's1/IM1' lies under 's1', which is a file")
    assert_refused(tmp_path, item, kind, f"^P1\\.{kind}: {match}")


def test_folder_link_loops_are_reported_not_a_traceback(tmp_path, samples):
    src = tmp_path / "dl" / "P1_MR"
    (src / "s1").mkdir(parents=True)
    (src / "s1" / "IM1").write_bytes((samples.pydicom_files / "rtplan.dcm").read_bytes())
    os.symlink("loop", src / "s1" / "loop")  # a link to itself
    os.symlink("..", src / "s1" / "up")  # a folder link back to the dump's top
    os.symlink("gone", src / "s1" / "broken")
    before = sha(src)
    rep = run(src, "folder", tmp_path / "raw" / "P1")
    assert rep.files == 1 and sorted(rep.skipped) == [
        "P1_MR: s1/broken: link to nothing (a broken link or a link loop)",
        "P1_MR: s1/loop: link to nothing (a broken link or a link loop)",
        "P1_MR: s1/up: folder link to '.', whose files are extracted where they lie",
    ]
    assert sha(src) == before


def test_folder_dump_is_copied_not_hard_linked(tmp_path, samples):
    src = tmp_path / "dl" / "P1_MR"
    src.mkdir(parents=True)
    data = (samples.pydicom_files / "rtplan.dcm").read_bytes()
    (src / "IM1").write_bytes(data)
    run(src, "folder", tmp_path / "raw" / "P1")
    copy = tmp_path / "raw" / "P1" / "P1_MR" / "IM1"
    with open(copy, "r+b") as fh:  # an in-place edit in scratch/ (a de-identification tool, say)
        fh.write(b"EDITED")
    assert (src / "IM1").read_bytes() == data, "the edit in scratch/ changed the download"
    assert os.stat(src / "IM1").st_nlink == 1


# ------------------------------------------------------------ issue 25: no silent part
def _tar_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members.items():
            add_file(tf, name, data)
    return buf.getvalue()


@pytest.mark.parametrize("joined", ["tar", "tar.gz", "tar.xz", "members after two zero blocks"])
def test_archives_joined_end_to_end_are_refused_not_cut_short(tmp_path, joined):
    import gzip
    import lzma

    a, b = _tar_bytes({"a.dcm": b"A" * 600}), _tar_bytes({"b.dcm": b"B" * 600, "c.dcm": b"C" * 10})
    if joined == "tar.gz":
        data, suffix = gzip.compress(a) + gzip.compress(b), ".tar.gz"
    elif joined == "tar.xz":
        data, suffix = lzma.compress(a) + lzma.compress(b), ".tar.xz"
    elif joined == "tar":
        data, suffix = a + b, ".tar"
    else:  # a's two end blocks, then b's members without padding: still data after the marker
        data, suffix = a[:a.index(b"\0" * 1024, 1024)] + b"\0" * 1024 + b, ".tar"
    item = tmp_path / f"QPN_001{suffix}"
    item.write_bytes(data)
    before = sha(item)
    with pytest.raises(UnsafeArchiveError, match="data follows the tar's end-of-archive marker"):
        run(item, "tar" if suffix == ".tar" else suffix.lstrip("."), tmp_path / "out")
    assert sha(item) == before and not (tmp_path / "out").exists()


def test_trailing_zero_padding_is_still_fine(tmp_path):
    item = tmp_path / "QPN_001.tar"
    item.write_bytes(_tar_bytes({"a.dcm": b"A" * 600}) + b"\0" * 20480)
    assert run(item, "tar", tmp_path / "out").files == 1


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_a_member_named_dot_holding_data_is_refused(tmp_path, kind):
    if kind == "zip":
        item = make_zip(tmp_path / "QPN_001.zip", {"a.dcm": b"A", "./": b"", ".": b"hidden data"})
    else:
        item = tmp_path / "QPN_001.tar"
        item.write_bytes(_tar_bytes({"a.dcm": b"A", ".": b"hidden data"}))
    with pytest.raises(UnsafeArchiveError, match="names the archive's root but holds 11 bytes"):
        run(item, kind, tmp_path / "out")


@pytest.mark.faults
@pytest.mark.parametrize("data", [b"", b"hidden data"], ids=["no-bytes", "bytes"])
def test_a_zip_member_with_an_empty_name_is_named_not_a_crash(tmp_path, data):
    """zipfile reads an empty member name from a crafted directory, and its ZipInfo.is_dir raises
    IndexError on it (found by test_fuzz_extract): an empty name is the archive's root, like '.'."""
    item = tmp_path / "QPN_001.zip"
    with zipfile.ZipFile(item, "w") as zf:  # a ZipInfo: writestr of a bare "" fails in zipfile itself
        zf.writestr("a.dcm", b"A")
        zf.writestr(zipfile.ZipInfo("", (2020, 1, 1, 0, 0, 0)), data)
    with zipfile.ZipFile(item) as zf:
        assert "" in zf.namelist()  # the crafted member really is there
    if data:
        with pytest.raises(UnsafeArchiveError, match="names the archive's root but holds 11 bytes"):
            run(item, "zip", tmp_path / "out")
    else:
        assert run(item, "zip", tmp_path / "out").files == 1


@pytest.mark.parametrize("members", [{}, {"series1/": b"", "series1/sub/": b""}], ids=["empty", "folders-only"])
def test_an_empty_zip_is_a_named_refusal_not_an_empty_visit(tmp_path, members):
    item = make_zip(tmp_path / "QPN_001.zip", members)
    with pytest.raises(UnsafeArchiveError, match="the download holds no file"):
        run(item, "zip", tmp_path / "out")
    assert not (tmp_path / "out").exists()
