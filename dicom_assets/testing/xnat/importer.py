"""How the XNAT test server receives and builds sessions: the upload zip read as XNAT's importer
reads it, the session builder's rules (scan IDs, the resource a file lands in, renames on a merge:
dicom-xnat-mx, dicom-xnat-sop), the site-wide and project anonymization scripts, staging in the
prearchive and archiving (merges, conflicts), the session rebuilder, and the import service's
request handling. Each rule names the XNAT class it was read from (the ``NrgXnat/xnat``
repository); no XNAT code is copied and nothing here comes from the client
(``dicom_assets/core/xnat``)."""

from __future__ import annotations

import io
import re
import struct
import threading
import time
import zipfile
import zlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.uid import UID_dictionary

from .dicomedit import REJECTED, ScriptError, run_script
from .state import (
    ARCHIVE_FAILED,
    BUSY,
    CAT_ENTRY_MATCH,
    HAS_FILES,
    JOINABLE,
    MAX_STRING,
    MODALITY_MOD,
    PRE_EXISTS,
    SESSION_TYPES,
    SUBJECT_MOD,
    UID_MOD,
    Experiment,
    PrearchiveEntry,
    Scan,
    Subject,
    _HttpError,
    _now,
    clean_value,
)

# --------------------------------------------------------------------------- session building rules
# dicom-xnat-sop/src/main/resources/primary-sops.txt: the SOP classes SOPModel.isPrimaryImagingSOP
# calls primary imaging, by their dcm4che keywords (SOPModel resolves them with UID.forName).
# Five of them (DermoscopyImageStorage, MicroscopyBulkSimpleAnnotationStorage,
# ElectroocularWaveformStorage, EncapsulatedObjStorage, MaterialLibraryStorage) are spelled in a
# way pydicom's dictionary does not know; none is an MR/CT/PET class.
PRIMARY_SOP_KEYWORDS = (
    "AmbulatoryECGWaveformStorage", "BasicTextSRStorage", "CTImageStorage", "CardiacElectrophysiologyWaveformStorage",
    "ComputedRadiographyImageStorage", "DigitalIntraOralXRayImageStorageForPresentation",
    "DigitalIntraOralXRayImageStorageForProcessing", "DigitalMammographyXRayImageStorageForPresentation",
    "DigitalMammographyXRayImageStorageForProcessing", "BreastTomosynthesisImageStorage",
    "DigitalXRayImageStorageForPresentation", "DigitalXRayImageStorageForProcessing", "EnhancedCTImageStorage",
    "EnhancedMRImageStorage", "EnhancedPETImageStorage", "EnhancedSRStorage", "HemodynamicWaveformStorage",
    "MRImageStorage", "NuclearMedicineImageStorage", "OphthalmicPhotography16BitImageStorage",
    "OphthalmicPhotography8BitImageStorage", "OphthalmicTomographyImageStorage",
    "PositronEmissionTomographyImageStorage", "RTDoseStorage", "RTImageStorage", "UltrasoundImageStorage",
    "UltrasoundMultiFrameImageStorage", "VideoEndoscopicImageStorage", "VideoMicroscopicImageStorage",
    "VideoPhotographicImageStorage", "XRay3DCraniofacialImageStorage", "XRayAngiographicImageStorage",
    "XRay3DAngiographicImageStorage", "XRayRadiofluoroscopicImageStorage", "TwelveLeadECGWaveformStorage",
    "VLWholeSlideMicroscopyImageStorage", "VLMicroscopicImageStorage", "DermoscopyImageStorage",
    "ConfocalMicroscopyImageStorage", "PhotoacousticImageStorage", "MicroscopyBulkSimpleAnnotationStorage",
    "ElectromyogramWaveformStorage", "ElectroocularWaveformStorage", "RespiratoryWaveformStorage",
    "BodyPositionWaveformStorage", "EncapsulatedObjStorage", "MaterialLibraryStorage",
)
_BY_KEYWORD = {entry[4]: uid for uid, entry in UID_dictionary.items()}
PRIMARY_SOP_UIDS = frozenset(_BY_KEYWORD[k] for k in PRIMARY_SOP_KEYWORDS if k in _BY_KEYWORD)

#: DICOMSessionBuilder.UNKNOWN_MODALITY: a series whose modality is not known ("Other")
UNKNOWN_MODALITY = "OT"
PRIMARY, SECONDARY = "DICOM", "secondary"


def resource_label(sop_class_uid: str, separate_secondary: bool = True) -> str:
    """The scan resource a file lands in (CatalogBuilder: ``!separateSecondaryDicomOnArchive ||
    SOPModel.isPrimaryImagingSOP(sopClass)`` goes to the primary catalog ``DICOM``, anything else
    to ``secondary``; the site preference is true by default since XNAT 1.9.1)."""
    return PRIMARY if not separate_secondary or sop_class_uid in PRIMARY_SOP_UIDS else SECONDARY


def series_number_key(series_number: str, series_uid: str) -> str:
    """What DICOMSessionBuilder.call groups a series under: its SeriesNumber, a leading ``+``
    made ``_``; a blank number becomes the SeriesInstanceUID with every non-word character
    replaced by ``_`` (``replaceAll("[^\\\\w]", "_")``)."""
    number = (series_number or "").strip()
    if number.startswith("+"):
        number = "_" + number[1:]
    return number or re.sub(r"[^\w]", "_", series_uid, flags=re.ASCII)


def _maybe_numeric(key: str):
    """Utils.MaybeNumericStringComparator: numbers in numeric order, before other strings."""
    return (0, int(key), "") if key.isdigit() else (1, 0, key)


@dataclass(frozen=True)
class SeriesSeen:
    """One series of a session being built: its grouping key, UID and modalities."""

    number: str
    uid: str
    modalities: frozenset[str]


def scan_ids(series: list[SeriesSeen]) -> dict[str, str]:
    """SeriesInstanceUID -> scan ID, as DICOMSessionBuilder.call numbers the scans ("one scan per
    value of Series Instance UID"): a number held by one UID is the scan ID; a number held by
    several becomes ``<number>-<modality><index>`` for each (``3-MR1``, ``3-MR2``: no plain
    ``3``), the UIDs in their string order, the index counted per lead modality. The lead
    modality is SOPModel.getLeadModality over the series' modalities; XNAT's order of lead
    modalities (lead-modalities.txt) is not modelled: a series here has one modality."""
    by_number: dict[str, dict[str, SeriesSeen]] = defaultdict(dict)
    for s in series:
        by_number[s.number][s.uid] = s
    out: dict[str, str] = {}
    for number in sorted(by_number, key=_maybe_numeric):
        uids = by_number[number]
        if len(uids) == 1:
            out[next(iter(uids))] = number
            continue
        counts: dict[str, int] = defaultdict(int)
        for uid in sorted(uids):
            modality = sorted(uids[uid].modalities)[0] if uids[uid].modalities else UNKNOWN_MODALITY
            counts[modality] += 1
            out[uid] = f"{number}-{modality}{counts[modality]}"
    return out


def merged_scan_ids(new: dict[str, str], modality_of: dict[str, str], existing: dict[str, str]) -> dict[str, str]:
    """PrearcSessionArchiver.correctScanID, before a merge into an existing session
    (``existing``: its scans' SeriesInstanceUID -> scan ID): a new scan whose UID the session has
    takes that scan's ID (MergeUtils.getMatchingScanByUID); one whose ID the session already uses
    for another series is renamed ``<id>-<modality><n>`` with the first free n. An ID of the form
    ``<c>-<modality><k>`` keeps its stem ``<c>``, but only for a one-character ``c``: XNAT tests
    ``scan_id.matches(".-" + modalityCode + "[0-9]+$")``, and Java's ``matches`` is a full match
    (so ``12-MR1`` becomes ``12-MR1-MR1``). XNAT takes the modality code from the scan's xsi type
    (``xnat:mrScanData`` -> ``MR``); here it is the series' Modality, the same for MR and CT."""
    used = set(existing.values())
    out: dict[str, str] = {}
    for uid, scan_id in new.items():
        if uid in existing:
            out[uid] = existing[uid]
            continue
        modality = modality_of.get(uid, "")
        stem = scan_id.rsplit("-", 1)[0] if re.fullmatch(rf".-{re.escape(modality)}[0-9]+", scan_id) else None
        candidate, count = scan_id, 1
        while candidate in used:
            candidate = f"{stem if stem is not None else scan_id}-{modality}{count}"
            count += 1
        used.add(candidate)
        out[uid] = candidate
    return out


# --------------------------------------------------------------------------- receiving and archiving
class Importer:
    """Staging, archiving and the session rebuilder, over the server's state (mixed into
    ``XnatTestServer``)."""

    # ---------------------------------------------------------------- importing
    def receive(self, project: str, subject: str, name: str, files: list[tuple[str, bytes, object]],
                store: bool = True) -> PrearchiveEntry:
        """GradualDicomImporter: put each file into the prearchive row of (project,
        StudyInstanceUID, session label), joining a RECEIVING/READY/ERROR/CONFLICT row
        (PrearcDatabase.eitherGetOrCreateSession) or opening a new one (new timestamp) whose
        AUTOARCHIVE is the project's prearchive code (GradualDicomImporter.shouldAutoArchive).
        ``store`` False: the row only (its files were rejected after it was made)."""
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
            for fname, data, ds in files if store else ():
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
        """PrearcSessionArchiver.call + MergePrearcToArchiveSession (MergeSessionsA) + MergeCatCatalog,
        in XNAT's order: the label is fixed and the existing session looked up; a merge into a
        session with an open workflow is refused (preventConcurrentArchiving); the subject is
        found or *created* (fixSubject -> getOrCreateSubject, saved at once: it stays when a
        later step refuses the archive); the session is validated; checkForConflicts runs
        (PRE_EXISTS, MODALITY_MOD, SUBJECT_MOD, UID_MOD, on the session as built in the
        prearchive, before any project script); the project's anonymization script runs
        (MergePrearcToArchiveSession.getPostAnonSession); files the session holds are refused
        (MergeSessionsA.checkForConflict); the files are stored.

        The caller decides ``allow_merge`` (allowSessionMerge), ``override`` (overrideExceptions)
        and ``overwrite_files`` as its XNAT class does (see the import service and the archive
        service below). A session of the same label in the project is merged into only when
        ``allow_merge`` (PRE_EXISTS, 409); files it already holds are refused unless
        ``override or overwrite_files`` (the archiver passes that to MergePrearcToArchiveSession;
        MergeSessionsA.checkForConflict: the same path is HAS_FILES, the same SOPInstanceUID
        under another name CAT_ENTRY_MATCH, both 409)."""
        if not row.tag:
            # DICOMSessionBuilder: no StudyInstanceUID, no session to build (NoUniqueSessionException);
            # the importer took the files (GradualDicomImporter does not require it), the build fails
            raise _HttpError(500, "org.nrg.dcm.xnat.NoUniqueSessionException: no unique StudyInstanceUID")
        with self.lock:
            proj = self.projects[row.project]
            # fixSessionLabel / fixSubject: labels are cleaned (cleanValue)
            label = clean_value(label or row.name)
            existing = proj.experiment(label)  # retrieveExistingExpt: project + label
            # PrearcSessionArchiver.preventConcurrentArchiving (unless overrideExceptions, i.e.
            # overwrite=delete): an open workflow on the session (WorkflowUtils.getOpenWorkflows:
            # a pipeline or a container run on archive, or a stale "In Progress") refuses the merge
            busy = self.open_workflows.get(existing.id) if existing is not None else None
            if busy and not override:
                raise _HttpError(409, f"{BUSY}: {busy[0]}.  Concurrent modification is discouraged.")
            subj = self._fix_subject(proj, clean_value(subject or row.subject or ""))
            if len(label) > MAX_STRING:
                # PrearcSessionArchiver.validateSession: src.validate() (XFTValidator maxLength)
                # fails, thrown on as a ServerException (500)
                raise _HttpError(500, f"Must Be Less Than {MAX_STRING} Characters : Current Length ({len(label)})")
            parsed = [(fname, data, pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True))
                      for (_subdir, fname), data in sorted(row.files.items())]
            xsi_type = session_xsi_type(parsed, self.separate_secondary)
            if existing is not None:
                self._check_for_conflicts(existing, subj, row.tag, xsi_type, allow_merge, override)
            parsed = self._project_anonymization(row, parsed, subj.label, label)
            ids = self._scan_ids(parsed, existing)
            if existing is not None and not (override or overwrite_files):
                self._check_file_conflicts(existing, parsed, ids)
            exp = existing
            if exp is None:
                tag = _study_uid(parsed[0][2]) or row.tag  # the session rebuilt after the project script
                exp = subj.experiments[label] = Experiment(self._next_id("E"), label, proj.id, subj.id, uid=tag,
                                                           xsi_type=xsi_type)
            self._store(exp, subj, parsed, ids)
            self.prearchive.pop(row.key, None)
            return exp

    def _fix_subject(self, proj, subject_label: str) -> Subject:
        """PrearcSessionArchiver.fixSubject -> getOrCreateSubject: the subject matched
        case-insensitively (retrieveMatchingSubject), else created and saved in the project
        right away, before any conflict is checked: a refused archive leaves it, empty."""
        if not subject_label:
            raise _HttpError(400, "Unable to identify subject.")
        subj = proj.subject_ci(subject_label)
        if subj is None:
            subj = proj.subjects[subject_label] = Subject(self._next_id("S"), subject_label, proj.id)
        return subj

    def _check_for_conflicts(self, existing: Experiment, subj: Subject, uid: str, xsi_type: str,
                             allow_merge: bool, override: bool) -> None:
        """PrearcSessionArchiver.checkForConflicts, in its order (409 each): no merge allowed
        (PRE_EXISTS); another data type under preventCrossModalityMerge (MODALITY_MOD); another
        subject (SUBJECT_MOD); another StudyInstanceUID unless overrideExceptions or the
        project's session merging setting allows it (UID_MOD; SessionMergingConfigMapper
        .getUidModSetting, false by default). ``uid`` is the session's as built in the
        prearchive: a project script's hashUID has not run yet."""
        if not allow_merge:
            raise _HttpError(409, PRE_EXISTS)
        if self.prevent_cross_modality_merge and existing.xsi_type != xsi_type:
            raise _HttpError(409, MODALITY_MOD)
        if existing.subject_id != subj.id:
            raise _HttpError(409, f"{SUBJECT_MOD}: {existing.label} Already Exists for another Subject")
        if existing.uid and uid and existing.uid != uid and not override:
            raise _HttpError(409, UID_MOD)

    @staticmethod
    def _check_file_conflicts(existing: Experiment, parsed: list, ids: dict[str, str]) -> None:
        """MergeSessionsA.checkForConflict: a file the session holds under the same path is
        HAS_FILES (FileUtils.FindFirstMatch: it wins), one of the same SOPInstanceUID under another
        name CAT_ENTRY_MATCH (SessionOverwriteCheck: a catalog entry of that UID)."""
        why = None
        for fname, _data, ds in parsed:
            scan = existing.scans.get(ids[_series_uid(ds)])
            if scan is None:
                continue
            held = {n for res in scan.resources.values() for n in res}
            if fname in held:
                raise _HttpError(409, HAS_FILES)
            if str(ds.SOPInstanceUID) in {scan.sop_uids.get(n) for n in held}:
                why = CAT_ENTRY_MATCH
        if why:
            raise _HttpError(409, why)

    def _project_anonymization(self, row: PrearchiveEntry, parsed: list, subject: str, label: str) -> list:
        """MergePrearcToArchiveSession.anonymizeSession: the project's script, when enabled
        (ProjectAnonymizer), runs on every file of the session (PrearcSessionAnonymizer with
        ignoreRejections false; the project, the subject's label and the session label as its
        variables). A script error fails the archive (ArchivingException "Anonymization failed
        for prearcSession at ..."); rejected files are deleted from the session
        (MergeUtils.deleteRejectedFiles) and the rest is archived; the session is then rebuilt
        from the anonymized files (getPostAnonSession), which fails when none is left."""
        script = self.anon_script(row.project)
        if script is None:
            return parsed
        out = []
        for fname, data, _ds in parsed:
            full = pydicom.dcmread(io.BytesIO(data), force=True)
            try:
                outcome = run_script(script, full, row.project, subject, label)
            except ScriptError:
                raise _HttpError(500, f"Anonymization failed for prearcSession at {row.key}") from None
            if outcome == REJECTED:
                continue
            data = _dataset_bytes(full)
            out.append((fname, data, pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)))
        if not out:
            raise _HttpError(500, f"Something went wrong: I anonymized the data in {row.key} but something failed "
                                  "during the session rebuild.")
        return out

    def _store(self, exp: Experiment, subj: Subject, parsed: list, ids: dict[str, str]) -> None:
        """The files into their scans (created as needed) and resources."""
        folder = self.storage / exp.project / subj.label / exp.label
        for fname, data, ds in parsed:
            scan_id = ids[_series_uid(ds)]
            scan = exp.scans.get(scan_id)
            if scan is None:
                scan = exp.scans[scan_id] = Scan(scan_id, str(ds.get("SeriesDescription", "") or ""),
                                                 str(ds.get("Modality", "") or ""), _series_uid(ds))
            exp.date = exp.date or str(ds.get("StudyDate", "") or "")
            # CatalogBuilder: primary imaging SOP classes to DICOM, the rest to secondary
            resource = resource_label(str(ds.get("SOPClassUID", "") or ""), self.separate_secondary)
            path = folder / "SCANS" / scan_id / resource / fname
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            scan.resources.setdefault(resource, {})[fname] = str(path)
            scan.sop_uids[fname] = str(ds.SOPInstanceUID)

    @staticmethod
    def _scan_ids(parsed: list, existing: Experiment | None) -> dict[str, str]:
        """SeriesInstanceUID -> scan ID of the built session (DICOMSessionBuilder), renamed for a
        merge into ``existing`` (PrearcSessionArchiver.correctScanID); see the rules above."""
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



def session_xsi_type(parsed: list, separate_secondary: bool = True) -> str:
    """The data type of the session built of ``parsed`` (DICOMSessionBuilder picks the session
    builder of the files' lead modality: an MR exam is an xnat:mrSessionData, a CT one an
    xnat:ctSessionData): here the most frequent Modality of the primary imaging files (those that
    land in DICOM; all files when none does), ties broken by name; a modality without a session
    type of its own gives xnat:otherDicomSessionData. DICOMSessionBuilder's PET/MR rules
    (separatePETMR) are not modelled."""
    mods = [str(ds.get("Modality", "") or "") for _f, _d, ds in parsed
            if resource_label(str(ds.get("SOPClassUID", "") or ""), separate_secondary) == "DICOM"]
    mods = mods or [str(ds.get("Modality", "") or "") for _f, _d, ds in parsed]
    lead = min(set(mods), key=lambda m: (-mods.count(m), m)) if mods else ""
    return SESSION_TYPES.get(lead, "xnat:otherDicomSessionData")


def _series_uid(ds) -> str:
    return str(ds.get("SeriesInstanceUID", "") or "")


def _study_uid(ds) -> str:
    return str(ds.get("StudyInstanceUID", "") or "")


def _dataset_bytes(ds) -> bytes:
    """A data set as its anonymized file (the file meta's SOPInstanceUID following the data set's,
    as dcm4che writes it back); the file name the upload gave is kept
    (GradualDicomImporter.getSafeFile)."""
    if getattr(ds, "file_meta", None) is not None and "SOPInstanceUID" in ds:
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    out = io.BytesIO()
    ds.save_as(out)
    return out.getvalue()



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



class ImportHandlers:
    """The import service's request handling (mixed into the HTTP request handler)."""

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
            if self._site_rejected:
                # GradualDicomImporter made (or joined) the row before the site-wide script rejected
                # the file (eitherGetOrCreateSession comes first): it stays RECEIVING, empty
                x.receive(project, *self._import_labels(q, self._site_rejected), self._site_rejected, store=False)
            # DicomZipImporter.call: no session and a kept refusal: that refusal; nothing at all
            # (empty zip, everything filtered or rejected): an empty answer
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
        site_script = x.anon_script(None)
        self._site_rejected = []
        for fname, data, ds, why in entries:
            if ds is not None and not all(f.includes(ds) for f in filters):
                continue
            if why is None and storage_error and len(files) >= x.storage_error_after:
                why = f"unable to read DICOM object {fname}"  # the write's ServerException, caught
            if why is None and site_script is not None:
                kept, ds_kept, why = self._site_anonymization(site_script, q, fname, data, ds)
                if kept is None:
                    self._site_rejected.append((fname, data, ds))
                    continue  # rejected: deleted, and the import goes on (returnEmptyList)
                data, ds = kept, ds_kept
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
    def _site_anonymization(script: str, q: dict, fname: str, data: bytes, ds) -> tuple:
        """GradualDicomImporter.call, once the file is written: the site-wide script, when enabled
        (DefaultAnonUtils.isSiteWideScriptEnabled and the configuration's status), runs on it
        with the row's project, subject and folder name (MizerService.anonymize). A reject
        deletes the file and the import goes on: ``(None, None, None)``, the file dropped
        silently like a filtered one. An error (AnonymizationResultError, or any failure) is
        handleAnonymizationError's ServerException, which the importer's catch-all turns into
        ``ClientException("unable to read DICOM object <name>")``: a refusal, dropped under
        Ignore-Unparsable. Otherwise the anonymized file and its header."""
        full = pydicom.dcmread(io.BytesIO(data), force=True)
        subject, name = ImportHandlers._import_labels(q, [(fname, data, ds)])
        try:
            outcome = run_script(script, full, q.get("project") or "", subject, name)
        except ScriptError:
            return data, ds, f"unable to read DICOM object {fname}"
        if outcome == REJECTED:
            return None, None, None
        data = _dataset_bytes(full)
        return data, pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True), None

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

