"""Ingest: the ``downloads`` source asset, ``raw_dicoms`` and ``organized_dicoms`` (the downloads
sensor is in sensors.py)."""


import json

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
    observable_source_asset,
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
from ..core.errors import DicomAssetsError
from ..core.extract import extract_visit
from ..core.ids import parse_visit_key
from ..core.layout import DatasetLayout
from ..core.organize import excluded_summary, organize_visit, series_rows
from ..core.qc import build_montage, middle_images
from ..core.sources import DUMP, tcia_visits, visit_source
from ..core.versions import dump_version, kept_version
from ..settings import current as current_settings
from .cluster import CPU_QUEUE
from .dicomnode import dicom_node_study
from .lineage import DOWNLOADS
from .partitions import visit_asset, visit_of, visits_partitions
from .resources import DatasetResource
from .ui import SERIES_COLUMNS, path, qc_markdown, table


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
    tcia = tcia_visits(ds.layout)  # once, not once per visit
    out = {}
    for key in keys:
        # a visit's dump(s): the series zips of a TCIA visit, else its items in downloads/<session>/
        items = visit_source(ds, parse_visit_key(key), tcia=tcia).dumps(ds)
        if items:
            out[key] = DataVersion(dump_version(_signed(ds.layout, items)))
    return DataVersionsByPartition(out)


def _signed(lay: DatasetLayout, items: list[DownloadItem]) -> list[tuple[str, str]]:
    """(path under downloads/, signature token) of each dump, as the sensor signs them."""
    return [(i.path.relative_to(lay.downloads_root).as_posix(), signature(i.path).token()) for i in items]


@visit_asset(
    group="ingest",
    kinds={"dicom", "file"},
    deps=[downloads, dicom_node_study],
    description=(
        "The visit's scanner dump(s) from `downloads/<session>/` (and the studies the DICOM node sent, "
        "`downloads/dicom_node/<visit>/`), extracted safely into "
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
            not_taken = problems_for_participant(lay, visit, set(ds.manifest.participants), dir_map)
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
    queue=CPU_QUEUE,
    group="ingest",
    kinds={"dicom", "file"},
    deps=[raw_dicoms],
    description=(
        "Every file of the raw dump classified (kept, or excluded with a reason) from its header "
        "alone; the kept DICOMs laid out flat in `dicom/<session>/<participant>/` as "
        "`<SOPInstanceUID>.dcm` (relative symlinks by default); a TCIA series' annotation files in "
        "`annotations/<session>/<participant>/<SeriesInstanceUID>/`. Report: `logs/organize/<visit>_files.tsv`. "
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
                                report_path=report_path, workers=current_settings().organize_workers,
                                annotations=visit_source(ds, visit).annotations(ds),
                                annotations_dir=lay.annotations_dir(visit))
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
    notes = result.annotations
    if notes:
        context.log.info(f"{visit.key}: {len(notes)} annotation file(s) in {lay.annotations_dir(visit)}")
        metadata["annotations"] = len(notes)
        metadata["annotation_files"] = table(
            [{"file": r.dest, "bytes": r.size} for r in notes[:200]],
            [("file", "string", "<SeriesInstanceUID>/<name> in the visit's annotations folder"),
             ("bytes", "int", "size")])
        metadata["annotations_path"] = path(lay.annotations_dir(visit))
    if montage.path is not None:
        metadata["qc_montage_png"] = path(montage.path)
    return MaterializeResult(metadata=metadata, check_results=_organize_checks(result, cfg.mixed_visit_policy),
                             data_version=DataVersion(kept_version((r.sop_instance_uid, r.size) for r in result.kept)))


# --------------------------------------------------------------------------- the sensor
