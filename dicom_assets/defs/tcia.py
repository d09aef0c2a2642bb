"""TCIA manifests as a second source of visits: ``tcia_series`` (the ``tcia_sensor`` is in sensors.py).

A manifest dropped into ``downloads/tcia/`` becomes a ``tcia_manifests`` partition; its
``tcia_series`` run downloads the series (resumable), groups them into visits and writes
``downloads/tcia/<name>/resolved.csv``; the sensor then adds those visits to the ``visits``
partitions and runs the same chain as for scanner dumps (``raw_dicoms`` takes the series
zips as the visit's dump; ``xnat_session`` uses the TCIA session label).
"""


from dagster import (
    AssetExecutionContext,
    Backoff,
    DynamicPartitionsDefinition,
    Failure,
    MaterializeResult,
    MetadataValue,
    RetryPolicy,
    asset,
)

from ..core.errors import DicomAssetsError
from ..core.tcia import (
    download_series,
    group_visits,
    manifest_name,
    manifests,
    parse_manifest,
    write_resolved,
)
from .partitions import OWNERS
from .resources import DatasetResource, TciaResource
from .ui import path, table

TCIA_PARTITION_NAME = "tcia_manifests"
tcia_manifests = DynamicPartitionsDefinition(name=TCIA_PARTITION_NAME)


@asset(
    partitions_def=tcia_manifests,
    group_name="tcia",
    kinds={"tcia", "zip"},
    owners=OWNERS,
    retry_policy=RetryPolicy(max_retries=2, delay=5, backoff=Backoff.EXPONENTIAL),
    description=(
        "The series of a TCIA manifest (`downloads/tcia/<name>.tcia` or `.csv`), downloaded from the NBIA server "
        "the manifest names (REST API v4) into `downloads/tcia/<name>/series/` (md5-verified, resumable; a "
        "series the server does not know fails the run unless `tcia_allow_missing_series`), grouped into visits "
        "(one per PatientID and StudyInstanceUID, labelled `<PatientID>`, `<PatientID>_01`, ... by study date) in "
        "`downloads/tcia/<name>/resolved.csv`."
    ),
)
def tcia_series(context: AssetExecutionContext, dataset: DatasetResource, tcia: TciaResource) -> MaterializeResult:
    name = context.partition_key
    ds = dataset.open()
    lay = ds.layout
    found = [m for m in manifests(lay.tcia_root) if manifest_name(m) == name]
    if not found:
        raise Failure(f"no manifest named {name!r} in {lay.tcia_root}", allow_retries=False)
    try:
        manifest = parse_manifest(found[0])
        client = tcia.client(manifest)
    except DicomAssetsError as exc:
        raise Failure(str(exc), allow_retries=False) from None
    if manifest.duplicates:
        context.log.warning(f"{name}: {len(manifest.duplicates)} series listed more than once, downloaded once: "
                            f"{', '.join(manifest.duplicates[:5])}")
    context.log.info(f"{name}: {len(manifest.series)} series from {client.base}")
    results = download_series(client, manifest.series, lay.tcia_series_dir(name), workers=tcia.workers,
                              log=context.log.info)
    failed = [r for r in results if r.status == "failed"]
    missing = [r for r in results if r.status == "missing"]
    series_table = table([vars(r) for r in results], [
        ("uid", "string", "SeriesInstanceUID"), ("status", "string", "downloaded, cached, missing, failed"),
        ("files", "int", "DICOMs"), ("PatientID", "string", ""), ("StudyInstanceUID", "string", ""),
        ("message", "string", "")])
    common = {"manifest": path(found[0]), "api": MetadataValue.url(client.base), "series": series_table,
              "missing_series": MetadataValue.text("\n".join(r.uid for r in missing) or "none")}
    allow_missing = ds.config.tcia_allow_missing_series
    if failed or (missing and not allow_missing):
        # the verified series stay on disk: a new run downloads only the others
        parts = []
        if failed:
            parts.append(f"{len(failed)} could not be downloaded (first: {failed[0].uid}: {failed[0].message})")
        if missing and not allow_missing:
            parts.append(f"{len(missing)} are unknown to {client.server} or not public (first: {missing[0].uid}; "
                         "set tcia_allow_missing_series in global_config.json to go on without them)")
        raise Failure(f"{len(failed) + len(missing)} of {len(results)} series of {name}: " + "; ".join(parts),
                      metadata=common, allow_retries=bool(failed))
    for r in missing:
        context.log.warning(f"series {r.uid}: {r.message}; going on without it (tcia_allow_missing_series)")
    try:
        visits = group_visits(results)
    except DicomAssetsError as exc:  # PatientIDs that name no participant, or two that name one
        raise Failure(f"{name}: {exc}", metadata=common, allow_retries=False) from None
    out = lay.tcia_resolved_path(name)
    write_resolved(out, visits)
    context.log.info(f"{name}: {len(visits)} visit(s) from {len(results) - len(missing)} series -> {out}")
    return MaterializeResult(metadata={
        **common,
        "resolved": path(out),
        "visits": table([{"visit": v.visit, "session_label": v.session_label, "PatientID": v.patient_id,
                          "series": len(v.series)} for v in visits],
                        [("visit", "string", ""), ("session_label", "string", "XNAT session label"),
                         ("PatientID", "string", ""), ("series", "int", "")]),
        "downloaded": sum(r.status == "downloaded" for r in results),
        "cached": sum(r.status == "cached" for r in results),
        "missing": len(missing),
    })
