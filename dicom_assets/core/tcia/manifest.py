"""TCIA manifests: the ``.tcia`` file the NBIA Data Retriever reads, the portal's CSV exports,
the NBIA server a manifest may be sent to, and the partition name of a manifest file."""

from __future__ import annotations

import csv
import hashlib
import io
import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DicomAssetsError

UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
LIST_KEY = "ListOfSeriesToDownload"
SERVLET_PATH = "/nbia-download/servlet/DownloadServlet"  # what a manifest's downloadServerUrl ends with
# the public NBIA servers of TCIA (tcia_utils' "nbia" and "nlst" hosts); the first is the default
PUBLIC_SERVERS = ("https://nbia.cancerimagingarchive.net", "https://nlst.cancerimagingarchive.net")
# TCIA's retired hosts, named by the manifests its portal wrote until about 2023 (LIDC-IDRI,
# TCGA-LUAD, RIDER Neuro MRI, ...: ``public.``; scripts and older baskets: ``services.``). TCIA's
# own client reads no host from a manifest at all (tcia_utils' ``manifestToList`` drops the six
# header lines and asks its ``nbia`` host, ``setApiUrl``), so a manifest naming one of these is
# asked at today's public servers: ``nbia`` first, then ``nlst`` (NLST was served by ``public.``
# before it got a host of its own).
RETIRED_HOSTS = ("public.cancerimagingarchive.net", "services.cancerimagingarchive.net")
# CSV exports: the portal's cart "Download CSV" (v4 getSeriesMetadata), its older cart CSV, BigQuery-style
CSV_SERIES_COLUMNS = ("SeriesInstanceUID", "Series ID", "series_instance_uid")
CSV_STUDY_COLUMNS = ("StudyInstanceUID", "Study UID", "study_instance_uid")
MANIFEST_SUFFIXES = (".tcia", ".csv")


class TciaManifestError(DicomAssetsError):
    """A manifest that cannot be read; the message names the file and the line."""


@dataclass(frozen=True)
class TciaManifest:
    path: str
    series: tuple[str, ...]
    header: dict = field(default_factory=dict)
    study_of: dict = field(default_factory=dict)  # series -> study, when the manifest says (CSV form)
    server: str | None = None  # the NBIA server the manifest names (None: a CSV export names none)
    duplicates: tuple[str, ...] = ()  # UIDs listed more than once (downloaded once)

    @property
    def include_annotation(self) -> bool:
        """The header's ``includeAnnotation`` (``true`` in every manifest TCIA's portal writes):
        the Data Retriever then asks for the series' annotation files too."""
        return self.header.get("includeAnnotation", "").strip().lower() == "true"


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


def _server_key(url: str) -> str:
    """A server as compared with the allow-list: host and path, case-insensitive, without the
    scheme (a manifest saved with ``http://`` names the same server as ``https://``)."""
    parts = urllib.parse.urlsplit(url.strip())
    return f"{parts.netloc.lower()}{parts.path.rstrip('/')}"


def manifest_servers(manifest: TciaManifest, servers, public=PUBLIC_SERVERS) -> list[str]:
    """The NBIA servers to ask for the manifest's series, in order (a series goes to the first
    that knows it). ``servers`` is the allow-list (TCIA_SERVERS); a manifest may not send the
    platform anywhere else:

    - a server it names that is on the list: that one, with the list's scheme (``https`` stays
      ``https`` when the manifest says ``http``);
    - one of TCIA's retired hosts (:data:`RETIRED_HOSTS`): the public servers (``public``,
      TCIA's own by default; a mirror's) that are on the list, as TCIA's own tools treat them;
    - none (a CSV export): every server on the list, the first first;
    - any other: refused, naming it.
    """
    allowed = [normalize_server(s) for s in servers]
    if not allowed:
        raise TciaManifestError("no TCIA server configured")
    if manifest.server is None:
        return allowed
    by_key = {_server_key(s): s for s in allowed}
    named = by_key.get(_server_key(manifest.server))
    if named is not None:
        return [named]
    host = urllib.parse.urlsplit(manifest.server).netloc.lower()
    if host in RETIRED_HOSTS:
        mapped = [by_key[_server_key(p)] for p in public if _server_key(p) in by_key]
        if mapped:
            return mapped
        raise TciaManifestError(f"{manifest.path}: its downloadServerUrl names {host}, a TCIA host retired since, "
                                f"whose series TCIA serves at {', '.join(public)}; none of them is a "
                                f"configured TCIA server ({', '.join(allowed)}; TCIA_SERVERS)")
    raise TciaManifestError(f"{manifest.path}: its downloadServerUrl names the server {manifest.server}, which "
                            f"is not one of the configured TCIA servers ({', '.join(allowed)}; TCIA_SERVERS)")


# ------------------------------------------------------------------------- manifest files
_SAFE_NAME = re.compile(r"[A-Za-z0-9._-]+")


def manifests(tcia_root: Path) -> list[Path]:
    if not Path(tcia_root).is_dir():
        return []
    return sorted(p for p in Path(tcia_root).iterdir() if p.is_file() and p.suffix.lower() in MANIFEST_SUFFIXES
                  and not p.name.startswith("."))


def manifest_name(path: Path) -> str:
    """The partition key of a manifest file, one per file and never changing when others arrive:
    the stem of a ``<stem>.tcia`` whose stem is already safe; for any other file (a ``.csv``, a
    ``.TCIA``, a stem with spaces or other characters) the stem made safe plus ``-`` and 8 hex
    digits of the file name's sha1, so ``Lung CT.tcia`` and ``Lung_CT.tcia``, or ``cart.tcia``
    and ``cart.csv``, are two manifests."""
    p = Path(path)
    if p.suffix == ".tcia" and _SAFE_NAME.fullmatch(p.stem):
        return p.stem
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", p.stem)
    return f"{safe}-{hashlib.sha1(p.name.encode()).hexdigest()[:8]}"


def manifest_files(tcia_root: Path) -> dict[str, Path]:
    """name -> manifest file; two files of one name (a crafted stem equal to another's hashed
    name) are refused naming both, never one read silently in place of the other."""
    out: dict[str, Path] = {}
    for m in manifests(tcia_root):
        name = manifest_name(m)
        if name in out:
            raise TciaManifestError(f"{out[name].name} and {m.name} in {tcia_root} both map to manifest name "
                                    f"{name!r}: rename one of them")
        out[name] = m
    return out
