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
import os
import tarfile
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .fasttags import KEYWORDS, read_tags
from .tarball import HEAD_BYTES, _Hasher

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


class _HashingReader(io.RawIOBase):
    """A file wrapper feeding every byte read to md5 and sha256 (on worker threads)."""

    def __init__(self, fh):
        self.fh = fh
        self.hasher = _Hasher()
        self.size = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self.fh.readinto(b)
        if n:
            self.hasher.update(bytes(b[:n]))
            self.size += n
        return n

    def read(self, n: int = -1) -> bytes:
        data = self.fh.read(n)
        if data:
            self.hasher.update(data)
            self.size += len(data)
        return data

    def drain(self) -> tuple[str, str, int]:
        while self.read(_CHUNK):
            pass
        md5, sha = self.hasher.close()
        return md5, sha, self.size


@dataclass
class VisitMetadata:
    tarball: dict
    dicoms: list[dict]


def _looks_dicom(head: bytes) -> bool:
    return len(head) >= 132 and head[128:132] == b"DICM"


def describe_tarball(tar_path: Path, *, visit: str, study: str, participant: str, session: str,
                     tool_version: str) -> VisitMetadata:
    """Read the tarball once: per-member md5/size/tags and the whole file's md5/sha256."""
    dicoms: list[dict] = []
    members = 0
    latest = 0
    with open(tar_path, "rb", buffering=0) as raw:
        reader = _HashingReader(raw)
        buffered = io.BufferedReader(reader, buffer_size=_CHUNK)
        with tarfile.open(fileobj=buffered, mode="r|") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                members += 1
                fh = tf.extractfile(m)
                h = hashlib.md5()
                head = fh.read(HEAD_BYTES)
                h.update(head)
                for chunk in iter(lambda: fh.read(_CHUNK), b""):
                    h.update(chunk)
                latest = max(latest, int(m.mtime))
                tags: dict | None = None
                if _looks_dicom(head) or head[:4] in (b"\x08\x00\x05\x00", b"\x08\x00\x08\x00"):
                    try:
                        tags = read_tags(head)
                    except Exception:  # a DICOM whose header cannot be parsed: still listed
                        tags = {k: None for k in KEYWORDS}
                if tags is None:
                    continue  # a non-DICOM member is counted but not described
                rec = {"path": m.name, "md5": h.hexdigest(), "size": m.size}
                rec.update({k: tags.get(k) for k in DICOM_FIELDS})
                dicoms.append(rec)
        md5, sha256, size = reader.drain()
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
        "dspath": f"icf/{Path(tar_path).name}",
        "members": members,
        "dicoms": len(dicoms),
        "content_time": datetime.fromtimestamp(latest, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "tool": "dicom-assets",
        "tool_version": tool_version,
    }
    return VisitMetadata(tarball, dicoms)


def dump_json(obj) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=True) + "\n").encode()


def write_json_atomic(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(dump_json(obj))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_metadata(meta: VisitMetadata, tarball_json: Path, dicoms_json: Path) -> None:
    write_json_atomic(dicoms_json, meta.dicoms)
    write_json_atomic(tarball_json, meta.tarball)


def md5_file(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def tar_member_names(path: Path) -> set[str]:
    with tarfile.open(path, "r:") as tf:
        return {m.name for m in tf.getmembers() if m.isfile()}
