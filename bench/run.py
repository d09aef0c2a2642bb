"""dicom-assets benchmark suite: one command, a table, a JSON file of results.

    make bench                      # 2,000 files x 256 KiB (default)
    .venv/bin/python bench/run.py --files 500 --kb 256 --sensor-items 10000

Each stage's core function is timed against its floor on the same files, warm cache:

* organize        vs  a bare pydicom ``dcmread(stop_before_pixels=True)`` of every file
* visit tarball   vs  GNU ``tar -chf`` of the same files, then ``sync`` of the tar file
                      (the tarball step fsyncs before its atomic rename; GNU tar does not)
* visit metadata  vs  ``md5sum`` of the same files
* sensor          over N download items: a fresh archive taken tick by tick in bounded batches,
                  idle ticks, the periodic full listing, 10 new dumps, cursor size; and one chain
                  step's curation-status update at N visits (goals of issue 15 beside their targets)
* throughput      (bench/throughput.py, issue 14) organize with 1 and 2 header-reading processes;
                  tarball and metadata on 2,000 real ~130 KiB GE MR files vs GNU tar + sync / md5sum;
                  one visit through materialize() of the whole chain with seconds per step; the
                  visit_chain run with the in-process vs the multiprocess executor; a backfill of
                  N visits through `dagster dev` (--backfill N) with visits per hour and peak RSS
* datalad_dataset at 40 files and at all files, direct writer vs the batch-command reference
                  vs `datalad addurls`, each goal of issue 14 printed beside its target

Peak memory is Python's (tracemalloc) for each stage. Not a test: numbers vary by machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pydicom  # noqa: E402

from dicom_assets import __version__  # noqa: E402
from dicom_assets.core.dicomscan import Rules  # noqa: E402
from dicom_assets.core.metadata import describe_tarball  # noqa: E402
from dicom_assets.core.organize import organize_visit  # noqa: E402
from dicom_assets.core.tarball import organized_files, write_tarball  # noqa: E402
from dicom_assets.testing.demo import build_corpus  # noqa: E402
from dicom_assets.testing.samples import ensure_samples  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput as tp  # noqa: E402
from corpus import build_real_corpus  # noqa: E402


def best_of(n, fn):
    """Fastest of n runs (warm cache), with the peak Python memory of the first."""
    times, peak, result = [], 0, None
    for i in range(n):
        if i == 0:
            tracemalloc.start()
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
        if i == 0:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
    return min(times), peak, result


def run_cmd(cmd, **kw):
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, **kw)
    return time.perf_counter() - t


def best_cmd(n, cmd, **kw):
    return min(run_cmd(cmd, **kw) for _ in range(n))


SENSOR_GOALS = {"idle tick s": 0.5, "slowest tick of the fresh archive s": 5.0, "cursor bytes": 64 * 1024,
                "curation step (one visit's row) s": 0.05}  # issue 15


def sensor_bench(items: int, work: Path, batch: int | None = None) -> dict:
    """The downloads sensor over ``items`` dumps, on a real instance, as the daemon runs it
    (cursor kept, partition adds applied): the fresh archive taken tick by tick (each download
    exactly once, in order), idle ticks, the periodic full listing, 10 new dumps; then one
    chain step's curation-status update (issue 15)."""
    import logging

    from dagster import SensorResult, build_sensor_context, instance_for_test

    from dicom_assets.definitions import visit_chain_job
    from dicom_assets.defs.resources import DatasetResource
    from dicom_assets.defs.sensors import build_downloads_sensor
    from dicom_assets.settings import current

    logging.getLogger("dagster").setLevel(logging.WARNING)  # one INFO line per batch otherwise
    settings = current().downloads_sensor(batch=batch)
    sensor = build_downloads_sensor(visit_chain_job, settings=settings)
    root = work / "sensor_root"
    shutil.rmtree(root, ignore_errors=True)
    (root / "tabular" / "demographics").mkdir(parents=True)
    (root / "global_config.json").write_text(json.dumps(
        {"dataset_name": "bench", "study_id": "B", "sessions": ["ses-01", "ses-02"]}))
    rows = ["participant_id,session_id"]
    dl = root / "downloads"
    for ses in ("ses-01", "ses-02"):
        (dl / ses).mkdir(parents=True)
    for i in range(items + 10):  # 10 participants more, whose dumps arrive later
        ses = "ses-01" if i % 2 == 0 else "ses-02"
        rows.append(f"P_{i:06d},{ses}")
        if i < items:
            (dl / ses / f"P_{i:06d}_MR.zip").write_bytes(b"PK\x05\x06" + b"\0" * 18)
    (root / "tabular" / "demographics" / "mr_proc_manifest.csv").write_text("\n".join(rows) + "\n")
    past = time.time() - 30  # the copy ended before the first tick (the sensor runs every 10 s or more)
    for ses in ("ses-01", "ses-02"):
        os.utime(dl / ses, (past, past))
    res = {"dataset": DatasetResource(root=str(root))}
    out: dict = {"batch (run requests per tick)": settings.batch}
    with instance_for_test() as inst:
        state = {"cursor": None}

        def tick():
            ctx = build_sensor_context(instance=inst, cursor=state["cursor"], resources=res)
            t = time.perf_counter()
            r = sensor(ctx)
            took = time.perf_counter() - t
            reqs = []
            if isinstance(r, SensorResult):
                state["cursor"] = r.cursor or state["cursor"]
                reqs = list(r.run_requests or [])
                for add in r.dynamic_partitions_requests or []:
                    inst.add_dynamic_partitions(add.partitions_def_name, list(add.partition_keys))
            return took, reqs

        taken, times, n = [], [], 0
        t0 = time.perf_counter()
        while len(taken) < items and n < 10 * (items // max(settings.batch, 1) + 10):
            took, reqs = tick()
            times.append(took)
            taken += [r.tags["dicom_assets/download"] for r in reqs]
            n += 1
        out["fresh archive: ticks to take every download"] = n
        out["fresh archive: sensor time in all s"] = time.perf_counter() - t0
        out["fresh archive: first tick (all new) s"] = times[0]
        out["fresh archive: slowest tick s"] = max(times)
        out["fresh archive: median tick s"] = sorted(times)[len(times) // 2]
        out["fresh archive: downloads taken / distinct / in order"] = (
            f"{len(taken)} / {len(set(taken))} / {'yes' if taken == sorted(taken) else 'NO'}")
        out["visit partitions"] = len(inst.get_dynamic_partitions("visits"))
        idle = [tick()[0] for _ in range(5)]
        out["idle tick (nothing new), median of 5 s"] = sorted(idle)[2]
        out["idle tick, slowest of 5 s"] = max(idle)
        full = dataclasses.replace(settings, relist_every=1)
        sensor_full = build_downloads_sensor(visit_chain_job, settings=full)
        ctx = build_sensor_context(instance=inst, cursor=state["cursor"], resources=res)
        t = time.perf_counter()
        r = sensor_full(ctx)
        out["idle tick listing every folder in full (each folder: every "
            f"{settings.relist_every}th tick) s"] = time.perf_counter() - t
        state["cursor"] = r.cursor
        for i in range(items, items + 10):
            ses = "ses-01" if i % 2 == 0 else "ses-02"
            (dl / ses / f"P_{i:06d}_MR.zip").write_bytes(b"PK\x05\x06" + b"\0" * 18)
        seen, r1 = tick()
        took, r2 = tick()
        out["10 new dumps: tick that sees them s"] = seen
        out["10 new dumps: next tick, taking them s"] = took
        out["10 new dumps: run requests"] = len(r1) + len(r2)
        out["cursor bytes"] = len(state["cursor"].encode())
        out["state file MB"] = sum(p.stat().st_size for p in (root / "scratch" / "state").iterdir()) / 1e6
    out.update(curation_bench(root, items))
    return out


def curation_bench(root: Path, items: int) -> dict:
    """tabular/curation_status.tsv at ``items`` visits: the full recompute (`dicom-assets
    status`) against one chain step's update of its visit's row."""
    from dicom_assets.core.curation import update_curation_status, update_visit_status
    from dicom_assets.core.dataset import Dataset
    from dicom_assets.core.ids import Visit

    ds = Dataset.open(root)
    out = {}
    t = time.perf_counter()
    update_curation_status(ds)
    out["curation status: full recompute (dicom-assets status) s"] = time.perf_counter() - t
    steps = []
    for i in range(0, items, max(items // 20, 1)):
        visit = Visit(f"P{i:06d}", "ses-01" if i % 2 == 0 else "ses-02")
        raw = ds.layout.raw_dir(visit)
        raw.mkdir(parents=True, exist_ok=True)
        (raw / "f").write_bytes(b"x")
        t = time.perf_counter()
        update_visit_status(ds, visit)
        steps.append(time.perf_counter() - t)
    rows = {r.split("\t")[2]: r for r in ds.layout.curation_status_path.read_text().splitlines()[1:]}
    out["curation step (one visit's row) s"] = sorted(steps)[len(steps) // 2]
    out["curation step, slowest of 20 s"] = max(steps)
    out["curation rows updated right"] = all(rows[f"P{i:06d}_{'ses-01' if i % 2 == 0 else 'ses-02'}"].split("\t")[4]
                                             == "true" for i in range(0, items, max(items // 20, 1)))
    return out


def sensor_goals(sensor: dict) -> list[str]:
    """Each goal of issue 15, its figure beside its target."""
    lines = []
    for key, target in SENSOR_GOALS.items():
        got = sensor.get({"idle tick s": "idle tick, slowest of 5 s",
                          "slowest tick of the fresh archive s": "fresh archive: slowest tick s"}.get(key, key))
        if got is None:
            continue
        unit = "bytes" if "bytes" in key else "s"
        lines.append(f"  {key:<40} {got:>10.3f} {unit}   target <= {target} {unit}   "
                     f"{'met' if got <= target else 'MISSED'}" if unit == "s" else
                     f"  {key:<40} {got:>10} {unit}   target <= {target} {unit}   {'met' if got <= target else 'MISSED'}")
    return lines


DATALAD_GOALS = {40: 0.5, 2000: 3.0}  # issue 14: seconds for datalad_dataset, deposit included


def datalad_bench(work: Path, tarball: Path, vmeta, peer: str, writers=("direct", "batch")) -> dict:
    """``datalad_dataset`` (index_visit: dataset, records, deposit in the store, superdataset)
    for the first 40 DICOMs of the visit and for all of them, with the direct writer and the
    batch-command reference, first build and re-run; and the peer tool, `datalad addurls`,
    registering the same member URLs in a dataset made beforehand (untimed)."""
    from dicom_assets.core.datalad_index import (
        DataladError,
        archive_locator,
        create_dataset,
        index_visit,
        members_from_metadata,
        tarball_key,
        tool_env,
    )

    store = tarball.parent
    out: dict = {}
    n = len(vmeta.dicoms)
    sizes = sorted({min(40, n), n})
    for writer in writers:
        for size in sizes:
            sub = vmeta.dicoms[:size]
            ds = work / "datalad" / f"{writer}_{size}" / "BENCH_ses-01"
            shutil.rmtree(ds.parent, ignore_errors=True)
            kw = dict(visit="BENCH_ses-01", study=store.name, tarball_meta=vmeta.tarball, dicoms_meta=sub,
                      store_dir=store, superdataset=True, writer=writer)
            for attempt in (1, 2):
                shutil.rmtree(ds.parent, ignore_errors=True)
                t0 = time.perf_counter()
                try:
                    res = index_visit(ds, **kw)
                    break
                except DataladError as exc:  # reported, then retried once (the others still run)
                    out[f"{writer} {size} files: attempt {attempt} failed"] = str(exc).splitlines()[0][:150]
            else:
                continue
            total = time.perf_counter() - t0
            t = res.timings
            out[f"{writer} {size} files: first build s"] = total
            out[f"{writer} {size} files:   create / index / deposit / superdataset s"] = " / ".join(
                f"{t.get(k, 0.0):.2f}" for k in ("create", "index", "deposit", "superdataset"))
            t0 = time.perf_counter()
            index_visit(ds, **kw)
            out[f"{writer} {size} files: re-run, same tarball s"] = time.perf_counter() - t0
    if peer != "none":
        env = tool_env()
        akey = tarball_key(int(vmeta.tarball["size"]), vmeta.tarball["md5"])
        for size in sizes:
            members = members_from_metadata(vmeta.dicoms[:size])
            table = work / "addurls.csv"
            ds = work / "datalad" / f"PEER_{size}"
            shutil.rmtree(ds, ignore_errors=True)
            create_dataset(ds, env, "addurls peer", {})  # the same dataset setup, untimed
            cmd = ["datalad", "-l", "error", "addurls", "--key", "MD5-s{size}--{md5}", "--fast"]
            table.write_text("url,path,size,md5,SeriesNumber\n" + "".join(
                f"{archive_locator(akey, m)},{m.path},{m.size},{m.md5},{m.tags.get('SeriesNumber', '')}\n"
                for m in members))
            if peer == "fast":
                cmd += ["--exclude-autometa", "*"]
            t0 = time.perf_counter()
            subprocess.run([*cmd, str(table), "{url}", "{path}"], cwd=ds, check=True, env=env, capture_output=True)
            out[f"peer: datalad addurls ({peer}) {size} files, no create/deposit s"] = time.perf_counter() - t0
    return out


def datalad_goals(datalad: dict) -> list[str]:
    """Each goal of issue 14 for datalad_dataset, its figure beside its target."""
    lines = []
    for size, target in DATALAD_GOALS.items():
        got = datalad.get(f"direct {size} files: first build s")
        if got is None:
            lines.append(f"  datalad_dataset, {size:>5} files (direct): not measured (corpus has another size; "
                         f"--files {size})")
            continue
        ref = datalad.get(f"batch {size} files: first build s")
        lines.append(f"  datalad_dataset, {size:>5} files (direct): {got:6.2f} s   target <= {target:.1f} s   "
                     f"{'met' if got <= target else 'MISSED'}" + (f"   (batch reference {ref:.2f} s)" if ref else ""))
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--kb", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--sensor-items", type=int, default=10000)
    ap.add_argument("--sensor-batch", type=int, help="run requests per sensor tick (default: the sensor's, "
                    "DICOM_ASSETS_SENSOR_BATCH or 200)")
    ap.add_argument("--datalad", type=int, default=1, help="0 skips the DataLad stage")
    ap.add_argument("--datalad-writers", default="direct,batch",
                    help="writers of datalad_dataset to time: direct, batch (the reference), or both")
    ap.add_argument("--datalad-peer", choices=["none", "fast", "full"], default="fast",
                    help="peer: `datalad addurls` without (fast) or with (full, slow) per-file metadata")
    ap.add_argument("--organize-workers", default="1,2", help="header-reading processes to time organize with")
    ap.add_argument("--real-files", type=int, default=2000,
                    help="real GE MR files (~130 KiB) for the tarball/metadata rows; 0 skips them")
    ap.add_argument("--chain-files", type=int, default=346,
                    help="files of the visit run through materialize() of the whole chain; 0 skips it")
    ap.add_argument("--executor", type=int, default=1, help="0 skips the in-process vs multiprocess run")
    ap.add_argument("--backfill", type=int, default=0, help="N visits backfilled through `dagster dev` (slow; 0 skips)")
    ap.add_argument("--backfill-timeout", type=float, default=3600,
                    help="seconds to wait for the backfill's runs before reporting what finished")
    ap.add_argument("--work", help="work folder (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the corpus for another run")
    args = ap.parse_args()

    work = Path(args.work or tempfile.mkdtemp(prefix="dicom-assets-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    samples = ensure_samples(os.environ.get("DICOM_ASSETS_CACHE"))
    corpus = work / f"corpus_{args.files}x{args.kb}"
    if not corpus.exists():
        print(f"building corpus: {args.files} files x {args.kb} KiB in {corpus} ...", file=sys.stderr)
        build_corpus(corpus, samples, n_files=args.files, file_kb=args.kb)
    files = sorted(p for p in corpus.rglob("*") if p.is_file())
    total_mb = sum(p.stat().st_size for p in files) / 1e6
    rows = []

    def row(stage, seconds, floor_name, floor_seconds, peak):
        rows.append({"stage": stage, "seconds": seconds, "files_per_s": len(files) / seconds,
                     "mb_per_s": total_mb / seconds, "floor": floor_name, "floor_seconds": floor_seconds,
                     "ratio_to_floor": seconds / floor_seconds if floor_seconds else None,
                     "peak_python_mb": peak / 1e6})

    # warm the page cache
    for p in files:
        p.read_bytes()

    # organize vs pydicom header read
    def pydicom_floor():
        for p in files:
            pydicom.dcmread(p, stop_before_pixels=True)
    floor, _, _ = best_of(args.repeat, pydicom_floor)
    org_dir = work / "dicom" / "BENCH"
    t, peak, _ = best_of(args.repeat, lambda: organize_visit("BENCH_ses-01", corpus, org_dir, Rules()))
    row("organize", t, "pydicom stop_before_pixels", floor, peak)
    for w in (int(x) for x in args.organize_workers.split(",") if x):  # the helper forced, whatever the size
        with tp.organize_pool_forced():
            t, peak, _ = best_of(args.repeat, lambda: organize_visit("BENCH_ses-01", corpus, org_dir, Rules(),
                                                                     workers=w))
        row(f"organize, {w} proc", t, "pydicom stop_before_pixels", floor, peak)

    # tarball vs GNU tar (dereferencing the organized symlinks, as the tarball does), followed by
    # a sync of the file: the tarball step fsyncs before its atomic rename, so the floor does too
    tar_out = work / "gnu.tar"
    floor = best_cmd(args.repeat, ["sh", "-c", 'tar -chf "$1" -C "$2" "$3" && sync "$1"', "sh", str(tar_out),
                                   str(org_dir.parent), org_dir.name])
    dest = work / "store" / "BENCH_ses-01_dicom.tar"
    t, peak, res = best_of(args.repeat, lambda: write_tarball(organized_files(org_dir), dest, "BENCH_ses-01"))
    row("visit_tarball", t, "GNU tar -chf + sync", floor, peak)

    # metadata vs md5sum of the same files
    floor = best_cmd(args.repeat, ["md5sum", *map(str, files)])
    t, peak, vmeta = best_of(args.repeat, lambda: describe_tarball(dest, visit="BENCH_ses-01", study="B",
                                                                   participant="BENCH", session="ses-01",
                                                                   tool_version=__version__))
    row("visit_metadata", t, "md5sum", floor, peak)

    throughput: dict = {}
    if args.real_files:
        real = work / f"real_ge_{args.real_files}"
        if not real.exists():
            print(f"building corpus: {args.real_files} real GE MR files in {real} ...", file=sys.stderr)
            build_real_corpus(real, samples, n_files=args.real_files)
        rows += tp.archive_rows(real, work, args.repeat, "real GE", organize_workers=())
    if args.chain_files:
        throughput["chain"] = tp.chain_bench(samples, work, files=args.chain_files)
    if args.executor:
        throughput["executor"] = tp.executor_bench(samples, work)
    if args.backfill:
        throughput["backfill"] = tp.backfill_bench(samples, work, visits_n=args.backfill,
                                                  timeout=args.backfill_timeout)

    datalad = (datalad_bench(work, dest, vmeta, args.datalad_peer, tuple(args.datalad_writers.split(",")))
               if args.datalad else {})

    sensor = sensor_bench(args.sensor_items, work, args.sensor_batch) if args.sensor_items else {}

    print(f"\ndicom-assets {__version__} benchmark: {len(files)} files, {total_mb:.0f} MB, {os.cpu_count()} cores\n")
    hdr = f"{'stage':<28}{'seconds':>9}{'files/s':>10}{'MB/s':>9}  {'floor':<28}{'floor s':>9}{'ratio':>7}{'peak MB':>9}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['stage']:<28}{r['seconds']:>9.3f}{r['files_per_s']:>10.0f}{r['mb_per_s']:>9.0f}  "
              f"{r['floor']:<28}{r['floor_seconds']:>9.3f}{r['ratio_to_floor']:>7.2f}{r['peak_python_mb']:>9.1f}")
    for part, figures in throughput.items():
        print(f"\n{part}:")
        for k, v in figures.items():
            print(f"  {k:<58} {v:.2f}" if isinstance(v, float) else f"  {k:<58} {v}")
    by_stage = {r["stage"]: r for r in rows}
    goal_figures = {
        "organize files/s (2,000-file visit, 2 cores)": by_stage.get("organize", {}).get("files_per_s"),
        "visit_tarball / GNU tar + sync (real GE files)": by_stage.get("visit_tarball (real GE)", {}).get("ratio_to_floor"),
        "visit_metadata / md5sum (real GE files)": by_stage.get("visit_metadata (real GE)", {}).get("ratio_to_floor"),
        "one visit, whole chain with XNAT, run seconds": throughput.get("chain", {}).get("run seconds (start to end)"),
        "backfill visits per hour": throughput.get("backfill", {}).get("backfill visits per hour"),
    }
    print(f"\ngoals (issue 14, throughput; organize on the {len(files)}-file corpus, {os.cpu_count()} cores):")
    print("\n".join(tp.goal_lines(goal_figures)))
    if datalad:
        print("\ndatalad_dataset (first build = create + records + commit + deposit in the store + superdataset):")
        for k, v in datalad.items():
            print(f"  {k:<62} {v:.2f}" if isinstance(v, float) else f"  {k:<62} {v}")
        print("\ngoals (issue 14, datalad_dataset, deposit included):")
        print("\n".join(datalad_goals(datalad)))
    if sensor:
        print(f"\nsensor over {args.sensor_items} download items:")
        for k, v in sensor.items():
            print(f"  {k:<58} {v:.3f}" if isinstance(v, float) else f"  {k:<58} {v}")
        print(f"\ngoals (issue 15, {args.sensor_items} downloads):")
        print("\n".join(sensor_goals(sensor)))
    results = {"version": __version__, "files": len(files), "mb": total_mb, "cores": os.cpu_count(),
               "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "stages": rows, "sensor": sensor,
               "datalad": datalad, "throughput": throughput}
    out = REPO / "bench" / "results"
    out.mkdir(exist_ok=True)
    path = out / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nresults: {path}")
    if not args.keep and not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
