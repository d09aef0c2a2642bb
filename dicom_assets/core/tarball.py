"""The reproducible visit tarball: same DICOM content -> same bytes, on any machine.

Format (written by this module, byte by byte, so no Python version can change it):

* POSIX ustar headers; a pax extended header (``x``) only for a path longer than ustar
  allows, whose bytes depend on the path alone;
* members sorted by path under one top folder named after the visit, folder first;
* uid/gid 0, uname/gname ``root``, mode 0644 (folders 0755), device fields empty;
* mtime (integer seconds) = the file's own StudyDate+StudyTime, falling back to
  AcquisitionDate/Time, then SeriesDate/Time, **interpreted as UTC** (the machine's time
  zone never enters); fractional seconds are dropped; a date without a time is midnight;
  files without any date get the latest DICOM time of the visit; folders too; a visit
  without any date at all gets 0 (1970-01-01); a date before 1970 is clamped to 0 and one
  past the ustar field's range (2242-03-16T12:56:31Z, ``MAX_MTIME``) to that maximum, so
  any date gives a valid, reproducible header;
* the archive ends with two zero blocks, padded to a 10240-byte record as GNU tar does.

The file is written to a temporary file in the same folder, fsynced, then renamed over
the previous tarball, which stays untouched until the new one is complete.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from queue import Queue

from .dicomscan import walk_files
from .errors import OrganizedFolderError, TarballError
from .fasttags import DATE_TAGS_END, parse_tags, read_tags
from .fsutil import BackgroundDigests, printable, temp_sibling
from .organize import read_annotations

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
RECORD = 10240
HEAD_BYTES = 64 << 10  # header tags are parsed from the first 64 KiB (pydicom beyond that)
_CHUNK = 1 << 20
MAX_MTIME = 8**11 - 1  # the largest value of ustar's 12-byte octal mtime field: 2242-03-16T12:56:31Z


def clamp_mtime(ts: int | None) -> int | None:
    """A DICOM time as a tar mtime: before 1970 -> 0, past ``MAX_MTIME`` -> ``MAX_MTIME``."""
    return None if ts is None else min(max(ts, 0), MAX_MTIME)


def dicom_datetime(tags: dict) -> int | None:
    """Seconds since the epoch (UTC) from Study, else Acquisition, else Series date/time."""
    for d_kw, t_kw in (("StudyDate", "StudyTime"), ("AcquisitionDate", "AcquisitionTime"),
                       ("SeriesDate", "SeriesTime")):
        ts = parse_da_tm(tags.get(d_kw), tags.get(t_kw))
        if ts is not None:
            return ts
    return None


def parse_da_tm(da: str | None, tm: str | None) -> int | None:
    """DICOM DA (YYYYMMDD) + TM (HHMMSS.ffffff, HH:MM:SS, partial) -> UTC epoch seconds."""
    if not da:
        return None
    da = da.strip().replace("-", "").replace(".", "")
    if len(da) != 8 or not (da.isascii() and da.isdigit()):  # not "²": str.isdigit() takes it
        return None
    hh = mm = ss = 0
    if tm:
        t = tm.strip().split(".")[0].replace(":", "")
        if t.isascii() and t.isdigit() and len(t) in (2, 4, 6):
            hh = int(t[0:2])
            mm = int(t[2:4]) if len(t) >= 4 else 0
            ss = int(t[4:6]) if len(t) >= 6 else 0
            if ss == 60:  # leap second, allowed by DICOM
                ss = 59
        # an invalid time keeps the date at midnight rather than failing
    try:
        dt = datetime(int(da[0:4]), int(da[4:6]), int(da[6:8]), hh, mm, ss, tzinfo=timezone.utc)
    except ValueError:
        try:
            dt = datetime(int(da[0:4]), int(da[4:6]), int(da[6:8]), tzinfo=timezone.utc)
        except ValueError:
            return None
    return int(dt.timestamp())


def _octal(value: int, width: int) -> bytes:
    s = format(value, "o").encode()
    if len(s) > width - 1:
        raise ValueError(f"{value} does not fit an octal field of {width} bytes")
    return s.rjust(width - 1, b"0") + b"\x00"


def _field(text: bytes, width: int) -> bytes:
    return text[:width].ljust(width, b"\x00")


def _split_ustar(path: bytes) -> tuple[bytes, bytes] | None:
    if len(path) <= 100:
        return b"", path
    for i in range(len(path) - 1, 0, -1):
        if path[i:i + 1] == b"/" and i <= 155 and len(path) - i - 1 <= 100:
            return path[:i], path[i + 1:]
    return None


def _header(name: bytes, prefix: bytes, size: int, mtime: int, mode: int, typeflag: bytes) -> bytes:
    h = bytearray(BLOCK)
    h[0:100] = _field(name, 100)
    h[100:108] = _octal(mode, 8)
    h[108:116] = _octal(0, 8)
    h[116:124] = _octal(0, 8)
    h[124:136] = _octal(size, 12)
    h[136:148] = _octal(clamp_mtime(mtime), 12)
    h[148:156] = b" " * 8
    h[156:157] = typeflag
    h[257:263] = b"ustar\x00"
    h[263:265] = b"00"
    h[265:297] = _field(b"root", 32)
    h[297:329] = _field(b"root", 32)
    h[345:500] = _field(prefix, 155)
    chksum = sum(h)
    h[148:156] = format(chksum, "06o").encode() + b"\x00 "
    return bytes(h)


def _pax_record(key: str, value: str) -> bytes:
    body = f" {key}={value}\n".encode()
    n = len(body)
    while True:
        rec = str(n).encode() + body
        if len(rec) == n:
            return rec
        n = len(rec)


def member_headers(path: str, size: int, mtime: int, mode: int, typeflag: bytes) -> bytes:
    """The header block(s) of one member: ustar, with a pax header for a too-long path."""
    raw = path.encode("utf-8")
    split = _split_ustar(raw) if raw.isascii() else None
    if split is not None:
        prefix, name = split
        return _header(name, prefix, size, mtime, mode, typeflag)
    pax = _pax_record("path", path)
    out = _header(b"PaxHeader/" + raw[-80:].split(b"/")[-1][:80], b"", len(pax), mtime, 0o644, b"x")
    out += pax + b"\x00" * (-len(pax) % BLOCK)
    return out + _header(raw[:100], b"", size, mtime, mode, typeflag)


@dataclass
class Member:
    source: Path
    arcname: str  # path inside the tar
    size: int
    mtime: int | None  # from the file's DICOM header; None when it has no date


@dataclass
class TarballResult:
    path: str
    size: int
    sha256: str
    members: int
    dicoms_with_time: int
    content_time: int  # latest DICOM time of the visit (UTC epoch seconds)
    md5: str | None = None  # only when asked for (``write_tarball(md5=True)``), from the same pass


def _unreadable(src: Path, exc: OSError, when: str) -> TarballError:
    what = "is a broken link or vanished" if isinstance(exc, FileNotFoundError) else \
        f"cannot be read ({exc.strerror or exc})"
    return TarballError(f"{printable(src, controls=False)}: the organized file {what} {when}; "
                        "materialize organized_dicoms again")


SCAN_BYTES = 16 << 10  # a file's dates sit in its first few hundred bytes; 64 KiB, then pydicom, if not


def scan_members(files: list[tuple[Path, str]]) -> list[Member]:
    """Size and DICOM time of each (source, arcname); reads only each file's first 16 KiB
    (64 KiB, then pydicom, for a header the fast reader cannot date from those).

    A file that cannot be opened (a broken link, a vanished file) is an error naming it,
    never a silently missing member."""
    members = []
    for src, arc in files:
        try:
            fd = os.open(src, os.O_RDONLY)  # follows symlinks: the content, not the link
        except OSError as exc:
            raise _unreadable(src, exc, "while listing the tarball's members") from None
        try:
            size = os.fstat(fd).st_size
            head = os.read(fd, SCAN_BYTES)
            try:
                tags = parse_tags(head, DATE_TAGS_END)
                if tags is None:
                    head = os.pread(fd, HEAD_BYTES, 0)
                    with open(fd, "rb", closefd=False) as fh:
                        tags = read_tags(head, fh, last=DATE_TAGS_END)
                mtime = clamp_mtime(dicom_datetime(tags))
            except Exception:
                mtime = None  # not a DICOM we can date: gets the visit's latest time
        finally:
            os.close(fd)
        members.append(Member(src, arc, size, mtime))
    return members


class _Writer:
    """Writes the members to ``fd``, one ``writev`` per member (header, content, padding),
    and hashes the same bytes on a thread (:class:`~.fsutil.BackgroundDigests`, the design
    ``metadata.describe_tarball`` hashes the tarball with too).

    Content is read (``readv``) into a few reused 1 MiB buffers, several small files one after
    the other in one buffer (no allocation per file, memory bounded whatever the file sizes, a
    large file in buffer-sized pieces); a full buffer goes to the hashing thread and back to the
    pool once hashed (the hand-over's ``release``), so the thread wakes once per buffer, not once
    per file. One read of each file's bytes, then one write. (The metadata pass needs no pool:
    its reads give fresh bytes, and its two md5, not its reads, bound it.)"""

    def __init__(self, fd: int, buffers: int = 4, algorithms: tuple[str, ...] = ("sha256",)) -> None:
        self.fd = fd
        self._free: Queue = Queue()
        for _ in range(buffers):
            self._free.put(bytearray(_CHUNK))
        self._digests = BackgroundDigests(*algorithms)  # handed over per buffer, by _flush
        self._buf = self._free.get()
        self._used = 0

    @property
    def total(self) -> int:
        """Bytes written."""
        return self._digests.size

    def _write(self, parts) -> None:
        views = [memoryview(p) for p in parts if len(p)]
        while views:
            n = os.writev(self.fd, views)
            while views and n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            if views and n:
                views[0] = views[0][n:]
        self._digests.extend(parts)

    def _flush(self) -> None:
        """Hand the current buffer (and the headers written with it) to the hashing thread; the
        buffer goes back to the pool once hashed."""
        self._digests.hand_over(release=partial(self._free.put, self._buf))
        self._buf = self._free.get()
        self._used = 0

    def emit(self, *parts: bytes) -> None:
        """Bytes in hand (headers, padding)."""
        self._write(parts)

    def member(self, m: Member, header: bytes) -> None:
        """One member: its header, the content of ``m.source`` (exactly ``m.size`` bytes, one
        byte more asked at the end so that a file that grew shows) and its padding."""
        try:
            src = os.open(m.source, os.O_RDONLY)
        except OSError as exc:
            raise _unreadable(m.source, exc, "while being archived") from None
        try:
            copied = 0
            while True:
                if len(self._buf) - self._used < min(m.size - copied + 1, _CHUNK // 4):
                    self._flush()  # too little room left: a fresh buffer (a large file: piece by piece)
                view = memoryview(self._buf)
                start = self._used
                want = start + min(len(self._buf) - start, m.size - copied + 1)
                end = start
                while end < want:
                    n = os.readv(src, [view[end:want]])
                    if not n:
                        break
                    end += n
                got = end - start
                copied += got
                if copied > m.size:
                    raise TarballError(f"{m.source} grew while being archived")
                last = end < want  # the end of the file
                if last and copied != m.size:
                    raise TarballError(f"{m.source} changed size while being archived ({m.size} -> {copied})")
                self._used = end
                self._write((header, view[start:end], ZERO_BLOCK[:-m.size % BLOCK] if last else b""))
                header = b""
                if last:
                    return
        finally:
            os.close(src)

    def close(self) -> list[str]:
        """The digests (hex) of the bytes written, in the order of ``algorithms``."""
        self._buf = None
        return self._digests.close()


def write_tarball(files: list[tuple[Path, str]], dest: Path, top: str, *, md5: bool = False,
                  fail_after: int | None = None) -> TarballResult:
    """Write the reproducible tarball of files (source path, path under ``top``) to dest.

    ``md5``: its md5 too, hashed from the same bytes as its sha256 (no second read).
    ``fail_after`` raises after that many members (a test hook simulating a crash).
    """
    members = sorted(scan_members(files), key=lambda m: m.arcname)
    times = [m.mtime for m in members if m.mtime is not None]
    latest = max(times) if times else 0
    dest.parent.mkdir(parents=True, exist_ok=True)
    for stray in dest.parent.glob(f".{dest.name}.tmp-*"):
        stray.unlink(missing_ok=True)
    tmp = temp_sibling(dest)  # written with writev, fsynced, renamed below (not atomic_write: the dir fsync)
    writer = None  # the visit tarball's md5 comes with the metadata pass, which reads it anyway
    try:
        with open(tmp, "wb", buffering=0) as out:
            writer = _Writer(out.fileno(), algorithms=("sha256", "md5") if md5 else ("sha256",))
            writer.emit(member_headers(top.rstrip("/") + "/", 0, latest, 0o755, b"5"))
            for i, m in enumerate(members):
                if fail_after is not None and i == fail_after:
                    raise RuntimeError(f"simulated crash after {i} members")
                writer.member(m, member_headers(f"{top}/{m.arcname}", m.size,
                                                m.mtime if m.mtime is not None else latest, 0o644, b"0"))
            end = 2 * BLOCK
            end += -(writer.total + end) % RECORD
            writer.emit(bytes(end))
            os.fsync(out.fileno())
        digests = writer.close()
        total = writer.total
        os.replace(tmp, dest)
        dir_fd = os.open(dest.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return TarballResult(str(dest), total, digests[0], len(members), len(times), latest,
                         digests[1] if md5 else None)


def organized_files(dicom_dir: Path, expected: list[str] | None = None) -> list[tuple[Path, str]]:
    """The files of an organized visit folder as (path, name) pairs, sorted.

    Every entry must be a regular file or a link to one: a broken link, a link to a folder
    or a sub-folder is an :class:`OrganizedFolderError` naming it, never skipped. With
    ``expected`` (the names the organize report says were kept, an independent source) the
    folder must hold exactly those names."""
    try:
        entries = sorted(os.scandir(dicom_dir), key=lambda e: e.name)
    except OSError as exc:
        raise OrganizedFolderError(f"{printable(dicom_dir, controls=False)}: the organized DICOM folder cannot be "
                                   f"listed ({exc.strerror or exc})") from None
    out = []
    for e in entries:
        p = Path(e.path)
        try:
            ok = e.is_file()  # follows links
        except OSError:
            ok = False
        if not ok:
            if e.is_symlink():
                what = (f"a broken link (to {printable(os.readlink(p), controls=False)!r})" if not p.exists()
                        else "a link to something else than a file")
            else:
                what = "a folder" if e.is_dir(follow_symlinks=False) else "not a regular file"
            raise OrganizedFolderError(f"{printable(p, controls=False)}: {what} in the organized DICOM folder; its "
                                       "DICOM would be missing from the tarball; materialize raw_dicoms and "
                                       "organized_dicoms again")
        if printable(e.name, controls=False) != e.name:  # changed exactly when the name is no UTF-8
            raise OrganizedFolderError(f"{printable(p, controls=False)}: a name that is not UTF-8 in the organized "
                                       "DICOM folder (organize writes <SOPInstanceUID>.dcm names only)")
        out.append((p, e.name))
    if expected is not None:
        names = {n for _, n in out}
        missing = sorted(set(expected) - names)
        extra = sorted(names - set(expected))
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"{len(missing)} kept file(s) missing (first {missing[0]!r})")
            if extra:
                parts.append(f"{len(extra)} file(s) the report does not list (first {extra[0]!r})")
            raise OrganizedFolderError(f"{printable(dicom_dir, controls=False)}: the organized folder disagrees with "
                                       "the organize report: " + "; ".join(parts)
                                       + "; materialize organized_dicoms again")
    return out


#: where a visit's annotation files go in its tarball (and its DataLad dataset):
#: ``<visit>/annotations/<SeriesInstanceUID>/<name>``, beside the flat DICOMs
ANNOTATIONS_ARC = "annotations"


def annotation_members(notes_dir: Path, report_path: Path) -> list[tuple[Path, str]]:
    """The visit's annotation files as (path, name in the tarball), checked against the paths
    the organize report (``report_path``) lists: a missing, extra or unreadable file is an
    :class:`OrganizedFolderError` naming it, never a tarball without it."""
    expected = read_annotations(report_path)
    errors: list[tuple[str, str]] = []
    present = notes_dir.is_dir()
    files = walk_files(notes_dir, errors) if present else []
    if errors:
        rel, why = errors[0]
        raise OrganizedFolderError(f"{printable(notes_dir / rel, controls=False)}: {why} in the annotations folder; "
                                   "materialize organized_dicoms again")
    found = {rel: path for path, rel in files}
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or extra:
        what = (f"{len(missing)} annotation file(s) the organize report lists are missing (first {missing[0]!r})"
                if missing else f"{len(extra)} file(s) the organize report does not list (first {extra[0]!r})")
        raise OrganizedFolderError(f"{printable(notes_dir, controls=False)}: {what}; materialize organized_dicoms "
                                   "again")
    return [(found[rel], f"{ANNOTATIONS_ARC}/{rel}") for rel in sorted(found)]
