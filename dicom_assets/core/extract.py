"""Safe extraction of scanner dumps into ``scratch/raw_dicoms/<session>/<participant>/``.

* no member may land outside the target: absolute paths, ``..`` components, and links
  pointing out are refused (the whole archive, with the member named);
* device files and fifos are refused; total size and member count are bounded, and so is
  a zip member's compression ratio (zip bombs are refused before anything is written);
* sizes are counted while writing too, so an archive lying about its sizes is caught;
* an archive must be complete: a tar must end with its end-of-archive marker (a cut at a
  member boundary or a damaged header is not taken for the end), a compressed stream must
  reach its end-of-stream marker and checksum, every zip member its CRC; a folder dump that
  vanished, or a sub-folder or file that cannot be read, fails the extraction instead of
  giving fewer files;
* two members with one name (a file and a folder ``a`` / ``a/``, a link named like a file)
  refuse the archive; encrypted and unsupported zip methods are named;
* everything is extracted into a temporary sibling folder, then swapped in with a rename:
  a crash never leaves a half folder that looks complete, and the old one stays until the
  new one is whole; a failure leaves the previous good folder untouched;
* folders are copied (a copy-on-write clone where the filesystem offers one), never moved
  nor hard-linked: an edit in ``scratch/`` never reaches the download;
* every problem is an :class:`UnsafeArchiveError` naming the download.
"""

from __future__ import annotations

import bz2
import fcntl
import gzip
import lzma
import os
import re
import shutil
import stat
import struct
import tarfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from .config import Limits
from .downloads import DownloadItem, safe_folder_name, shown
from .errors import UnsafeArchiveError
from .fsutil import recover_dir, swap_dir, temp_sibling

_DRIVE = re.compile(r"^[A-Za-z]:")
_CHUNK = 1 << 20
_FICLONE = 0x40049409  # linux/fs.h: clone a file's extents (btrfs, XFS, bcachefs, ...)

# What reading a damaged archive may raise (besides our own errors): every one of them
# becomes an UnsafeArchiveError naming the archive and the member.
_READ_ERRORS = (tarfile.TarError, zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, zlib.error,
                lzma.LZMAError, struct.error, ValueError, NotImplementedError)

# zip compression methods Python can read; the others are named in the refusal
_ZIP_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
_ZIP_METHOD_NAMES = {1: "Shrink", 6: "Implode", 9: "Deflate64", 10: "PKWARE Implode", 18: "IBM TERSE",
                     19: "IBM LZ77", 93: "Zstandard", 94: "MP3", 95: "XZ", 96: "JPEG", 97: "WavPack",
                     98: "PPMd", 99: "AES encryption"}


# what extraction refuses: the ``limits`` of global_config.json, one model and one set of defaults
ExtractLimits = Limits


@dataclass
class ItemReport:
    item: str
    kind: str
    folder: str
    files: int = 0
    bytes: int = 0
    links: int = 0
    # entries of the dump not extracted as files, each "<path>: <why>" (a broken link, a
    # folder link whose files are extracted through the folder it names)
    skipped: list[str] = field(default_factory=list)


@dataclass
class ExtractReport:
    target: str
    items: list[ItemReport] = field(default_factory=list)

    @property
    def files(self) -> int:
        return sum(i.files for i in self.items)

    @property
    def bytes(self) -> int:
        return sum(i.bytes for i in self.items)

    @property
    def skipped(self) -> list[str]:
        return [f"{shown(Path(i.item).name)}: {s}" for i in self.items for s in i.skipped]


def safe_member_path(name: str, archive: str) -> PurePosixPath | None:
    """The relative path a member may be written to; None for the archive's root entry."""
    norm = name.replace("\\", "/")
    if norm.startswith("/") or _DRIVE.match(norm):
        raise UnsafeArchiveError(f"{archive}: member {name!r} has an absolute path; refusing the archive")
    parts = [p for p in norm.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError(f"{archive}: member {name!r} points outside the target ('..'); refusing the archive")
    if any("\x00" in p for p in parts):
        raise UnsafeArchiveError(f"{archive}: member {name!r} has a NUL byte in its name")
    return PurePosixPath(*parts) if parts else None


def _link_target_inside(member_rel: PurePosixPath, link: str, archive: str, member_name: str) -> PurePosixPath:
    if link.startswith("/") or _DRIVE.match(link):
        raise UnsafeArchiveError(f"{archive}: link {member_name!r} -> {link!r} points outside the target; refusing the archive")
    parts: list[str] = list(member_rel.parent.parts)
    for p in link.replace("\\", "/").split("/"):
        if p in ("", "."):
            continue
        if p == "..":
            if not parts:
                raise UnsafeArchiveError(
                    f"{archive}: link {member_name!r} -> {link!r} points outside the target; refusing the archive")
            parts.pop()
        else:
            parts.append(p)
    if not parts or any("\x00" in p for p in parts):
        raise UnsafeArchiveError(f"{archive}: link {member_name!r} -> {link!r} does not name a file of the archive")
    return PurePosixPath(*parts)


class _Names:
    """Every path an archive writes, with its kind: a second member with a taken name (a file
    ``a`` and a folder ``a/``, a link named like a file, a file under a file) refuses the
    archive with both named, instead of an OS error half-way through."""

    def __init__(self, archive: str):
        self.archive = archive
        self.kinds: dict[PurePosixPath, str] = {}

    def claim(self, rel: PurePosixPath, kind: str, name: str) -> None:
        for anc in reversed(rel.parents[:-1]):  # outermost first, without '.'
            k = self.kinds.setdefault(anc, "folder")
            if k != "folder":
                raise UnsafeArchiveError(f"{self.archive}: member {name!r} lies under {str(anc)!r}, which is a {k} "
                                         "of the archive, not a folder; refusing the archive")
        k = self.kinds.get(rel)
        if k is None:
            self.kinds[rel] = kind
        elif not (k == kind == "folder"):
            what = "appears twice" if k == kind else f"is a {kind} with the name of a {k} of the archive"
            raise UnsafeArchiveError(f"{self.archive}: member {name!r} {what}; refusing the archive")


class _Budget:
    def __init__(self, limits: ExtractLimits, archive: str):
        self.limits, self.archive = limits, archive
        self.bytes = 0
        self.members = 0

    def member(self) -> None:
        self.members += 1
        if self.members > self.limits.max_members:
            raise UnsafeArchiveError(
                f"{self.archive}: more than {self.limits.max_members} members; refusing the archive "
                "(raise limits.max_members in global_config.json if this is a real dump)")

    def add(self, n: int) -> None:
        self.bytes += n
        if self.bytes > self.limits.max_extract_bytes:
            raise UnsafeArchiveError(
                f"{self.archive}: extracts to more than {self.limits.max_extract_bytes} bytes; refusing the archive "
                "as a possible zip bomb (raise limits.max_extract_bytes if this is a real dump)")


def _write_error(archive: str, name: str, exc: OSError) -> UnsafeArchiveError:
    return UnsafeArchiveError(f"{archive}: member {name!r} cannot be written into scratch/ ({exc.strerror or exc})")


def _copy_stream(src, dest: Path, budget: _Budget, declared: int | None, archive: str, name: str) -> int:
    """Copy a member's stream to dest (a new file). Read errors propagate (the caller knows
    the archive's kind); write errors become an UnsafeArchiveError naming the member."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fo = open(dest, "xb")
    except OSError as exc:
        raise _write_error(archive, name, exc) from None
    written = 0
    with fo:
        while True:
            chunk = src.read(_CHUNK)
            if not chunk:
                break
            written += len(chunk)
            if declared is not None and written > declared:
                raise UnsafeArchiveError(f"{archive}: member {name!r} is larger than its header declares; refusing the archive")
            budget.add(len(chunk))
            try:
                fo.write(chunk)
            except OSError as exc:
                raise _write_error(archive, name, exc) from None
    if declared is not None and written != declared:
        raise UnsafeArchiveError(f"{archive}: member {name!r} holds {written} bytes, its header declares {declared}; "
                                 "is the download complete?")
    os.chmod(dest, 0o644)
    return written


def _zip_refusal(archive: str, info: zipfile.ZipInfo) -> str | None:
    if info.flag_bits & 0x1:
        return (f"{archive}: member {info.filename!r} is encrypted (password-protected); deliver the dump "
                "unencrypted, or unpack it with its password")
    if info.compress_type not in _ZIP_METHODS:
        method = _ZIP_METHOD_NAMES.get(info.compress_type, "unknown")
        return (f"{archive}: member {info.filename!r} uses zip compression method {info.compress_type} ({method}), "
                "which cannot be read here; re-pack the dump with standard Deflate (or as .tar.gz)")
    return None


def _zip_declared_count(path: Path) -> int | None:
    """The member count the zip's end-of-central-directory record declares (zipfile reads the
    directory by its byte size only: an entry whose comment or extra length is damaged can
    swallow the entries after it, and the archive would open with members missing)."""
    try:
        with open(path, "rb") as fp:
            endrec = zipfile._EndRecData(fp)  # the record zipfile itself used (zip64 resolved)
    except _READ_ERRORS:
        return None
    return None if not endrec else endrec[zipfile._ECD_ENTRIES_TOTAL]


def _zip_is_dir(info: zipfile.ZipInfo) -> bool:
    """``ZipInfo.is_dir`` for any name: a member with an empty name (which zipfile reads from a
    crafted directory) makes ``is_dir`` raise IndexError; it names no folder."""
    return info.filename.endswith("/")


def _zip_member_refusal(info: zipfile.ZipInfo, rel: PurePosixPath | None, archive: str,
                        limits: ExtractLimits) -> str | None:
    """Why one member refuses the whole zip (checked for every member before anything is written)."""
    ratio = info.file_size / max(info.compress_size, 1)
    if info.file_size > (1 << 20) and ratio > limits.max_compression_ratio:
        return (f"{archive}: member {info.filename!r} expands {ratio:.0f}x (limit {limits.max_compression_ratio}x); "
                "refusing the archive as a possible zip bomb")
    if stat.S_ISLNK(info.external_attr >> 16):
        return f"{archive}: member {info.filename!r} is a symbolic link; refusing the archive"
    if rel is None:
        if not _zip_is_dir(info) and info.file_size:
            return (f"{archive}: member {info.filename!r} names the archive's root but holds {info.file_size} "
                    "bytes, which have no file name to be written to; refusing the archive")
        return None
    if _zip_is_dir(info):
        if info.file_size or info.CRC:  # the CRC of nothing is 0
            return (f"{archive}: member {info.filename!r} is named like a folder but holds {info.file_size} bytes; "
                    "refusing the archive")
        return None
    return _zip_refusal(archive, info)


def _zip_plan(zf: zipfile.ZipFile, path: Path, archive: str, limits: ExtractLimits,
              budget: _Budget) -> list[tuple[zipfile.ZipInfo, PurePosixPath]]:
    """The members to write, in order, once every refusal of the archive has been checked."""
    infos = zf.infolist()
    declared_count = _zip_declared_count(path)
    if declared_count is not None and declared_count % 65536 != len(infos) % 65536:
        raise UnsafeArchiveError(f"{archive}: the zip's directory lists {len(infos)} member(s) but its end "
                                 f"record declares {declared_count}; the archive is damaged")
    if len(infos) > limits.max_members:
        budget.members = len(infos) - 1
        budget.member()
    declared = sum(i.file_size for i in infos)
    if declared > limits.max_extract_bytes:
        raise UnsafeArchiveError(
            f"{archive}: declares {declared} bytes once extracted, over the limit of {limits.max_extract_bytes}; "
            "refusing the archive as a possible zip bomb")
    names = _Names(archive)
    plan: list[tuple[zipfile.ZipInfo, PurePosixPath]] = []
    for info in infos:
        rel = safe_member_path(info.filename, archive)
        refusal = _zip_member_refusal(info, rel, archive, limits)
        if refusal:
            raise UnsafeArchiveError(refusal)
        if rel is None:
            continue
        names.claim(rel, "folder" if _zip_is_dir(info) else "file", info.filename)
        plan.append((info, rel))
    return plan


def _zip_write(zf: zipfile.ZipFile, plan, out: Path, archive: str, budget: _Budget, rep: ItemReport) -> None:
    for info, rel in plan:
        if _zip_is_dir(info):
            try:
                (out / rel).mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise _write_error(archive, info.filename, exc) from None
            continue
        budget.member()
        try:
            with zf.open(info) as src:
                rep.bytes += _copy_stream(src, out / rel, budget, info.file_size, archive, info.filename)
        except FileNotFoundError:
            raise UnsafeArchiveError(f"{archive}: the download vanished during extraction") from None
        except (*_READ_ERRORS, RuntimeError) as exc:
            raise UnsafeArchiveError(f"{archive}: member {info.filename!r} cannot be read ({exc}); "
                                     "is the download complete?") from None
        rep.files += 1


def _extract_zip(path: Path, out: Path, limits: ExtractLimits, rep: ItemReport) -> None:
    archive = shown(path.name)
    budget = _Budget(limits, archive)
    try:
        zf = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise UnsafeArchiveError(f"{archive}: the download vanished before it could be extracted") from None
    except _READ_ERRORS as exc:
        raise UnsafeArchiveError(f"{archive}: not a readable zip file ({exc}); is the download complete?") from None
    with zf:
        plan = _zip_plan(zf, path, archive, limits, budget)  # every refusal before anything is written
        _zip_write(zf, plan, out, archive, budget, rep)


class _Recorder:
    """The (decompressed) tar stream as tarfile reads it, remembering the last read: after the
    listing ends, that is the block tarfile took for the end of the archive."""

    def __init__(self, f):
        self.f = f
        self.last_pos, self.last = -1, b""

    def read(self, n: int = -1) -> bytes:
        pos = self.f.tell()
        data = self.f.read(n)
        self.last_pos, self.last = pos, data
        return data

    def seek(self, pos: int, whence: int = 0) -> int:
        return self.f.seek(pos, whence)

    def tell(self) -> int:
        return self.f.tell()


def _open_tar_stream(raw, archive: str):
    """The decompressed stream of a tar, whatever the suffix says (a browser may have
    decompressed a .tgz already): gzip, bzip2, xz or none, told by the magic bytes."""
    magic = raw.read(6)
    raw.seek(0)
    if magic.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if magic.startswith(b"BZh"):
        return bz2.BZ2File(raw)
    if magic.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(raw)
    if magic.startswith(b"\x28\xb5\x2f\xfd"):
        raise UnsafeArchiveError(f"{archive}: a Zstandard-compressed tar, which cannot be read here; "
                                 "deliver it as .tar, .tar.gz or .tar.xz")
    return None


def _tar_member(tf: tarfile.TarFile, m: tarfile.TarInfo, rel: PurePosixPath, out: Path, archive: str,
                names: _Names, budget: _Budget, rep: ItemReport, links: list) -> None:
    """One member of a tar written (a folder, a file), or a link remembered for after the files."""
    if m.isdir():
        names.claim(rel, "folder", m.name)
        try:
            (out / rel).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _write_error(archive, m.name, exc) from None
    elif m.isreg():
        names.claim(rel, "file", m.name)
        rep.bytes += _copy_stream(tf.extractfile(m), out / rel, budget, m.size, archive, m.name)
        rep.files += 1
    elif m.issym() or m.islnk():
        if m.issym():
            target = _link_target_inside(rel, m.linkname, archive, m.name)
        else:
            target = safe_member_path(m.linkname, archive)
            if target is None:
                raise UnsafeArchiveError(f"{archive}: hard link {m.name!r} has no target")
        names.claim(rel, "link", m.name)
        links.append((rel, target, m.issym(), m.name))
    else:
        raise UnsafeArchiveError(
            f"{archive}: member {m.name!r} is a device, fifo or other special file; refusing the archive")


def _check_tar_end(tf: tarfile.TarFile, rec: _Recorder, archive: str, rep: ItemReport) -> None:
    """The block where tarfile stopped listing must be the end-of-archive marker (zeros): else
    the tar is cut, or a damaged header hides the members after it."""
    end = tf.offset  # where tarfile looked for the next header
    if rec.last_pos == end:
        block = rec.last
    else:
        rec.seek(end)
        block = rec.read(tarfile.BLOCKSIZE)
    if block == tarfile.NUL * tarfile.BLOCKSIZE:
        return
    if len(block) < tarfile.BLOCKSIZE:
        raise UnsafeArchiveError(
            f"{archive}: the archive is cut at byte {end + len(block)} of its tar stream (no "
            f"end-of-archive marker after {rep.files} file(s)); is the download complete?")
    raise UnsafeArchiveError(f"{archive}: the archive is damaged: unreadable header at byte {end} of "
                             f"its tar stream, after {rep.files} file(s); is the download complete?")


def _check_nothing_follows(rec: _Recorder, archive: str, budget: _Budget) -> None:
    """Read the (decompressed) stream to its end: a cut compressed end or a bad CRC fails here;
    anything but zeros after the end-of-archive marker is refused, naming where it starts (GNU
    tar reads on only with -i; taking the first archive alone would lose the rest silently)."""
    while True:
        at = rec.tell()
        chunk = rec.read(_CHUNK)
        if not chunk:
            return
        budget.add(len(chunk))
        stripped = chunk.lstrip(b"\0")
        if stripped:
            where = at + len(chunk) - len(stripped)
            raise UnsafeArchiveError(
                f"{archive}: data follows the tar's end-of-archive marker, at byte {where} of its tar stream (two "
                "archives joined end to end, e.g. with cat, or two compressed streams in one file): refusing the "
                "archive rather than taking only its first part; re-pack the dump as one archive")


def _make_links(links: list, names: _Names, out: Path, archive: str, rep: ItemReport) -> None:
    for rel, target, is_sym, name in links:
        if names.kinds.get(target) != "file":
            raise UnsafeArchiveError(f"{archive}: link {name!r} -> {str(target)!r} does not name a file of the archive")
        src, dest = out / target, out / rel
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            if is_sym:
                os.symlink(os.path.relpath(src, dest.parent), dest)
            else:
                os.link(src, dest)
        except OSError as exc:
            raise _write_error(archive, name, exc) from None
        rep.links += 1


def _extract_tar(path: Path, out: Path, limits: ExtractLimits, rep: ItemReport) -> None:
    archive = shown(path.name)
    budget = _Budget(limits, archive)
    names = _Names(archive)
    links: list[tuple[PurePosixPath, PurePosixPath, bool, str]] = []
    try:
        raw = open(path, "rb")
    except FileNotFoundError:
        raise UnsafeArchiveError(f"{archive}: the download vanished before it could be extracted") from None
    with raw:
        try:
            stream = _open_tar_stream(raw, archive)
            rec = _Recorder(stream or raw)
            # tarfile takes a cut or damaged header after the first for the end of the archive;
            # the recorder keeps that block, which must be the end-of-archive marker (zeros)
            tf = tarfile.open(fileobj=rec, mode="r:")
        except _READ_ERRORS as exc:
            raise UnsafeArchiveError(f"{archive}: not a readable tar file ({exc}); is the download complete?") from None
        try:
            for m in tf:
                rel = safe_member_path(m.name, archive)
                if rel is not None:
                    budget.member()
                    _tar_member(tf, m, rel, out, archive, names, budget, rep, links)
                elif m.isreg() and m.size:
                    raise UnsafeArchiveError(f"{archive}: member {m.name!r} names the archive's root but holds "
                                             f"{m.size} bytes, which have no file name to be written to; refusing "
                                             "the archive")
            _check_tar_end(tf, rec, archive, rep)
            # after the end-of-archive marker only zeros (the record's padding) may follow: more data
            # is a second archive joined to the first (cat a.tar b.tar, two gzip or xz streams)
            _check_nothing_follows(rec, archive, budget)
        except FileNotFoundError:
            raise UnsafeArchiveError(f"{archive}: the download vanished during extraction") from None
        except _READ_ERRORS as exc:
            raise UnsafeArchiveError(f"{archive}: the archive is damaged or incomplete ({exc}); "
                                     "is the download complete?") from None
    _make_links(links, names, out, archive, rep)


def clone_or_copy(src: Path, dest: Path) -> int:
    """A copy of src at dest (new file, mode 0644): a copy-on-write clone where the filesystem
    offers one, else a byte copy. Never a hard link: the copy may be edited, the source must
    not change. Returns the bytes copied."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(src, "rb") as fi, open(dest, "xb") as fo:
        try:
            fcntl.ioctl(fo.fileno(), _FICLONE, fi.fileno())
        except OSError:
            shutil.copyfileobj(fi, fo, _CHUNK)
        size = fo.tell() or os.fstat(fo.fileno()).st_size
    os.chmod(dest, 0o644)
    return size


class _FolderWalk:
    """One download folder being copied: what is inside it, what a link may point to."""

    def __init__(self, path: Path, out: Path, limits: ExtractLimits, rep: ItemReport) -> None:
        self.path, self.out, self.rep = path, out, rep
        self.archive = shown(path.name)
        self.budget = _Budget(limits, self.archive)
        self.base = os.path.realpath(path)

    def inside(self, p: str) -> bool:
        return p == self.base or p.startswith(self.base + os.sep)

    def unlistable(self, exc: OSError) -> None:
        where = os.path.relpath(exc.filename, self.path) if exc.filename else "."
        raise UnsafeArchiveError(f"{self.archive}: folder {where!r} of the download cannot be listed "
                                 f"({exc.strerror or exc}); its files would be missing")

    def prune_folder_links(self, dirpath: str, dirs: list[str]) -> None:
        """Folder links are never followed: their targets are walked where they lie."""
        dirs.sort()
        for d in list(dirs):
            full = os.path.join(dirpath, d)
            if not os.path.islink(full):
                continue
            dirs.remove(d)
            rel = os.path.relpath(full, self.path)
            real = os.path.realpath(full)
            if not self.inside(real):
                raise UnsafeArchiveError(f"{self.archive}: folder link {rel!r} points outside the download; refusing it")
            self.rep.skipped.append(f"{shown(rel)}: folder link to {os.path.relpath(real, self.base)!r}, "
                                    "whose files are extracted where they lie")

    def source_of(self, full: str, rel: str) -> str | None:
        """The file to copy for an entry (a link's target inside the download), None to skip it."""
        archive = self.archive
        try:
            lst = os.lstat(full)
        except FileNotFoundError:
            raise UnsafeArchiveError(f"{archive}: {rel!r} vanished during extraction") from None
        if stat.S_ISLNK(lst.st_mode):
            real = os.path.realpath(full)
            if not self.inside(real):
                raise UnsafeArchiveError(f"{archive}: link {rel!r} points outside the download; refusing it")
            if not os.path.isfile(real):
                why = "a folder" if os.path.isdir(real) else "nothing (a broken link or a link loop)"
                self.rep.skipped.append(f"{shown(rel)}: link to {why}")
                return None
            self.rep.links += 1
            return real
        if not stat.S_ISREG(lst.st_mode):
            raise UnsafeArchiveError(f"{archive}: {rel!r} is a device, fifo or other special file")
        return full

    def copy(self, source: str, rel: str) -> None:
        try:
            size = os.stat(source).st_size
            self.budget.add(size)
            clone_or_copy(Path(source), self.out / rel)
        except FileNotFoundError:
            raise UnsafeArchiveError(f"{self.archive}: {rel!r} vanished during extraction") from None
        except OSError as exc:
            raise UnsafeArchiveError(f"{self.archive}: {rel!r} cannot be copied ({exc.strerror or exc})") from None
        self.rep.files += 1
        self.rep.bytes += size


def _extract_folder(path: Path, out: Path, limits: ExtractLimits, rep: ItemReport) -> None:
    archive = shown(path.name)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise UnsafeArchiveError(f"{archive}: the download folder vanished before it could be extracted") from None
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeArchiveError(f"{archive}: the download is a symbolic link, not a folder; links are not followed")
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeArchiveError(f"{archive}: the download is not a folder any more")
    walk = _FolderWalk(path, out, limits, rep)
    for dirpath, dirs, files in os.walk(path, onerror=walk.unlistable):
        walk.prune_folder_links(dirpath, dirs)
        for n in sorted(files):
            full = os.path.join(dirpath, n)
            rel = os.path.relpath(full, path)
            walk.budget.member()
            source = walk.source_of(full, rel)
            if source is not None:
                walk.copy(source, rel)


_EXTRACTORS = {
    "zip": _extract_zip,
    "tar": _extract_tar,
    "tar.gz": _extract_tar,
    "tar.bz2": _extract_tar,
    "tar.xz": _extract_tar,
    "folder": _extract_folder,
}


def item_folders(items: list[DownloadItem]) -> list[tuple[DownloadItem, str]]:
    """Each download of a visit with the sub-folder of the raw folder it is extracted into, in
    extraction order (by name; a clash of safe names gets ``_`` appended)."""
    used: set[str] = set()
    out = []
    for item in sorted(items, key=lambda i: i.name):
        folder = safe_folder_name(item.stem)
        while folder in used:
            folder += "_"
        used.add(folder)
        out.append((item, folder))
    return out


def extract_visit(items: list[DownloadItem], target: Path, limits: ExtractLimits = ExtractLimits()) -> ExtractReport:
    """Extract the downloads of one visit into target (each item in its own sub-folder).

    All or nothing: on any error (an UnsafeArchiveError naming the download) target is left
    as it was."""
    if not items:
        raise UnsafeArchiveError(f"no download to extract into {target}")
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(target)  # a swap cut short by a crash: the old folder back, strays gone
    staging = temp_sibling(target)
    staging.mkdir()
    report = ExtractReport(target=str(target))
    try:
        for item, folder in item_folders(items):
            rep = ItemReport(item=shown(str(item.path)), kind=item.kind, folder=folder)
            out = staging / folder
            out.mkdir()
            extractor = _EXTRACTORS.get(item.kind)
            if extractor is None:
                raise UnsafeArchiveError(f"{shown(item.name)}: downloads of kind {item.kind!r} cannot be extracted")
            try:
                extractor(item.path, out, limits, rep)
            except OSError as exc:  # the last line: a filesystem error still names the download
                raise UnsafeArchiveError(f"{shown(item.name)}: extraction failed ({exc})") from None
            if not (rep.files or rep.links):
                rep.skipped.append(f"{shown(item.name)}: the download holds no file")
            report.items.append(rep)
        if not (report.files or any(i.links for i in report.items)):
            raise UnsafeArchiveError(
                f"{', '.join(shown(i.name) for i in items)}: the download holds no file (an empty archive, or "
                "folders only): nothing to extract for the visit; deliver the dump again")
        swap_dir(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return report
