"""An XNAT-compatible HTTP server for tests and demos (no real XNAT can be installed here).

It implements the REST calls the real ``xnat`` (xnatpy) client makes, following XNAT 1.8/1.9
(it reports version 1.8.10), and it **really unzips and parses** uploaded DICOMs with pydicom.
It is strict on purpose: where XNAT refuses a request, so does this server. Each behaviour
below names the XNAT class (``NrgXnat/xnat-web``) it was read from; no XNAT code is copied.

* ``POST /data/services/import`` (``DICOM-zip``): the body must be ``application/zip``
  (``RequestUtil.deriveFileName`` + ``DicomZipImporter.importCompressedFile``); files are
  staged in the prearchive (``GradualDicomImporter``: a RECEIVING row per project +
  StudyInstanceUID + session label, joined when such a row is RECEIVING/READY/ERROR/CONFLICT),
  filtered by the site-wide and the project's series import filters (``set_series_import_filter``;
  ``series_import_filter`` is a shortcut for a site-wide blacklist) and optionally anonymized
  (``site_anonymization``); with
  ``dest=/archive`` the row goes ARCHIVING and is archived within the request, whatever the
  project's prearchive code (``DicomZipImporter.determiningDestination``; ``PrearcSessionArchiver``,
  ``MergePrearcToArchiveSession``, ``MergeSessionsA``): labels cleaned, subject matched
  case-insensitively, experiment labels unique per project. An existing session is merged into
  when the import sends ``overwrite`` (any value; ``Importer.parseOverrideValue``, which also
  overwrites any ``allowSessionMerge`` of the query) or the row's prearchive code is 4/5
  (``DicomZipImporter.archiveSession``); otherwise, or for files the session already holds
  (unless ``overwrite_files=true``, ``overwrite=delete`` or code 5), the row goes CONFLICT and
  the import answers 400 "Failed to archive 1 of 1 session(s)" (``xmlBuild``).
  ``Direct-Archive=true`` with ``dest`` fails as XNAT fails.
* Projects carry XNAT's prearchive code (``PrearchiveCode``: 0 Manual, 4 AutoArchive, 5
  AutoArchiveOverwrite; 4 for a new project, ``BaseXnatProjectdata.initArcProjectImpl``), read and
  set at ``/data/projects/<id>/prearchive_code[/<code>]`` (``ProjectResource``); each prearchive row
  keeps the code of its creation (``autoarchive``). The session rebuilder
  (``rebuild_idle_sessions``, ``start_session_rebuilder``: ``SessionXMLRebuilder``) builds idle
  RECEIVING rows and archives them only when their code is 4/5; a Manual row stays READY.
* Series import filters (``SeriesImportFilter``: ``DicomFilterService``,
  ``RegExBasedSeriesImportFilter``; blacklist and whitelist modes, ``[tag]`` sections, EXISTS)
  applied on receipt (``GradualDicomImporter``: an object must pass the site-wide and the
  project's filter) and read as XNAT's configuration service gives them:
  ``GET /data[/projects/<id>]/config/seriesImportFilter/config`` (``ConfigResource``).
* Prearchive: ``/data/prearchive/projects[/<p>[/<ts>/<name>]]``, ``POST /data/services/archive``
  (``Archiver``: always merges; ``overwrite=append|delete`` replaces files the session holds),
  ``POST /data/services/prearchive/delete`` (``PrearchiveBatchDelete``: locked rows stay) and
  ``DELETE`` of a row (refused with 409 while ARCHIVING).
* Projects with XNAT's accessibility (``private``/``protected``/``public``, ``protected`` by
  default as ``BaseXnatProjectdata.createProject`` sets it) and owner / member roles: who sees a
  project, its data, and what a GET, PUT or DELETE of it answers follow ``ProjectResource``,
  ``DefaultUserProjectCache.get`` and ``Permissions.canReadProject`` (see ``_project``).
* Uploaded files: a file without SOPClassUID or SOPInstanceUID is refused as
  ``GradualDicomImporter.call`` refuses it; StudyInstanceUID is not required (see
  ``parse_upload_zip``).
* Subject PUT as ``SubjectResource.handlePut`` does it: the label is kept as the URI gives it
  (not cleaned, not refused for its characters), only XFT's 255-character limit applies.
* Subjects, experiments (also at project level), scans with
  several resources (``DICOM`` plus e.g. ``SNAPSHOTS``), experiment and project resources
  (project resources need the owner role), ``/data/services/auth``, ``/data/JSESSION``,
  ``/xapi/siteConfig/buildInfo``, ``/xapi/schemas`` (XNAT's real ``xnat.xml``/``xdat.xml`` from
  the xnat 0.8.1 sdist), ``/data/search/elements``. Authentication is enforced (JSESSION
  cookie or basic auth).

Fault injection: ``server.inject(path_prefix, kind, times=1)`` with kind ``500``, ``503``,
``drop`` (close the connection without an answer, after reading the request body), ``slow``
(answer after ``slow_seconds``) or ``archive_error`` (the import is received, then archiving
fails: the prearchive row is left in ERROR, as XNAT leaves it; answered 500, whereas XNAT's
DICOM-zip importer would answer 400) or ``receiving_interrupt`` (more data for the row arrived
while XNAT built it: ``PrearchiveRebuildHandler.rebuild`` gives way, the row stays RECEIVING, the
import answers 200 with an empty body) or ``drop_mid_stream`` (the connection breaks after
``drop_fraction`` of the body arrived: the entries read so far stay in a RECEIVING row, which the
session rebuilder later archives as a partial session in a project set to auto-archive; no
answer) or ``storage_error`` (``GradualDicomImporter`` cannot write the files after
``storage_error_after`` of them: under Ignore-Unparsable they are dropped and the import answers
200, the session archived without them; without it the import stops mid-zip, 400).
``server.on_archive(row)`` runs just before an import
archives its row (a concurrent sender archiving the same label). ``server.proxy_timeout``
puts a reverse proxy in front: a request still running after that many seconds gets a 504
while the server carries on (``import_seconds`` makes archiving take that long).
``server.max_concurrent_imports`` records the peak number of simultaneous uploads.

Start by hand: ``dicom-assets-testing xnat-server --port 8080 --user admin`` (password from
``$XNAT_PASSWORD``).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import io
import json
import re
import secrets
import shutil
import struct
import tempfile
import threading
import time
import uuid
import zipfile
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.multival import MultiValue

from .xnat_session_builder import (
    UNKNOWN_MODALITY,
    SeriesSeen,
    merged_scan_ids,
    resource_label,
    scan_ids,
    series_number_key,
)

VERSION = "1.8.10"

# BaseXnatExperimentdata.cleanValue (xnat-data-models; XnatImagesessiondata inherits it):
# every one of these characters becomes "_" in subject and session labels.
CLEANED_CHARS = " `~@#$%^&*()+=[]{}|\\/?:;\"',.<>"
_CLEAN_TABLE = str.maketrans({c: "_" for c in CLEANED_CHARS})

# XftStringUtils.REGEX_VALID_ID (Patterns.ALPHANUMERIC_AND_DASHES): the project ID rule of
# ProjectResource.handlePut ("Invalid character in project ID.", 417)
VALID_ID = re.compile(r"^[A-Za-z0-9_-]+$")
# XFTValidator: an xs:string without a declared size is limited to GenericWrapperField's
# DEFAULT_STRING_SIZE (labels of xnat:subjectData and xnat:experimentData declare none, xnat.xsd)
MAX_STRING = 255
# DefaultGroupsAndPermissionsCache.PERMISSIONS: the actions ProjectListResource's
# PermissionsProjectHandler accepts, and which project role holds each (owner: all; member: all
# but delete; a public project gives everyone read: PermissionsServiceImpl.setAccessibility)
ROLE_ACTIONS = {"read": ("owner", "member"), "create": ("owner", "member"), "edit": ("owner", "member"),
                "active": ("owner", "member"), "delete": ("owner",)}

# PrearcUtils.PrearcStatus: rows a new upload may join (interruptable) and rows that are locked.
JOINABLE = ("RECEIVING", "READY", "ERROR", "CONFLICT")
LOCKED = ("ARCHIVING", "_ARCHIVING", "QUEUED_ARCHIVING", "DELETING", "_DELETING", "MOVING", "_MOVING")

# PrearcSessionArchiver's messages (409 CONFLICT); MergeSessionsA.checkForConflict's refusals of
# files the session already holds (same path: HAS_FILES, same SOPInstanceUID: CAT_ENTRY_MATCH)
PRE_EXISTS = "Session already exists, retry with overwrite enabled"
SUBJECT_MOD = "Invalid modification of session subject via archive process."
UID_MOD = "Invalid modification of session UID via archive process."
HAS_FILES = "Session already exists with matching files."
CAT_ENTRY_MATCH = "Session already exists with the same resources."

# PrearchiveCode (NrgXnat/xnat libs/framework/.../constants/PrearchiveCode.java): a project's
# prearchive setting (arc:project/prearchive_code) and the prearchive row's AUTOARCHIVE column.
# 0 Manual: everything stays in the prearchive for review; 4 AutoArchive; 5 AutoArchiveOverwrite.
PREARCHIVE_CODES = {0: "Manual", 4: "AutoArchive", 5: "AutoArchiveOverwrite"}
# BaseXnatProjectdata.initArcProjectImpl (xnat-data-models; read in danielmarcus/xnat-monorepo,
# src/main/java/org/nrg/xdat/om/base/BaseXnatProjectdata.java) gives a new project the site's
# defaultPrearchiveCode, whose default is 4 (SiteConfigPreferences.getDefaultProjectAutoArchiveSetting,
# NrgXnat/xnat libs/xdat/.../preferences/SiteConfigPreferences.java)
DEFAULT_PREARCHIVE_CODE = 4
# DicomZipImporter.xmlBuild (NrgXnat/xnat-web, the 1.9 line) wraps any failure to build or archive a
# session in a ClientException without status: the import answers 400 with this text (the 2024
# NrgXnat/xnat monorepo snapshot says "unable to archive for the Prearchive session", also 400)
ARCHIVE_FAILED = "Failed to archive 1 of 1 session(s)"
# PrearcSessionArchiver.preventConcurrentArchiving's refusal (409), before the workflow's name
BUSY = "Session processing may already be in progress"


def clean_value(value: str) -> str:
    return value.translate(_CLEAN_TABLE)


@dataclass
class Scan:
    id: str
    series_description: str
    modality: str
    uid: str = ""
    resources: dict[str, dict[str, str]] = field(default_factory=dict)  # label -> name -> stored path
    sop_uids: dict[str, str] = field(default_factory=dict)  # DICOM file name -> SOPInstanceUID

    @property
    def files(self) -> dict[str, str]:
        """The DICOM resource (what XNAT's importer fills)."""
        return self.resources.setdefault("DICOM", {})


@dataclass
class Experiment:
    id: str
    label: str
    project: str
    subject_id: str
    date: str = ""
    uid: str = ""  # StudyInstanceUID
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
    roles: dict[str, str] = field(default_factory=dict)  # user -> "owner" | "member"
    accessibility: str = "protected"  # private | protected | public (BaseXnatProjectdata.createProject)
    prearchive_code: int = DEFAULT_PREARCHIVE_CODE  # arc:project/prearchive_code (PREARCHIVE_CODES)

    def readable_by(self, user: str) -> bool:
        """Permissions.canReadProject: a member, or anyone when the project is not private
        (DefaultUserProjectCache.get returns null to everyone else, as if there were no project)."""
        return user in self.roles or self.accessibility != "private"

    def data_readable_by(self, user: str) -> bool:
        """Subjects and experiments: members only, everyone in a public project (a protected
        project makes only xnat:projectData/ID readable, PermissionsServiceImpl.setAccessibility)."""
        return user in self.roles or self.accessibility == "public"

    def experiment(self, label: str) -> Experiment | None:
        """Experiment labels are unique per project (BaseXnatExperimentdata.GetExptByProjectIdentifier)."""
        for s in self.subjects.values():
            if label in s.experiments:
                return s.experiments[label]
        return None

    def subject_ci(self, label: str) -> Subject | None:
        """XnatSubjectdata.GetSubjectByProjectIdentifierCaseInsensitive (XNAT-2865)."""
        return next((s for s in self.subjects.values() if s.label.lower() == label.lower()), None)


@dataclass
class PrearchiveEntry:
    project: str
    timestamp: str
    name: str  # the folder name: the session label as given to the importer
    subject: str
    tag: str  # StudyInstanceUID
    status: str = "RECEIVING"
    uploaded: str = ""
    lastmod: str = ""
    files: dict[tuple[str, str], bytes] = field(default_factory=dict)  # (scan id, file name) -> bytes
    # the AUTOARCHIVE column: the project's prearchive code when the row was created
    # (GradualDicomImporter.shouldAutoArchive, set by PrearcDatabase.eitherGetOrCreateSession over the
    # AutoArchive the importer asked for); a row that is joined later keeps it
    auto_archive: int | None = None
    idle_since: float = field(default_factory=time.monotonic)  # for the session rebuilder
    # PrearcUtils.log: LockAndSync writes the message of a failed archive to the row's logs/
    # (GET .../logs/last answers the newest, PrearcSessionResource)
    logs: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.project}/{self.timestamp}/{self.name}"


@dataclass
class SeriesImportFilter:
    """A series import filter as XNAT keeps it: a configuration of tool ``seriesImportFilter``,
    path ``config``, site-wide or per project (``DicomFilterService``; NrgXnat/dicomtools), whose
    contents are the JSON map of ``AbstractSeriesImportFilter.toMap`` (``mode``, ``enabled``,
    ``list``) and whose configuration status (enabled/disabled) decides whether it applies
    (``DicomFilterService.getSeriesImportFilter``). ``includes`` is
    ``RegExBasedSeriesImportFilter.shouldIncludeDicomObject``: one pattern per line of ``list``
    (blank lines and lines starting with ``#`` ignored), compiled case-insensitively and tested
    with ``find``; a ``[<tag>]`` line makes the patterns below it apply to that header
    (``DicomUtils.parseDicomHeaderId``: ``(gggg,eeee)``, ``gggg,eeee`` or a keyword), the default
    one being SeriesDescription; ``EXISTS`` / ``!EXISTS`` test presence. The first matching
    pattern includes the object in a whitelist and drops it in a blacklist; no match: the
    opposite. The ``modalityMap`` mode (JavaScript per modality) is not modelled."""

    list: str
    mode: str = "blacklist"  # blacklist | whitelist
    enabled: bool = True

    def __post_init__(self):
        if self.mode not in ("blacklist", "whitelist"):
            raise ValueError(f"series import filter mode {self.mode!r} is not modelled by this test server")
        self.patterns: dict[int, list[re.Pattern]] = {}
        field_tag = 0x0008103E
        for line in self.list.split("\n"):
            if not line.strip() or line.startswith("#"):
                continue
            line = line.strip()
            if line.startswith("[") and line.endswith("]"):
                field_tag = _header_id(line[1:-1])
                self.patterns.setdefault(field_tag, [])
                continue
            self.patterns.setdefault(field_tag, []).append(re.compile(line, re.IGNORECASE))

    def contents(self) -> str:
        return json.dumps({"mode": self.mode, "enabled": str(self.enabled).lower(), "list": self.list})

    def header_values(self, ds) -> dict[int, str | None]:
        """shouldIncludeDicomObject(DicomObject), first step: the value of each filtered header
        as ``getValueAsString(characterSet, 300)`` gives it (at most 300 characters; a blank
        value is ""), None for a header the object does not hold."""
        values: dict[int, str | None] = {}
        for tag in self.patterns:
            elem = ds.get(tag) if ds is not None else None
            if elem is None:
                values[tag] = None
                continue
            text = _header_string(elem.value)[:300]
            values[tag] = text if text.strip() else ""
        return values

    def includes(self, ds) -> bool:
        """shouldIncludeDicomObjectImpl over :meth:`header_values`: the first pattern that
        matches decides (whitelist: in, blacklist: out); none matches: the opposite."""
        values = self.header_values(ds)
        hit = any(_value_matches(values[tag], pattern) for tag, patterns in self.patterns.items()
                  for pattern in patterns)
        return hit if self.mode == "whitelist" else not hit


def _value_matches(value: str | None, pattern: re.Pattern) -> bool:
    """RegExBasedSeriesImportFilter.testValueAgainstFilter: EXISTS holds for any value, !EXISTS
    for none; otherwise a value (absent: never) is searched (Matcher.find)."""
    if pattern.pattern == "EXISTS" and value is not None:
        return True
    if pattern.pattern == "!EXISTS" and value is None:
        return True
    return value is not None and pattern.search(value) is not None


def _header_id(name: str) -> int:
    """DicomUtils.parseDicomHeaderId: ``(gggg,eeee)`` / ``gggg,eeee`` or an attribute keyword."""
    m = re.fullmatch(r"(\(?)([0-9A-Fa-f]{4}),([0-9A-Fa-f]{4})(\)?)", name.strip())
    if m and bool(m.group(1)) == bool(m.group(4)):
        return int(m.group(2) + m.group(3), 16)
    tag = tag_for_keyword(name.strip())
    if tag is None:
        raise ValueError(f"Invalid DICOM tag: {name}")
    return tag


def _header_string(value) -> str:
    """A header value as text (DicomElementI.getValueAsString: values joined by a backslash)."""
    if isinstance(value, (list, tuple, MultiValue)):
        return "\\".join(str(v) for v in value)
    return "" if value is None else str(value)


def _now() -> str:
    return dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S.%f")


class XnatTestServer:
    """The server's state, HTTP front end and fault switches."""

    def __init__(self, schemas_dir: Path, user: str = "admin", password: str = "admin",
                 host: str = "127.0.0.1", port: int = 0, storage: Path | None = None,
                 can_create_projects: bool = True):
        self.schemas_dir = Path(schemas_dir)
        self.users = {user: password}
        self.tokens: dict[str, str] = {}
        self.projects: dict[str, Project] = {}
        self.prearchive: dict[str, PrearchiveEntry] = {}  # key "<project>/<timestamp>/<name>"
        self.storage = Path(storage or tempfile.mkdtemp(prefix="xnat-test-server-"))
        self.can_create_projects = can_create_projects
        self.lock = threading.RLock()
        self.faults: list[dict] = []
        self.slow_seconds = 3.0
        self.proxy_timeout: float | None = None  # a reverse proxy's read timeout (504 after it)
        # the series import filters (DicomFilterService): "" the site-wide one, else a project's
        self.series_filters: dict[str, SeriesImportFilter] = {}
        self.drop_fraction = 0.5  # drop_mid_stream: the share of the body that arrives
        self.storage_error_after = 0  # storage_error: the files stored before the write fails
        self.site_anonymization = False  # XNAT's default site-wide script (PatientID := session)
        # the site preference separateSecondaryDicomOnArchive (true by default since XNAT 1.9.1):
        # files of a SOP class that is not primary imaging land in resource "secondary"
        self.separate_secondary = True
        # projects whose anonymization script rewrites the study, series and instance UIDs
        # (hashUID) when a session is archived
        self.uid_hashing_projects: set[str] = set()
        # experiment ID -> names of the workflows open on it (open_workflow, close_workflows)
        self.open_workflows: dict[str, list[str]] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) seen, for tests
        self.import_queries: list[dict] = []  # the query of each import request, for tests
        self.default_prearchive_code = DEFAULT_PREARCHIVE_CODE  # the site's defaultPrearchiveCode
        # called with the prearchive row just before an import archives it: tests let another
        # sender archive a session of the same label in that moment
        self.on_archive = None
        self._receiving: set[str] = set()  # rows a request is writing to (PrearcUtils.isSessionReceiving)
        self._rebuilder: threading.Thread | None = None
        self._rebuilder_stop = threading.Event()
        self.imports = 0
        self.active_imports = 0
        self.max_concurrent_imports = 0
        self.import_seconds = 0.0  # time archiving takes (concurrency and proxy-timeout tests)
        self._counter = 0
        self._last_ts = ""
        handler = type("Handler", (_Handler,), {"xnat": self})
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.thread: threading.Thread | None = None
        self._workers: list[threading.Thread] = []

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
        self._rebuilder_stop.set()
        if self._rebuilder is not None:
            self._rebuilder.join(timeout=30)
        self.httpd.shutdown()
        self.httpd.server_close()
        for t in list(self._workers):
            t.join(timeout=30)

    def inject(self, path_prefix: str, kind: str, times: int = 1) -> None:
        with self.lock:
            self.faults.append({"prefix": path_prefix, "kind": kind, "times": times})

    def _take_fault(self, path: str, kinds: tuple[str, ...]) -> str | None:
        with self.lock:
            for f in self.faults:
                if f["kind"] in kinds and path.startswith(f["prefix"]) and f["times"] > 0:
                    f["times"] -= 1
                    return f["kind"]
        return None

    def _next_id(self, prefix: str) -> str:
        with self.lock:
            self._counter += 1
            return f"XNAT_{prefix}{self._counter:05d}"

    def _timestamp(self) -> str:
        """PrearcUtils.makeTimestamp: yyyyMMdd_HHmmssSSS, unique per row here."""
        with self.lock:
            ts = dt.datetime.now().strftime("%Y%m%d_%H%M%S%f")[:-3]
            while ts <= self._last_ts:
                ts = str(int(ts.replace("_", "")) + 1)
                ts = f"{ts[:8]}_{ts[8:]}"
            self._last_ts = ts
            return ts

    # ---------------------------------------------------------------- set-up helpers (tests)
    def set_series_import_filter(self, patterns: str, mode: str = "blacklist", project: str | None = None,
                                 enabled: bool = True) -> SeriesImportFilter:
        """The site-wide (``project`` None) or a project's series import filter, as an admin sets
        it (Administer > Site Administration > Session Upload & Import, or the project's
        settings); ``patterns`` is its ``list``, one regular expression per line."""
        with self.lock:
            f = self.series_filters[project or ""] = SeriesImportFilter(patterns, mode, enabled)
            return f

    @property
    def series_import_filter(self) -> str | None:
        """Shortcut: the site-wide blacklist's patterns (None: no site-wide filter)."""
        f = self.series_filters.get("")
        return f.list if f else None

    @series_import_filter.setter
    def series_import_filter(self, patterns: str | None) -> None:
        if patterns is None:
            self.series_filters.pop("", None)
        else:
            self.set_series_import_filter(patterns)

    def add_user(self, user: str, password: str) -> None:
        self.users[user] = password

    def add_project(self, pid: str, owner: str | None = None, members: tuple[str, ...] = (),
                    accessibility: str = "protected", prearchive_code: int | None = None) -> Project:
        """A project as the site has it; ``prearchive_code`` defaults to the site's
        defaultPrearchiveCode (4), as a new project gets it (BaseXnatProjectdata.initArcProjectImpl)."""
        with self.lock:
            code = self.default_prearchive_code if prearchive_code is None else prearchive_code
            p = self.projects.setdefault(pid, Project(pid, pid, accessibility=accessibility, prearchive_code=code))
            if owner:
                p.roles[owner] = "owner"
            for m in members:
                p.roles.setdefault(m, "member")
            return p

    def add_subject(self, project: str, label: str) -> Subject:
        with self.lock:
            p = self.projects[project]
            return p.subjects.setdefault(label, Subject(self._next_id("S"), label, project))

    def add_experiment(self, project: str, subject: str, label: str, uid: str) -> Experiment:
        """A session already in XNAT (no scans)."""
        with self.lock:
            subj = self.add_subject(project, subject)
            return subj.experiments.setdefault(label, Experiment(self._next_id("E"), label, project, subj.id, uid=uid))

    def add_scan_resource(self, exp: Experiment, scan_id: str, label: str, files: dict[str, bytes]) -> None:
        """A resource an automatic pipeline adds to a scan (SNAPSHOTS, NIFTI, ...)."""
        folder = self.storage / exp.project / exp.label / "SCANS" / scan_id / label
        folder.mkdir(parents=True, exist_ok=True)
        with self.lock:
            res = exp.scans[scan_id].resources.setdefault(label, {})
            for name, data in files.items():
                (folder / name).write_bytes(data)
                res[name] = str(folder / name)

    def remove_file(self, exp: Experiment, scan_id: str, name: str) -> None:
        """Someone deleted a file of a scan's DICOM resource in XNAT."""
        with self.lock:
            Path(exp.scans[scan_id].files.pop(name)).unlink(missing_ok=True)
            exp.scans[scan_id].sop_uids.pop(name, None)

    def open_workflow(self, exp: Experiment, pipeline: str = "container-service: dcm2niix on archive",
                      close_after: float | None = None) -> None:
        """A workflow left open on a session, as an automation run on archive leaves one while it
        works (or for good, when it died "In Progress"); closed after ``close_after`` seconds."""
        with self.lock:
            self.open_workflows.setdefault(exp.id, []).append(pipeline)
        if close_after is not None:
            timer = threading.Timer(close_after, self.close_workflows, args=(exp,))
            timer.daemon = True
            timer.start()

    def expire_logins(self) -> None:
        """Every JSESSION ends, as when XNAT's sessionTimeout (15 minutes by default) elapses or
        XNAT restarts: a request carrying only the old JSESSIONID is answered 401
        (XnatSecureGuard); basic auth and a new login still work."""
        with self.lock:
            self.tokens.clear()

    def close_workflows(self, exp: Experiment) -> None:
        with self.lock:
            self.open_workflows.pop(exp.id, None)

    def add_prearchive_row(self, project: str, name: str, tag: str, status: str = "READY",
                           subject: str = "") -> PrearchiveEntry:
        """A row that did not come from our client (sent from the scanner, say)."""
        e = PrearchiveEntry(project, self._timestamp(), name, subject, tag, status, _now(), _now(),
                            auto_archive=self.projects[project].prearchive_code if project in self.projects else None)
        with self.lock:
            self.prearchive[e.key] = e
        return e

    # ---------------------------------------------------------------- model helpers
    def find_experiment(self, exp_id: str) -> Experiment | None:
        for p in self.projects.values():
            for s in p.subjects.values():
                for e in s.experiments.values():
                    if e.id == exp_id:
                        return e
        return None

    def find_subject(self, subj_id: str) -> Subject | None:
        for p in self.projects.values():
            for s in p.subjects.values():
                if s.id == subj_id:
                    return s
        return None

    def role(self, project: str, user: str) -> str | None:
        p = self.projects.get(project)
        return p.roles.get(user) if p else None

    # ---------------------------------------------------------------- importing
    def receive(self, project: str, subject: str, name: str, files: list[tuple[str, bytes, object]]) -> PrearchiveEntry:
        """GradualDicomImporter: put each file into the prearchive row of (project,
        StudyInstanceUID, session label), joining a RECEIVING/READY/ERROR/CONFLICT row
        (PrearcDatabase.eitherGetOrCreateSession) or opening a new one (new timestamp) whose
        AUTOARCHIVE is the project's prearchive code (GradualDicomImporter.shouldAutoArchive)."""
        tag = str(files[0][2].get("StudyInstanceUID", "") or "")  # none: an empty tag, as XNAT
        with self.lock:
            row = next((e for e in self.prearchive.values() if e.project == project and e.tag == tag
                        and e.name == name and e.status in JOINABLE), None)
            if row is None:
                code = self.projects[project].prearchive_code if project in self.projects else None
                row = PrearchiveEntry(project, self._timestamp(), name, subject, tag, "RECEIVING", _now(), _now(),
                                      auto_archive=code)
                self.prearchive[row.key] = row
            row.status, row.lastmod = "RECEIVING", _now()
            self._receiving.add(row.key)
        try:
            for fname, data, ds in files:
                if self.site_anonymization:
                    data = _anonymize(data, project, row.subject or subject, row.name)
                number = str(ds.get("SeriesNumber", "") or "0")  # Restructurer.determineScanSubdir
                with self.lock:
                    # GradualDicomImporter.getSafeFile: the uploaded name is kept (rename=false);
                    # a file of the same name and SOPInstanceUID is overwritten
                    row.files[(number, Path(fname).name)] = data
        finally:
            with self.lock:
                row.lastmod, row.idle_since = _now(), time.monotonic()
                self._receiving.discard(row.key)
        return row

    def overwrite_files_for(self, row: PrearchiveEntry, asked: bool) -> bool:
        """PrearcSession.isOverwriteFiles: asked for (``overwrite_files=true``), or the row's or the
        project's prearchive code is 5 (AutoArchiveOverwrite)."""
        proj = self.projects.get(row.project)
        return asked or row.auto_archive == 5 or (proj is not None and proj.prearchive_code == 5)

    def archive(self, row: PrearchiveEntry, *, subject: str | None, label: str | None, allow_merge: bool,
                override: bool, overwrite_files: bool) -> Experiment:
        """PrearcSessionArchiver.call + MergePrearcToArchiveSession (MergeSessionsA) + MergeCatCatalog.

        The caller decides ``allow_merge`` (allowSessionMerge), ``override`` (overrideExceptions)
        and ``overwrite_files`` as its XNAT class does (see the import service and the archive
        service below). A session of the same label in the project is merged into only when
        ``allow_merge`` (PrearcSessionArchiver.checkForConflicts: PRE_EXISTS, 409); files it
        already holds are refused unless ``override or overwrite_files`` (the archiver passes
        that to MergePrearcToArchiveSession; MergeSessionsA.checkForConflict: the same path is
        HAS_FILES, the same SOPInstanceUID under another name CAT_ENTRY_MATCH, both 409)."""
        if not row.tag:
            # DICOMSessionBuilder: no StudyInstanceUID, no session to build (NoUniqueSessionException);
            # the importer took the files (GradualDicomImporter does not require it), the build fails
            raise _HttpError(500, "org.nrg.dcm.xnat.NoUniqueSessionException: no unique StudyInstanceUID")
        with self.lock:
            proj = self.projects[row.project]
            # fixSessionLabel / fixSubject: labels are cleaned (cleanValue)
            label = clean_value(label or row.name)
            subject_label = clean_value(subject or row.subject or "")
            if not subject_label:
                raise _HttpError(400, "Unable to identify subject.")
            if len(label) > MAX_STRING:
                # PrearcSessionArchiver.validateSession: src.validate() (XFTValidator maxLength)
                # fails, thrown on as a ServerException (500)
                raise _HttpError(500, f"Must Be Less Than {MAX_STRING} Characters : Current Length ({len(label)})")
            replace = override or overwrite_files
            existing = proj.experiment(label)  # retrieveExistingExpt: project + label
            subj = proj.subject_ci(subject_label)
            if existing is not None:  # checkForConflicts
                if not allow_merge:
                    raise _HttpError(409, PRE_EXISTS)
                # PrearcSessionArchiver.preventConcurrentArchiving (unless overrideExceptions, i.e.
                # overwrite=delete): an open workflow on the session (WorkflowUtils.getOpenWorkflows:
                # a pipeline or a container run on archive, or a stale "In Progress") refuses the merge
                busy = self.open_workflows.get(existing.id)
                if busy and not override:
                    raise _HttpError(409, f"{BUSY}: {busy[0]}.  Concurrent modification is discouraged.")
                if subj is None or existing.subject_id != subj.id:
                    raise _HttpError(409, f"{SUBJECT_MOD}: {existing.label} Already Exists for another Subject")
            hashing = row.project in self.uid_hashing_projects
            tag = hash_uid(row.tag) if hashing and row.tag else row.tag
            if existing is not None and existing.uid and tag and existing.uid != tag and not override:
                raise _HttpError(409, UID_MOD)
            parsed = []
            for (_subdir, fname), data in sorted(row.files.items()):
                if hashing:  # the project's script, applied as the session is archived
                    data = _hash_uids(data)
                ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
                parsed.append((fname, data, ds))
            ids = self._scan_ids(parsed, existing)
            if existing is not None and not replace:  # MergeSessionsA.checkForConflict
                why = None
                for fname, _data, ds in parsed:
                    scan = existing.scans.get(ids[_series_uid(ds)])
                    if scan is None:
                        continue
                    held = {n for res in scan.resources.values() for n in res}
                    if fname in held:  # FileUtils.FindFirstMatch: the same path: HAS_FILES wins
                        why = HAS_FILES
                        break
                    if str(ds.SOPInstanceUID) in {scan.sop_uids.get(n) for n in held}:
                        why = CAT_ENTRY_MATCH  # SessionOverwriteCheck: a catalog entry of that UID
                if why:
                    raise _HttpError(409, why)
            if subj is None:
                subj = proj.subjects[subject_label] = Subject(self._next_id("S"), subject_label, proj.id)
            exp = existing
            if exp is None:
                exp = subj.experiments[label] = Experiment(self._next_id("E"), label, proj.id, subj.id, uid=tag)
            folder = self.storage / proj.id / subj.label / label
            for fname, data, ds in parsed:
                scan_id = ids[_series_uid(ds)]
                scan = exp.scans.get(scan_id)
                if scan is None:
                    scan = exp.scans[scan_id] = Scan(scan_id, str(ds.get("SeriesDescription", "") or ""),
                                                     str(ds.get("Modality", "") or ""), _series_uid(ds))
                exp.date = exp.date or str(ds.get("StudyDate", "") or "")
                # CatalogBuilder: primary imaging SOP classes to DICOM, the rest to secondary
                label = resource_label(str(ds.get("SOPClassUID", "") or ""), self.separate_secondary)
                path = folder / "SCANS" / scan_id / label / fname
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
                scan.resources.setdefault(label, {})[fname] = str(path)
                scan.sop_uids[fname] = str(ds.SOPInstanceUID)
            self.prearchive.pop(row.key, None)
            return exp

    @staticmethod
    def _scan_ids(parsed: list, existing: Experiment | None) -> dict[str, str]:
        """SeriesInstanceUID -> scan ID of the built session (DICOMSessionBuilder), renamed for a
        merge into ``existing`` (PrearcSessionArchiver.correctScanID); see xnat_session_builder."""
        seen: dict[str, tuple[str, set[str]]] = {}
        for _fname, _data, ds in parsed:
            uid = _series_uid(ds)
            number = series_number_key(str(ds.get("SeriesNumber", "") or ""), uid)
            seen.setdefault(uid, (number, set()))[1].add(str(ds.get("Modality", "") or "") or UNKNOWN_MODALITY)
        ids = scan_ids([SeriesSeen(number, uid, frozenset(mods)) for uid, (number, mods) in seen.items()])
        if existing is None:
            return ids
        modality_of = {uid: sorted(mods)[0] for uid, (_n, mods) in seen.items()}
        return merged_scan_ids(ids, modality_of, {sc.uid: sc.id for sc in existing.scans.values() if sc.uid})

    def archive_uri(self, exp: Experiment) -> str:
        """PrearcSessionArchiver.buildURI: the archived session by labels (the subject's label,
        else its ID; the session's label), not by accession IDs."""
        subj = next((s for s in self.projects[exp.project].subjects.values() if s.id == exp.subject_id), None)
        return f"/data/archive/projects/{exp.project}/subjects/{subj.label if subj else exp.subject_id}/experiments/{exp.label}"

    def archive_row(self, row: PrearchiveEntry, **kw) -> Experiment:
        """Archive a prearchive row as PrearcDatabase.archive does: the row is ARCHIVING (locked)
        meanwhile; on failure LockAndSync sets CONFLICT for a 409, ERROR for anything else."""
        with self.lock:
            row.status, row.lastmod = "_ARCHIVING", _now()
        try:
            return self.archive(row, **kw)
        except Exception as exc:
            with self.lock:
                status = exc.status if isinstance(exc, _HttpError) else 500
                row.status, row.lastmod = ("CONFLICT" if status == 409 else "ERROR"), _now()
                row.idle_since = time.monotonic()
                row.logs.append(exc.message if isinstance(exc, _HttpError) else str(exc))
            raise

    # ---------------------------------------------------------------- the session rebuilder
    def rebuild_idle_sessions(self, idle_seconds: float = 300.0) -> list[str]:
        """One run of SessionXMLRebuilder.runTask (NrgXnat/xnat web/.../helpers/prearchive/
        SessionXMLRebuilder.java): each RECEIVING row idle for ``idle_seconds`` (XNAT:
        sessionXmlRebuilderInterval, 5 minutes, checked every minute) and no longer being received
        is rebuilt: READY (PrearchiveRebuildHandler.rebuild/postBuild). It is then archived only
        when the row's AUTOARCHIVE is 4 or 5 (postBuild: PrearcSession.isAutoArchive), as
        PrearchiveArchiveHandler.commitSessionToArchive does it: no merge parameter, so a merge is
        allowed because the code is not Manual; no overrideExceptions. A Manual (0) row stays READY
        for someone to archive it. Returns the keys of the rows it rebuilt."""
        now = time.monotonic()
        with self.lock:
            due = [e for e in self.prearchive.values() if e.status == "RECEIVING" and e.key not in self._receiving
                   and now - e.idle_since >= idle_seconds]
            # the lock is held from the build to the end of archiving: the READY moment between
            # PrearchiveRebuildHandler's resetStatus and FinishImageUpload's archiving is not seen
            for e in due:
                e.status, e.lastmod = "READY", _now()
                if e.auto_archive in (4, 5):
                    try:
                        self.archive_row(e, subject=None, label=None, allow_merge=True, override=False,
                                         overwrite_files=self.overwrite_files_for(e, False))
                    except Exception:
                        pass  # the row is left in CONFLICT or ERROR, as LockAndSync leaves it
        return [e.key for e in due]

    def start_session_rebuilder(self, idle_seconds: float, every: float = 0.1) -> None:
        """Run the rebuilder in the background, as XNAT's scheduler does (XNAT: every 60 s, rows
        idle 5 minutes; tests shorten both)."""
        def loop():
            while not self._rebuilder_stop.wait(every):
                self.rebuild_idle_sessions(idle_seconds)

        self._rebuilder = threading.Thread(target=loop, daemon=True)
        self._rebuilder.start()


def _series_uid(ds) -> str:
    return str(ds.get("SeriesInstanceUID", "") or "")


def hash_uid(uid: str) -> str:
    """DicomEdit's ``hashUID``, as a project's anonymization script calls it: a UID replaced by
    one under ``2.25.`` derived from a digest of it (the same UID gives the same new one; the
    digest DicomEdit uses is not modelled, only that it is deterministic)."""
    return "2.25." + str(uuid.UUID(bytes=hashlib.md5(uid.encode()).digest()).int)


def _hash_uids(data: bytes) -> bytes:
    """A project anonymization script ``(0020,000D) := hashUID[(0020,000D)]`` and the same for
    (0020,000E) and (0008,0018) (PrearcSessionAnonymizer, at archive time); the file name the
    upload gave is kept (GradualDicomImporter.getSafeFile)."""
    ds = pydicom.dcmread(io.BytesIO(data), force=True)
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        if keyword in ds:
            setattr(ds, keyword, hash_uid(str(getattr(ds, keyword))))
    if getattr(ds, "file_meta", None) is not None and "SOPInstanceUID" in ds:
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    out = io.BytesIO()
    ds.save_as(out)
    return out.getvalue()


def _anonymize(data: bytes, project: str, subject: str, session: str) -> bytes:
    """XNAT's default site-wide anonymization script (DefaultAnonUtils; applied by
    GradualDicomImporter on receipt): (0008,1030) := project, (0010,0010) := subject,
    (0010,0020) := session."""
    ds = pydicom.dcmread(io.BytesIO(data), force=True)
    ds.StudyDescription = project
    ds.PatientName = subject
    ds.PatientID = session
    out = io.BytesIO()
    ds.save_as(out)
    return out.getvalue()


class _HttpError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _result_set(rows: list[dict]) -> dict:
    return {"ResultSet": {"Result": rows, "totalRecords": str(len(rows))}}


def _item(xsi_type: str, data_fields: dict, children: list | None = None) -> dict:
    return {"items": [{"data_fields": data_fields, "meta": {"xsi:type": xsi_type, "isHistory": False},
                       "children": children or []}]}


def parse_upload_zip(body: bytes) -> list[tuple[str, bytes, object, str | None]]:
    """The zip's files in order, as ``(name, bytes, header or None, refusal or None)``; raises
    on a broken zip.

    The refusals are ``GradualDicomImporter.call``'s (xnat-web, read in the ``NrgXnat/xnat``
    monorepo, web/src/main/java/org/nrg/xnat/archive/GradualDicomImporter.java): a file dcm4che
    cannot read is "unable to read DICOM object <name>"; an empty or absent SOPClassUID
    (0008,0016) is "object <name> contains no SOP Class UID" (MediaStorageSOPClassUID in the
    file meta does not stand in for it), then the same for SOPInstanceUID. Nothing else is
    required: a file without StudyInstanceUID is staged under an empty tag, as the importer
    does (``initialize.setTag(studyInstanceUID)`` with null). The checks come after the series
    import filter (``shouldIncludeDicomObject``), so a filtered file is dropped, not refused.
    """
    try:
        zf = zipfile.ZipFile(io.BytesIO(body))
    except zipfile.BadZipFile:
        raise _HttpError(400, "The uploaded file is not a valid zip archive (upload interrupted?)") from None
    with zf:
        return [_parse_entry(info.filename, zf.read(info)) for info in zf.infolist() if not info.is_dir()]


def _parse_entry(name: str, data: bytes) -> tuple[str, bytes, object, str | None]:
    try:
        # like XNAT's importer, accept data sets without the 128-byte preamble too
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
    except Exception:
        return name, data, None, f"unable to read DICOM object {name}"
    why = None
    if not str(ds.get("SOPClassUID", "") or "").strip():
        why = f"object {name} contains no SOP Class UID"
    elif not str(ds.get("SOPInstanceUID", "") or "").strip():
        why = f"object {name} contains no SOP Instance UID"
    return name, data, ds, why


def zip_stream_entries(data: bytes) -> list[tuple[str, bytes, object, str | None]]:
    """The entries of a zip whose transfer broke off after ``data``, as DicomZipImporter reads
    them: ``java.util.zip.ZipInputStream`` reads local entries in order, from the request's
    stream (it never sees the central directory at the end); an entry whose data did not fully
    arrive ends the import (an IOException). Stored and deflated entries with their sizes in the
    local header (what Python's zipfile writes to a file) are read; a data descriptor or a ZIP64
    size ends the stream here (not modelled)."""
    out, pos = [], 0
    while pos + 30 <= len(data) and data[pos:pos + 4] == b"PK\x03\x04":
        _, _, flags, method, _, _, _, csize, _, nlen, xlen = struct.unpack("<4sHHHHHIIIHH", data[pos:pos + 30])
        if flags & 0x08 or csize == 0xFFFFFFFF or method not in (0, 8):
            break
        name = data[pos + 30:pos + 30 + nlen].decode("utf-8" if flags & 0x800 else "cp437")
        start = pos + 30 + nlen + xlen
        if start + csize > len(data):
            break
        raw = data[start:start + csize]
        if not name.endswith("/"):
            out.append(_parse_entry(name, raw if method == 0 else zlib.decompress(raw, -15)))
        pos = start + csize
    return out


_ROW_STATUS_IN_TABLE = {"_ARCHIVING": "ARCHIVING"}


def _file_rows(base: str, label: str, files: dict[str, str]) -> list[dict]:
    """FileList rows of one scan resource (``collection`` is the resource label)."""
    return [{"Name": n, "Size": str(Path(p).stat().st_size), "collection": label,
             "URI": f"{base}/resources/{label}/files/{n}"} for n, p in sorted(files.items())]


def _prearchive_key(src: str) -> str:
    """The row key (``<project>/<timestamp>/<name>``) of a prearchive URI as a ``src`` names it."""
    return src.replace("/data/prearchive/projects/", "").replace("/prearchive/projects/", "").strip("/")


class _Handler(BaseHTTPRequestHandler):
    xnat: XnatTestServer
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # quiet
        pass

    # ------------------------------------------------------------------ plumbing
    def _send(self, status: int, body: bytes | str | dict | list = b"", ctype: str | None = None,
              headers: dict | None = None) -> None:
        """Record the answer; _dispatch writes it (or a proxy's 504 if it came too late)."""
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            ctype = ctype or "application/json"
        elif isinstance(body, str):
            body = body.encode()
            ctype = ctype or "text/plain"
        self._answer = (status, body, ctype or "text/plain", headers or {})

    def _write(self, status: int, body: bytes, ctype: str, headers: dict) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers.items():
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
        x = self.xnat
        url = urlparse(self.path)
        path = url.path.rstrip("/") or "/"
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        x.requests.append((self.command, path))
        if self.command == "POST" and x._take_fault(path, ("drop_mid_stream",)):
            return self._drop_mid_stream(path, query)
        body = self._body() if self.command in ("PUT", "POST") else b""
        fault = x._take_fault(path, ("drop", "slow", "500", "502", "503", "504"))
        if fault == "drop":
            self.close_connection = True
            self.connection.shutdown(2)
            return
        if fault == "slow":
            time.sleep(x.slow_seconds)
        elif fault in ("500", "502", "503", "504"):
            self._write(int(fault), f"<html><h3>Injected error {fault}</h3></html>".encode(), "text/html", {})
            return
        self._answer = None
        worker = threading.Thread(target=self._run_route, args=(self.command, path, query, body), daemon=True)
        with x.lock:
            x._workers = [t for t in x._workers if t.is_alive()] + [worker]
        worker.start()
        worker.join(x.proxy_timeout)
        if worker.is_alive():  # the reverse proxy gives up; the server carries on
            self.close_connection = True
            self._write(504, b"<html><head><title>504 Gateway Time-out</title></head><body><center><h1>504 "
                             b"Gateway Time-out</h1></center><hr><center>nginx</center></body></html>",
                        "text/html", {})
            return
        self._write(*(self._answer or (500, b"no answer", "text/plain", {})))

    def _drop_mid_stream(self, path: str, q: dict) -> None:
        """The ``drop_mid_stream`` fault: the connection breaks after ``drop_fraction`` of the body
        arrived. An import keeps what it read (DicomZipImporter.importZipFile reads the request
        stream entry by entry; each entry read is staged by GradualDicomImporter in a RECEIVING
        row; the broken stream then ends the import with an IOException that no one hears): the
        row stays RECEIVING, and the session rebuilder later builds it and, in a project set to
        auto-archive, archives it as a partial session (rebuild_idle_sessions)."""
        x = self.xnat
        size = int(self.headers.get("Content-Length") or 0)
        part = self.rfile.read(int(size * x.drop_fraction)) if size else b""
        try:
            self.user = self._user()
            project = q.get("project")
            if path == "/data/services/import" and self.user and project and x.role(project, self.user):
                with x.lock:
                    x.imports += 1
                files, _ = self._read_entries(q, zip_stream_entries(part), faults=False)
                if files:
                    self._stage_for_import(q, files)
        except Exception:  # the import failed on its own: nobody hears it either
            pass
        finally:
            self.close_connection = True
            self.connection.shutdown(2)

    def _run_route(self, method: str, path: str, query: dict, body: bytes) -> None:
        try:
            self._route(method, path, query, body)
        except _HttpError as exc:
            self._send(exc.status, exc.message)
        except Exception as exc:  # a bug here must show as a 500, like a Java stack trace would
            self._send(500, f"Internal server error: {type(exc).__name__}: {exc}")

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
        self.user = user
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
        if path == "/data/services/prearchive/delete" and method == "POST":
            return self._batch_delete(q, body)
        if path.startswith("/data/prearchive"):
            return self._prearchive(method, path)
        m = re.fullmatch(r"/data(?:/projects/([^/]+))?/config/([^/]+)/(.+)", path)
        if m and method == "GET":
            return self._config(m.group(1), m.group(2), m.group(3), q)
        if path.startswith("/data/archive/"):
            path = "/data/" + path[len("/data/archive/"):]
        return self._data(method, path, q, body)

    # projects / subjects / experiments / scans / resources
    def _data(self, method: str, path: str, q: dict, body: bytes) -> None:
        x = self.xnat
        parts = path.strip("/").split("/")[1:]  # drop "data"
        with x.lock:
            if parts == ["projects"]:
                if "permissions" in q:
                    return self._projects_allowing(q)
                # ProjectListResource.DefaultProjectHandler: the projects the user may read
                # (Permissions.getAllowedValues on xnat:projectData/ID): protected and public ones too
                return self._send(200, _result_set([
                    {"ID": p.id, "secondary_ID": p.id, "name": p.name, "description": "", "pi_firstname": "",
                     "pi_lastname": "", "URI": f"/data/projects/{p.id}", "xsiType": "xnat:projectData"}
                    for p in x.projects.values() if p.readable_by(self.user)]))
            if len(parts) == 2 and parts[0] == "projects":
                return self._project_item(method, parts[1], q)
            if len(parts) in (3, 4) and parts[0] == "projects" and parts[2] == "prearchive_code":
                return self._prearchive_code(method, parts[1], parts[3:])
            if len(parts) >= 3 and parts[0] == "projects" and parts[2] == "resources":
                # DefaultCatalogService.insertProjectResourceCatalog saves the project itself
                # (SaveItemHelper.authorizedSave): editing a project is for its owners only
                p = self._project(parts[1], "owner" if method in ("PUT", "POST", "DELETE") else None,
                                  f"Unauthorized attempt to add a file to /projects/{parts[1]}")
                return self._resources(method, p.resources, parts[2:], x.storage / p.id / "RESOURCES",
                                       f"/data/projects/{p.id}", body)
            if len(parts) >= 3 and parts[0] == "projects" and parts[2] == "experiments":
                p = self._project(parts[1])
                visible = p.data_readable_by(self.user)
                if len(parts) == 3:
                    return self._send(200, _result_set([self._exp_row(e) for s in p.subjects.values()
                                                        for e in s.experiments.values() if visible]))
                exp = p.experiment(parts[3]) or next((e for s in p.subjects.values() for e in s.experiments.values()
                                                      if e.id == parts[3]), None)
                if exp is None or not visible:
                    raise _HttpError(404, f"Experiment {parts[3]} not found")
                return self._experiment(method, exp, parts[4:], q, body)
            if len(parts) == 4 and parts[0] == "projects" and parts[2] == "subjects" and method == "PUT":
                return self._put_subject(parts[1], parts[3])
            if len(parts) >= 3 and parts[0] == "projects" and parts[2] == "subjects":
                p = self._project(parts[1])
                if len(parts) == 3:  # ProjectSubjectList: XFT's security filter hides others' subjects
                    return self._send(200, _result_set([
                        {"ID": s.id, "label": s.label, "project": p.id, "insert_date": "",
                         "URI": f"/data/subjects/{s.id}", "xsiType": "xnat:subjectData"}
                        for s in p.subjects.values() if p.data_readable_by(self.user)]))
                subj = p.subjects.get(parts[3]) or next((s for s in p.subjects.values() if s.id == parts[3]), None)
                if not p.data_readable_by(self.user):
                    subj = None
                if len(parts) == 4:
                    if subj is None:
                        raise _HttpError(404, f"Subject {parts[3]} not found")
                    return self._send(200, self._subject_item(subj))
                if subj is None:
                    raise _HttpError(404, f"Subject {parts[3]} not found")
                return self._experiments(method, subj, parts[4:], q, body)
            if len(parts) >= 2 and parts[0] == "subjects":
                subj = x.find_subject(parts[1])
                if subj is None or not x.projects[subj.project].data_readable_by(self.user):
                    raise _HttpError(404, f"Subject {parts[1]} not found")
                if len(parts) == 2:
                    return self._send(200, self._subject_item(subj))
                return self._experiments(method, subj, parts[2:], q, body)
            if len(parts) >= 2 and parts[0] == "experiments":
                exp = x.find_experiment(parts[1])
                if exp is None or not x.projects[exp.project].data_readable_by(self.user):
                    raise _HttpError(404, f"Experiment {parts[1]} not found")
                return self._experiment(method, exp, parts[2:], q, body)
            if parts == ["experiments"]:
                rows = []
                for p in x.projects.values():
                    if p.data_readable_by(self.user):
                        rows += [self._exp_row(e) for s in p.subjects.values() for e in s.experiments.values()]
                return self._send(200, _result_set(rows))
        raise _HttpError(404, f"Not found: {path}")

    def _project(self, pid: str, need: str | None = None, refusal: str | None = None) -> Project:
        """The project of a sub-resource URI. Every restlet resource finds it through
        XnatProjectdata.getProjectByIDorAlias(id, user) = DefaultUserProjectCache.get, which
        returns null unless Permissions.canReadProject: a private project of others is answered
        as an unknown one (404), a protected or public one is found (its data stays hidden:
        Project.data_readable_by). Read in the NrgXnat/xnat monorepo (web/.../services/cache/
        DefaultUserProjectCache.java, libs/xdat/.../security/helpers/Permissions.java)."""
        p = self.xnat.projects.get(pid)
        if p is None or not p.readable_by(self.user):
            raise _HttpError(404, f"Project {pid} not found")
        role = p.roles.get(self.user)
        if need == "owner" and role != "owner":
            raise _HttpError(403, refusal or f"User {self.user} may not edit project {pid} (role {role})")
        return p

    def _project_item(self, method: str, pid: str, q: dict) -> None:
        """/data/projects/<id> as ProjectResource (xnat-web, restlet/resources) answers it. Its
        constructor's getProjectByIDorAlias gives null for a project the user may not read, so
        a private project of others looks absent: GET 404 (``represent``'s text, "experiment"
        included), DELETE 400; a PUT takes it for a new project and is refused as XNAT refuses
        it: 403 when the site lets only admins create projects, else 403 again once
        ``item.getCurrentDBVersion()`` finds the stored project the user may not edit."""
        x = self.xnat
        p = x.projects.get(pid)
        visible = p is not None and p.readable_by(self.user)
        role = p.roles.get(self.user) if visible else None
        if method == "PUT":
            if not visible:
                if not x.can_create_projects:  # siteConfig uiAllowNonAdminProjectCreation false
                    raise _HttpError(403, f"User {self.user} doesn't have permission to create projects on this "
                                          "system")
                if not VALID_ID.match(pid):  # XftStringUtils.isValidId
                    raise _HttpError(417, "Invalid character in project ID.")
                if p is not None:  # item.getCurrentDBVersion() != null, Permissions.canEdit false
                    raise _HttpError(403, "User account doesn't have permission to edit this project.")
                # BaseXnatProjectdata.createProject: accessibility defaults to "protected"
                accessibility = q.get("accessibility") or "protected"
                # BaseXnatProjectdata.initArcProjectImpl: the site's defaultPrearchiveCode (4)
                x.add_project(pid, owner=self.user, accessibility=accessibility).name = q.get("name") or pid
                return self._send(200, "")
            if role not in ("owner", "member"):  # Permissions.canEditProject: members and owners
                raise _HttpError(403, f"User {self.user} doesn't have permission to edit the project {pid}")
            if role != "owner":  # Permissions.canEdit(user, project): the xnat:projectData item, owners
                raise _HttpError(403, "User account doesn't have permission to edit this project.")
            return self._send(200, "")
        if method == "DELETE":
            if not visible:
                raise _HttpError(400, "")
            if role != "owner":  # Permissions.canDelete
                raise _HttpError(403, "")
            x.projects.pop(pid, None)
            return self._send(200, "")
        if not visible:
            raise _HttpError(404, "Unable to find the specified experiment.")
        return self._send(200, _item("xnat:projectData", {"ID": p.id, "secondary_ID": p.id, "name": p.name}))

    def _config(self, pid: str | None, tool: str, cpath: str, q: dict) -> None:
        """GET /data[/projects/<id>]/config/<tool>/<path> as ConfigResource.represent answers it
        (xnat-web, restlet/resources): a project the user may not read is 404 "The requested
        project <id> does not exist."; one whose data the user may not read
        (``Permissions.canRead(user, "xnat:subjectData/project", id)``) 403; a site-wide
        configuration needs no right. The configuration comes as a table (tool, path, project,
        user, create_date, reason, contents, unversioned, version, status); ``contents=true`` gives
        the contents alone, 404 when disabled. Only the series import filters are kept here
        (tool ``seriesImportFilter``, path ``config``: DicomFilterService); anything else is
        "Couldn't find config ..." (404)."""
        x = self.xnat
        with x.lock:
            if pid is not None:
                p = x.projects.get(pid)
                if p is None or not p.readable_by(self.user):
                    raise _HttpError(404, f"The requested project {pid} does not exist.")
                if not p.data_readable_by(self.user):
                    raise _HttpError(403, f"User {self.user} can not access project {pid}")
            f = x.series_filters.get(pid or "") if (tool, cpath) == ("seriesImportFilter", "config") else None
            if f is None:
                raise _HttpError(404, f"Couldn't find config for user {self.user} and project {pid} on tool [{tool}] "
                                      f"path [{cpath}]")
            status = "enabled" if f.enabled else "disabled"
            if q.get("contents", "").lower() == "true" and q.get("meta", "").lower() != "true":
                if not f.enabled:
                    raise _HttpError(404, f"Config not found for user {self.user} and project {pid} on tool [{tool}] "
                                          f"path [{cpath}]")
                return self._send(200, f.contents())
            return self._send(200, _result_set([{
                "tool": tool, "path": cpath, "project": pid, "user": "admin", "create_date": _now(),
                "reason": "", "contents": f.contents(), "unversioned": "false", "version": "1", "status": status}]))

    def _prearchive_code(self, method: str, pid: str, value: list[str]) -> None:
        """/data/projects/<id>/prearchive_code[/<code>] as ProjectResource answers it (NrgXnat/xnat
        web/.../restlet/resources/ProjectResource.java): GET gives the code as text to whoever may
        read the project (DefaultProjectHandler); PUT .../prearchive_code/<code> stores it for the
        project's owners only (Permissions.canEdit; members get 403), "true"/"false" meaning 1/0
        (translateArcProjectCode), anything else not an integer 400."""
        x = self.xnat
        p = x.projects.get(pid)
        visible = p is not None and p.readable_by(self.user)
        if method == "PUT":
            if not visible:
                if not x.can_create_projects:
                    raise _HttpError(403, f"User {self.user} doesn't have permission to create projects on this "
                                          "system")
                raise _HttpError(400, "You can't set the 'prearchive_code' attribute without specifying the project "
                                      "on which you want to set it.")
            role = p.roles.get(self.user)
            if role not in ("owner", "member"):
                raise _HttpError(403, f"User {self.user} doesn't have permission to edit the project {pid}")
            if role != "owner":
                raise _HttpError(403, "User account doesn't have permission to edit this project.")
            if not value or not value[0]:
                return self._send(200, "")
            code = {"true": "1", "false": "0"}.get(value[0], value[0])
            if not re.fullmatch(r"-?\d+", code):
                raise _HttpError(400, f"The submitted code {value[0]} is invalid: must be an integer.")
            p.prearchive_code = int(code)
            return self._send(200, "")
        if not visible:
            raise _HttpError(404, "Unable to find the specified experiment.")
        return self._send(200, str(p.prearchive_code))

    def _projects_allowing(self, q: dict) -> None:
        """/data/projects?permissions=<action>&dataType=<type>: ProjectListResource's
        PermissionsProjectHandler, DefaultGroupsAndPermissionsCache.getProjectsForDatatypeAction:
        the projects where the user's groups (or the guest's: read on public projects) allow the
        action, as the table ``SELECT ID,secondary_ID FROM xnat_projectData`` gives them (column
        names lower-cased by PostgreSQL). An unknown action or type throws: a 500 without text."""
        action, dtype = q.get("permissions") or "", q.get("dataType") or ""
        if action not in ROLE_ACTIONS or not re.fullmatch(r"xnat:\w+", dtype):
            raise _HttpError(500, "")
        rows = [{"id": p.id, "secondary_id": p.id} for p in self.xnat.projects.values()
                if p.roles.get(self.user) in ROLE_ACTIONS[action]
                or (action == "read" and p.accessibility == "public")]
        return self._send(200, _result_set(sorted(rows, key=lambda r: r["secondary_id"])))

    def _put_subject(self, pid: str, segment: str) -> None:
        """PUT /data/projects/<p>/subjects/<label>, as SubjectResource.handlePut does it (xnat-web,
        restlet/resources; read in the NrgXnat/xnat monorepo):

        * the label is the URI's SUBJECT_ID attribute through SecureResource.getParameter:
          TurbineUtils.escapeParam (StringEscapeUtils.escapeXml11), not URL-decoded (XNAT decodes
          only where it calls getUrlEncodedParameter) and never cleaned: no cleanValue here;
        * the subject is looked up by project + label (GetSubjectByProjectIdentifier, exact case;
          only the archiver's lookup is case-insensitive), then by ID;
        * SecureResource.validateSubject's "Invalid character in subject label." (417) tests
          XftStringUtils.isValidId on the subject's *ID*, which XNAT has just generated
          (XnatSubjectdata.CreateNewID), so a label is never refused for its characters; its
          ``subject.validate()`` (XFTValidator) checks xnat.xsd, where ``label`` is an
          ``xs:string`` without pattern or size: only the 255-character default limit applies
          (400, ValidationResults.toFullString);
        * a project the user may not read is not found and the empty record has no project: 422;
          creating needs the create right (owner or member), else 403; 201 with the ID for a new
          subject, 200 for an existing one."""
        x = self.xnat
        p = x.projects.get(pid)
        if p is None or not p.readable_by(self.user):
            raise _HttpError(422, "Submitted subject record must include the project attribute.")
        label = _escape_xml11(segment)
        role = p.roles.get(self.user)
        subj = None
        if p.data_readable_by(self.user):  # XFT's search runs with the user's permissions
            subj = p.subjects.get(label) or next((s for s in p.subjects.values() if s.id == label), None)
        if subj is not None:
            if role not in ROLE_ACTIONS["edit"]:
                raise _HttpError(403, "Specified user account has insufficient edit privileges for subjects in this "
                                      "project.")
            return self._send(200, subj.id)
        if role not in ROLE_ACTIONS["create"]:
            raise _HttpError(403, "Specified user account has insufficient create privileges for subjects in this "
                                  "project.")
        if len(label) > MAX_STRING:
            raise _HttpError(400, f"Must Be Less Than {MAX_STRING} Characters : Current Length ({len(label)})\n")
        subj = p.subjects[label] = Subject(x._next_id("S"), label, p.id)
        return self._send(201, subj.id)

    def _subject_item(self, s: Subject) -> dict:
        return _item("xnat:subjectData", {"ID": s.id, "label": s.label, "project": s.project})

    def _exp_row(self, e: Experiment) -> dict:
        subj = self.xnat.find_subject(e.subject_id)
        return {"ID": e.id, "label": e.label, "project": e.project, "subject_ID": e.subject_id,
                "subject_label": subj.label if subj else "", "date": e.date, "UID": e.uid,
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
                "date": exp.date, "UID": exp.uid}))
        if rest == ["scans"]:
            return self._send(200, _result_set([
                {"ID": s.id, "xnat_imagescandata_id": s.id, "type": s.series_description,
                 "series_description": s.series_description, "quality": "usable", "note": "", "UID": s.uid,
                 "xsiType": "xnat:mrScanData" if s.modality == "MR" else "xnat:otherDicomScanData",
                 "URI": f"/data/experiments/{exp.id}/scans/{s.id}"}
                for s in sorted(exp.scans.values(), key=lambda s: int(s.id) if s.id.isdigit() else 0)]))
        if len(rest) >= 2 and rest[0] == "scans":
            scan = exp.scans.get(rest[1])
            if scan is None:
                raise _HttpError(404, f"Scan {rest[1]} not found")
            base = f"/data/experiments/{exp.id}/scans/{scan.id}"
            if len(rest) == 2:
                return self._send(200, _item("xnat:mrScanData", {
                    "ID": scan.id, "type": scan.series_description, "series_description": scan.series_description,
                    "image_session_ID": exp.id, "UID": scan.uid, "frames": len(scan.files)}))
            if rest[2:] == ["files"]:  # FileList: every resource's files, the resource label in "collection"
                return self._send(200, _result_set([row for label, res in scan.resources.items()
                                                    for row in _file_rows(base, label, res)]))
            if rest[2:] == ["resources"]:
                return self._send(200, _result_set([
                    {"xnat_abstractresource_id": label, "label": label, "element_name": "xnat:resourceCatalog",
                     "category": "scans", "file_count": str(len(res)), "format": label}
                    for label, res in scan.resources.items()]))
            if len(rest) == 5 and rest[2] == "resources" and rest[4] == "files":
                res = scan.resources.get(rest[3])
                if res is None:
                    raise _HttpError(404, f"Resource {rest[3]} not found")
                return self._send(200, _result_set(_file_rows(base, rest[3], res)))
            if len(rest) in (4, 6) and rest[2] == "resources" and (len(rest) == 4 or rest[4] == "files"):
                return self._scan_file(method, exp, scan, rest[3], rest[5] if len(rest) == 6 else None, body)
        if rest and rest[0] == "resources":
            return self._resources(method, exp.resources, rest, self.xnat.storage / exp.project / exp.label / "RESOURCES",
                                   f"/data/experiments/{exp.id}", body)
        raise _HttpError(404, "Not found")

    def _scan_file(self, method: str, exp: Experiment, scan: Scan, label: str, name: str | None, body: bytes) -> None:
        """A scan's resource and its files, as CatalogResource (PUT of a resource) and FileList
        (GET, PUT, DELETE of a file) answer them (xnat-web restlet/resources, routed in
        XNATApplication): a pipeline adds SNAPSHOTS/NIFTI resources this way, a user deletes a file.
        Changing a scan is for those who may edit the project's data (owners and members)."""
        x = self.xnat
        if method in ("PUT", "POST", "DELETE") and x.role(exp.project, self.user) not in ROLE_ACTIONS["edit"]:
            raise _HttpError(403, f"User {self.user} may not edit session {exp.label}")
        if name is None:
            if method != "PUT":
                raise _HttpError(405, "Method Not Allowed")
            scan.resources.setdefault(label, {})
            return self._send(200, "")
        res = scan.resources.get(label)
        if method in ("PUT", "POST"):
            ctype = self.headers.get("Content-Type", "")
            data = _first_multipart_part(body, ctype) if ctype.startswith("multipart/form-data") else body
            path = x.storage / exp.project / exp.label / "SCANS" / scan.id / label / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            scan.resources.setdefault(label, {})[name] = str(path)
            return self._send(200, "")
        if res is None or name not in res:
            raise _HttpError(404, f"File {name} not found")
        if method == "DELETE":
            Path(res.pop(name)).unlink(missing_ok=True)
            scan.sop_uids.pop(name, None)
            return self._send(200, "")
        return self._send(200, Path(res[name]).read_bytes(), "application/octet-stream")

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
            self._import_inner(q, body)
        finally:
            with x.lock:
                x.active_imports -= 1

    def _import_inner(self, q: dict, body: bytes) -> None:
        x = self.xnat
        with x.lock:
            x.import_queries.append(dict(q))
        if q.get("import-handler", "DICOM-zip") != "DICOM-zip":
            raise _HttpError(400, f"Import handler {q.get('import-handler')} is not modelled by this test server")
        # Importer + RequestUtil.deriveFileName: the body's file name comes from its media type;
        # DicomZipImporter.importCompressedFile accepts zip and tar only ("upload" has no extension)
        mtype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if mtype != "application/zip":
            raise _HttpError(400, "Unsupported format UNKNOWN" if mtype != "application/x-tar"
                             else "tar uploads are not modelled by this test server")
        project = q.get("project")
        if not project or x.role(project, self.user) is None:
            # GradualDicomImporter.getProject asks UserProjectCache.get (read access): a private
            # project of others is not found and the files would go to the unassigned prearchive;
            # a protected or public one the user may read but not add to is staged, and archiving
            # then fails on the save's permission check (PrearcSessionArchiver, XFTItem.save:
            # InvalidPermissionException), with a status that differs between XNAT versions.
            # Neither path is modelled: this server refuses at once. Our client never gets here:
            # it asks first which projects it may create subjects in (ensure_project).
            raise _HttpError(400, f"Project {project!r} does not exist or the user may not upload to it")
        files, refused = self._read_entries(q, parse_upload_zip(body))
        if not files:
            # DicomZipImporter.call: no session and a kept refusal: that refusal; nothing at all
            # (empty zip, everything filtered): an empty answer
            if refused:
                raise _HttpError(400, refused)
            return self._send(200, "")
        subject, name = self._import_labels(q, files)
        studies = sorted({str(ds.get("StudyInstanceUID", "") or "") for _, _, ds in files})
        if len(studies) > 1 and (q.get("dest") or "").startswith("/archive"):
            return self._import_studies(q, project, subject, name, files, studies)
        dest = q.get("dest") or ""
        direct = q.get("Direct-Archive", "false").lower() == "true"
        if direct and not dest:
            raise _HttpError(400, "Direct-Archive without dest is not modelled by this test server")
        if direct:
            # GradualDicomImporter returns /xapi/direct-archive/<project>/<tag>/<name>; with a dest,
            # DicomZipImporter.xmlBuild splits it as a prearchive URI, finds no prearchive
            # session, and the whole import fails (files stay in the direct-archive area)
            raise _HttpError(400, "Failed to archive 1 of 1 session(s)")
        row = x.receive(project, subject, name, files)
        if not dest:
            # without dest, DicomZipImporter.call stops after staging (no action=commit): the row
            # stays RECEIVING for the session rebuilder (rebuild_idle_sessions)
            return self._send(200, f"/data/prearchive/projects/{row.key}\r\n")
        if not dest.startswith("/archive"):
            with x.lock:  # dest=/prearchive: xmlBuild builds the row (READY) and does not archive
                row.status = "READY"
            return self._send(200, f"/data/prearchive/projects/{row.key}\r\n")
        if x._take_fault("/data/services/import", ("receiving_interrupt",)):
            # PrearchiveRebuildHandler.rebuild: more data for the row arrived while XNAT built it
            # (RECEIVING_INTERRUPT: another upload of the study), so it gives way (false) and puts
            # the row back to RECEIVING; xmlBuild archives nothing and DicomZipImporter.call answers
            # the empty list of archive URIs: 200 with an empty body. The session rebuilder takes
            # the row later (rebuild_idle_sessions).
            with x.lock:
                row.status, row.lastmod, row.idle_since = "RECEIVING", _now(), time.monotonic()
            return self._send(200, "")
        # dest=/archive: DicomZipImporter.determiningDestination sets action=commit and AA=true
        # whatever the project's prearchive code, so xmlBuild archives the row within the request
        # (archiveSession: the row goes ARCHIVING), a Manual (0) project included.
        # Whether an existing session may be merged into (DicomZipImporter.archiveSession):
        # Importer.parseOverrideValue turns ``overwrite`` into allowSessionMerge (absent: false;
        # append: true; delete or override: true, with overrideExceptions; any other value, "none"
        # included: true) and writes it over any ``allowSessionMerge`` of the query; when false,
        # the merge is still allowed if the row's AUTOARCHIVE is not Manual (4 or 5).
        overwrite = q.get("overwrite")
        override = (overwrite or "").lower() in ("delete", "override")
        allow_merge = overwrite is not None or row.auto_archive not in (None, 0)
        overwrite_files = x.overwrite_files_for(row, q.get("overwrite_files", "").lower() == "true")
        if x.on_archive is not None:
            x.on_archive(row)
        with x.lock:
            row.status, row.lastmod = "_ARCHIVING", _now()
        if x.import_seconds:  # archiving a large visit takes a while
            time.sleep(x.import_seconds)
        if x._take_fault("/data/services/import", ("archive_error",)):
            with x.lock:
                row.status, row.lastmod = "ERROR", _now()
            raise _HttpError(500, f"{ARCHIVE_FAILED}: injected archive error")
        try:
            exp = x.archive_row(row, subject=q.get("subject"), label=q.get("session"), allow_merge=allow_merge,
                                override=override, overwrite_files=overwrite_files)
        except Exception:
            # xmlBuild catches whatever the archiver threw (the row is CONFLICT after a 409,
            # ERROR otherwise) and throws ClientException(ARCHIVE_FAILED): Importer answers 400
            raise _HttpError(400, ARCHIVE_FAILED) from None
        return self._send(200, x.archive_uri(exp) + "\r\n")

    def _import_studies(self, q: dict, project: str, subject: str, name: str, files: list, studies: list) -> None:
        """An upload holding several studies: GradualDicomImporter puts each file into the row of
        its StudyInstanceUID (PrearcDatabase.eitherGetOrCreateSession: one row per study, all
        under the same session label), and DicomZipImporter.xmlBuild archives the rows one by one
        (its set of rows has no order; here they go in UID order). The first study archives as
        the session; the next one meets a session of that label holding another study (merged
        unasked on an auto-archive project: UID_MOD, 409), its row goes to CONFLICT and the import
        answers 400, the first study staying archived."""
        x = self.xnat
        uris = []
        for study in studies:
            group = [f for f in files if str(f[2].get("StudyInstanceUID", "") or "") == study]
            row = x.receive(project, subject, name, group)
            overwrite = q.get("overwrite")
            try:
                exp = x.archive_row(row, subject=q.get("subject"), label=q.get("session"),
                                    allow_merge=overwrite is not None or row.auto_archive not in (None, 0),
                                    override=(overwrite or "").lower() in ("delete", "override"),
                                    overwrite_files=x.overwrite_files_for(row, False))
            except Exception:
                raise _HttpError(400, ARCHIVE_FAILED) from None
            uris.append(x.archive_uri(exp))
        return self._send(200, "\r\n".join(uris) + "\r\n")

    def _read_entries(self, q: dict, entries, faults: bool = True) -> tuple[list, str | None]:
        """DicomZipImporter.importZipFile: each entry in order through GradualDicomImporter.call.
        Returns the files to stage and the last refusal kept under Ignore-Unparsable.

        * the series import filters come first (``shouldIncludeDicomObject``, the site-wide one and
          the project's: an object must pass both): a dropped object is skipped silently;
        * a refused object (ClientException) is kept under Ignore-Unparsable and the next entry
          read; without it the import stops, the entries before it staying in their prearchive
          row (RECEIVING, as GradualDicomImporter left them): 400;
        * the ``storage_error`` fault: ``GradualDicomImporter.write`` fails after
          ``storage_error_after`` files (a full disk: its IOException becomes
          ``ServerException(SERVER_ERROR_INSUFFICIENT_STORAGE)``), and GradualDicomImporter.call's
          catch-all turns that into ``ClientException(400, "unable to read DICOM object <name>")``:
          like any refused object it is dropped under Ignore-Unparsable (the import goes on, the
          session is archived without those files, the answer is 200 with its URI), and stops the
          import without it (400, the files before it RECEIVING). Not taken by an import whose
          connection broke (``faults`` false)."""
        x = self.xnat
        ignore = q.get("Ignore-Unparsable", "false").lower() == "true"
        with x.lock:
            filters = [f for f in (x.series_filters.get(""), x.series_filters.get(q.get("project") or ""))
                       if f is not None and f.enabled]
        storage_error = faults and x._take_fault("/data/services/import", ("storage_error",)) is not None
        files, refused = [], None
        for fname, data, ds, why in entries:
            if ds is not None and not all(f.includes(ds) for f in filters):
                continue
            if why is None and storage_error and len(files) >= x.storage_error_after:
                why = f"unable to read DICOM object {fname}"  # the write's ServerException, caught
            if why is None:
                files.append((fname, data, ds))
                continue
            if ignore:
                refused = why
                continue
            if files:
                self._stage_for_import(q, files)
            raise _HttpError(400, why)
        return files, refused

    @staticmethod
    def _import_labels(q: dict, files: list) -> tuple[str, str]:
        """GradualDicomImporter.call: the subject and session label of the row (query, then DICOM)."""
        first = files[0][2]
        subject = q.get("subject") or str(first.get("PatientName", "") or "")
        name = q.get("session") or str(first.get("PatientID", "") or "dicom_upload")
        return subject, name

    def _stage_for_import(self, q: dict, files: list) -> None:
        """The entries an import read before it stopped: received, the row left RECEIVING."""
        subject, name = self._import_labels(q, files)
        self.xnat.receive(q["project"], subject, name, files)

    def _prearchive(self, method: str, path: str) -> None:
        x = self.xnat
        parts = path.strip("/").split("/")[2:]  # after data/prearchive
        with x.lock:
            visible = {k: e for k, e in x.prearchive.items() if x.role(e.project, self.user) is not None}
            if parts in ([], ["projects"]):
                return self._send(200, _result_set([self._pre_row(e) for e in visible.values()]))
            if len(parts) == 2 and parts[0] == "projects":
                return self._send(200, _result_set([self._pre_row(e) for e in visible.values() if e.project == parts[1]]))
            if len(parts) == 6 and parts[0] == "projects" and parts[4] == "logs":
                e = visible.get("/".join(parts[1:4]))
                if e is None:
                    raise _HttpError(404, "No such prearchive session")
                if parts[5] != "last":
                    raise _HttpError(404, "No such log")
                return self._send(200, e.logs[-1] if e.logs else "", "text/plain")
            if len(parts) == 4 and parts[0] == "projects":
                key = "/".join(parts[1:])
                e = visible.get(key)
                if e is None:
                    raise _HttpError(404, "No such prearchive session")
                if method == "DELETE":
                    if e.status in LOCKED:  # PrearcDatabase: a locked session cannot be deleted
                        raise _HttpError(409, f"The prearchive session {key} is locked ({e.status}) and cannot "
                                              "be deleted")
                    x.prearchive.pop(key, None)
                    return self._send(200, "")
                return self._send(200, _result_set([self._pre_row(e)]))
        raise _HttpError(404, "Not found")

    def _batch_delete(self, q: dict, body: bytes) -> None:
        """PrearchiveBatchDelete: each src is queued for deletion unless its row is locked
        (PrearcDatabase.setStatus refuses, the row stays); the answer lists the rows."""
        x = self.xnat
        form = parse_qs(body.decode(errors="replace"))
        srcs = [q["src"]] if "src" in q else form.get("src", [])
        rows = []
        with x.lock:
            for src in srcs:
                e = x.prearchive.get(_prearchive_key(unquote(src)))
                if e is None or x.role(e.project, self.user) is None:
                    continue
                rows.append(self._pre_row(e))
                if e.status not in LOCKED:
                    x.prearchive.pop(e.key, None)
        return self._send(200, _result_set(rows))

    @staticmethod
    def _pre_row(e: PrearchiveEntry) -> dict:
        return {"project": e.project, "timestamp": e.timestamp, "name": e.name, "folderName": e.name,
                "subject": e.subject, "status": _ROW_STATUS_IN_TABLE.get(e.status, e.status),
                "url": f"/prearchive/projects/{e.key}", "uploaded": e.uploaded, "lastmod": e.lastmod,
                "scan_date": "", "scan_time": "", "tag": e.tag, "TIMEZONE": "", "prevent_anon": "false",
                "autoarchive": PREARCHIVE_CODES.get(e.auto_archive, "") if e.auto_archive is not None else "",
                "prevent_auto_commit": "false", "SOURCE": "", "VISIT": "", "PROTOCOL": "", "TIMEZONE_ID": ""}

    def _archive_prearchive(self, q: dict, body: bytes) -> None:
        """POST /data/services/archive?src=<row> (Archiver): QueueBasedImageCommit is built with
        allowSessionMerge=true, so the row is always merged into an existing session; Archiver.
        initialize makes ``overwrite=append`` or ``delete`` overrideExceptions (files the session
        holds are then replaced); ``overwrite_files=true`` or a prearchive code of 5 replaces them
        too (PrearcSession.isOverwriteFiles)."""
        x = self.xnat
        form = {k: v[-1] for k, v in parse_qs(body.decode(errors="replace")).items()}
        arg = {**form, **q}
        src = arg.get("src") or ""
        key = _prearchive_key(src)
        with x.lock:
            e = x.prearchive.get(key)
            if e is None or x.role(e.project, self.user) is None:
                raise _HttpError(404, f"No prearchive session {src}")
            if e.status in LOCKED:
                raise _HttpError(423, "Duplicate archive attempt. Prearchive session already archiving.")
            e.status = "_ARCHIVING"
        exp = x.archive_row(e, subject=arg.get("subject"), label=arg.get("session") or arg.get("label"),
                            allow_merge=True, override=(arg.get("overwrite") or "").lower() in ("append", "delete"),
                            overwrite_files=x.overwrite_files_for(e, (arg.get("overwrite_files") or "").lower() == "true"))
        return self._send(200, x.archive_uri(exp))


def _escape_xml11(value: str) -> str:
    """StringEscapeUtils.escapeXml11 as TurbineUtils.escapeParam applies it (the five entities;
    characters XML 1.1 forbids, such as NUL, are dropped)."""
    out = value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return out.replace('"', "&quot;").replace("'", "&apos;").replace("\x00", "")


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
