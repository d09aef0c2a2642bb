"""The XNAT test server's HTTP API: a routing table (:data:`ROUTES`: method, path regex, handler)
and the handlers, each following the restlet resource of XNAT it names."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qs, unquote

from .state import (
    LOCKED,
    MAX_STRING,
    PREARCHIVE_CODES,
    ROLE_ACTIONS,
    VALID_ID,
    VERSION,
    Experiment,
    PrearchiveEntry,
    Project,
    Scan,
    Subject,
    _HttpError,
    _item,
    _now,
    _result_set,
)

_ROW_STATUS_IN_TABLE = {"_ARCHIVING": "ARCHIVING"}


def _file_rows(base: str, label: str, files: dict[str, str]) -> list[dict]:
    """FileList rows of one scan resource (``collection`` is the resource label)."""
    return [{"Name": n, "Size": str(Path(p).stat().st_size), "collection": label,
             "URI": f"{base}/resources/{label}/files/{n}"} for n, p in sorted(files.items())]


def _prearchive_key(src: str) -> str:
    """The row key (``<project>/<timestamp>/<name>``) of a prearchive URI as a ``src`` names it."""
    return src.replace("/data/prearchive/projects/", "").replace("/prearchive/projects/", "").strip("/")



def _project_conflicts(projects, pid: str, name: str | None, secondary_id: str | None) -> list[str]:
    """BaseXnatProjectdata.validateProjectFields / validateElements (xnat-data-models; read in
    danielmarcus/xnat-monorepo): the new project's ID, title and running title, lower-cased and
    XML-escaped (TurbineUtils.escapeParam), may not equal the ID, running title, title or an alias
    of any *other* project (``LOWER(id) != <id>``), whoever may see it: the query runs over every
    project, private ones included. One message per element taken."""
    elements = {"Project Id": pid, "Project Title": name, "Running Title": secondary_id}
    taken = set().union(*(p.taken_names() for p in projects if p.id.lower() != pid.lower()))
    return [f"Invalid {what}: '{_escape_xml11(value.lower())}' is already being used."
            for what, value in elements.items() if value and _escape_xml11(value.lower()) in taken]


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



# ------------------------------------------------------------------ the routing table
@dataclass(frozen=True)
class Route:
    """One row of the table: the methods it answers (None: any), the path as a regular
    expression (matched whole, after ``/data/archive/`` is read as ``/data/``, as XNATApplication
    attaches every archive URI under both), the handler ``fn(handler, match, method, query, body)``,
    whether it needs no login, and whether it reads the archive under the server's lock."""

    methods: frozenset | None
    pattern: re.Pattern
    fn: Callable
    public: bool = False
    locked: bool = False


def _r(methods, pattern, fn, public=False, locked=False) -> Route:
    return Route(frozenset(methods.split()) if methods else None, re.compile(pattern), fn, public, locked)


def _rest(m: re.Match, group: int) -> list[str]:
    """The path segments a route's last group caught (none: [])."""
    tail = m.group(group)
    return tail.strip("/").split("/") if tail else []


class Routes:
    """The handlers of the HTTP front end (mixed into the request handler): each answers one
    row of :data:`ROUTES`."""

    xnat: object
    user: str | None

    def _route(self, method: str, path: str, q: dict, body: bytes) -> None:
        if path.startswith("/data/archive/"):
            path = "/data/" + path[len("/data/archive/"):]
        for route in ROUTES:
            m = route.pattern.fullmatch(path)
            if m is None or (route.methods is not None and method not in route.methods):
                continue
            if not route.public:
                self._login()
            if route.locked:
                with self.xnat.lock:
                    return route.fn(self, m, method, q, body)
            return route.fn(self, m, method, q, body)
        self._login()
        raise _HttpError(404, f"Not found: {path}")

    def _login(self) -> None:
        """XnatSecureGuard: every URI but the login needs a user (JSESSION cookie or basic auth)."""
        user = self._user()
        if user is None:
            raise _HttpError(401, "<html><h3>Login attempt failed. Please try again.</h3></html>", page=False)
        self.user = user

    # ------------------------------------------------------------------ login, site
    def _auth(self, m, method, q, body) -> None:
        x = self.xnat
        form = {k: v[-1] for k, v in parse_qs(body.decode()).items()}
        if x.users.get(form.get("username")) != form.get("password"):
            raise _HttpError(401, "<html><h3>Login attempt failed. Please try again.</h3></html>", page=False)
        token = secrets.token_hex(16).upper()
        x.tokens[token] = form["username"]
        self._send(200, token, headers={"Set-Cookie": f"JSESSIONID={token}; Path=/; HttpOnly"})

    def _jsession(self, m, method, q, body) -> None:
        cookie = re.search(r"JSESSIONID=([^;\s]+)", self.headers.get("Cookie", ""))
        if method == "DELETE":
            if cookie:
                self.xnat.tokens.pop(cookie.group(1), None)
            return self._send(200, "")
        return self._send(200, cookie.group(1) if cookie else "")

    def _schema(self, m, method, q, body) -> None:
        f = self.xnat.schemas_dir / f"{m.group(1)}.xml"
        if not f.exists():
            raise _HttpError(404, "no such schema")
        return self._send(200, f.read_bytes(), "application/xml")

    def _search_element(self, m, method, q, body) -> None:
        return self._send(200, _result_set([
            {"FIELD_ID": f, "HEADER": f.title(), "SUMMARY": f, "TYPE": "string", "REQUIRES_VALUE": "false",
             "DESC": f, "ELEMENT_NAME": m.group(1)} for f in ("ID", "LABEL", "PROJECT", "DATE")]))

    def _search_elements(self, m, method, q, body) -> None:
        return self._send(200, _result_set([
            {"ELEMENT_NAME": "xnat:projectData", "COUNT": str(len(self.xnat.projects))},
            {"ELEMENT_NAME": "xnat:subjectData", "COUNT": "0"},
            {"ELEMENT_NAME": "xnat:mrSessionData", "COUNT": "0"},
        ]))

    # ------------------------------------------------------------------ projects / subjects / experiments
    def _project_list(self, m, method, q, body) -> None:
        if "permissions" in q:
            return self._projects_allowing(q)
        # ProjectListResource.DefaultProjectHandler: the projects the user may read
        # (Permissions.getAllowedValues on xnat:projectData/ID): protected and public ones too
        return self._send(200, _result_set([
            {"ID": p.id, "secondary_ID": p.secondary_id or p.id, "name": p.name, "description": "", "pi_firstname": "",
             "pi_lastname": "", "URI": f"/data/projects/{p.id}", "xsiType": "xnat:projectData"}
            for p in self.xnat.projects.values() if p.readable_by(self.user)]))

    def _project_resources(self, m, method, q, body) -> None:
        # DefaultCatalogService.insertProjectResourceCatalog saves the project itself
        # (SaveItemHelper.authorizedSave): editing a project is for its owners only
        pid = m.group(1)
        p = self._project(pid, "owner" if method in ("PUT", "POST", "DELETE") else None,
                          f"Unauthorized attempt to add a file to /projects/{pid}")
        return self._resources(method, p.resources, _rest(m, 2), self.xnat.storage / p.id / "RESOURCES",
                               f"/data/projects/{p.id}", body)

    def _project_experiments(self, m, method, q, body) -> None:
        p = self._project(m.group(1))
        visible = p.data_readable_by(self.user)
        return self._send(200, _result_set([self._exp_row(e) for s in p.subjects.values()
                                            for e in s.experiments.values() if visible]))

    def _project_experiment(self, m, method, q, body) -> None:
        p = self._project(m.group(1))
        eid = m.group(2)
        exp = p.experiment(eid) or next((e for s in p.subjects.values() for e in s.experiments.values()
                                         if e.id == eid), None)
        if exp is None or not p.data_readable_by(self.user):
            raise _HttpError(404, f"Experiment {eid} not found")
        return self._experiment(method, exp, _rest(m, 3), q, body)

    def _project_subjects(self, m, method, q, body) -> None:
        p = self._project(m.group(1))
        # ProjectSubjectList: XFT's security filter hides others' subjects
        return self._send(200, _result_set([
            {"ID": s.id, "label": s.label, "project": p.id, "insert_date": "",
             "URI": f"/data/subjects/{s.id}", "xsiType": "xnat:subjectData"}
            for s in p.subjects.values() if p.data_readable_by(self.user)]))

    def _project_subject(self, m, method, q, body) -> None:
        p = self._project(m.group(1))
        sid = m.group(2)
        subj = p.subjects.get(sid) or next((s for s in p.subjects.values() if s.id == sid), None)
        return self._subject_answer(subj if p.data_readable_by(self.user) else None, sid, _rest(m, 3), method, q, body)

    def _subject_by_id(self, m, method, q, body) -> None:
        subj = self.xnat.find_subject(m.group(1))
        if subj is not None and not self.xnat.projects[subj.project].data_readable_by(self.user):
            subj = None
        return self._subject_answer(subj, m.group(1), _rest(m, 2), method, q, body)

    def _subject_answer(self, subj: Subject | None, asked: str, rest: list[str], method, q, body) -> None:
        """A subject the user may read (else 404), or what its experiments' URIs below it answer.
        DELETE as SubjectResource.handleDelete does it (SecureResource.deleteItem,
        XnatSubjectdata.delete): 404 "Unable to find the specified subject." when not found;
        deleting needs the delete right on the project's data (owners: ROLE_ACTIONS; a member
        is refused, 403); the subject goes with its sessions."""
        if subj is None:
            if method == "DELETE":
                raise _HttpError(404, "Unable to find the specified subject.")
            raise _HttpError(404, f"Subject {asked} not found")
        if not rest and method == "DELETE":
            if self.xnat.role(subj.project, self.user) not in ROLE_ACTIONS["delete"]:
                raise _HttpError(403, f"User {self.user} may not delete subject {subj.label}")
            p = self.xnat.projects[subj.project]
            for e in list(subj.experiments.values()):
                self.xnat.open_workflows.pop(e.id, None)
            p.subjects.pop(subj.label, None)
            return self._send(200, "")
        if not rest:
            return self._send(200, self._subject_item(subj))
        return self._experiments(method, subj, rest, q, body)

    def _experiment_by_id(self, m, method, q, body) -> None:
        x = self.xnat
        exp = x.find_experiment(m.group(1))
        if exp is None or not x.projects[exp.project].data_readable_by(self.user):
            raise _HttpError(404, f"Experiment {m.group(1)} not found")
        return self._experiment(method, exp, _rest(m, 2), q, body)

    def _all_experiments(self, m, method, q, body) -> None:
        rows = []
        for p in self.xnat.projects.values():
            if p.data_readable_by(self.user):
                rows += [self._exp_row(e) for s in p.subjects.values() for e in s.experiments.values()]
        return self._send(200, _result_set(rows))


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
                if pid in x.deleted_projects:  # a new item: xnat_projectdata_history counts the ID
                    raise _HttpError(403, f"Project '{pid}' was used in a previously deleted project and cannot be "
                                          "reused.")
                conflicts = _project_conflicts(x.projects.values(), pid, q.get("name"), q.get("secondary_ID"))
                if conflicts:  # XnatProjectdata.validateProjectFields
                    raise _HttpError(409, "Requested new project conflicts with existing projects: "
                                          + ", ".join(conflicts))
                # BaseXnatProjectdata.createProject: accessibility defaults to "protected"
                accessibility = q.get("accessibility") or "protected"
                # BaseXnatProjectdata.initArcProjectImpl: the site's defaultPrearchiveCode (4)
                x.add_project(pid, owner=self.user, accessibility=accessibility, name=q.get("name"),
                              secondary_id=q.get("secondary_ID") or "")
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
            x.deleted_projects.add(pid)  # its row stays in xnat_projectdata_history
            return self._send(200, "")
        if not visible:
            raise _HttpError(404, "Unable to find the specified experiment.")
        return self._send(200, _item("xnat:projectData", {"ID": p.id, "secondary_ID": p.secondary_id or p.id,
                                                           "name": p.name}))

    def _config(self, pid: str | None, tool: str, cpath: str, q: dict) -> None:
        """GET /data[/projects/<id>]/config/<tool>/<path> as ConfigResource.represent answers it
        (xnat-web, restlet/resources): a project the user may not read is 404 "The requested
        project <id> does not exist."; one whose data the user may not read
        (``Permissions.canRead(user, "xnat:subjectData/project", id)``) 403; a site-wide
        configuration needs no right. The configuration comes as a table (tool, path, project,
        user, create_date, reason, contents, unversioned, version, status); ``contents=true`` gives
        the contents alone, 404 when disabled. Kept here: the series import filters (tool
        ``seriesImportFilter``, path ``config``: DicomFilterService) and the anonymization scripts
        (tool ``anon``: path ``script`` site-wide; a project's is stored under ``/projects/<id>``,
        which ConfigResource.fixAnonPath finds for the URI path ``projects/<id>``); anything else
        is "Couldn't find config ..." (404)."""
        x = self.xnat
        with x.lock:
            if pid is not None:
                p = x.projects.get(pid)
                if p is None or not p.readable_by(self.user):
                    raise _HttpError(404, f"The requested project {pid} does not exist.")
                if not p.data_readable_by(self.user):
                    raise _HttpError(403, f"User {self.user} can not access project {pid}")
            found = self._stored_config(pid, tool, cpath)
            if found is None:
                raise _HttpError(404, f"Couldn't find config for user {self.user} and project {pid} on tool [{tool}] "
                                      f"path [{cpath}]")
            path, contents, enabled = found
            if q.get("contents", "").lower() == "true" and q.get("meta", "").lower() != "true":
                if not enabled:
                    raise _HttpError(404, f"Config not found for user {self.user} and project {pid} on tool [{tool}] "
                                          f"path [{cpath}]")
                return self._send(200, contents)
            return self._send(200, _result_set([{
                "tool": tool, "path": path, "project": pid, "user": "admin", "create_date": _now(),
                "reason": "", "contents": contents, "unversioned": "false", "version": "1",
                "status": "enabled" if enabled else "disabled"}]))

    def _stored_config(self, pid: str | None, tool: str, cpath: str) -> tuple[str, str, bool] | None:
        """(stored path, contents, enabled) of a configuration this server keeps, or None."""
        x = self.xnat
        if (tool, cpath) == ("seriesImportFilter", "config"):
            f = x.series_filters.get(pid or "")
            return (cpath, f.contents(), f.enabled) if f is not None else None
        if tool == "anon" and cpath == ("script" if pid is None else f"projects/{pid}"):
            cfg = x.anon_scripts.get(pid or "")
            path = "script" if pid is None else f"/projects/{pid}"
            return (path, cfg.contents, cfg.enabled) if cfg is not None else None
        return None

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
                "xsiType": e.xsi_type, "URI": f"/data/experiments/{e.id}", "insert_date": ""}

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
            return self._send(200, _item(exp.xsi_type, {
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
                {"Name": n.rsplit("/", 1)[-1], "Size": str(Path(p).stat().st_size),
                 "URI": f"{uri}/resources/{label}/files/{n}"}
                for n, p in sorted(files.items())]))
        if len(rest) >= 4 and rest[2] == "files":
            # FileList (xnat-web restlet/resources/files) takes the rest of the URL as the file's
            # path in the resource: a file may sit in sub-folders (annotations/<series>/<name>)
            name = "/".join(rest[3:])
            if any(part in ("", ".", "..") for part in rest[3:]):
                raise _HttpError(400, f"Invalid file path {name}")
            if method in ("PUT", "POST"):
                (folder / label / name).parent.mkdir(parents=True, exist_ok=True)
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


def _not_found(h, m, method, q, body):
    raise _HttpError(404, "Not found")


# XNATApplication (xnat-web restlet) attaches each URI to its resource class; the rows below are
# the URIs xnatpy and the client call, in the order they are tried (the first match answers).
_P = r"/data/projects/([^/]+)"
ROUTES: list[Route] = [
    _r("PUT POST", r"/data/services/auth", Routes._auth, public=True),
    _r(None, r"/", lambda h, m, method, q, body: h._send(200, "<html>XNAT test server</html>", "text/html"),
       public=True),
    _r(None, r"/data/auth", lambda h, m, method, q, body: h._send(200, f"User '{h.user}' is logged in")),
    _r(None, r"/data/JSESSION", Routes._jsession),
    _r(None, r"/data/version", _not_found),  # XNAT 1.8 answers 404 here; xnatpy then asks buildInfo
    _r(None, r"/xapi/siteConfig/buildInfo",
       lambda h, m, method, q, body: h._send(200, {"version": VERSION, "buildNumber": "test", "commit": "test"})),
    _r(None, r"/xapi/schemas", lambda h, m, method, q, body: h._send(200, ["xnat", "xdat"])),
    _r(None, r"/xapi/schemas/(\w+)(?:/\w+\.xsd)?", Routes._schema),
    _r(None, r"/data/search/elements/([^/]+)", Routes._search_element),
    _r(None, r"/data/search/elements", Routes._search_elements),
    _r("POST", r"/data/services/import", lambda h, m, method, q, body: h._import(q, body)),
    _r("POST", r"/data/services/archive", lambda h, m, method, q, body: h._archive_prearchive(q, body)),
    _r("POST", r"/data/services/prearchive/delete", lambda h, m, method, q, body: h._batch_delete(q, body)),
    _r(None, r"/data/prearchive(?:/.*)?", lambda h, m, method, q, body: h._prearchive(method, m.group(0))),
    _r("GET", r"/data(?:/projects/([^/]+))?/config/([^/]+)/(.+)",
       lambda h, m, method, q, body: h._config(m.group(1), m.group(2), m.group(3), q)),
    _r(None, r"/data/projects", Routes._project_list, locked=True),
    _r(None, _P, lambda h, m, method, q, body: h._project_item(method, m.group(1), q), locked=True),
    _r(None, _P + r"/prearchive_code(?:/([^/]+))?",
       lambda h, m, method, q, body: h._prearchive_code(method, m.group(1), [m.group(2)] if m.group(2) else []),
       locked=True),
    _r(None, _P + r"/(resources(?:/.*)?)", Routes._project_resources, locked=True),
    _r(None, _P + r"/experiments", Routes._project_experiments, locked=True),
    _r(None, _P + r"/experiments/([^/]+)(/.*)?", Routes._project_experiment, locked=True),
    _r("PUT", _P + r"/subjects/([^/]+)", lambda h, m, method, q, body: h._put_subject(m.group(1), m.group(2)),
       locked=True),
    _r(None, _P + r"/subjects", Routes._project_subjects, locked=True),
    _r(None, _P + r"/subjects/([^/]+)(/.*)?", Routes._project_subject, locked=True),
    _r(None, r"/data/subjects/([^/]+)(/.*)?", Routes._subject_by_id, locked=True),
    _r(None, r"/data/experiments/([^/]+)(/.*)?", Routes._experiment_by_id, locked=True),
    _r(None, r"/data/experiments", Routes._all_experiments, locked=True),
]
