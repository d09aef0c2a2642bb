"""The XNAT test server's data model: projects, subjects, experiments, scans, prearchive rows,
series import filters, users, and the switches only a test flips (faults, a proxy's timeout, the
site's anonymization). Each model names the XNAT class it follows (see the package docstring)."""

from __future__ import annotations

import datetime as dt
import json
import re
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.datadict import tag_for_keyword
from pydicom.multival import MultiValue

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
# PrearcSessionArchiver.MODALITY_MOD: with the site preference preventCrossModalityMerge (true by
# default, SiteConfigPreferences.getPreventCrossModalityMerge) checkForConflicts refuses to merge a
# session into an existing one of another data type (getXSIType differs), 409
MODALITY_MOD = "Invalid modification of session modality via archive process.  Data may require a manual merge."
# the session data type of a lead modality (xnat.xsd: xnat:mrSessionData, xnat:ctSessionData, ...)
SESSION_TYPES = {"MR": "xnat:mrSessionData", "CT": "xnat:ctSessionData", "PT": "xnat:petSessionData",
                 "US": "xnat:usSessionData", "CR": "xnat:crSessionData", "DX": "xnat:dxSessionData",
                 "MG": "xnat:mgSessionData", "NM": "xnat:nmSessionData", "XA": "xnat:xaSessionData"}


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
    xsi_type: str = "xnat:mrSessionData"  # the session's data type (session_xsi_type)


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
    secondary_id: str = ""  # the "Running Title" (xnat:projectData/secondary_ID); "" shows the ID
    aliases: tuple[str, ...] = ()  # xnat:projectData/aliases

    def taken_names(self) -> set[str]:
        """What this project holds that a new project may not reuse, lower-cased as
        BaseXnatProjectdata.validateElements compares them: its ID, running title, title, aliases."""
        return {v.lower() for v in (self.id, self.secondary_id, self.name, *self.aliases) if v}

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
class AnonScriptConfig:
    """An anonymization script as XNAT keeps it: a configuration of tool ``anon``
    (DicomEdit.ToolName), path ``script`` for the site-wide one and ``/projects/<id>`` for a
    project's (DicomEdit.buildScriptPath; ConfigResource.fixAnonPath serves the latter at
    ``/data/projects/<id>/config/anon/projects/<id>``), with its status: the site-wide script
    runs on import when enabled (GradualDicomImporter, DefaultAnonUtils.isSiteWideScriptEnabled;
    the site preference enableSitewideAnonymizationScript sets that status,
    AnonymizationHandlerMethod), a project's on archive when enabled
    (ProjectAnonymizer.isEnabled). The contents are DicomEdit 6 (``dicomedit.py``)."""

    contents: str
    enabled: bool = True

    def row(self, tool: str, path: str, project: str | None) -> dict:
        return {"tool": tool, "path": path, "project": project, "user": "admin", "create_date": _now(),
                "reason": "", "contents": self.contents, "unversioned": "false", "version": "1",
                "status": "enabled" if self.enabled else "disabled"}


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


class _HttpError(Exception):
    """An error answer. XNAT's restlet resources and services set a status with a description
    (``getResponse().setStatus(status, message)``, Importer.respondToException included) and no
    entity, so Restlet answers it with its status page (:func:`status_page`); ``page=False`` is for
    answers XNAT writes itself (the login's)."""

    def __init__(self, status: int, message: str, page: bool = True):
        super().__init__(message)
        self.status, self.message, self.page = status, message, page


# RFC 2616 sections of Restlet's Status constants (the "technical details" link of its page)
_RFC_SECTIONS = {400: "10.4.1", 401: "10.4.2", 403: "10.4.4", 404: "10.4.5", 405: "10.4.6", 409: "10.4.10",
                 417: "10.4.18", 422: "10.4", 423: "10.4", 500: "10.5.1", 507: "10.5"}


def status_page(status: int, description: str) -> str:
    """The page Restlet 1.1 (XNAT's, gradle/libs.versions.toml) answers an error status without
    an entity with: com.noelios.restlet.application.StatusFilter's default representation, a
    ``Status page`` title and the status description in ``<h3>`` (HTML-escaped here; XNAT pages
    seen in the wild read ``<h3>Already assigned to project:...</h3>``)."""
    import html

    section = _RFC_SECTIONS.get(status, "10.4" if status < 500 else "10.5")
    return ("<html>\n<head>\n   <title>Status page</title>\n</head>\n<body>\n<h3>"
            f"{html.escape(description or 'No description available for this result status', quote=False)}"
            "</h3><p>You can get technical details <a href=\"http://www.w3.org/Protocols/rfc2616/rfc2616-sec10.html"
            f"#sec{section}\">here</a>.<br>\nPlease continue your visit at our <a href=\"/\">home page</a>.\n"
            "</p>\n</body>\n</html>\n")


def _result_set(rows: list[dict]) -> dict:
    return {"ResultSet": {"Result": rows, "totalRecords": str(len(rows))}}


def _item(xsi_type: str, data_fields: dict, children: list | None = None) -> dict:
    return {"items": [{"data_fields": data_fields, "meta": {"xsi:type": xsi_type, "isHistory": False},
                       "children": children or []}]}



class XnatState:
    """What the server holds and the switches tests flip; the set-up helpers a test calls."""

    def __init__(self, schemas_dir: Path, user: str = "admin", password: str = "admin",
                 storage: Path | None = None, can_create_projects: bool = True):
        self.schemas_dir = Path(schemas_dir)
        self.users = {user: password}
        self.tokens: dict[str, str] = {}
        self.projects: dict[str, Project] = {}
        self.prearchive: dict[str, PrearchiveEntry] = {}  # key "<project>/<timestamp>/<name>"
        self.storage = Path(storage or tempfile.mkdtemp(prefix="xnat-test-server-"))
        self.can_create_projects = can_create_projects
        # IDs of deleted projects: XNAT keeps them in xnat_projectdata_history, and
        # ProjectResource.handlePut refuses to create a project of such an ID (403)
        self.deleted_projects: set[str] = set()
        # the site preference preventCrossModalityMerge (SiteConfigPreferences, true by default)
        self.prevent_cross_modality_merge = True
        self.lock = threading.RLock()
        self.faults: list[dict] = []
        self.slow_seconds = 3.0
        self.proxy_timeout: float | None = None  # a reverse proxy's read timeout (504 after it)
        # the series import filters (DicomFilterService): "" the site-wide one, else a project's
        self.series_filters: dict[str, SeriesImportFilter] = {}
        self.drop_fraction = 0.5  # drop_mid_stream: the share of the body that arrives
        self.storage_error_after = 0  # storage_error: the files stored before the write fails
        # the anonymization scripts (tool anon): "" the site-wide one, else a project's (set_anon_script)
        self.anon_scripts: dict[str, AnonScriptConfig] = {}
        # the site preference separateSecondaryDicomOnArchive (true by default since XNAT 1.9.1):
        # files of a SOP class that is not primary imaging land in resource "secondary"
        self.separate_secondary = True
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

    def set_anon_script(self, script: str | None, project: str | None = None, enabled: bool = True) -> None:
        """The site-wide (``project`` None) or a project's anonymization script, as an admin sets
        it (Administer > Site Administration > Anonymization, or the project's settings: a
        configuration of tool ``anon``, AnonScriptConfig); None removes it."""
        with self.lock:
            if script is None:
                self.anon_scripts.pop(project or "", None)
            else:
                self.anon_scripts[project or ""] = AnonScriptConfig(script, enabled)

    def anon_script(self, project: str | None) -> str | None:
        """The script XNAT runs for ``project`` (None: the site-wide one), when enabled."""
        with self.lock:
            cfg = self.anon_scripts.get(project or "")
            return cfg.contents if cfg is not None and cfg.enabled else None

    @property
    def site_anonymization(self) -> bool:
        """Shortcut: XNAT's default site-wide script (``id.das``: StudyDescription := project,
        PatientName := subject, PatientID := session) switched on."""
        cfg = self.anon_scripts.get("")
        return cfg is not None and cfg.enabled

    @site_anonymization.setter
    def site_anonymization(self, on: bool) -> None:
        from .dicomedit import DEFAULT_SITE_SCRIPT

        self.set_anon_script(DEFAULT_SITE_SCRIPT if on else None)

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
                    accessibility: str = "protected", prearchive_code: int | None = None, name: str | None = None,
                    secondary_id: str = "", aliases: tuple[str, ...] = ()) -> Project:
        """A project as the site has it; ``prearchive_code`` defaults to the site's
        defaultPrearchiveCode (4), as a new project gets it (BaseXnatProjectdata.initArcProjectImpl)."""
        with self.lock:
            code = self.default_prearchive_code if prearchive_code is None else prearchive_code
            p = self.projects.setdefault(pid, Project(pid, name or pid, accessibility=accessibility, prearchive_code=code,
                                                      secondary_id=secondary_id, aliases=tuple(aliases)))
            if owner:
                p.roles[owner] = "owner"
            for m in members:
                p.roles.setdefault(m, "member")
            return p

    def add_subject(self, project: str, label: str) -> Subject:
        with self.lock:
            p = self.projects[project]
            return p.subjects.setdefault(label, Subject(self._next_id("S"), label, project))

    def add_experiment(self, project: str, subject: str, label: str, uid: str,
                       xsi_type: str = "xnat:mrSessionData") -> Experiment:
        """A session already in XNAT (no scans)."""
        with self.lock:
            subj = self.add_subject(project, subject)
            return subj.experiments.setdefault(label, Experiment(self._next_id("E"), label, project, subj.id, uid=uid,
                                                                 xsi_type=xsi_type))

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
