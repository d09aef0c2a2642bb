"""TCIA manifests as a second source of visits: ``tcia_series`` (the ``tcia_sensor`` is in sensors.py).

A manifest dropped into ``downloads/tcia/`` becomes a ``tcia_manifests`` partition; its
``tcia_series`` run downloads the series (resumable), groups them into visits labelled by the
dataset's study register (``tabular/tcia_studies.csv``) and writes
``downloads/tcia/<name>/resolved.csv``; the sensor then adds those visits to the ``visits``
partitions and runs the same chain as for scanner dumps (``raw_dicoms`` takes the series
zips as the visit's dump; ``xnat_session`` uses the TCIA session label). A visit one of whose
series failed waits; the run fails naming it, and the sensor requests the manifest again later.
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
    manifest_files,
    parse_manifest,
    register_visits,
    write_resolved,
    write_series_table,
)
from .partitions import OWNERS
from .resources import DatasetResource, TciaResource
from .ui import path, table

TCIA_PARTITION_NAME = "tcia_manifests"
tcia_manifests = DynamicPartitionsDefinition(name=TCIA_PARTITION_NAME)
#: rows shown in a metadata table; the whole table is the linked file
TABLE_ROWS = 100


def _open_manifest(lay, name: str, tcia: TciaResource):
    try:
        found = manifest_files(lay.tcia_root).get(name)
        if found is None:
            raise Failure(f"no manifest named {name!r} in {lay.tcia_root}", allow_retries=False)
        manifest = parse_manifest(found)
        return found, manifest, tcia.clients(manifest)
    except DicomAssetsError as exc:
        raise Failure(str(exc), allow_retries=False) from None


def _waiting_rows(done, results) -> list[dict]:
    by_uid = {r.uid: r for r in results}
    return [{"PatientID": p, "StudyInstanceUID": s, "failed_series": len(uids),
             "reason": by_uid[uids[0]].message[:300]} for (p, s), uids in sorted(done.waiting.items())]


@asset(
    partitions_def=tcia_manifests,
    group_name="tcia",
    kinds={"tcia", "zip"},
    owners=OWNERS,
    retry_policy=RetryPolicy(max_retries=2, delay=5, backoff=Backoff.EXPONENTIAL),
    description=(
        "The series of a TCIA manifest (`downloads/tcia/<name>.tcia` or `.csv`), downloaded from the NBIA server "
        "the manifest names (REST API v4, v1 where v4 is not deployed; a retired TCIA host: today's public "
        "servers) into `downloads/tcia/<name>/series/` (md5-verified, resumable, with the annotation files the "
        "manifest asks for; a series the server does not know fails the run unless `tcia_allow_missing_series`), "
        "grouped into visits (one per PatientID and StudyInstanceUID, labelled `<PatientID>`, `<PatientID>_01`, ... "
        "by study date, once and for good across manifests: `tabular/tcia_studies.csv`) in "
        "`downloads/tcia/<name>/resolved.csv`; every series' outcome in `downloads/tcia/<name>/series.csv`. A "
        "visit with a failed series waits; the others go on."
    ),
)
def tcia_series(context: AssetExecutionContext, dataset: DatasetResource, tcia: TciaResource) -> MaterializeResult:
    name = context.partition_key
    ds = dataset.open()
    lay = ds.layout
    found, manifest, clients = _open_manifest(lay, name, tcia)
    if manifest.duplicates:
        context.log.warning(f"{name}: {len(manifest.duplicates)} series listed more than once, downloaded once: "
                            f"{', '.join(manifest.duplicates[:5])}")
    if manifest.server and manifest.server not in [c.server for c in clients]:
        context.log.warning(f"{name}: its downloadServerUrl names {manifest.server}; asked at "
                            f"{', '.join(c.server for c in clients)} (a retired TCIA host, or another scheme)")
    context.log.info(f"{name}: {len(manifest.series)} series from {', '.join(c.base for c in clients)}"
                     + (" with their annotation files" if manifest.include_annotation else ""))
    results = download_series(clients, manifest.series, lay.tcia_series_dir(name), workers=tcia.workers,
                              annotations=manifest.include_annotation, log=context.log.info)
    for note in (n for c in clients for n in c.notes):
        context.log.warning(note)
    failed = [r for r in results if r.status == "failed"]
    missing = [r for r in results if r.status == "missing"]
    allow_missing = ds.config.tcia_allow_missing_series
    series_csv = lay.tcia_series_table_path(name)
    counts = {k: sum(r.status == k for r in results) for k in ("downloaded", "cached", "missing", "failed")}
    common = {"manifest": path(found),
              "api": MetadataValue.text(", ".join(c.base for c in clients)),
              "series_table": path(series_csv), **counts,
              "annotation_files": sum(r.annotations for r in results),
              "missing_series": MetadataValue.text("\n".join(r.uid for r in missing[:TABLE_ROWS]) or "none")}
    if missing and not allow_missing:
        write_series_table(series_csv, results, [])
        raise Failure(f"{len(missing)} of {len(results)} series of {name} are unknown to "
                      f"{' and '.join(c.server for c in clients)} or not public (first: {missing[0].uid}; set "
                      "tcia_allow_missing_series in global_config.json to go on without them)"
                      + (f"; {len(failed)} could not be downloaded" if failed else ""),
                      metadata=common, allow_retries=False)
    for r in missing:
        context.log.warning(f"series {r.uid}: {r.message}; going on without it (tcia_allow_missing_series)")
    try:
        done = register_visits(lay.tcia_studies_path, results, name)
    except DicomAssetsError as exc:  # PatientIDs that name no participant, or two that name one
        write_series_table(series_csv, results, [])
        raise Failure(f"{name}: {exc}", metadata=common, allow_retries=False) from None
    write_series_table(series_csv, results, done.visits)
    for note in done.out_of_order:
        context.log.warning(f"{name}: {note}")
    out = lay.tcia_resolved_path(name)
    if done.visits or not (failed or out.exists()):
        write_resolved(out, done.visits)
    visits_md = {
        "resolved": path(out), "visits_ready": len(done.visits), "visits_waiting": len(done.waiting),
        "visits": table([{"visit": v.visit, "session_label": v.session_label, "PatientID": v.patient_id,
                          "series": len(v.series)} for v in done.visits[:TABLE_ROWS]],
                        [("visit", "string", ""), ("session_label", "string", "XNAT session label"),
                         ("PatientID", "string", ""), ("series", "int", "")]),
        "out_of_order": MetadataValue.text("\n".join(done.out_of_order) or "none"),
    }
    context.log.info(f"{name}: {len(done.visits)} visit(s) ready, {len(done.waiting)} waiting -> {out}")
    if failed:
        # the verified series stay on disk: a new run (the sensor's, later) downloads only the others
        waiting = _waiting_rows(done, results)
        held = (f"; no visit of this manifest can be known complete: {len(done.unattributed)} failed series "
                f"belong to a study getSeries never named (first: {done.unattributed[0]})"
                if done.unattributed else "")
        raise Failure(
            f"{len(failed)} of {len(results)} series of {name} could not be downloaded (first: {failed[0].uid}: "
            f"{failed[0].message}); {len(done.waiting)} visit(s) wait for them, {len(done.visits)} go on{held}",
            metadata={**common, **visits_md, "waiting": table(waiting[:TABLE_ROWS], [
                ("PatientID", "string", ""), ("StudyInstanceUID", "string", ""),
                ("failed_series", "int", "series of the study that could not be downloaded"),
                ("reason", "string", "the first one's")])},
            allow_retries=False)  # each series was retried already; the tcia_sensor asks again later
    return MaterializeResult(metadata={**common, **visits_md})
