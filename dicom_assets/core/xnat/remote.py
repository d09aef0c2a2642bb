"""What the client reads of XNAT and asks of it outside the import: projects, sessions, the
files of their scans, resources."""

from __future__ import annotations

from pathlib import Path

from .errors import XnatAuthError, XnatError, classify_error, http_status, response_text
from .labels import PROJECT_ID


def ensure_project(session, project: str) -> bool:
    """Create the project when the user cannot see it; True when it was created. Raises
    :class:`XnatError` (before any upload) when XNAT would refuse this user's data there.

    What XNAT does (xnat-web, read in the ``NrgXnat/xnat`` monorepo): the project listing
    (``ProjectListResource``) and every project URI find a project through
    ``DefaultUserProjectCache.get``, which hides a *private* project from non-members;
    *protected* (the default of ``BaseXnatProjectdata.createProject``) and *public* projects are
    listed to every user, but only owners and members may add data. A PUT of a project the user
    cannot see is a creation (``ProjectResource.handlePut``): 417 for an ID outside
    ``[A-Za-z0-9_-]``, 403 when only admins may create projects, 403 again when the ID
    belongs to a private project of others or to a deleted project (``xnat_projectdata_history``),
    409 when another project already holds the ID as its ID, title, running title or alias
    (``BaseXnatProjectdata.validateProjectFields``)."""
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
        _refused_project(project, exc)
    session.clearcache()
    return True


def _refused_project(project: str, exc: Exception) -> None:
    """Why XNAT refused to create ``project`` (ProjectResource.handlePut), named; any other
    failure is raised on as it came."""
    status, text = http_status(exc), response_text(exc)
    if status == 403 and "previously deleted project" in text:
        raise XnatError(
            f"XNAT project {project} cannot be created: XNAT refused the ID because a project of that ID was deleted "
            f"(403: {text}); XNAT keeps deleted projects' IDs (xnat_projectdata_history) and never gives them "
            "again: set xnat_project to another ID, or ask an XNAT admin") from None
    if status == 409:
        raise XnatError(
            f"XNAT project {project} cannot be created: its ID is already used by another project as its ID, title, "
            f"running title or alias (409: {text or 'XNAT gave no details'}); XNAT keeps these unique across "
            "projects, case-insensitively, private projects this user cannot see included: set xnat_project to "
            "another ID, or ask an XNAT admin which project holds it") from None
    if status == 403:
        raise XnatAuthError(
            f"XNAT project {project} is not visible to this user and XNAT refused to create it (403"
            + (f": {text}" if text else "") + "): either it exists as a private project the user is not a member "
            "of (ask its owner to add the user), or the user may not create projects (ask an XNAT admin to "
            "create it)") from None
    raise exc


def _may_add_data(session, project: str) -> bool:
    """Whether XNAT lets this user create subjects in ``project``: ``/data/projects?permissions=
    create&dataType=xnat:subjectData`` (``ProjectListResource.PermissionsProjectHandler``; its
    table's columns are ``id`` and ``secondary_id``). An XNAT that does not answer that query
    is not second-guessed: the upload itself says what it refuses."""
    try:
        rows = session.get_json("/data/projects", query={"permissions": "create", "dataType": "xnat:subjectData"}
                                )["ResultSet"]["Result"]
    except Exception as exc:
        if http_status(exc) in (400, 404, 500):
            return True
        raise
    return any(str(v) == project for r in rows for k, v in r.items() if k.lower() == "id")


def rows(session, uri: str) -> list[dict]:
    return session.get_json(uri)["ResultSet"]["Result"]


def find_session(session, project: str, label: str) -> dict | None:
    """The experiment labelled ``label`` in ``project`` (whatever its subject), with its
    subject's label and StudyInstanceUID, or None."""
    row = next((r for r in rows(session, f"/data/projects/{project}/experiments") if r.get("label") == label), None)
    if row is None:
        return None
    subjects = {s["ID"]: s["label"] for s in rows(session, f"/data/projects/{project}/subjects")}
    fields = session.get_json(f"/data/experiments/{row['ID']}")["items"][0]["data_fields"]
    return {"id": row["ID"], "label": label, "uri": f"/data/projects/{project}/experiments/{row['ID']}",
            "subject": subjects.get(fields.get("subject_ID") or row.get("subject_ID"), ""),
            "uid": fields.get("UID") or ""}


def find_subject(session, project: str, label: str) -> dict | None:
    """The subject row of ``label`` in ``project``, matched case-insensitively as XNAT's archiver
    matches it (XnatSubjectdata.GetSubjectByProjectIdentifierCaseInsensitive), or None."""
    return next((s for s in rows(session, f"/data/projects/{project}/subjects")
                 if str(s.get("label") or "").lower() == label.lower()), None)


def remove_empty_subject(session, project: str, label: str, busy_statuses: tuple[str, ...]) -> str:
    """After XNAT refused an archive: the subject ``label``, which did not exist before this
    upload, is removed when it is empty, and what was done is said (for the error's message).
    XNAT creates the subject before it checks for conflicts (PrearcSessionArchiver.call:
    fixSubject -> getOrCreateSubject saves it, then checkForConflicts refuses), so a refused
    upload leaves an empty subject. It is left when it holds a session, or when a prearchive row
    of the project names it in ``busy_statuses`` (another upload archiving into it right now)."""
    subj = find_subject(session, project, label)
    if subj is None:
        return ""
    if rows(session, f"/data/projects/{project}/subjects/{subj['ID']}/experiments"):
        return ""  # another upload filed a session under it meanwhile: it is that upload's now
    others = [r for r in rows(session, f"/data/prearchive/projects/{project}")
              if str(r.get("subject") or "").lower() == label.lower() and r.get("status") in busy_statuses]
    made = (f"XNAT had created subject {label} in project {project} for this upload before it refused the archive "
            "(PrearcSessionArchiver.fixSubject runs before checkForConflicts)")
    if others:
        return (f"{made}; the client left it, empty, because another upload is archiving into it "
                f"({others[0].get('status')})")
    try:
        session.delete(f"/data/projects/{project}/subjects/{subj['ID']}")
    except Exception as exc:  # the refusal is the error to report; this is said in it
        status = http_status(exc)
        return (f"{made}; the client could not remove it ({status or type(exc).__name__}"
                f"{': ' + response_text(exc) if response_text(exc) else ''}), so project {project} now holds an "
                f"empty subject {label}: remove it in XNAT (deleting a subject needs the project owner role), or "
                "leave it: a re-run files the visit under it")
    return f"{made}; the client removed that empty subject, so a re-run starts from what XNAT held before"


#: the scan resources XNAT's importer fills (CatalogBuilder: primary imaging SOP classes in
#: ``DICOM``, the rest in ``secondary`` under separateSecondaryDicomOnArchive, the default)
IMPORTED_RESOURCES = ("DICOM", "secondary")


def dicom_names(session, exp_id: str) -> dict[str, set[str]]:
    """Scan id -> names of the files in the scan's ``DICOM`` and ``secondary`` resources, the
    ones XNAT's importer writes (SNAPSHOTS, NIFTI and other resources of pipelines are ignored)."""
    out: dict[str, set[str]] = {}
    for scan in rows(session, f"/data/experiments/{exp_id}/scans"):
        sid = str(scan["ID"])
        out[sid] = {r["Name"] for r in rows(session, f"/data/experiments/{exp_id}/scans/{sid}/files")
                    if r.get("collection") in IMPORTED_RESOURCES}
    return out


def scan_counts(session, exp_id: str) -> dict[str, int]:
    return {sid: len(names) for sid, names in dicom_names(session, exp_id).items() if names}


def held_names(have: dict[str, set[str]]) -> set[str]:
    """Every instance name the session's scans hold (``have``: scan ID -> names)."""
    return set().union(*have.values()) if have else set()


def session_names(session, exp: dict | None) -> set[str]:
    """The instance names an experiment (``find_session``'s answer) holds, none when there is none."""
    return held_names(dicom_names(session, exp["id"])) if exp else set()


def missing_names(want: set[str], have: dict[str, set[str]]) -> set[str]:
    """The wanted names the session holds in none of its scans."""
    return set(want) - held_names(have)


def foreign_names(want: set[str], have: dict[str, set[str]]) -> set[str]:
    """The names the session holds that the visit does not have."""
    return held_names(have) - set(want)


def attach_files(owner, label: str, paths: list[Path] | list[tuple[Path, str]]) -> None:
    """Upload files into a resource folder of a project or an experiment (created when missing):
    each under its own name, or (file, path in the resource) for a file in a sub-folder (XNAT's
    FileList takes the rest of the URL as the path)."""
    resource = owner.resources.get(label) if label in owner.resources else owner.create_resource(label)
    for f in paths:
        src, name = f if isinstance(f, tuple) else (f, Path(f).name)
        resource.upload(str(src), name, overwrite=True)


def attach_project_files(session, server, project, project_files, result, log) -> None:
    for label, paths in project_files.items():
        try:
            attach_files(session.projects[project], label, paths)
        except Exception as exc:
            why = classify_error(exc, server)
            msg = (f"project resource {label} of {project} not attached ({why}); the session is uploaded. "
                   "Project resources need the project owner role in XNAT")
            result.warnings.append(msg)
            log(msg)

