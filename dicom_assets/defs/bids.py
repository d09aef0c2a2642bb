"""BIDS: ``bids_session``, a visit converted to ``bids/sub-<participant>/ses-<session>/`` with
dcm2bids and dcm2niix, and its blocking ``bids_valid`` check (the official BIDS validator)."""

from collections import Counter

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    DataVersion,
    Failure,
    MaterializeResult,
    MetadataValue,
)

from ..core.bids import BidsError, convert_visit, load_dcm2bids_config, tool_versions, validate
from ..core.curation import update_visit_status
from ..core.versions import digests_version
from .cluster import CPU_QUEUE
from .ingest import organized_dicoms
from .partitions import not_applicable, organized_dir_of, visit_asset, visit_of
from .resources import DatasetResource
from .ui import path, table

MAX_ROWS = 200


@visit_asset(
    queue=CPU_QUEUE,
    group="bids",
    kinds={"bids", "file"},
    deps=[organized_dicoms],
    output_required=False,  # no dcm2bids config: nothing to convert, no materialization
    description=(
        "`bids/sub-<participant>/ses-<session>/`: the visit converted to a BIDS session by dcm2bids with its "
        "config `code/dcm2bids_config.json` (dcm2niix run per series in the visit's scratch "
        "`scratch/bids/<visit>.tmp-*/`, the session folder swapped in atomically; an unchanged visit writes "
        "nothing). Keeps `dataset_description.json`, `participants.tsv` and `sub-*/sub-*_sessions.tsv` current. "
        "Metadata: files per datatype, series (converted / unmatched / not converted, and why), dcm2niix "
        "warnings, the BIDS validator's summary."
    ),
    check_specs=[
        AssetCheckSpec("bids_valid", asset="bids_session", blocking=True,
                       description="the official BIDS validator (bids-validator-deno) reports no error in this "
                                   "session or in the dataset-level files; warnings are listed"),
        AssetCheckSpec("all_series_converted", asset="bids_session",
                       description="dcm2niix converted every kept series (a series it cannot convert is left out "
                                   "of the session and reported with dcm2niix's message)"),
    ],
)
def bids_session(context: AssetExecutionContext, dataset: DatasetResource):
    visit = visit_of(context)
    ds = dataset.open()
    lay = ds.layout
    if not lay.dcm2bids_config_path.is_file():
        yield from not_applicable(context, visit, "bids_session", ["bids_valid", "all_series_converted"],
                                  f"no dcm2bids config at {lay.dcm2bids_config_path}: no BIDS session made")
        return
    dicom_dir = organized_dir_of(lay, visit)
    try:
        config = load_dcm2bids_config(lay.dcm2bids_config_path, allow_post_op=ds.config.bids_allow_post_op)
        res = convert_visit(visit=visit, layout=lay, dicom_dir=dicom_dir, config=config,
                            dataset_name=ds.config.dataset_name)
    except BidsError as exc:
        raise Failure(str(exc)) from None
    session_dir = lay.bids_session_dir(visit)
    state = ("written" if res.changed else "unchanged (nothing written)" if session_dir.is_dir() else "none")
    context.log.info(f"{visit.key}: session {session_dir} {state}; {len(res.files)} files "
                     f"{res.files_per_datatype()} in {res.seconds:.1f} s")
    if res.note:
        context.log.warning(f"{visit.key}: {res.note}")
    failed = [s for s in res.series if s["status"] == "not_converted"]
    for s in failed:
        context.log.warning(f"{visit.key}: series {s['series_number']} {s['series_description']!r} not converted: "
                            f"{s['detail']}")
    unmatched = [s for s in res.series if s["status"] in ("unmatched", "several_matches")]
    update_visit_status(ds, visit)

    if lay.bids_description_path.is_file():
        try:
            val = validate(lay.bids_root, visit.participant, visit.session, lock_path=lay.bids_lock_path)
        except BidsError as exc:
            raise Failure(str(exc)) from None
        valid = AssetCheckResult(
            check_name="bids_valid", passed=val.passed,
            metadata={"errors": len(val.errors), "warnings": len(val.warnings),
                      "errors_in_other_sessions": val.other_errors,
                      "issues": _issue_table(val.errors + val.warnings),
                      "validator": f"bids-validator-deno {val.version}, schema {val.summary.get('schemaVersion')}"},
            description=(None if val.passed else f"{len(val.errors)} BIDS error(s): " + "; ".join(
                f"{e['code']} {e['location']}" for e in val.errors[:5])),
        )
        summary = (f"**BIDS validator** {val.version} (schema {val.summary.get('schemaVersion')}): "
                   f"**{len(val.errors)} errors**, {len(val.warnings)} warnings in this session and the dataset "
                   f"files ({val.other_errors} errors in other sessions); dataset: "
                   f"{len(val.summary.get('subjects') or [])} subjects, sessions {val.summary.get('sessions')}, "
                   f"datatypes {val.summary.get('dataTypes')}, {val.summary.get('totalFiles')} files; "
                   f"{val.seconds:.1f} s")
        if val.warnings:
            counts = Counter(w["code"] for w in val.warnings)
            summary += "\n\nWarnings: " + ", ".join(f"{c} × {n}" for c, n in counts.most_common())
    else:
        valid = AssetCheckResult(check_name="bids_valid", passed=True,
                                 description="no BIDS dataset yet (nothing was converted): nothing to validate")
        summary = "no BIDS dataset yet: nothing to validate"
    converted_check = AssetCheckResult(
        check_name="all_series_converted", passed=not failed, severity=AssetCheckSeverity.WARN,
        metadata={"not_converted": len(failed), "series": len(res.series)},
        description=None if not failed else "; ".join(
            f"series {s['series_number']} {s['series_description']!r}: {s['detail']}" for s in failed[:5]),
    )
    per_type = res.files_per_datatype()
    metadata = {
        "path": path(session_dir),
        "state": state,
        "files": len(res.files),
        **{f"files_{k}": v for k, v in per_type.items()},
        "files_per_datatype": MetadataValue.json(per_type),
        "series": table(res.series, [
            ("series_number", "int", "SeriesNumber"), ("series_description", "string", "SeriesDescription"),
            ("status", "string", "converted / unmatched / several_matches / not_converted"),
            ("bids_files", "string", "NIfTI files written for it"), ("dicoms", "int", "kept DICOMs"),
            ("detail", "string", "why not converted")]),
        "unmatched_series": table(unmatched, [
            ("series_number", "int", "SeriesNumber"), ("series_description", "string",
                                                        "SeriesDescription (criteria for a new config entry)"),
            ("status", "string", "unmatched or several_matches"), ("dicoms", "int", "kept DICOMs")]),
        "dcm2niix_warnings": table(res.dcm2niix_warnings[:MAX_ROWS], [
            ("series_number", "int", "SeriesNumber"), ("series_description", "string", "SeriesDescription"),
            ("message", "string", "dcm2niix's warning")]),
        "validator": MetadataValue.md(summary),
        "config": path(lay.dcm2bids_config_path),
        "versions": MetadataValue.json(tool_versions()),
        "seconds": round(res.seconds, 2),
        "dataset_files_written": MetadataValue.json(res.dataset_files_written),
    }
    if res.note:
        metadata["note"] = res.note
    if "post_op" in config.data:  # allowed by the site: shown, as it runs commands
        metadata["post_op"] = MetadataValue.md("**dcm2bids `post_op` is on** (commands run on the converted files; "
                                               "allowed by `bids_allow_post_op` in global_config.json)")
    # lineage: the session folder's content (relative paths + sha256, as convert_visit hashed
    # them: not read again here), so Dagster tells a re-conversion that wrote the same files
    # from one that changed them
    version = DataVersion(digests_version(res.tree)) if res.tree is not None else None
    yield MaterializeResult(metadata=metadata, check_results=[valid, converted_check], data_version=version)


def _issue_table(issues: list[dict]) -> MetadataValue:
    return table(issues[:MAX_ROWS], [
        ("severity", "string", "error or warning"), ("code", "string", "validator code"),
        ("sub_code", "string", "field"), ("location", "string", "file in the dataset"),
        ("message", "string", "what the validator says")])
