"""Scale: a backfill of 24 visits (50 with ``DICOM_ASSETS_TEST_PROFILE=full``) through a real daemon (`dagster dev`: webserver, daemon,
queued run coordinator, the repository's dagster.yaml), launched the way the UI launches it
(the GraphQL `launchPartitionBackfill` mutation), plus a second backfill of 10 of the visits at
once (a user clicking twice). The promises checked:

- never two runs of the same visit at once (run records: start/end intervals per partition);
- no duplicate runs under the tag limit (Dagster has had reports of backfills launching a
  partition twice with tag concurrency limits): each backfill has exactly one run per visit
  (tags `dagster/backfill`, `dagster/partition`), counted once both backfills are done, and no
  other run of a visit exists (sensors are off here: the sensor's run keys are checked in
  test_sensor.py / test_sensor_scale.py);
- never more runs at once than `max_concurrent_runs`;
- never more XNAT uploads at once than the `xnat_upload` pool allows (the XNAT test server
  counts concurrent imports, each made slow on purpose so that overlaps would show);
- every visit ends on XNAT.
"""

import os
import shutil
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
# x 2 sessions: 24 visits in `make test` (the same limits bind at 24 as at 50, with 3 runs and 2
# uploads at once), 50 in the full profile
N_PARTICIPANTS = 25 if os.environ.get("DICOM_ASSETS_TEST_PROFILE") == "full" else 12
ASSETS = ["raw_dicoms", "organized_dicoms", "visit_tarball", "visit_metadata", "xnat_session"]

pytestmark = pytest.mark.scale


def _wait(predicate, timeout: float, what: str, log: Path):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{log.read_text()[-3000:]}")


@pytest.mark.slow
def test_backfill_respects_run_and_upload_limits(samples, tmp_path, monkeypatch):
    from dagster import DagsterInstance, DagsterRunStatus, RunsFilter
    from dagster._core.execution.backfill import BULK_ACTION_TERMINAL_STATUSES

    from dicom_assets.testing.dagster_dev import LAUNCH_BACKFILL, DagsterDev
    from dicom_assets.testing.demo import build_demo_dataset
    from dicom_assets.testing.xnat import XnatTestServer

    root = build_demo_dataset(tmp_path / "dataset", samples, slices=2,
                              participants=tuple(f"BF_{i:03d}" for i in range(N_PARTICIPANTS)),
                              extra_manifest_participants=())
    visits = sorted(f"BF{i:03d}_{s}" for i in range(N_PARTICIPANTS) for s in ("ses-01", "ses-02"))
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(home))  # the instance read here is the daemon's
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    limits = yaml.safe_load((REPO / "dagster.yaml").read_text())["concurrency"]
    max_runs, pool_limit = limits["runs"]["max_concurrent_runs"], limits["pools"]["default_limit"]

    xnat = XnatTestServer(samples.xnat_schemas, "admin", "pw", storage=tmp_path / "xnat").start()
    xnat.import_seconds = 2.0  # every upload takes a while: overlapping uploads would show
    env = {"DAGSTER_HOME": str(home), "DICOM_ASSETS_ROOT": str(root), "XNAT_HOST": xnat.url,
           "XNAT_USER": "admin", "XNAT_PASSWORD": "pw",
           "DICOM_ASSETS_SENSORS": "off", "DICOM_ASSETS_EXECUTOR": "in_process"}
    log = tmp_path / "dagster-dev.log"
    dev = DagsterDev(REPO / "workspace.yaml", cwd=REPO, env=env, log=log, start_timeout=180)
    try:
        dev.start()
        instance = DagsterInstance.from_config(str(home))
        instance.add_dynamic_partitions("visits", visits)
        # a backfill of all the visits, and a second one of 10 of them launched at once (a user
        # clicking twice): the queue must hold the second run of each of those visits back
        ids, twice = [], visits[::5]
        for names in (visits, twice):
            launched = dev.graphql(LAUNCH_BACKFILL, {"params": {
                "partitionNames": names, "fromFailure": False,
                "assetSelection": [{"path": [a]} for a in ASSETS],
            }})["launchPartitionBackfill"]
            assert launched["__typename"] == "LaunchBackfillSuccess", launched
            ids.append(launched["backfillId"])

        def finished():
            parts = [{r.tags.get("dagster/partition") for r in instance.get_runs(RunsFilter(tags={"dagster/backfill": b}))
                      if r.is_finished} for b in ids]
            return ([len(p) for p in parts] == [len(visits), len(twice)]
                    and all(r.is_finished for r in instance.get_runs())
                    # the backfills are done too, so no late duplicate can still be launched
                    and all(instance.get_backfill(b).status in BULK_ACTION_TERMINAL_STATUSES for b in ids))
        _wait(finished, 1500, "both backfills to finish", log)
        records = instance.get_run_records()
    finally:
        dev.stop()
        xnat.stop()

    chain_runs = [r for r in records if r.dagster_run.tags.get("dagster/partition") in visits]
    failed = [r.dagster_run.run_id for r in chain_runs if r.dagster_run.status != DagsterRunStatus.SUCCESS]
    assert not failed, f"{len(failed)} runs failed; see {log}"
    by_visit: dict[str, list] = {}
    for r in chain_runs:
        by_visit.setdefault(r.dagster_run.tags["dagster/partition"], []).append((r.start_time, r.end_time))
    assert sorted(by_visit) == visits
    # no duplicates: one run per visit per backfill, and no run outside the backfills
    runs_of: dict[tuple[str, str], list[str]] = {}
    for r in chain_runs:
        run = r.dagster_run
        runs_of.setdefault((run.tags.get("dagster/backfill"), run.tags["dagster/partition"]), []).append(run.run_id)
    expected = {(ids[0], v) for v in visits} | {(ids[1], v) for v in twice}
    assert set(runs_of) == expected, f"runs outside the two backfills: {sorted(set(runs_of) - expected)}"
    dupes = {k: ids_ for k, ids_ in runs_of.items() if len(ids_) != 1}
    assert not dupes, f"visits run more than once for one backfill: {dupes}"
    assert all(len(by_visit[v]) == 2 for v in twice)  # the limits had something to hold back
    for visit, spans in by_visit.items():
        spans.sort()
        for (s1, e1), (s2, e2) in zip(spans, spans[1:]):
            assert s2 >= e1, f"two runs of {visit} overlapped"
    events = sorted([(r.start_time, 1) for r in chain_runs] + [(r.end_time, -1) for r in chain_runs])
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    assert peak <= max_runs
    assert xnat.max_concurrent_imports <= pool_limit
    assert xnat.max_concurrent_imports >= 1
    project = xnat.projects["QPN_DEMO"]
    assert len([e for s in project.subjects.values() for e in s.experiments]) == len(visits)
