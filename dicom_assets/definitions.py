"""The one ``Definitions`` object of dicom-assets (loaded by workspace.yaml)."""

from __future__ import annotations

import os

from dagster import AssetSelection, Definitions, define_asset_job, in_process_executor, multiprocess_executor

from .defs.archive import visit_metadata, visit_tarball
from .defs.ingest import build_downloads_sensor, organized_dicoms, raw_dicoms
from .defs.publish import datalad_dataset, visit_catalog, xnat_resource_from_env, xnat_session
from .defs.resources import DatasetResource, default_dataset_root
from .defs.tcia import build_tcia_sensor, tcia_job, tcia_resource_from_env, tcia_series

ARCHIVE_CHAIN = [raw_dicoms, organized_dicoms, visit_tarball, visit_metadata]
INDEX_ASSETS = [datalad_dataset, visit_catalog]
# the sensor's run covers the chain up to XNAT when an XNAT is configured (XNAT_HOST set)
LOCAL_CHAIN = ARCHIVE_CHAIN + INDEX_ASSETS
CHAIN_ASSETS = LOCAL_CHAIN + [xnat_session]
CHAIN_CHECKS: list = []  # checks live on the assets (check_specs)

# one run per visit: every step of the chain, from the raw dump on
visit_chain_job = define_asset_job(
    "visit_chain",
    selection=AssetSelection.assets(*(CHAIN_ASSETS if os.environ.get("XNAT_HOST") else LOCAL_CHAIN)),
    description="Run the whole chain for one visit (started by the downloads sensor).",
)

downloads_sensor = build_downloads_sensor(visit_chain_job)
tcia_sensor = build_tcia_sensor(visit_chain_job)


def default_executor():
    """Each step in its own process (the default), or ``DICOM_ASSETS_EXECUTOR=in_process``: one
    process per run, which saves a Python start per step on small servers (the chain is linear)."""
    choice = os.environ.get("DICOM_ASSETS_EXECUTOR", "multiprocess")
    if choice not in ("multiprocess", "in_process"):
        raise ValueError(f"DICOM_ASSETS_EXECUTOR must be multiprocess or in_process, not {choice!r}")
    return in_process_executor if choice == "in_process" else multiprocess_executor


def build_definitions(root: str | None = None) -> Definitions:
    return Definitions(
        executor=default_executor(),
        assets=CHAIN_ASSETS + [tcia_series],
        asset_checks=CHAIN_CHECKS,
        jobs=[visit_chain_job, tcia_job],
        sensors=[downloads_sensor, tcia_sensor],
        resources={"dataset": DatasetResource(root=root or default_dataset_root()), "xnat": xnat_resource_from_env(),
                   "tcia": tcia_resource_from_env()},
    )


defs = build_definitions()
