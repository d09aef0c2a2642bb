"""Writing files so that nothing half-written is ever seen, and serializing writers.

Every file or folder the platform produces is built under a temporary sibling name
(``.<name>.tmp-<random>``, hidden, same filesystem) and renamed into place; writers of a
shared file (the curation status, the catalog, the superdataset) take an exclusive lock first.
A file goes into place with :func:`atomic_write`; a folder with :func:`swap_dir`, the one way
every step (extraction, organize, BIDS, DataLad) replaces a folder.

And the small file helpers the core modules share: whether a file changed (:func:`file_token`),
digests (of a file; of a stream, on a thread: :class:`BackgroundDigests`), and a file name as
printable text for messages and reports (:func:`printable`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import hashlib
import os
import re
import shutil
import sys
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path
from queue import Queue

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")  # C0, DEL, C1, line/paragraph separators
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_NOT_UTF8 = re.compile(r"[\ud800-\udfff]")


def printable(text: str | os.PathLike | bytes, *, controls: bool = True) -> str:
    """A file name, path (or tag value) as valid UTF-8 text for a message or a report: a byte
    that is not UTF-8 (kept by Python as a lone surrogate) is written ``\\xNN``.

    With ``controls`` (the organize report, one line per file) a control character (tab, CR,
    LF, ...) is written ``\\xNN`` too (``\\u2028`` for the line separators); without, control
    characters are left as they are (the names in the messages of the downloads, extraction and
    tarball steps; a name is no UTF-8 exactly when this changes it). Anything else is left as
    it is."""
    if not isinstance(text, str):
        text = os.fsdecode(text)
    if not (_UNPRINTABLE if controls else _NOT_UTF8).search(text):
        return text
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that is no escaped byte (a decoder's oddity)
        raw = text.encode("utf-8", "surrogatepass")
    text = raw.decode("utf-8", "backslashreplace")
    if not controls:
        return text
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100 else f"\\u{ord(m.group()):04x}",
                        text)


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


# --------------------------------------------------------------------------- folder swap
_OLD = ".old-"
_libc = None


def _exchange(a: Path, b: Path) -> bool:
    """Exchange two existing paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``, which
    Python's ``os`` does not expose, hence ctypes); False where the system or the filesystem
    has no such call (not Linux, an old glibc, EINVAL/ENOSYS/EOPNOTSUPP)."""
    global _libc
    if not sys.platform.startswith("linux"):
        return False
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    fn = getattr(_libc, "renameat2", None)
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a))


def _rename(src: Path, dst: Path) -> None:
    os.replace(src, dst)


def _remove(path: Path) -> None:
    """Remove a folder tree, or a file or link, whichever ``path`` is (gone already: nothing)."""
    if os.path.islink(path) or os.path.isfile(path):
        os.unlink(path)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _strays(target: Path) -> tuple[list[Path], list[Path]]:
    """The ``.<name>.tmp-*`` and ``.<name>.old-*`` siblings of ``target`` (folders a swap
    built or set aside)."""
    tmp, old = [], []
    try:
        names = os.listdir(target.parent)
    except (FileNotFoundError, NotADirectoryError):
        return tmp, old
    for n in names:
        if n.startswith(f".{target.name}.tmp-"):
            tmp.append(target.parent / n)
        elif n.startswith(f".{target.name}{_OLD}"):
            old.append(target.parent / n)
    return tmp, old


def recover_dir(target: Path, *, keep: Path | None = None) -> bool:
    """Put ``target`` back after a swap that was cut short, and clear what such swaps left.

    A swap without ``RENAME_EXCHANGE`` renames the old folder aside before renaming the new one
    in: a crash between the two leaves no ``target`` but ``.<name>.old-*`` beside it, which is
    renamed back here (the newest, if several). Every other ``.<name>.tmp-*`` / ``.old-*``
    sibling (a staging folder of a run that died, an old folder a swap did not get to remove)
    is removed, except ``keep`` (the caller's own staging folder). Call it only where no other
    writer swaps the same target at the same time (one run per visit; BIDS swaps under its
    lock). True when ``target`` was put back."""
    target = Path(target)
    tmp, old = _strays(target)
    restored = False
    if old and not (target.exists() or target.is_symlink()):
        newest = max(old, key=lambda p: p.lstat().st_mtime_ns)
        _rename(newest, target)
        old.remove(newest)
        restored = True
    for p in tmp + old:
        if keep is None or p != Path(keep):
            _remove(p)
    return restored


def swap_dir(staged: Path, target: Path) -> None:
    """Put the complete folder ``staged`` in place of ``target`` (made if missing).

    ``staged`` is on the same filesystem, normally ``temp_sibling(target)``. A reader of
    ``target`` sees the old folder or the new one, never a mixture and never nothing:

    * no ``target`` yet: one rename;
    * Linux: one ``renameat2(RENAME_EXCHANGE)``, then the old folder (now at ``staged``'s
      name) is removed; a crash before the removal leaves only a hidden stray;
    * elsewhere (or a filesystem without the flag): ``target`` is renamed to
      ``.<name>.old-<tag>``, ``staged`` to ``target``, the old one removed. A crash between the
      two renames leaves the old folder beside the missing ``target``; the next swap of the same
      target (or :func:`recover_dir`) renames it back first.

    Strays of earlier swaps of ``target`` are cleared first (:func:`recover_dir`)."""
    staged, target = Path(staged), Path(target)
    recover_dir(target, keep=staged)
    if not (target.exists() or target.is_symlink()):
        _rename(staged, target)
        return
    if _exchange(staged, target):
        _remove(staged)  # the old folder, at the staging name since the exchange
        return
    old = target.with_name(f".{target.name}{_OLD}{uuid.uuid4().hex[:8]}")
    _rename(target, old)
    _rename(staged, target)
    _remove(old)


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


class BackgroundDigests:
    """Digests of a stream computed on one thread while the caller reads or writes it: the visit
    tarball's sha256 as ``tarball._Writer`` writes it, its md5 and sha256 as
    ``metadata.describe_tarball`` reads it (the one design of both).

    The bytes go to the thread in batches, so it wakes once per batch, not once per 512-byte
    header or per file: :meth:`add` collects parts (bytes or memoryviews, not copied: the caller
    leaves them unchanged until hashed), :meth:`hand_over` gives the batch to the thread, with
    ``release`` (called on the thread once the batch is hashed) when its memory is to be reused,
    e.g. a read buffer back to its pool. With ``batch``, :meth:`add` hands over by itself every
    ``batch`` bytes. Each digest runs over the whole batch in turn (md5 over a MiB, then sha256
    over the same MiB, still in cache). At most ``depth`` batches wait: memory stays bounded when
    the caller is faster than the hashing. hashlib releases the GIL while it hashes more than
    2 KiB at once, so the thread's hashing and the caller's reading, writing and parsing overlap
    on two cores."""

    def __init__(self, *algorithms: str, batch: int | None = None, depth: int = 8) -> None:
        self.hashes = [hashlib.new(a) for a in algorithms]
        self.size = 0  # bytes added
        self._batch = batch
        self._parts: list = []
        self._pending = 0
        self._q: Queue = Queue(maxsize=depth)
        self._closed = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            parts, release = item
            for h in self.hashes:
                for p in parts:
                    h.update(p)
            if release is not None:
                release()

    def add(self, part) -> None:
        self._parts.append(part)
        n = len(part)
        self.size += n
        if self._batch is not None:
            self._pending += n
            if self._pending >= self._batch:
                self.hand_over()

    def extend(self, parts) -> None:
        """:meth:`add` of several parts (one call per written member, not per part)."""
        self._parts.extend(parts)
        n = sum(map(len, parts))
        self.size += n
        if self._batch is not None:
            self._pending += n
            if self._pending >= self._batch:
                self.hand_over()

    def hand_over(self, release=None) -> None:
        """The parts added since the last hand-over, to the thread (``release`` as above)."""
        self._q.put((self._parts, release))
        self._parts, self._pending = [], 0

    def close(self) -> list[str]:
        """Hash what is left, stop the thread; the hex digests, in the order of ``algorithms``.
        Called again (an error path after a successful close), it only returns them."""
        if not self._closed:
            self._closed = True
            if self._parts:
                self.hand_over()
            self._q.put(None)
            self._thread.join()
        return [h.hexdigest() for h in self.hashes]
