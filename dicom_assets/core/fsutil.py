"""Writing files so that nothing half-written is ever seen, and serializing writers.

Every file or folder the platform produces is built under a temporary sibling name
(``.<name>.tmp-<random>``, hidden, same filesystem) and renamed into place; writers of a
shared file (the curation status, the catalog, the superdataset) take an exclusive lock first.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import uuid
from contextlib import contextmanager
from pathlib import Path


def temp_sibling(path: Path) -> Path:
    """A hidden temporary name beside ``path`` (``.<name>.tmp-<8 hex>``)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")


@contextmanager
def atomic_write(path: Path, mode: str = "w", *, fsync: bool = False, **open_kw):
    """Open a temporary sibling for writing; on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        with open(tmp, mode, **open_kw) as fh:
            yield fh
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def file_lock(lock_path: Path):
    """An exclusive lock held while the block runs (``fcntl.flock`` on ``lock_path``)."""
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


NO_FILE = "-"  # the file_token of a path where there is no file


def file_token(path: Path) -> str:
    """What tells that a file changed, as one string: ``<size>:<mtime_ns>:<inode>`` (a rewrite
    in place moves the size or the mtime, a replacement by rename the inode), :data:`NO_FILE`
    when there is no file. One stat, links followed; the file is not read."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return NO_FILE
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"


def file_digest(path: Path, algo: str = "sha256") -> str:
    """The hex digest of a file's content (read in 1 MiB blocks by hashlib)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, algo).hexdigest()


def tree_digests(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` by relative POSIX path (links followed); {} when
    ``root`` is not a folder."""
    root = Path(root)
    out: dict[str, str] = {}
    for dirpath, _dirs, names in os.walk(root):
        for n in names:
            p = Path(dirpath) / n
            out[p.relative_to(root).as_posix()] = file_digest(p)
    return out
