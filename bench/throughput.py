"""Throughput benchmarks of issue 14 (called by bench/run.py; each part can be skipped there):

* archive_rows   organize with 1 and 2 header-reading processes; visit_tarball and
                 visit_metadata on a corpus of real ~130 KiB GE MR files against GNU
                 ``tar -chf`` + ``sync`` and ``md5sum`` (the per-file overhead the 256 KiB
                 synthetic corpus hides)
* chain_bench    one visit through ``materialize()`` of the whole chain (XNAT included, the
                 XNAT-compatible test server), seconds per step from the run's events
* executor_bench the ``visit_chain`` job as a run executes it (``dagster job execute``), with
                 the in-process executor (the default) and the multiprocess one
* backfill_bench N visits backfilled through ``dagster dev`` (daemon, queue, dagster.yaml),
                 launched as the UI does (GraphQL): visits per hour and peak RSS of the tree

Wall-clock figures on a shared machine vary with the load; each part prints what it ran on.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/corpus.py

# issue 14, beside which bench/run.py prints the figures
GOALS = {
    "organize files/s (2,000-file visit, 2 cores)": (">=", 2000.0),
    "visit_tarball / GNU tar + sync (real GE files)": ("<=", 1.2),
    "visit_metadata / md5sum (real GE files)": ("<=", 1.5),
    "one visit, whole chain with XNAT, run seconds": ("<=", 15.0),
    "backfill visits per hour": (">=", 1000.0),
}


def _best(n, fn):
    times, out = [], None
    for _ in range(n):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def _best_cmd(n, cmd):
    return _best(n, lambda: subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL))[0]


@contextmanager
def organize_pool_forced():
    """Organize shares header reads with helpers whatever the visit's size (to time 2 processes
    on a visit below the size where the asset starts them)."""
    from dicom_assets.core import organize as org

    saved = org.POOL_MIN_FILES, org.HELPER_START_FILES, org.MIN_SHARE
    org.POOL_MIN_FILES, org.HELPER_START_FILES, org.MIN_SHARE = 0, 800, 1
    try:
        yield
    finally:
        org.POOL_MIN_FILES, org.HELPER_START_FILES, org.MIN_SHARE = saved


def archive_rows(corpus: Path, work: Path, repeat: int, label: str, organize_workers=(1, 2)) -> list[dict]:
    """Rows for the stage table: organize per worker count, tarball, metadata, on ``corpus``."""
    from dicom_assets import __version__
    from dicom_assets.core.dicomscan import Rules
    from dicom_assets.core.metadata import describe_tarball
    from dicom_assets.core.organize import organize_visit
    from dicom_assets.core.tarball import organized_files, write_tarball

    files = sorted(p for p in corpus.rglob("*") if p.is_file())
    mb = sum(p.stat().st_size for p in files) / 1e6
    for p in files:  # warm cache
        p.read_bytes()
    rows = []

    def row(stage, seconds, floor_name, floor_seconds):
        rows.append({"stage": f"{stage} ({label})", "seconds": seconds, "files_per_s": len(files) / seconds,
                     "mb_per_s": mb / seconds, "floor": floor_name, "floor_seconds": floor_seconds,
                     "ratio_to_floor": seconds / floor_seconds if floor_seconds else None, "peak_python_mb": 0.0})

    import pydicom

    floor = _best(repeat, lambda: [pydicom.dcmread(p, stop_before_pixels=True) for p in files])[0]
    org = work / f"dicom_{label}" / "V"
    t, _ = _best(repeat, lambda: organize_visit("V_ses-01", corpus, org, Rules()))
    row("organize", t, "pydicom stop_before_pixels", floor)
    for w in organize_workers:
        with organize_pool_forced():
            t, _ = _best(repeat, lambda: organize_visit("V_ses-01", corpus, org, Rules(), workers=w))
        row(f"organize, {w} proc", t, "pydicom stop_before_pixels", floor)
    tar_out = work / f"gnu_{label}.tar"
    floor = _best_cmd(repeat, ["sh", "-c", 'tar -chf "$1" -C "$2" "$3" && sync "$1"', "sh", str(tar_out),
                               str(org.parent), org.name])
    dest = work / f"store_{label}" / "V_ses-01_dicom.tar"
    t, _ = _best(repeat, lambda: write_tarball(organized_files(org), dest, "V_ses-01"))
    row("visit_tarball", t, "GNU tar -chf + sync", floor)
    floor = _best_cmd(repeat, ["md5sum", *map(str, files)])
    t, _ = _best(repeat, lambda: describe_tarball(dest, visit="V_ses-01", study="B", participant="V",
                                                  session="ses-01", tool_version=__version__))
    row("visit_metadata", t, "md5sum", floor)
    return rows


def _step_seconds(instance, run_id: str) -> dict[str, float]:
    """Seconds per step (STEP_START to STEP_SUCCESS/FAILURE) from a run's event log."""
    starts, out = {}, {}
    for e in instance.all_logs(run_id):
        ev = e.dagster_event
        if ev is None or not ev.step_key:
            continue
        if ev.event_type_value == "STEP_START":
            starts[ev.step_key] = e.timestamp
        elif ev.event_type_value in ("STEP_SUCCESS", "STEP_FAILURE") and ev.step_key in starts:
            out[ev.step_key] = e.timestamp - starts[ev.step_key]
    return out


def _demo_root(samples, root: Path, participants: tuple[str, ...], slices: int) -> Path:
    from dicom_assets.testing.demo import build_demo_dataset

    return build_demo_dataset(root, samples, slices=slices, participants=participants,
                              extra_manifest_participants=())


def _xnat(samples, storage: Path):
    from dicom_assets.testing.xnat import XnatTestServer

    return XnatTestServer(samples.xnat_schemas, "admin", "pw", storage=storage).start()


def chain_bench(samples, work: Path, files: int = 346) -> dict:
    """One visit through materialize() of the whole chain, XNAT included: a folder dump of
    ``files`` real GE MR files (the real-file corpus), the visit size of issue 14."""
    from corpus import build_real_corpus
    from dagster import instance_for_test, materialize

    from dicom_assets.definitions import ARCHIVE_CHAIN, CHAIN_CHECKS, INDEX_ASSETS
    from dicom_assets.defs.publish import xnat_session
    from dicom_assets.defs.resources import DatasetResource, XnatResource

    root = work / "chain_root"
    shutil.rmtree(root, ignore_errors=True)
    from dicom_assets.testing.demo import build_demo_dataset

    build_demo_dataset(root, samples, participants=("QPN_001",), extra_manifest_participants=(), with_downloads=False)
    build_real_corpus(root / "downloads" / "ses-01" / "QPN_001_MR", samples, n_files=files, participant="QPN001")
    visit = "QPN001_ses-01"
    xnat = _xnat(samples, work / "chain_xnat")
    try:
        with instance_for_test() as inst:
            inst.add_dynamic_partitions("visits", [visit])
            t = time.perf_counter()
            res = materialize(ARCHIVE_CHAIN + INDEX_ASSETS + [xnat_session] + CHAIN_CHECKS, partition_key=visit,
                              instance=inst, resources={"dataset": DatasetResource(root=str(root)),
                                                        "xnat": XnatResource(server=xnat.url, user="admin",
                                                                             password="pw")})
            wall = time.perf_counter() - t
            rec = inst.get_run_record_by_id(res.run_id)
            steps = _step_seconds(inst, res.run_id)
    finally:
        xnat.stop()
    kept = sum(1 for line in (root / "logs" / "organize" / f"{visit}_files.tsv").read_text().splitlines()[1:]
               if "\tkept\t" in line)
    out = {"visit files (kept)": kept, "materialize() wall s": wall,
           "run seconds (start to end)": rec.end_time - rec.start_time}
    out.update({f"  {k} s": v for k, v in steps.items()})
    return out


def executor_bench(samples, work: Path, slices: int = 8) -> dict:
    """``dagster job execute -j visit_chain`` for one demo visit (XNAT included), in-process
    against multiprocess executor, each on a fresh copy of the root, instance and XNAT."""
    from dagster import DagsterInstance

    pristine = _demo_root(samples, work / "exec_pristine", ("QPN_001",), slices)
    visit = "QPN001_ses-01"
    out = {}
    for executor in ("in_process", "multiprocess"):
        root, home = work / f"exec_{executor}", work / f"exec_home_{executor}"
        shutil.rmtree(root, ignore_errors=True)
        shutil.copytree(pristine, root, symlinks=True)
        shutil.rmtree(home, ignore_errors=True)
        home.mkdir()
        shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
        xnat = _xnat(samples, work / f"exec_xnat_{executor}")
        env = {**os.environ, "DAGSTER_HOME": str(home), "DICOM_ASSETS_ROOT": str(root), "XNAT_HOST": xnat.url,
               "XNAT_USER": "admin", "XNAT_PASSWORD": "pw", "DICOM_ASSETS_EXECUTOR": executor,
               "DICOM_ASSETS_SENSORS": "off"}
        try:
            with _dagster_home(home), DagsterInstance.from_config(str(home)) as inst:
                inst.add_dynamic_partitions("visits", [visit])
            t = time.perf_counter()
            proc = subprocess.run([str(Path(sys.executable).parent / "dagster"), "job", "execute", "-m",
                                   "dicom_assets.definitions", "-j", "visit_chain", "--tags",
                                   json.dumps({"dagster/partition": visit})],
                                  cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
            wall = time.perf_counter() - t
        finally:
            xnat.stop()
        if proc.returncode != 0:
            out[f"{executor}: failed"] = proc.stderr.strip().splitlines()[-1][:200] if proc.stderr else "?"
            continue
        with _dagster_home(home), DagsterInstance.from_config(str(home)) as inst:
            (rec,) = inst.get_run_records()
            steps = _step_seconds(inst, rec.dagster_run.run_id)
        out[f"{executor}: run seconds (start to end)"] = rec.end_time - rec.start_time
        out[f"{executor}: sum of step seconds"] = sum(steps.values())
        out[f"{executor}: CLI wall s (code load included)"] = wall
    if "in_process: run seconds (start to end)" in out and "multiprocess: run seconds (start to end)" in out:
        out["saving per visit run s"] = (out["multiprocess: run seconds (start to end)"]
                                         - out["in_process: run seconds (start to end)"])
    return out


@contextmanager
def _dagster_home(home: Path):
    """DAGSTER_HOME for this process too (dagster.yaml reads it), restored afterwards."""
    old = os.environ.get("DAGSTER_HOME")
    os.environ["DAGSTER_HOME"] = str(home)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("DAGSTER_HOME", None)
        else:
            os.environ["DAGSTER_HOME"] = old


def _tree_rss_mb(session: int) -> float:
    """Resident memory of every process of a session (dagster dev and all it started)."""
    total = 0
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            if int(fields[3]) != session:  # field 6 of stat: the session id
                continue
            with open(f"/proc/{d}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return total / 1024


def backfill_bench(samples, work: Path, visits_n: int = 30, slices: int = 8, timeout: float = 3600) -> dict:
    """``visits_n`` demo visits backfilled through ``dagster dev`` with the project's dagster.yaml
    (whole chain: archive, DataLad, catalog, XNAT test server), as the UI launches a backfill."""
    from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

    from dicom_assets.testing.dagster_dev import LAUNCH_BACKFILL, DagsterDev

    n_part = -(-visits_n // 2)
    root = _demo_root(samples, work / "backfill_root", tuple(f"BF_{i:03d}" for i in range(n_part)), slices)
    visits = sorted(f"BF{i:03d}_{s}" for i in range(n_part) for s in ("ses-01", "ses-02"))[:visits_n]
    home = work / "backfill_home"
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    xnat = _xnat(samples, work / "backfill_xnat")
    env = {"DAGSTER_HOME": str(home), "DICOM_ASSETS_ROOT": str(root), "XNAT_HOST": xnat.url,
           "XNAT_USER": "admin", "XNAT_PASSWORD": "pw", "DICOM_ASSETS_SENSORS": "off"}
    dev = DagsterDev(REPO / "workspace.yaml", cwd=REPO, env=env, log=work / "backfill-dagster-dev.log",
                     start_timeout=240, stop_timeout=60)
    out: dict = {"visits": len(visits), "executor": os.environ.get("DICOM_ASSETS_EXECUTOR", "in_process")}
    rss: list[tuple[float, float]] = []
    try:
        dev.start()
        time.sleep(5)  # the daemon's first loop
        idle_mb = _tree_rss_mb(dev.pid)
        with _dagster_home(home), DagsterInstance.from_config(str(home)) as instance:
            instance.add_dynamic_partitions("visits", visits)
            from dicom_assets.definitions import CHAIN_ASSETS
            params = {"partitionNames": visits, "fromFailure": False,
                      "assetSelection": [{"path": [a.key.path[-1]]} for a in CHAIN_ASSETS]}
            t0 = time.monotonic()
            launched = dev.graphql(LAUNCH_BACKFILL, {"params": params}, timeout=120)["launchPartitionBackfill"]
            if launched["__typename"] != "LaunchBackfillSuccess":
                raise RuntimeError(f"backfill not launched: {launched}")
            bid = launched["backfillId"]
            while time.monotonic() - t0 < timeout:
                rss.append((time.monotonic() - t0, _tree_rss_mb(dev.pid)))
                runs = instance.get_runs(RunsFilter(tags={"dagster/backfill": bid}))
                if len(runs) == len(visits) and all(r.is_finished for r in runs):
                    break
                time.sleep(1)
            took = time.monotonic() - t0
            records = instance.get_run_records(RunsFilter(tags={"dagster/backfill": bid}))
        ok = sum(r.dagster_run.status == DagsterRunStatus.SUCCESS for r in records)
        spans = sorted((r.start_time, r.end_time) for r in records if r.start_time and r.end_time)
        out["runs succeeded"] = f"{ok} / {len(visits)}"
        out["backfill wall s (launch to last run end)"] = took
        out["backfill visits per hour"] = ok / took * 3600 if took else 0.0
        if spans:
            out["median run seconds"] = sorted(e - s for s, e in spans)[len(spans) // 2]
        out["RSS of dagster dev tree: idle MB"] = idle_mb
        out["RSS of dagster dev tree: peak MB"] = max(m for _, m in rss) if rss else 0.0
        if len(rss) >= 4:
            q = len(rss) // 4
            out["RSS, mean of first / last quarter MB"] = (
                f"{sum(m for _, m in rss[:q]) / q:.0f} / {sum(m for _, m in rss[-q:]) / q:.0f}")
    finally:
        dev.stop()
        xnat.stop()
    return out


def goal_lines(figures: dict) -> list[str]:
    """Each goal of issue 14 covered here, its figure beside its target."""
    lines = []
    for key, (op, target) in GOALS.items():
        got = figures.get(key)
        if got is None:
            lines.append(f"  {key:<50} not measured")
            continue
        met = got >= target if op == ">=" else got <= target
        lines.append(f"  {key:<50} {got:>9.2f}   target {op} {target:g}   {'met' if met else 'MISSED'}")
    return lines
