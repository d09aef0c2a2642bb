"""TCIA manifests as a source of visits: parse, download through the NBIA REST API, group.

What is modelled here was read from NBIA's own source (``CBIIT/NBIA-TCIA``) and the official
client (``tcia_utils``); docs/decisions.md names the classes.

A ``.tcia`` manifest is read as the NBIA Data Retriever reads it (``StandaloneDMDispatcher``):
the header is a Java properties block (``key=value``, ``key: value`` or ``key value``; ``#`` and
``!`` comments; keys case-sensitive), the series list starts at the line that is exactly
``ListOfSeriesToDownload=`` in any case, and each later line gives one SeriesInstanceUID (a
line without any digit, such as a ``Series ID`` heading, is skipped; a UID listed twice is
downloaded once). The header must name ``downloadServerUrl`` (an NBIA download servlet URL: the
NBIA server the series live on, e.g. ``nbia`` or ``nlst.cancerimagingarchive.net``) and a 3.x
``manifestVersion``. The CSV form is TCIA's cart export (``SeriesInstanceUID``,
``StudyInstanceUID``, ... as the portal's "Download CSV" writes them; the older ``Series ID``,
``Study UID`` headings and ``series_instance_uid``/``study_instance_uid`` too); it names no
server, so its series are asked at the first configured server. Either becomes a
:class:`TciaManifest`.

The API is the manifest's server at ``/nbia-api/services/v4`` (``v1`` as an option, the
Retriever's API). Each series: ``getSeries`` for its metadata (an empty answer: unknown to that
server or not public), then the zip with NBIA's MD5 list (v4 ``getImage?IncludeMD5=yes``: a
``LICENSE``, ``00000001.dcm`` ..., ``md5hashes.csv``; v1 ``getImageWithMD5Hash``: the same
without the ``LICENSE``), streamed to a hidden temporary file, verified (every image's md5
against ``md5hashes.csv``, the image count against ``ImageCount``) and only then renamed to
``<work>/series/<SeriesInstanceUID>.zip`` and recorded in ``<uid>.json``: a verified series is
never downloaded again (resume). Any failure of one series (HTTP 5xx, a cut-off stream, a zip
that does not verify) is retried with backoff and, in the end, reported for that series only.

Visits are one per (PatientID, StudyInstanceUID), read from the downloaded DICOM headers.
Labels follow the XNAT-TCIA convention and do not depend on download order: the studies of a
patient sorted by StudyDate, StudyTime, then StudyInstanceUID are labelled ``<PatientID>``,
``<PatientID>_01``, ``<PatientID>_02``, ...; the visit is ``<participant>_ses-<n>``.
"""

from __future__ import annotations

import csv
import hashlib
import http.client
import io
import json
import re
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import DicomAssetsError
from .fasttags import read_tags
from .fsutil import atomic_write
from .ids import normalize_participant_id
from .layout import DatasetLayout

UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
LIST_KEY = "ListOfSeriesToDownload"
SERVLET_PATH = "/nbia-download/servlet/DownloadServlet"  # what a manifest's downloadServerUrl ends with
API_PATH = "/nbia-api/services"
API_VERSIONS = ("v4", "v1")
DEFAULT_API_VERSION = "v4"
# the public NBIA servers of TCIA (tcia_utils' "nbia" and "nlst" hosts); the first is the default
PUBLIC_SERVERS = ("https://nbia.cancerimagingarchive.net", "https://nlst.cancerimagingarchive.net")
MD5_LIST = "md5hashes.csv"
MD5_HEADER = ["Filename", "MD5Hash"]  # as NBIA's FormatOutput.toCsv writes it
LICENSE_ENTRY = "LICENSE"
RESOLVED_COLUMNS = ("SeriesInstanceUID", "PatientID", "StudyInstanceUID", "visit", "session_label")
# CSV exports: the portal's cart "Download CSV" (v4 getSeriesMetadata), its older cart CSV, BigQuery-style
CSV_SERIES_COLUMNS = ("SeriesInstanceUID", "Series ID", "series_instance_uid")
CSV_STUDY_COLUMNS = ("StudyInstanceUID", "Study UID", "study_instance_uid")
_CHUNK = 1 << 20


class TciaManifestError(DicomAssetsError):
    """A manifest that cannot be read; the message names the file and the line."""


class TciaDownloadError(DicomAssetsError):
    """A series that could not be downloaded or verified; ``transient`` ones are retried."""

    def __init__(self, message: str, *, transient: bool = True):
        super().__init__(message)
        self.transient = transient


@dataclass(frozen=True)
class TciaManifest:
    path: str
    series: tuple[str, ...]
    header: dict = field(default_factory=dict)
    study_of: dict = field(default_factory=dict)  # series -> study, when the manifest says (CSV form)
    server: str | None = None  # the NBIA server the manifest names (None: a CSV export names none)
    duplicates: tuple[str, ...] = ()  # UIDs listed more than once (downloaded once)


# -------------------------------------------------------------------------------- manifests
def _lines(text: str) -> list[str]:
    # Java's BufferedReader.readLine: \n, \r and \r\n end a line (and nothing else)
    lines = re.split(r"\r\n|\r|\n", text)
    if lines and lines[-1] == "":
        lines.pop()
    return lines


_PROP_ESCAPES = {"t": "\t", "n": "\n", "r": "\r", "f": "\f"}


def _unescape(s: str) -> str:
    out, i = [], 0
    while i < len(s):
        c = s[i]
        if c == "\\" and i + 1 < len(s):
            nxt = s[i + 1]
            if nxt == "u" and re.match(r"[0-9A-Fa-f]{4}", s[i + 2:i + 6]):
                out.append(chr(int(s[i + 2:i + 6], 16)))
                i += 6
                continue
            out.append(_PROP_ESCAPES.get(nxt, nxt))
            i += 2
            continue
        out.append(c)
        i += 1
    return "".join(out)


def _continues(line: str) -> bool:
    return (len(line) - len(line.rstrip("\\"))) % 2 == 1  # an odd number of trailing backslashes


def _properties(lines: list[tuple[int, str]]) -> dict[str, tuple[str, int]]:
    """``java.util.Properties.load`` of the header lines: key -> (value, line); the last one wins."""
    props: dict[str, tuple[str, int]] = {}
    i = 0
    while i < len(lines):
        n, line = lines[i]
        i += 1
        line = line.lstrip(" \t\f")
        if not line or line[0] in "#!":
            continue
        while _continues(line) and i < len(lines):
            line = line[:-1] + lines[i][1].lstrip(" \t\f")
            i += 1
        k, escaped = 0, False
        while k < len(line):
            if escaped:
                escaped = False
            elif line[k] == "\\":
                escaped = True
            elif line[k] in "=: \t\f":
                break
            k += 1
        key, rest = line[:k], line[k:].lstrip(" \t\f")
        if rest[:1] in ("=", ":"):
            rest = rest[1:].lstrip(" \t\f")
        props[_unescape(key)] = (_unescape(rest), n)
    return props


def server_of(download_server_url: str) -> str | None:
    """The NBIA server of a manifest's ``downloadServerUrl`` (the part before
    ``/nbia-download/servlet/DownloadServlet``, where the Retriever puts ``/nbia-api/services/...``)."""
    try:
        parts = urllib.parse.urlsplit(download_server_url.strip())
    except ValueError:  # "Invalid IPv6 URL" and the like: no server URL at all
        return None
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        return None
    path = parts.path.rstrip("/")
    if not path.endswith(SERVLET_PATH):
        return None
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}{path[: -len(SERVLET_PATH)]}"


def normalize_server(url: str) -> str:
    parts = urllib.parse.urlsplit(url.strip())
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}{parts.path.rstrip('/')}"


_UID_LINE = re.compile(r"^[\s\"',;]*([0-9.]+)[\s\"',;]*$")


def parse_manifest(path: Path | str) -> TciaManifest:
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise TciaManifestError(f"{path}: cannot read the manifest: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise TciaManifestError(f"{path}: not a text file (UTF-8)") from None
    try:
        return _parse_manifest_text(path, text)
    except csv.Error as exc:  # a field over csv's size limit, a NUL byte, ...
        raise TciaManifestError(f"{path}: cannot be read as a manifest ({exc})") from None


def _parse_manifest_text(path: Path, text: str) -> TciaManifest:
    lines = _lines(text)
    first = next((ln for ln in lines if ln.strip()), "")
    if _csv_series_column(next(csv.reader([first]), [])) is not None:
        return _parse_csv(path, text)
    start = next((n for n, ln in enumerate(lines, 1) if ln.lower() == LIST_KEY.lower() + "="), None)
    if start is None:
        near = next((n for n, ln in enumerate(lines, 1) if ln.strip().lower().startswith(LIST_KEY.lower())), None)
        if near is not None:
            raise TciaManifestError(
                f"{path}: line {near}: {lines[near - 1][:80]!r} is not the line '{LIST_KEY}=' (alone on its line, "
                "any case) that starts the series list for the NBIA Data Retriever")
        raise TciaManifestError(f"{path}: no '{LIST_KEY}=' line: not a TCIA manifest")
    props = _properties(list(enumerate(lines[: start - 1], 1)))
    header = {k: v for k, (v, _) in props.items()}

    def required(key: str) -> tuple[str, int]:
        if key in props:
            return props[key]
        other = next((k for k in props if k.lower() == key.lower()), None)
        hint = (f" (line {props[other][1]} has {other!r}: the Data Retriever reads header keys case-sensitively)"
                if other else "")
        raise TciaManifestError(f"{path}: no '{key}=' line in the header{hint}")

    url, url_line = required("downloadServerUrl")
    server = server_of(url)
    if server is None:
        raise TciaManifestError(f"{path}: line {url_line}: downloadServerUrl {url[:100]!r} is not an NBIA download "
                                f"servlet URL (http(s)://<host>{SERVLET_PATH}, as TCIA's portal writes it)")
    version, version_line = required("manifestVersion")
    if not re.fullmatch(r"3\.[0-9]+", version.strip()):
        raise TciaManifestError(f"{path}: line {version_line}: manifestVersion {version[:20]!r} is not 3.x, the "
                                "version whose series list the NBIA Data Retriever reads")
    series: list[str] = []
    seen: dict[str, int] = {}
    duplicates: list[str] = []
    for n, line in enumerate(lines[start:], start + 1):
        digits = re.sub(r"[^.0-9]", "", line)
        if not digits:
            continue  # the Retriever skips a line without digits (blank, a 'Series ID' heading)
        m = _UID_LINE.match(line)
        if m is None:
            raise TciaManifestError(f"{path}: line {n}: {line[:80]!r} is not a SeriesInstanceUID (the NBIA Data "
                                    f"Retriever would keep only its digits and dots, {digits[:80]!r})")
        _take_uid(path, n, m.group(1), seen, series, duplicates)
    if not series:
        raise TciaManifestError(f"{path}: the manifest lists no series")
    return TciaManifest(str(path), tuple(series), header, {}, server, tuple(duplicates))


def _take_uid(path, n: int, uid: str, seen: dict[str, int], series: list[str], duplicates: list[str]) -> bool:
    """Add line ``n``'s SeriesInstanceUID to the list (a repeat goes to ``duplicates``); a value that
    is not a DICOM UID refuses the manifest naming the line. True when the UID is new."""
    if len(uid) > 64 or not UID.match(uid):
        raise TciaManifestError(f"{path}: line {n}: {uid[:80]!r} is not a DICOM UID")
    if uid in seen:
        duplicates.append(uid)
        return False
    seen[uid] = n
    series.append(uid)
    return True


def _norm_col(name: str) -> str:
    return re.sub(r"[\s_]", "", name.strip().strip('"').lower())


def _csv_column(fieldnames, names) -> str | None:
    """The first of ``fieldnames`` that is one of ``names`` (case, spaces and ``_`` ignored)."""
    wanted = {_norm_col(c) for c in names}
    return next((f for f in fieldnames or [] if _norm_col(f) in wanted), None)


def _csv_series_column(fieldnames) -> str | None:
    return _csv_column(fieldnames, CSV_SERIES_COLUMNS)


def _parse_csv(path: Path, text: str) -> TciaManifest:
    reader = csv.DictReader(io.StringIO(text.lstrip("\r\n")))
    series_col = _csv_series_column(reader.fieldnames)
    study_col = _csv_column(reader.fieldnames, CSV_STUDY_COLUMNS)
    series, study_of, seen, duplicates = [], {}, {}, []
    for row in reader:
        n = reader.line_num
        uid = (row.get(series_col) or "").strip()
        if not uid:
            raise TciaManifestError(f"{path}: line {n}: empty {series_col}")
        if not _take_uid(path, n, uid, seen, series, duplicates):
            continue
        study = (row.get(study_col) or "").strip() if study_col else ""
        if study and not UID.match(study):
            raise TciaManifestError(f"{path}: line {n}: {study[:80]!r} is not a DICOM UID")
        if study:
            study_of[uid] = study
    if not series:
        raise TciaManifestError(f"{path}: the manifest lists no series")
    return TciaManifest(str(path), tuple(series), {}, study_of, None, tuple(duplicates))


def manifest_server(manifest: TciaManifest, servers) -> str:
    """The NBIA server to ask for the manifest's series: the one it names, which must be one of
    ``servers`` (a manifest is not allowed to send the platform anywhere); a CSV export names
    none and gets ``servers[0]``."""
    allowed = [normalize_server(s) for s in servers]
    if not allowed:
        raise TciaManifestError("no TCIA server configured")
    if manifest.server is None:
        return allowed[0]
    if manifest.server not in allowed:
        raise TciaManifestError(f"{manifest.path}: its downloadServerUrl names the server {manifest.server}, which "
                                f"is not one of the configured TCIA servers ({', '.join(allowed)}; TCIA_SERVERS)")
    return manifest.server


# ---------------------------------------------------------------------------------- client
def _error_text(body: bytes, ctype: str) -> str:
    """A short readable text of an error answer: plain as sent, HTML reduced to its title or text."""
    text = body.decode("utf-8", "replace")
    if "html" in ctype.lower() or text.lstrip()[:1] == "<":
        title = re.search(r"<title[^>]*>(.*?)</title>", text, re.I | re.S)
        text = title.group(1) if title else re.sub(r"<[^>]+>", " ", text)
    return " ".join(text.split())[:200]


class RedirectRefused(urllib.error.URLError):
    """A redirect to a host other than the server the manifest was allowed to name."""


class _SameServerRedirects(urllib.request.HTTPRedirectHandler):
    """Redirects followed only to the same host (http -> https of it included): the allow-list of
    TCIA_SERVERS holds for every hop, not only the first."""

    def __init__(self, server: str):
        self.host = urllib.parse.urlsplit(server).netloc.lower()

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        target = urllib.parse.urlsplit(urllib.parse.urljoin(req.full_url, newurl))
        if target.netloc.lower() != self.host or target.scheme.lower() not in ("http", "https"):
            raise RedirectRefused(f"redirected ({code}) to {target.scheme}://{target.netloc}, outside the allowed "
                                  f"server {self.host}: not followed")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class NbiaClient:
    """The NBIA REST API of one server: ``getSeries`` for metadata, the series zip with its MD5 list."""

    def __init__(self, server: str = PUBLIC_SERVERS[0], version: str = DEFAULT_API_VERSION, *, retries: int = 4,
                 backoff: float = 1.0, timeout: float = 120, sleep=time.sleep):
        if version not in API_VERSIONS:
            raise ValueError(f"NBIA API version {version!r}: one of {', '.join(API_VERSIONS)}")
        self.server = normalize_server(server)
        self.version = version
        self.base = f"{self.server}{API_PATH}/{version}"
        self.retries, self.backoff, self.timeout, self.sleep = retries, backoff, timeout, sleep
        self._opener = urllib.request.build_opener(_SameServerRedirects(self.server))

    def image_request(self, uid: str) -> tuple[str, dict]:
        """The endpoint and parameters of a series zip that carries ``md5hashes.csv``."""
        if self.version == "v4":  # V4_getImage: LICENSE, images, md5hashes.csv when IncludeMD5=yes
            return "getImage", {"SeriesInstanceUID": uid, "IncludeMD5": "yes"}
        return "getImageWithMD5Hash", {"SeriesInstanceUID": uid}  # V1_getImageWithMD5Hash

    def _open(self, endpoint: str, params: dict):
        url = f"{self.base}/{endpoint}?{urllib.parse.urlencode(params)}"
        what = f"{endpoint} {params.get('SeriesInstanceUID', '')}".strip()
        try:
            return self._opener.open(url, timeout=self.timeout)
        except RedirectRefused as exc:
            raise TciaDownloadError(f"{what}: {self.server} {exc.reason}", transient=False) from None
        except urllib.error.HTTPError as exc:
            try:
                detail = _error_text(exc.read(64 * 1024), exc.headers.get("Content-Type", ""))
            except (OSError, http.client.HTTPException):
                detail = ""
            finally:
                exc.close()
            transient = exc.code >= 500 or exc.code == 429
            raise TciaDownloadError(f"{what}: HTTP {exc.code} from {self.server}" + (f": {detail}" if detail else ""),
                                    transient=transient) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            raise TciaDownloadError(f"{what}: {self.server} unreachable ({_describe(exc)})") from None

    def series_info(self, uid: str) -> dict | None:
        """``getSeries`` of one series, or None when the server answers nothing (NBIA's 200 with an
        empty body: the series is unknown to this server, or not public)."""
        try:
            with self._open("getSeries", {"SeriesInstanceUID": uid}) as resp:
                body = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            raise TciaDownloadError(f"getSeries {uid}: answer cut off ({_describe(exc)})") from None
        if not body.strip():
            return None
        try:
            data = json.loads(body)
        except ValueError:
            raise TciaDownloadError(f"getSeries {uid}: not JSON from {self.server}: "
                                    f"{_error_text(body, '')!r}") from None
        rows = [r for r in data if isinstance(r, dict) and r.get("SeriesInstanceUID") == uid] \
            if isinstance(data, list) else []
        return rows[0] if rows else None

    def fetch_zip(self, uid: str, out) -> int:
        """Stream the series zip into the binary file ``out``; the number of bytes."""
        endpoint, params = self.image_request(uid)
        size = 0
        with self._open(endpoint, params) as resp:
            while True:
                try:
                    block = resp.read1(_CHUNK)  # what has arrived, to disk at once
                except (OSError, http.client.HTTPException) as exc:  # IncompleteRead: the stream was cut off
                    raise TciaDownloadError(f"{endpoint} {uid}: stream cut off after {size} bytes "
                                            f"({_describe(exc)})") from None
                if not block:
                    return size
                out.write(block)  # a local write error (disk full) is not the server's: not retried
                size += len(block)

    def retrying(self, what: str, fn):
        """``fn()``, again after a transient failure, with exponential backoff."""
        last: TciaDownloadError | None = None
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except TciaDownloadError as exc:
                if not exc.transient:
                    raise
                last = exc
            if attempt < self.retries:
                self.sleep(self.backoff * 2 ** attempt)
        raise TciaDownloadError(f"{what}: failed after {self.retries + 1} attempts; last: {last}")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, http.client.IncompleteRead):
        return f"IncompleteRead, {len(exc.partial)} bytes of the last part"
    reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
    return f"{type(exc).__name__}: {reason}" if reason else type(exc).__name__


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


def verify_zip(path: Path | str, info: dict) -> tuple[int, dict]:
    """(image count, header of the first image) of a series zip as NBIA sends it; raises
    :class:`TciaDownloadError` when it does not match its ``md5hashes.csv`` or ``ImageCount``."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = [i.filename for i in zf.infolist() if not i.is_dir()]
            images = [n for n in names if n not in (LICENSE_ENTRY, MD5_LIST)]
            if MD5_LIST not in names:
                raise TciaDownloadError(f"the zip holds no {MD5_LIST}: its images cannot be verified")
            rows = _md5_rows(zf, len(images))
            if not rows or [c.strip() for c in rows[0]] != MD5_HEADER:
                raise TciaDownloadError(f"{MD5_LIST}: header {rows[0] if rows else []} is not NBIA's "
                                        f"{','.join(MD5_HEADER)}")
            listed: dict[str, str] = {}
            for row in rows[1:]:
                if not row:
                    continue
                if len(row) != 2 or not re.fullmatch(r"[0-9A-Fa-f]{32}", row[1].strip()):
                    raise TciaDownloadError(f"{MD5_LIST}: row {row} is not 'Filename,MD5Hash'")
                listed[row[0].strip()] = row[1].strip().lower()
            unlisted = sorted(set(images) - set(listed))
            absent = sorted(set(listed) - set(images) - ({LICENSE_ENTRY} & set(names)))
            if unlisted or absent:
                raise TciaDownloadError(f"{MD5_LIST} and the zip differ: not listed {unlisted[:3]}, "
                                        f"not in the zip {absent[:3]}")
            for name in images:
                h = hashlib.md5()
                with zf.open(name) as fh:
                    for block in iter(lambda: fh.read(_CHUNK), b""):
                        h.update(block)
                if h.hexdigest() != listed[name]:
                    raise TciaDownloadError(f"{name}: md5 {h.hexdigest()} != {listed[name]} of {MD5_LIST}")
            expected = int(info.get("ImageCount") or 0)
            if expected and len(images) != expected:
                raise TciaDownloadError(f"zip holds {len(images)} images, getSeries says ImageCount {expected}")
            if not images:
                raise TciaDownloadError("zip holds no image")
            if LICENSE_ENTRY in names:
                _check_license(zf, listed)
            with zf.open(sorted(images)[0]) as first:  # its header only: a DBT image can be hundreds of MB
                tags = read_tags(first.read(_HEADER_BYTES), full=_Rewound(first))
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, UnicodeDecodeError) as exc:
        raise TciaDownloadError(f"not a readable zip ({_describe(exc)})") from None
    return len(images), {k: str(tags.get(k) or "") for k in ("PatientID", "StudyInstanceUID", "StudyDate",
                                                              "StudyTime")}


def download_series(client: NbiaClient, uids, series_dir: Path, *, workers: int = 2,
                    log=lambda msg: None) -> list[SeriesResult]:
    """Download and verify each series once; a verified series on disk is skipped (resume).
    A failure is that series' result, never the whole call's."""
    series_dir = Path(series_dir)
    series_dir.mkdir(parents=True, exist_ok=True)

    def fetch_verified(uid: str, info: dict, zpath: Path) -> tuple[int, dict, int]:
        with atomic_write(zpath, "wb") as fh:  # a hidden temporary file, renamed once verified
            size = client.fetch_zip(uid, fh)
            fh.flush()
            n, hdr = verify_zip(fh.name, info)
        return n, hdr, size

    def one(uid: str) -> SeriesResult:
        zpath, rec = DatasetLayout.tcia_series_files(series_dir, uid)
        if zpath.is_file() and rec.is_file():
            try:
                done = json.loads(rec.read_text())
                if done.get("status") in ("downloaded", "cached") and done.get("size") == zpath.stat().st_size:
                    return SeriesResult(**{**_result_fields(done), "status": "cached"})
            except (OSError, ValueError, TypeError):
                pass
        try:
            info = client.retrying(f"getSeries {uid}", lambda: client.series_info(uid))
            if info is None:
                msg = f"unknown to {client.server} or not public (getSeries answered nothing)"
                log(f"series {uid}: {msg}")
                return SeriesResult(uid, "missing", message=msg)
            endpoint = client.image_request(uid)[0]
            n, hdr, size = client.retrying(f"{endpoint} {uid}", lambda: fetch_verified(uid, info, zpath))
        except TciaDownloadError as exc:
            log(f"series {uid}: {exc}")
            return SeriesResult(uid, "failed", message=str(exc))
        except Exception as exc:  # noqa: BLE001 - whatever happens to one series is that series' failure
            log(f"series {uid}: {type(exc).__name__}: {exc}")
            return SeriesResult(uid, "failed", message=f"{type(exc).__name__}: {exc}")
        res = SeriesResult(uid, "downloaded", n, "", **hdr)
        with atomic_write(rec) as fh:
            fh.write(json.dumps({**asdict(res), "size": size, "server": client.server}, indent=2) + "\n")
        log(f"series {uid}: {n} images, md5 verified")
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
    participants = _participants({p for p, _ in studies}, studies)
    out = []
    for patient in sorted({p for p, _ in studies}):
        ordered = sorted(((k, v) for k, v in studies.items() if k[0] == patient),
                         key=lambda kv: (kv[1]["date"], kv[1]["time"], kv[0][1]))
        participant = participants[patient]
        for i, ((_, study), v) in enumerate(ordered):
            label = patient if i == 0 else f"{patient}_{i:02d}"
            out.append(TciaVisit(patient, study, f"{participant}_ses-{i + 1:02d}", label, tuple(sorted(v["series"]))))
    return out


def _participants(patients: set[str], studies: dict) -> dict[str, str]:
    """PatientID -> participant; two PatientIDs that normalize alike (``TCGA-02-0001`` and
    ``TCGA-020-001``) are two people: refused naming both, never merged into one visit; a
    PatientID with no letter or digit is refused naming a series of it."""
    out: dict[str, str] = {}
    by_norm: dict[str, str] = {}
    for patient in sorted(patients):
        try:
            norm = normalize_participant_id(patient)
        except ValueError:
            series = next(v["series"][0] for k, v in studies.items() if k[0] == patient)
            raise TciaManifestError(f"series {series}: PatientID {patient!r} has no letter or digit, so it names "
                                    "no participant; the series cannot be given a visit") from None
        if norm in by_norm:
            raise TciaManifestError(f"PatientIDs {by_norm[norm]!r} and {patient!r} both normalize to participant "
                                    f"{norm!r}: two people's data would be merged into one visit; refused")
        by_norm[norm] = patient
        out[patient] = norm
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
# the paths under downloads/tcia/ are built by core.layout.DatasetLayout (tcia_*)
MANIFEST_SUFFIXES = (".tcia", ".csv")


def manifests(tcia_root: Path) -> list[Path]:
    if not Path(tcia_root).is_dir():
        return []
    return sorted(p for p in Path(tcia_root).iterdir() if p.is_file() and p.suffix.lower() in MANIFEST_SUFFIXES
                  and not p.name.startswith("."))


def manifest_name(path: Path) -> str:
    """The partition key of a manifest: its file stem, made safe."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", Path(path).stem)


@dataclass(frozen=True)
class TciaVisitSource:
    """A TCIA visit's manifest, resolved CSV, labels and series zips (see core.sources)."""

    manifest: Path
    resolved: Path
    patient_id: str
    session_label: str
    zips: tuple[Path, ...]
