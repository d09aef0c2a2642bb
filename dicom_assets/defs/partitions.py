"""The visit partition shared by every asset of the chain.

One ``DynamicPartitionsDefinition`` of visit keys (``QPN001_ses-01``), not a participant x
session multi-partition: a site's visits are sparse (not every participant has every
session), and a grid would show cells for visits that do not exist, which a "backfill all
missing" would then try to run. See docs/decisions.md.
"""

import os

from dagster import DefaultSensorStatus, DynamicPartitionsDefinition, asset

from ..core.ids import Visit, parse_visit_key

VISITS_PARTITION_NAME = "visits"
visits_partitions = DynamicPartitionsDefinition(name=VISITS_PARTITION_NAME)


def visit_of(context) -> Visit:
    """The visit of an asset execution context, validated."""
    return parse_visit_key(context.partition_key)


def organized_dir_of(layout, visit: Visit):
    """The visit's organized DICOM folder, which a step downstream of organized_dicoms reads;
    a clear Failure when it was never made."""
    from dagster import Failure

    path = layout.dicom_dir(visit)
    if not path.is_dir():
        raise Failure(f"{path}: the organized DICOM folder of {visit.key} does not exist; "
                      "materialize organized_dicoms first")
    return path


OWNERS = ["team:imaging"]


def visit_asset(*, group: str, kinds: set[str], **kwargs):
    """``@asset`` for a step of the visit chain: partitioned by visit, owned, grouped by stage;
    its ``code_version`` is its output format version, from ``lineage.CODE_VERSIONS`` (a stage
    missing there fails at import)."""
    from .lineage import CODE_VERSIONS

    def decorate(fn):
        return asset(partitions_def=visits_partitions, group_name=group, kinds=kinds, owners=OWNERS,
                     code_version=CODE_VERSIONS[fn.__name__], **kwargs)(fn)
    return decorate


def sensor_default_status() -> DefaultSensorStatus:
    """Sensors run from the start, unless ``DICOM_ASSETS_SENSORS=off`` (e.g. to backfill by hand)."""
    off = os.environ.get("DICOM_ASSETS_SENSORS", "").lower() in ("off", "0", "false", "stopped")
    return DefaultSensorStatus.STOPPED if off else DefaultSensorStatus.RUNNING
