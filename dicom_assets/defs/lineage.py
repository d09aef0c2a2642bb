"""Lineage Dagster can reason about: each stage's ``code_version`` (the version of its output
format) and the ``downloads`` observations the sensors report.

The rule (docs/decisions.md, "Lineage"): a stage's code version changes exactly when what it
writes for the same input changes (bytes, names, fields). Dagster then shows every partition
materialized with the old version as stale ("has a new code version"); a refactoring that
writes the same bytes keeps the version. The tarball's bytes are a contract
(``dicom_assets_tests/test_lineage.py`` pins the demo tarball's sha256 per version).

Data versions (``MaterializeResult(data_version=...)``) are computed in ``core/versions.py``.
"""

from dagster import AssetKey, AssetObservation, AssetRecordsFilter, MetadataValue

# A private module, on purpose: the downloads partitions are observed by the sensors (not by an
# observable source asset's function, whose ObserveResult(data_version=...) is the public way),
# and Dagster's public AssetObservation (1.13) takes a data version only as these two tags. If
# their names move, test_lineage fails (it reads the versions back through the UI's staleness).
from dagster._core.definitions.data_version import DATA_VERSION_IS_USER_PROVIDED_TAG, DATA_VERSION_TAG

from ..core.bids import CONVERTER_VERSION
from ..core.deid import PROFILE_EDITION, PROFILE_SHA256
from ..core.versions import dump_version

# the output format version of each stage of the visit chain
CODE_VERSIONS = {
    "dicom_node_study": "1",  # downloads/dicom_node/<visit>/<study>.{zip,json}
    "raw_dicoms": "1",        # scratch/raw_dicoms/<session>/<participant>/ + logs/extract/<visit>.json
    "organized_dicoms": "1",  # dicom/<session>/<participant>/<SOPInstanceUID>.dcm + logs/organize/<visit>_files.tsv
    "visit_tarball": "1",     # store/<study>/<visit>_dicom.tar, byte for byte
    "visit_metadata": "1",    # store/<study>/<visit>_metadata_{tarball,dicoms}.json
    "datalad_dataset": "1",   # datalad/<study>/<visit>/ and the XDLRA deposit
    "visit_catalog": "1",     # the visit's entry of catalog/index.html
    "xnat_session": "1",      # what is sent to XNAT: labels, scans, files, METADATA resource
    "bids_session": CONVERTER_VERSION,  # bids/sub-*/ses-*/ (core.bids bumps it)
    # share/<pseudonym>/<session>/: the table of the standard is part of the code (another edition
    # or copy: stale); the options and the key are in its data version
    "deidentified_dicoms": f"1-{PROFILE_EDITION}-{PROFILE_SHA256[:8]}",
    "deidentified_tarball": "1",  # share/<pseudonym>/<pseudonym>_<session>_dicom.tar, byte for byte
}

DOWNLOADS = AssetKey("downloads")


def dump_observation(visit: str, items: list[tuple[str, str]], source: str) -> AssetObservation:
    """The ``downloads`` partition of a visit observed: its data version is the signature of its
    dump(s) (``core.versions.dump_version``), the same value ``raw_dicoms`` reports for what it
    extracted."""
    return AssetObservation(
        asset_key=DOWNLOADS, partition=visit,
        tags={DATA_VERSION_TAG: dump_version(items), DATA_VERSION_IS_USER_PROVIDED_TAG: "true"},
        metadata={"dumps": MetadataValue.json([{"path": rel, "signature": tok} for rel, tok in items]),
                  "observed_by": source},
    )


def version_observation(key: AssetKey, version: str, metadata: dict) -> AssetObservation:
    """An observation of the unpartitioned source asset ``key`` with data version ``version`` (a
    sensor's ``asset_events``, or stored by a step with ``report_runless_asset_event``)."""
    return AssetObservation(asset_key=key, metadata=metadata,
                            tags={DATA_VERSION_TAG: version, DATA_VERSION_IS_USER_PROVIDED_TAG: "true"})


def observed_version(instance, key: AssetKey) -> str | None:
    """The data version of the latest observation of ``key`` (None: never observed)."""
    records = instance.fetch_observations(AssetRecordsFilter(asset_key=key), limit=1).records
    if not records:
        return None
    version = records[0].asset_observation.data_version
    return version if isinstance(version, str) or version is None else version.value
