"""Publish: the ``datalad_dataset`` and ``visit_catalog`` assets and the ``xnat_session`` asset
(the XNAT connection resource is in resources.py)."""

import json

from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetExecutionContext,
    Backoff,
    DataVersion,
    Failure,
    MaterializeResult,
    MetadataValue,
    RetryPolicy,
)

from ..core.catalog import update_catalog
from ..core.curation import update_visit_status
from ..core.datalad_index import DataladError, catalog_entry, index_visit
from ..core.errors import DicomAssetsError
from ..core.sources import visit_source
from ..core.tarball import annotation_members
from ..core.versions import xnat_version
from ..core.xnat import (
    XnatAuthError,
    XnatError,
    XnatTransientError,
    compare_series,
    expected_names,
    foreign_names,
    load_dicoms_json,
    select_files,
    upload_visit,
)
from ..settings import current as current_settings
from .archive import visit_metadata
from .cluster import XNAT_QUEUE
from .ingest import organized_dicoms
from .partitions import not_applicable, visit_asset, visit_of
from .resources import DatasetResource, XnatResource
from .ui import path, table

#: the session resource of a TCIA visit's annotation files (LIDC-IDRI's radiologist XML, ...)
ANNOTATIONS_RESOURCE = "ANNOTATIONS"


@visit_asset(
    group="publish",
    kinds={"datalad", "git"},
    deps=[visit_metadata],
    description=(
        "`datalad/<study>/<visit>/`: a DataLad dataset indexing every DICOM of the visit tarball without "
        "copying it (md5 keys from the metadata JSON, `dl+archive:` URLs into the tarball claimed by "
        "datalad-next's archivist, the tarball's store URL claimed by uncurl), with the series tags as "
        "git-annex metadata; deposited beside the tarball as `<visit>_XDLRA--refs`/`--repo-export` so it "
        "can be cloned from the store. Same tarball: HEAD unchanged; new tarball: one new commit. Records "
        "written directly in git-annex's formats (one git fast-import; DICOM_ASSETS_DATALAD_WRITER=batch "
        "for the git-annex batch-command reference)."
    ),
)
def datalad_dataset(context: AssetExecutionContext, dataset: DatasetResource) -> MaterializeResult:
    visit = visit_of(context)
    ds = dataset.open()
    lay = ds.layout
    tj, dj = lay.metadata_tarball_path(ds.study, visit), lay.metadata_dicoms_path(ds.study, visit)
    for p in (tj, dj):
        if not p.is_file():
            raise Failure(f"{p}: no metadata for {visit.key}; materialize visit_metadata first")
    try:
        res = index_visit(lay.datalad_dir(ds.study, visit), visit=visit.key, study=ds.study,
                          tarball_meta=json.loads(tj.read_text()), dicoms_meta=json.loads(dj.read_text()),
                          store_dir=lay.store_dir(ds.study), store_base_url=ds.config.datalad_store_url,
                          superdataset=ds.config.datalad_superdataset, writer=current_settings().datalad_writer)
    except DataladError as exc:
        raise Failure(str(exc)) from None
    update_visit_status(ds, visit)
    t = res.timings
    context.log.info(f"{res.path}: {'new commit' if res.changed else 'unchanged'} {res.commit[:12]}, "
                     f"{res.files} DICOMs in {t.get('index', 0):.1f} s (git-annex {t.get('git_annex', 0):.1f} s), "
                     f"deposit {t.get('deposit', 0):.1f} s")
    return MaterializeResult(data_version=DataVersion(res.commit), metadata={
        "path": path(res.path),
        "dataset_id": res.dataset_id,
        "version": res.commit,
        "changed": res.changed,
        "files": res.files,
        "annotation_files": res.annotations,
        "tarball_key": res.tarball_key,
        "clone": MetadataValue.md(f"```\ndatalad clone '{res.clone_url}' {visit.key}\n```"),
        "deposit": MetadataValue.json(res.deposit),
        "series": table(res.series, [("series", "string", "view folder (git annex view series=*)"),
                                     ("SeriesDescription", "string", ""), ("ProtocolName", "string", ""),
                                     ("Modality", "string", ""), ("files", "int", "DICOMs")]),
        "seconds": MetadataValue.json({k: round(v, 2) for k, v in t.items()}),
    })


@visit_asset(
    group="publish",
    kinds={"html"},
    deps=[datalad_dataset],
    description=("`catalog/index.html`: a static page listing the visits' DataLad datasets (id, version, "
                 "clone command) and their series; one entry per visit, replaced in place on re-runs."),
)
def visit_catalog(context: AssetExecutionContext, dataset: DatasetResource) -> MaterializeResult:
    visit = visit_of(context)
    ds = dataset.open()
    try:
        entry = catalog_entry(ds.layout.datalad_dir(ds.study, visit))
    except DataladError as exc:
        raise Failure(f"{exc}; materialize datalad_dataset first") from None
    entry.update(participant=visit.participant, session=visit.session, study=ds.study)
    page = update_catalog(ds.layout, entry)
    return MaterializeResult(metadata={"page": path(page), "dataset_id": entry["dataset_id"],
                                       "version": entry["version"]})


@visit_asset(
    queue=XNAT_QUEUE,
    group="publish",
    kinds={"xnat"},
    deps=[organized_dicoms, visit_metadata],
    pool="xnat_upload",
    output_required=False,  # no XNAT configured: the step has nothing to do and records no upload
    retry_policy=RetryPolicy(max_retries=3, delay=2, backoff=Backoff.EXPONENTIAL),
    check_specs=[AssetCheckSpec("scans_match_series", asset="xnat_session", blocking=True,
                                description="every kept, non-excluded series of the visit is on XNAT whole "
                                            "(its instances, in whatever scans and DICOM/secondary resources XNAT "
                                            "built), minus what XNAT's import filter drops, and nothing else")],
    description=(
        "The visit uploaded to the XNAT project of `global_config.json` (created when missing): subject = "
        "participant, session label from `session_label_pattern`; excluded series are not sent; re-runs do "
        "not duplicate (compared by the `<SOPInstanceUID>.dcm` names of each scan's DICOM resource); labels are "
        "cleaned as XNAT cleans them (mapping in `logs/xnat/<visit>.json`); the metadata JSON files are attached "
        "as resource `METADATA`, a TCIA visit's annotation files as resource `ANNOTATIONS` (`<SeriesInstanceUID>/<name>`)."
    ),
)
def xnat_session(context: AssetExecutionContext, dataset: DatasetResource, xnat: XnatResource):
    visit = visit_of(context)
    if not xnat.configured:
        yield from not_applicable(context, visit, "xnat_session", ["scans_match_series"],
                                  "no XNAT configured (XNAT_HOST is not set): nothing uploaded")
        return
    ds = dataset.open()
    cfg, lay = ds.config, ds.layout
    if not cfg.xnat_project:
        raise Failure(f"{lay.config_path}: no 'xnat_project' set; cannot upload {visit.key}", allow_retries=False)
    dj = lay.metadata_dicoms_path(ds.study, visit)
    if not dj.is_file():
        raise Failure(f"{dj}: no metadata for {visit.key}; materialize visit_metadata first", allow_retries=False)
    files, excluded = select_files(load_dicoms_json(dj), lay.dicom_dir(visit), cfg.exclude_series)
    source = visit_source(ds, visit)  # TCIA's convention: subject = PatientID, session <PatientID>[_NN]
    subject, label, project_files = source.subject, source.session_label, source.project_files
    marker = lay.xnat_marker_path(visit.key)
    known_filtered = frozenset()
    if marker.is_file():  # files XNAT's import filter dropped on an earlier upload: not "missing"
        try:
            known_filtered = frozenset(json.loads(marker.read_text()).get("filtered_by_xnat") or ())
        except (ValueError, AttributeError):
            context.log.warning(f"{marker}: unreadable; earlier filtered files are not known")
    try:  # a TCIA visit's annotation files, as the session resource ANNOTATIONS (<series>/<name>)
        notes = annotation_members(lay.annotations_dir(visit), lay.organize_report_path(visit))
    except DicomAssetsError as exc:
        raise Failure(str(exc), allow_retries=False) from None
    resources = {ANNOTATIONS_RESOURCE: [(p, arc.split("/", 1)[1]) for p, arc in notes]} if notes else {}
    try:
        with xnat.connect() as session:
            result = upload_visit(
                session, server=xnat.url, project=cfg.xnat_project, subject=subject, project_files=project_files,
                session_label=label, files=files, excluded=excluded,
                metadata_files=[lay.metadata_tarball_path(ds.study, visit), dj],
                session_resources=resources,
                policy=cfg.xnat_duplicate_policy, workdir=lay.xnat_upload_dir, log=context.log.info,
                known_filtered=known_filtered,
                # what is being sent, beside the marker: a retry completes its own unfinished upload
                pending_path=lay.xnat_pending_path(visit.key), reconnect=xnat.login)
    except XnatAuthError as exc:
        raise Failure(str(exc), allow_retries=False) from None
    except XnatTransientError:
        raise  # retried by the RetryPolicy
    except XnatError as exc:
        raise Failure(str(exc), allow_retries=False) from None
    for w in result.warnings:
        context.log.warning(w)
    marker.parent.mkdir(parents=True, exist_ok=True)
    url = f"{xnat.url.rstrip('/')}{result.session_uri}"
    marker.write_text(json.dumps({"project": result.project, "subject": result.subject,
                                  "session_label": result.session_label, "uri": result.session_uri,
                                  "status": result.status, "files_sent": result.files_sent,
                                  "labels": result.labels, "filtered_by_xnat": result.filtered,
                                  "warnings": result.warnings}, indent=2) + "\n")
    update_visit_status(ds, visit)
    # the kept, non-excluded series, minus what XNAT's own import filter dropped (reported), against
    # what XNAT's scans hold (matched by instance names: XNAT numbers scans and splits DICOM from
    # secondary its own way)
    filtered = set(result.filtered)
    series = compare_series([f for f in files if f.arcname not in filtered], result.held)
    foreign = len(foreign_names(expected_names(files), result.held))  # XNAT's, not this visit's
    have = {s["scan"]: s["files"] for s in result.scans}
    complete = all(r["on_xnat"] == r["expected"] for r in series) and foreign == 0
    context.log.info(f"{visit.key}: {result.status} as {result.project}/{result.subject}/{result.session_label}")
    yield MaterializeResult(
        data_version=DataVersion(xnat_version(result.session_uri, have)),
        metadata={
            "status": result.status,
            "xnat_session": MetadataValue.url(url),
            "project": result.project,
            "session_label": result.session_label,
            "xnat_labels": MetadataValue.json(result.labels),
            "files_sent": result.files_sent,
            "bytes_sent": MetadataValue.int(result.bytes_sent),
            "scans": table([{"scan": k, "files": v} for k, v in sorted(have.items())],
                           [("scan", "string", "XNAT's scan ID"),
                            ("files", "int", "DICOM files in its DICOM and secondary resources")]),
            "series": table(series, [("series_number", "int", "SeriesNumber"),
                                     ("series_description", "string", "SeriesDescription"),
                                     ("expected", "int", "kept, non-excluded files XNAT keeps"),
                                     ("on_xnat", "int", "of them on XNAT"),
                                     ("scans", "string", "XNAT scan(s) holding them")]),
            "filtered_by_xnat": len(result.filtered),
            "warnings": MetadataValue.json(result.warnings),
            "excluded_series_files": len(excluded),
            "session_resources": MetadataValue.json(result.resources),
            "marker": path(marker),
        },
        check_results=[AssetCheckResult(check_name="scans_match_series", passed=complete,
                                        metadata={"on_xnat": MetadataValue.json(have),
                                                  "series": MetadataValue.json(
                                                      [{k: r[k] for k in ("series_number", "series_uid", "expected",
                                                                          "on_xnat", "scans")} for r in series]),
                                                  "files_not_of_this_visit": foreign,
                                                  "filtered_by_xnat": len(result.filtered)})],
    )
