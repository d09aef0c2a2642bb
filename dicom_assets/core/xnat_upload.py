"""Upload a visit to XNAT through xnatpy: the pure part (what to send, how to zip it, how
to tell a duplicate) and the client calls. No Dagster here.

What a real XNAT (1.8/1.9, ``NrgXnat/xnat-web``) does with an upload, and how this client
copes (docs/decisions.md, "Uploads to a real XNAT"):

* the zip goes to the import service (``DICOM-zip``) with ``dest=/archive`` (no
  ``Direct-Archive``: with a ``dest`` XNAT cannot archive a direct-archive session); XNAT stages
  it in the prearchive and archives it within the request, whatever the project's prearchive
  setting (``DicomZipImporter.determiningDestination``: the dest overrides "all to prearchive");
  the request is xnatpy's (``upload_file``) but the answer is read here (``post_import``);
* merging into an existing session: XNAT's import service merges when asked with ``overwrite``
  (``Importer.parseOverrideValue``; ``allowSessionMerge`` cannot be sent, it is overwritten),
  and unasked only in projects set to auto-archive (``DicomZipImporter.archiveSession``); so
  ``append`` sends ``overwrite=append``. A refused merge leaves the prearchive row in CONFLICT
  and answers 400: the client says so (``refused_import``) and removes its row;
* an answer without an archive URI (XNAT kept the upload in its prearchive: its build gave way
  to more data for the row) is waited for while XNAT works on the row; a row left READY (a
  project set to "all to prearchive" is not archived by XNAT's rebuilder) fails the step,
  naming the row and what the site admin can do (``unarchived_answer``);
* subject and session labels are cleaned the way XNAT cleans them (``cleanValue``) before
  they are sent, so the session is found where XNAT files it; the mapping is reported; a label
  longer than XFT's 255 characters fails before anything is sent;
* a project the user cannot see is created (a new project ID must match
  ``XftStringUtils.isValidId``); XNAT answers 403 when it exists as a private project of others
  or the user may not create projects; a project the user sees but may not add data to (a
  protected or public one of others) fails before anything is sent;
* every file must carry SOPClassUID and SOPInstanceUID (``GradualDicomImporter`` refuses a
  file without, and drops it silently under ``Ignore-Unparsable``): checked before sending;
* a session is looked up at project level (labels are unique per project) and compared by the
  ``<SOPInstanceUID>.dcm`` names of its scans' ``DICOM`` resource only (XNAT keeps the uploaded
  names; pipelines add other resources); ``append`` sends only the instances it lacks (XNAT
  refuses a file the session already holds);
* a file the session lacks is "filtered by XNAT" only when XNAT's series import filter drops
  it: the client reads the site-wide and the project's filter from XNAT's configuration
  (``DicomFilterService``, ``ConfigResource``) and applies them to the file's header as
  ``RegExBasedSeriesImportFilter`` does (``series_import_filters``). Such files are reported and
  are no reason to call the session different; a name an earlier upload recorded as filtered is
  checked again, never trusted;
* XNAT does not archive an upload whole or not at all: what it read before a connection broke,
  or before it stopped an import mid-zip, stays in a RECEIVING row that its session rebuilder
  archives as a partial session in a project set to auto-archive (``SessionXMLRebuilder``,
  ``PrearchiveRebuildHandler``). Every missing file the filter does not explain is sent again
  (only those, ``overwrite=append``) and the session checked again; if they still do not
  arrive the step fails, naming how many files of which series are missing;
* before sending, the client records the visit's files (``write_pending``; no secrets) and
  removes the record once the session is verified complete: a retry that finds a session
  holding only recorded files completes its own unfinished upload whatever the duplicate
  policy; a session holding any other file follows the policy;
* after a timeout, a dropped connection or a 5xx (a proxy's 504 while XNAT carries on
  archiving), the client polls the prearchive and the session before anything is sent again;
  only prearchive rows of this upload are cleaned up (same StudyInstanceUID and label, appeared
  or changed during the upload, in ERROR/READY/CONFLICT, and RECEIVING after XNAT refused the
  import);
* project resources (e.g. the TCIA manifests) are attached after the session; a refusal
  there (they need the project owner role) is a warning, not a failed upload;
* credentials come from the caller (environment variables); they never enter a message.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from .config import XNAT_DUPLICATE_POLICIES
from .errors import DicomAssetsError
from .fsutil import atomic_write

POLICIES = XNAT_DUPLICATE_POLICIES

# BaseXnatExperimentdata.cleanValue: XNAT replaces each of these characters by "_" in subject
# and session labels (PrearcSessionArchiver.fixSessionLabel / fixSubject)
XNAT_CLEANED_CHARS = " `~@#$%^&*()+=[]{}|\\/?:;\"',.<>"
_CLEAN = str.maketrans({c: "_" for c in XNAT_CLEANED_CHARS})

# XftStringUtils.REGEX_VALID_ID (Patterns.ALPHANUMERIC_AND_DASHES): ProjectResource.handlePut
# answers 417 "Invalid character in project ID." to a new project ID outside it
PROJECT_ID = re.compile(r"^[A-Za-z0-9_-]+$")
# XFTValidator: an xs:string without a declared size holds at most GenericWrapperField's
# DEFAULT_STRING_SIZE characters; xnat.xsd declares none for subject and experiment labels
MAX_LABEL = 255
_HEAD = 64 << 10  # header bytes read to find a file's SOP Class and Instance UIDs

IN_PROGRESS = ("RECEIVING", "RECEIVING_INTERRUPT", "BUILDING", "QUEUED_BUILDING", "QUEUED_ARCHIVING", "ARCHIVING",
               "_RECEIVING", "_BUILDING", "_ARCHIVING", "QUEUED_DELETING", "DELETING", "_DELETING")
LEFTOVER = ("ERROR", "READY", "CONFLICT")
FAILED_ROW = ("ERROR", "CONFLICT")
# PrearchiveCode: a project's prearchive setting (arc:project/prearchive_code)
PREARCHIVE_CODES = {0: "0 (everything to the prearchive, for review)", 4: "4 (auto-archive)",
                    5: "5 (auto-archive, overwriting files)"}


class XnatError(DicomAssetsError):
    """XNAT refused or failed the upload; the message says what to do."""


class XnatAuthError(XnatError):
    """401/403: wrong credentials or missing rights (never retried)."""


class XnatTransientError(XnatError):
    """Connection reset, timeout, 502/503/504: worth retrying."""


def clean_label(value: str) -> str:
    """The label XNAT files a subject or session under."""
    return value.translate(_CLEAN)


@dataclass(frozen=True)
class UploadFile:
    path: Path
    arcname: str
    sop_instance_uid: str
    series_number: int | None
    series_description: str | None
    study_instance_uid: str = ""


def select_files(dicoms_json: list[dict], organized_dir: Path, exclude: tuple[str, ...]) -> tuple[list[UploadFile], list[dict]]:
    """From a visit's metadata_dicoms.json: the files to send and the ones left out (why)."""
    send, skipped = [], []
    for rec in dicoms_json:
        name = rec["path"].rsplit("/", 1)[-1]
        desc = rec.get("SeriesDescription") or ""
        hit = next((x for x in exclude if x.lower() in desc.lower()), None)
        if hit:
            skipped.append({"path": rec["path"], "reason": f"series {desc!r} matches exclusion {hit!r}"})
            continue
        send.append(UploadFile(organized_dir / name, name, rec.get("SOPInstanceUID") or "",
                               rec.get("SeriesNumber"), desc, rec.get("StudyInstanceUID") or ""))
    return send, skipped


def write_zip(files: list[UploadFile], dest: Path) -> int:
    """Stream the files into a zip (stored: DICOM pixel data hardly compresses)."""
    with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for f in files:
            zf.write(f.path, arcname=f.arcname)
    return dest.stat().st_size


@dataclass
class UploadResult:
    status: str  # uploaded | already_archived | skipped_existing | appended
    project: str
    subject: str
    session_label: str
    session_uri: str = ""
    files_sent: int = 0
    bytes_sent: int = 0
    scans: list[dict] = field(default_factory=list)
    excluded: list[dict] = field(default_factory=list)
    labels: dict = field(default_factory=dict)  # {"subject": {"given", "xnat"}, "session": {...}}
    filtered: list[str] = field(default_factory=list)  # file names XNAT did not keep (its import filter)
    warnings: list[str] = field(default_factory=list)


def _scan_key(f: UploadFile) -> str:
    return str(f.series_number if f.series_number is not None else "")


def expected_scans(files: list[UploadFile]) -> dict[str, int]:
    """Series number -> file count the XNAT session should end with."""
    out: dict[str, int] = {}
    for f in files:
        key = _scan_key(f)
        out[key] = out.get(key, 0) + 1
    return out


def expected_names(files: list[UploadFile]) -> dict[str, set[str]]:
    """Series number -> the file names (``<SOPInstanceUID>.dcm``) its DICOM resource should hold."""
    out: dict[str, set[str]] = {}
    for f in files:
        out.setdefault(_scan_key(f), set()).add(f.arcname)
    return out


def temp_zip_path(folder: Path | None = None) -> Path:
    if folder is not None:
        Path(folder).mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="xnat-upload-", suffix=".zip", dir=folder)
    os.close(fd)
    return Path(name)


def load_dicoms_json(path: Path) -> list[dict]:
    return json.loads(path.read_text())


# --------------------------------------------------------------- pending-upload record
def write_pending(path: Path, *, project: str, subject: str, label: str, tag: str, files: list[UploadFile]) -> None:
    """Record, before anything is sent, what this client is about to send for a visit (no
    server, user or password: only XNAT's project, subject, session label and the files)."""
    record = {"project": project, "subject": subject, "session_label": label, "study_instance_uid": tag,
              "files": {f.arcname: f.sop_instance_uid for f in files}}
    with atomic_write(path) as fh:
        fh.write(json.dumps(record, indent=2) + "\n")


def read_pending(path: Path | None, *, project: str, label: str, log) -> set[str]:
    """The file names an unfinished upload of this visit's session recorded as being sent
    (empty when there is no record, or it is for another project or label, or unreadable)."""
    if path is None or not path.is_file():
        return set()
    try:
        record = json.loads(path.read_text())
        if record.get("project") != project or record.get("session_label") != label:
            return set()
        return {str(n) for n in record["files"]}
    except (ValueError, KeyError, TypeError, AttributeError, OSError):
        log(f"{path}: unreadable record of an unfinished upload; an existing session follows the duplicate policy")
        return set()


# ----------------------------------------------------------------------- client calls
def _status(exc: Exception) -> int | None:
    resp = getattr(exc, "response", None)
    status = getattr(resp, "status_code", None) or getattr(exc, "status_code", None)
    if status is None:  # xnatpy's upload errors carry the status only in their text
        m = re.search(r"(?:Status code|status|response for uploading was) \(?(\d{3})\)?", str(exc))
        status = int(m.group(1)) if m else None
    return status


def _in_doubt(exc: Exception) -> bool:
    """The request may have reached XNAT and may still be running there."""
    import requests

    return _status(exc) in (500, 502, 503, 504) or isinstance(
        exc, (requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError))


def classify_error(exc: Exception, server: str) -> XnatError:
    """Map xnatpy/requests errors to ours, with a message that says what to do (no secrets)."""
    import xnat.exceptions as xe

    status = _status(exc)
    if isinstance(exc, xe.XNATLoginFailedError) or status == 401:
        return XnatAuthError(f"XNAT at {server} refused the credentials (401): check XNAT_USER/XNAT_PASSWORD")
    if status == 403:
        return XnatAuthError(f"XNAT at {server} refused the request (403): the user lacks the right for it")
    if _in_doubt(exc):
        return XnatTransientError(f"XNAT at {server} is unavailable or failed ({status or type(exc).__name__}); "
                                  "transient: retried with backoff (3 attempts)")
    text = str(exc).replace("\n", " ")[:300]
    return XnatError(f"XNAT at {server} answered an error: {text}")


def ensure_project(session, project: str) -> bool:
    """Create the project when the user cannot see it; True when it was created. Raises
    :class:`XnatError` (before any upload) when XNAT would refuse this user's data there.

    What XNAT does (xnat-web, read in the ``NrgXnat/xnat`` monorepo): the project listing
    (``ProjectListResource``) and every project URI find a project through
    ``DefaultUserProjectCache.get``, which hides a *private* project from non-members;
    *protected* (the default of ``BaseXnatProjectdata.createProject``) and *public* projects are
    listed to every user, but only owners and members may add data. A PUT of a project the user
    cannot see is a creation (``ProjectResource.handlePut``): 417 for an ID outside
    ``[A-Za-z0-9_-]``, 403 when only admins may create projects, and 403 again when the ID
    belongs to a private project of others."""
    session.clearcache()
    if project in session.projects:
        if not _may_add_data(session, project):
            raise XnatAuthError(
                f"XNAT project {project} is visible to this user, but the user may not add data to it (XNAT lists "
                "protected and public projects to every user; only the project's owners and members may upload): "
                "ask the project owner to add the user as a member, or set xnat_project to a project of the user")
        return False
    if not PROJECT_ID.match(project):
        raise XnatError(f"XNAT project {project!r} does not exist and cannot be created under that ID: XNAT "
                        "project IDs hold only letters, digits, '_' and '-' (XftStringUtils.isValidId); "
                        "set xnat_project to such an ID")
    try:
        session.put(f"/data/projects/{project}")
    except Exception as exc:
        if _status(exc) != 403:
            raise
        text = _response_text(exc)
        raise XnatAuthError(
            f"XNAT project {project} is not visible to this user and XNAT refused to create it (403"
            + (f": {text}" if text else "") + "): either it exists as a private project the user is not a member "
            "of (ask its owner to add the user), or the user may not create projects (ask an XNAT admin to "
            "create it)") from None
    session.clearcache()
    return True


def _response_text(exc: Exception) -> str:
    """The text XNAT answered (xnatpy's XNATResponseError keeps it as ``text``), unless a page."""
    text = getattr(exc, "text", None) or getattr(getattr(exc, "response", None), "text", "") or ""
    return " ".join(text.split())[:200] if text.lstrip()[:1] != "<" else ""


def _may_add_data(session, project: str) -> bool:
    """Whether XNAT lets this user create subjects in ``project``: ``/data/projects?permissions=
    create&dataType=xnat:subjectData`` (``ProjectListResource.PermissionsProjectHandler``; its
    table's columns are ``id`` and ``secondary_id``). An XNAT that does not answer that query
    is not second-guessed: the upload itself says what it refuses."""
    try:
        rows = session.get_json("/data/projects", query={"permissions": "create", "dataType": "xnat:subjectData"}
                                )["ResultSet"]["Result"]
    except Exception as exc:
        if _status(exc) in (400, 404, 500):
            return True
        raise
    return any(str(v) == project for r in rows for k, v in r.items() if k.lower() == "id")


def importer_refusals(files: list[UploadFile]) -> list[tuple[str, str]]:
    """``(name, why)`` of the files XNAT's importer refuses (``GradualDicomImporter.call``: "object
    <name> contains no SOP Class UID", then the same for the SOP Instance UID; an empty value
    counts as none, and MediaStorageSOPClassUID in the file meta does not stand in)."""
    from .fasttags import read_tags

    out = []
    for f in files:
        with open(f.path, "rb") as fh:  # a missing file is an OSError of its own, not a refusal
            head = fh.read(_HEAD)
        try:
            tags = read_tags(head, f.path)
        except Exception as exc:  # pydicom could not read it either: XNAT's dcm4che would not
            out.append((f.arcname, f"unreadable DICOM header ({type(exc).__name__})"))
            continue
        if not str(tags.get("SOPClassUID") or "").strip():
            out.append((f.arcname, "no SOP Class UID (0008,0016)"))
        elif not str(tags.get("SOPInstanceUID") or "").strip():
            out.append((f.arcname, "no SOP Instance UID (0008,0018)"))
    return out


def _rows(session, uri: str) -> list[dict]:
    return session.get_json(uri)["ResultSet"]["Result"]


def find_session(session, project: str, label: str) -> dict | None:
    """The experiment labelled ``label`` in ``project`` (whatever its subject), with its
    subject's label and StudyInstanceUID, or None."""
    row = next((r for r in _rows(session, f"/data/projects/{project}/experiments") if r.get("label") == label), None)
    if row is None:
        return None
    subjects = {s["ID"]: s["label"] for s in _rows(session, f"/data/projects/{project}/subjects")}
    fields = session.get_json(f"/data/experiments/{row['ID']}")["items"][0]["data_fields"]
    return {"id": row["ID"], "label": label, "uri": f"/data/projects/{project}/experiments/{row['ID']}",
            "subject": subjects.get(fields.get("subject_ID") or row.get("subject_ID"), ""),
            "uid": fields.get("UID") or ""}


def dicom_names(session, exp_id: str) -> dict[str, set[str]]:
    """Scan id -> names of the files in the scan's DICOM resource (SNAPSHOTS, NIFTI... ignored)."""
    out: dict[str, set[str]] = {}
    for scan in _rows(session, f"/data/experiments/{exp_id}/scans"):
        sid = str(scan["ID"])
        out[sid] = {r["Name"] for r in _rows(session, f"/data/experiments/{exp_id}/scans/{sid}/files")
                    if r.get("collection") == "DICOM"}
    return out


def scan_counts(session, exp_id: str) -> dict[str, int]:
    return {sid: len(names) for sid, names in dicom_names(session, exp_id).items() if names}


def _missing(want: dict[str, set[str]], have: dict[str, set[str]]) -> set[str]:
    return {n for sid, names in want.items() for n in names - have.get(sid, set())}


def _foreign(want: dict[str, set[str]], have: dict[str, set[str]]) -> set[str]:
    return {n for sid, names in have.items() for n in names - want.get(sid, set())}


def prearchive_rows(session, project: str, label: str, tag: str) -> dict[str, dict]:
    """Prearchive rows of this visit: same session label and StudyInstanceUID."""
    return {r["url"]: r for r in _rows(session, f"/data/prearchive/projects/{project}")
            if r.get("name") == label and (not tag or r.get("tag") == tag)}


def own_rows(session, project: str, label: str, tag: str, before: dict[str, dict]) -> dict[str, dict]:
    """Rows of this visit that appeared or changed since ``before``: what this upload left."""
    return {url: r for url, r in prearchive_rows(session, project, label, tag).items()
            if url not in before or before[url].get("lastmod") != r.get("lastmod")}


def prearchive_code(session, project: str) -> int | None:
    """The project's prearchive setting as ``/data/projects/<id>/prearchive_code`` gives it
    (ProjectResource; any user who may read the project), or None when XNAT does not say."""
    try:
        return int(session.get(f"/data/projects/{project}/prearchive_code").text.strip())
    except Exception:
        return None


def _code_text(code: int | None) -> str:
    return PREARCHIVE_CODES.get(code, str(code)) if code is not None else "unknown (XNAT did not say)"


def remove_prearchive_leftovers(session, project: str, label: str, tag: str, before: dict[str, dict],
                                statuses: tuple[str, ...] = LEFTOVER) -> list[str]:
    """Delete the prearchive rows this upload left (appeared or changed since ``before``, in
    ERROR/READY/CONFLICT or ``statuses``); rows XNAT is still working on and other uploads' rows stay."""
    removed = []
    for url, row in prearchive_rows(session, project, label, tag).items():
        old = before.get(url)
        if row.get("status") in statuses and (old is None or old.get("lastmod") != row.get("lastmod")):
            # xnatpy's PrearchiveSession.delete: PrearchiveBatchDelete (a locked row is never deleted)
            session.post("/data/services/prearchive/delete", query={"src": url})
            removed.append(url)
    return removed


def wait_for_prearchive(session, project: str, label: str, tag: str, before: dict[str, dict] | None,
                        wait_seconds: float, poll: float, log) -> None:
    """Wait while XNAT is still receiving or archiving rows of this visit (all of them when
    ``before`` is None, else those that appeared or changed since)."""
    deadline = time.monotonic() + wait_seconds
    while True:
        busy = [r for url, r in prearchive_rows(session, project, label, tag).items()
                if r.get("status") in IN_PROGRESS
                and (before is None or before.get(url, {}).get("lastmod") != r.get("lastmod"))]
        if not busy:
            return
        if time.monotonic() > deadline:
            raise XnatTransientError(
                f"XNAT is still {busy[0]['status'].strip('_').lower()} {label} in project {project} after "
                f"{wait_seconds:.0f} s; nothing was sent again (the retry looks again first)")
        log(f"XNAT is {busy[0]['status'].strip('_').lower()} {label}; waiting before anything is sent again")
        time.sleep(poll)


def post_import(session, zpath: Path, *, project: str, subject: str, label: str, overwrite: str | None,
                timeout) -> str:
    """POST the zip to ``/data/services/import`` with the query xnatpy's ``services.import_``
    builds (``import-handler``, ``dest``, ``project``, ``subject``, ``session``, ``overwrite``,
    ``Ignore-Unparsable``), through xnatpy's ``upload_file``, and return XNAT's answer: an archive
    URI, a prearchive URI, or nothing. ``import_`` itself cannot be used: a 200 answer without
    a URI (XNAT kept the upload in its prearchive) makes it fail with an IndexError after XNAT
    has taken the data. ``overwrite`` is the only way to ask the import service to merge:
    Importer.parseOverrideValue derives allowSessionMerge from it and writes over any
    ``allowSessionMerge`` of the query."""
    query = {"import-handler": "DICOM-zip", "dest": "/archive", "project": project, "subject": subject,
             "session": label, "Ignore-Unparsable": "true"}
    if overwrite:
        query["overwrite"] = overwrite
    # xnatpy sends uploads with no timeout unless given one: a hanging XNAT would hold the run
    # (and a pool slot) forever
    resp = session.upload_file("/data/services/import", zpath, verbose=False, query=query,
                               content_type="application/zip", method="post", timeout=timeout)
    return (resp.text or "").strip()


def refused_import(session, project: str, label: str, tag: str, before: dict[str, dict], exc: Exception,
                   asked_merge: bool, log) -> XnatError | None:
    """XNAT answered the import with a refusal (a 4xx, or a 5xx that is not worth waiting for,
    such as 507): the error to raise when its prearchive row says the merge was refused
    (CONFLICT), else None (the answer speaks for itself). The rows this upload left are removed
    either way, so a re-run starts clean; that includes a row left RECEIVING by an import XNAT
    stopped mid-zip (DicomZipImporter.importZipFile: a refused entry without Ignore-Unparsable, or
    GradualDicomImporter's ServerException when it cannot write a file), which SessionXMLRebuilder
    would otherwise archive as a partial session in a project set to auto-archive.

    What XNAT does (NrgXnat/xnat-web): DicomZipImporter.xmlBuild archives the row with
    allowSessionMerge from ``overwrite`` or, without it, only when the row's prearchive code is
    not Manual (archiveSession); PrearcSessionArchiver.checkForConflicts refuses an existing
    session without it ("Session already exists, retry with overwrite enabled", 409), as
    MergeSessionsA.checkForConflict refuses files the session holds; PrearcDatabase.LockAndSync
    sets the row to CONFLICT on such a 409, and xmlBuild answers 400 "Failed to archive 1 of 1
    session(s)"."""
    try:
        rows = own_rows(session, project, label, tag, before)
    except Exception:
        rows = {}
    # a row left RECEIVING holds what XNAT read before it stopped: the request is over, nothing
    # more arrives in it, and XNAT's session rebuilder would archive it as a partial session
    _clean_after_failure(session, project, label, tag, before, log, statuses=LEFTOVER + ("RECEIVING",))
    if not any(r.get("status") == "CONFLICT" for r in rows.values()):
        return None
    answer = f"HTTP {_status(exc) or '4xx'}"
    code = prearchive_code(session, project)
    try:
        existing = find_session(session, project, label)
    except Exception:
        existing = None
    if existing is not None and not asked_merge:
        return XnatError(
            f"XNAT refused to archive {label} into project {project} ({answer}; its prearchive row went to CONFLICT): "
            f"a session {label} appeared there after the client looked (another upload archived it meanwhile), and "
            "this upload did not ask to merge. XNAT merges into an existing session unasked only in projects set to "
            f"auto-archive; project {project}'s prearchive setting is {_code_text(code)}. The client removed its "
            "prearchive row, nothing of this upload was archived: a re-run compares the session and follows "
            "xnat_duplicate_policy ('append' sends the instances it lacks, asking XNAT to merge with "
            "overwrite=append)")
    return XnatError(
        f"XNAT refused to archive {label} into project {project} ({answer}; its prearchive row went to CONFLICT"
        + (", although the upload asked to merge with overwrite=append" if asked_merge else "")
        + "): XNAT finds a conflict with the session of that label (files it already holds under the same name "
        "or SOPInstanceUID, another subject or study; PrearcSessionArchiver, MergeSessionsA). The client removed "
        "its prearchive row, nothing of this upload was archived: look at the session in XNAT (or ask the site "
        "admin), then re-run")


def unarchived_answer(session, project: str, label: str, tag: str, before: dict[str, dict], sent: list,
                      answer: str, wait_seconds: float, poll: float, log) -> None:
    """XNAT answered the import (200) without an archive URI: it kept the upload in its
    prearchive. Returns when XNAT archived it meanwhile; raises :class:`XnatError` otherwise.

    What XNAT does (NrgXnat/xnat-web): with ``dest=/archive`` DicomZipImporter archives the row
    within the request whatever the project's prearchive code (determiningDestination sets
    auto-archive), but its build gives way when more data for the row arrives meanwhile
    (PrearchiveRebuildHandler.rebuild, RECEIVING_INTERRUPT): the row goes back to RECEIVING and
    the answer holds no URI. SessionXMLRebuilder rebuilds such a row once idle (5 minutes by
    default) and archives it only when the project is set to auto-archive (4, 5); otherwise it
    stays READY until someone archives it."""
    log(f"XNAT answered the import of {label} without an archive URI ({answer or 'an empty answer'}): it kept the "
        "upload in its prearchive; waiting while XNAT still works on it")
    wait_for_prearchive(session, project, label, tag, before, wait_seconds, poll, log)
    arrived = find_session(session, project, label)
    present = set().union(*dicom_names(session, arrived["id"]).values()) if arrived else set()
    if {f.arcname for f in sent} & present:  # what did not arrive is the caller's to find
        log(f"XNAT archived {label} by itself after its answer (its session rebuilder)")
        return
    rows = own_rows(session, project, label, tag, before)
    ready = [url for url, r in rows.items() if r.get("status") == "READY"]
    code = prearchive_code(session, project)
    if ready:
        url = ready[0]
        raise XnatError(
            f"XNAT did not archive {label}: it answered the import without an archive URI and kept the upload in its "
            f"prearchive ({url}, READY). Project {project}'s prearchive setting is {_code_text(code)}; XNAT archives "
            "such a row by itself only in projects set to auto-archive (4 or 5). The row is left for the site admin: "
            f"archiving it from the prearchive (Prearchive page, or POST /data/services/archive?src={url}) completes "
            "the session, and a re-run then finds it complete; setting the project to auto-archive (prearchive code "
            f"4: Manage > Define Prearchive Settings, or PUT /data/projects/{project}/prearchive_code/4) lets XNAT "
            "archive such rows by itself. A re-run without either sends the files again, into that same row")
    failed = {url: r.get("status") for url, r in rows.items() if r.get("status") in FAILED_ROW}
    if failed:
        remove_prearchive_leftovers(session, project, label, tag, before, statuses=FAILED_ROW)
        raise XnatError(
            f"XNAT did not archive {label}: it answered the import without an archive URI, kept the upload in its "
            f"prearchive, and its own archiving of the row failed ({', '.join(sorted(set(failed.values())))}; "
            f"project {project}'s prearchive setting is {_code_text(code)}). The client removed that row: re-run")
    raise XnatError(f"XNAT accepted the upload of {label} ({answer or 'an empty answer'}) but the session is neither "
                    f"complete in project {project} nor in its prearchive")


# ------------------------------------------------------------- XNAT's series import filter
@dataclass
class SeriesFilter:
    """One series import filter XNAT applies to this project's uploads, as read from its
    configuration (see :func:`series_import_filters`)."""

    scope: str  # "site-wide" | "project <id>"
    mode: str  # blacklist | whitelist
    patterns: dict[int, list[re.Pattern]]  # header tag -> patterns
    text: str  # the filter's list, for messages

    def keeps(self, ds) -> bool:
        """RegExBasedSeriesImportFilter.shouldIncludeDicomObject: the first pattern that matches
        includes the object in a whitelist and drops it in a blacklist; no match, the opposite."""
        for tag, patterns in self.patterns.items():
            elem = ds.get(tag)
            value = None if elem is None else _header_text(elem.value)
            for p in patterns:
                if (p.pattern == "EXISTS" and value is not None) or (p.pattern == "!EXISTS" and value is None) \
                        or (value is not None and p.search(value)):
                    return self.mode == "whitelist"
        return self.mode == "blacklist"

    def describe(self) -> str:
        shown = "; ".join(line.strip() for line in self.text.split("\n") if line.strip())
        return f"the {self.scope} filter ({self.mode}: {shown[:120] or 'no patterns'})"


@dataclass
class SeriesFilters:
    """What the client knows of the series import filters XNAT applies to a project."""

    filters: list[SeriesFilter] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)  # filters the client could not read or evaluate

    def drops(self, f: UploadFile) -> bool:
        """True only when a filter the client read drops this file; a file whose header cannot
        be read is not explained."""
        if not self.filters:
            return False
        import pydicom

        try:
            ds = pydicom.dcmread(f.path, stop_before_pixels=True, force=True)
        except Exception:
            return False
        return not all(flt.keeps(ds) for flt in self.filters)

    def describe(self) -> str:
        parts = [flt.describe() for flt in self.filters] + self.unknown
        return "; ".join(parts) if parts else "no series import filter is set for the site or the project"


def _header_text(value) -> str:
    """A header value as dicomtools reads it for a filter (several values joined by ``\\``)."""
    from pydicom.multival import MultiValue

    if isinstance(value, (list, tuple, MultiValue)):
        return "\\".join(str(v) for v in value)
    return "" if value is None else str(value)


def _filter_tag(name: str) -> int | None:
    """DicomUtils.parseDicomHeaderId: ``(gggg,eeee)``, ``gggg,eeee`` or an attribute keyword."""
    from pydicom.datadict import tag_for_keyword

    m = re.fullmatch(r"(\(?)([0-9A-Fa-f]{4}),([0-9A-Fa-f]{4})(\)?)", name.strip())
    if m and bool(m.group(1)) == bool(m.group(4)):
        return int(m.group(2) + m.group(3), 16)
    return tag_for_keyword(name.strip())


def parse_series_filter(scope: str, contents: str) -> SeriesFilter:
    """A filter from its stored contents (``AbstractSeriesImportFilter.toMap`` as JSON: ``mode``,
    ``list``). Raises ValueError for what the client cannot evaluate (the ``modalityMap`` mode,
    whose per-modality JavaScript only XNAT runs; a pattern or header it cannot read)."""
    data = json.loads(contents or "{}")
    if not isinstance(data, dict):
        raise ValueError(f"the {scope} filter's configuration is not the map the client expects")
    mode = str(data.get("mode") or "blacklist")  # DicomFilterService: blank contents = empty blacklist
    if mode not in ("blacklist", "whitelist"):
        raise ValueError(f"the {scope} filter is in mode {mode!r}, which only XNAT can evaluate")
    text = str(data.get("list") or "")
    patterns: dict[int, list[re.Pattern]] = {}
    tag = 0x0008103E  # RegExBasedSeriesImportFilter's DEFAULT_FIELD: SeriesDescription
    for line in text.split("\n"):
        if not line.strip() or line.startswith("#"):
            continue
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            tag = _filter_tag(line[1:-1])
            if tag is None:
                raise ValueError(f"the {scope} filter names a header the client does not know ({line})")
            patterns.setdefault(tag, [])
            continue
        try:  # Java's Pattern.CASE_INSENSITIVE, tested with find(); Python's syntax is close enough
            patterns.setdefault(tag, []).append(re.compile(line, re.IGNORECASE))
        except re.error:
            raise ValueError(f"the {scope} filter holds a pattern the client cannot read ({line!r})") from None
    return SeriesFilter(scope, mode, patterns, text)


def series_import_filters(session, project: str) -> SeriesFilters:
    """The series import filters XNAT applies to uploads into ``project``: the site-wide one and
    the project's (GradualDicomImporter drops an object unless both include it), each read from
    XNAT's configuration service (DicomFilterService: tool ``seriesImportFilter``, path ``config``;
    ConfigResource answers ``/data/config/...`` to any user and ``/data/projects/<id>/config/...``
    to those who read the project's data; 404 when there is none). A configuration that is not
    ``enabled`` does not apply. A filter the client cannot read or evaluate is listed in
    ``unknown``: it explains nothing."""
    out = SeriesFilters()
    for scope, uri in (("site-wide", "/data/config/seriesImportFilter/config"),
                       (f"project {project}", f"/data/projects/{project}/config/seriesImportFilter/config")):
        try:
            resp = session.get(uri, query={"format": "json"}, accepted_status=[200, 404])
            if resp.status_code == 404:
                continue
            rows = resp.json()["ResultSet"]["Result"]
        except Exception as exc:
            out.unknown.append(f"the {scope} filter, which the client could not read "
                               f"({_status(exc) or type(exc).__name__})")
            continue
        row = rows[0] if rows else {}
        if str(row.get("status") or "").lower() != "enabled":
            continue
        try:
            out.filters.append(parse_series_filter(scope, str(row.get("contents") or "")))
        except ValueError as exc:
            out.unknown.append(str(exc))
    return out


def _series_summary(names: set[str], files: list[UploadFile]) -> str:
    """``series 3 (T2w): 10 of 20 files, ...`` for the named files."""
    total: dict[str, int] = {}
    count: dict[str, int] = {}
    desc: dict[str, str] = {}
    for f in files:
        key = _scan_key(f)
        total[key] = total.get(key, 0) + 1
        desc.setdefault(key, f.series_description or "")
        if f.arcname in names:
            count[key] = count.get(key, 0) + 1
    order = sorted(count, key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0, k))
    return ", ".join(f"series {k or '?'}" + (f" ({desc[k]})" if desc[k] else "") + f": {count[k]} of {total[k]} files"
                     for k in order)


def attach_files(owner, label: str, paths: list[Path]) -> None:
    """Upload files into a resource folder of a project or an experiment (created when missing)."""
    resource = owner.resources.get(label) if label in owner.resources else owner.create_resource(label)
    for f in paths:
        resource.upload(str(f), Path(f).name, overwrite=True)


def upload_visit(session, *, server: str, project: str, subject: str, session_label: str,
                 files: list[UploadFile], excluded: list[dict], metadata_files: list[Path],
                 policy: str = "fail", workdir: Path | None = None, log=lambda m: None,
                 project_files: dict[str, list[Path]] | None = None, known_filtered: frozenset[str] = frozenset(),
                 wait_seconds: float = 900.0, poll_seconds: float = 2.0,
                 pending_path: Path | None = None) -> UploadResult:
    """Send one visit to XNAT, duplicate-safe; raises XnatError subclasses with clear messages.

    ``project_files`` (resource label -> files) are attached to the project after the session
    (a refusal is a warning). A file the session lacks is "filtered by XNAT" only when XNAT's
    series import filter, as the client reads it from XNAT, drops it; any other missing file is
    missing: sent again, and the step fails if it still does not arrive. ``known_filtered``: the
    names an earlier upload recorded as filtered; they are checked against the filter again,
    never taken on trust (an older client recorded files of a partial session there).

    ``pending_path``: where this client records, before it sends, what it is about to send for
    the visit (:func:`write_pending`); the record is removed once the session is verified
    complete. An existing session whose every file is in that record (the names are
    ``<SOPInstanceUID>.dcm``; sizes are not compared, XNAT's anonymization changes them) is this
    client's own unfinished upload (a wait that ran out, a retry): it is completed with the missing files (overwrite=append)
    whatever ``policy`` says. A session holding any file outside the record is someone else's
    data: ``policy`` decides."""
    if policy not in POLICIES:
        raise ValueError(f"duplicate policy must be one of {POLICIES}")
    if not files:
        raise XnatError(f"nothing to send for {session_label}: every kept series is excluded")
    xsubject, xlabel = clean_label(subject), clean_label(session_label)
    for kind, value in (("subject", xsubject), ("session", xlabel)):
        if len(value) > MAX_LABEL:  # XFTValidator (PrearcSessionArchiver.validateSession): a server error
            raise XnatError(f"the XNAT {kind} label {value[:40]!r}... has {len(value)} characters; XNAT stores "
                            f"labels of at most {MAX_LABEL} (XFT's default string size): shorten it "
                            "(session_label_pattern, or the participant ID)")
    refused = importer_refusals(files)
    if refused:
        shown = ", ".join(f"{name} ({why})" for name, why in refused[:3])
        raise XnatError(
            f"{len(refused)} of the {len(files)} files of {session_label} would be refused by XNAT's importer, which "
            f"requires SOPClassUID and SOPInstanceUID in every DICOM (GradualDicomImporter): {shown}"
            + (" ..." if len(refused) > 3 else "") + "; nothing was sent. Exclude those series "
            "(exclude_series) or repair the files")
    result = UploadResult("uploaded", project, xsubject, xlabel, excluded=excluded,
                          labels={"subject": {"given": subject, "xnat": xsubject},
                                  "session": {"given": session_label, "xnat": xlabel}})
    for kind in ("subject", "session"):
        if result.labels[kind]["given"] != result.labels[kind]["xnat"]:
            log(f"XNAT label of {kind} {result.labels[kind]['given']!r} is {result.labels[kind]['xnat']!r} "
                "(XNAT replaces spaces and . / , : ( ) ... by _)")
    tags = {f.study_instance_uid for f in files}
    tag = tags.pop() if len(tags) == 1 else ""
    want = expected_names(files)
    by_name = {f.arcname: f for f in files}
    filters: list[SeriesFilters] = []  # read from XNAT once, when a file is found missing

    def explain(absent: set[str]) -> tuple[set[str], set[str]]:
        """(filtered, missing): the absent files XNAT's series import filter drops, and the rest."""
        if not absent:
            return set(), set()
        if not filters:
            filters.append(series_import_filters(session, project))
        dropped = {n for n in absent if filters[0].drops(by_name[n])}
        return dropped, absent - dropped

    def send(batch: list[UploadFile], overwrite: str | None) -> None:
        """One import of ``batch``; returns once XNAT archived at least part of it (what did not
        arrive is the caller's to find)."""
        before = prearchive_rows(session, project, xlabel, tag)
        zpath = temp_zip_path(workdir)
        answer = None
        names = {f.arcname for f in batch}
        try:
            size = write_zip(batch, zpath)
            try:
                answer = post_import(session, zpath, project=project, subject=xsubject, label=xlabel,
                                     overwrite=overwrite, timeout=getattr(session, "request_timeout", None))
            except Exception as exc:
                if not _in_doubt(exc):
                    refused = refused_import(session, project, xlabel, tag, before, exc, overwrite is not None, log)
                    if refused is not None:
                        raise refused from None
                    raise
                # XNAT may carry on (a proxy's 504, a client timeout), or keep what it read before the
                # connection broke (a RECEIVING row its session rebuilder may archive as a partial
                # session): look before sending again
                log(f"no answer from XNAT for {xlabel} ({_status(exc) or type(exc).__name__}); looking for the "
                    "session before anything is sent again")
                wait_for_prearchive(session, project, xlabel, tag, before, wait_seconds, poll_seconds, log)
                arrived = find_session(session, project, xlabel)
                present = set().union(*dicom_names(session, arrived["id"]).values()) if arrived else set()
                if not present & names:
                    _clean_after_failure(session, project, xlabel, tag, before, log)
                    raise
                log(f"XNAT archived {len(present & names)} of the {len(batch)} files sent for {xlabel} although "
                    "the answer was lost; the session is checked for files that did not arrive")
        finally:
            zpath.unlink(missing_ok=True)
        if answer is not None and "/archive/" not in answer:
            unarchived_answer(session, project, xlabel, tag, before, batch, answer, wait_seconds, poll_seconds, log)
        result.files_sent += len(batch)
        result.bytes_sent += size

    def incomplete(missing: set[str], why: str) -> XnatError:
        return XnatError(
            f"XNAT session {xlabel} in project {project} is incomplete: {len(missing)} of this visit's {len(files)} "
            f"files are missing ({_series_summary(missing, files)}), and XNAT's series import filter does not "
            f"explain them ({filters[0].describe() if filters else 'not read'}). An upload was cut short (a "
            "connection that broke, or an import XNAT stopped) and XNAT archived the files it had received; the "
            f"client sent the missing ones again (overwrite=append): {why}. Nothing was recorded as filtered. A "
            "re-run with xnat_duplicate_policy 'append' sends only the missing files")

    try:
        if ensure_project(session, project):
            log(f"created XNAT project {project}")
        # an earlier attempt may still be running in XNAT (a proxy's 504): never send over it
        wait_for_prearchive(session, project, xlabel, tag, None, wait_seconds, poll_seconds, log)
        existing = find_session(session, project, xlabel)
        to_send, overwrite = files, None
        if existing is not None:
            if existing["subject"].lower() != xsubject.lower():
                raise XnatError(
                    f"session label {xlabel} is already used in XNAT project {project} by subject "
                    f"{existing['subject']} (this visit's subject is {xsubject}); XNAT labels are unique per "
                    "project: change session_label_pattern or rename the session in XNAT")
            if existing["uid"] and tag and existing["uid"] != tag:
                raise XnatError(
                    f"session {xlabel} in XNAT project {project} holds another study (StudyInstanceUID "
                    f"{existing['uid']}, this visit's is {tag}); XNAT labels are unique per project: change "
                    "session_label_pattern or rename the session in XNAT")
            result.subject = existing["subject"]
            have = dicom_names(session, existing["id"])
            absent = _missing(want, have)
            filtered, missing = explain(absent)
            foreign = _foreign(want, have)
            result.filtered = sorted(filtered)
            untrue = missing & known_filtered
            if untrue:
                log(f"{len(untrue)} files an earlier upload of {xlabel} recorded as filtered by XNAT are not dropped "
                    f"by its series import filter ({filters[0].describe()}): they are missing, not filtered")

            def unchanged(status: str, why: str) -> UploadResult:
                result.status, result.session_uri = status, existing["uri"]
                result.scans = [{"scan": k, "files": len(v)} for k, v in sorted(have.items()) if v]
                log(f"{xlabel} {why}: nothing sent")
                return result

            pending = read_pending(pending_path, project=project, label=xlabel, log=log)
            held = set().union(*have.values()) if have else set()
            own = bool(pending) and not foreign and held <= pending
            if not missing and not foreign:
                if pending_path is not None:
                    pending_path.unlink(missing_ok=True)
                return unchanged("already_archived", f"is already archived in {project} with the same files")
            if own and missing:
                log(f"{xlabel} in {project} is this client's own unfinished upload (every file it holds is in the "
                    f"record of what was being sent, {pending_path}): completing it with the {len(missing)} missing "
                    "files (overwrite=append), whatever the duplicate policy")
            elif policy == "skip":
                return unchanged("skipped_existing", f"exists in {project} with other content; policy 'skip'")
            elif policy == "fail":
                raise XnatError(
                    f"session {xlabel} already exists in XNAT project {project} with different content "
                    f"({sum(map(len, have.values()))} DICOM files in {sum(1 for v in have.values() if v)} scans, "
                    f"{len(missing)} of this visit's {len(files)} files missing"
                    + (f": {_series_summary(missing, files)}" if missing else "")
                    + f", {len(foreign)} files this visit does not have); set xnat_duplicate_policy to 'append' "
                    "(sends only the missing files) or 'skip', or remove it in XNAT")
            elif not missing:
                return unchanged("skipped_existing", f"holds {len(foreign)} files this visit does not have and "
                                                     "none is missing; policy 'append'")
            to_send = [f for f in files if f.arcname in missing]
            overwrite = "append"
            result.status = "appended"
            log(f"{xlabel}: appending the {len(to_send)} instances the session lacks ({_series_summary(missing, files)})")
        if pending_path is not None:
            write_pending(pending_path, project=project, subject=xsubject, label=xlabel, tag=tag, files=files)
        send(to_send, overwrite)
        exp = find_session(session, project, xlabel)
        if exp is None:
            raise XnatError(f"XNAT accepted the upload but session {xlabel} is not in project {project}")
        have = dicom_names(session, exp["id"])
        filtered, missing = explain(_missing(want, have))
        if missing:
            # not explained by XNAT's filter: files that never arrived (XNAT archived a partial
            # session); they are sent again, only them, asking XNAT to merge
            log(f"XNAT's session {xlabel} lacks {len(missing)} of the files sent ({_series_summary(missing, files)}), "
                f"which its series import filter does not explain ({filters[0].describe()}): sending them again "
                "(overwrite=append)")
            try:
                send([f for f in files if f.arcname in missing], "append")
            except XnatError as exc:
                raise incomplete(missing, f"XNAT did not take them ({exc})") from None
            except Exception as exc:
                raise incomplete(missing, f"XNAT did not take them ({classify_error(exc, server)})") from None
            exp = find_session(session, project, xlabel) or exp
            have = dicom_names(session, exp["id"])
            filtered, missing = explain(_missing(want, have))
            if missing:
                raise incomplete(missing, "XNAT answered, but they are still not in the session")
            log(f"{xlabel} is complete in XNAT after sending the missing files again")
        result.session_uri, result.subject = exp["uri"], exp["subject"]
        if result.subject != xsubject:
            log(f"XNAT filed {xlabel} under its existing subject {result.subject} (subjects match case-insensitively)")
            result.labels["subject"]["xnat"] = result.subject
        if metadata_files:
            attach_files(session.create_object(f"/data/experiments/{exp['id']}"), "METADATA", metadata_files)
        result.filtered = sorted(filtered)
        if result.filtered:
            log(f"XNAT's series import filter dropped {len(result.filtered)} of the files sent for {xlabel} "
                f"({_series_summary(filtered, files)}; {filters[0].describe()}); they are reported, not sent again")
        result.scans = [{"scan": k, "files": len(v)} for k, v in sorted(have.items()) if v]
        if pending_path is not None:  # the session is verified complete: nothing of this visit is pending
            pending_path.unlink(missing_ok=True)
    except XnatError:
        raise
    except Exception as exc:
        raise classify_error(exc, server) from None
    _attach_project_files(session, server, project, project_files or {}, result, log)
    return result


def _clean_after_failure(session, project, label, tag, before, log, statuses: tuple[str, ...] = LEFTOVER) -> None:
    try:
        removed = remove_prearchive_leftovers(session, project, label, tag, before, statuses=statuses)
    except Exception as exc:  # the upload's own error is the one to report
        log(f"could not clean the prearchive after the failed upload of {label}: {type(exc).__name__}")
        return
    if removed:
        log(f"removed {len(removed)} prearchive leftover(s) of this upload of {label}")


def _attach_project_files(session, server, project, project_files, result, log) -> None:
    for label, paths in project_files.items():
        try:
            attach_files(session.projects[project], label, paths)
        except Exception as exc:
            why = classify_error(exc, server)
            msg = (f"project resource {label} of {project} not attached ({why}); the session is uploaded. "
                   "Project resources need the project owner role in XNAT")
            result.warnings.append(msg)
            log(msg)


def files_from_records(records, root: Path) -> list[UploadFile]:
    """Kept organize records (of a folder tree) as files to send."""
    return [UploadFile(root / r.source, f"{r.sop_instance_uid}.dcm", r.sop_instance_uid or "", r.series_number,
                       r.series_description, r.study_instance_uid or "") for r in records if r.decision == "kept"]


def classic_tree_sessions(root: Path):
    """``<root>/<subject>/<session>/...``, the tree of the classic upload script: (subject, session, folder)."""
    for subj in sorted(p for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith(".")):
        for ses in sorted(p for p in subj.iterdir() if p.is_dir() and not p.name.startswith(".")):
            yield subj.name, ses.name, ses


def read_exclusions(path: Path | None) -> tuple[str, ...]:
    """``{"Exclude": ["Localizers", ...]}`` (the classic script's file) or a plain list."""
    if path is None:
        return ()
    data = json.loads(Path(path).read_text())
    values = data.get("Exclude") if isinstance(data, dict) else data
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise XnatError(f"{path}: expected {{\"Exclude\": [\"substring\", ...]}}")
    return tuple(values)
