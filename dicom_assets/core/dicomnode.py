"""A DICOM node (Orthanc) as a source of visits: its REST API, the study -> visit mapping and the
atomic, counted fetch of a study into ``downloads/dicom_node/<visit>/``.

What this follows in Orthanc (1.10, the Debian package; its REST API reference and
``OrthancServer/Sources/OrthancRestApi/``):

* ``GET /changes?since=&limit=`` (``OrthancRestApi::GetChanges``): the change log, a monotonic
  ``Seq`` per change, ``Last`` the highest returned, ``Done`` when nothing is left. A study
  becomes ``StableStudy`` ``StableAge`` seconds after its last instance arrived
  (``ServerContext``'s unstable-resources monitor); a later instance makes it unstable again,
  and it is logged ``StableStudy`` again.
* ``GET /studies/{id}``: ``MainDicomTags`` (StudyInstanceUID, StudyDate, StudyTime,
  StudyDescription, AccessionNumber, ...) and ``PatientMainDicomTags`` (PatientID, ...).
* ``POST /tools/find`` (``Level`` ``Instance``/``Study``, ``Query``): the instance IDs of a study,
  a participant's studies. Orthanc's IDs are SHA-1 of the DICOM UIDs, so the same instance has
  the same ID on every node and after every re-push.
* ``GET /studies/{id}/archive``: the study as one ZIP, one entry per stored instance.
* ``/modalities/{name}/query``, ``/queries/{id}/answers``, ``/queries/{id}/retrieve``: C-FIND
  and C-MOVE as a peer of a PACS (``OrthancRestModalities``).

Nothing here reads the environment or knows Dagster: the URL and credentials are given.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DicomAssetsError
from .fsutil import atomic_write, printable
from .ids import Visit, VisitKeyError, normalize_participant_id, normalize_session_id
from .layout import DatasetLayout

#: the rule kinds of ``dicom_node.session_rule`` in global_config.json
RULE_KINDS = ("attribute", "order", "table")


class DicomNodeError(DicomAssetsError):
    """The DICOM node cannot be reached, refuses the credentials, or answers what cannot be used.
    ``transient``: worth retrying (the node is down or busy, a fetch was cut off)."""

    def __init__(self, message: str, *, transient: bool = False):
        super().__init__(message)
        self.transient = transient


class StudyChangedError(DicomNodeError):
    """Instances arrived (or went) while the study was being fetched: fetched again later."""

    def __init__(self, message: str):
        super().__init__(message, transient=True)


# --------------------------------------------------------------------------- the REST client
class OrthancClient:
    """Orthanc's REST API, with the errors a site can act on (down, wrong credentials, gone)."""

    def __init__(self, url: str, user: str | None = None, password: str | None = None, *, timeout: float = 30):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._auth = (user, password or "") if user else None
        self._local = threading.local()  # one HTTP session (kept-alive connection) per thread

    @property
    def _http(self):
        import requests

        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
            session.auth = self._auth
        return session

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, *, stream: bool = False, timeout: float | None = None, **kw):
        import requests

        try:
            resp = self._http.request(method, self.url + path, timeout=timeout or self.timeout, stream=stream, **kw)
        except requests.ConnectionError as exc:
            raise DicomNodeError(f"DICOM node {self.url} unreachable ({type(exc).__name__}); is Orthanc running?",
                                 transient=True) from None
        except requests.Timeout:
            raise DicomNodeError(f"DICOM node {self.url}: no answer to {method} {path} within "
                                 f"{timeout or self.timeout:g} s", transient=True) from None
        except requests.RequestException as exc:  # a body cut short (ChunkedEncodingError), a broken answer
            raise DicomNodeError(f"DICOM node {self.url}: {method} {path}: the answer was cut off "
                                 f"({type(exc).__name__}); nothing of it was kept", transient=True) from None
        if resp.status_code == 401:
            resp.close()
            raise DicomNodeError(f"DICOM node {self.url} refused the credentials (HTTP 401): check "
                                 "ORTHANC_USER and ORTHANC_PASSWORD")
        if resp.status_code >= 400:
            detail = _error_detail(resp)
            resp.close()
            raise DicomNodeError(f"DICOM node {self.url}: {method} {path}: HTTP {resp.status_code}"
                                 + (f": {detail}" if detail else ""),
                                 transient=resp.status_code >= 500 or resp.status_code == 429)
        return resp

    def get_json(self, path: str, **params):
        return _json(self._request("GET", path, params=params or None), path)

    def post_json(self, path: str, body, *, timeout: float | None = None):
        return _json(self._request("POST", path, data=json.dumps(body), timeout=timeout), path)

    # --- what the sensor and the fetch ask -----------------------------------------------------
    def system(self) -> dict:
        return self.get_json("/system")

    def changes(self, since: int, limit: int) -> dict:
        """One page of the change log after ``since``: ``Changes``, ``Last``, ``Done``."""
        return self.get_json("/changes", since=int(since), limit=int(limit))

    def last_seq(self) -> int:
        return int(self.get_json("/changes", last="").get("Last", 0))

    def study(self, study_id: str) -> StudyInfo | None:
        """A study's main tags, or None when Orthanc no longer has it (deleted since the change)."""
        try:
            data = self.get_json(f"/studies/{_safe_id(study_id)}")
        except DicomNodeError as exc:
            if "HTTP 404" in str(exc):
                return None
            raise
        return StudyInfo.from_orthanc(data)

    def instance_ids(self, study: StudyInfo) -> list[str]:
        """The IDs of the study's stored instances (one light find; no instance JSON)."""
        got = self.post_json("/tools/find", {"Level": "Instance", "Query": {"StudyInstanceUID": study.study_uid}})
        return sorted(str(i) for i in got)

    def first_instance_tags(self, study: StudyInfo) -> dict:
        """The simplified tags of one instance of the study (for a rule reading a tag that is not
        among the study's main tags, e.g. PatientComments)."""
        if not study.series:
            return {}
        instances = self.get_json(f"/series/{_safe_id(study.series[0])}").get("Instances") or []
        return self.get_json(f"/instances/{_safe_id(instances[0])}/simplified-tags") if instances else {}

    def studies_of(self, patient_id: str) -> list[StudyInfo]:
        found = self.post_json("/tools/find", {"Level": "Study", "Query": {"PatientID": patient_id}, "Expand": True})
        return [StudyInfo.from_orthanc(s) for s in found]

    def instance_file(self, instance_id: str) -> bytes:
        """One instance's DICOM file as Orthanc stored it (``/instances/{id}/file``); a body
        shorter than its Content-Length is a transient error, never a short file."""
        import requests

        resp = self._request("GET", f"/instances/{_safe_id(instance_id)}/file", timeout=max(self.timeout, 120))
        try:
            return resp.content
        except (requests.RequestException, ConnectionError) as exc:
            raise DicomNodeError(f"instance {instance_id}: the fetch from {self.url} was cut off "
                                 f"({type(exc).__name__})", transient=True) from None
        finally:
            resp.close()


def _safe_id(value: str) -> str:
    if not re.fullmatch(r"[0-9a-f-]{8,64}", str(value)):
        raise DicomNodeError(f"{value!r} is not an Orthanc resource ID")
    return str(value)


def _json(resp, path: str):
    try:
        return resp.json()
    except ValueError:
        raise DicomNodeError(f"DICOM node answered {path} with something that is not JSON "
                             f"({resp.headers.get('Content-Type', 'no type')})") from None
    finally:
        resp.close()


def _error_detail(resp) -> str:
    try:
        data = resp.json()
    except ValueError:
        return printable(resp.text[:200]).strip()
    if isinstance(data, dict):  # Orthanc's error body: {"HttpError", "Message", "Details", ...}
        return printable(" ".join(str(data.get(k, "")) for k in ("Message", "Details")).strip())[:300]
    return ""


# --------------------------------------------------------------------------- studies
@dataclass(frozen=True)
class StudyInfo:
    """What the mapping reads of one Orthanc study."""

    orthanc_id: str
    study_uid: str
    patient_id: str
    tags: dict = field(default_factory=dict, compare=False)  # MainDicomTags + PatientMainDicomTags
    series: tuple[str, ...] = field(default=(), compare=False)  # Orthanc IDs of its series

    @classmethod
    def from_orthanc(cls, data: dict) -> StudyInfo:
        main = dict(data.get("MainDicomTags") or {})
        patient = dict(data.get("PatientMainDicomTags") or {})
        return cls(str(data.get("ID", "")), str(main.get("StudyInstanceUID", "")), str(patient.get("PatientID", "")),
                   {**patient, **main}, tuple(str(x) for x in data.get("Series") or ()))

    @property
    def when(self) -> tuple[str, str, str]:
        return (self.tags.get("StudyDate", ""), self.tags.get("StudyTime", ""), self.study_uid)

    @property
    def label(self) -> str:
        desc = self.tags.get("StudyDescription", "")
        return printable(f"{self.patient_id or '(no PatientID)'} {self.tags.get('StudyDate', '')} {desc}".strip())


# --------------------------------------------------------------------------- study -> visit
@dataclass(frozen=True)
class Mapped:
    participant: str   # the manifest's participant (normalized)
    session: str
    visit: str         # <participant>_<session>


@dataclass(frozen=True)
class Unmapped:
    reason: str


def map_study(study: StudyInfo, rule, manifest, sessions: tuple[str, ...], *, tags_of=None,
              studies_of=None, table: dict[str, str] | None = None) -> Mapped | Unmapped:
    """The visit a study belongs to, or why none: PatientID -> participant through the manifest
    (as for folder dumps), the session by the site's rule (``rule``: the ``dicom_node`` config's
    ``session_rule``). ``tags_of(study)``: an instance's tags, read only when the rule's
    attribute is not among the study's main tags; ``studies_of(patient_id)``: the participant's
    studies, for the ``order`` rule; ``table``: StudyInstanceUID -> session, for the ``table`` rule."""
    if not study.patient_id.strip():
        return Unmapped("the study has no PatientID")
    try:
        participant = normalize_participant_id(study.patient_id)
    except VisitKeyError as exc:
        return Unmapped(f"PatientID: {exc}")
    if participant not in manifest.participants:
        return Unmapped(f"PatientID {printable(study.patient_id)!r} is no participant of the manifest "
                        f"(as {participant})")
    session = _session_by_rule(study, rule, manifest, participant, sessions, tags_of, studies_of, table)
    if isinstance(session, Unmapped):
        return session
    if session not in sessions:
        return Unmapped(f"session {session!r} (by the {rule.kind} rule) is not among the sessions of "
                        f"global_config.json ({', '.join(sessions)})")
    if not manifest.has_visit(Visit(participant, session)):
        return Unmapped(f"participant {participant} has no session {session} in the manifest")
    return Mapped(participant, session, Visit(participant, session).key)


def _session_by_rule(study, rule, manifest, participant, sessions, tags_of, studies_of, table):
    if rule.kind == "table":
        got = (table or {}).get(study.study_uid)
        if not got:
            return Unmapped(f"StudyInstanceUID {study.study_uid} is not in the session table {rule.path}")
        return _normalized(got, f"the session table {rule.path}")
    if rule.kind == "order":
        return _session_by_order(study, manifest, participant, sessions, studies_of)
    value = study.tags.get(rule.attribute)
    if value is None and tags_of is not None:
        value = (tags_of(study) or {}).get(rule.attribute)
    if value is None or not str(value).strip():
        return Unmapped(f"the study has no {rule.attribute} (the session rule reads it)")
    found = re.search(rule.pattern, str(value))
    if not found:
        return Unmapped(f"{rule.attribute} {printable(str(value))[:80]!r} does not match {rule.pattern!r}")
    return _normalized(found.group(1) if found.groups() else found.group(0), f"{rule.attribute}")


def _session_by_order(study, manifest, participant, sessions, studies_of):
    """The n-th study of the participant by (StudyDate, StudyTime, UID) is the participant's n-th
    session of the manifest, in the order of global_config.json's sessions."""
    mine = [s for s in sessions if manifest.has_visit(Visit(participant, s))]
    others = sorted({s.when for s in (studies_of(study.patient_id) if studies_of else [study])} | {study.when})
    n = others.index(study.when)
    if n >= len(mine):
        return Unmapped(f"study {n + 1} by date of participant {participant}, who has only {len(mine)} "
                        "session(s) in the manifest")
    return mine[n]


def _normalized(raw: str, where: str) -> str | Unmapped:
    try:
        return normalize_session_id(raw)
    except VisitKeyError as exc:
        return Unmapped(f"{where}: {exc}")


def read_session_table(path: Path) -> dict[str, str]:
    """The ``table`` rule's file: a CSV or TSV with columns StudyInstanceUID and session_id."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DicomNodeError(f"{path}: the session table of dicom_node.session_rule does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DicomNodeError(f"{path}: the session table cannot be read ({exc})") from None
    dialect = "excel-tab" if "\t" in text.split("\n", 1)[0] else "excel"
    rows = list(csv.DictReader(text.splitlines(), dialect=dialect))
    if rows and not {"StudyInstanceUID", "session_id"} <= set(rows[0]):
        raise DicomNodeError(f"{path}: needs the columns StudyInstanceUID and session_id, has {sorted(rows[0])}")
    return {r["StudyInstanceUID"].strip(): (r["session_id"] or "").strip() for r in rows if r.get("StudyInstanceUID")}


# --------------------------------------------------------------------------- the fetch
def instances_version(instance_ids: list[str]) -> str:
    """The data version of a study as fetched: which instances it holds (Orthanc's instance IDs
    are hashes of the DICOM UIDs, so the same set gives the same version on every node)."""
    return hashlib.sha256("\n".join(sorted(instance_ids)).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class FetchResult:
    zip_path: Path
    record_path: Path
    instances: int
    version: str
    status: str        # "fetched" (new or amended) or "unchanged" (the same instances were there)
    bytes: int


def read_record(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def fetch_study(client: OrthancClient, study: StudyInfo, dest: Path, *, visit: str, workers: int = 4,
                log=None) -> FetchResult:
    """The study as one ZIP in ``dest`` (``<orthanc-id>.zip`` and its record ``<orthanc-id>.json``),
    atomically: each instance Orthanc lists fetched as stored (``/instances/{id}/file``, in
    parallel), written beside under a temporary name, its entries counted against the instances
    Orthanc lists before and after, then renamed into place (a cut-off fetch leaves the previous
    ZIP, or nothing). When the record says the same instances are there already, nothing is
    written: a study pushed twice is one download with one data version. (Orthanc's own
    ``/studies/{id}/archive`` deflates every file in one thread: 22 s for 268 MB here, against
    a few seconds this way; see bench/dicom_node.py.)"""
    before = client.instance_ids(study)
    if not before:
        raise DicomNodeError(f"study {study.label} ({study.orthanc_id}) holds no instance on {client.url}")
    version = instances_version(before)
    dest.mkdir(parents=True, exist_ok=True)
    zip_path, record_path = DatasetLayout.dicom_node_files(dest, study.orthanc_id)
    old = read_record(record_path)
    if old and old.get("version") == version and zip_path.is_file():
        return FetchResult(zip_path, record_path, len(before), version, "unchanged", zip_path.stat().st_size)
    tmp = dest / f".{study.orthanc_id}.{os.getpid()}.partial"
    try:
        size = _download(client, before, tmp, workers)
        entries = _count_entries(tmp, study)
        after = client.instance_ids(study)
        if after != before or entries != len(before):
            raise StudyChangedError(
                f"study {study.label}: Orthanc listed {len(before)} instance(s) before the fetch and {len(after)} "
                f"after, the ZIP holds {entries}; instances are still arriving, it is fetched again when the "
                "study is stable")
        os.replace(tmp, zip_path)
    finally:
        tmp.unlink(missing_ok=True)
    record = {"orthanc_id": study.orthanc_id, "StudyInstanceUID": study.study_uid, "PatientID": study.patient_id,
              "visit": visit, "instances": len(before), "version": version, "bytes": size, "node": client.url,
              "tags": {k: study.tags[k] for k in sorted(study.tags)}, "instance_ids": before}
    with atomic_write(record_path, fsync=True) as fh:
        json.dump(record, fh, indent=1, sort_keys=True)
    if log:
        log(f"study {study.label}: {len(before)} instance(s), {size} bytes -> {zip_path}")
    return FetchResult(zip_path, record_path, len(before), version, "fetched", size)


#: a fixed time for the ZIP's entries, so the same instances give the same bytes
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def _download(client: OrthancClient, ids: list[str], tmp: Path, workers: int) -> int:
    """Every instance's file into one ZIP (stored, not compressed: the DICOMs are read once more
    by raw_dicoms, and deflating them costs more than it saves), ``workers`` at a time over
    kept-alive connections, in ID order, at most ``2 * workers`` files in memory."""
    from concurrent.futures import ThreadPoolExecutor

    size = 0
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf, ThreadPoolExecutor(workers) as pool:
        window = 2 * workers
        for start in range(0, len(ids), window):
            part = ids[start:start + window]
            for iid, data in zip(part, pool.map(client.instance_file, part)):
                zf.writestr(zipfile.ZipInfo(f"{iid}.dcm", _ZIP_TIME), data)
                size += len(data)
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    return size


def _count_entries(path: Path, study: StudyInfo) -> int:
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
            if bad is not None:
                raise DicomNodeError(f"study {study.label}: entry {bad!r} of the fetched ZIP is damaged",
                                     transient=True)
            return sum(1 for i in zf.infolist() if not i.is_dir())
    except (zipfile.BadZipFile, EOFError) as exc:
        raise DicomNodeError(f"study {study.label}: the fetched ZIP is incomplete ({exc}); nothing was kept",
                             transient=True) from None


def node_zips(folder: Path) -> list[Path]:
    """The fetched studies of a visit (``downloads/dicom_node/<visit>/*.zip``), in name order."""
    try:
        return sorted(p for p in folder.glob("*.zip") if p.is_file() and not p.name.startswith("."))
    except OSError:
        return []


# --------------------------------------------------------------------------- query / retrieve
def query_retrieve(client: OrthancClient, peer: str, query: dict, *, target_aet: str | None = None,
                   timeout: float = 600) -> list[dict]:
    """C-FIND the studies matching ``query`` on the PACS peer ``peer`` (a modality Orthanc knows),
    then C-MOVE each into Orthanc (or ``target_aet``). Returns the answers' main tags."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", peer):
        raise DicomNodeError(f"{peer!r} is not the name of a modality of the DICOM node")
    q = {"StudyInstanceUID": "", "PatientID": "", "StudyDate": "", "StudyDescription": "", "AccessionNumber": "",
         **{k: v for k, v in query.items() if v}}
    asked = client.post_json(f"/modalities/{peer}/query", {"Level": "Study", "Query": q}, timeout=timeout)
    qid = asked.get("ID")
    if not qid:
        raise DicomNodeError(f"the C-FIND on {peer} gave no query ID: {str(asked)[:200]}")
    answers = client.get_json(f"/queries/{qid}/answers", expand="", simplify="")
    if answers:
        body = {"Synchronous": True, **({"TargetAet": target_aet} if target_aet else {})}
        client.post_json(f"/queries/{qid}/retrieve", body, timeout=timeout)
    return [dict(a) for a in answers]
