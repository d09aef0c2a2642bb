"""The visit partition shared by every asset of the chain.

One ``DynamicPartitionsDefinition`` of visit keys (``QPN001_ses-01``), not a participant x
session multi-partition: a site's visits are sparse (not every participant has every
session), and a grid would show cells for visits that do not exist, which a "backfill all
missing" would then try to run. See docs/decisions.md.
"""

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


def not_applicable(context, visit: Visit, asset: str, checks: list[str], why: str):
    """What a step with nothing to do yields (its asset is ``output_required=False``): no
    materialization (the visit's partition of ``asset`` stays as it was, missing or the last
    one), and its checks answered "not applicable" (Dagster requires every check of a step to
    be answered). The run goes on; the log says why."""
    from dagster import AssetCheckResult

    context.log.info(f"{visit.key}: {asset}: {why}")
    for name in checks:
        yield AssetCheckResult(check_name=name, passed=True, description=f"not applicable: {why}",
                               metadata={"applicable": False})


OWNERS = ["team:imaging"]


def visit_asset(*, group: str, kinds: set[str], queue: str | None = None, **kwargs):
    """``@asset`` for a step of the visit chain: partitioned by visit, owned, grouped by stage;
    its ``code_version`` is its output format version, from ``lineage.CODE_VERSIONS`` (a stage
    missing there fails at import); ``queue``: the Celery queue of its step in the cluster
    profile (``cluster.QUEUES``; default: dagster-celery's ``dagster``)."""
    from .cluster import on_queue
    from .lineage import CODE_VERSIONS

    def decorate(fn):
        return asset(partitions_def=visits_partitions, group_name=group, kinds=kinds, owners=OWNERS,
                     code_version=CODE_VERSIONS[fn.__name__], op_tags=on_queue(queue) if queue else None,
                     **kwargs)(fn)
    return decorate


def sensor_default_status() -> DefaultSensorStatus:
    """Sensors run from the start, unless ``DICOM_ASSETS_SENSORS=off`` (e.g. to backfill by hand)."""
    from ..settings import current

    return DefaultSensorStatus.STOPPED if current().sensors == "off" else DefaultSensorStatus.RUNNING
