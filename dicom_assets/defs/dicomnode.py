"""The DICOM node (Orthanc) as a source of visits: the ``dicom_node_study`` asset, the
``dicom_node_sensor`` that follows Orthanc's ``/changes`` log, and the ``dicom_node_retrieve``
job (query/retrieve from a PACS peer). The domain logic is in ``core/dicomnode.py``.

A study Orthanc marks stable becomes a run of its visit: ``dicom_node_study`` fetches it
(atomically, counted against Orthanc's own list) into ``downloads/dicom_node/<visit>/``, and the
chain runs on it in the same run. A study that maps to no visit is kept in the sensor's cursor
and ``logs/dicom_node/unmapped.tsv`` with its reason, and taken as soon as the config, the
manifest or the session table changes.
"""


import csv
import io
import json
import time
from pathlib import Path

from dagster import (
    AssetExecutionContext,
    Backoff,
    Config,
    ConfigurableResource,
    DataVersion,
    Failure,
    MaterializeResult,
    MetadataValue,
    OpExecutionContext,
    Output,
    RetryPolicy,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    job,
    op,
)
from pydantic import Field

from ..core.dataset import Dataset
from ..core.dicomnode import (
    DicomNodeError,
    Mapped,
    OrthancClient,
    fetch_study,
    instances_version,
    map_study,
    node_zips,
    query_retrieve,
    read_record,
    read_session_table,
)
from ..core.downloads_state import parse_cursor
from ..core.errors import DicomAssetsError
from ..core.fsutil import atomic_write, file_token, printable
from ..core.layout import DatasetLayout
from ..settings import current as current_settings
from .partitions import sensor_default_status, visit_asset, visit_of, visits_partitions
from .resources import DatasetResource
from .ui import path, table

STUDY_TAG = "dicom_assets/dicom_node_study"


class OrthancResource(ConfigurableResource):
    """The site's DICOM node (Orthanc's REST API). Unset fields are read from the environment
    when a step or tick connects (``ORTHANC_URL``, ``ORTHANC_USER``, ``ORTHANC_PASSWORD``)."""

    url: str | None = Field(default=None, description="Orthanc base URL (default: ORTHANC_URL)")
    user: str | None = Field(default=None, description="Orthanc user (default: ORTHANC_USER)")
    password: str | None = Field(default=None, description="Orthanc password (default: ORTHANC_PASSWORD)")
    timeout: float = Field(default=30, description="seconds before a REST call times out")

    @property
    def base(self) -> str | None:
        return self.url or current_settings().orthanc_url

    @property
    def configured(self) -> bool:
        return bool(self.base)

    def client(self) -> OrthancClient:
        settings = current_settings()
        if not self.base:
            raise DicomNodeError("no DICOM node configured: set ORTHANC_URL (and ORTHANC_USER, ORTHANC_PASSWORD)")
        password = self.password
        if password is None and settings.orthanc_password is not None:
            password = settings.orthanc_password.get_secret_value()
        return OrthancClient(self.base, self.user or settings.orthanc_user, password, timeout=self.timeout)


def _session_table(ds: Dataset) -> dict[str, str] | None:
    rule = ds.config.dicom_node.session_rule
    return read_session_table(ds.layout.root / rule.path) if rule.kind == "table" else None


def _mapper(ds: Dataset, client: OrthancClient):
    """study -> Mapped | Unmapped, with what the dataset's rule needs (read once per tick or step)."""
    rule, table_ = ds.config.dicom_node.session_rule, _session_table(ds)

    def mapping(study):
        return map_study(study, rule, ds.manifest, ds.config.sessions, tags_of=client.first_instance_tags,
                         studies_of=client.studies_of, table=table_)
    return mapping


# --------------------------------------------------------------------------- the asset
@visit_asset(
    group="dicom_node",
    kinds={"orthanc", "dicom"},
    output_required=False,
    retry_policy=RetryPolicy(max_retries=3, delay=5, backoff=Backoff.EXPONENTIAL),
    description=(
        "The visit's studies as the DICOM node (Orthanc) holds them, fetched into "
        "`downloads/dicom_node/<visit>/<study>.zip` (one ZIP per study, written beside and renamed into "
        "place once its entries match Orthanc's instance list) with a record `<study>.json`. Data "
        "version: which instances the visit's studies hold, so a series that arrives later amends the visit. "
        "Started by the dicom_node_sensor; from the UI it fetches every study of the node mapping to the visit."
    ),
)
def dicom_node_study(context: AssetExecutionContext, dataset: DatasetResource, dicom_node: OrthancResource):
    visit = visit_of(context)
    ds = dataset.open()
    tagged = [s for s in (context.run.tags.get(STUDY_TAG) or "").split(",") if s]
    if not tagged and not dicom_node.configured:  # a run of a visit of folder dumps: nothing to fetch
        context.log.info(f"{visit.key}: dicom_node_study: not applicable: no DICOM node configured (ORTHANC_URL)")
        return
    try:
        client = dicom_node.client()
        studies = _studies_for(ds, client, visit, tagged)
        if not studies:
            context.log.info(f"{visit.key}: dicom_node_study: not applicable: no study on {client.url} maps to it")
            return
        results = [fetch_study(client, s, ds.layout.dicom_node_dir(visit.key), visit=visit.key,
                               log=context.log.info) for s in studies]
    except DicomNodeError as exc:
        raise Failure(str(exc), allow_retries=exc.transient) from None
    except DicomAssetsError as exc:
        raise Failure(str(exc), allow_retries=False) from None
    # the visit's download: every study the node sent for it (an earlier one stays)
    records = [read_record(z.with_suffix(".json")) or {} for z in node_zips(ds.layout.dicom_node_dir(visit.key))]
    ids = [i for r in records for i in r.get("instance_ids", [])]
    for r in results:
        context.log.info(f"{visit.key}: study {r.zip_path.stem}: {r.status}, {r.instances} instance(s)")
    yield MaterializeResult(data_version=DataVersion(instances_version(ids)), metadata={
        "node": MetadataValue.url(client.url),
        "studies": table([{"study": r.get("orthanc_id", ""), "StudyInstanceUID": r.get("StudyInstanceUID", ""),
                           "StudyDate": r.get("tags", {}).get("StudyDate", ""),
                           "StudyDescription": r.get("tags", {}).get("StudyDescription", ""),
                           "instances": r.get("instances", 0), "bytes": r.get("bytes", 0)} for r in records],
                         [("study", "string", "Orthanc ID"), ("StudyInstanceUID", "string", ""),
                          ("StudyDate", "string", ""), ("StudyDescription", "string", ""),
                          ("instances", "int", ""), ("bytes", "int", "")]),
        "instances": len(ids),
        "fetched": sum(r.status == "fetched" for r in results),
        "unchanged": sum(r.status == "unchanged" for r in results),
        "path": path(ds.layout.dicom_node_dir(visit.key)),
    })


def _studies_for(ds: Dataset, client: OrthancClient, visit, tagged: list[str]):
    """The studies to fetch: the run's (its tag, set by the sensor), else every study on the node
    of the visit's participant that maps to this visit (none: nothing to do)."""
    mapping = _mapper(ds, client)
    if tagged:
        studies = []
        for sid in tagged:
            study = client.study(sid)
            if study is None:
                raise DicomNodeError(f"study {sid} is no longer on the DICOM node {client.url}")
            got = mapping(study)
            if not isinstance(got, Mapped) or got.visit != visit.key:
                why = got.reason if not isinstance(got, Mapped) else f"it maps to {got.visit} now"
                raise DicomNodeError(f"study {study.label} ({sid}) is not of visit {visit.key}: {why}")
            studies.append(study)
        return studies
    raw = ds.manifest.raw_participant_id(visit.participant)
    found = {s.orthanc_id: s for pid in dict.fromkeys((raw, visit.participant)) for s in client.studies_of(pid)}
    return [s for s in found.values() if getattr(mapping(s), "visit", None) == visit.key]


# --------------------------------------------------------------------------- the sensor
def _cursor(raw: str | None) -> dict:
    data = parse_cursor(raw)
    seq = data.get("seq")
    return {"seq": seq if isinstance(seq, int) and seq >= 0 else 0, "ctx": str(data.get("ctx", "")),
            "unmapped": data.get("unmapped") if isinstance(data.get("unmapped"), int) else 0}


def _ctx_token(ds: Dataset) -> str:
    lay = ds.layout
    rule = ds.config.dicom_node.session_rule
    files = [lay.config_path, lay.manifest_path] + ([lay.root / rule.path] if rule.kind == "table" else [])
    return "|".join(file_token(p) for p in files)


#: studies mapped (one REST call each) per tick at most; the rest at the next tick
STUDIES_PER_TICK = 2000


def _read_changes(client: OrthancClient, since: int, budget: int, seconds: float) -> tuple[dict[str, int], int]:
    """The StableStudy changes after ``since`` (study -> its last Seq), and the Seq read up to:
    at most ``budget`` changes and ``seconds`` of reading per tick."""
    stable: dict[str, int] = {}
    seq, read, deadline = since, 0, time.monotonic() + seconds
    while read < budget and time.monotonic() < deadline:
        page = client.changes(seq, min(1000, budget - read))
        changes = page.get("Changes") or []
        for change in changes:
            if change.get("ChangeType") == "StableStudy" and change.get("ID"):
                stable[str(change["ID"])] = int(change["Seq"])
        read += len(changes)
        seq = max(seq, int(page.get("Last", seq)))
        if page.get("Done", True) or not changes:
            break
    return stable, seq


def evaluate_dicom_node(context: SensorEvaluationContext, dataset: DatasetResource, node: OrthancResource,
                        chain_job_name: str, selection_for=None):
    """One tick: Orthanc's changes since the cursor's Seq -> one run per newly stable study of a
    visit. A study of no visit is kept in logs/dicom_node/unmapped.tsv (with its reason and
    change Seq) and looked at again when the config, the manifest or the session table changes.
    Light: a tick with nothing new is one REST call and a cursor of a few dozen bytes, whatever
    the size of the archive; a new stable study costs one call; no study is fetched here."""
    if not node.configured:
        return SkipReason("no DICOM node configured (set ORTHANC_URL, ORTHANC_USER, ORTHANC_PASSWORD)")
    cur = _cursor(context.cursor)
    try:
        ds = Dataset(DatasetLayout(Path(dataset.root)))
        token = _ctx_token(ds)
    except DicomAssetsError as exc:
        return SkipReason(f"dataset not usable: {exc}")
    settings = current_settings()
    lay = ds.layout
    try:
        client = node.client()
        stable, seq = _read_changes(client, cur["seq"], settings.orthanc_changes_per_tick, 20.0)
        retry = token != cur["ctx"] and cur["unmapped"] > 0  # what maps studies changed: look again
        kept = read_unmapped(lay) if (retry or stable) and cur["unmapped"] else {}
        todo = {**({sid: int(v.get("change") or 0) for sid, v in kept.items()} if retry else {}), **stable}
        todo, seq = _bounded(todo, stable, seq)
        requests, unmapped = _map_studies(ds, client, todo, kept, chain_job_name, selection_for)
    except DicomNodeError as exc:
        return SkipReason(f"{exc}; the sensor resumes from change {cur['seq']}")
    except DicomAssetsError as exc:
        return SkipReason(f"dataset not usable: {exc}; the sensor resumes from change {cur['seq']}")
    if todo and unmapped != kept:
        _write_unmapped(lay, unmapped)
    new_unmapped = sorted(set(unmapped) - set(kept), key=lambda sid: int(unmapped[sid].get("change") or 0))
    for sid in new_unmapped[:20]:  # the first of them by name; an archive's backlog is counted, not listed
        context.log.warning(printable(f"study {unmapped[sid]['label']} ({sid}) maps to no visit: "
                                      f"{unmapped[sid]['reason']}"))
    if len(new_unmapped) > 20:
        context.log.warning(f"and {len(new_unmapped) - 20} more studies map to no visit: "
                            f"{lay.dicom_node_unmapped_path}")
    n_unmapped = len(unmapped) if todo else cur["unmapped"]
    cursor = json.dumps({"seq": seq, "ctx": token, "unmapped": n_unmapped}, sort_keys=True)
    if not requests:
        why = (f"{n_unmapped} study(ies) map to no visit (logs/dicom_node/unmapped.tsv)"
               + (f", first: {next(iter(unmapped.values()))['reason']}" if unmapped else "")
               if n_unmapped else "no newly stable study")
        return SensorResult(skip_reason=SkipReason(printable(f"up to change {seq}: {why}")), cursor=cursor)
    context.log.info(f"up to change {seq}: {len(requests)} stable study(ies): "
                     + ", ".join(f"{r.partition_key}" for r in requests[:20]))
    keys = sorted({r.partition_key for r in requests})
    return SensorResult(run_requests=requests, cursor=cursor,
                        dynamic_partitions_requests=[visits_partitions.build_add_request(keys)])


def _bounded(todo: dict[str, int], stable: dict[str, int], seq: int) -> tuple[dict[str, int], int]:
    """At most STUDIES_PER_TICK studies this tick, in change order; when cut, the cursor stops
    before the first newly stable study left, so the next tick reads it again."""
    if len(todo) <= STUDIES_PER_TICK:
        return todo, seq
    ordered = sorted(todo.items(), key=lambda kv: kv[1])
    taken, left = dict(ordered[:STUDIES_PER_TICK]), [s for sid, s in ordered[STUDIES_PER_TICK:] if sid in stable]
    return taken, (min(left) - 1 if left else seq)


def _map_studies(ds, client, todo: dict[str, int], old_unmapped: dict, chain_job_name: str, selection_for):
    unmapped = {k: v for k, v in old_unmapped.items() if k not in todo}
    if not todo:  # an idle tick reads no session table and asks Orthanc nothing more
        return [], unmapped
    mapping = _mapper(ds, client)
    requests = []
    selection = None
    for sid, seq in sorted(todo.items(), key=lambda kv: kv[1]):
        study = client.study(sid)
        if study is None:  # deleted from the node since: nothing to take
            continue
        got = mapping(study)
        if not isinstance(got, Mapped):
            unmapped[sid] = {"change": seq, "reason": got.reason, "label": study.label,
                             "StudyInstanceUID": study.study_uid, "PatientID": study.patient_id}
            continue
        if selection is None:
            selection = selection_for(ds.layout) if selection_for else None
        requests.append(RunRequest(run_key=f"dicom_node:{sid}:{seq}", partition_key=got.visit, job_name=chain_job_name,
                                   asset_selection=selection,
                                   tags={"dicom_assets/visit": got.visit, STUDY_TAG: sid}))
    return requests, unmapped


UNMAPPED_COLUMNS = ("study", "PatientID", "StudyInstanceUID", "label", "reason", "change")


def read_unmapped(lay: DatasetLayout) -> dict[str, dict]:
    """logs/dicom_node/unmapped.tsv: the studies kept for later, by Orthanc ID (empty if none)."""
    try:
        text = lay.dicom_node_unmapped_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    rows = csv.DictReader(io.StringIO(text), delimiter="\t")
    return {r["study"]: {k: r.get(k, "") for k in UNMAPPED_COLUMNS[1:]} for r in rows if r.get("study")}


def _write_unmapped(lay: DatasetLayout, unmapped: dict) -> None:
    from ..core.curation import _cell

    buf = io.StringIO()
    w = csv.writer(buf, delimiter="\t", lineterminator="\n")
    w.writerow(UNMAPPED_COLUMNS)
    for sid in sorted(unmapped, key=lambda s: int(unmapped[s].get("change") or 0)):
        u = unmapped[sid]
        w.writerow([sid] + [_cell(u.get(k, "")) for k in UNMAPPED_COLUMNS[1:]])
    lay.dicom_node_unmapped_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(lay.dicom_node_unmapped_path) as fh:
        fh.write(buf.getvalue())


def build_dicom_node_sensor(chain_job, selection_for, minimum_interval_seconds: int = 5):
    from dagster import sensor

    @sensor(name="dicom_node_sensor", job=chain_job, minimum_interval_seconds=minimum_interval_seconds,
            default_status=sensor_default_status(),
            description=("Follows the DICOM node's change log (Orthanc /changes; cursor: the last Seq): each study "
                         "Orthanc marks stable (StableAge) is mapped to its visit (PatientID through the manifest, "
                         "the session by dicom_node.session_rule) and gets one run: dicom_node_study fetches it, "
                         "the chain follows. Studies of no visit: logs/dicom_node/unmapped.tsv."))
    def dicom_node_sensor(context: SensorEvaluationContext, dataset: DatasetResource, dicom_node: OrthancResource):
        return evaluate_dicom_node(context, dataset, dicom_node, chain_job.name, selection_for)

    return dicom_node_sensor


# --------------------------------------------------------------------------- query / retrieve
class RetrieveConfig(Config):
    peer: str = Field(description="the PACS peer, as a modality name the DICOM node knows (Orthanc DicomModalities)")
    patient_id: str = Field(default="", description="PatientID to ask for (C-FIND; wildcards * and ? allowed)")
    accession_number: str = Field(default="", description="AccessionNumber to ask for")
    study_date: str = Field(default="", description="StudyDate or range, e.g. 20240101-20241231")


@op(description="C-FIND the matching studies on the PACS peer, then C-MOVE them into the DICOM node; the "
                "dicom_node_sensor takes them from there when Orthanc marks them stable.")
def retrieve_from_pacs(context: OpExecutionContext, config: RetrieveConfig, dicom_node: OrthancResource) -> Output:
    if not (config.patient_id or config.accession_number or config.study_date):
        raise Failure("give a patient_id, an accession_number or a study_date: a query for everything is refused")
    try:
        client = dicom_node.client()
        answers = query_retrieve(client, config.peer, {"PatientID": config.patient_id,
                                                       "AccessionNumber": config.accession_number,
                                                       "StudyDate": config.study_date})
    except DicomNodeError as exc:
        raise Failure(str(exc)) from None
    context.log.info(f"{len(answers)} study(ies) found on {config.peer} and moved into {client.url}")
    return Output(len(answers), metadata={"peer": config.peer, "studies": MetadataValue.json(answers[:200])})


@job(name="dicom_node_retrieve",
     description="Query a PACS peer (C-FIND by participant, accession or date) and have it send the studies to "
                 "the DICOM node (C-MOVE); the sensor runs their visits.")
def dicom_node_retrieve():
    retrieve_from_pacs()
