"""The sensors: scanner dumps in ``downloads/<session>/`` and TCIA manifests in
``downloads/tcia/``, each starting the visit chain for the visits it finds (the DICOM node's
sensor is built in dicomnode.py, with the assets it runs)."""

import csv
import json
import time
from pathlib import Path

from dagster import DagsterRunStatus, RunRequest, RunsFilter, SensorEvaluationContext, SensorResult, SkipReason, sensor

from ..core.dataset import Dataset
from ..core.downloads import read_dicom_dir_map, signature
from ..core.downloads_state import DownloadsState, SensorLimits, StateDamaged, context_token, parse_cursor
from ..core.errors import DicomAssetsError
from ..core.fsutil import printable
from ..core.layout import DatasetLayout
from ..core.tcia import TciaManifestError, manifest_files, read_resolved
from ..settings import current as current_settings
from .dicomnode import build_dicom_node_sensor
from .jobs import chain_selection, dicom_node_visit_job, tcia_job, visit_chain_job
from .lineage import dump_observation
from .partitions import VISITS_PARTITION_NAME, sensor_default_status, visits_partitions
from .resources import DatasetResource
from .share import profile_observation
from .tcia import TCIA_PARTITION_NAME, tcia_manifests

VISIT_TAG = "dicom_assets/visit"
DOWNLOAD_TAG = "dicom_assets/download"


def run_selection(layout: DatasetLayout, *, dicom_node: bool = False) -> list:
    """The assets a visit's run requested now holds: the chain, XNAT only when one is configured
    (``XNAT_HOST``), BIDS only when the dataset root has a dcm2bids config (and, for the DICOM
    node's runs, the fetch of the study first). Read at every tick, so setting either later takes
    effect without reloading the code location."""
    return chain_selection(xnat=current_settings().xnat_configured, bids=layout.dcm2bids_config_path.is_file(),
                           dicom_node=dicom_node, share=_share_on(layout))


def _share_on(layout: DatasetLayout) -> bool:
    """deid.enabled in the dataset's config (a config that does not load: off, the runs say why)."""
    from ..core.config import load_config

    try:
        return load_config(layout.config_path).deid.enabled
    except DicomAssetsError:
        return False


def node_run_selection(layout: DatasetLayout) -> list:
    return run_selection(layout, dicom_node=True)


def load_cursor(raw: str | None, *keys: str) -> list[dict]:
    """The named maps of a sensor's JSON cursor (empty when missing or unreadable)."""
    data = parse_cursor(raw)
    return [data.get(k, {}) for k in keys]


def evaluate_downloads(context: SensorEvaluationContext, dataset: DatasetResource,
                       settings: SensorLimits | None = None):
    """One tick: new complete downloads -> new visit partitions + one run each, at most
    ``settings.batch`` per tick (the rest wait in order). The settled state lives in
    ``scratch/state/downloads-<id>.sqlite`` (core/downloads_state.py); the cursor only names
    it and the tick, so it stays a few dozen bytes whatever the number of downloads."""
    try:
        ds = Dataset(DatasetLayout(Path(dataset.root)))
        sessions = ds.config.sessions  # the manifest is read only when a name needs classifying
    except DicomAssetsError as exc:
        return SkipReason(f"dataset not usable: {exc}")
    lay = ds.layout
    settings = settings or current_settings().downloads_sensor()

    def classifier():
        return set(ds.manifest.participants), read_dicom_dir_map(lay.dicom_dir_map_path)

    state, cursor_gen, notes, legacy = DownloadsState.for_cursor(lay, context.cursor)
    token = context_token(lay.config_path, lay.manifest_path, lay.dicom_dir_map_path, sessions)
    try:
        try:
            out = state.tick(cursor_gen, sessions=sessions, ctx_token=token, classifier=classifier,
                             settings=settings, legacy=legacy, notes=notes)
        except StateDamaged as damage:
            # the state is a cache: set aside, rebuilt in this same tick (the note names the file)
            state, note = state.healed(damage)
            out = state.tick(0, sessions=sessions, ctx_token=token, classifier=classifier, settings=settings,
                             legacy=legacy, notes=notes + [note])
    except DicomAssetsError as exc:
        return SkipReason(f"dataset not usable: {exc}")
    # dump names are as the OS gives them: a byte that is no UTF-8 is written \xNN (as in the
    # organize report), never a lone surrogate in the log or the skip reason
    for note in out.notes:
        context.log.warning(printable(note))
    for problem in out.new_problems:
        context.log.warning(printable(problem))
    if out.dropped:
        context.log.info(printable(f"{len(out.dropped)} pending download(s) vanished before they were taken, dropped: "
                                   + ", ".join(out.dropped[:5]) + (" ..." if len(out.dropped) > 5 else "")))
    # deid_profile observed when the options, safe list or key changed: the copies made before show stale
    profile_event = profile_observation(ds, context.instance, "downloads_sensor")
    profile_events = [profile_event] if profile_event is not None else []
    selection = run_selection(lay) if out.taken else None
    run_requests = [RunRequest(run_key=f"{t.rel}:{t.token}", partition_key=t.visit, asset_selection=selection,
                               tags={VISIT_TAG: t.visit, DOWNLOAD_TAG: t.rel}) for t in out.taken]
    cursor = out.cursor()
    if not run_requests:
        reason = []
        if out.waiting:
            reason.append(f"{out.waiting} download(s) still arriving or not yet stable: {', '.join(out.waiting_first)}"
                          + (" ..." if out.waiting > len(out.waiting_first) else ""))
        if out.problems:
            reason.append(f"{out.problems} download(s) not taken: {out.first_problem}"
                          + (f" (and {out.problems - 1} more, in the sensor's log)" if out.problems > 1 else ""))
        return SensorResult(skip_reason=SkipReason(printable("; ".join(reason)) or "no new complete download"),
                            cursor=cursor, asset_events=profile_events)
    # every visit of the batch is asked for: the daemon adds those missing (one look-up per key,
    # which it does anyway), so a partition deleted in the UI comes back with its re-delivered dump
    new_keys = sorted({r.partition_key for r in run_requests})
    # each visit taken is observed: its downloads partition gets the signature of its taken dumps
    observed = state.taken_tokens(new_keys)
    shown = ", ".join(r.partition_key for r in run_requests[:20])
    more = f" and {len(run_requests) - 20} more" if len(run_requests) > 20 else ""
    context.log.info(printable(f"{len(run_requests)} complete download(s): {shown}{more}")
                     + (f"; {out.queued} more complete, waiting in order ({settings.batch} per tick)"
                        if out.queued else ""))
    return SensorResult(
        run_requests=run_requests,
        dynamic_partitions_requests=[visits_partitions.build_add_request(new_keys)] if new_keys else [],
        asset_events=profile_events + [dump_observation(v, items, "downloads_sensor")
                                       for v, items in observed.items() if items],
        cursor=cursor,
    )


def build_downloads_sensor(job, minimum_interval_seconds: int = 10, settings: SensorLimits | None = None):
    @sensor(
        name="downloads_sensor",
        job=job,
        minimum_interval_seconds=minimum_interval_seconds,
        default_status=sensor_default_status(),
        description=(
            "Watches downloads/<session>/ for complete scanner dumps (size and mtime unchanged over two "
            "ticks, or a <item>.done marker), adds their visit partitions and runs the chain for each "
            "new or re-delivered dump, at most DICOM_ASSETS_SENSOR_BATCH (200) per tick, the rest in order. "
            "State: scratch/state/downloads-<id>.sqlite under the dataset root."
        ),
    )
    def downloads_sensor(context: SensorEvaluationContext, dataset: DatasetResource):
        return evaluate_downloads(context, dataset, settings)

    return downloads_sensor


def _series_failed(layout: DatasetLayout, name: str) -> bool:
    """Whether the manifest's last run left series that could not be downloaded (an outage, a
    poisoned series): worth asking again. A refused manifest (unreadable, unknown series) is not."""
    try:
        with layout.tcia_series_table_path(name).open(newline="") as fh:
            return any(row.get("status") == "failed" for row in csv.DictReader(fh))
    except OSError:
        return False


def tcia_retries(context: SensorEvaluationContext, layout: DatasetLayout, submitted: dict, retried: dict,
                 settings) -> list[RunRequest]:
    """Manifest runs that failed on series (an outage outlasting the run's retries, a series that
    kept failing) are requested again ``tcia_retry_failed_every`` seconds after they ended, at
    most ``tcia_retry_failed_times`` times per manifest version: a maintenance window ends in
    the visits arriving, with no click. One query of the instance per tick."""
    if settings.tcia_retry_failed_times <= 0 or not submitted:  # no manifest run yet: nothing to ask
        return []
    now = time.time()
    records = context.instance.get_run_records(
        RunsFilter(job_name=tcia_job.name, statuses=[DagsterRunStatus.FAILURE]), limit=200)
    requests, seen = [], set()
    for rec in records:
        name = rec.dagster_run.tags.get("dagster/partition")
        if name in seen or name not in submitted:
            continue
        seen.add(name)
        key = f"{name}:{submitted[name]}"
        n = retried.get(key, 0)
        if n >= settings.tcia_retry_failed_times or (rec.end_time or now) > now - settings.tcia_retry_failed_every:
            continue
        latest = context.instance.get_run_records(RunsFilter(job_name=tcia_job.name,
                                                             tags={"dagster/partition": name}), limit=1)
        if not latest or latest[0].dagster_run.run_id != rec.dagster_run.run_id or not _series_failed(layout, name):
            continue
        retried[key] = n + 1
        requests.append(RunRequest(run_key=f"tcia:{key}:retry{n + 1}", partition_key=name, job_name=tcia_job.name,
                                   tags={"dicom_assets/tcia_retry": str(n + 1)}))
    return requests


def evaluate_tcia(context: SensorEvaluationContext, dataset: DatasetResource, chain_job_name: str):
    """New stable manifests -> tcia_download runs; new resolved visits -> chain runs; manifests
    whose run failed on series -> tcia_download runs again, later."""
    try:
        lay = dataset.open().layout
        files = manifest_files(lay.tcia_root)
    except (DicomAssetsError, TciaManifestError) as exc:
        return SkipReason(f"dataset not usable: {exc}")
    pending, submitted, resolved, retried = load_cursor(context.cursor, "pending", "submitted", "resolved", "retried")
    new_pending, requests, new_manifests, new_visits = {}, [], [], []
    for name, m in files.items():
        token = signature(m).token()
        if submitted.get(name) != token:
            if pending.get(name) != token:
                new_pending[name] = token  # wait one tick: size and mtime must settle
                continue
            requests.append(RunRequest(run_key=f"tcia:{name}:{token}", partition_key=name, job_name=tcia_job.name))
            new_manifests.append(name)
            submitted[name] = token
        res = lay.tcia_resolved_path(name)
        if not res.is_file():
            continue
        rtoken = signature(res).token()
        if resolved.get(name) == rtoken:
            continue  # the CSV is read only when it changed, not on every tick
        resolved[name] = rtoken
        for visit in sorted({r["visit"] for r in read_resolved(res)}):
            new_visits.append(visit)
            requests.append(RunRequest(run_key=f"tcia:{name}/{visit}:{rtoken}", partition_key=visit,
                                       job_name=chain_job_name, tags={VISIT_TAG: visit},
                                       asset_selection=run_selection(lay)))
    requests.extend(tcia_retries(context, lay, submitted, retried, current_settings()))
    cursor_out = json.dumps({"pending": new_pending, "submitted": submitted, "resolved": resolved,
                             "retried": retried}, sort_keys=True)
    if not requests:
        return SensorResult(skip_reason=SkipReason(
            f"{len(new_pending)} manifest(s) not yet stable" if new_pending else "no new TCIA manifest or visit"),
            cursor=cursor_out)
    existing_m = set(context.instance.get_dynamic_partitions(TCIA_PARTITION_NAME))
    existing_v = set(context.instance.get_dynamic_partitions(VISITS_PARTITION_NAME))
    adds = []
    if set(new_manifests) - existing_m:
        adds.append(tcia_manifests.build_add_request(sorted(set(new_manifests) - existing_m)))
    if set(new_visits) - existing_v:
        adds.append(visits_partitions.build_add_request(sorted(set(new_visits) - existing_v)))
    context.log.info(f"TCIA: {len(new_manifests)} manifest run(s), {len(new_visits)} visit run(s)")
    return SensorResult(run_requests=requests, dynamic_partitions_requests=adds, cursor=cursor_out)


def build_tcia_sensor(chain_job, minimum_interval_seconds: int = 10):
    @sensor(name="tcia_sensor", jobs=[tcia_job, chain_job], minimum_interval_seconds=minimum_interval_seconds,
            default_status=sensor_default_status(),
            description=("Watches downloads/tcia/ for TCIA manifests (.tcia or .csv): a new or changed manifest "
                         "gets a tcia_download run; each visit it resolves gets a run of the chain."))
    def tcia_sensor(context: SensorEvaluationContext, dataset: DatasetResource):
        return evaluate_tcia(context, dataset, chain_job.name)

    return tcia_sensor


downloads_sensor = build_downloads_sensor(visit_chain_job)
dicom_node_sensor = build_dicom_node_sensor(dicom_node_visit_job, node_run_selection)
tcia_sensor = build_tcia_sensor(visit_chain_job)
