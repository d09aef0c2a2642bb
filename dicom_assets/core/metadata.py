"""Visit metadata, read from the tarball itself in one streaming pass.

``<visit>_metadata_tarball.json`` describes the archive, ``<visit>_metadata_dicoms.json``
every DICOM in it. Both are written atomically with sorted keys and a stable order, and
carry no wall-clock time, so they are as reproducible as the tarball. Schemas:
``dicom_assets/schemas/*.schema.json``.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .dicomscan import sniff
from .errors import DicomAssetsError
from .fasttags import KEYWORDS, parse_tags, read_tags
from .fsutil import BackgroundDigests, atomic_write
from .layout import dataset_tarball_path
from .tarball import BLOCK, ZERO_BLOCK

HEAD_BYTES = 1 << 20
TAG_BYTES = 16 << 10  # the tags sit in a header's first few KiB; the first MiB, then pydicom, if not
_BATCH = 1 << 20  # bytes handed to the hashing thread at once

DICOM_FIELDS = (
    "SeriesDescription",
    "SeriesNumber",
    "Modality",
    "MRAcquisitionType",
    "ProtocolName",
    "PulseSequenceName",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ImageType",
    "Manufacturer",
)
assert set(DICOM_FIELDS) <= set(KEYWORDS)
_CHUNK = 1 << 20


class TarFormatError(DicomAssetsError, ValueError):
    """The visit tarball is not a complete, well-formed POSIX tar (the message names it)."""


def _read_exact(fh, n: int) -> bytes:
    data = fh.read(n)
    if len(data) != n:
        raise TarFormatError(f"tarball ends early ({len(data)} of {n} bytes)")
    return data


def _num(field: bytes) -> int:
    text = field.rstrip(b"\x00 ").strip()
    return int(text, 8) if text else 0


def iter_tar(fh, on_bytes):
    """Stream a POSIX (ustar/pax/GNU long name) tarball: yield (name, size, mtime, typeflag,
    data) per member, and hand every byte read, headers included, to on_bytes. One read of
    each block, no copies: the archive's own digests and the members' come from the same bytes."""
    long_name: str | None = None
    while True:
        hdr = fh.read(BLOCK)
        if not hdr:
            return
        if len(hdr) != BLOCK:
            raise TarFormatError("tarball ends inside a header")
        on_bytes(hdr)
        if hdr == ZERO_BLOCK:
            return
        stored = _num(hdr[148:156])
        if stored != sum(hdr[:148]) + 256 + sum(hdr[156:]):
            raise TarFormatError("bad tar header checksum: not a tarball, or a damaged one")
        size, mtime, typeflag = _num(hdr[124:136]), _num(hdr[136:148]), hdr[156:157]
        padded = size + (-size % BLOCK)
        data = _read_exact(fh, padded) if padded else b""
        if data:
            on_bytes(data)
        if typeflag in (b"x", b"L"):
            if typeflag == b"L":
                long_name = data[:size].rstrip(b"\x00").decode("utf-8")
            else:
                for rec in data[:size].decode("utf-8").splitlines():
                    _len, _, kv = rec.partition(" ")
                    key, _, value = kv.partition("=")
                    if key == "path":
                        long_name = value
            continue
        name = hdr[0:100].rstrip(b"\x00")
        prefix = hdr[345:500].rstrip(b"\x00") if hdr[257:262] == b"ustar" else b""
        path = long_name or (prefix + b"/" + name if prefix else name).decode("utf-8")
        long_name = None
        yield path, size, mtime, typeflag, memoryview(data)[:size]


@dataclass
class VisitMetadata:
    tarball: dict
    dicoms: list[dict]
    member_names: set[str]  # every regular file of the tarball, as read in the same pass


def describe_tarball(tar_path: Path, *, visit: str, study: str, participant: str, session: str,
                     tool_version: str) -> VisitMetadata:
    """Read the tarball once: per-member md5/size/tags and the whole file's md5/sha256."""
    dicoms: list[dict] = []
    others: list[dict] = []
    names: set[str] = set()
    members = 0
    latest = 0
    try:
        fh = open(tar_path, "rb", buffering=0)
    except OSError as exc:
        raise TarFormatError(f"{tar_path}: the visit tarball cannot be read ({exc.strerror or exc})") from None
    # md5 and sha256 of the whole file on a thread (fsutil.BackgroundDigests, the tarball writer's
    # design too), handed over every MiB, while this thread hashes each member. What the writer
    # adds, a pool of reused read buffers, would not pay here: iter_tar's reads give fresh bytes
    # the thread can keep (nothing to give back), and this pass is bound by its two md5 (the whole
    # file's on the thread, each member's here), not by allocating its reads.
    hasher = BackgroundDigests("md5", "sha256", batch=_BATCH)  # started once the file is open
    on_bytes = hasher.add
    try:
        with fh:
            for name, msize, mtime, typeflag, data in iter_tar(fh, on_bytes):
                if typeflag not in (b"0", b"\x00"):
                    continue
                members += 1
                names.add(name)
                latest = max(latest, mtime)
                head = bytes(data[:TAG_BYTES])
                tags: dict | None = None
                # the organize step's own test of what may be DICOM (a preamble, or a data set
                # starting at a low group tag, little or big endian): one decision for both stages
                if sniff(head, msize) is None:
                    try:
                        tags = parse_tags(head)  # same tags as from more bytes, when it gives any
                        if tags is None:  # the first MiB, then pydicom on the whole member (e.g. deflated)
                            head = bytes(data[:HEAD_BYTES])
                            tags = read_tags(head, io.BytesIO(data) if len(data) > len(head) else None)
                    except Exception:  # a DICOM whose header cannot be parsed: still listed
                        tags = {k: None for k in KEYWORDS}
                if tags is None:  # a non-DICOM member (a TCIA annotation file): listed apart
                    others.append({"path": name, "md5": hashlib.md5(data).hexdigest(), "size": msize})
                    continue
                rec = {"path": name, "md5": hashlib.md5(data).hexdigest(), "size": msize}
                rec.update({k: tags.get(k) for k in DICOM_FIELDS})
                dicoms.append(rec)
            while True:  # the record padding after the end blocks belongs to the file too
                rest = fh.read(_CHUNK)
                if not rest:
                    break
                on_bytes(rest)
    except TarFormatError as exc:
        raise TarFormatError(f"{tar_path}: {exc}; materialize visit_tarball again") from None
    except UnicodeDecodeError as exc:
        raise TarFormatError(f"{tar_path}: a member name is not UTF-8 ({exc}); materialize visit_tarball again") from None
    finally:
        md5, sha256 = hasher.close()
    size = hasher.size
    dicoms.sort(key=lambda r: r["path"])
    tarball = {
        "visit": visit,
        "study_id": study,
        "participant_id": participant,
        "session_id": session,
        "size": size,
        "md5": md5,
        "sha256": sha256,
        "storepath": f"{study}/{Path(tar_path).name}",
        "dspath": dataset_tarball_path(Path(tar_path).name),
        "members": members,
        "dicoms": len(dicoms),
        "content_time": datetime.fromtimestamp(latest, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "tool": "dicom-assets",
        "tool_version": tool_version,
    }
    if others:  # only a tarball holding other files than DICOMs has the key
        tarball["annotations"] = sorted(others, key=lambda r: r["path"])
    return VisitMetadata(tarball, dicoms, names)


def dump_json(obj) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=True) + "\n").encode()


def write_json_atomic(path: Path, obj) -> None:
    with atomic_write(path, "wb", fsync=True) as fh:
        fh.write(dump_json(obj))


def write_metadata(meta: VisitMetadata, tarball_json: Path, dicoms_json: Path) -> None:
    write_json_atomic(dicoms_json, meta.dicoms)
    write_json_atomic(tarball_json, meta.tarball)
