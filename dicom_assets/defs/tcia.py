"""TCIA manifests as a second source of visits: ``tcia_series`` and the ``tcia_sensor``.

A manifest dropped into ``downloads/tcia/`` becomes a ``tcia_manifests`` partition; its
``tcia_series`` run downloads the series (resumable), groups them into visits and writes
``downloads/tcia/<name>/resolved.csv``; the sensor then adds those visits to the ``visits``
partitions and runs the same chain as for scanner dumps (``raw_dicoms`` takes the series
zips as the visit's dump; ``xnat_session`` uses the TCIA session label).
"""

import json
import os
from typing import Literal

from dagster import (
    AssetExecutionContext,
    Backoff,
    ConfigurableResource,
    DynamicPartitionsDefinition,
    Failure,
    MaterializeResult,
    MetadataValue,
    RetryPolicy,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    asset,
    define_asset_job,
    sensor,
)
from pydantic import Field

from ..core.downloads import signature
from ..core.errors import DicomAssetsError
from ..core.tcia import (
    DEFAULT_API_VERSION,
    PUBLIC_SERVERS,
    NbiaClient,
    TciaManifest,
    download_series,
    group_visits,
    manifest_name,
    manifest_server,
    manifests,
    parse_manifest,
    read_resolved,
    write_resolved,
)
from .ingest import VISIT_TAG, load_cursor
from .partitions import sensor_default_status, OWNERS, VISITS_PARTITION_NAME, visits_partitions
from .resources import DatasetResource
from .ui import path, table

TCIA_PARTITION_NAME = "tcia_manifests"
tcia_manifests = DynamicPartitionsDefinition(name=TCIA_PARTITION_NAME)


class TciaResource(ConfigurableResource):
    """The NBIA servers that serve TCIA's series, and how to use their REST API.

    A ``.tcia`` manifest names its server (``downloadServerUrl``): its series are asked there,
    if it is one of ``servers``; a CSV export names none and goes to the first of ``servers``."""

    servers: list[str] = Field(default=list(PUBLIC_SERVERS),
                               description="NBIA servers manifests may name; the first is the default (TCIA_SERVERS, "
                                           "comma-separated)")
    api_version: Literal["v4", "v1"] = Field(default=DEFAULT_API_VERSION,
                                             description="NBIA REST API version: v4 (default, tcia_utils') or v1 "
                                                         "(the Data Retriever's) (TCIA_API_VERSION)")
    workers: int = Field(default=2, description="series downloaded in parallel")
    retries: int = Field(default=4, description="retries of a failing series, with exponential backoff")
    backoff: float = Field(default=1.0, description="seconds before the first retry")

    def client(self, manifest: TciaManifest) -> NbiaClient:
        return NbiaClient(manifest_server(manifest, self.servers), self.api_version, retries=self.retries,
                          backoff=self.backoff)


def tcia_resource_from_env() -> TciaResource:
    servers = [s.strip() for s in os.environ.get("TCIA_SERVERS", "").split(",") if s.strip()]
    return TciaResource(servers=servers or list(PUBLIC_SERVERS),
                        api_version=os.environ.get("TCIA_API_VERSION", DEFAULT_API_VERSION))


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
    visits = group_visits(results)
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


tcia_job = define_asset_job("tcia_download", selection=[tcia_series],
                            description="Download and group the series of one TCIA manifest.")


def evaluate_tcia(context: SensorEvaluationContext, dataset: DatasetResource, chain_job_name: str):
    """New stable manifests -> tcia_download runs; new resolved visits -> chain runs."""
    try:
        lay = dataset.open().layout
    except DicomAssetsError as exc:
        return SkipReason(f"dataset not usable: {exc}")
    pending, submitted, resolved = load_cursor(context.cursor, "pending", "submitted", "resolved")
    new_pending, requests, new_manifests, new_visits = {}, [], [], []
    for m in manifests(lay.tcia_root):
        name = manifest_name(m)
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
                                       job_name=chain_job_name, tags={VISIT_TAG: visit}))
    cursor_out = json.dumps({"pending": new_pending, "submitted": submitted, "resolved": resolved}, sort_keys=True)
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


