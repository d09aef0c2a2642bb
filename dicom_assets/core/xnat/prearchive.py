"""XNAT's prearchive: the rows of an upload, waiting for them, the import request, and what
XNAT's answer (a refusal, an answer without an archive URI) means."""

from __future__ import annotations

import time
from pathlib import Path

from .errors import XnatBusyError, XnatError, XnatTransientError, http_status
from .remote import find_session, rows, session_names

#: PrearcSessionArchiver.preventConcurrentArchiving's refusal: a workflow is open on the session
BUSY = "Session processing may already be in progress"
# PrearcSessionArchiver.MODALITY_MOD (checkForConflicts, under the site preference
# preventCrossModalityMerge, on by default): the session's data type differs from the existing one's
MODALITY_MOD = "Invalid modification of session modality"
# MergePrearcToArchiveSession.anonymizeSession's ArchivingException: the project's script failed
ANON_FAILED = "Anonymization failed for prearcSession"
# PrearcSessionArchiver.UID_MOD (checkForConflicts): the upload's StudyInstanceUID differs from the session's
UID_MOD = "Invalid modification of session UID"
# PrearcSessionArchiver.SUBJECT_MOD (checkForConflicts): the session exists under another subject
SUBJECT_MOD = "Invalid modification of session subject"

IN_PROGRESS = ("RECEIVING", "RECEIVING_INTERRUPT", "BUILDING", "QUEUED_BUILDING", "QUEUED_ARCHIVING", "ARCHIVING",
               "_RECEIVING", "_BUILDING", "_ARCHIVING", "QUEUED_DELETING", "DELETING", "_DELETING")
LEFTOVER = ("ERROR", "READY", "CONFLICT")
FAILED_ROW = ("ERROR", "CONFLICT")
# PrearchiveCode: a project's prearchive setting (arc:project/prearchive_code)
PREARCHIVE_CODES = {0: "0 (everything to the prearchive, for review)", 4: "4 (auto-archive)",
                    5: "5 (auto-archive, overwriting files)"}


def prearchive_rows(session, project: str, label: str, tag: str) -> dict[str, dict]:
    """Prearchive rows of this visit: same session label and StudyInstanceUID."""
    return {r["url"]: r for r in rows(session, f"/data/prearchive/projects/{project}")
            if r.get("name") == label and (not tag or r.get("tag") == tag)}


def own_rows(session, project: str, label: str, tag: str, before: dict[str, dict]) -> dict[str, dict]:
    """Rows of this visit that appeared or changed since ``before``: what this upload left."""
    return {url: r for url, r in prearchive_rows(session, project, label, tag).items()
            if url not in before or before[url].get("lastmod") != r.get("lastmod")}


def row_log(session, url: str) -> str:
    """The newest log XNAT wrote for a prearchive row (``<url>/logs/last``: the message of a failed
    archive), "" when it cannot be read (older XNATs, a row already gone)."""
    try:
        return session.get(f"/data{url}/logs/last", accepted_status=[200]).text or ""
    except Exception:  # any failure: no reason known, the caller says what it knows
        return ""


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


#: XNAT's refusals named by the client: (the marker in XNAT's reason, the error class, what the
#: message says before XNAT's own words, what it says after them). ``{label}``, ``{project}``,
#: ``{answer}`` and ``{said}`` (XNAT's reason) are filled in.
_NAMED_REFUSALS = (
    (BUSY, XnatBusyError,
     "XNAT session {label} in project {project} is busy: XNAT refused to merge into it while a workflow is open on "
     "it",
     "A pipeline or a container run on archive works on the session, or a workflow it left 'In Progress' was never "
     "closed (an admin closes it on the session's History page). Nothing of this upload was archived; the client "
     "removed its prearchive row"),
    (MODALITY_MOD, XnatError,
     "XNAT refused to merge this upload into session {label} of project {project}: the upload builds a session of "
     "another modality than the one XNAT holds",
     "XNAT's site preference preventCrossModalityMerge (on by default) forbids merging sessions of different "
     "modalities (an MR visit into a CT session, say). Nothing of this upload was archived; the client removed its "
     "prearchive row: give the visit another session label, or ask the XNAT admin to merge it by hand or to turn "
     "preventCrossModalityMerge off"),
    (UID_MOD, XnatError,
     "XNAT refused to merge this upload into session {label} of project {project}: the session it holds has another "
     "StudyInstanceUID than the upload",
     "XNAT compares the upload's UID as it arrived with the session's as archived "
     "(PrearcSessionArchiver.checkForConflicts runs before the project's anonymization script): when that script "
     "rewrites UIDs (hashUID) they always differ, and XNAT refuses every merge into the session unless its session "
     "merging setting allows a UID change (sessionmerging_uid_mod, off by default). Nothing of this upload was "
     "archived; the client removed its prearchive row: ask the XNAT admin to allow UID changes in merges for the "
     "project, or remove the session in XNAT and re-run to send the visit whole"),
    (SUBJECT_MOD, XnatError,
     "XNAT refused to archive this upload into session {label} of project {project}: XNAT holds a session {label} "
     "there under another subject",
     "Another upload archived it after the client looked; labels are unique per project. Nothing of this upload "
     "was archived; the client removed its prearchive row. A re-run finds that session and names its subject: "
     "change session_label_pattern or rename the session in XNAT"),
)


def _named_conflict(reasons: list[str], project: str, label: str, answer: str) -> XnatError | None:
    """A refusal XNAT gives for a reason of its own, named (:data:`_NAMED_REFUSALS`: a busy
    session, a merge across modalities, a UID change, a label another subject holds); None for
    the others."""
    for marker, error, before, after in _NAMED_REFUSALS:
        said = next((r for r in reasons if marker in r), None)
        if said:
            head = before.format(label=label, project=project)
            return error(f"{head} ({answer}; XNAT says: {said.strip()}). {after}")
    return None


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
    except Exception:  # the refusal is the error to report, whatever the listing does
        rows = {}
    # XNAT's own reason, read before the rows go: LockAndSync writes the conflict's message to the
    # row's log (PrearcUtils.log), served at <row>/logs/last (PrearcSessionResource)
    reasons = [row_log(session, url) for url, r in rows.items() if r.get("status") == "CONFLICT"]
    # LockAndSync logs a failure that is no conflict too (the row goes to ERROR)
    errors = [row_log(session, url) for url, r in rows.items() if r.get("status") == "ERROR"]
    # a row left RECEIVING holds what XNAT read before it stopped: the request is over, nothing
    # more arrives in it, and XNAT's session rebuilder would archive it as a partial session
    clean_after_failure(session, project, label, tag, before, log, statuses=LEFTOVER + ("RECEIVING",))
    answer = f"HTTP {http_status(exc) or '4xx'}"
    anon = next((r.strip() for r in errors if ANON_FAILED in r), None)
    if anon:
        return XnatError(
            f"XNAT failed to archive {label} into project {project}: the project's anonymization script, which XNAT "
            f"runs as it archives a session (MergePrearcToArchiveSession.anonymizeSession), failed on these files "
            f"({answer}; XNAT says: {anon}). Nothing of this upload was archived; the client removed its prearchive "
            f"row. Ask the XNAT admin to repair the script (/data/projects/{project}/config/anon/projects/{project}), "
            "then re-run")
    if not reasons:
        return None
    named = _named_conflict(reasons, project, label, answer)
    if named is not None:
        return named
    said = next((r.strip() for r in reasons if r.strip()), "")
    code = prearchive_code(session, project)
    try:
        existing = find_session(session, project, label)
    except Exception:
        existing = None
    if existing is not None and not asked_merge:
        return XnatError(
            f"XNAT refused to archive {label} into project {project} ({answer}; its prearchive row went to CONFLICT"
            + (f"; XNAT says: {said}" if said else "") + "): "
            f"a session {label} appeared there after the client looked (another upload archived it meanwhile), and "
            "this upload did not ask to merge. XNAT merges into an existing session unasked only in projects set to "
            f"auto-archive; project {project}'s prearchive setting is {_code_text(code)}. The client removed its "
            "prearchive row, nothing of this upload was archived: a re-run compares the session and follows "
            "xnat_duplicate_policy ('append' sends the instances it lacks, asking XNAT to merge with "
            "overwrite=append)")
    return XnatError(
        f"XNAT refused to archive {label} into project {project} ({answer}; its prearchive row went to CONFLICT"
        + (f"; XNAT says: {said}" if said else "")
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
    present = session_names(session, arrived)
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


def clean_after_failure(session, project, label, tag, before, log, statuses: tuple[str, ...] = LEFTOVER) -> None:
    try:
        removed = remove_prearchive_leftovers(session, project, label, tag, before, statuses=statuses)
    except Exception as exc:  # the upload's own error is the one to report
        log(f"could not clean the prearchive after the failed upload of {label}: {type(exc).__name__}")
        return
    if removed:
        log(f"removed {len(removed)} prearchive leftover(s) of this upload of {label}")

