"""The executor: carries out the plan for one visit (``plan.py``) against XNAT: sends,
verifies, sends again what did not arrive, and reports what XNAT holds."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from .anon import WHERE, AnonScripts, describe_rejects, read_anon_scripts
from .errors import XnatBusyError, XnatError, XnatTransientError, classify_error, http_status, in_doubt
from .files import (
    UploadFile,
    expected_names,
    importer_refusals,
    read_pending,
    series_summary,
    temp_zip_path,
    unsafe_names,
    write_pending,
    write_zip,
)
from .filters import SeriesFilters, series_import_filters
from .labels import MAX_LABEL, clean_label
from .plan import FAIL, NOTHING, Action, Existing, Visit, plan
from .prearchive import (
    IN_PROGRESS,
    LEFTOVER,
    clean_after_failure,
    post_import,
    prearchive_rows,
    refused_import,
    unarchived_answer,
    wait_for_prearchive,
)
from .remote import (
    attach_files,
    attach_project_files,
    dicom_names,
    ensure_project,
    find_session,
    find_subject,
    foreign_names,
    held_names,
    missing_names,
    remove_empty_subject,
    session_names,
)


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
    held: dict[str, set[str]] = field(default_factory=dict)  # XNAT scan ID -> the names it holds
    resources: dict[str, int] = field(default_factory=dict)  # session resource label -> files attached


def upload_visit(session, *, server: str, project: str, subject: str, session_label: str,
                 files: list[UploadFile], excluded: list[dict], metadata_files: list[Path],
                 policy: str = "fail", workdir: Path | None = None, log=lambda m: None,
                 project_files: dict[str, list[Path]] | None = None,
                 session_resources: dict[str, list[tuple[Path, str]]] | None = None,
                 known_filtered: frozenset[str] = frozenset(),
                 wait_seconds: float = 900.0, poll_seconds: float = 2.0,
                 pending_path: Path | None = None, reconnect=None) -> UploadResult:
    """Send one visit to XNAT, duplicate-safe; raises XnatError subclasses with clear messages.

    ``project_files`` (resource label -> files) are attached to the project after the session
    (a refusal is a warning); ``session_resources`` (resource label -> (file, path in the
    resource)) to the session, beside ``METADATA`` (a TCIA visit's annotation files). A file the session lacks is "filtered by XNAT" only when XNAT's
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
    upload = _VisitUpload(session, server=server, project=project, subject=subject, session_label=session_label,
                          files=files, excluded=excluded, metadata_files=metadata_files,
                          session_resources=session_resources or {}, policy=policy,
                          workdir=workdir, log=log, known_filtered=known_filtered, wait_seconds=wait_seconds,
                          poll_seconds=poll_seconds, pending_path=pending_path)
    fresh = None
    try:
        try:
            result = upload.run()
        except XnatError:
            raise
        except Exception as exc:  # a client or transport failure not named above: classified, never raw
            if reconnect is None or http_status(exc) != 401:
                raise classify_error(exc, server) from None
            # the login worked, then XNAT answered 401 (XnatSecureGuard): its session timed out or XNAT
            # restarted, and xnatpy keeps only the JSESSIONID. Log in again, once, and go on: the
            # plan is made again from what XNAT holds, so nothing is sent twice
            log(f"XNAT answered 401 to a login that had worked (its session timed out, or XNAT restarted): "
                f"logging in again, once, and going on with {upload.xlabel}")
            fresh = upload.session = reconnect()
            try:
                result = upload.run()
            except XnatError:
                raise
            except Exception as again:  # the second login failed too: classified (401: the credentials)
                raise classify_error(again, server) from None
        attach_project_files(upload.session, server, project, project_files or {}, result, log)
    finally:
        if fresh is not None:
            try:
                fresh.disconnect()
            except Exception:  # closing the second login is best effort; the result stands
                pass
    return result


def check_visit(files: list[UploadFile], xsubject: str, xlabel: str, session_label: str, policy: str) -> None:
    """What fails before anything is sent: a bad policy, nothing to send, a label XNAT cannot
    store, a file XNAT's importer refuses."""
    from .plan import POLICIES

    if policy not in POLICIES:
        raise ValueError(f"duplicate policy must be one of {POLICIES}")
    if not files:
        raise XnatError(f"nothing to send for {session_label}: every kept series is excluded")
    for kind, value in (("subject", xsubject), ("session", xlabel)):
        if len(value) > MAX_LABEL:  # XFTValidator (PrearcSessionArchiver.validateSession): a server error
            raise XnatError(f"the XNAT {kind} label {value[:40]!r}... has {len(value)} characters; XNAT stores "
                            f"labels of at most {MAX_LABEL} (XFT's default string size): shorten it "
                            "(session_label_pattern, or the participant ID)")
    unsafe = unsafe_names(files)
    if unsafe:
        raise XnatError(f"{len(unsafe)} files of {session_label} would be sent under names that are no plain file "
                        f"name (from their SOPInstanceUID): {', '.join(repr(n) for n in unsafe[:3])}; nothing was "
                        "sent. Repair or exclude those files")
    no_study = [f.arcname for f in files if not f.study_instance_uid]
    if no_study:  # XNAT takes them, then cannot build the session (NoUniqueSessionException)
        raise XnatError(f"{len(no_study)} files of {session_label} carry no StudyInstanceUID "
                        f"({', '.join(no_study[:3])}{' ...' if len(no_study) > 3 else ''}): XNAT builds a session "
                        "from one study and cannot build one without it, so nothing was sent. Repair or exclude "
                        "those files")
    studies: dict[str, int] = {}
    for f in files:
        studies[f.study_instance_uid] = studies.get(f.study_instance_uid, 0) + 1
    if len(studies) > 1:
        shown = ", ".join(f"{uid or '(none)'}: {n} files" for uid, n in sorted(studies.items()))
        raise XnatError(
            f"{session_label} holds {len(studies)} studies ({shown}); XNAT keeps one study per session "
            "(PrearcDatabase keys its prearchive rows by StudyInstanceUID: it would archive the first study under "
            f"{xlabel} and refuse the others into that label), so nothing was sent. Split the dump into one visit "
            "per study, or exclude the other study's series (exclude_series)")
    refused = importer_refusals(files)
    if refused:
        shown = ", ".join(f"{name} ({why})" for name, why in refused[:3])
        raise XnatError(
            f"{len(refused)} of the {len(files)} files of {session_label} would be refused by XNAT's importer, which "
            f"requires SOPClassUID and SOPInstanceUID in every DICOM (GradualDicomImporter): {shown}"
            + (" ..." if len(refused) > 3 else "") + "; nothing was sent. Exclude those series "
            "(exclude_series) or repair the files")


@dataclass
class _VisitUpload:
    session: object
    server: str
    project: str
    subject: str
    session_label: str
    files: list[UploadFile]
    excluded: list[dict]
    metadata_files: list[Path]
    session_resources: dict[str, list[tuple[Path, str]]]
    policy: str
    workdir: Path | None
    log: object
    known_filtered: frozenset[str]
    wait_seconds: float
    poll_seconds: float
    pending_path: Path | None
    _filters: list[SeriesFilters] = field(default_factory=list)  # read from XNAT once, when a file is missing
    _anon: list[AnonScripts] = field(default_factory=list)  # the same for its anonymization scripts
    new_subject: bool = False  # the visit's subject was not in XNAT when this upload first sent

    def __post_init__(self) -> None:
        self.xsubject, self.xlabel = clean_label(self.subject), clean_label(self.session_label)
        check_visit(self.files, self.xsubject, self.xlabel, self.session_label, self.policy)
        tags = {f.study_instance_uid for f in self.files}
        self.tag = tags.pop() if len(tags) == 1 else ""
        self.want = expected_names(self.files)
        self.by_name = {f.arcname: f for f in self.files}
        self.result = UploadResult("uploaded", self.project, self.xsubject, self.xlabel, excluded=self.excluded,
                                   labels={"subject": {"given": self.subject, "xnat": self.xsubject},
                                           "session": {"given": self.session_label, "xnat": self.xlabel}})
        for kind in ("subject", "session"):
            if self.result.labels[kind]["given"] != self.result.labels[kind]["xnat"]:
                self.log(f"XNAT label of {kind} {self.result.labels[kind]['given']!r} is "
                         f"{self.result.labels[kind]['xnat']!r} (XNAT replaces spaces and . / , : ( ) ... by _)")

    # --- what XNAT holds -------------------------------------------------------------------
    def filters(self) -> SeriesFilters:
        if not self._filters:
            self._filters.append(series_import_filters(self.session, self.project))
        return self._filters[0]

    def explain(self, absent: set[str]) -> tuple[set[str], set[str]]:
        """(filtered, missing): the absent files XNAT's series import filter drops, and the rest."""
        if not absent:
            return set(), set()
        dropped = {n for n in absent if self.filters().drops(self.by_name[n])}
        return dropped, absent - dropped

    def anon(self) -> AnonScripts:
        if not self._anon:
            self._anon.append(read_anon_scripts(self.session, self.project))
        return self._anon[0]

    def rejected(self, missing: set[str]) -> set[str]:
        """The missing files an anonymization script's ``reject`` drops for certain (the client
        evaluated its condition on their headers): sending them again is pointless."""
        if not missing:
            return set()
        certain, _maybe = self.anon().explain([self.by_name[n] for n in sorted(missing)])
        return set().union(*certain.values()) if certain else set()

    def rejected_on_import(self, batch: list[UploadFile], before: dict) -> None:
        """An empty answer to an import of files the site-wide script rejects, every one: XNAT
        deleted each as it arrived, left the row it had made for them (RECEIVING, empty) and
        answered no URI (DicomZipImporter.call). That row is removed and the step fails naming the
        script, instead of waiting on the row."""
        names = {f.arcname for f in batch}
        certain, _maybe = self.anon().explain(batch)
        if set().union(*(n for r, n in certain.items() if r.scope == "site-wide")) != names:
            return
        clean_after_failure(self.session, self.project, self.xlabel, self.tag, before, self.log,
                            statuses=LEFTOVER + ("RECEIVING",))
        raise self.incomplete(names, "")

    def summary(self, names: set[str]) -> str:
        return series_summary(names, self.files)

    def existing(self, exp: dict) -> tuple[Existing, dict[str, set[str]], set[str]]:
        """The plan's view of a session XNAT holds, its files by scan, and the filtered names."""
        have = dicom_names(self.session, exp["id"])
        filtered, missing = self.explain(missing_names(self.want, have))
        untrue = missing & self.known_filtered
        if untrue:
            self.log(f"{len(untrue)} files an earlier upload of {self.xlabel} recorded as filtered by XNAT are not "
                     f"dropped by its series import filter ({self.filters().describe()}): they are missing, not "
                     "filtered")
        held = held_names(have)
        state = Existing(exp["subject"], exp["uid"], frozenset(held), frozenset(missing),
                         frozenset(foreign_names(self.want, have)), sum(1 for v in have.values() if v))
        return state, have, filtered

    # --- sending ---------------------------------------------------------------------------
    def send(self, batch: list[UploadFile], overwrite: str | None) -> None:
        """:meth:`send_once`, again while XNAT says the session is busy (a workflow open on it),
        every ``poll_seconds`` for at most ``wait_seconds``; then the busy error, named."""
        deadline = time.monotonic() + self.wait_seconds
        while True:
            try:
                return self.send_once(batch, overwrite)
            except XnatBusyError as exc:
                if time.monotonic() + self.poll_seconds > deadline:
                    raise XnatBusyError(f"{exc} The client waited {self.wait_seconds:.0f} s for the workflow to "
                                        "end; the step is retried later") from None
                self.log(f"{self.xlabel} is busy in XNAT (a workflow is open on it): sending again in "
                         f"{self.poll_seconds:.0f} s")
                time.sleep(self.poll_seconds)

    def send_once(self, batch: list[UploadFile], overwrite: str | None) -> None:
        """One import of ``batch``; returns once XNAT archived at least part of it (what did not
        arrive is the caller's to find)."""
        before = prearchive_rows(self.session, self.project, self.xlabel, self.tag)
        zpath = temp_zip_path(self.workdir)
        answer = None
        try:
            size = write_zip(batch, zpath)
            try:
                answer = post_import(self.session, zpath, project=self.project, subject=self.xsubject,
                                     label=self.xlabel, overwrite=overwrite,
                                     timeout=getattr(self.session, "request_timeout", None))
            except Exception as exc:  # requests' and xnatpy's errors: sorted by in_doubt below
                self.answer_lost(exc, batch, before, overwrite)
        finally:
            zpath.unlink(missing_ok=True)
        if answer is not None and "/archive/" not in answer:
            if not answer:
                self.rejected_on_import(batch, before)
            unarchived_answer(self.session, self.project, self.xlabel, self.tag, before, batch, answer,
                              self.wait_seconds, self.poll_seconds, self.log)
        self.result.files_sent += len(batch)
        self.result.bytes_sent += size

    def answer_lost(self, exc: Exception, batch: list[UploadFile], before: dict, overwrite: str | None) -> None:
        """The import failed: re-raise a refusal (named when XNAT refused a merge); after an
        answer lost in doubt (a proxy's 504, a timeout, a broken connection) return when XNAT
        archived part of the batch anyway, else re-raise."""
        if not in_doubt(exc):
            refused = refused_import(self.session, self.project, self.xlabel, self.tag, before, exc,
                                     overwrite is not None, self.log)
            if refused is not None:
                raise refused from None
            raise exc
        # XNAT may carry on (a proxy's 504, a client timeout), or keep what it read before the
        # connection broke (a RECEIVING row its session rebuilder may archive as a partial
        # session): look before sending again
        self.log(f"no answer from XNAT for {self.xlabel} ({http_status(exc) or type(exc).__name__}); looking for the "
                 "session before anything is sent again")
        wait_for_prearchive(self.session, self.project, self.xlabel, self.tag, before, self.wait_seconds,
                            self.poll_seconds, self.log)
        arrived = find_session(self.session, self.project, self.xlabel)
        present = session_names(self.session, arrived)
        names = {f.arcname for f in batch}
        if not present & names:
            clean_after_failure(self.session, self.project, self.xlabel, self.tag, before, self.log)
            raise exc
        self.log(f"XNAT archived {len(present & names)} of the {len(batch)} files sent for {self.xlabel} although "
                 "the answer was lost; the session is checked for files that did not arrive")

    def incomplete(self, missing: set[str], why: str) -> XnatError:
        certain, maybe = self.anon().explain([self.by_name[n] for n in sorted(missing)])
        if certain or maybe:
            return self.anonymized_away(missing, certain, maybe, why)
        unread = "; ".join(self.anon().unknown)
        return XnatError(
            f"XNAT session {self.xlabel} in project {self.project} is incomplete: {len(missing)} of this visit's "
            f"{len(self.files)} files are missing ({self.summary(missing)}), and XNAT's series import filter does not "
            f"explain them ({self._filters[0].describe() if self._filters else 'not read'}). An upload was cut short "
            "(a connection that broke, or an import XNAT stopped) and XNAT archived the files it had received; the "
            f"client sent the missing ones again (overwrite=append): {why}. Nothing was recorded as filtered"
            + (f" ({unread})" if unread else "") + ". A re-run with xnat_duplicate_policy 'append' sends only the "
            "missing files")

    def anonymized_away(self, missing: set[str], certain: dict, maybe: dict, why: str) -> XnatError:
        """The error for files XNAT's anonymization dropped: which statement of which script
        (site-wide or the project's) rejects which series."""
        explained = set().union(*certain.values(), *maybe.values())
        rest = missing - explained
        return XnatError(
            f"XNAT session {self.xlabel} in project {self.project} is incomplete: {len(missing)} of this visit's "
            f"{len(self.files)} files are missing, and XNAT's anonymization dropped them: "
            f"{describe_rejects(certain, maybe, self.summary)}. {WHERE}. "
            + ("The client does not send again the files a script rejects (XNAT would reject them again)" if certain
               else "The client sent them again once, and XNAT dropped them again")
            + (f"; {len(rest)} other files are missing for no reason the client can name ({self.summary(rest)}; "
               f"{why})" if rest else "")
            + ". Nothing was recorded as filtered. Exclude those series (exclude_series), or ask the XNAT admin to "
            "change the script; until then each run of this visit fails here"
            + (", sending nothing again" if certain else ", sending them once more"))

    # --- the steps ---------------------------------------------------------------------------
    def decide(self) -> tuple[Action, dict | None, dict[str, set[str]]]:
        """The plan for this visit, from the session XNAT holds (after any of its work on the
        label is over: never send over an earlier attempt still running)."""
        if ensure_project(self.session, self.project):
            self.log(f"created XNAT project {self.project}")
        wait_for_prearchive(self.session, self.project, self.xlabel, self.tag, None, self.wait_seconds,
                            self.poll_seconds, self.log)
        exp = find_session(self.session, self.project, self.xlabel)
        if exp is None:
            return plan(None, self._visit(set()), frozenset(), self.policy), None, {}
        state, have, filtered = self.existing(exp)
        self.result.subject = exp["subject"]
        self.result.filtered = sorted(filtered)
        pending = frozenset(read_pending(self.pending_path, project=self.project, label=self.xlabel, log=self.log))
        rejected = self.rejected(set(state.missing))
        if rejected:  # an anonymization script drops them: planned as if present, reported after
            state = replace(state, missing=state.missing - rejected)
        action = plan(state, self._visit(state.missing), pending, self.policy)
        if rejected and action.status == "already_archived":
            raise self.incomplete(rejected, "the session holds everything else")
        return action, exp, have

    def _visit(self, missing) -> Visit:
        return Visit(self.project, self.xsubject, self.xlabel, self.tag, len(self.files),
                     self.summary(set(missing)) if missing else "")

    def verify(self) -> tuple[dict, dict[str, set[str]], set[str]]:
        """The session after the upload; the files that did not arrive (and that XNAT's filter
        does not explain) are sent again, once: still missing, the step fails naming them."""
        exp = find_session(self.session, self.project, self.xlabel)
        if exp is None:
            raise XnatError(f"XNAT accepted the upload but session {self.xlabel} is not in project {self.project}")
        have = dicom_names(self.session, exp["id"])
        filtered, missing = self.explain(missing_names(self.want, have))
        if not missing:
            return exp, have, filtered
        # not explained by XNAT's filter: files an anonymization script rejected (never sent
        # again), or files that never arrived (XNAT archived a partial session), sent again, only
        # them, asking XNAT to merge
        resend = missing - self.rejected(missing)
        if not resend:
            raise self.incomplete(missing, "")
        self.log(f"XNAT's session {self.xlabel} lacks {len(resend)} of the files sent ({self.summary(resend)}), "
                 f"which its series import filter does not explain ({self.filters().describe()}): sending them "
                 "again (overwrite=append)")
        try:
            self.send([f for f in self.files if f.arcname in resend], "append")
        except XnatBusyError:
            raise  # named, and retried: the missing files are sent once the workflow ended
        except XnatError as exc:
            raise self.incomplete(missing, f"XNAT did not take them ({exc})") from None
        except Exception as exc:  # a transport failure: classified for the message
            raise self.incomplete(missing, f"XNAT did not take them ({classify_error(exc, self.server)})") from None
        exp = find_session(self.session, self.project, self.xlabel) or exp
        have = dicom_names(self.session, exp["id"])
        filtered, missing = self.explain(missing_names(self.want, have))
        if missing:
            raise self.incomplete(missing, "XNAT answered, but they are still not in the session")
        self.log(f"{self.xlabel} is complete in XNAT after sending the missing files again")
        return exp, have, filtered

    def attach_resources(self, exp: dict) -> None:
        """The session's resources (METADATA, a TCIA visit's ANNOTATIONS), overwritten: a re-run
        leaves the same files under the same paths, and brings a session archived before them
        up to date."""
        resources = {"METADATA": [(f, Path(f).name) for f in self.metadata_files], **self.session_resources}
        experiment = None
        for label, entries in resources.items():
            if entries:
                experiment = experiment or self.session.create_object(f"/data/experiments/{exp['id']}")
                attach_files(experiment, label, entries)
                self.result.resources[label] = len(entries)

    def unchanged(self, action: Action, exp: dict, have: dict[str, set[str]]) -> UploadResult:
        result = self.result
        if action.status == "already_archived":  # this visit's session: its resources kept current
            self.attach_resources(exp)
        if not result.files_sent:  # a pass after a new login keeps what the first one did
            result.status = action.status
        result.session_uri = exp["uri"]
        result.scans = [{"scan": k, "files": len(v)} for k, v in sorted(have.items()) if v]
        result.held = {k: set(v) for k, v in have.items() if v}
        if action.status == "already_archived" and self.pending_path is not None:
            self.pending_path.unlink(missing_ok=True)
        self.log(f"{self.xlabel} {action.reason}: nothing sent")
        return result

    def run(self) -> UploadResult:
        action, exp, have = self.decide()
        if action.kind == FAIL:
            raise XnatError(action.reason)
        if action.kind == NOTHING:
            return self.unchanged(action, exp, have)
        to_send = self.files if action.send_only is None else [f for f in self.files if f.arcname in action.send_only]
        if action.own:
            self.log(f"{self.xlabel} in {self.project} is this client's own unfinished upload (every file it holds is "
                     f"in the record of what was being sent, {self.pending_path}): completing it with the "
                     f"{len(to_send)} missing files (overwrite=append), whatever the duplicate policy")
        elif action.send_only is not None:
            self.log(f"{self.xlabel}: appending the {len(to_send)} instances the session lacks "
                     f"({self.summary(set(action.send_only))})")
        self.result.status = action.status
        if self.pending_path is not None:
            write_pending(self.pending_path, project=self.project, subject=self.xsubject, label=self.xlabel,
                          tag=self.tag, files=self.files)
        self.new_subject = self.new_subject or find_subject(self.session, self.project, self.xsubject) is None
        try:
            self.send(to_send, action.overwrite)
        except Exception as exc:
            self.refused(exc)
            raise
        exp, have, filtered = self.verify()
        return self.finish(exp, have, filtered)

    def refused(self, exc: Exception) -> None:
        """After XNAT refused or failed the archive: the subject it created for this upload before
        refusing (fixSubject runs first) is removed when empty, and the error raised says so."""
        if not self.new_subject or in_doubt(exc) or http_status(exc) == 401 or isinstance(exc, XnatTransientError):
            return  # nothing refused for good (retried, or a login to renew): the subject may still be used
        try:
            note = remove_empty_subject(self.session, self.project, self.xsubject, IN_PROGRESS)
        except Exception as again:  # the refusal is the error to report
            note = (f"the client could not check whether XNAT left an empty subject {self.xsubject} "
                    f"({http_status(again) or type(again).__name__})")
        if not note:
            return
        self.log(note)
        err = exc if isinstance(exc, XnatError) else classify_error(exc, self.server)
        raise type(err)(f"{err}. {note}") from None

    def finish(self, exp: dict, have: dict[str, set[str]], filtered: set[str]) -> UploadResult:
        result = self.result
        result.session_uri, result.subject = exp["uri"], exp["subject"]
        if result.subject != self.xsubject:
            self.log(f"XNAT filed {self.xlabel} under its existing subject {result.subject} (subjects match "
                     "case-insensitively)")
            result.labels["subject"]["xnat"] = result.subject
        self.attach_resources(exp)
        result.filtered = sorted(filtered)
        if result.filtered:
            self.log(f"XNAT's series import filter dropped {len(result.filtered)} of the files sent for {self.xlabel} "
                     f"({self.summary(filtered)}; {self.filters().describe()}); they are reported, not sent again")
        result.scans = [{"scan": k, "files": len(v)} for k, v in sorted(have.items()) if v]
        result.held = {k: set(v) for k, v in have.items() if v}
        if self.pending_path is not None:  # the session is verified complete: nothing of this visit is pending
            self.pending_path.unlink(missing_ok=True)
        return result
