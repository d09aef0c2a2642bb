"""The cluster profile, for real: Redis (broker and result backend) and PostgreSQL (the
instance) on free loopback ports, two Celery workers started as on other machines (their own
process group, folder, HOME and environment), two more on standby (one whose tarball writer
is slowed down, one whose dataset root is not mounted), and ``dagster dev`` (webserver +
daemon) with deploy/dagster.celery.yaml; runs and backfills launched as the UI launches them
(GraphQL). One cluster for the whole module (its start and the reference visits: ~40 s).

What is checked, as a site would check it:

- 8 visits through the two workers (20 with ``DICOM_ASSETS_TEST_PROFILE=full``: the suite's
  time budget) get the
  outputs the default executor gives (tarball sha256, metadata JSON, DataLad commit content,
  XNAT session), with the queues routing the steps (XNAT only on the worker that takes the
  ``xnat`` queue) and the run-queue limits of the file holding across workers (run records, as
  test_backfill.py checks them);
- a worker SIGKILLed in the middle of a tarball: the visit completes, the tarball is the right
  one, no temporary file is left, XNAT holds one session with each file once;
- Redis restarted during a backfill: every visit completes through the retry policy alone;
- a worker whose dataset root is missing: the step fails naming the path and the worker, and a
  re-execution from failure converges;
- the workers' check of a task delivered again, on a real run's event log.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from dicom_assets.testing import cluster as cl

REPO = Path(__file__).resolve().parents[1]
CELERY_YAML = REPO / "deploy" / "dagster.celery.yaml"
ASSETS = ["raw_dicoms", "organized_dicoms", "visit_tarball", "visit_metadata", "datalad_dataset", "visit_catalog",
          "xnat_session"]
#: participants (x 2 sessions) of the identical-outputs runs: 8 visits in `make test` (the suite's
#: time budget; docs/deploy.md), the issue's 20 with DICOM_ASSETS_TEST_PROFILE=full
MAIN = tuple(f"CM_{i:03d}" for i in range(10 if os.environ.get("DICOM_ASSETS_TEST_PROFILE") == "full" else 4))
KILL = ("CK_001",)
REDIS = ("CR_001",)
ROOTLESS = ("CN_001",)
MISSING_ROOT = "/mnt/not-mounted/dataset"
MAIN_WORKERS = ("w1", "w2")
QUEUES = ("dagster", "cpu", "xnat")
VISIBILITY = 5.0  # seconds before a vanished worker's task is given to another (short: a test)

pytestmark = [pytest.mark.slow, pytest.mark.faults]


def _visits(participants, sessions=("ses-01", "ses-02")):
    return sorted(f"{p.replace('_', '')}_{s}" for p in participants for s in sessions)


def _wait(predicate, timeout: float, what: str, logs=()):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(1)
    tails = "\n".join(f"--- {p}\n{Path(p).read_text(errors='replace')[-2500:]}" for p in logs if Path(p).is_file())
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{tails}")


class Site:
    """What the module's tests share: the cluster, the daemon, the XNAT, the instance."""

    def __init__(self, root, ref_root, cluster, dev, xnat, ref_xnat, instance, log):
        self.root, self.ref_root, self.cluster, self.dev = root, ref_root, cluster, dev
        self.xnat, self.ref_xnat, self.instance, self.log = xnat, ref_xnat, instance, log

    @property
    def logs(self):
        return [self.log, *(w.log for w in self.cluster.workers.values())]

    def backfill(self, visits, assets=ASSETS) -> str:
        from dicom_assets.testing.dagster_dev import LAUNCH_BACKFILL

        self.instance.add_dynamic_partitions("visits", list(visits))
        launched = self.dev.graphql(LAUNCH_BACKFILL, {"params": {
            "partitionNames": list(visits), "fromFailure": False,
            "assetSelection": [{"path": [a]} for a in assets]}})["launchPartitionBackfill"]
        assert launched["__typename"] == "LaunchBackfillSuccess", launched
        return launched["backfillId"]

    def launch(self, visit: str, assets=ASSETS) -> str:
        """One run of one visit, as the UI launches it when one partition is materialized."""
        self.instance.add_dynamic_partitions("visits", [visit])
        out = self.dev.graphql(LAUNCH_RUN, {"p": {
            "selector": {"repositoryLocationName": "dicom_assets", "repositoryName": "__repository__",
                         "jobName": "visit_chain", "assetSelection": [{"path": [a]} for a in assets]},
            "executionMetadata": {"tags": [{"key": "dagster/partition", "value": visit}]}}})["launchRun"]
        assert out["__typename"] == "LaunchRunSuccess", out
        return out["run"]["runId"]

    def runs_of(self, visits):
        return [r for r in self.instance.get_run_records()
                if r.dagster_run.tags.get("dagster/partition") in set(visits)]

    def wait_done(self, visits, timeout=150):
        """Until every visit has a successful run and no run of them is still going."""
        from dagster import DagsterRunStatus

        def done():
            runs = [r.dagster_run for r in self.runs_of(visits)]
            ok = {r.tags["dagster/partition"] for r in runs if r.status == DagsterRunStatus.SUCCESS}
            return ok == set(visits) and all(r.is_finished for r in runs)
        _wait(done, timeout, f"{len(visits)} visits to complete", self.logs)

    def worker_of(self, run_id: str) -> dict[str, list[str]]:
        """step key -> the Celery workers that started it (from the run's engine events)."""
        out: dict[str, list[str]] = {}
        for rec in self.instance.all_logs(run_id):
            msg = rec.dagster_event.message if rec.dagster_event else ""
            if msg and "in celery worker " in msg and msg.startswith("[CeleryExecutor] Executing steps"):
                out.setdefault(rec.dagster_event.step_key, []).append(msg.split("in celery worker ")[1].split()[0])
        return out

    def control(self):
        from celery import Celery

        return Celery("control", broker=self.cluster.redis.url)

    @contextmanager
    def only(self, name: str):
        """The module's two workers stop taking tasks (Celery's ``cancel_consumer``, as an
        operator does it) and worker ``name``, on standby until now, takes every queue; at the
        end it stops taking them (if it is still alive) and the two take theirs again."""
        ctl = self.control()
        main = [self.cluster.workers[n] for n in MAIN_WORKERS]
        special = self.cluster.workers[name]

        def consume(worker, queues, on: bool):
            for q in queues:
                call = ctl.control.add_consumer if on else ctl.control.cancel_consumer
                assert call(q, destination=[worker.hostname], reply=True, timeout=10), (worker.hostname, q)
        try:
            for w in main:
                consume(w, w.spec.queues, False)
            consume(special, QUEUES, True)
            yield special
        finally:
            if special.proc is not None and special.proc.poll() is None:
                consume(special, QUEUES, False)
            for w in main:
                consume(w, w.spec.queues, True)
            ctl.close()


@pytest.fixture(scope="module")
def site(samples, tmp_path_factory):
    why = cl.missing()
    if why:
        pytest.skip(why)
    from dagster import DagsterInstance, instance_for_test

    from dicom_assets.defs.resources import XnatResource
    from dicom_assets.testing.dagster_dev import DagsterDev
    from dicom_assets.testing.demo import build_demo_dataset
    from dicom_assets.testing.xnat import XnatTestServer

    from .helpers import run_chain

    top = tmp_path_factory.mktemp("celery")
    root = build_demo_dataset(top / "dataset", samples, slices=2, bids_config=False,
                              participants=MAIN + KILL + REDIS + ROOTLESS, extra_manifest_participants=())
    xnat = XnatTestServer(samples.xnat_schemas, "admin", "pw", storage=top / "xnat").start()
    xnat.import_seconds = 0.3  # overlapping uploads would show
    secrets = {"XNAT_HOST": xnat.url, "XNAT_USER": "admin", "XNAT_PASSWORD": "pw"}
    workers = [cl.WorkerSpec("w1", ("dagster", "cpu")), cl.WorkerSpec("w2", ("dagster", "cpu", "xnat")),
               # on standby (a queue no step uses) until a test gives them the queues
               cl.WorkerSpec("w3", ("standby-w3",), app="dicom_assets_tests.slow_worker",
                             env={"PYTHONPATH": str(REPO)}),
               cl.WorkerSpec("w4", ("standby-w4",), env={"DICOM_ASSETS_ROOT": MISSING_ROOT})]
    cluster = cl.Cluster(top / "cluster", root, workers=workers, extra_env=secrets, visibility_timeout=VISIBILITY)
    home = top / "dagster_home"
    home.mkdir()
    shutil.copy(CELERY_YAML, home / "dagster.yaml")
    log = top / "dagster-dev.log"
    saved = dict(os.environ)
    ref_xnat = None
    try:
        cluster.start(wait=False)  # the workers boot while the reference is made
        # the reference: the same visits by the default executor (in-process), to their own XNAT
        ref_root = top / "reference"
        shutil.copytree(root, ref_root, symlinks=True)
        ref_xnat = XnatTestServer(samples.xnat_schemas, "admin", "pw", storage=top / "ref-xnat").start()
        with instance_for_test() as inst:
            for visit in _visits(MAIN) + _visits(KILL, ("ses-01",)):
                assert run_chain(inst, ref_root, visit, datalad=True,
                                 xnat=XnatResource(server=ref_xnat.url, user="admin", password="pw")).success
        cluster.wait_workers()
        env = {**cluster.env(), "DAGSTER_HOME": str(home), "DICOM_ASSETS_SENSORS": "off"}
        os.environ.update(env)  # the instance read here is the daemon's (PostgreSQL)
        dev = DagsterDev(REPO / "workspace.yaml", cwd=REPO, env=env, log=log, start_timeout=180)
        dev.start()
        try:
            with DagsterInstance.get() as instance:
                assert type(instance.run_storage).__name__ == "PostgresRunStorage"
                cl.prime_pools(instance)  # (a Dagster race on a fresh instance: docs/deploy.md)
                yield Site(root, ref_root, cluster, dev, xnat, ref_xnat, instance, log)
        finally:
            dev.stop()
    finally:
        cluster.stop()
        xnat.stop()
        if ref_xnat is not None:
            ref_xnat.stop()
        os.environ.clear()
        os.environ.update(saved)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _outputs(root: Path, visit: str) -> dict:
    """What a user compares between two runs of a visit: the tarball's sha256, both metadata
    JSON files, and the DataLad dataset's HEAD: every file's path, mode and content, the root's
    own path written as ``<root>`` (the default store URL is the root's ``file://`` URL), and
    the dataset id left out (a fresh UUID per dataset)."""
    store = root / "store" / "QPN"
    ds = str(root / "datalad" / "QPN" / visit)
    entries = [line.split(None, 3) for line in subprocess.run(
        ["git", "-C", ds, "ls-tree", "-r", "HEAD"], check=True, capture_output=True, text=True).stdout.splitlines()]
    blobs = subprocess.run(["git", "-C", ds, "cat-file", "--batch"], check=True, capture_output=True,
                           input="".join(f"{e[2]}\n" for e in entries).encode()).stdout
    files, pos = {}, 0
    for mode, _, sha, name in entries:
        header_end = blobs.index(b"\n", pos)
        size = int(blobs[pos:header_end].split()[2])
        body = blobs[header_end + 1:header_end + 1 + size].decode("utf-8", "replace").replace(str(root), "<root>")
        pos = header_end + 1 + size + 1
        if name == ".datalad/config":
            body = "\n".join(line for line in body.splitlines() if not line.strip().startswith("id = "))
        files[name] = (mode, body)
    return {"tarball": _sha256(store / f"{visit}_dicom.tar"),
            "metadata_tarball": (store / f"{visit}_metadata_tarball.json").read_text(),
            "metadata_dicoms": (store / f"{visit}_metadata_dicoms.json").read_text(),
            "datalad_files": files}


def _xnat_session(server, visit: str) -> dict[str, list[str]]:
    """The visit's XNAT session: scan series -> its DICOM files (sorted; a duplicate would show)."""
    exp = server.projects["QPN_DEMO"].experiment(visit)
    assert exp is not None, f"no XNAT session {visit}"
    return {s.series_description + "/" + s.uid: sorted(s.files) for s in exp.scans.values()}


def _peak(records) -> int:
    events = sorted([(r.start_time, 1) for r in records] + [(r.end_time, -1) for r in records])
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    return peak


def _no_overlap(records):
    spans: dict[str, list] = {}
    for r in records:
        spans.setdefault(r.dagster_run.tags["dagster/partition"], []).append((r.start_time, r.end_time))
    for visit, s in spans.items():
        s.sort()
        for (s1, e1), (s2, e2) in zip(s, s[1:]):
            assert s2 >= e1, f"two runs of {visit} overlapped"


def test_visits_through_two_workers_get_the_default_executors_outputs(site):
    visits = _visits(MAIN)
    # one run per visit, as the downloads sensor or the UI launches them (a backfill waits for the
    # daemon's 30 s loop; the Redis test below goes through one)
    launched = {site.launch(v) for v in visits}
    site.wait_done(visits)
    records = site.runs_of(visits)
    assert {r.dagster_run.run_id for r in records} == launched
    assert sorted(r.dagster_run.tags["dagster/partition"] for r in records) == visits  # one run per visit

    for visit in visits:
        assert _outputs(site.root, visit) == _outputs(site.ref_root, visit), visit
        assert _xnat_session(site.xnat, visit) == _xnat_session(site.ref_xnat, visit), visit

    # every step ran on a Celery worker, on a worker that takes its queue
    w1, w2 = site.cluster.workers["w1"].hostname, site.cluster.workers["w2"].hostname
    used: dict[str, set] = {}
    for r in records:
        steps = site.worker_of(r.dagster_run.run_id)
        assert set(steps) == set(ASSETS), (r.dagster_run.run_id, steps)
        for step, names in steps.items():
            used.setdefault(step, set()).update(names)
    assert used["xnat_session"] == {w2}, "XNAT uploads go to the xnat queue, which only w2 takes"
    assert {w1, w2} <= set().union(*used.values()), "both workers took steps"

    # the instance's limits held across the workers (run records, the XNAT server's count)
    limits = yaml.safe_load(CELERY_YAML.read_text())["concurrency"]
    _no_overlap(records)
    assert _peak(records) <= limits["runs"]["max_concurrent_runs"]
    assert 1 <= site.xnat.max_concurrent_imports <= limits["pools"]["default_limit"]


def _holder(worker: cl.CeleryWorker, path: Path) -> bool:
    for pid in worker.group_pids():
        try:
            if any(os.readlink(f) == str(path) for f in Path(f"/proc/{pid}/fd").iterdir()):
                return True
        except OSError:
            continue
    return False


def test_a_worker_killed_in_the_middle_of_a_tarball_leaves_the_visit_complete(site):
    from dagster import AssetKey, AssetRecordsFilter, DagsterEventType

    visit = _visits(KILL, ("ses-01",))[0]
    store = site.root / "store" / "QPN"
    with site.only("w3") as worker:  # its tarball writer pauses after each member
        site.launch(visit)
        found: list[Path] = []

        def writing():
            found[:] = list(store.glob(f".{visit}_dicom.tar.tmp-*"))
            return bool(found)
        _wait(writing, 90, "the tarball's temporary file", site.logs)
        time.sleep(0.6)  # a few members in
        assert _holder(worker, found[0]), "the worker writing the tarball is the one killed"
        worker.kill()
        killed_at = time.monotonic()
        assert found[0].exists(), "killed before the rename: its temporary file is left"
    # the other workers take their queues again; Redis gives them the unacknowledged task once the
    # visibility timeout has passed
    site.wait_done([visit], timeout=120)
    assert time.monotonic() - killed_at >= VISIBILITY * 0.5

    (run,) = [r.dagster_run for r in site.runs_of([visit])]
    assert len(site.worker_of(run.run_id)["visit_tarball"]) == 2, "the tarball step was delivered twice"
    starts = [e for e in site.instance.all_logs(run.run_id, of_type=DagsterEventType.STEP_START)
              if e.dagster_event.step_key == "visit_tarball"]
    assert len(starts) == 2
    assert not list(store.glob(".*.tmp-*")), "no temporary file left in the store"
    ref = _outputs(site.ref_root, visit)
    assert _outputs(site.root, visit) == ref
    meta = json.loads((store / f"{visit}_metadata_tarball.json").read_text())
    assert meta["sha256"] == ref["tarball"]
    # one XNAT session of the visit's study (no second one under another label), each file once,
    # as the default executor's
    study = site.ref_xnat.projects["QPN_DEMO"].experiment(visit).uid
    sessions = [e.label for s in site.xnat.projects["QPN_DEMO"].subjects.values() for e in s.experiments.values()
                if e.uid == study]
    assert sessions == [visit]
    assert _xnat_session(site.xnat, visit) == _xnat_session(site.ref_xnat, visit)
    mats = site.instance.fetch_materializations(
        AssetRecordsFilter(asset_key=AssetKey("visit_tarball"), asset_partitions=[visit]), limit=10).records
    assert len(mats) == 1, "one materialization of the tarball"


def test_a_worker_without_the_dataset_root_names_the_path_and_itself(site):
    from dagster import DagsterRunStatus

    visit = _visits(ROOTLESS, ("ses-01",))[0]
    missing = MISSING_ROOT
    with site.only("w4") as worker:  # its DICOM_ASSETS_ROOT is not mounted
        site.launch(visit)

        def failed():
            return any(r.dagster_run.status == DagsterRunStatus.FAILURE for r in site.runs_of([visit]))
        _wait(failed, 90, "the run on the worker without the root to fail", site.logs)
        pids = worker.group_pids()
    (run,) = [r.dagster_run for r in site.runs_of([visit])]
    errors = [e.dagster_event.step_failure_data.error.message for e in site.instance.all_logs(run.run_id)
              if e.dagster_event and e.dagster_event.event_type_value == "STEP_FAILURE"]
    assert errors, "the step failed"
    assert f"dataset root {missing} does not exist on worker {socket.gethostname()}:" in errors[0], errors[0]
    pid = int(errors[0].split(f"{socket.gethostname()}:", 1)[1].split()[0])
    assert pid in pids, "the message names the worker's process"

    # the root mounted again (the module's workers): a re-execution from failure converges
    reexec = site.dev.graphql(REEXECUTE, {"runId": run.run_id})["launchRunReexecution"]
    assert reexec["__typename"] == "LaunchRunSuccess", reexec
    site.wait_done([visit])
    assert (site.root / "store" / "QPN" / f"{visit}_dicom.tar").is_file()
    assert len(_xnat_session(site.xnat, visit)) >= 1


LAUNCH_RUN = """
mutation($p: ExecutionParams!) {
  launchRun(executionParams: $p) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
    ... on InvalidSubsetError { message }
    ... on RunConfigValidationInvalid { errors { message } }
  }
}"""

REEXECUTE = """
mutation($runId: String!) {
  launchRunReexecution(reexecutionParams: {parentRunId: $runId, strategy: FROM_FAILURE}) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
  }
}"""


def test_the_workers_ran_in_their_own_process_groups_folders_and_homes(site):
    for worker in site.cluster.workers.values():
        if worker.proc is None or worker.proc.poll() is not None:
            continue
        assert os.getpgid(worker.pid) == worker.pid != os.getpgid(0)
        env = dict(line.split("=", 1) for line in
                   Path(f"/proc/{worker.pid}/environ").read_bytes().decode().split("\0") if "=" in line)
        assert env["HOME"] == str(worker.dir) == os.readlink(f"/proc/{worker.pid}/cwd")
        assert "DAGSTER_HOME" not in env, "a worker needs no instance folder: PostgreSQL and Redis are reached"
        assert env["DICOM_ASSETS_CELERY_BROKER"].startswith("redis://:")


def test_redis_restarted_during_a_backfill_every_visit_completes_by_the_retry_policy(site):
    from dagster import DagsterEventType, DagsterRunStatus

    visits = _visits(REDIS)
    site.backfill(visits)
    ran = lambda: any(site.worker_of(r.dagster_run.run_id) for r in site.runs_of(visits))  # noqa: E731
    _wait(ran, 90, "the first steps on the workers", site.logs)
    site.cluster.redis.restart(down_seconds=2.0)
    site.wait_done(visits, timeout=200)

    records = site.runs_of(visits)
    _no_overlap(records)
    for visit in visits:
        assert (site.root / "store" / "QPN" / f"{visit}_dicom.tar").is_file()
        assert len(_xnat_session(site.xnat, visit)) >= 1
    failed = [r.dagster_run for r in records if r.dagster_run.status == DagsterRunStatus.FAILURE]
    assert failed, "the restart reached a run: it lost the broker and failed"
    for run in failed:
        why = [e.dagster_event.message for e in site.instance.all_logs(run.run_id, of_type=DagsterEventType.RUN_FAILURE)]
        text = " ".join(m or "" for m in why) + " ".join(
            str(e.dagster_event.event_specific_data.error) for e in site.instance.all_logs(
                run.run_id, of_type=DagsterEventType.RUN_FAILURE) if e.dagster_event.event_specific_data.error)
        assert f"127.0.0.1:{site.cluster.redis.port}" in text, f"the failure names the broker: {text[:500]}"
        # retried by the daemon (run_retries of the file), no click; the retry succeeded or was retried
        retries = [r.dagster_run for r in records if r.dagster_run.tags.get("dagster/parent_run_id") == run.run_id]
        assert retries, f"run {run.run_id} failed and was not retried"
    assert not list((site.root / "store" / "QPN").glob(".*.tmp-*"))


def test_a_task_delivered_again_runs_only_a_step_that_never_ended(demo_root, instance):
    """The workers' delivery check, on a real run's event log (no cluster needed): a task of an
    ended run is dropped; while the run goes on, a step that succeeded hands back its recorded
    events (STEP_START to STEP_SUCCESS) and is not run again; a step with no end runs."""
    from dagster import DagsterEventType, DagsterRunStatus

    from dicom_assets.defs.cluster import _delivery_verdict

    from .helpers import run_chain

    result = run_chain(instance, demo_root, "QPN001_ses-01", selection=["raw_dicoms", "organized_dicoms"])
    run = instance.get_run_by_id(result.run_id)
    verdict, events = _delivery_verdict(instance, run, ["raw_dicoms"])
    assert "already ended" in verdict and events == []

    going = run._replace(status=DagsterRunStatus.STARTED)  # the same run, as seen while it goes on
    verdict, events = _delivery_verdict(instance, going, ["organized_dicoms"])
    assert "already succeeded" in verdict
    assert events[0].event_type == DagsterEventType.STEP_START and events[-1].event_type == DagsterEventType.STEP_SUCCESS
    assert {e.step_key for e in events} == {"organized_dicoms"}
    assert _delivery_verdict(instance, going, ["visit_tarball"]) == ("run", [])
