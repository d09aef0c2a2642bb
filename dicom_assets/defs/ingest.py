"""Ingest: the downloads sensor, ``raw_dicoms`` and ``organized_dicoms``."""


import json
from dataclasses import replace

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    Failure,
    MaterializeResult,
    MetadataValue,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from ..core.curation import update_curation_status
from ..core.dicomscan import Rules
from ..core.downloads import (ITEM_FORMATS, DownloadItem, items_for_visit, problems_for_participant,
                               read_dicom_dir_map, scan_downloads, signature)
from ..core.errors import DicomAssetsError
from ..core.extract import ExtractLimits, extract_visit
from ..core.organize import excluded_summary, organize_visit, series_rows
from ..core.tcia import find_visit as find_tcia_visit
from ..core.qc import build_montage, middle_images
from .partitions import sensor_default_status, VISITS_PARTITION_NAME, visit_asset, visit_of, visits_partitions
from .resources import DatasetResource
from .ui import SERIES_COLUMNS, path, qc_markdown, table

VISIT_TAG = "dicom_assets/visit"
DOWNLOAD_TAG = "dicom_assets/download"


@visit_asset(
    group="ingest",
    kinds={"dicom", "file"},
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
    tcia = find_tcia_visit(lay.tcia_root, visit.key)
    if tcia is not None:  # a visit of a TCIA manifest: its series zips are the dump
        missing = [z for z in tcia.zips if not z.is_file()]
        if missing:
            raise Failure(f"TCIA visit {visit.key}: {len(missing)} series zip(s) missing, first {missing[0]}; "
                          "materialize tcia_series of its manifest again")
        items = [DownloadItem(z, visit.session, "zip") for z in tcia.zips]
    elif not ds.manifest.has_visit(visit):
        raise Failure(f"visit {visit.key} is not in the manifest {ds.layout.manifest_path}")
    else:
        dir_map = read_dicom_dir_map(lay.dicom_dir_map_path)
        items = items_for_visit(lay.downloads_root, visit, set(ds.manifest.participants), dir_map)
        if not items:
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
        report = extract_visit(items, target, ExtractLimits.from_config(ds.config.limits))
    except DicomAssetsError as exc:
        raise Failure(str(exc)) from None
    for skipped in report.skipped:
        context.log.warning(f"{visit.key}: not extracted: {skipped}")
    report_path = lay.extract_report_path(visit)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps({"target": report.target, "items": [vars(i) for i in report.items]},
                                      indent=2, sort_keys=True) + "\n")
    update_curation_status(ds)
    return MaterializeResult(metadata={
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
    update_curation_status(ds)
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
    return MaterializeResult(metadata=metadata, check_results=_organize_checks(result, cfg.mixed_visit_policy))


# --------------------------------------------------------------------------- the sensor
def load_cursor(raw: str | None, *keys: str) -> list[dict]:
    """The named maps of a sensor's JSON cursor (empty when missing or unreadable)."""
    try:
        data = json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        data = {}
    return [data.get(k, {}) for k in keys]


def evaluate_downloads(context: SensorEvaluationContext, dataset: DatasetResource):
    """One tick: new complete downloads -> new visit partitions + one run each."""
    try:
        ds = dataset.open()
        participants = set(ds.manifest.participants)
        dir_map = read_dicom_dir_map(ds.layout.dicom_dir_map_path)
    except DicomAssetsError as exc:
        return SkipReason(f"dataset not usable: {exc}")
    pending, submitted, reported = load_cursor(context.cursor, "pending", "submitted", "reported")
    new_pending: dict[str, str] = {}
    run_requests: list[RunRequest] = []
    waiting, problems = [], []
    for s in scan_downloads(ds.layout.downloads_root, ds.config.sessions, participants, dir_map):
        rel = f"{s.item.session}/{s.item.name}"
        try:
            token = signature(s.item.path).token() if s.item.kind != "none" else str(s.item.path.lstat().st_mtime_ns)
        except FileNotFoundError:
            continue  # vanished between listing and stat
        except OSError as exc:  # no permission, a link loop: reported, never a crashed tick
            s = replace(s, visit=None, problem=f"'{rel}' cannot be read ({exc.strerror or exc})")
            token = "unreadable"
        if s.problem:
            problems.append(s.problem)
            if reported.get(rel) != token:
                context.log.warning(s.problem)
                reported[rel] = token
            continue
        if submitted.get(rel) == token:
            continue
        if not (s.done_marker or pending.get(rel) == token):
            new_pending[rel] = token  # seen once: wait one tick for size and mtime to settle
            waiting.append(rel)
            continue
        visit = s.visit.key
        run_requests.append(RunRequest(
            run_key=f"{rel}:{token}",
            partition_key=visit,
            tags={VISIT_TAG: visit, DOWNLOAD_TAG: rel},
        ))
        submitted[rel] = token
    existing = set(context.instance.get_dynamic_partitions(VISITS_PARTITION_NAME))
    new_keys = sorted({r.partition_key for r in run_requests} - existing)
    cursor = json.dumps({"pending": new_pending, "submitted": submitted, "reported": reported},
                        sort_keys=True, separators=(",", ":"))
    if not run_requests:
        reason = []
        if waiting:
            reason.append(f"{len(waiting)} download(s) still arriving or not yet stable: {', '.join(waiting[:5])}")
        if problems:
            reason.append(f"{len(problems)} download(s) not taken: {problems[0]}"
                          + (f" (and {len(problems) - 1} more, in the sensor's log)" if len(problems) > 1 else ""))
        return SensorResult(skip_reason=SkipReason("; ".join(reason) or "no new complete download"),
                            cursor=cursor)
    shown = ", ".join(r.partition_key for r in run_requests[:20])
    more = f" and {len(run_requests) - 20} more" if len(run_requests) > 20 else ""
    context.log.info(f"{len(run_requests)} complete download(s): {shown}{more}")
    return SensorResult(
        run_requests=run_requests,
        dynamic_partitions_requests=[visits_partitions.build_add_request(new_keys)] if new_keys else [],
        cursor=cursor,
    )


def build_downloads_sensor(job, minimum_interval_seconds: int = 10):
    @sensor(
        name="downloads_sensor",
        job=job,
        minimum_interval_seconds=minimum_interval_seconds,
        default_status=sensor_default_status(),
        description=(
            "Watches downloads/<session>/ for complete scanner dumps (size and mtime unchanged over two "
            "ticks, or a <item>.done marker), adds their visit partitions and runs the chain for each "
            "new or re-delivered dump."
        ),
    )
    def downloads_sensor(context: SensorEvaluationContext, dataset: DatasetResource):
        return evaluate_downloads(context, dataset)

    return downloads_sensor
