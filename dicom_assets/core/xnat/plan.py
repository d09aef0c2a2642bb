"""What to do with a visit's session, decided from what XNAT holds: a pure function.

:func:`plan` reads no network and writes nothing. The executor (``upload.py``) gathers what it
needs (the session XNAT has under the label, which of the visit's files it lacks and which of
those XNAT's series import filter drops, the record of an unfinished upload of this client) and
carries the :class:`Action` out. ``dicom_assets_tests/test_xnat_plan.py`` holds it to a table
of cases.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import XNAT_DUPLICATE_POLICIES as POLICIES  # what xnat_duplicate_policy may say

SEND, NOTHING, FAIL = "send", "nothing", "fail"


@dataclass(frozen=True)
class Existing:
    """The session XNAT files under the visit's label in the project."""

    subject: str  # the label of the subject XNAT filed it under
    uid: str  # its StudyInstanceUID ("" when XNAT does not say)
    held: frozenset[str]  # every instance name its scans hold
    missing: frozenset[str]  # the visit's files it lacks that XNAT's filter does not explain
    foreign: frozenset[str]  # the files it holds that this visit does not have
    scans: int = 0  # how many of its scans hold files


@dataclass(frozen=True)
class Visit:
    """The visit as the client is about to send it."""

    project: str
    subject: str  # as XNAT files it (cleaned)
    label: str  # as XNAT files it (cleaned)
    study_uid: str  # the visit's StudyInstanceUID ("" when its files carry several)
    files: int  # how many files the visit sends
    series: str = ""  # "series 3 (T2w): 10 of 20 files, ..." of the missing files, for messages


@dataclass(frozen=True)
class Action:
    """What the executor does: ``send`` (the files named by ``send_only``, or all when None,
    with ``overwrite``), ``nothing`` (the session is as it should be, or the policy says to
    leave it) or ``fail`` (``reason`` says why and what to do)."""

    kind: str
    status: str  # the UploadResult status: uploaded | appended | already_archived | skipped_existing
    reason: str = ""
    send_only: frozenset[str] | None = None
    overwrite: str | None = None
    own: bool = False  # completing this client's own unfinished upload


def plan(existing: Existing | None, visit: Visit, pending: frozenset[str], policy: str) -> Action:
    """The action for a visit, given the session XNAT holds under its label (None: none) and the
    file names an unfinished upload of this client recorded (``pending``).

    * no session: send everything;
    * a session of another subject or another study under the label: fail (labels are unique
      per project);
    * nothing missing and nothing foreign: already archived;
    * a session holding only files of this client's record, with files missing: complete it
      (overwrite=append), whatever the policy (a retry of its own upload);
    * otherwise the policy: ``skip`` leaves it, ``fail`` fails naming the difference, ``append``
      sends only the missing files (overwrite=append), or leaves it when none is missing."""
    if policy not in POLICIES:
        raise ValueError(f"duplicate policy must be one of {POLICIES}")
    if existing is None:
        return Action(SEND, "uploaded")
    conflict = _label_conflict(existing, visit)
    if conflict:
        return Action(FAIL, "", conflict)
    if not existing.missing and not existing.foreign:
        return Action(NOTHING, "already_archived", f"is already archived in {visit.project} with the same files")
    own = bool(pending) and not existing.foreign and existing.held <= pending
    if own:  # missing is not empty here
        return Action(SEND, "appended", "", existing.missing, "append", own=True)
    if policy == "skip":
        return Action(NOTHING, "skipped_existing", f"exists in {visit.project} with other content; policy 'skip'")
    if policy == "fail":
        return Action(FAIL, "", _different_content(existing, visit))
    if not existing.missing:
        return Action(NOTHING, "skipped_existing", f"holds {len(existing.foreign)} files this visit does not have "
                                                   "and none is missing; policy 'append'")
    return Action(SEND, "appended", "", existing.missing, "append")


def _label_conflict(existing: Existing, visit: Visit) -> str:
    if existing.subject.lower() != visit.subject.lower():
        return (f"session label {visit.label} is already used in XNAT project {visit.project} by subject "
                f"{existing.subject} (this visit's subject is {visit.subject}); XNAT labels are unique per "
                "project: change session_label_pattern or rename the session in XNAT")
    ours = bool(existing.held) and not existing.foreign
    # a session holding only this visit's instances (the <SOPInstanceUID>.dcm names it sent,
    # which XNAT keeps) is this visit's, whatever its StudyInstanceUID: an anonymization script
    # (hashUID, PrearcSessionAnonymizer) rewrites the UIDs, never the names
    if existing.uid and visit.study_uid and existing.uid != visit.study_uid and not ours:
        return (f"session {visit.label} in XNAT project {visit.project} holds another study (StudyInstanceUID "
                f"{existing.uid}, this visit's is {visit.study_uid}); XNAT labels are unique per project: change "
                "session_label_pattern or rename the session in XNAT")
    return ""


def _different_content(existing: Existing, visit: Visit) -> str:
    missing = existing.missing
    return (f"session {visit.label} already exists in XNAT project {visit.project} with different content "
            f"({len(existing.held)} DICOM files in {existing.scans} scans, "
            f"{len(missing)} of this visit's {visit.files} files missing"
            + (f": {visit.series}" if missing else "")
            + f", {len(existing.foreign)} files this visit does not have); set xnat_duplicate_policy to 'append' "
            "(sends only the missing files) or 'skip', or remove it in XNAT")
