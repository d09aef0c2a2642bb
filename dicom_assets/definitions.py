"""The one ``Definitions`` object of dicom-assets (loaded by workspace.yaml)."""

from __future__ import annotations

import os

from dagster import AssetSelection, Definitions, define_asset_job, in_process_executor, multiprocess_executor

from .defs.archive import visit_metadata, visit_tarball
from .defs.bids import bids_config_present, bids_session
from .defs.ingest import build_downloads_sensor, downloads, organized_dicoms, raw_dicoms
from .defs.publish import datalad_dataset, visit_catalog, xnat_resource_from_env, xnat_session
from .defs.resources import DatasetResource, default_dataset_root
from .defs.tcia import build_tcia_sensor, tcia_job, tcia_resource_from_env, tcia_series

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

downloads_sensor = build_downloads_sensor(visit_chain_job)
tcia_sensor = build_tcia_sensor(visit_chain_job)


def default_executor():
    """All steps of a run in the run's own process (the default, ``in_process``: the chain is
    linear, so nothing runs in parallel anyway, and each step saves a Python start and a code
    load, measured in bench/run.py), or ``DICOM_ASSETS_EXECUTOR=multiprocess``: each step in
    its own process (isolation of a step's memory, or for executors that need it). Run limits,
    the ``xnat_upload`` pool and run retries of dagster.yaml hold with either."""
    choice = os.environ.get("DICOM_ASSETS_EXECUTOR", "in_process")
    if choice not in ("multiprocess", "in_process"):
        raise ValueError(f"DICOM_ASSETS_EXECUTOR must be in_process or multiprocess, not {choice!r}")
    return in_process_executor if choice == "in_process" else multiprocess_executor


def build_definitions(root: str | None = None) -> Definitions:
    return Definitions(
        executor=default_executor(),
        assets=[downloads] + CHAIN_ASSETS + BIDS_ASSETS + [tcia_series],
        asset_checks=CHAIN_CHECKS,
        jobs=[visit_chain_job, tcia_job],
        sensors=[downloads_sensor, tcia_sensor],
        resources={"dataset": DatasetResource(root=root or default_dataset_root()), "xnat": xnat_resource_from_env(),
                   "tcia": tcia_resource_from_env()},
    )


defs = build_definitions()
