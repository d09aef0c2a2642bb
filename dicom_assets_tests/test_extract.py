"""Safe extraction: hostile and broken archives are refused with a clear message,
nothing outside the target is written, downloads are never changed."""

import hashlib
import io
import os
import struct
import tarfile
import zipfile
from pathlib import Path

import pytest

from dicom_assets.core.downloads import DownloadItem
from dicom_assets.core.errors import UnsafeArchiveError
from dicom_assets.core.extract import ExtractLimits, extract_visit

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
    assert_refused(tmp_path, z, "zip", "possible zip bomb", ExtractLimits(max_bytes=1 << 30))


def test_zip_bomb_ratio_is_refused(tmp_path):
    z = make_zip(tmp_path / "P1.zip", {"zeros.dcm": b"\0" * (8 << 20)})
    assert_refused(tmp_path, z, "zip", r"expands \d+x \(limit 100x\)", ExtractLimits(max_ratio=100))


def test_total_size_limit_counts_real_bytes(tmp_path):
    t = make_tar(tmp_path / "P1.tar", lambda tf: [add_file(tf, f"IM{i}", os.urandom(4096)) for i in range(8)])
    assert_refused(tmp_path, t, "tar", "extracts to more than 10000 bytes", ExtractLimits(max_bytes=10000))


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


def test_folder_items_are_linked_not_moved(tmp_path):
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
