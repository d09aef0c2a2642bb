"""The one ``Definitions`` object of dicom-assets (loaded by workspace.yaml)."""

from __future__ import annotations

from dagster import Definitions, in_process_executor, multiprocess_executor

from .defs.dicomnode import OrthancResource, dicom_node_retrieve, dicom_node_study
from .defs.ingest import downloads
from .defs.jobs import (  # noqa: F401 - the asset lists, re-exported for tests and bench
    ARCHIVE_CHAIN,
    BIDS_ASSETS,
    CHAIN_ASSETS,
    CHAIN_CHECKS,
    INDEX_ASSETS,
    LOCAL_CHAIN,
    SHARE_ASSETS,
    dicom_node_visit_job,
    tcia_job,
    visit_chain_job,
)
from .defs.resources import DatasetResource, TciaResource, XnatResource, default_dataset_root
from .defs.sensors import dicom_node_sensor, downloads_sensor, tcia_sensor
from .defs.share import deid_profile
from .defs.tcia import tcia_series


def default_executor():
    """All steps of a run in the run's own process (the default, ``in_process``: the chain is
    linear, so nothing runs in parallel anyway, and each step saves a Python start and a code
    load, measured in bench/run.py), or ``DICOM_ASSETS_EXECUTOR=multiprocess``: each step in
    its own process (isolation of a step's memory, or for executors that need it), or
    ``celery``: each step a task on the Celery workers of the cluster profile
    (``defs/cluster.py``, docs/deploy.md). Run limits, the ``xnat_upload`` pool and run retries
    of dagster.yaml hold with any of them."""
    from .settings import current

    kind = current().executor
    if kind == "celery":
        from .defs.cluster import cluster_executor

        return cluster_executor()
    return in_process_executor if kind == "in_process" else multiprocess_executor


def build_definitions(root: str | None = None) -> Definitions:
    return Definitions(
        executor=default_executor(),
        assets=[downloads, dicom_node_study, deid_profile] + CHAIN_ASSETS + BIDS_ASSETS + SHARE_ASSETS + [tcia_series],
        asset_checks=CHAIN_CHECKS,
        jobs=[visit_chain_job, dicom_node_visit_job, tcia_job, dicom_node_retrieve],
        sensors=[downloads_sensor, tcia_sensor, dicom_node_sensor],
        # XNAT's, TCIA's and the DICOM node's settings are read from the environment when a step uses them
        resources={"dataset": DatasetResource(root=root or default_dataset_root()), "xnat": XnatResource(),
                   "tcia": TciaResource(), "dicom_node": OrthancResource()},
    )


defs = build_definitions()
