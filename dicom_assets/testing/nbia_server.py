"""An NBIA-compatible HTTP server on loopback, for tests and the demo (TCIA's REST API).

One instance is one NBIA server. TCIA runs several (``nbia.cancerimagingarchive.net`` for most
collections, ``nlst.cancerimagingarchive.net`` for NLST); tests start two instances on two
loopback ports and write manifests whose ``downloadServerUrl`` names one of them.

Each behaviour follows an NBIA class of ``CBIIT/NBIA-TCIA``
(``software/nbia-api/src/gov/nih/nci/nbia/restAPI/``), named where it is implemented:

- ``/nbia-api/services/v1/`` and ``/nbia-api/services/v4/``: ``getSeries``, ``getImage``,
  ``getImageWithMD5Hash``, ``getDCMImage``. v4 answers 400 to a query parameter it does not
  know; v1 ignores it.
- ``release``: which NBIA is deployed, as its v4 classes were added (``git log`` of
  ``restAPI/v4/``): ``"2025-11"`` (the default: ``V4_getImage`` takes ``IncludeMD5``, commit
  6a85f7d1), ``"2025-04"`` (v4's image endpoints, commit 452287fd, ``getImage`` without
  ``IncludeMD5``), ``"2025-03"`` (v4 ``getSeries`` only, commit 344209fa), ``"9.0"`` (the last
  release tag, 2024-04: no v4 at all). An endpoint a release lacks answers 404, the container's
  page.
- ``getDCMImage`` (``V1_getDCMImage`` / ``V4_getDCMImage``, what the Data Retriever's CLI
  asks): the images under NBIA's new names (``ImageDAO2Impl.setNewFileNames``, e.g.
  ``1-001.dcm``), ``md5hashes.csv`` when ``MD5Verification`` equals "true" in any case, then the
  series' annotation files (their stored base names, no md5) when ``IncludeAnnotation`` does.
- ``getSeries``: a JSON array; nothing at all (200, empty body) when no public series matches.
- ``getImage``: a streamed zip (chunked, no length): ``LICENSE`` first, then the images named
  ``00000001.dcm``, ``00000002.dcm``, ... (their original names with ``NewFileNames=Yes``); v4
  adds ``md5hashes.csv`` (header ``Filename,MD5Hash``) with ``IncludeMD5=yes``.
  ``getImageWithMD5Hash``: the images and ``md5hashes.csv``, no ``LICENSE``.
- A series that is unknown or not public: ``getSeries`` answers nothing, the zip endpoints 400
  with a text message.

``v4/V4_getImage.java`` as read (snapshot of 2026-06): the query parameters are checked first
(``SeriesInstanceUID``, ``NewFileNames``, ``IncludeMD5``; another one: 400, typed by the
method's ``@Produces``, ``application/octet-stream``), then a missing ``SeriesInstanceUID`` and
``isUserHasAccess`` (400, typed ``application/json``). The zip is ``application/octet-stream``
with ``Content-Disposition: attachment; filename="<uid>.zip"``: ``LICENSE``, the images
(``%08d`` + the stored extension, or the stored new names with ``NewFileNames`` equal to "yes"
in any case), then ``md5hashes.csv`` when ``IncludeMD5`` equals "yes" in any case. Without
``IncludeMD5`` the ``includeHash.equalsIgnoreCase`` after the images throws, the catch closes the
zip: a complete zip without the list, as here. Not modelled: ``getData.getUserName`` under the
keycloak configuration reads the ``Authorization`` header and would throw without one, yet
``tcia_utils`` (2026-06) calls v4 ``getImage`` with no header, so the deployed servers answer
anonymous calls; this server asks for no credentials.

The series are real DICOM files (pydicom's and other packages' scanner samples) rewritten per
patient and study by :func:`build_collection`.

Faults (per SeriesInstanceUID, each for the next n requests of a zip):
``fail(uid, n, status=500, html=True)`` an error page (HTML as a servlet container or proxy
sends it, or NBIA's plain text); ``cut_next[uid] = n`` the stream stops halfway and the
connection closes; ``short_next[uid] = n`` the zip ends early but complete, without its md5 list
(NBIA's answer when an image file is missing on its storage); ``corrupt_next[uid] = n`` one
image differs from the md5 NBIA's database holds; ``deny_image`` a series whose metadata is
public but whose images are refused (400); ``pause[uid] = threading.Event()`` the stream sends
its first half, then waits for the event.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import socket
import threading
import time
import urllib.parse
import zipfile
from dataclasses import dataclass, field
from datetime import date, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .demo import _uid, rewrite_dicom, series_library

API = "/nbia-api/services"
SERVLET = "/nbia-download/servlet/DownloadServlet"
LICENSE_TEXT = ("Creative Commons Attribution 4.0 International License (CC BY 4.0)\n"
                "https://creativecommons.org/licenses/by/4.0/\n")
# V4_getSeries, V4_getImage, V4_getImageWithMD5Hash: the query parameters each v4 endpoint accepts
V4_PARAMS = {
    "getSeries": {"Collection", "format", "PatientID", "StudyInstanceUID", "Modality", "BodyPartExamined",
                  "ManufacturerModelName", "Manufacturer", "SeriesInstanceUID"},
    "getImage": {"SeriesInstanceUID", "NewFileNames", "IncludeMD5"},
    "getImageWithMD5Hash": {"SeriesInstanceUID"},
    "getDCMImage": {"SeriesInstanceUID", "IncludeAnnotation", "MD5Verification"},
}
# the v4 endpoints of each NBIA deployed, and the parameters its V4_getImage allows
RELEASES = {
    "2025-11": ({"getSeries", "getImage", "getImageWithMD5Hash", "getDCMImage"},
                {"SeriesInstanceUID", "NewFileNames", "IncludeMD5"}),
    "2025-04": ({"getSeries", "getImage", "getImageWithMD5Hash", "getDCMImage"}, {"SeriesInstanceUID", "NewFileNames"}),
    "2025-03": ({"getSeries"}, set()),
    "9.0": (set(), set()),
}
# their @Produces: V4_getImage and V4_getImageWithMD5Hash APPLICATION_OCTET_STREAM; V4_getSeries
# {APPLICATION_XML, APPLICATION_JSON, TEXT_HTML, text/csv}
V4_PRODUCES = {"getSeries": "application/xml", "getImage": "application/octet-stream",
               "getImageWithMD5Hash": "application/octet-stream", "getDCMImage": "application/octet-stream"}
NOT_PROCESSED = "Server was not able to process your request"  # getData.formatResponse's 500
ERROR_PAGE = ("<!doctype html><html lang=\"en\"><head><title>HTTP Status {code} - {reason}</title></head>"
              "<body><h1>HTTP Status {code} - {reason}</h1><hr class=\"line\" /><p><b>Type</b> Status Report</p>"
              "<p><b>Description</b> The server encountered an unexpected condition.</p></body></html>")


@dataclass
class Series:
    info: dict
    files: dict[str, bytes]  # original file name -> bytes, in image order
    public: bool = True
    annotations: dict[str, bytes] = field(default_factory=dict)  # annotation file name -> bytes (no md5 in NBIA)

    def images(self, new_file_names: bool = False) -> list[tuple[str, bytes]]:
        # V1_getImage / V4_getImage: String.format("%08d", ++counter) + the stored file's extension
        out = []
        for i, (name, data) in enumerate(self.files.items(), 1):
            ext = name[name.rfind("."):] if "." in name else ""
            out.append((name if new_file_names else f"{i:08d}{ext}", data))
        return out


def lidc_annotation(series_uid: str, reader: int) -> bytes:
    """An annotation file as LIDC-IDRI's are (a radiologist's reading as XML, which NBIA keeps in
    its annotation store and sends after ``md5hashes.csv``), shortened; its bytes differ per series."""
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<LidcReadMessage uid="1.3.6.1.4.1.14519.5.2.1.6279.{reader}">\n'
            f'<ResponseHeader><SeriesInstanceUid>{series_uid}</SeriesInstanceUid></ResponseHeader>\n'
            f'<readingSession><servicingRadiologistID>{reader}</servicingRadiologistID></readingSession>\n'
            '</LidcReadMessage>\n').encode()


def build_collection(samples, patients: dict[str, int], *, collection: str = "DEMO-TCIA", seed: int = 0,
                     series_per_study: int = 2, files_per_series: int = 3, series_uids=None,
                     first_day: date = date(2020, 1, 6), annotated: bool = False) -> dict[str, Series]:
    """Series of real DICOM files: ``patients`` maps a PatientID to its number of studies.
    ``series_uids`` (an iterable) gives the SeriesInstanceUIDs to use, in order (a real
    manifest's, say); by default they are made up.

    Studies of a patient get increasing dates, so their XNAT labels are known in advance:
    the first study ``<PatientID>``, then ``<PatientID>_01``, ...

    ``annotated``: the first series of each study has an annotation file (:func:`lidc_annotation`).
    """
    lib = [t for t in series_library(samples, slices=files_per_series) if t.number in (3, 4, 5)]
    out: dict[str, Series] = {}
    given = iter(series_uids) if series_uids is not None else None
    for patient, n_studies in sorted(patients.items()):
        for k in range(n_studies):
            study_uid = _uid(collection, patient, k, seed)
            day = first_day + timedelta(days=30 * k)
            for s in range(series_per_study):
                tpl = lib[s % len(lib)]
                series_uid = next(given) if given is not None else _uid(collection, patient, k, s, seed)
                files = {}
                for i, src in enumerate(tpl.sources[:files_per_series]):
                    files[f"1-{i + 1:03d}.dcm"] = rewrite_dicom(
                        src, patient_id=patient, patient_name=patient, study_uid=study_uid, series_uid=series_uid,
                        sop_uid=_uid(collection, patient, k, s, i, seed), series_number=tpl.number,
                        series_description=tpl.description, instance_number=i + 1,
                        study_date=day.strftime("%Y%m%d"), study_time=f"{9 + s:02d}0000")
                out[series_uid] = Series({
                    "SeriesInstanceUID": series_uid, "StudyInstanceUID": study_uid, "PatientID": patient,
                    "Collection": collection, "Modality": "MR", "SeriesNumber": tpl.number,
                    "SeriesDescription": tpl.description, "StudyDate": day.isoformat(),
                    "ImageCount": len(files), "FileSize": sum(len(b) for b in files.values()),
                    "LicenseName": "Creative Commons Attribution 4.0 International License",
                    "LicenseURI": "https://creativecommons.org/licenses/by/4.0/",
                }, files, annotations={"069.xml": lidc_annotation(series_uid, s)} if annotated and s == 0 else {})
    return out


class _CutOff(Exception):
    """The stream is to stop here (a fault)."""


class _Chunked(io.RawIOBase):
    """HTTP/1.1 chunked framing of what the zip writer sends, as NBIA's StreamingOutput does."""

    def __init__(self, wfile, cut_after: int | None = None):
        self.wfile, self.cut_after, self.sent = wfile, cut_after, 0

    def writable(self):
        return True

    def write(self, b) -> int:
        data = bytes(b)
        if self.cut_after is not None and self.sent + len(data) > self.cut_after:
            self._chunk(data[: self.cut_after - self.sent])
            raise _CutOff
        self._chunk(data)
        return len(data)

    def _chunk(self, data: bytes) -> None:
        if data:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.sent += len(data)

    def finish(self) -> None:
        self.wfile.write(b"0\r\n\r\n")


@dataclass
class NbiaTestServer:
    series: dict[str, Series] = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 0
    name: str = "nbia"
    fail_next: dict[str, list[tuple[int, bool]]] = field(default_factory=dict)
    cut_next: dict[str, int] = field(default_factory=dict)
    short_next: dict[str, int] = field(default_factory=dict)
    corrupt_next: dict[str, int] = field(default_factory=dict)
    deny_image: set[str] = field(default_factory=set)
    pause: dict[str, threading.Event] = field(default_factory=dict)
    release: str = "2025-11"
    outage_until: float = 0.0
    outage_retry_after: str | None = None
    requests: list[tuple[str, str, dict]] = field(default_factory=list)  # (version, endpoint, query)

    def __post_init__(self):
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive and chunked streams, as NBIA behind its proxy

            def log_message(self, *args):
                pass

            def do_GET(self):
                parsed = urllib.parse.urlsplit(self.path)
                parts = parsed.path.split("/")
                # /nbia-api/services/<version>/<endpoint>
                if parsed.path.startswith(API + "/") and len(parts) == 5 and parts[3] in ("v1", "v4"):
                    version, endpoint = parts[3], parts[4]
                else:
                    return self._page(404)
                query = dict(urllib.parse.parse_qsl(parsed.query, keep_blank_values=True))
                with server.lock:
                    server.requests.append((version, endpoint, query))
                    down = time.monotonic() < server.outage_until
                if down:  # the proxy's maintenance page
                    return self._page(503, {"Retry-After": server.outage_retry_after}
                                      if server.outage_retry_after else None)
                endpoints, get_image = RELEASES[server.release]
                if endpoint not in V4_PARAMS or (version == "v4" and endpoint not in endpoints):
                    return self._page(404)
                if version == "v4":  # V4_getSeries / V4_getImage / V4_getImageWithMD5Hash: allowedParams
                    allowed = get_image if endpoint == "getImage" else V4_PARAMS[endpoint]
                    unknown = [p for p in query if p not in allowed]
                    if unknown:
                        # the message lists a Java Set.of, whose order varies between JVM runs (sorted
                        # here); the answer sets no type, so JAX-RS takes the method's @Produces:
                        # application/octet-stream for the zips, the first of getSeries' list (XML)
                        return self._send(400, (f"Invalid query parameter: '{unknown[0]}'. Allowed parameters are: "
                                                f"[{', '.join(sorted(allowed))}]").encode(),
                                          V4_PRODUCES[endpoint])
                if endpoint == "getSeries":
                    return self._get_series(version, query)
                return self._get_zip(version, endpoint, query)

            def _get_series(self, version, query):
                # V1_getSeries / V4_getSeries -> getData.formatResponse: only public series; none: 200, no body
                keys = ("SeriesInstanceUID", "StudyInstanceUID", "PatientID", "Collection", "Modality")
                with server.lock:
                    rows = [dict(s.info) for s in server.series.values() if s.public
                            and all(k not in query or str(s.info.get(k)) == query[k] for k in keys)]
                if not rows:
                    return self._send(200, b"", None)
                if version == "v4":
                    for r in rows:
                        r.update(Site=server.name.upper(), Authorized=1)
                fmt = (query.get("format") or "json").lower()
                if fmt == "json":
                    return self._send(200, json.dumps(rows).encode(), "application/json")
                if fmt == "csv":  # FormatOutput.toCsvQuoted
                    cols = list(rows[0])
                    lines = [",".join(f'"{str(r.get(c, ""))}"' for c in cols) for r in [dict(zip(cols, cols)), *rows]]
                    return self._send(200, ("\n".join(lines) + "\n").encode(), "text/csv")
                return self._send(500, NOT_PROCESSED.encode(), "text/plain")

            def _get_zip(self, version, endpoint, query):
                uid = query.get("SeriesInstanceUID")
                if uid is None:  # V1_getImage: the parameter is required
                    return self._send(400, b"A parameter, SeriesInstanceUID, is required for this API call.",
                                      "application/json")
                with server.lock:
                    s = server.series.get(uid)
                    fault = _take(server.fail_next, uid)
                    cut = _take(server.cut_next, uid)
                    short = _take(server.short_next, uid)
                    corrupt = _take(server.corrupt_next, uid)
                if s is None or not s.public or uid in server.deny_image:
                    # getData.isUserHasAccess false (unknown series too): 400, a text typed as JSON
                    msg = (f"Image with given SeriesInstanceUID,{uid}, is not in public domain." if version == "v1"
                           else f"The user has not been granted the access to image with given SeriesInstanceUID,"
                                f"{uid}. Please contact System Admin to resolve this issue.")
                    return self._send(400, msg.encode(), "application/json")
                if fault:
                    code, html = fault
                    return self._page(code) if html else self._send(code, NOT_PROCESSED.encode(), "text/plain")
                notes: dict[str, bytes] = {}
                if endpoint == "getImage":  # V1_getImage / V4_getImage
                    license_first = True
                    with_md5 = version == "v4" and (query.get("IncludeMD5") or "").lower() == "yes"
                    new_names = (query.get("NewFileNames") or "").lower() == "yes"
                elif endpoint == "getDCMImage":  # V1_getDCMImage / V4_getDCMImage: NBIA's names, then annotations
                    license_first, new_names = False, True
                    with_md5 = (query.get("MD5Verification") or "").lower() == "true"
                    if (query.get("IncludeAnnotation") or "").lower() == "true":
                        notes = s.annotations
                else:  # V1_getImageWithMD5Hash / V4_getImageWithMD5Hash
                    license_first, with_md5, new_names = False, True, False
                images = s.images(new_names)
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Disposition", f'attachment; filename="{uid}.zip"')
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                raw = _Chunked(self.wfile)
                try:
                    with io.BufferedWriter(raw, 64 * 1024) as buf, \
                            zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
                        if license_first:
                            zf.writestr("LICENSE", LICENSE_TEXT)
                        hashes = {}
                        for k, (name, data) in enumerate(images):
                            if cut and k == len(images) // 2:  # the connection drops halfway
                                buf.flush()
                                raw.cut_after = raw.sent
                                raise _CutOff
                            if uid in server.pause and k == len(images) // 2:  # a slow stream: half now
                                buf.flush()
                                server.pause[uid].wait(60)
                            if short and k == len(images) // 2:
                                # the file is missing on NBIA's storage: in V1_getImageWithMD5Hash's
                                # StreamingOutput a FileNotFoundException ends the loop, the finally
                                # closes the zip as it is and the md5 list is never written
                                with_md5 = False
                                break
                            hashes[name] = hashlib.md5(data).hexdigest()  # what NBIA's database holds
                            if corrupt and k == 0:
                                data = data[:-1] + bytes([data[-1] ^ 0xFF])
                            zf.writestr(name, data)
                        if with_md5:  # FormatOutput.toCsv: Filename,MD5Hash; rows in HashMap order
                            out = io.StringIO()
                            w = csv.writer(out, lineterminator="\n")
                            w.writerow(["Filename", "MD5Hash"])
                            w.writerows(sorted(hashes.items(), reverse=True))
                            zf.writestr("md5hashes.csv", out.getvalue())
                        for name, data in notes.items():  # getAnnotations: after the list, in no md5
                            zf.writestr(name, data)
                    raw.finish()
                except _CutOff:
                    self.close_connection = True
                    try:
                        self.wfile.flush()
                        self.connection.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

            def _page(self, code: int, headers: dict | None = None):
                reason = self.responses.get(code, ("Error",))[0]
                return self._send(code, ERROR_PAGE.format(code=code, reason=reason).encode(), "text/html;charset=utf-8",
                                  headers)

            def _send(self, code, body: bytes, ctype: str | None, headers: dict | None = None):
                self.send_response(code)
                if ctype:
                    self.send_header("Content-Type", ctype)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._httpd = ThreadingHTTPServer((self.host, self.port), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def server_url(self) -> str:
        """The server as a manifest names it (before ``/nbia-download/servlet/DownloadServlet``)."""
        return f"http://{self.host}:{self.port}"

    @property
    def download_server_url(self) -> str:
        return self.server_url + SERVLET

    def api(self, version: str = "v4") -> str:
        return f"{self.server_url}{API}/{version}"

    def outage(self, seconds: float, retry_after: int | str | None = None) -> None:
        """Every request answers 503 for ``seconds`` (with ``Retry-After`` when given)."""
        with self.lock:
            self.outage_until = time.monotonic() + seconds
            self.outage_retry_after = None if retry_after is None else str(retry_after)

    def fail(self, uid: str, times: int = 1, status: int = 500, html: bool = True) -> None:
        with self.lock:
            self.fail_next.setdefault(uid, []).extend([(status, html)] * times)

    def count(self, endpoint: str, uid: str | None = None, version: str | None = None) -> int:
        with self.lock:
            return sum(1 for v, e, q in self.requests if e == endpoint and (uid is None or
                       q.get("SeriesInstanceUID") == uid) and (version is None or v == version))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._httpd.shutdown()
        self._httpd.server_close()


def _take(faults: dict, uid: str):
    """Consume one fault of ``uid``: a count (True while it lasts) or a list of values."""
    left = faults.get(uid)
    if not left:
        return None
    if isinstance(left, list):
        return left.pop(0)
    faults[uid] = left - 1
    return True


def manifest_text(series_uids, server_url: str, *, basket_id: str = "manifest-1718000000000.tcia",
                  include_annotation: bool = True, crlf: bool = False) -> str:
    """A ``.tcia`` manifest byte for byte as TCIA's portal writes it (NBIA's ``ManifestMaker``:
    six header lines then one SeriesInstanceUID per line, each ended by ``\\n``).

    ``server_url`` is the NBIA server (``https://nbia.cancerimagingarchive.net``, a test server's
    :attr:`NbiaTestServer.server_url`); ``crlf`` gives the manifest as a Windows editor saves it.
    """
    lines = [f"downloadServerUrl={server_url.rstrip('/')}{SERVLET}",
             f"includeAnnotation={'true' if include_annotation else 'false'}", "noOfrRetry=4",
             f"databasketId={basket_id}", "manifestVersion=3.0", "ListOfSeriesToDownload=", *series_uids]
    eol = "\r\n" if crlf else "\n"
    return "".join(line + eol for line in lines)
