"""Series zips from NBIA: streamed to a hidden temporary file, verified against NBIA's own md5
list and ``ImageCount``, bounded in every read of what the server sends, then renamed into place
with a record beside it; a verified series is never fetched again."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from ..fasttags import read_tags
from ..fsutil import atomic_write
from ..layout import DatasetLayout
from .nbia import NbiaClient, TciaDownloadError, _describe

MD5_LIST = "md5hashes.csv"
MD5_HEADER = ["Filename", "MD5Hash"]  # as NBIA's FormatOutput.toCsv writes it
LICENSE_ENTRY = "LICENSE"
_CHUNK = 1 << 20


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
    server: str = ""
    annotations: int = 0  # annotation files NBIA sent with the series (includeAnnotation)


#: what is read of the first image to describe the series (the fast reader's window; pydicom
#: reads on from the member's stream only when the header is longer)
_HEADER_BYTES = 256 * 1024
#: md5hashes.csv may hold this many bytes per image (a file name of NBIA's, a comma, an md5, a
#: line break, with room to spare), plus a header: a list inflating past it is refused unread
_MD5_ROW_BYTES, _MD5_SLACK = 512, 4096
#: NBIA's LICENSE member is a short text; anything else under that name is refused
_LICENSE_MAX = 1024 * 1024


class _Rewound:
    """A zip member's stream, rewound once for pydicom after the fast reader's look at its head."""

    def __init__(self, fh):
        fh.seek(0)
        self._fh = fh

    def __getattr__(self, name):
        return getattr(self._fh, name)


def _md5_rows(zf: zipfile.ZipFile, images: int) -> list[list[str]]:
    """md5hashes.csv's rows, read within a bound set by the number of images: a list that
    inflates to more (a zip bomb of blank lines) is refused without reading it."""
    limit = _MD5_ROW_BYTES * (images + 1) + _MD5_SLACK
    if zf.getinfo(MD5_LIST).file_size > limit:
        raise TciaDownloadError(f"{MD5_LIST} says it inflates to {zf.getinfo(MD5_LIST).file_size} bytes, more than "
                                f"{limit} for {images} image(s): refused unread")
    with zf.open(MD5_LIST) as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise TciaDownloadError(f"{MD5_LIST} inflates past {limit} bytes for {images} image(s): refused")
    return list(csv.reader(io.StringIO(data.decode("utf-8"))))


def _check_license(zf: zipfile.ZipFile, listed: dict[str, str]) -> None:
    """The LICENSE member is verified like an image when md5hashes.csv lists it; otherwise it
    must be what NBIA puts there, a short UTF-8 text, so no file (a DICOM, say) rides into the
    visit under that name unverified."""
    info = zf.getinfo(LICENSE_ENTRY)
    if info.file_size > _LICENSE_MAX:
        raise TciaDownloadError(f"{LICENSE_ENTRY}: {info.file_size} bytes, not NBIA's license text: refused")
    with zf.open(info) as fh:
        data = fh.read(_LICENSE_MAX + 1)
    if LICENSE_ENTRY in listed:
        digest = hashlib.md5(data).hexdigest()
        if digest != listed[LICENSE_ENTRY]:
            raise TciaDownloadError(f"{LICENSE_ENTRY}: md5 {digest} != {listed[LICENSE_ENTRY]} of {MD5_LIST}")
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None or "\x00" in text or data[128:132] == b"DICM":
        raise TciaDownloadError(f"{LICENSE_ENTRY} is not a text (a binary file under the license's name, not in "
                                f"{MD5_LIST}): refused, it would escape verification")


#: an annotation file (LIDC-IDRI's radiologist XML, a few hundred KB) may be this large; NBIA
#: lists no md5 for them, so each is bounded and must not be a DICOM
_ANNOTATION_MAX = 64 * 1024 * 1024


def _check_annotations(zf: zipfile.ZipFile, names: list[str]) -> None:
    """Members NBIA sends after ``md5hashes.csv`` with ``IncludeAnnotation=true``: bounded, never
    a DICOM (an unverified image must not ride into the visit as an annotation)."""
    for name in names:
        info = zf.getinfo(name)
        if info.file_size > _ANNOTATION_MAX or "/" in name or "\\" in name or name.startswith("."):
            raise TciaDownloadError(f"annotation {name!r} ({info.file_size} bytes): not an annotation file NBIA "
                                    f"sends (at most {_ANNOTATION_MAX} bytes, no folder): refused")
        with zf.open(info) as fh:
            head = fh.read(132)
        if head[128:132] == b"DICM":
            raise TciaDownloadError(f"{name!r} is a DICOM not listed in {MD5_LIST}: refused, it would escape "
                                    "verification")


def _listed(rows: list[list[str]]) -> dict[str, str]:
    if not rows or [c.strip() for c in rows[0]] != MD5_HEADER:
        raise TciaDownloadError(f"{MD5_LIST}: header {rows[0] if rows else []} is not NBIA's {','.join(MD5_HEADER)}")
    listed: dict[str, str] = {}
    for row in rows[1:]:
        if not row:
            continue
        if len(row) != 2 or not re.fullmatch(r"[0-9A-Fa-f]{32}", row[1].strip()):
            raise TciaDownloadError(f"{MD5_LIST}: row {row} is not 'Filename,MD5Hash'")
        listed[row[0].strip()] = row[1].strip().lower()
    return listed


def _verify_members(zf: zipfile.ZipFile, listed: dict[str, str], images: list[str]) -> None:
    for name in images:
        h = hashlib.md5()
        with zf.open(name) as fh:
            for block in iter(lambda: fh.read(_CHUNK), b""):
                h.update(block)
        if h.hexdigest() != listed[name]:
            raise TciaDownloadError(f"{name}: md5 {h.hexdigest()} != {listed[name]} of {MD5_LIST}")


def verify_zip(path: Path | str, info: dict, *, annotations: bool = False) -> tuple[int, dict, list[str]]:
    """(image count, header of the first image, annotation files) of a series zip as NBIA sends
    it; raises :class:`TciaDownloadError` when it does not match its ``md5hashes.csv`` or
    ``ImageCount``. With ``annotations`` (``getDCMImage?IncludeAnnotation=true``) the members
    after ``md5hashes.csv`` that it does not list are the series' annotation files."""
    try:
        with zipfile.ZipFile(path) as zf:
            members = [i.filename for i in zf.infolist() if not i.is_dir()]
            if MD5_LIST not in members:
                raise TciaDownloadError(f"the zip holds no {MD5_LIST}: its images cannot be verified")
            after = members[members.index(MD5_LIST) + 1:] if annotations else []
            images = [n for n in members if n not in (LICENSE_ENTRY, MD5_LIST)]
            listed = _listed(_md5_rows(zf, len(images)))
            notes = [n for n in after if n not in listed]
            images = [n for n in images if n not in notes]
            unlisted = sorted(set(images) - set(listed))
            absent = sorted(set(listed) - set(images) - ({LICENSE_ENTRY} & set(members)))
            if unlisted or absent:
                raise TciaDownloadError(f"{MD5_LIST} and the zip differ: not listed {unlisted[:3]}, "
                                        f"not in the zip {absent[:3]}")
            _verify_members(zf, listed, images)
            expected = int(info.get("ImageCount") or 0)
            if expected and len(images) != expected:
                raise TciaDownloadError(f"zip holds {len(images)} images, getSeries says ImageCount {expected}")
            if not images:
                raise TciaDownloadError("zip holds no image")
            if LICENSE_ENTRY in members:
                _check_license(zf, listed)
            _check_annotations(zf, notes)
            with zf.open(sorted(images)[0]) as first:  # its header only: a DBT image can be hundreds of MB
                tags = read_tags(first.read(_HEADER_BYTES), full=_Rewound(first))
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, UnicodeDecodeError) as exc:
        raise TciaDownloadError(f"not a readable zip ({_describe(exc)})") from None
    return len(images), {k: str(tags.get(k) or "") for k in ("PatientID", "StudyInstanceUID", "StudyDate",
                                                              "StudyTime")}, notes


def _from_info(info: dict) -> dict:
    """What getSeries says of a series' study, for a series that could not be fetched (so that
    only its visit waits): PatientID, StudyInstanceUID, StudyDate as YYYYMMDD."""
    return {"PatientID": str(info.get("PatientID") or ""), "StudyInstanceUID": str(info.get("StudyInstanceUID") or ""),
            "StudyDate": re.sub(r"[^0-9]", "", str(info.get("StudyDate") or ""))[:8]}


def annotation_files(zpath: Path) -> list[str]:
    """The annotation files of a downloaded series zip, as its record (``<uid>.json``, written
    once the zip was verified) lists them: the members NBIA sent after ``md5hashes.csv``."""
    rec = DatasetLayout.tcia_series_files(Path(zpath).parent, Path(zpath).stem)[1]
    try:
        names = json.loads(rec.read_text()).get("annotation_files") or []
    except (OSError, ValueError, AttributeError) as exc:
        raise TciaDownloadError(f"{rec}: the series record cannot be read ({exc}); materialize tcia_series of "
                                "its manifest again") from None
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise TciaDownloadError(f"{rec}: 'annotation_files' is not a list of names")
    return names


def _cached(zpath: Path, rec: Path) -> SeriesResult | None:
    if not (zpath.is_file() and rec.is_file()):
        return None
    try:
        done = json.loads(rec.read_text())
        if done.get("status") in ("downloaded", "cached") and done.get("size") == zpath.stat().st_size:
            return SeriesResult(**{**_result_fields(done), "status": "cached"})
    except (OSError, ValueError, TypeError):
        pass
    return None


def _find(clients: list[NbiaClient], uid: str) -> tuple[NbiaClient | None, dict | None]:
    """The first server that knows the series, and its getSeries row."""
    for c in clients:
        info = c.retrying(f"getSeries {uid}", lambda c=c: c.series_info(uid))
        if info is not None:
            return c, info
    return None, None


def download_series(clients, uids, series_dir: Path, *, workers: int = 2, annotations: bool = False,
                    log=lambda msg: None) -> list[SeriesResult]:
    """Download and verify each series once, from the first of ``clients`` (one NBIA server each)
    that knows it; a verified series on disk is skipped (resume). A failure is that series'
    result, never the whole call's; it carries what getSeries said of its study."""
    clients = [clients] if isinstance(clients, NbiaClient) else list(clients)
    series_dir = Path(series_dir)
    series_dir.mkdir(parents=True, exist_ok=True)
    servers = " and ".join(c.server for c in clients)

    def fetch_verified(client: NbiaClient, uid: str, info: dict, zpath: Path):
        with atomic_write(zpath, "wb") as fh:  # a hidden temporary file, renamed once verified
            size = client.fetch_zip(uid, fh, annotations)
            fh.flush()
            n, hdr, notes = verify_zip(fh.name, info, annotations=annotations)
        return n, hdr, notes, size

    def one(uid: str) -> SeriesResult:
        zpath, rec = DatasetLayout.tcia_series_files(series_dir, uid)
        done = _cached(zpath, rec)
        if done is not None:
            return done
        info: dict = {}
        try:
            client, found = _find(clients, uid)
            if client is None:
                msg = f"unknown to {servers} or not public (getSeries answered nothing)"
                log(f"series {uid}: {msg}")
                return SeriesResult(uid, "missing", message=msg)
            info = found
            endpoint = client.image_request(uid, annotations)[0]
            n, hdr, notes, size = client.retrying(f"{endpoint} {uid}",
                                                  lambda: fetch_verified(client, uid, info, zpath))
        except TciaDownloadError as exc:
            log(f"series {uid}: {exc}")
            return SeriesResult(uid, "failed", message=str(exc), **_from_info(info))
        except Exception as exc:  # noqa: BLE001 - whatever happens to one series is that series' failure
            log(f"series {uid}: {type(exc).__name__}: {exc}")
            return SeriesResult(uid, "failed", message=f"{type(exc).__name__}: {exc}", **_from_info(info))
        res = SeriesResult(uid, "downloaded", n, "", **hdr, server=client.server, annotations=len(notes))
        with atomic_write(rec) as fh:
            fh.write(json.dumps({**asdict(res), "size": size, "annotation_files": notes,
                                 "license": {k: info.get(k, "") for k in ("LicenseName", "LicenseURI")}},
                                indent=2) + "\n")
        log(f"series {uid}: {n} images, md5 verified" + (f", {len(notes)} annotation file(s)" if notes else ""))
        return res

    with ThreadPoolExecutor(max(1, workers)) as pool:
        return list(pool.map(one, uids))


def _result_fields(done: dict) -> dict:
    out = {k: done.get(k, "") for k in ("uid", "status", "files", "message", "PatientID", "StudyInstanceUID",
                                        "StudyDate", "StudyTime", "server")}
    return {**out, "files": int(done.get("files") or 0), "annotations": int(done.get("annotations") or 0)}


