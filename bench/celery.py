"""The cluster profile against one machine (issue 28), one run, side by side:

* default   the project's dagster.yaml: SQLite, the default run launcher, the in-process executor
* celery-2  deploy/dagster.celery.yaml: PostgreSQL, each step a task on two Celery workers
            (Redis broker), as ``dicom_assets.testing.cluster`` starts them
* celery-1  the same with one worker, so a reader sees how it scales (2 cores: at most 2x)

Each is a backfill of the same N demo visits (whole chain with DataLad, catalog and the XNAT
test server; no BIDS), launched as the UI launches one (GraphQL), on a fresh dataset root.
Visits per hour are counted from the first run's start to the last run's end (the backfill
daemon's 30 s loop before the first run is left out); per step, from each run's event log:
the step's own seconds (STEP_START to STEP_SUCCESS) and the run's seconds outside any step,
divided by its steps (launching a step, waiting for it, Dagster's bookkeeping).

  .venv/bin/python bench/celery.py --visits 40          (make bench-celery BENCH_ARGS=...)

Wall-clock figures on a shared 2-core machine vary with the load; the table says what ran.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent


def _load_throughput():
    """bench/throughput.py's helpers, then bench/ off sys.path: this file's name would otherwise
    stand for the ``celery`` package in this process."""
    spec = importlib.util.spec_from_file_location("throughput", HERE / "throughput.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
    return mod


_throughput = _load_throughput()
_step_seconds, _xnat = _throughput._step_seconds, _throughput._xnat

ASSETS = ["raw_dicoms", "organized_dicoms", "visit_tarball", "visit_metadata", "datalad_dataset", "visit_catalog",
          "xnat_session"]
GOAL_OVERHEAD = 0.15  # issue 28: the cluster's loss of throughput against one machine


def _visits(n: int) -> tuple[tuple[str, ...], list[str]]:
    parts = tuple(f"BC_{i:03d}" for i in range(-(-n // 2)))
    visits = sorted(f"{p.replace('_', '')}_{s}" for p in parts for s in ("ses-01", "ses-02"))[:n]
    return parts, visits


def _backfill(dev, instance, visits, timeout: float):
    from dagster import RunsFilter

    from dicom_assets.testing.dagster_dev import LAUNCH_BACKFILL

    instance.add_dynamic_partitions("visits", visits)
    launched = dev.graphql(LAUNCH_BACKFILL, {"params": {
        "partitionNames": visits, "fromFailure": False, "assetSelection": [{"path": [a]} for a in ASSETS]}},
        timeout=120)["launchPartitionBackfill"]
    if launched["__typename"] != "LaunchBackfillSuccess":
        raise RuntimeError(f"backfill not launched: {launched}")
    bid = launched["backfillId"]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        runs = instance.get_runs(RunsFilter(tags={"dagster/backfill": bid}))
        ok = {r.tags.get("dagster/partition") for r in runs if r.status.value == "SUCCESS"}
        # a run retried by the daemon carries the backfill's tag too
        if (ok == set(visits) or len({r.tags.get("dagster/partition") for r in runs}) == len(visits)) \
                and all(r.is_finished for r in runs) and not _retry_pending(runs):
            break
        time.sleep(2)
    return instance.get_run_records(RunsFilter(tags={"dagster/backfill": bid}))


def _retry_pending(runs) -> bool:
    """A failed run the daemon may still retry (no child run yet, retries left)."""
    children = {r.tags.get("dagster/parent_run_id") for r in runs}
    return any(r.status.value == "FAILURE" and r.run_id not in children
               and int(r.tags.get("dagster/retry_number", "0")) < 2 for r in runs)


def _figures(instance, records, n: int) -> dict:
    from dagster import DagsterRunStatus

    done = [r for r in records if r.dagster_run.status == DagsterRunStatus.SUCCESS and r.start_time and r.end_time]
    if not done:
        return {"runs succeeded": f"0 / {n}"}
    retried = sum(1 for r in records if r.dagster_run.tags.get("dagster/parent_run_id"))
    wall = max(r.end_time for r in done) - min(r.start_time for r in done)
    step_s, outside, runs_s = [], [], []
    for r in done:
        steps = _step_seconds(instance, r.dagster_run.run_id)
        run_s = r.end_time - r.start_time
        runs_s.append(run_s)
        step_s.extend(steps.values())
        if steps:
            outside.append(max(0.0, run_s - sum(steps.values())) / len(steps))
    return {"runs succeeded": f"{len(done)} / {n}", "runs retried by the daemon": retried, "wall s (first run start to last run end)": wall,
            "visits per hour": len(done) / wall * 3600, "median run s": statistics.median(runs_s),
            "mean step s (its own work)": statistics.mean(step_s),
            "mean s per step outside steps": statistics.mean(outside)}


def run_default(samples, work: Path, n: int, timeout: float) -> dict:
    from dagster import DagsterInstance

    from dicom_assets.testing.dagster_dev import DagsterDev
    from dicom_assets.testing.demo import build_demo_dataset

    parts, visits = _visits(n)
    root = build_demo_dataset(work / "root", samples, participants=parts, extra_manifest_participants=(),
                              bids_config=False)
    home = work / "home"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    xnat = _xnat(samples, work / "xnat")
    env = {"DAGSTER_HOME": str(home), "DICOM_ASSETS_ROOT": str(root), "XNAT_HOST": xnat.url, "XNAT_USER": "admin",
           "XNAT_PASSWORD": "pw", "DICOM_ASSETS_SENSORS": "off", "DICOM_ASSETS_EXECUTOR": "in_process"}
    saved = dict(os.environ)
    try:
        os.environ["DAGSTER_HOME"] = str(home)  # dagster.yaml reads it
        with DagsterDev(REPO / "workspace.yaml", cwd=REPO, env=env, log=work / "dagster-dev.log",
                        start_timeout=240, stop_timeout=60) as dev, DagsterInstance.from_config(str(home)) as inst:
            return _figures(inst, _backfill(dev, inst, visits, timeout), n)
    finally:
        os.environ.clear()
        os.environ.update(saved)
        xnat.stop()


def run_celery(samples, work: Path, n: int, workers: int, timeout: float) -> dict:
    from dagster import DagsterInstance

    from dicom_assets.testing.cluster import Cluster, WorkerSpec, prime_pools
    from dicom_assets.testing.dagster_dev import DagsterDev
    from dicom_assets.testing.demo import build_demo_dataset

    parts, visits = _visits(n)
    root = build_demo_dataset(work / "root", samples, participants=parts, extra_manifest_participants=(),
                              bids_config=False)
    home = work / "home"
    home.mkdir()
    shutil.copy(REPO / "deploy" / "dagster.celery.yaml", home / "dagster.yaml")
    xnat = _xnat(samples, work / "xnat")
    secrets = {"XNAT_HOST": xnat.url, "XNAT_USER": "admin", "XNAT_PASSWORD": "pw"}
    specs = [WorkerSpec(f"w{i + 1}", ("dagster", "cpu", "xnat")) for i in range(workers)]
    saved = dict(os.environ)
    try:
        with Cluster(work / "cluster", root, workers=specs, extra_env=secrets) as cluster:
            env = {**cluster.env(), "DAGSTER_HOME": str(home), "DICOM_ASSETS_SENSORS": "off"}
            os.environ.update(env)  # the instance read here: PostgreSQL
            with DagsterDev(REPO / "workspace.yaml", cwd=REPO, env=env, log=work / "dagster-dev.log",
                            start_timeout=240, stop_timeout=60) as dev, DagsterInstance.get() as inst:
                prime_pools(inst)  # a Dagster race on a fresh instance (docs/deploy.md)
                return _figures(inst, _backfill(dev, inst, visits, timeout), n)
    finally:
        os.environ.clear()
        os.environ.update(saved)
        xnat.stop()


def table(results: dict[str, dict]) -> list[str]:
    names = list(results)
    keys = [k for k in next(iter(results.values()))]
    for r in results.values():
        keys += [k for k in r if k not in keys]
    fmt = lambda v: f"{v:,.2f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [f"| {'':<44} | " + " | ".join(f"{n:>12}" for n in names) + " |",
             "|" + "-" * 46 + "|" + "|".join("-" * 14 for _ in names) + "|"]
    for k in keys:
        lines.append(f"| {k:<44} | " + " | ".join(f"{fmt(results[n].get(k, '')):>12}" for n in names) + " |")
    return lines


def goal_lines(results: dict[str, dict]) -> list[str]:
    d, c2, c1 = (results.get(k, {}).get("visits per hour") for k in ("default", "celery-2", "celery-1"))
    out = []
    if d and c2:
        overhead = d / c2 - 1
        out.append(f"  overhead of two Celery workers against one machine: {overhead:.0%} more time per visit "
                   f"({c2:,.0f} against {d:,.0f} visits/h; goal <= {GOAL_OVERHEAD:.0%}): "
                   f"{'met' if overhead <= GOAL_OVERHEAD else 'MISSED'}")
    if c1 and c2:
        out.append(f"  two workers against one: {c2 / c1:.2f}x (at most 2x on 2 cores)")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--visits", type=int, default=40, help="visits per backfill (issue 28 asks 100)")
    ap.add_argument("--only", choices=["default", "celery-2", "celery-1"], action="append",
                    help="run only these configurations (repeatable)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds a backfill may take")
    ap.add_argument("--work", type=Path, default=None, help="folder for the roots (default: a temporary one)")
    args = ap.parse_args(argv)

    from dicom_assets.testing.cluster import missing
    from dicom_assets.testing.samples import ensure_samples

    why = missing()
    if why:
        print(f"cannot run: {why}", file=sys.stderr)
        return 3
    samples = ensure_samples(os.environ.get("DICOM_ASSETS_CACHE", str(REPO / ".cache")))
    work = args.work or Path(tempfile.mkdtemp(prefix="dicom-assets-bench-celery-"))
    wanted = args.only or ["default", "celery-2", "celery-1"]
    results: dict[str, dict] = {}
    for name in wanted:
        t = time.monotonic()
        sub = work / name
        shutil.rmtree(sub, ignore_errors=True)
        sub.mkdir(parents=True)
        results[name] = (run_default(samples, sub, args.visits, args.timeout) if name == "default" else
                         run_celery(samples, sub, args.visits, int(name[-1]), args.timeout))
        print(f"{name}: done in {time.monotonic() - t:.0f} s (load {os.getloadavg()[0]:.1f})", file=sys.stderr,
              flush=True)
    print(f"\nbackfill of {args.visits} demo visits, whole chain with XNAT, {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.1f} at the end")
    print("\n".join(table(results)))
    print("\n".join(goal_lines(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
