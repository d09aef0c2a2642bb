"""Safe extraction of scanner dumps into ``scratch/raw_dicoms/<session>/<participant>/``.

* no member may land outside the target: absolute paths, ``..`` components, and links
  pointing out are refused (the whole archive, with the member named);
* device files and fifos are refused; total size and member count are bounded, and so is
  a zip member's compression ratio (zip bombs are refused before anything is written);
* sizes are counted while writing too, so an archive lying about its sizes is caught;
* everything is extracted into a temporary sibling folder, then swapped in with a rename:
  a crash never leaves a half folder that looks complete, and the old one stays until the
  new one is whole;
* folders are hard-linked (or copied across filesystems), never moved: downloads stay.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tarfile
import uuid
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from .downloads import DownloadItem, safe_folder_name
from .errors import UnsafeArchiveError
from .fsutil import temp_sibling

_DRIVE = re.compile(r"^[A-Za-z]:")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ExtractLimits:
    max_bytes: int = 64 * 1024**3
    max_members: int = 200_000
    max_ratio: int = 1000

    @classmethod
    def from_config(cls, limits: dict) -> "ExtractLimits":
        return cls(limits["max_extract_bytes"], limits["max_members"], limits["max_compression_ratio"])


@dataclass
class ItemReport:
    item: str
    kind: str
    folder: str
    files: int = 0
    bytes: int = 0
    links: int = 0


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
    return PurePosixPath(*parts)


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
        if self.bytes > self.limits.max_bytes:
            raise UnsafeArchiveError(
                f"{self.archive}: extracts to more than {self.limits.max_bytes} bytes; refusing the archive "
                "as a possible zip bomb (raise limits.max_extract_bytes if this is a real dump)")


def _copy_stream(src, dest: Path, budget: _Budget, declared: int | None, archive: str, name: str) -> int:
    dest.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with open(dest, "xb") as fo:
        while True:
            chunk = src.read(_CHUNK)
            if not chunk:
                break
            written += len(chunk)
            if declared is not None and written > declared:
                raise UnsafeArchiveError(f"{archive}: member {name!r} is larger than its header declares; refusing the archive")
            budget.add(len(chunk))
            fo.write(chunk)
    os.chmod(dest, 0o644)
    return written


def _extract_zip(path: Path, out: Path, limits: ExtractLimits, rep: ItemReport) -> None:
    archive = path.name
    budget = _Budget(limits, archive)
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise UnsafeArchiveError(f"{archive}: not a readable zip file ({exc}); is the download complete?") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > limits.max_members:
            budget.members = len(infos) - 1
            budget.member()
        declared = sum(i.file_size for i in infos)
        if declared > limits.max_bytes:
            raise UnsafeArchiveError(
                f"{archive}: declares {declared} bytes once extracted, over the limit of {limits.max_bytes}; "
                "refusing the archive as a possible zip bomb")
        for info in infos:
            rel = safe_member_path(info.filename, archive)
            ratio = info.file_size / max(info.compress_size, 1)
            if info.file_size > (1 << 20) and ratio > limits.max_ratio:
                raise UnsafeArchiveError(
                    f"{archive}: member {info.filename!r} expands {ratio:.0f}x (limit {limits.max_ratio}x); "
                    "refusing the archive as a possible zip bomb")
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise UnsafeArchiveError(f"{archive}: member {info.filename!r} is a symbolic link; refusing the archive")
        for info in infos:
            rel = safe_member_path(info.filename, archive)
            if rel is None or info.is_dir():
                if rel is not None:
                    (out / rel).mkdir(parents=True, exist_ok=True)
                continue
            budget.member()
            try:
                with zf.open(info) as src:
                    rep.bytes += _copy_stream(src, out / rel, budget, info.file_size, archive, info.filename)
            except (zipfile.BadZipFile, EOFError, OSError) as exc:
                if isinstance(exc, FileExistsError):
                    raise UnsafeArchiveError(f"{archive}: member {info.filename!r} appears twice") from None
                raise UnsafeArchiveError(f"{archive}: member {info.filename!r} cannot be read ({exc}); "
                                         "is the download complete?") from None
            rep.files += 1


def _extract_tar(path: Path, out: Path, limits: ExtractLimits, rep: ItemReport) -> None:
    archive = path.name
    budget = _Budget(limits, archive)
    links: list[tuple[PurePosixPath, PurePosixPath, bool]] = []
    try:
        tf = tarfile.open(path, mode="r|*")
    except (tarfile.TarError, OSError) as exc:
        raise UnsafeArchiveError(f"{archive}: not a readable tar file ({exc}); is the download complete?") from None
    try:
        with tf:
            for m in tf:
                rel = safe_member_path(m.name, archive)
                if rel is None:
                    continue
                budget.member()
                if m.isdir():
                    (out / rel).mkdir(parents=True, exist_ok=True)
                elif m.isreg():
                    src = tf.extractfile(m)
                    try:
                        rep.bytes += _copy_stream(src, out / rel, budget, m.size, archive, m.name)
                    except FileExistsError:
                        raise UnsafeArchiveError(f"{archive}: member {m.name!r} appears twice") from None
                    rep.files += 1
                elif m.issym() or m.islnk():
                    if m.issym():
                        target = _link_target_inside(rel, m.linkname, archive, m.name)
                    else:
                        target = safe_member_path(m.linkname, archive)
                        if target is None:
                            raise UnsafeArchiveError(f"{archive}: hard link {m.name!r} has no target")
                    links.append((rel, target, m.issym()))
                else:
                    raise UnsafeArchiveError(
                        f"{archive}: member {m.name!r} is a device, fifo or other special file; refusing the archive")
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        if isinstance(exc, UnsafeArchiveError):
            raise
        raise UnsafeArchiveError(f"{archive}: the archive is damaged or incomplete ({exc}); "
                                 "is the download complete?") from None
    for rel, target, is_sym in links:
        src = out / target
        if not src.is_file() or src.is_symlink():
            raise UnsafeArchiveError(f"{archive}: link {str(rel)!r} -> {str(target)!r} does not name a file of the archive")
        dest = out / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if is_sym:
            os.symlink(os.path.relpath(src, dest.parent), dest)
        else:
            os.link(src, dest)
        rep.links += 1


def _link_or_copy(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)


def _extract_folder(path: Path, out: Path, limits: ExtractLimits, rep: ItemReport) -> None:
    archive = path.name
    budget = _Budget(limits, archive)
    base = path.resolve()
    for dirpath, dirs, names in os.walk(path):
        dirs.sort()
        for d in list(dirs):
            full = Path(dirpath) / d
            if full.is_symlink():
                dirs.remove(d)
                resolved = full.resolve()
                if base not in resolved.parents and resolved != base:
                    raise UnsafeArchiveError(f"{archive}: folder link {str(full.relative_to(path))!r} points outside "
                                             "the download; refusing it")
        for n in sorted(names):
            full = Path(dirpath) / n
            rel = full.relative_to(path)
            budget.member()
            if full.is_symlink():
                resolved = full.resolve()
                if base not in resolved.parents:
                    raise UnsafeArchiveError(f"{archive}: link {str(rel)!r} points outside the download; refusing it")
                if not resolved.is_file():
                    continue
                full = resolved
                rep.links += 1
            elif not full.is_file():
                raise UnsafeArchiveError(f"{archive}: {str(rel)!r} is a device, fifo or other special file")
            size = full.stat().st_size
            budget.add(size)
            _link_or_copy(full, out / rel)
            rep.files += 1
            rep.bytes += size


_EXTRACTORS = {
    "zip": _extract_zip,
    "tar": _extract_tar,
    "tar.gz": _extract_tar,
    "tar.bz2": _extract_tar,
    "folder": _extract_folder,
}


def _cleanup_strays(parent: Path, name: str) -> None:
    if not parent.exists():
        return
    for p in parent.iterdir():
        if p.name.startswith(f".{name}.tmp-") or p.name.startswith(f".{name}.old-"):
            shutil.rmtree(p, ignore_errors=True)


def replace_dir_atomically(staging: Path, target: Path) -> None:
    """Swap a complete staging folder in place of target; the old one stays until then."""
    old = None
    if target.exists() or target.is_symlink():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(target, old)
    os.replace(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def extract_visit(items: list[DownloadItem], target: Path, limits: ExtractLimits = ExtractLimits()) -> ExtractReport:
    """Extract the downloads of one visit into target (each item in its own sub-folder)."""
    if not items:
        raise UnsafeArchiveError(f"no download to extract into {target}")
    target.parent.mkdir(parents=True, exist_ok=True)
    _cleanup_strays(target.parent, target.name)
    staging = temp_sibling(target)
    staging.mkdir()
    report = ExtractReport(target=str(target))
    try:
        used: set[str] = set()
        for item in sorted(items, key=lambda i: i.name):
            folder = safe_folder_name(item.stem)
            while folder in used:
                folder += "_"
            used.add(folder)
            rep = ItemReport(item=str(item.path), kind=item.kind, folder=folder)
            out = staging / folder
            out.mkdir()
            _EXTRACTORS[item.kind](item.path, out, limits, rep)
            report.items.append(rep)
        replace_dir_atomically(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return report
