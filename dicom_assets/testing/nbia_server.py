"""An NBIA-compatible HTTP server on loopback, for tests and the demo (TCIA's REST API).

Serves the documented v1 endpoints as the public NBIA does, under
``/nbia-api/services/v1/``: ``getSeries?SeriesInstanceUID=`` (a JSON array, empty for an
unknown series) and ``getImage?SeriesInstanceUID=`` (a zip of the series' DICOM files,
``1-NNN.dcm``, plus ``md5hashes.csv`` when the collection was built with md5s, as
``getImageWithMD5Hash`` gives). The series are real DICOM files (pydicom's and other
packages' scanner samples) rewritten per patient and study by :func:`build_collection`.

Faults: ``fail_next[uid] = n`` answers the next n ``getImage`` of a series with HTTP 503;
``truncate_next[uid] = n`` sends n zips that lack one file.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import threading
import urllib.parse
import zipfile
from dataclasses import dataclass, field
from datetime import date, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ..core.demo import _uid, rewrite_dicom, series_library

API = "/nbia-api/services/v1"


@dataclass
class Series:
    info: dict
    files: dict[str, bytes]
    with_md5: bool = True

    def zip_bytes(self, drop_one: bool = False) -> bytes:
        buf = io.BytesIO()
        names = sorted(self.files)[: -1 if drop_one else None]
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            rows = []
            for n in names:
                zf.writestr(n, self.files[n])
                rows.append({"filename": n, "md5hash": hashlib.md5(self.files[n]).hexdigest()})
            if self.with_md5:
                out = io.StringIO()
                w = csv.DictWriter(out, fieldnames=["filename", "md5hash"])
                w.writeheader()
                w.writerows(rows)
                zf.writestr("md5hashes.csv", out.getvalue())
        return buf.getvalue()


def build_collection(samples, patients: dict[str, int], *, collection: str = "DEMO-TCIA", seed: int = 0,
                     series_per_study: int = 2, files_per_series: int = 3) -> dict[str, Series]:
    """Series of real DICOM files: ``patients`` maps a PatientID to its number of studies.

    Studies of a patient get increasing dates, so their XNAT labels are known in advance:
    the first study ``<PatientID>``, then ``<PatientID>_01``, ...
    """
    lib = [t for t in series_library(samples, slices=files_per_series) if t.number in (3, 4, 5)]
    out: dict[str, Series] = {}
    for patient, n_studies in sorted(patients.items()):
        for k in range(n_studies):
            study_uid = _uid(collection, patient, k, seed)
            day = date(2020, 1, 6) + timedelta(days=30 * k)
            for s in range(series_per_study):
                tpl = lib[s % len(lib)]
                series_uid = _uid(collection, patient, k, s, seed)
                files = {}
                for i, src in enumerate(tpl.sources[:files_per_series]):
                    files[f"1-{i + 1:03d}.dcm"] = rewrite_dicom(
                        src, patient_id=patient, patient_name=patient, study_uid=study_uid, series_uid=series_uid,
                        sop_uid=_uid(collection, patient, k, s, i, seed), series_number=tpl.number,
                        series_description=tpl.description, instance_number=i + 1,
                        study_date=day.strftime("%Y%m%d"), study_time=f"{9 + s:02d}0000")
                out[series_uid] = Series({
                    "SeriesInstanceUID": series_uid, "StudyInstanceUID": study_uid, "PatientID": patient,
                    "Collection": collection, "Modality": "MR", "SeriesNumber": str(tpl.number),
                    "SeriesDescription": tpl.description, "StudyDate": day.isoformat(),
                    "ImageCount": len(files), "FileSize": sum(len(b) for b in files.values()),
                }, files)
    return out


@dataclass
class NbiaTestServer:
    series: dict[str, Series] = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 0
    fail_next: dict[str, int] = field(default_factory=dict)
    truncate_next: dict[str, int] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self):
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                parsed = urllib.parse.urlparse(self.path)
                q = dict(urllib.parse.parse_qsl(parsed.query))
                endpoint = parsed.path.rsplit("/", 1)[-1]
                if not parsed.path.startswith(API + "/"):
                    return self._send(404, b"not found", "text/plain")
                uid = q.get("SeriesInstanceUID", "")
                with server.lock:
                    server.requests.append((endpoint, uid))
                    s = server.series.get(uid)
                    if endpoint == "getSeries":
                        return self._send(200, json.dumps([s.info] if s else []).encode(), "application/json")
                    if endpoint in ("getImage", "getImageWithMD5Hash"):
                        if s is None:
                            return self._send(404, b"series not found", "text/plain")
                        if server.fail_next.get(uid, 0) > 0:
                            server.fail_next[uid] -= 1
                            return self._send(503, b"temporarily unavailable", "text/plain")
                        drop = server.truncate_next.get(uid, 0) > 0
                        if drop:
                            server.truncate_next[uid] -= 1
                        return self._send(200, s.zip_bytes(drop_one=drop), "application/zip")
                return self._send(404, b"unknown endpoint", "text/plain")

            def _send(self, code, body: bytes, ctype: str):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._httpd = ThreadingHTTPServer((self.host, self.port), Handler)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}{API}"

    def count(self, endpoint: str, uid: str | None = None) -> int:
        return sum(1 for e, u in self.requests if e == endpoint and (uid is None or u == uid))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._httpd.shutdown()
        self._httpd.server_close()


def manifest_text(series_uids, api_url: str, crlf: bool = False) -> str:
    """A ``.tcia`` manifest as TCIA's portal writes it."""
    lines = [f"downloadServerUrl={api_url}", "includeAnnotation=true", "noOfrRetry=4", "databasketId=manifest-demo.tcia",
             "manifestVersion=3.0", "ListOfSeriesToDownload=", *series_uids]
    return ("\r\n" if crlf else "\n").join(lines) + ("\r\n" if crlf else "\n")
