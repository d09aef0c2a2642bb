"""Test helpers: materialize the chain of one visit on a real instance."""

from dagster import AssetSelection, materialize

from dicom_assets.definitions import CHAIN_ASSETS, CHAIN_CHECKS, LOCAL_CHAIN
from dicom_assets.defs.resources import DatasetResource


def run_chain(instance, root, visit, selection=None, raise_on_error=True, xnat=None):
    """Materialize the chain of one visit (up to XNAT when an XnatResource is given)."""
    if visit not in instance.get_dynamic_partitions("visits"):
        instance.add_dynamic_partitions("visits", [visit])
    resources = {"dataset": DatasetResource(root=str(root))}
    if xnat is not None:
        resources["xnat"] = xnat
    return materialize(
        (CHAIN_ASSETS if xnat is not None else LOCAL_CHAIN) + CHAIN_CHECKS,
        partition_key=visit,
        resources=resources,
        instance=instance,
        selection=selection,
        raise_on_error=raise_on_error,
    )


def metadata_of(result, asset_name):
    for ev in result.get_asset_materialization_events():
        if ev.asset_key.to_user_string() == asset_name:
            return {k: v.value for k, v in ev.materialization.metadata.items()}
    raise KeyError(asset_name)


def checks_of(result):
    return {ev.check_name: ev.passed for ev in result.get_asset_check_evaluations()}


__all__ = ["run_chain", "metadata_of", "checks_of", "AssetSelection"]
