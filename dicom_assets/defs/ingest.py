"""Ingest: the downloads sensor, ``raw_dicoms`` and ``organized_dicoms``."""


import json
from pathlib import Path

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    DataVersion,
    DataVersionsByPartition,
    Failure,
    MaterializeResult,
    MetadataValue,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    observable_source_asset,
    sensor,
)

from ..core.curation import update_visit_status
from ..core.dicomscan import Rules
from ..core.downloads import (
    ITEM_FORMATS,
    DownloadItem,
    problems_for_participant,
    read_dicom_dir_map,
    signature,
)
from ..core.downloads_state import DownloadsState, Settings, context_token
from ..core.errors import DicomAssetsError
from ..core.ids import parse_visit_key
from ..core.extract import extract_visit
from ..core.layout import Dataset, DatasetLayout
from ..core.organize import excluded_summary, organize_visit, series_rows
from ..core.versions import dump_version, kept_version
from ..core.qc import build_montage, middle_images
from ..core.sources import DUMP, visit_source
from .lineage import DOWNLOADS, dump_observation
from .partitions import sensor_default_status, visit_asset, visit_of, visits_partitions
from .resources import DatasetResource
from .ui import SERIES_COLUMNS, path, qc_markdown, table

VISIT_TAG = "dicom_assets/visit"
DOWNLOAD_TAG = "dicom_assets/download"

# where the graph starts: the scanner dumps as delivered, observed (never materialized) by the
# downloads sensor when it takes a dump (the TCIA visits' series zips too, when observed from the
# UI), one partition per visit; "Observe" in the UI signs the selected visits' dumps again
@observable_source_asset(
    key=DOWNLOADS, partitions_def=visits_partitions, group_name="ingest", tags={"dagster/kind/file": ""},
    description=(
        "The visit's scanner dump(s) as delivered in `downloads/<session>/` (or, for a TCIA visit, its series "
        "zips in `downloads/tcia/<manifest>/series/`); never changed by the pipeline. Observed by the "
        "downloads sensor when it takes a dump; data version: the signature (path, size, mtime, file count) of "
        "the visit's dumps, so a re-delivered dump shows `raw_dicoms` stale."
    ),
)
def downloads(context, dataset: DatasetResource) -> DataVersionsByPartition:
    ds = dataset.open()
    keys = (context.partition_keys if context.has_partition_key or context.has_partition_key_range
            else context.instance.get_dynamic_partitions(visits_partitions.name))
    out = {}
    for key in keys:
        items = _visit_dumps(ds, parse_visit_key(key))
        if items:
            out[key] = DataVersion(dump_version(_signed(ds.layout, items)))
    return DataVersionsByPartition(out)


def _visit_dumps(ds: Dataset, visit) -> list[DownloadItem]:
    """A visit's dump(s): the series zips of a TCIA visit, else its items in downloads/<session>/."""
    return visit_source(ds, visit).dumps(ds)


def _signed(lay: DatasetLayout, items: list[DownloadItem]) -> list[tuple[str, str]]:
    """(path under downloads/, signature token) of each dump, as the sensor signs them."""
    return [(i.path.relative_to(lay.downloads_root).as_posix(), signature(i.path).token()) for i in items]


@visit_asset(
    group="ingest",
    kinds={"dicom", "file"},
    deps=[downloads],
    description=(
        "The visit's scanner dump(s) from `downloads/<session>/`, extracted safely into "
        "`scratch/raw_dicoms/<session>/<participant>/` (no path escapes, bounded size, atomic swap; "
        "downloads are never moved or changed)."
    ),
)
def raw_dicoms(context: AssetExecutionContext, dataset: DatasetResource) -> MaterializeResult:
    visit = visit_of(context)
    ds = dataset.open()
    lay = ds.layout
    source = visit_source(ds, visit)
    tcia = source.tcia
    if tcia is not None:  # a visit of a TCIA manifest: its series zips are the dump
        missing = source.missing_zips()
        if missing:
            raise Failure(f"TCIA visit {visit.key}: {len(missing)} series zip(s) missing, first {missing[0]}; "
                          "materialize tcia_series of its manifest again")
        items = source.dumps(ds, present_only=False)
    elif source.kind != DUMP:
        raise Failure(f"visit {visit.key} is not in the manifest {ds.layout.manifest_path}")
    else:
        items = source.dumps(ds)
        if not items:
            dir_map = read_dicom_dir_map(lay.dicom_dir_map_path)
            not_taken = problems_for_participant(lay.downloads_root, visit, set(ds.manifest.participants), dir_map)
            raise Failure(
                f"no download for visit {visit.key} in {lay.downloads_dir(visit.session)} "
                f"(expected a {ITEM_FORMATS} named after participant "
                f"{ds.manifest.raw_participant_id(visit.participant)!r})"
                + (f"; not taken: {'; '.join(not_taken[:3])}" if not_taken else "")
            )
    if len(items) > 1 and tcia is None:  # a TCIA visit is one zip per series by design
        context.log.warning(
            f"{len(items)} downloads for visit {visit.key}: "
            + ", ".join(i.name for i in items) + "; each is extracted into its own sub-folder"
        )
    target = lay.raw_dir(visit)
    try:
        report = extract_visit(items, target, ds.config.limits)
    except DicomAssetsError as exc:
        raise Failure(str(exc)) from None
    for skipped in report.skipped:
        context.log.warning(f"{visit.key}: not extracted: {skipped}")
    report_path = lay.extract_report_path(visit)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps({"target": report.target, "items": [vars(i) for i in report.items]},
                                      indent=2, sort_keys=True) + "\n")
    update_visit_status(ds, visit, in_downloads=True)
    # the dump(s) extracted, signed as the sensor signs them: same value as their observation
    return MaterializeResult(data_version=DataVersion(dump_version(_signed(lay, items))), metadata={
        "files": report.files,
        "bytes": MetadataValue.int(report.bytes),
        "skipped": MetadataValue.json(report.skipped),
        "downloads": table([vars(i) for i in report.items], [
            ("item", "string", "download"), ("kind", "string", "zip, tar, folder ..."),
            ("folder", "string", "sub-folder it was extracted to"), ("files", "int", "files"),
            ("bytes", "int", "bytes"), ("links", "int", "links inside the dump")]),
        "path": path(target),
    })


def _organize_checks(result, policy: str) -> list[AssetCheckResult]:
    kept = len(result.kept)
    conflicts = result.conflicts
    return [
        AssetCheckResult(
            check_name="has_kept_dicoms", passed=kept > 0,
            metadata={"kept": kept, "found": len(result.records)},
            description=None if kept else "no DICOM of this visit could be kept; see the exclusion report",
        ),
        AssetCheckResult(
            check_name="no_conflicting_duplicates", passed=not conflicts,
            metadata={"conflicts": len(conflicts),
                      "files": MetadataValue.json([{"source": r.source, "detail": r.detail} for r in conflicts[:50]])},
        ),
        AssetCheckResult(
            check_name="single_patient_and_study", passed=not result.mixed,
            severity=AssetCheckSeverity.ERROR if policy == "fail" else AssetCheckSeverity.WARN,
            metadata={"patient_ids": len(result.patient_ids), "study_instance_uids": len(result.study_uids)},
            description=("the kept DICOMs carry several PatientIDs or StudyInstanceUIDs; XNAT would refuse "
                         "them as files of multiple imaging sessions") if result.mixed else None,
        ),
    ]


@visit_asset(
    group="ingest",
    kinds={"dicom", "file"},
    deps=[raw_dicoms],
    description=(
        "Every file of the raw dump classified (kept, or excluded with a reason) from its header "
        "alone; the kept DICOMs laid out flat in `dicom/<session>/<participant>/` as "
        "`<SOPInstanceUID>.dcm` (relative symlinks by default). Report: `logs/organize/<visit>_files.tsv`. "
        "Metadata: counts per reason, series table, excluded files, QC montage."
    ),
    check_specs=[
        AssetCheckSpec("has_kept_dicoms", asset="organized_dicoms", blocking=True,
                       description="at least one DICOM of the visit is kept"),
        AssetCheckSpec("no_conflicting_duplicates", asset="organized_dicoms", blocking=True,
                       description="no two files share a SOPInstanceUID with different bytes"),
        AssetCheckSpec("single_patient_and_study", asset="organized_dicoms", blocking=True,
                       description="kept DICOMs carry one PatientID and one StudyInstanceUID"),
    ],
)
def organized_dicoms(context: AssetExecutionContext, dataset: DatasetResource) -> MaterializeResult:
    visit = visit_of(context)
    ds = dataset.open()
    cfg = ds.config
    rules = Rules(cfg.exclude_series, cfg.exclude_derived, cfg.derived_series_markers)
    lay = ds.layout
    report_path = lay.organize_report_path(visit)
    try:
        result = organize_visit(visit.key, lay.raw_dir(visit), lay.dicom_dir(visit), rules, cfg.organize_mode,
                                report_path=report_path)
    except (FileNotFoundError, DicomAssetsError) as exc:
        raise Failure(str(exc)) from None
    counts = result.counts()
    context.log.info(f"{visit.key}: {len(result.records)} files found, {counts['kept']} kept, "
                     f"{len(result.excluded)} excluded " +
                     ", ".join(f"{k}={v}" for k, v in counts.items() if v and k != "kept"))
    montage = build_montage(middle_images(result.kept, lay.dicom_dir(visit)), lay.qc_path(visit))
    for note in montage.notes:
        context.log.warning(f"QC montage: {note}")
    update_visit_status(ds, visit)
    metadata = {
        "qc_montage": qc_markdown(montage, visit.key),
        "found": len(result.records),
        "kept": counts["kept"],
        "excluded": len(result.excluded),
        **{f"excluded_{k}": v for k, v in counts.items() if k != "kept"},
        "series": table(series_rows(result), SERIES_COLUMNS),
        "excluded_files": table(excluded_summary(result), [
            ("source", "string", "path in the raw dump"), ("reason", "string", "reason"),
            ("detail", "string", "why")]),
        "patient_ids": len(result.patient_ids),
        "study_instance_uids": len(result.study_uids),
        "mode": cfg.organize_mode,
        "path": path(lay.dicom_dir(visit)),
        "report": path(report_path),
    }
    if montage.path is not None:
        metadata["qc_montage_png"] = path(montage.path)
    return MaterializeResult(metadata=metadata, check_results=_organize_checks(result, cfg.mixed_visit_policy),
                             data_version=DataVersion(kept_version((r.sop_instance_uid, r.size) for r in result.kept)))


# --------------------------------------------------------------------------- the sensor
def load_cursor(raw: str | None, *keys: str) -> list[dict]:
    """The named maps of a sensor's JSON cursor (empty when missing or unreadable)."""
    try:
        data = json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        data = {}
    return [data.get(k, {}) for k in keys]


def evaluate_downloads(context: SensorEvaluationContext, dataset: DatasetResource,
                       settings: Settings | None = None):
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
    settings = settings or Settings.from_env()

    def classifier():
        return set(ds.manifest.participants), read_dicom_dir_map(lay.dicom_dir_map_path)

    state, cursor_gen, notes, legacy = DownloadsState.for_cursor(lay.state_dir, context.cursor)
    try:
        out = state.tick(cursor_gen, downloads_root=lay.downloads_root, sessions=sessions,
                         ctx_token=context_token(lay.config_path, lay.manifest_path, lay.dicom_dir_map_path, sessions),
                         classifier=classifier, settings=settings, legacy=legacy, notes=notes)
    except DicomAssetsError as exc:
        return SkipReason(f"dataset not usable: {exc}")
    for note in out.notes:
        context.log.warning(note)
    for problem in out.new_problems:
        context.log.warning(problem)
    if out.dropped:
        context.log.info(f"{len(out.dropped)} pending download(s) vanished before they were taken, dropped: "
                         + ", ".join(out.dropped[:5]) + (" ..." if len(out.dropped) > 5 else ""))
    run_requests = [RunRequest(run_key=f"{t.rel}:{t.token}", partition_key=t.visit,
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
        return SensorResult(skip_reason=SkipReason("; ".join(reason) or "no new complete download"),
                            cursor=cursor)
    # every visit of the batch is asked for: the daemon adds those missing (one look-up per key,
    # which it does anyway), so a partition deleted in the UI comes back with its re-delivered dump
    new_keys = sorted({r.partition_key for r in run_requests})
    # each visit taken is observed: its downloads partition gets the signature of its taken dumps
    observed = state.taken_tokens(new_keys)
    shown = ", ".join(r.partition_key for r in run_requests[:20])
    more = f" and {len(run_requests) - 20} more" if len(run_requests) > 20 else ""
    context.log.info(f"{len(run_requests)} complete download(s): {shown}{more}"
                     + (f"; {out.queued} more complete, waiting in order ({settings.batch} per tick)"
                        if out.queued else ""))
    return SensorResult(
        run_requests=run_requests,
        dynamic_partitions_requests=[visits_partitions.build_add_request(new_keys)] if new_keys else [],
        asset_events=[dump_observation(v, items, "downloads_sensor") for v, items in observed.items() if items],
        cursor=cursor,
    )


def build_downloads_sensor(job, minimum_interval_seconds: int = 10, settings: Settings | None = None):
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
