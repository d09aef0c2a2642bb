"""TCIA manifests as a source of visits: parse, download through the NBIA REST API, group.

A ``.tcia`` manifest (as The Cancer Imaging Archive's portal exports it) is a ``key=value``
header block (``downloadServerUrl``, ``includeAnnotation``, ``noOfrRetry``, ``databasketId``,
``manifestVersion``) ended by ``ListOfSeriesToDownload=``, then one SeriesInstanceUID per
line. The CSV form some exports use has ``study_instance_uid`` and ``series_instance_uid``
columns. Either becomes a :class:`TciaManifest`.

Each series is downloaded as the zip NBIA's ``getImage`` returns, into
``<work>/series/<SeriesInstanceUID>.zip``, verified (file count against ``ImageCount``, md5 of
each file when the zip carries NBIA's ``md5hashes.csv``) and recorded in
``<work>/series/<uid>.json``: a verified series is never downloaded again (resume).

Visits are one per (PatientID, StudyInstanceUID), read from the downloaded DICOM headers.
Labels follow the XNAT-TCIA convention and do not depend on download order: the studies of a
patient sorted by StudyDate, StudyTime, then StudyInstanceUID are labelled ``<PatientID>``,
``<PatientID>_01``, ``<PatientID>_02``, ...; the visit is ``<participant>_ses-<n>``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import DicomAssetsError
from .fasttags import read_tags
from .fsutil import atomic_write
from .ids import normalize_participant_id

UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
LIST_KEY = "ListOfSeriesToDownload"
DEFAULT_API = "https://services.cancerimagingarchive.net/nbia-api/services/v1"
RESOLVED_COLUMNS = ("SeriesInstanceUID", "PatientID", "StudyInstanceUID", "visit", "session_label")


class TciaManifestError(DicomAssetsError):
    """A manifest that cannot be read; the message names the file and the line."""


class TciaDownloadError(DicomAssetsError):
    """A series that could not be downloaded or verified."""


@dataclass(frozen=True)
class TciaManifest:
    path: str
    series: tuple[str, ...]
    header: dict = field(default_factory=dict)
    study_of: dict = field(default_factory=dict)  # series -> study, when the manifest says (CSV form)


def _check_uid(path, line_no: int, uid: str, seen: dict[str, int]) -> None:
    if len(uid) > 64 or not UID.match(uid):
        raise TciaManifestError(f"{path}: line {line_no}: {uid[:80]!r} is not a DICOM UID")
    if uid in seen:
        raise TciaManifestError(f"{path}: line {line_no}: series {uid} already listed on line {seen[uid]}")
    seen[uid] = line_no


def parse_manifest(path: Path | str) -> TciaManifest:
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise TciaManifestError(f"{path}: cannot read the manifest: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise TciaManifestError(f"{path}: not a text file (UTF-8)") from None
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    first = next((ln.strip() for ln in lines if ln.strip()), "")
    if "series_instance_uid" in first.lower().split(","):
        return _parse_csv(path, text)
    header: dict[str, str] = {}
    series: list[str] = []
    seen: dict[str, int] = {}
    in_list = False
    for n, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not in_list:
            key, eq, value = line.partition("=")
            if not eq:
                raise TciaManifestError(f"{path}: line {n}: expected 'key=value' in the header or "
                                        f"'{LIST_KEY}=', found {line[:80]!r}")
            if key.strip() == LIST_KEY:
                in_list = True
                continue
            header[key.strip()] = value.strip()
            continue
        _check_uid(path, n, line, seen)
        series.append(line)
    if not in_list:
        raise TciaManifestError(f"{path}: no '{LIST_KEY}=' line: not a TCIA manifest")
    if not series:
        raise TciaManifestError(f"{path}: the manifest lists no series")
    return TciaManifest(str(path), tuple(series), header)


def _parse_csv(path: Path, text: str) -> TciaManifest:
    reader = csv.DictReader(io.StringIO(text))
    cols = {c.strip().lower(): c for c in reader.fieldnames or []}
    if "series_instance_uid" not in cols:
        raise TciaManifestError(f"{path}: CSV manifest without a 'series_instance_uid' column")
    series, study_of, seen = [], {}, {}
    for n, row in enumerate(reader, 2):
        uid = (row.get(cols["series_instance_uid"]) or "").strip()
        if not uid:
            raise TciaManifestError(f"{path}: line {n}: empty series_instance_uid")
        _check_uid(path, n, uid, seen)
        series.append(uid)
        if "study_instance_uid" in cols:
            study = (row.get(cols["study_instance_uid"]) or "").strip()
            if study and not UID.match(study):
                raise TciaManifestError(f"{path}: line {n}: {study[:80]!r} is not a DICOM UID")
            if study:
                study_of[uid] = study
    if not series:
        raise TciaManifestError(f"{path}: the manifest lists no series")
    return TciaManifest(str(path), tuple(series), {}, study_of)


# ---------------------------------------------------------------------------------- client
class NbiaClient:
    """The NBIA REST API (v1 paths): ``getSeries`` for metadata, ``getImage`` for a zip."""

    def __init__(self, base_url: str = DEFAULT_API, *, retries: int = 4, backoff: float = 1.0, timeout: float = 120,
                 sleep=time.sleep):
        self.base = base_url.rstrip("/")
        self.retries, self.backoff, self.timeout, self.sleep = retries, backoff, timeout, sleep

    def _get(self, endpoint: str, uid: str) -> bytes:
        url = f"{self.base}/{endpoint}?{urllib.parse.urlencode({'SeriesInstanceUID': uid})}"
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            try:
                with urllib.request.urlopen(url, timeout=self.timeout) as resp:
                    return resp.read()
            except urllib.error.HTTPError as exc:
                if exc.code < 500 and exc.code != 429:
                    raise TciaDownloadError(f"{endpoint} {uid}: HTTP {exc.code} from {self.base}") from None
                last = exc
            except (urllib.error.URLError, OSError) as exc:
                last = exc
            if attempt < self.retries:
                self.sleep(self.backoff * 2 ** attempt)
        raise TciaDownloadError(f"{endpoint} {uid}: failed after {self.retries + 1} attempts ({last})")

    def series_info(self, uid: str) -> dict | None:
        """``getSeries`` of one series, or None when the server does not know it."""
        data = json.loads(self._get("getSeries", uid) or b"[]")
        return data[0] if data else None

    def series_zip(self, uid: str) -> bytes:
        return self._get("getImage", uid)


# ------------------------------------------------------------------------------ download
@dataclass
class SeriesResult:
    uid: str
    status: str  # downloaded | cached | missing | failed
    files: int = 0
    message: str = ""
    PatientID: str = ""
    StudyInstanceUID: str = ""
    StudyDate: str = ""
    StudyTime: str = ""


def _verify_zip(data: bytes, info: dict) -> tuple[int, dict]:
    """(DICOM count, header of the first DICOM); raises when the zip does not match."""
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        names = [n for n in zf.namelist() if not n.endswith("/")]
        dicoms = [n for n in names if n.lower().endswith(".dcm")] or [n for n in names if "md5hashes" not in n
                                                                    and "LICENSE" not in n]
        if "md5hashes.csv" in names:
            for row in csv.DictReader(io.StringIO(zf.read("md5hashes.csv").decode())):
                got = hashlib.md5(zf.read(row["filename"])).hexdigest()
                if got != row["md5hash"]:
                    raise TciaDownloadError(f"{row['filename']}: md5 {got} != {row['md5hash']} of md5hashes.csv")
        expected = int(info.get("ImageCount") or 0)
        if expected and len(dicoms) != expected:
            raise TciaDownloadError(f"zip holds {len(dicoms)} files, getSeries says ImageCount {expected}")
        if not dicoms:
            raise TciaDownloadError("zip holds no file")
        tags = read_tags(zf.read(dicoms[0]))  # the project's header reader (pydicom fallback inside)
    return len(dicoms), {k: str(tags.get(k) or "") for k in ("PatientID", "StudyInstanceUID", "StudyDate",
                                                              "StudyTime")}


def download_series(client: NbiaClient, uids, series_dir: Path, *, workers: int = 2,
                    log=lambda msg: None) -> list[SeriesResult]:
    """Download and verify each series once; a verified series on disk is skipped (resume)."""
    series_dir = Path(series_dir)
    series_dir.mkdir(parents=True, exist_ok=True)

    def one(uid: str) -> SeriesResult:
        zpath, rec = series_dir / f"{uid}.zip", series_dir / f"{uid}.json"
        if zpath.is_file() and rec.is_file():
            try:
                done = json.loads(rec.read_text())
                if done.get("status") in ("downloaded", "cached") and done.get("size") == zpath.stat().st_size:
                    return SeriesResult(**{**_result_fields(done), "status": "cached"})
            except (OSError, ValueError, TypeError):
                pass
        try:
            info = client.series_info(uid)
            if info is None:
                log(f"series {uid}: unknown to {client.base}; skipped")
                return SeriesResult(uid, "missing", message=f"unknown to {client.base}")
            data = client.series_zip(uid)
            n, hdr = _verify_zip(data, info)
        except (TciaDownloadError, zipfile.BadZipFile, ValueError) as exc:
            log(f"series {uid}: {exc}")
            return SeriesResult(uid, "failed", message=str(exc))
        with atomic_write(zpath, "wb") as fh:
            fh.write(data)
        res = SeriesResult(uid, "downloaded", n, "", **hdr)
        rec.write_text(json.dumps({**asdict(res), "size": len(data)}, indent=2) + "\n")
        log(f"series {uid}: {n} files")
        return res

    with ThreadPoolExecutor(max(1, workers)) as pool:
        return list(pool.map(one, uids))


def _result_fields(done: dict) -> dict:
    return {k: done.get(k, "") for k in ("uid", "status", "files", "message", "PatientID", "StudyInstanceUID",
                                         "StudyDate", "StudyTime")}


# -------------------------------------------------------------------------------- grouping
@dataclass(frozen=True)
class TciaVisit:
    patient_id: str
    study_uid: str
    visit: str
    session_label: str
    series: tuple[str, ...]


def group_visits(results: list[SeriesResult]) -> list[TciaVisit]:
    """One visit per (PatientID, StudyInstanceUID), labelled in a download-order-free order."""
    studies: dict[tuple[str, str], dict] = {}
    for r in results:
        if r.status not in ("downloaded", "cached"):
            continue
        s = studies.setdefault((r.PatientID, r.StudyInstanceUID), {"date": r.StudyDate, "time": r.StudyTime,
                                                                   "series": []})
        s["series"].append(r.uid)
    out = []
    for patient in sorted({p for p, _ in studies}):
        ordered = sorted(((k, v) for k, v in studies.items() if k[0] == patient),
                         key=lambda kv: (kv[1]["date"], kv[1]["time"], kv[0][1]))
        participant = normalize_participant_id(patient)
        for i, ((_, study), v) in enumerate(ordered):
            label = patient if i == 0 else f"{patient}_{i:02d}"
            out.append(TciaVisit(patient, study, f"{participant}_ses-{i + 1:02d}", label, tuple(sorted(v["series"]))))
    return out


def write_resolved(path: Path, visits: list[TciaVisit]) -> None:
    rows = [{"SeriesInstanceUID": s, "PatientID": v.patient_id, "StudyInstanceUID": v.study_uid, "visit": v.visit,
             "session_label": v.session_label} for v in visits for s in v.series]
    with atomic_write(path, newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=RESOLVED_COLUMNS)
        w.writeheader()
        w.writerows(sorted(rows, key=lambda r: (r["visit"], r["SeriesInstanceUID"])))


def read_resolved(path: Path) -> list[dict]:
    with Path(path).open(newline="") as fh:
        return list(csv.DictReader(fh))


# ------------------------------------------------------------------------- dataset layout
# downloads/tcia/<name>.tcia            the manifest as dropped (never changed)
# downloads/tcia/<name>/series/<uid>.zip  each series as NBIA sent it, + <uid>.json (verified)
# downloads/tcia/<name>/resolved.csv    SeriesInstanceUID -> PatientID, study, visit, label
MANIFEST_SUFFIXES = (".tcia", ".csv")


def manifests(tcia_root: Path) -> list[Path]:
    if not Path(tcia_root).is_dir():
        return []
    return sorted(p for p in Path(tcia_root).iterdir() if p.is_file() and p.suffix.lower() in MANIFEST_SUFFIXES
                  and not p.name.startswith("."))


def manifest_name(path: Path) -> str:
    """The partition key of a manifest: its file stem, made safe."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", Path(path).stem)


def resolved_path(tcia_root: Path, name: str) -> Path:
    return Path(tcia_root) / name / "resolved.csv"


def series_dir(tcia_root: Path, name: str) -> Path:
    return Path(tcia_root) / name / "series"


@dataclass(frozen=True)
class TciaVisitSource:
    manifest: Path
    resolved: Path
    patient_id: str
    session_label: str
    zips: tuple[Path, ...]


def find_visit(tcia_root: Path, visit: str) -> TciaVisitSource | None:
    """Where a TCIA visit's series zips are, and its labels; None for a scanner-dump visit."""
    for m in manifests(tcia_root):
        name = manifest_name(m)
        res = resolved_path(tcia_root, name)
        if not res.is_file():
            continue
        rows = [r for r in read_resolved(res) if r["visit"] == visit]
        if rows:
            zips = tuple(series_dir(tcia_root, name) / f"{r['SeriesInstanceUID']}.zip" for r in rows)
            return TciaVisitSource(m, res, rows[0]["PatientID"], rows[0]["session_label"], zips)
    return None
