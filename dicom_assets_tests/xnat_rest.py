"""What XNAT holds, read as a client reads it: XNAT's REST API (the URIs xnatpy calls, over plain
HTTP with the target's credentials: one reused connection, no xnatpy login and data-model
build per read), never the test server's state. Shared by the contract tests (test_xnat.py,
test_xnat_session_building.py); ``target`` is an :class:`~.xnat_target.XnatTarget`. Setting up
through REST what XNAT's REST API can set up (a project, its prearchive code, a subject, a scan
resource) is here too, so a test runs against a real XNAT as well."""

from __future__ import annotations

import io
from contextlib import contextmanager

import pydicom


class _Rest:
    """The few calls of an xnatpy session these helpers make, over one ``requests`` session with
    basic auth (XNAT's ``XnatSecureGuard`` takes it on every URI); an error status raises."""

    def __init__(self, target):
        import requests

        self.url, self.http = target.url, requests.Session()
        self.http.auth = (target.user, target.password)

    def _call(self, method: str, path: str, query: dict | None = None, **kw):
        r = self.http.request(method, self.url + path, params=query, timeout=120, **kw)
        r.raise_for_status()
        return r

    def get_json(self, path: str, query: dict | None = None):
        return self._call("GET", path, {"format": "json", **(query or {})}).json()

    def get(self, path: str, query: dict | None = None):
        return self._call("GET", path, query)

    def put(self, path: str, query: dict | None = None, data=None, headers=None):
        return self._call("PUT", path, query, data=data, headers=headers)

    def delete(self, path: str, query: dict | None = None):
        return self._call("DELETE", path, query)


@contextmanager
def _rest(target):
    rest = getattr(target, "_rest_session", None)
    if rest is None:
        rest = _Rest(target)
        try:
            target._rest_session = rest
        except AttributeError:  # a target that keeps no attributes: one per call
            pass
    yield rest


def experiment(target, project: str, label: str) -> dict | None:
    """The experiment row of ``label`` in ``project`` (labels are unique per project), or None."""
    with _rest(target) as s:
        rows = s.get_json(f"/data/projects/{project}/experiments")["ResultSet"]["Result"]
    return next((r for r in rows if r["label"] == label), None)


def rest_scans(target, project: str, label: str) -> tuple[dict, dict]:
    """Scan ID -> {resource label: file names}, and the experiment's row, as XNAT's REST API lists them."""
    exp = experiment(target, project, label)
    assert exp is not None, f"no session {label} in XNAT project {project}"
    out = {}
    with _rest(target) as s:
        for scan in s.get_json(f"/data/experiments/{exp['ID']}/scans")["ResultSet"]["Result"]:
            rows = s.get_json(f"/data/experiments/{exp['ID']}/scans/{scan['ID']}/files")["ResultSet"]["Result"]
            out[scan["ID"]] = {}
            for r in rows:
                out[scan["ID"]].setdefault(r["collection"], set()).add(r["Name"])
    return out, exp


def file_count(scans) -> int:
    return sum(len(n) for v in scans.values() for n in v.values())


def dicom_counts(target, project: str, label: str) -> dict[str, int]:
    """Scan ID -> the number of files of its DICOM resource (what the importer filled)."""
    scans, _ = rest_scans(target, project, label)
    return {sid: len(res.get("DICOM", ())) for sid, res in scans.items()}


def dicom_names(target, project: str, label: str) -> set[str]:
    """Every file name of the session's DICOM resources."""
    scans, _ = rest_scans(target, project, label)
    return {n for res in scans.values() for n in res.get("DICOM", ())}


def scan_rows(target, project: str, label: str) -> list[dict]:
    """The session's scans as /data/experiments/<id>/scans lists them (ID, series_description, UID, ...)."""
    exp = experiment(target, project, label)
    assert exp is not None, f"no session {label} in XNAT project {project}"
    with _rest(target) as s:
        return s.get_json(f"/data/experiments/{exp['ID']}/scans")["ResultSet"]["Result"]


def series_descriptions(target, project: str, label: str) -> dict[str, str]:
    return {r["ID"]: r.get("series_description") or "" for r in scan_rows(target, project, label)}


def first_dicom(target, project: str, label: str):
    """One file of the session's first scan, downloaded and read: real DICOM, as XNAT stores it."""
    exp = experiment(target, project, label)
    with _rest(target) as s:
        scan = s.get_json(f"/data/experiments/{exp['ID']}/scans")["ResultSet"]["Result"][0]
        rows = s.get_json(f"/data/experiments/{exp['ID']}/scans/{scan['ID']}/resources/DICOM/files")
        uri = sorted(r["URI"] for r in rows["ResultSet"]["Result"])[0]
        data = s.get(uri).content
    return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)


def _resources(target, base: str) -> dict[str, set[str]]:
    """The resources under ``base`` (a session's or a project's URI): label -> file names."""
    with _rest(target) as s:
        out = {}
        for r in s.get_json(f"{base}/resources")["ResultSet"]["Result"]:
            files = s.get_json(f"{base}/resources/{r['label']}/files")["ResultSet"]["Result"]
            out[r["label"]] = {f["Name"] for f in files}
    return out


def experiment_resources(target, project: str, label: str) -> dict[str, set[str]]:
    """The session's own resources (not its scans'): label -> file names."""
    return _resources(target, f"/data/experiments/{experiment(target, project, label)['ID']}")


def project_resources(target, project: str) -> dict[str, set[str]]:
    return _resources(target, f"/data/projects/{project}")


def subject_labels(target, project: str) -> list[str]:
    with _rest(target) as s:
        return [r["label"] for r in s.get_json(f"/data/projects/{project}/subjects")["ResultSet"]["Result"]]


def experiment_labels(target, project: str, subject: str | None = None) -> list[str]:
    """The session labels of the project (of one subject when ``subject`` is given)."""
    with _rest(target) as s:
        rows = s.get_json(f"/data/projects/{project}/experiments")["ResultSet"]["Result"]
    return [r["label"] for r in rows if subject is None or r.get("subject_label") == subject]


def project_ids(target) -> set[str]:
    """The projects the user sees (/data/projects)."""
    with _rest(target) as s:
        return {r["ID"] for r in s.get_json("/data/projects")["ResultSet"]["Result"]}


def prearchive_rows(target, project: str) -> list[dict]:
    with _rest(target) as s:
        return s.get_json(f"/data/prearchive/projects/{project}")["ResultSet"]["Result"]


def create_project(target, name: str, prearchive_code: int | None = None) -> str:
    """A project created over REST (PUT /data/projects/<id>; the user becomes its owner), with
    its prearchive code set (PUT .../prearchive_code/<n>) when given; its ID."""
    pid = target.project(name)
    with _rest(target) as s:
        s.put(f"/data/projects/{pid}")
        if prearchive_code is not None:
            s.put(f"/data/projects/{pid}/prearchive_code/{prearchive_code}")
    return pid


def scan_resource_upload(target, exp_id: str, scan_id: str, label: str, files: dict[str, bytes]) -> None:
    """A resource a pipeline adds to a scan (SNAPSHOTS, NIFTI), uploaded as xnatpy uploads files."""
    with _rest(target) as s:
        s.put(f"/data/experiments/{exp_id}/scans/{scan_id}/resources/{label}")
        for name, data in files.items():
            s.put(f"/data/experiments/{exp_id}/scans/{scan_id}/resources/{label}/files/{name}", data=data,
                  headers={"Content-Type": "application/octet-stream"})


def delete_scan_file(target, exp_id: str, scan_id: str, name: str, resource: str = "DICOM") -> None:
    """Someone deletes a file of a scan on XNAT."""
    with _rest(target) as s:
        s.delete(f"/data/experiments/{exp_id}/scans/{scan_id}/resources/{resource}/files/{name}")


def imports(target, project: str | None = None) -> int | None:
    """How many import requests reached XNAT (for ``project`` when given): the test server's
    count; not observable on a real XNAT (None), where tests read the session instead."""
    if target.real:
        return None
    return sum(1 for q in target.server.import_queries if project is None or q.get("project") == project)


def said(response) -> str:
    """What XNAT said in an answer: the status text of an error page (Restlet's status page holds
    it in ``<h3>``: XNAT's resources set a status with a description and no entity), else the
    text itself. The tests' own reading, not the client's."""
    import html
    import re

    text = response.text
    m = re.search(r"<h3>(.*?)</h3>", text, re.S)
    if "text/html" in response.headers.get("Content-Type", "") and m:
        return html.unescape(m.group(1))
    return text


def call(target, method: str, path: str, **kw):
    """One request as XNAT answers it, error pages included (xnatpy refuses an HTML body even
    under an accepted status, and XNAT answers errors with Restlet's HTML status page)."""
    import requests

    return requests.request(method, target.url + path, auth=(target.user, target.password), timeout=120, **kw)
