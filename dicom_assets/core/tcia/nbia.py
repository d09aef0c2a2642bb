"""The NBIA REST API of one server, as ``CBIIT/NBIA-TCIA``'s restAPI classes answer it.

Endpoints (``/nbia-api/services/<version>/...``):

- ``getSeries``: the series' metadata (``V1_getSeries`` / ``V4_getSeries``); nothing at all when
  the series is unknown to the server or not public.
- the zip with NBIA's MD5 list: ``getImageWithMD5Hash`` (``V1_/V4_getImageWithMD5Hash``: the
  images, then ``md5hashes.csv``), what ``tcia_utils`` calls; with a manifest's
  ``includeAnnotation=true``, ``getDCMImage?IncludeAnnotation=true&MD5Verification=true``
  (``V1_/V4_getDCMImage``), what the Data Retriever's CLI calls (``DataRetrieverCLI.
  downloadSingleSeries``): the images under their NBIA names, ``md5hashes.csv``, then the
  series' annotation files (``AnnotationDAO.getAnnotationFileNamesBySeriesUid``), which NBIA
  lists in no md5 file. ``V4_getImage?IncludeMD5=yes`` is not used: the parameter exists only
  since NBIA commit 6a85f7d1 (2025-11-26, in no release), and before it v4 answers 400
  "Invalid query parameter".

Versions deployed: v1 on every NBIA since 2020 (the Retriever's ``pubApiUrl``); v4's
``getSeries`` since 2025-03, its image endpoints since 2025-04 (commit 452287fd). A v4 endpoint
that answers 404 (an NBIA older than that) makes the client use v1 for the rest of its run, and
say so.

Failures: an outage (429, 502, 503, 504, no connection) is retried with exponential backoff,
capped at ``max_backoff``, honouring ``Retry-After``, until ``retry_window`` seconds have
passed; any other transient failure (a 500, a cut-off stream, a zip that does not verify) is
retried ``retries`` times; a refusal (4xx) is not retried.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

from ..errors import DicomAssetsError
from .manifest import PUBLIC_SERVERS, normalize_server

API_PATH = "/nbia-api/services"
API_VERSIONS = ("v4", "v1")
DEFAULT_API_VERSION = "v4"
OUTAGE_STATUSES = (429, 502, 503, 504)
_CHUNK = 1 << 20


class TciaDownloadError(DicomAssetsError):
    """A series that could not be downloaded or verified. ``transient`` ones are retried;
    ``outage`` ones (the server is away) for as long as the retry window lasts, after
    ``retry_after`` seconds when the server said so."""

    def __init__(self, message: str, *, transient: bool = True, outage: bool = False,
                 retry_after: float | None = None, status: int | None = None):
        super().__init__(message)
        self.transient, self.outage, self.retry_after, self.status = transient, outage, retry_after, status


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` (RFC 9110 10.2.3): delay-seconds or an HTTP-date; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


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
                 backoff: float = 1.0, timeout: float = 120, sleep=time.sleep, retry_window: float = 600,
                 max_backoff: float = 60, clock=time.monotonic):
        if version not in API_VERSIONS:
            raise ValueError(f"NBIA API version {version!r}: one of {', '.join(API_VERSIONS)}")
        self.server = normalize_server(server)
        self.version = version
        self.retries, self.backoff, self.timeout, self.sleep = retries, backoff, timeout, sleep
        self.retry_window, self.max_backoff, self.clock = retry_window, max_backoff, clock
        self.notes: list[str] = []  # what the client changed on its own (a v1 fallback), for the run's log
        self._lock = threading.Lock()
        self._opener = urllib.request.build_opener(_SameServerRedirects(self.server))

    @property
    def base(self) -> str:
        return f"{self.server}{API_PATH}/{self.version}"

    def image_request(self, uid: str, annotations: bool = False) -> tuple[str, dict]:
        """The endpoint and parameters of a series zip that carries ``md5hashes.csv`` (and the
        series' annotation files, with ``annotations``)."""
        if annotations:  # V1_/V4_getDCMImage, as DataRetrieverCLI.downloadSingleSeries asks it
            return "getDCMImage", {"SeriesInstanceUID": uid, "IncludeAnnotation": "true", "MD5Verification": "true"}
        return "getImageWithMD5Hash", {"SeriesInstanceUID": uid}  # V1_/V4_getImageWithMD5Hash

    def _fall_back_to_v1(self, endpoint: str) -> bool:
        with self._lock:
            if self.version != "v4":
                return self.version == "v1"
            self.version = "v1"
            self.notes.append(f"{self.server} has no v4 {endpoint} (404: an NBIA older than 2025-04, before v4's "
                              "image endpoints); using v1, the Data Retriever's API, for the rest of this run")
        return True

    def _open(self, endpoint: str, params: dict):
        what = f"{endpoint} {params.get('SeriesInstanceUID', '')}".strip()
        for _ in range(2):
            version = self.version
            url = f"{self.server}{API_PATH}/{version}/{endpoint}?{urllib.parse.urlencode(params)}"
            try:
                return self._opener.open(url, timeout=self.timeout)
            except RedirectRefused as exc:
                raise TciaDownloadError(f"{what}: {self.server} {exc.reason}", transient=False) from None
            except urllib.error.HTTPError as exc:
                if exc.code == 404 and version == "v4" and self._fall_back_to_v1(endpoint):
                    exc.close()
                    continue
                raise self._http_error(what, exc) from None
            except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
                raise TciaDownloadError(f"{what}: {self.server} unreachable ({_describe(exc)})", outage=True) from None
        raise TciaDownloadError(f"{what}: {self.server} answers 404 on v4 and v1", transient=False)

    def _http_error(self, what: str, exc: urllib.error.HTTPError) -> TciaDownloadError:
        try:
            detail = _error_text(exc.read(64 * 1024), exc.headers.get("Content-Type", ""))
        except (OSError, http.client.HTTPException):
            detail = ""
        finally:
            exc.close()
        outage = exc.code in OUTAGE_STATUSES
        after = retry_after_seconds(exc.headers.get("Retry-After")) if outage else None
        said = f"; Retry-After {exc.headers.get('Retry-After')}" if after is not None else ""
        return TciaDownloadError(f"{what}: HTTP {exc.code} from {self.server}" + (f": {detail}" if detail else "")
                                 + said, transient=exc.code >= 500 or outage, outage=outage, retry_after=after,
                                 status=exc.code)

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

    def fetch_zip(self, uid: str, out, annotations: bool = False) -> int:
        """Stream the series zip into the binary file ``out``; the number of bytes. NBIA builds
        the zip as it streams it (a ``StreamingOutput``, no length, no ``Accept-Ranges``), so a
        cut-off download cannot be resumed: it starts again from byte 0."""
        endpoint, params = self.image_request(uid, annotations)
        size = 0
        with self._open(endpoint, params) as resp:
            while True:
                try:
                    block = resp.read1(_CHUNK)  # what has arrived, to disk at once
                except (OSError, http.client.HTTPException) as exc:  # IncompleteRead: the stream was cut off
                    raise TciaDownloadError(f"{endpoint} {uid}: stream cut off after {size} bytes "
                                            f"({_describe(exc)}; NBIA builds the zip as it streams it, with no "
                                            "ranges, so the next attempt starts again at byte 0)") from None
                if not block:
                    return size
                out.write(block)  # a local write error (disk full) is not the server's: not retried
                size += len(block)

    def _delay(self, exc: TciaDownloadError, attempt: int, deadline: float) -> float | None:
        """Seconds to wait before the next attempt, or None when there is none."""
        if exc.outage:
            wait = exc.retry_after if exc.retry_after is not None else \
                min(self.max_backoff, self.backoff * 2 ** attempt)
            return wait if self.clock() + wait <= deadline else None
        if attempt >= self.retries:
            return None
        return min(self.max_backoff, self.backoff * 2 ** attempt)

    def retrying(self, what: str, fn):
        """``fn()``, again after a transient failure: see the module's note on failures."""
        deadline = self.clock() + self.retry_window
        attempt, transient_tries = 0, 0
        while True:
            try:
                return fn()
            except TciaDownloadError as exc:
                if not exc.transient:
                    raise
                wait = self._delay(exc, attempt if exc.outage else transient_tries, deadline)
                if wait is None:
                    window = f" within {self.retry_window:g} s" if exc.outage else ""
                    raise TciaDownloadError(f"{what}: failed after {attempt + 1} attempts{window}; last: {exc}",
                                            outage=exc.outage, retry_after=exc.retry_after,
                                            status=exc.status) from None
                if not exc.outage:
                    transient_tries += 1
            attempt += 1
            self.sleep(wait)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, http.client.IncompleteRead):
        return f"IncompleteRead, {len(exc.partial)} bytes of the last part"
    reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
    return f"{type(exc).__name__}: {reason}" if reason else type(exc).__name__
