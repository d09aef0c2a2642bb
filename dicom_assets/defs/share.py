"""Share: ``deidentified_dicoms``, a visit de-identified by DICOM PS3.15 Annex E into
``share/<pseudonym>/<session>/``, and its blocking leak check (``core/deid.py`` does the work).

Nothing shown here names the pseudonym: the partition is the real visit, so a path or a
pseudonym in the metadata would be the pseudonym map. The map is written only where
``DICOM_ASSETS_DEID_MAP`` says; the key (``DICOM_ASSETS_DEID_KEY``) is shown as its fingerprint.
"""

import hashlib
import json
from collections import Counter

from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetExecutionContext,
    DataVersion,
    Failure,
    MaterializeResult,
    MetadataValue,
)

from ..core.deid import (
    PROFILE_EDITION,
    Context,
    DeidError,
    SafePrivate,
    key_fingerprint,
    load_profile,
    pseudonym,
    record_pseudonym,
    share_visit,
)
from ..core.errors import DicomAssetsError
from ..core.fsutil import atomic_write
from ..core.organize import read_kept
from ..settings import current as current_settings
from .cluster import CPU_QUEUE
from .ingest import organized_dicoms
from .partitions import not_applicable, organized_dir_of, visit_asset, visit_of
from .resources import DatasetResource
from .ui import path, table

CHECK = "no_identifying_value"
MAX_ROWS = 200


def _key() -> bytes:
    from ..core.deid import check_key

    secret = current_settings().deid_key
    return check_key(secret.get_secret_value() if secret is not None else None)


def _map_path(lay):
    """The pseudonym map's path (``DICOM_ASSETS_DEID_MAP``), refused under share/."""
    from pathlib import Path

    where = current_settings().deid_map
    if not where:
        return None
    p = Path(where).absolute()
    if p == lay.share_root or lay.share_root in p.parents:
        raise Failure(f"DICOM_ASSETS_DEID_MAP={p} is under {lay.share_root}: the pseudonym map must stay "
                      "outside the shared copies")
    return p


@visit_asset(
    queue=CPU_QUEUE,  # every DICOM read and rewritten
    group="share",
    kinds={"dicom", "file"},
    deps=[organized_dicoms],
    output_required=False,  # deid off in global_config.json: nothing to share, no materialization
    description=(
        "`share/<pseudonym>/<session>/`: the visit's organized DICOMs de-identified by DICOM PS3.15 Annex E "
        "(Basic Application Level Confidentiality Profile, edition " + PROFILE_EDITION + ", with the options of "
        "`deid` in global_config.json), inside sequences at every depth; private attributes only from the safe "
        "list; keyed pseudonym, UIDs (`2.25.`) and date shift from `DICOM_ASSETS_DEID_KEY`. Images that may "
        "carry burned-in text are left out with the reason. Off unless `deid.enabled`."
    ),
    check_specs=[
        AssetCheckSpec(CHECK, asset="deidentified_dicoms", blocking=True,
                       description="every element of every written file (nested sequences, private attributes, "
                                   "file meta) and every file name holds none of the values the profile took out "
                                   "of the source visit (names, ids, unshifted dates, UIDs, institution, "
                                   "physicians, addresses, descriptions); a hit names the tag path, and the copy "
                                   "is withheld from share/"),
    ],
)
def deidentified_dicoms(context: AssetExecutionContext, dataset: DatasetResource):
    visit = visit_of(context)
    ds = dataset.open()
    lay = ds.layout
    cfg = ds.config.deid
    if not cfg.enabled:
        yield from not_applicable(context, visit, "deidentified_dicoms", [CHECK],
                                  f"deid is off in {lay.config_path}: no shared copy made")
        return
    src = organized_dir_of(lay, visit)
    map_path = _map_path(lay)
    try:
        key = _key()
        profile = load_profile(cfg.options)
        files = [src / name for name in read_kept(lay.organize_report_path(visit))]
        safe = tuple(SafePrivate(int(s.group, 16), s.creator, int(s.element, 16)) for s in cfg.safe_private)
        ctx = Context(key=key, participant=visit.participant, profile=profile, safe_private=safe)
        target = lay.share_dir(ctx.pseudonym, visit.session)
        result = share_visit(files, target, ctx, extra={visit.participant: "participant_id", visit.key: "visit"})
    except (DeidError, DicomAssetsError) as exc:
        raise Failure(str(exc)) from None
    fingerprint = key_fingerprint(key)
    if map_path is not None and result.placed:
        record_pseudonym(map_path, visit.participant, pseudonym(key, visit.participant), fingerprint)
    report = _report(profile, fingerprint, result)
    with atomic_write(lay.deid_report_path(visit)) as fh:
        json.dump(report, fh, indent=2, sort_keys=True)
    kept, excluded, hits = result.files.kept, result.files.excluded, result.hits
    context.log.info(f"{visit.key}: {len(kept)} files de-identified, {len(excluded)} excluded, "
                     f"{len(hits)} leak hit(s); key {fingerprint}")
    check = AssetCheckResult(
        check_name=CHECK, passed=not hits,
        metadata={"hits": len(hits), "files_scanned": result.scanned,
                  "values_searched": len(result.files.identifiers),
                  "hit_paths": table([h.__dict__ for h in hits[:MAX_ROWS]], [
                      ("file", "string", "the source file (organized DICOM) whose copy holds the value"),
                      ("path", "string", "tag path in the copy, or 'file name'"),
                      ("source", "string", "the source attribute whose value was found")])},
        description=None if not hits else "identifying values found (copy withheld from share/): " + "; ".join(
            f"{h.path} ({h.source})" for h in hits[:5]),
    )
    version = hashlib.sha256(json.dumps([profile.version, fingerprint, sorted(result.digests.items())])
                             .encode()).hexdigest()[:32]
    yield MaterializeResult(check_results=[check], data_version=DataVersion(f"deid-{version}"), metadata={
        "profile": profile.describe(),
        "standard_edition": f"DICOM PS3.15 {profile.edition}, Table E.1-1",
        "options": MetadataValue.json(list(profile.options)),
        "profile_version": profile.version,
        "key_fingerprint": fingerprint,
        "state": "placed in share/" if result.placed else "withheld: leak check failed",
        "files_kept": len(kept),
        "files_excluded": len(excluded),
        "excluded_reasons": MetadataValue.json(dict(Counter(r.split(":")[0] for _, r in excluded))),
        "excluded": table([{"file": f, "reason": r} for f, r in excluded[:MAX_ROWS]], [
            ("file", "string", "organized DICOM"), ("reason", "string", "why it is not shared")]),
        "pixel_data_changed": len(result.pixels_changed),
        "share_root": path(lay.share_root),
        "report": path(lay.deid_report_path(visit)),
        "pseudonym_map": "written" if map_path is not None and result.placed else "not written (unset)",
    })


def _report(profile, fingerprint: str, result) -> dict:
    """logs/deid/<visit>.json: how the copy was made, never the pseudonym or the new names."""
    return {
        "standard": f"DICOM PS3.15 {profile.edition}", "table_sha256": profile.table_sha256,
        "options": list(profile.options), "profile_version": profile.version, "key_fingerprint": fingerprint,
        "placed": result.placed, "files_kept": len(result.files.kept),
        "excluded": [{"file": f, "reason": r} for f, r in result.files.excluded],
        "leak_hits": [h.__dict__ for h in result.hits], "files_scanned": result.scanned,
        "values_searched": len(result.files.identifiers), "pixel_data_changed": result.pixels_changed,
    }
