"""Upload a visit to XNAT through xnatpy: the pure part (what to send, how to zip it, how
to tell a duplicate) and the client calls. No Dagster here.

* only kept DICOMs are sent, minus series matching the exclusion substrings (series
  description), from a single PatientID/StudyInstanceUID (organize's check guards that);
* the zip is streamed to a temporary file, never held in memory;
* duplicate-safe: a session that already holds exactly these SOPInstanceUIDs (same file
  count) is "already archived" and nothing is sent; a session with other content follows the
  policy (`skip`, `append`, `fail`);
* credentials come from the caller (environment variables); they never enter a message.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from .config import XNAT_DUPLICATE_POLICIES
from .errors import DicomAssetsError

POLICIES = XNAT_DUPLICATE_POLICIES


class XnatError(DicomAssetsError):
    """XNAT refused or failed the upload; the message says what to do."""


class XnatAuthError(XnatError):
    """401/403: wrong credentials or missing rights (never retried)."""


class XnatTransientError(XnatError):
    """Connection reset, timeout, 502/503/504: worth retrying."""


@dataclass(frozen=True)
class UploadFile:
    path: Path
    arcname: str
    sop_instance_uid: str
    series_number: int | None
    series_description: str | None


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
                               rec.get("SeriesNumber"), desc))
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


def expected_scans(files: list[UploadFile]) -> dict[str, int]:
    """Series number -> file count the XNAT session should end with."""
    out: dict[str, int] = {}
    for f in files:
        key = str(f.series_number if f.series_number is not None else "")
        out[key] = out.get(key, 0) + 1
    return out


def temp_zip_path(folder: Path | None = None) -> Path:
    fd, name = tempfile.mkstemp(prefix="xnat-upload-", suffix=".zip", dir=folder)
    os.close(fd)
    return Path(name)


def load_dicoms_json(path: Path) -> list[dict]:
    return json.loads(path.read_text())


# ----------------------------------------------------------------------- client calls
def _status(exc: Exception) -> int | None:
    resp = getattr(exc, "response", None)
    status = getattr(resp, "status_code", None)
    if status is None:  # xnatpy's upload errors carry the status only in their text
        import re

        m = re.search(r"(?:Status code|status|response for uploading was) \(?(\d{3})\)?", str(exc))
        status = int(m.group(1)) if m else None
    return status


def classify_error(exc: Exception, server: str) -> XnatError:
    """Map xnatpy/requests errors to ours, with a message that says what to do (no secrets)."""
    import requests
    import xnat.exceptions as xe

    status = _status(exc)
    if isinstance(exc, xe.XNATLoginFailedError) or status == 401:
        return XnatAuthError(f"XNAT at {server} refused the credentials (401): check XNAT_USER/XNAT_PASSWORD")
    if status == 403:
        return XnatAuthError(f"XNAT at {server} refused the request (403): the user lacks the right for it")
    if status in (500, 502, 503, 504) or isinstance(exc, (requests.ConnectionError, requests.Timeout,
                                                          ConnectionError, TimeoutError)):
        return XnatTransientError(f"XNAT at {server} is unavailable or failed ({status or type(exc).__name__}); "
                                  "transient: retried with backoff (3 attempts)")
    text = str(exc).replace("\n", " ")[:300]
    return XnatError(f"XNAT at {server} answered an error: {text}")


def ensure_project(session, project: str) -> bool:
    """Create the project when missing; True when it was created."""
    session.clearcache()
    if project in session.projects:
        return False
    session.put(f"/data/projects/{project}")
    session.clearcache()
    return True


def find_experiment(session, project: str, subject: str, label: str):
    session.clearcache()
    try:
        return session.projects[project].subjects[subject].experiments[label]
    except KeyError:
        return None


def scan_counts(experiment) -> dict[str, int]:
    return {str(scan_id): len(scan.files) for scan_id, scan in experiment.scans.items()}


def remove_prearchive_leftovers(session, project: str, label: str) -> int:
    """Delete prearchive sessions of this label left by a failed upload."""
    removed = 0
    try:
        rows = session.get_json(f"/data/prearchive/projects/{project}")["ResultSet"]["Result"]
    except Exception:
        return 0
    for row in rows:
        if row.get("name") == label:
            session.delete(f"/data/prearchive/projects/{project}/{row['timestamp']}/{row['name']}")
            removed += 1
    return removed


def attach_files(owner, label: str, paths: list[Path]) -> None:
    """Upload files into a resource folder of a project or an experiment (created when missing)."""
    resource = owner.resources.get(label) if label in owner.resources else owner.create_resource(label)
    for f in paths:
        resource.upload(str(f), Path(f).name, overwrite=True)


def upload_visit(session, *, server: str, project: str, subject: str, session_label: str,
                 files: list[UploadFile], excluded: list[dict], metadata_files: list[Path],
                 policy: str = "fail", workdir: Path | None = None, log=lambda m: None,
                 project_files: dict[str, list[Path]] | None = None) -> UploadResult:
    """Send one visit to XNAT, duplicate-safe; raises XnatError subclasses with clear messages.

    ``project_files`` (resource label -> files) are attached to the project itself, e.g. the
    TCIA manifests a visit came from (re-attaching overwrites, never duplicates)."""
    if policy not in POLICIES:
        raise ValueError(f"duplicate policy must be one of {POLICIES}")
    if not files:
        raise XnatError(f"nothing to send for {session_label}: every kept series is excluded")
    result = UploadResult("uploaded", project, subject, session_label, excluded=excluded)
    expected = expected_scans(files)
    try:
        if ensure_project(session, project):
            log(f"created XNAT project {project}")
        for label, paths in (project_files or {}).items():
            attach_files(session.projects[project], label, paths)
        existing = find_experiment(session, project, subject, session_label)
        overwrite = None
        if existing is not None:
            have = scan_counts(existing)

            def unchanged(status: str, why: str) -> UploadResult:
                result.status, result.session_uri = status, existing.uri
                result.scans = [{"scan": k, "files": v} for k, v in sorted(have.items())]
                log(f"{session_label} {why}: nothing sent")
                return result

            if have == expected:
                return unchanged("already_archived", f"is already archived in {project} with the same files")
            if policy == "skip":
                return unchanged("skipped_existing", f"exists in {project} with other content; policy 'skip'")
            if policy == "fail":
                raise XnatError(
                    f"session {session_label} already exists in XNAT project {project} with different content "
                    f"({sum(have.values())} files in {len(have)} scans, this visit has {len(files)} files in "
                    f"{len(expected)} scans); set xnat_duplicate_policy to 'append' or 'skip', or remove it in XNAT")
            overwrite = "append"
            result.status = "appended"
        zpath = temp_zip_path(workdir)
        try:
            result.bytes_sent = write_zip(files, zpath)
            try:
                session.services.import_(zpath, project=project, subject=subject, experiment=session_label,
                                         import_handler="DICOM-zip", overwrite=overwrite, destination="/archive",
                                         # xnatpy sends uploads with no timeout unless given one: a
                                         # hanging XNAT would hold the run (and a pool slot) forever
                                         timeout=getattr(session, "request_timeout", None),
                                         content_type="application/zip", ignore_unparsable=True,
                                         direct_archive=True)
            except Exception:
                removed = remove_prearchive_leftovers(session, project, session_label)
                if removed:
                    log(f"removed {removed} prearchive leftover(s) of {session_label}")
                raise
        finally:
            zpath.unlink(missing_ok=True)
        result.files_sent = len(files)
        exp = find_experiment(session, project, subject, session_label)
        if exp is None:
            raise XnatError(f"XNAT accepted the upload but session {session_label} is not in project {project}")
        result.session_uri = exp.uri
        if metadata_files:
            attach_files(exp, "METADATA", metadata_files)
        session.clearcache()
        exp = find_experiment(session, project, subject, session_label)
        result.scans = [{"scan": k, "files": v} for k, v in sorted(scan_counts(exp).items())]
        return result
    except XnatError:
        raise
    except Exception as exc:
        raise classify_error(exc, server) from None


def files_from_records(records, root: Path) -> list[UploadFile]:
    """Kept organize records (of a folder tree) as files to send."""
    return [UploadFile(root / r.source, f"{r.sop_instance_uid}.dcm", r.sop_instance_uid or "", r.series_number,
                       r.series_description) for r in records if r.decision == "kept"]


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
