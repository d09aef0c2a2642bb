"""Share: ``deid_profile`` (the profile and key in use, observed), ``deidentified_dicoms``, a
visit de-identified by DICOM PS3.15 Annex E into ``share/<pseudonym>/<session>/``, its blocking
leak check, and ``deidentified_tarball``, that copy as a reproducible TAR (``core/deid.py`` and
``core/tarball.py`` do the work).

Nothing shown here names the pseudonym: the partition is the real visit, so a path or a
pseudonym in the metadata would be the pseudonym map. The map is written only where
``DICOM_ASSETS_DEID_MAP`` says; the key (``DICOM_ASSETS_DEID_KEY``) is shown as its fingerprint.

Staleness: the options, the safe list and the key are runtime configuration (global_config.json
and the environment), which no code version can capture. ``deid_profile`` is an observable source
asset upstream of ``deidentified_dicoms`` whose data version is all of them at once
(``core.deid.share_version``); the downloads sensor observes it at every tick where it changed,
and ``deidentified_dicoms`` before it uses it, so a copy made with other options shows stale.
"""

import hashlib
import json
from collections import Counter

from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetKey,
    DataVersion,
    Failure,
    MaterializeResult,
    MetadataValue,
    ObserveResult,
    observable_source_asset,
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
    share_version,
    share_visit,
)
from ..core.errors import DicomAssetsError
from ..core.fsutil import atomic_write
from ..core.organize import read_kept
from ..core.tarball import write_tarball
from ..settings import current as current_settings
from .cluster import CPU_QUEUE
from .ingest import organized_dicoms
from .lineage import observed_version, version_observation
from .partitions import not_applicable, organized_dir_of, visit_asset, visit_of
from .resources import DatasetResource
from .ui import path, table

CHECK = "no_identifying_value"
MAX_ROWS = 200


def _key() -> bytes:
    from ..core.deid import check_key

    secret = current_settings().deid_key
    return check_key(secret.get_secret_value() if secret is not None else None)


DEID_PROFILE = AssetKey("deid_profile")
OFF = "off"  # the data version of deid_profile while deid is off


def _safe_list(cfg) -> tuple[SafePrivate, ...]:
    return tuple(SafePrivate(int(s.group, 16), s.creator, int(s.element, 16)) for s in cfg.safe_private)


def profile_state(ds) -> tuple[str, dict]:
    """The data version of ``deid_profile`` for dataset ``ds`` and what to show with it: the
    profile, its options, the safe list and the key's fingerprint (``OFF`` while deid is off).
    Raises DeidError when deid is on without a usable key or with unknown options."""
    cfg = ds.config.deid
    if not cfg.enabled:
        return OFF, {"state": f"deid is off in {ds.layout.config_path}"}
    profile = load_profile(cfg.options)
    fingerprint = key_fingerprint(_key())
    safe = _safe_list(cfg)
    return share_version(profile, safe, fingerprint), {
        "profile": profile.describe(), "profile_version": profile.version,
        "standard_edition": f"DICOM PS3.15 {profile.edition}, Table E.1-1",
        "options": MetadataValue.json(list(profile.options)),
        "safe_private": MetadataValue.json([f"({s.group:04X},xx{s.element:02X}) {s.creator}" for s in safe]),
        "key_fingerprint": fingerprint,
    }


def profile_observation(ds, instance, source: str):
    """An observation of ``deid_profile`` when its version differs from the last one recorded
    (None when it does not, or when the profile cannot be read: the step that uses it says why)."""
    try:
        version, metadata = profile_state(ds)
    except DicomAssetsError:
        return None
    if observed_version(instance, DEID_PROFILE) == version:
        return None
    return version_observation(DEID_PROFILE, version, {**metadata, "observed_by": source})


@observable_source_asset(
    key=DEID_PROFILE, group_name="share", tags={"dagster/kind/json": ""},
    description=(
        "What a shared copy is made with besides its source: the DICOM PS3.15 table (edition, sha256), the "
        "options and safe list of `deid` in global_config.json, and the key's fingerprint "
        "(`DICOM_ASSETS_DEID_KEY`, never the key). Its data version changes with any of them, so every copy "
        "made before shows stale; observed by the downloads sensor when it changed and by each "
        "`deidentified_dicoms` run (or by Observe here)."
    ),
)
def deid_profile(context, dataset: DatasetResource) -> ObserveResult:
    try:
        version, metadata = profile_state(dataset.open())
    except DicomAssetsError as exc:
        raise Failure(str(exc)) from None
    return ObserveResult(data_version=DataVersion(version), metadata=metadata)


def _record_profile(context, ds) -> None:
    """Observe ``deid_profile`` now if its recorded version is not the one this step uses, so the
    materialization names the profile it was made with (Dagster reads an asset's input versions
    when its step starts: the cache of that one input is dropped, to be read again)."""
    event = profile_observation(ds, context.instance, f"deidentified_dicoms run {context.run.run_id[:8]}")
    if event is None:
        return
    context.instance.report_runless_asset_event(event)
    step = getattr(context, "_step_execution_context", None)  # private: test_deid's staleness test guards it
    if step is not None and hasattr(step, "wipe_input_asset_version_info"):
        step.wipe_input_asset_version_info(DEID_PROFILE)


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
    deps=[organized_dicoms, deid_profile],
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
        _record_profile(context, ds)
        files = [src / name for name in read_kept(lay.organize_report_path(visit))]
        ctx = Context(key=key, participant=visit.participant, profile=profile, safe_private=_safe_list(cfg))
        target = lay.share_dir(ctx.pseudonym, visit.session)
        result = share_visit(files, target, ctx, extra={visit.participant: "participant_id", visit.key: "visit"})
    except (DeidError, DicomAssetsError) as exc:
        raise Failure(str(exc)) from None
    if not result.placed:  # share/ holds only copies that passed: the tarball of an older one goes too
        lay.share_tarball_path(ctx.pseudonym, visit.session).unlink(missing_ok=True)
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


@visit_asset(
    queue=CPU_QUEUE,
    group="share",
    kinds={"tar", "file"},
    deps=[deidentified_dicoms],
    output_required=False,  # deid off: nothing to archive, no materialization
    description=(
        "`share/<pseudonym>/<pseudonym>_<session>_dicom.tar`: the visit's shared copy as a byte-for-byte "
        "reproducible TAR, written as `visit_tarball` writes its own (sorted, root/root, 0644, mtimes from each "
        "copy's shifted StudyDate/StudyTime in UTC), top folder `<pseudonym>_<session>/`. The same key and "
        "profile give the same bytes. Off unless `deid.enabled`."
    ),
)
def deidentified_tarball(context: AssetExecutionContext, dataset: DatasetResource):
    visit = visit_of(context)
    ds = dataset.open()
    lay = ds.layout
    if not ds.config.deid.enabled:
        context.log.info(f"{visit.key}: deidentified_tarball: deid is off in {lay.config_path}: no shared tarball")
        return
    try:
        pseudo = pseudonym(_key(), visit.participant)
    except DeidError as exc:
        raise Failure(str(exc)) from None
    folder = lay.share_dir(pseudo, visit.session)
    # the count the copy's own report gives (an independent list), never a listing alone
    report_path = lay.deid_report_path(visit)
    try:
        report = json.loads(report_path.read_text())
    except (OSError, ValueError):
        report = None
    if report is None or not report.get("placed") or not folder.is_dir():
        raise Failure(f"{visit.key}: no shared copy in share/ (see {report_path}); materialize deidentified_dicoms "
                      "first (a copy that failed its leak check is never archived)")
    files = sorted((p, p.name) for p in folder.iterdir())
    odd = [name for p, name in files if not p.is_file() or p.is_symlink()]
    if odd or len(files) != report["files_kept"]:
        raise Failure(f"{visit.key}: the shared copy holds {len(files)} entries ({len(odd)} not a regular file) but "
                      f"deidentified_dicoms wrote {report['files_kept']}; materialize deidentified_dicoms again")
    dest = lay.share_tarball_path(pseudo, visit.session)
    try:
        result = write_tarball(files, dest, f"{pseudo}_{visit.session}", md5=True)
    except DicomAssetsError as exc:
        raise Failure(str(exc)) from None
    context.log.info(f"{visit.key}: shared tarball of {result.members} members, {result.size} bytes, "
                     f"md5 {result.md5}")
    # no path of share/<pseudonym>/ beside the real visit: the folder it is in is named only as share/
    yield MaterializeResult(data_version=DataVersion(result.sha256), metadata={
        "size": MetadataValue.int(result.size),
        "md5": result.md5,
        "sha256": result.sha256,
        "members": result.members,
        "members_without_dicom_time": result.members - result.dicoms_with_time,
        "share_root": path(lay.share_root),
    })
