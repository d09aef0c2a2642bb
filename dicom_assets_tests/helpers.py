"""Test helpers: materialize the chain of one visit on a real instance; ports and the browser."""

import os
import pickle
import shutil
import socket

from dagster import AssetSelection, materialize

from dicom_assets.definitions import ARCHIVE_CHAIN, CHAIN_CHECKS, INDEX_ASSETS
from dicom_assets.defs.ingest import downloads
from dicom_assets.defs.publish import xnat_session
from dicom_assets.defs.resources import DatasetResource


def run_chain(instance, root, visit, selection=None, raise_on_error=True, xnat=None, datalad=False):
    """Materialize the chain of one visit: the archive stages, plus the DataLad dataset and
    catalog when ``datalad``, plus XNAT when an XnatResource is given."""
    if visit not in instance.get_dynamic_partitions("visits"):
        instance.add_dynamic_partitions("visits", [visit])
    resources = {"dataset": DatasetResource(root=str(root))}
    if xnat is not None:
        resources["xnat"] = xnat
    return materialize(
        [downloads] + ARCHIVE_CHAIN + (INDEX_ASSETS if datalad else []) + ([xnat_session] if xnat is not None else [])
        + CHAIN_CHECKS,
        partition_key=visit,
        resources=resources,
        instance=instance,
        selection=selection,
        raise_on_error=raise_on_error,
    )


class Ticker:
    """Evaluates a sensor tick by tick on a real instance, as the daemon does: keeps the cursor
    and applies the dynamic-partition requests."""

    def __init__(self, instance, sensor, resources: dict):
        self.instance, self.sensor, self.resources, self.cursor = instance, sensor, resources, None

    def tick(self):
        from dagster import SensorResult, build_sensor_context

        ctx = build_sensor_context(instance=self.instance, cursor=self.cursor, resources=self.resources)
        result = self.sensor(ctx)
        if isinstance(result, SensorResult):
            self.cursor = result.cursor or self.cursor
            for event in result.asset_events or []:  # stored first, as the daemon does
                self.instance.report_runless_asset_event(event)
            for req in result.dynamic_partitions_requests or []:
                self.instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
        return result


def as_nobody(fn):
    """fn() in a forked child running as uid/gid 65534 (nobody), so that file permissions are
    enforced (the tests run as root, who reads everything). ("ok", value) or ("error", type, message)."""
    if os.geteuid() != 0:
        try:
            return ("ok", fn())
        except Exception as exc:  # noqa: BLE001 - reported to the test
            return ("error", type(exc).__name__, str(exc))
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop root, run, report through the pipe, never return into pytest
        code = 1
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            try:
                res = ("ok", fn())
            except Exception as exc:  # noqa: BLE001
                res = ("error", type(exc).__name__, str(exc))
            os.write(w, pickle.dumps(res))
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as fh:
        data = fh.read()
    _, status = os.waitpid(pid, 0)
    assert status == 0 and data, "the unprivileged child failed"
    return pickle.loads(data)


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# the flags this closed network needs (no background connections to Google's hosts)
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metadata_of(result, asset_name):
    for ev in result.get_asset_materialization_events():
        if ev.asset_key.to_user_string() == asset_name:
            return {k: v.value for k, v in ev.materialization.metadata.items()}
    raise KeyError(asset_name)


def checks_of(result):
    return {ev.check_name: ev.passed for ev in result.get_asset_check_evaluations()}


__all__ = ["run_chain", "metadata_of", "checks_of", "AssetSelection"]
