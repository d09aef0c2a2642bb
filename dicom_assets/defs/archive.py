"""Archive: the reproducible ``visit_tarball`` and the ``visit_metadata`` JSON files."""


import hashlib
import json
from collections import Counter

from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetKey,
    AssetRecordsFilter,
    DataVersion,
    Failure,
    MaterializeResult,
    MetadataValue,
)

from .. import __version__
from ..core.curation import update_visit_status
from ..core.errors import DicomAssetsError
from ..core.metadata import describe_tarball, write_metadata
from ..core.organize import read_kept
from ..core.tarball import annotation_members, organized_files, write_tarball
from .cluster import CPU_QUEUE
from .ingest import organized_dicoms
from .partitions import organized_dir_of, visit_asset, visit_of
from .resources import DatasetResource
from .ui import path, table


@visit_asset(
    queue=CPU_QUEUE,
    group="archive",
    kinds={"tar", "file"},
    deps=[organized_dicoms],
    description=(
        "`store/<study>/<visit>_dicom.tar`: a byte-for-byte reproducible TAR of the visit's organized "
        "DICOMs (sorted, root/root, 0644, mtimes from each DICOM's StudyDate/StudyTime in UTC), and its "
        "annotation files under `annotations/<SeriesInstanceUID>/` (mtime: the latest DICOM time)."
    ),
)
def visit_tarball(context: AssetExecutionContext, dataset: DatasetResource) -> MaterializeResult:
    visit = visit_of(context)
    ds = dataset.open()
    lay = ds.layout
    src = organized_dir_of(lay, visit)
    dest = lay.tarball_path(ds.study, visit)
    try:
        # the folder is checked against the organize report (an independent list of the kept
        # files): a broken link or a missing file fails here, naming it, never a short tarball
        kept = read_kept(lay.organize_report_path(visit))
        files = organized_files(src, expected=kept)
        if not files:
            raise Failure(f"{src}: no organized DICOM to archive for {visit.key}")
        # and the annotation files (a TCIA series'), under annotations/ in the tarball
        notes = annotation_members(lay.annotations_dir(visit), lay.organize_report_path(visit))
        result = write_tarball(files + notes, dest, visit.key)
    except DicomAssetsError as exc:
        raise Failure(str(exc)) from None
    if result.members != len(kept) + len(notes):
        raise Failure(f"{dest}: {result.members} members written but the organize report lists {len(kept)} kept "
                      f"files and {len(notes)} annotation files")
    context.log.info(f"{dest}: {result.members} members, {result.size} bytes, sha256 {result.sha256}")
    update_visit_status(ds, visit)
    return MaterializeResult(data_version=DataVersion(result.sha256), metadata={
        "path": path(dest),
        "size": MetadataValue.int(result.size),
        "members": result.members,
        "sha256": result.sha256,
        "members_without_dicom_time": result.members - result.dicoms_with_time,
        "annotation_files": len(notes),
    })


@visit_asset(
    group="archive",
    kinds={"json", "file"},
    deps=[visit_tarball],
    check_specs=[
        AssetCheckSpec("tarball_unchanged", asset="visit_metadata", blocking=True,
                       description="the tarball described (md5, sha256) is the one visit_tarball wrote: "
                                   "same sha256 as visit_tarball's data version (the sha256 it wrote)"),
        AssetCheckSpec("dicom_count_matches", asset="visit_metadata", blocking=True,
                       description="the metadata lists as many DICOMs as organized_dicoms kept "
                                   "(the kept rows of its report logs/organize/<visit>_files.tsv)"),
        AssetCheckSpec("paths_exist_in_tarball", asset="visit_metadata", blocking=True,
                       description="every path of the written metadata JSON exists in the tarball"),
    ],
    description=(
        "`<visit>_metadata_tarball.json` (size, md5, sha256, storepath, dspath, ...) and "
        "`<visit>_metadata_dicoms.json` (per DICOM: path in the tar, md5, size, series tags), read from "
        "the tarball itself in one streaming pass."
    ),
)
def visit_metadata(context: AssetExecutionContext, dataset: DatasetResource) -> MaterializeResult:
    visit = visit_of(context)
    ds = dataset.open()
    lay = ds.layout
    tar = lay.tarball_path(ds.study, visit)
    if not tar.is_file():
        raise Failure(f"{tar}: no tarball for {visit.key}; materialize visit_tarball first")
    try:
        meta = describe_tarball(tar, visit=visit.key, study=ds.study, participant=visit.participant,
                                session=visit.session, tool_version=__version__)
    except DicomAssetsError as exc:
        raise Failure(str(exc)) from None
    tj, dj = lay.metadata_tarball_path(ds.study, visit), lay.metadata_dicoms_path(ds.study, visit)
    write_metadata(meta, tj, dj)
    update_visit_status(ds, visit)
    series = Counter((d["SeriesNumber"], d["SeriesDescription"], d["Modality"], d["ProtocolName"])
                     for d in meta.dicoms)
    rows = [{"series_number": k[0], "series_description": k[1], "modality": k[2], "protocol_name": k[3],
             "files": n} for k, n in sorted(series.items(), key=lambda kv: (kv[0][0] is None, kv[0][0] or 0))]
    dj_bytes = dj.read_bytes()  # read back once: for the checks and for the data version (its md5)
    checks = _metadata_checks(context, ds, visit, tj, json.loads(dj_bytes), meta)
    version = DataVersion(hashlib.md5(dj_bytes).hexdigest())
    return MaterializeResult(check_results=checks, data_version=version, metadata={
        "dicoms": meta.tarball["dicoms"],
        "members": meta.tarball["members"],
        "md5": meta.tarball["md5"],
        "sha256": meta.tarball["sha256"],
        "content_time": meta.tarball["content_time"],
        "series": table(rows, [("series_number", "int", "SeriesNumber"),
                               ("series_description", "string", "SeriesDescription"),
                               ("protocol_name", "string", "ProtocolName"), ("modality", "string", "Modality"),
                               ("files", "int", "DICOMs in the tarball")]),
        "metadata_tarball": path(tj),
        "metadata_dicoms": path(dj),
    })


def _metadata_checks(context, ds, visit, tj_path, written_dj: list, meta) -> list[AssetCheckResult]:
    # the sha256 visit_tarball recorded for this visit (its metadata, and its data version) in
    # its latest materialization, read through the instance's public records API
    records = context.instance.fetch_materializations(
        AssetRecordsFilter(asset_key=AssetKey("visit_tarball"), asset_partitions=[visit.key]), limit=1).records
    entry = records[0].asset_materialization.metadata.get("sha256") if records else None
    recorded = entry.value if entry is not None else None
    actual = meta.tarball["sha256"]
    written_tj = json.loads(tj_path.read_text())
    try:  # from the organize report, not from a listing of the folder the tarball was made of
        kept: int | str = len(read_kept(ds.layout.organize_report_path(visit)))
    except DicomAssetsError as exc:
        kept = f"unknown: {exc}"
    missing = [d["path"] for d in written_dj if d["path"] not in meta.member_names]
    return [
        AssetCheckResult(
            check_name="tarball_unchanged", passed=recorded is not None and recorded == actual == written_tj["sha256"],
            metadata={"tarball_sha256_now": actual, "sha256_when_written": recorded or "(no record)",
                      "metadata_sha256": written_tj["sha256"], "metadata_md5": written_tj["md5"]},
            description=None if recorded == actual else
            "the tarball changed since visit_tarball wrote it: re-materialize visit_tarball",
        ),
        AssetCheckResult(
            check_name="dicom_count_matches", passed=kept == written_tj["dicoms"] == len(written_dj),
            metadata={"kept": kept, "metadata_dicoms": written_tj["dicoms"], "listed": len(written_dj)},
        ),
        AssetCheckResult(
            check_name="paths_exist_in_tarball", passed=not missing,
            metadata={"missing": len(missing), "examples": MetadataValue.json(missing[:20])},
        ),
    ]
