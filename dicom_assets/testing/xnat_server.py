"""An XNAT-compatible HTTP server for tests and demos (no real XNAT can be installed here).

It implements the REST calls the real ``xnat`` (xnatpy) client makes, following XNAT 1.8's
API (reports version 1.8.10), and it **really unzips and parses** uploaded DICOMs with pydicom,
building scans from SeriesNumber/SeriesDescription, so a test checks what arrived.

Covered: ``/data/services/auth``, ``/data/auth``, ``/data/JSESSION``, ``/data/version`` (404),
``/xapi/siteConfig/buildInfo``, ``/xapi/schemas[/<name>]`` (XNAT's real ``xnat.xml`` and
``xdat.xml`` from the xnat 0.8.1 sdist), ``/data/search/elements``, projects (list, get,
create with PUT), subjects, experiments, scans, scan files, experiment resources and file
upload, ``/data/services/import`` (DICOM-zip, ``dest=/archive`` or ``/prearchive``,
``overwrite``, ``Ignore-Unparsable``), ``/data/prearchive/projects``, ``/data/services/archive``
and prearchive deletion. Authentication is enforced (JSESSION cookie or basic auth).

Fault injection: ``server.inject(path_prefix, kind, times=1)`` with kind ``500``, ``503``,
``drop`` (close the connection without an answer, after reading the request body) or
``slow`` (answer after ``slow_seconds``). ``server.max_concurrent_imports`` records the peak
number of simultaneous uploads.

Start by hand: ``dicom-assets xnat-test-server --port 8080 --user admin --password admin``.
"""

from __future__ import annotations

import base64
import io
import json
import re
import secrets
import shutil
import tempfile
import threading
import time
import uuid
import zipfile
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pydicom

VERSION = "1.8.10"


@dataclass
class Scan:
    id: str
    series_description: str
    modality: str
    files: dict[str, bytes] = field(default_factory=dict)  # name -> stored path (str)
    sop_uids: set[str] = field(default_factory=set)


@dataclass
class Experiment:
    id: str
    label: str
    project: str
    subject_id: str
    date: str = ""
    scans: dict[str, Scan] = field(default_factory=dict)
    resources: dict[str, dict[str, str]] = field(default_factory=dict)  # label -> name -> path


@dataclass
class Subject:
    id: str
    label: str
    project: str
    experiments: dict[str, Experiment] = field(default_factory=dict)  # label -> experiment


@dataclass
class Project:
    id: str
    name: str
    subjects: dict[str, Subject] = field(default_factory=dict)  # label -> subject
    resources: dict[str, dict[str, str]] = field(default_factory=dict)  # label -> name -> path


@dataclass
class PrearchiveEntry:
    project: str
    timestamp: str
    label: str
    subject: str
    files: list[tuple[str, bytes]]


class XnatTestServer:
    """The server's state, HTTP front end and fault switches."""

    def __init__(self, schemas_dir: Path, user: str = "admin", password: str = "admin",
                 host: str = "127.0.0.1", port: int = 0, storage: Path | None = None,
                 can_create_projects: bool = True):
        self.schemas_dir = Path(schemas_dir)
        self.users = {user: password}
        self.tokens: dict[str, str] = {}
        self.projects: dict[str, Project] = {}
        self.prearchive: dict[str, PrearchiveEntry] = {}
        self.storage = Path(storage or tempfile.mkdtemp(prefix="xnat-test-server-"))
        self.can_create_projects = can_create_projects
        self.lock = threading.RLock()
        self.faults: list[dict] = []
        self.slow_seconds = 3.0
        self.requests: list[tuple[str, str]] = []  # (method, path) seen, for tests
        self.imports = 0
        self.active_imports = 0
        self.max_concurrent_imports = 0
        self.import_seconds = 0.0  # time each import takes (tests of upload concurrency)
        self._counter = 0
        handler = type("Handler", (_Handler,), {"xnat": self})
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.thread: threading.Thread | None = None

    # ---------------------------------------------------------------- lifecycle
    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "XnatTestServer":
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def inject(self, path_prefix: str, kind: str, times: int = 1) -> None:
        with self.lock:
            self.faults.append({"prefix": path_prefix, "kind": kind, "times": times})

    def _take_fault(self, path: str) -> str | None:
        with self.lock:
            for f in self.faults:
                if path.startswith(f["prefix"]) and f["times"] > 0:
                    f["times"] -= 1
                    return f["kind"]
        return None

    def _next_id(self, prefix: str) -> str:
        with self.lock:
            self._counter += 1
            return f"XNAT_{prefix}{self._counter:05d}"

    # ---------------------------------------------------------------- model helpers
    def find_experiment(self, exp_id: str) -> Experiment | None:
        for p in self.projects.values():
            for s in p.subjects.values():
                for e in s.experiments.values():
                    if e.id == exp_id or e.label == exp_id:
                        return e
        return None

    def find_subject(self, subj_id: str) -> Subject | None:
        for p in self.projects.values():
            for s in p.subjects.values():
                if s.id == subj_id:
                    return s
        return None

    def archive_files(self, project: str, subject_label: str, session_label: str,
                      files: list[tuple[str, bytes]], overwrite: str | None) -> Experiment:
        """Store parsed DICOMs as scans of a session (creating subject and session)."""
        with self.lock:
            proj = self.projects[project]
            subj = proj.subjects.get(subject_label)
            if subj is None:
                subj = proj.subjects[subject_label] = Subject(self._next_id("S"), subject_label, project)
            exp = subj.experiments.get(session_label)
            if exp is not None and overwrite not in ("append", "delete"):
                raise _HttpError(409, f"Session already exists with matching files: {project}/{subject_label}/"
                                      f"{session_label}. Use overwrite=append or delete.")
            if exp is not None and overwrite == "delete":
                exp.scans.clear()
            if exp is None:
                exp = subj.experiments[session_label] = Experiment(self._next_id("E"), session_label, project, subj.id)
            folder = self.storage / project / subject_label / session_label
            for name, data in files:
                ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
                number = str(ds.get("SeriesNumber", "") or "0")
                scan = exp.scans.get(number)
                if scan is None:
                    scan = exp.scans[number] = Scan(number, str(ds.get("SeriesDescription", "") or ""),
                                                    str(ds.get("Modality", "") or ""))
                exp.date = exp.date or str(ds.get("StudyDate", "") or "")
                sop = str(ds.SOPInstanceUID)
                fname = f"{sop}.dcm"
                path = folder / "SCANS" / number / "DICOM" / fname
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
                scan.files[fname] = str(path)
                scan.sop_uids.add(sop)
            return exp


class _HttpError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _result_set(rows: list[dict]) -> dict:
    return {"ResultSet": {"Result": rows, "totalRecords": str(len(rows))}}


def _item(xsi_type: str, data_fields: dict, children: list | None = None) -> dict:
    return {"items": [{"data_fields": data_fields, "meta": {"xsi:type": xsi_type, "isHistory": False},
                       "children": children or []}]}


def parse_upload_zip(body: bytes, ignore_unparsable: bool) -> tuple[list[tuple[str, bytes]], list[str]]:
    """(DICOM files, names that are not DICOM). Raises on a broken zip."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(body))
    except zipfile.BadZipFile:
        raise _HttpError(400, "The uploaded file is not a valid zip archive (upload interrupted?)") from None
    good, bad = [], []
    with zf:
        for info in zf.infolist():
            if info.is_dir():
                continue
            data = zf.read(info)
            try:
                # like XNAT's importer, accept data sets without the 128-byte preamble too
                ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
                if "SOPInstanceUID" not in ds or "StudyInstanceUID" not in ds:
                    raise ValueError("no SOPInstanceUID/StudyInstanceUID")
                good.append((info.filename, data))
            except Exception:
                bad.append(info.filename)
    if bad and not ignore_unparsable:
        raise _HttpError(400, f"Unable to parse {len(bad)} file(s) as DICOM (e.g. {bad[0]}); "
                              "the upload was refused")
    return good, bad


class _Handler(BaseHTTPRequestHandler):
    xnat: XnatTestServer
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # quiet
        pass

    # ------------------------------------------------------------------ plumbing
    def _send(self, status: int, body: bytes | str | dict | list = b"", ctype: str | None = None,
              headers: dict | None = None) -> None:
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            ctype = ctype or "application/json"
        elif isinstance(body, str):
            body = body.encode()
            ctype = ctype or "text/plain"
        self.send_response(status)
        self.send_header("Content-Type", ctype or "text/plain")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(n) if n else b""

    def _user(self) -> str | None:
        cookie = self.headers.get("Cookie", "")
        m = re.search(r"JSESSIONID=([^;\s]+)", cookie)
        if m and m.group(1) in self.xnat.tokens:
            return self.xnat.tokens[m.group(1)]
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            try:
                user, _, pw = base64.b64decode(auth[6:]).decode().partition(":")
            except ValueError:
                return None
            if self.xnat.users.get(user) == pw:
                return user
        return None

    def _dispatch(self) -> None:
        url = urlparse(self.path)
        path = url.path.rstrip("/") or "/"
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        self.xnat.requests.append((self.command, path))
        body = self._body() if self.command in ("PUT", "POST") else b""
        fault = self.xnat._take_fault(path)
        if fault == "drop":
            self.close_connection = True
            self.connection.shutdown(2)
            return
        if fault == "slow":
            time.sleep(self.xnat.slow_seconds)
        elif fault in ("500", "502", "503", "504"):
            self._send(int(fault), f"<html><h3>Injected error {fault}</h3></html>", "text/html")
            return
        try:
            self._route(self.command, path, query, body)
        except _HttpError as exc:
            self._send(exc.status, exc.message)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _dispatch

    # ------------------------------------------------------------------ routes
    def _route(self, method: str, path: str, q: dict, body: bytes) -> None:
        x = self.xnat
        if path in ("/data/services/auth",) and method in ("PUT", "POST"):
            form = {k: v[-1] for k, v in parse_qs(body.decode()).items()}
            if x.users.get(form.get("username")) != form.get("password"):
                raise _HttpError(401, "<html><h3>Login attempt failed. Please try again.</h3></html>")
            token = secrets.token_hex(16).upper()
            x.tokens[token] = form["username"]
            self._send(200, token, headers={"Set-Cookie": f"JSESSIONID={token}; Path=/; HttpOnly"})
            return
        if path == "/":
            self._send(200, "<html>XNAT test server</html>", "text/html")
            return
        user = self._user()
        if user is None:
            raise _HttpError(401, "<html><h3>Login attempt failed. Please try again.</h3></html>")
        if path == "/data/auth":
            return self._send(200, f"User '{user}' is logged in")
        if path == "/data/JSESSION":
            if method == "DELETE":
                m = re.search(r"JSESSIONID=([^;\s]+)", self.headers.get("Cookie", ""))
                if m:
                    x.tokens.pop(m.group(1), None)
                return self._send(200, "")
            m = re.search(r"JSESSIONID=([^;\s]+)", self.headers.get("Cookie", ""))
            return self._send(200, m.group(1) if m else "")
        if path == "/data/version":
            raise _HttpError(404, "Not found")
        if path == "/xapi/siteConfig/buildInfo":
            return self._send(200, {"version": VERSION, "buildNumber": "test", "commit": "test"})
        if path == "/xapi/schemas":
            return self._send(200, ["xnat", "xdat"])
        m = re.fullmatch(r"/xapi/schemas/(\w+)(?:/\w+\.xsd)?", path)
        if m:
            f = x.schemas_dir / f"{m.group(1)}.xml"
            if not f.exists():
                raise _HttpError(404, "no such schema")
            return self._send(200, f.read_bytes(), "application/xml")
        if path.startswith("/data/search/elements/"):
            return self._send(200, _result_set([
                {"FIELD_ID": f, "HEADER": f.title(), "SUMMARY": f, "TYPE": "string", "REQUIRES_VALUE": "false",
                 "DESC": f, "ELEMENT_NAME": path.rsplit("/", 1)[-1]} for f in ("ID", "LABEL", "PROJECT", "DATE")]))
        if path == "/data/search/elements":
            return self._send(200, _result_set([
                {"ELEMENT_NAME": "xnat:projectData", "COUNT": str(len(x.projects))},
                {"ELEMENT_NAME": "xnat:subjectData", "COUNT": "0"},
                {"ELEMENT_NAME": "xnat:mrSessionData", "COUNT": "0"},
            ]))
        if path == "/data/services/import" and method == "POST":
            return self._import(q, body)
        if path == "/data/services/archive" and method == "POST":
            return self._archive_prearchive(q, body)
        if path.startswith("/data/prearchive"):
            return self._prearchive(method, path, q)
        if path.startswith("/data/archive/"):
            path = "/data/" + path[len("/data/archive/"):]
        return self._data(method, path, q, body)

    # projects / subjects / experiments / scans / resources
    def _data(self, method: str, path: str, q: dict, body: bytes) -> None:
        x = self.xnat
        parts = path.strip("/").split("/")[1:]  # drop "data"
        with x.lock:
            if parts == ["projects"]:
                return self._send(200, _result_set([
                    {"ID": p.id, "secondary_ID": p.id, "name": p.name, "description": "", "pi_firstname": "",
                     "pi_lastname": "", "URI": f"/data/projects/{p.id}", "xsiType": "xnat:projectData"}
                    for p in x.projects.values()]))
            if len(parts) == 2 and parts[0] == "projects":
                pid = parts[1]
                if method == "PUT":
                    if not x.can_create_projects:
                        raise _HttpError(403, f"User does not have permission to create project {pid}")
                    x.projects.setdefault(pid, Project(pid, q.get("name") or pid))
                    return self._send(200, pid)
                if method == "DELETE":
                    x.projects.pop(pid, None)
                    return self._send(200, "")
                p = self._project(pid)
                return self._send(200, _item("xnat:projectData", {"ID": p.id, "secondary_ID": p.id, "name": p.name}))
            if len(parts) >= 3 and parts[0] == "projects" and parts[2] == "resources":
                p = self._project(parts[1])
                return self._resources(method, p.resources, parts[2:], x.storage / p.id / "RESOURCES",
                                       f"/data/projects/{p.id}", body)
            if len(parts) >= 3 and parts[0] == "projects" and parts[2] == "subjects":
                p = self._project(parts[1])
                if len(parts) == 3:
                    return self._send(200, _result_set([
                        {"ID": s.id, "label": s.label, "project": p.id, "insert_date": "",
                         "URI": f"/data/subjects/{s.id}", "xsiType": "xnat:subjectData"}
                        for s in p.subjects.values()]))
                subj = p.subjects.get(parts[3]) or next((s for s in p.subjects.values() if s.id == parts[3]), None)
                if len(parts) == 4:
                    if method == "PUT":
                        if subj is None:
                            subj = p.subjects[parts[3]] = Subject(x._next_id("S"), parts[3], p.id)
                        return self._send(201 if subj else 200, subj.id)
                    if subj is None:
                        raise _HttpError(404, f"Subject {parts[3]} not found")
                    return self._send(200, self._subject_item(subj))
                if subj is None:
                    raise _HttpError(404, f"Subject {parts[3]} not found")
                return self._experiments(method, subj, parts[4:], q, body)
            if len(parts) >= 2 and parts[0] == "subjects":
                subj = x.find_subject(parts[1])
                if subj is None:
                    raise _HttpError(404, f"Subject {parts[1]} not found")
                if len(parts) == 2:
                    return self._send(200, self._subject_item(subj))
                return self._experiments(method, subj, parts[2:], q, body)
            if len(parts) >= 2 and parts[0] == "experiments":
                exp = x.find_experiment(parts[1])
                if exp is None:
                    raise _HttpError(404, f"Experiment {parts[1]} not found")
                return self._experiment(method, exp, parts[2:], q, body)
            if parts == ["experiments"]:
                rows = []
                for p in x.projects.values():
                    for s in p.subjects.values():
                        for e in s.experiments.values():
                            rows.append(self._exp_row(e))
                return self._send(200, _result_set(rows))
        raise _HttpError(404, f"Not found: {path}")

    def _project(self, pid: str) -> Project:
        p = self.xnat.projects.get(pid)
        if p is None:
            raise _HttpError(404, f"Project {pid} not found")
        return p

    def _subject_item(self, s: Subject) -> dict:
        return _item("xnat:subjectData", {"ID": s.id, "label": s.label, "project": s.project})

    @staticmethod
    def _exp_row(e: Experiment) -> dict:
        return {"ID": e.id, "label": e.label, "project": e.project, "subject_ID": e.subject_id, "date": e.date,
                "xsiType": "xnat:mrSessionData", "URI": f"/data/experiments/{e.id}", "insert_date": ""}

    def _experiments(self, method, subj: Subject, rest: list[str], q: dict, body: bytes) -> None:
        if rest == ["experiments"]:
            return self._send(200, _result_set([self._exp_row(e) for e in subj.experiments.values()]))
        if len(rest) >= 2 and rest[0] == "experiments":
            exp = subj.experiments.get(rest[1]) or next((e for e in subj.experiments.values() if e.id == rest[1]), None)
            if exp is None:
                raise _HttpError(404, f"Experiment {rest[1]} not found")
            return self._experiment(method, exp, rest[2:], q, body)
        raise _HttpError(404, "Not found")

    def _experiment(self, method, exp: Experiment, rest: list[str], q: dict, body: bytes) -> None:
        if not rest:
            if method == "DELETE":
                for p in self.xnat.projects.values():
                    for s in p.subjects.values():
                        if s.experiments.get(exp.label) is exp:
                            del s.experiments[exp.label]
                return self._send(200, "")
            return self._send(200, _item("xnat:mrSessionData", {
                "ID": exp.id, "label": exp.label, "project": exp.project, "subject_ID": exp.subject_id,
                "date": exp.date}))
        if rest == ["scans"]:
            return self._send(200, _result_set([
                {"ID": s.id, "xnat_imagescandata_id": s.id, "type": s.series_description,
                 "series_description": s.series_description, "quality": "usable", "note": "",
                 "xsiType": "xnat:mrScanData" if s.modality == "MR" else "xnat:otherDicomScanData",
                 "URI": f"/data/experiments/{exp.id}/scans/{s.id}"}
                for s in sorted(exp.scans.values(), key=lambda s: int(s.id) if s.id.isdigit() else 0)]))
        if len(rest) >= 2 and rest[0] == "scans":
            scan = exp.scans.get(rest[1])
            if scan is None:
                raise _HttpError(404, f"Scan {rest[1]} not found")
            if len(rest) == 2:
                return self._send(200, _item("xnat:mrScanData", {
                    "ID": scan.id, "type": scan.series_description, "series_description": scan.series_description,
                    "image_session_ID": exp.id, "frames": len(scan.files)}))
            if rest[2:] in (["files"], ["resources", "DICOM", "files"]):
                return self._send(200, _result_set([
                    {"Name": n, "Size": str(Path(p).stat().st_size), "collection": "DICOM",
                     "URI": f"/data/experiments/{exp.id}/scans/{scan.id}/resources/DICOM/files/{n}"}
                    for n, p in sorted(scan.files.items())]))
            if rest[2:] == ["resources"]:
                return self._send(200, _result_set([{"xnat_abstractresource_id": "DICOM", "label": "DICOM",
                                                     "element_name": "xnat:resourceCatalog", "category": "scans",
                                                     "file_count": str(len(scan.files)), "format": "DICOM"}]))
        if rest and rest[0] == "resources":
            return self._resources(method, exp.resources, rest, self.xnat.storage / exp.project / exp.label / "RESOURCES",
                                   f"/data/experiments/{exp.id}", body)
        raise _HttpError(404, "Not found")

    def _resources(self, method: str, resources: dict, rest: list[str], folder, uri: str, body: bytes) -> None:
        """Resource folders of an experiment or a project: list, create, upload, download."""
        if rest == ["resources"]:
            return self._send(200, _result_set([
                # as XNAT: no ID/URI columns, the id is xnat_abstractresource_id, the type element_name
                {"xnat_abstractresource_id": label, "label": label, "element_name": "xnat:resourceCatalog",
                 "category": "resources", "file_count": str(len(files)), "format": ""}
                for label, files in resources.items()]))
        label = rest[1]
        if len(rest) == 2:
            if method == "PUT":
                resources.setdefault(label, {})
                return self._send(200, "")
            if label not in resources:
                raise _HttpError(404, f"Resource {label} not found")
            return self._send(200, _item("xnat:resourceCatalog", {"xnat_abstractresource_id": label, "label": label}))
        if rest[2:] == ["files"]:
            files = resources.get(label)
            if files is None:
                raise _HttpError(404, f"Resource {label} not found")
            return self._send(200, _result_set([
                {"Name": n, "Size": str(Path(p).stat().st_size), "URI": f"{uri}/resources/{label}/files/{n}"}
                for n, p in sorted(files.items())]))
        if len(rest) == 4 and rest[2] == "files":
            name = rest[3]
            if method in ("PUT", "POST"):
                (folder / label).mkdir(parents=True, exist_ok=True)
                data = body
                ctype = self.headers.get("Content-Type", "")
                if ctype.startswith("multipart/form-data"):
                    data = _first_multipart_part(data, ctype)
                (folder / label / name).write_bytes(data)
                resources.setdefault(label, {})[name] = str(folder / label / name)
                return self._send(200, "")
            path = resources.get(label, {}).get(name)
            if path is None:
                raise _HttpError(404, f"File {name} not found")
            return self._send(200, Path(path).read_bytes(), "application/octet-stream")
        raise _HttpError(404, "Not found")

    # the import service
    def _import(self, q: dict, body: bytes) -> None:
        x = self.xnat
        with x.lock:
            x.imports += 1
            x.active_imports += 1
            x.max_concurrent_imports = max(x.max_concurrent_imports, x.active_imports)
        try:
            if x.import_seconds:  # a slow archive, so that concurrent uploads overlap visibly
                time.sleep(x.import_seconds)
            if q.get("import-handler", "DICOM-zip") not in ("DICOM-zip", "gradual-DICOM", "SI"):
                raise _HttpError(400, f"Unknown import handler {q.get('import-handler')}")
            project = q.get("project")
            if not project or project not in x.projects:
                raise _HttpError(400, f"Project {project!r} does not exist")
            ignore = q.get("Ignore-Unparsable", "false").lower() == "true"
            files, _bad = parse_upload_zip(body, ignore)
            if not files:
                raise _HttpError(400, "The upload holds no DICOM file")
            studies = {pydicom.dcmread(io.BytesIO(d), stop_before_pixels=True, force=True).StudyInstanceUID
                       for _, d in files}
            if len(studies) > 1:
                raise _HttpError(400, "The upload contains files for multiple imaging sessions")
            subject = q.get("subject") or "unknown"
            session = q.get("session") or subject + "_MR"
            dest = q.get("dest", "/archive")
            if dest.startswith("/prearchive"):
                ts = time.strftime("%Y%m%d_%H%M%S") + f"{uuid.uuid4().int % 1000:03d}"
                with x.lock:
                    x.prearchive[f"{project}/{ts}/{session}"] = PrearchiveEntry(project, ts, session, subject, files)
                return self._send(200, f"/data/prearchive/projects/{project}/{ts}/{session}\r\n")
            exp = x.archive_files(project, subject, session, files, q.get("overwrite"))
            return self._send(200, f"/data/archive/projects/{project}/subjects/{exp.subject_id}/experiments/{exp.id}\r\n")
        finally:
            with x.lock:
                x.active_imports -= 1

    def _prearchive(self, method: str, path: str, q: dict) -> None:
        x = self.xnat
        parts = path.strip("/").split("/")[2:]  # after data/prearchive
        if parts in ([], ["projects"]):
            rows = [self._pre_row(k, e) for k, e in x.prearchive.items()]
            return self._send(200, _result_set(rows))
        if len(parts) == 2 and parts[0] == "projects":
            return self._send(200, _result_set([self._pre_row(k, e) for k, e in x.prearchive.items()
                                                if e.project == parts[1]]))
        if len(parts) == 4 and parts[0] == "projects":
            key = "/".join(parts[1:])
            if method == "DELETE":
                if x.prearchive.pop(key, None) is None:
                    raise _HttpError(404, "No such prearchive session")
                return self._send(200, "")
            e = x.prearchive.get(key)
            if e is None:
                raise _HttpError(404, "No such prearchive session")
            return self._send(200, _result_set([self._pre_row(key, e)]))
        raise _HttpError(404, "Not found")

    @staticmethod
    def _pre_row(key: str, e: PrearchiveEntry) -> dict:
        return {"project": e.project, "timestamp": e.timestamp, "name": e.label, "folderName": e.label,
                "subject": e.subject, "status": "READY", "url": f"/prearchive/projects/{key}",
                "uploaded": "", "lastmod": "", "scan_date": "", "scan_time": "", "tag": "", "TIMEZONE": "",
                "prevent_anon": "false", "prevent_auto_commit": "false", "SOURCE": "", "VISIT": "",
                "PROTOCOL": "", "TIMEZONE_ID": ""}

    def _archive_prearchive(self, q: dict, body: bytes) -> None:
        x = self.xnat
        form = {k: v[-1] for k, v in parse_qs(body.decode(errors="replace")).items()}
        src = q.get("src") or form.get("src") or ""
        key = src.replace("/data/prearchive/projects/", "").replace("/prearchive/projects/", "").strip("/")
        e = x.prearchive.get(key)
        if e is None:
            raise _HttpError(404, f"No prearchive session {src}")
        overwrite = q.get("overwrite") or form.get("overwrite")
        subject = q.get("subject") or form.get("subject") or e.subject
        label = q.get("label") or form.get("label") or e.label
        exp = x.archive_files(e.project, subject, label, e.files, overwrite)
        x.prearchive.pop(key, None)
        return self._send(200, f"/data/archive/projects/{e.project}/subjects/{exp.subject_id}/experiments/{exp.id}")


def _first_multipart_part(body: bytes, ctype: str) -> bytes:
    m = re.search(r"boundary=([^;]+)", ctype)
    if not m:
        return body
    boundary = b"--" + m.group(1).strip('"').encode()
    for part in body.split(boundary):
        head, sep, data = part.partition(b"\r\n\r\n")
        if sep and b"Content-Disposition" in head:
            return data[:-2] if data.endswith(b"\r\n") else data
    return body


def serve_forever(schemas_dir: Path, host: str, port: int, user: str, password: str) -> None:
    server = XnatTestServer(schemas_dir, user, password, host, port)
    print(f"XNAT test server (API of XNAT {VERSION}) on {server.url}  user={user}  storage={server.storage}",
          flush=True)
    try:
        server.httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()
        shutil.rmtree(server.storage, ignore_errors=True)
