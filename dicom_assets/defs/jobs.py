"""The jobs: one run per visit (the chain) and one per TCIA manifest, and the asset lists they select."""

from dagster import AssetKey, AssetSelection, define_asset_job

from .archive import visit_metadata, visit_tarball
from .bids import bids_session
from .dicomnode import dicom_node_study
from .ingest import organized_dicoms, raw_dicoms
from .publish import datalad_dataset, visit_catalog, xnat_session
from .share import deidentified_dicoms, deidentified_tarball
from .tcia import tcia_series

ARCHIVE_CHAIN = [raw_dicoms, organized_dicoms, visit_tarball, visit_metadata]
INDEX_ASSETS = [datalad_dataset, visit_catalog]
LOCAL_CHAIN = ARCHIVE_CHAIN + INDEX_ASSETS
CHAIN_ASSETS = LOCAL_CHAIN + [xnat_session]
BIDS_ASSETS = [bids_session]
SHARE_ASSETS = [deidentified_dicoms, deidentified_tarball]  # off unless deid.enabled in global_config.json
CHAIN_CHECKS: list = []  # checks live on the assets (check_specs)

# one run per visit: every step of the chain, from the raw dump on. Whether a step has work is
# decided when it runs, never when the code location loads: xnat_session without an XNAT
# (XNAT_HOST unset) and bids_session without a dcm2bids config record nothing and say why; the
# sensors leave them out of the runs they request (chain_selection, read at each tick)
visit_chain_job = define_asset_job(
    "visit_chain",
    selection=AssetSelection.assets(*CHAIN_ASSETS, *BIDS_ASSETS, *SHARE_ASSETS),
    description="Run the whole chain for one visit (started by the downloads sensor).",
)

# a visit whose study came from the DICOM node: the fetch first, then the chain. Its own job,
# not a part of visit_chain: dicom_node_study has nothing to do for a visit of folder dumps
# (it records nothing), and Dagster skips what comes after a step that yields nothing, so in
# visit_chain it would stop every dump visit's run launched without a selection
dicom_node_visit_job = define_asset_job(
    "dicom_node_visit",
    selection=AssetSelection.assets(dicom_node_study, *CHAIN_ASSETS, *BIDS_ASSETS, *SHARE_ASSETS),
    description="Fetch a visit's study from the DICOM node, then run the chain (started by the dicom_node_sensor).",
)

tcia_job = define_asset_job("tcia_download", selection=[tcia_series],
                            description="Download and group the series of one TCIA manifest.")


def chain_selection(*, xnat: bool, bids: bool, dicom_node: bool = False, share: bool = False) -> list[AssetKey]:
    """The assets of a visit's run that have work: the local chain, XNAT when one is configured,
    BIDS when the dataset root has a dcm2bids config, the shared copy when deid is on; the fetch
    of its study first for a run the DICOM node's sensor requests."""
    assets = (([dicom_node_study] if dicom_node else []) + LOCAL_CHAIN + ([xnat_session] if xnat else [])
              + (BIDS_ASSETS if bids else []) + (SHARE_ASSETS if share else []))
    return [a.key for a in assets]
