"""The visit partition shared by every asset of the chain.

One ``DynamicPartitionsDefinition`` of visit keys (``QPN001_ses-01``), not a participant x
session multi-partition: a site's visits are sparse (not every participant has every
session), and a grid would show cells for visits that do not exist, which a "backfill all
missing" would then try to run. See docs/decisions.md.
"""

from dagster import DynamicPartitionsDefinition

from ..core.ids import Visit, parse_visit_key

VISITS_PARTITION_NAME = "visits"
visits_partitions = DynamicPartitionsDefinition(name=VISITS_PARTITION_NAME)


def visit_of(context) -> Visit:
    """The visit of an asset execution context, validated."""
    return parse_visit_key(context.partition_key)
