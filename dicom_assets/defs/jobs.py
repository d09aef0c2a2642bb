"""The jobs: one run per visit (the chain) and one per TCIA manifest, and the asset lists they select."""

import os

from dagster import AssetSelection, define_asset_job

from .archive import visit_metadata, visit_tarball
from .bids import bids_config_present, bids_session
from .ingest import organized_dicoms, raw_dicoms
from .publish import datalad_dataset, visit_catalog, xnat_session
from .tcia import tcia_series

ARCHIVE_CHAIN = [raw_dicoms, organized_dicoms, visit_tarball, visit_metadata]
INDEX_ASSETS = [datalad_dataset, visit_catalog]
# the sensor's run covers the chain up to XNAT when an XNAT is configured (XNAT_HOST set)
LOCAL_CHAIN = ARCHIVE_CHAIN + INDEX_ASSETS
CHAIN_ASSETS = LOCAL_CHAIN + [xnat_session]
# bids_session is always defined; the sensor's run includes it when the dataset root has a
# dcm2bids config (code/dcm2bids_config.json) when the code location loads
BIDS_ASSETS = [bids_session]
CHAIN_CHECKS: list = []  # checks live on the assets (check_specs)

# one run per visit: every step of the chain, from the raw dump on
visit_chain_job = define_asset_job(
    "visit_chain",
    selection=AssetSelection.assets(*(CHAIN_ASSETS if os.environ.get("XNAT_HOST") else LOCAL_CHAIN),
                                    *(BIDS_ASSETS if bids_config_present() else [])),
    description="Run the whole chain for one visit (started by the downloads sensor).",
)

tcia_job = define_asset_job("tcia_download", selection=[tcia_series],
                            description="Download and group the series of one TCIA manifest.")
