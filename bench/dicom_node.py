"""The DICOM node's three figures (issue 26), against the tools themselves, on a real Orthanc:

    .venv/bin/python bench/dicom_node.py                    # 2,000 files, 100,000 studies
    .venv/bin/python bench/dicom_node.py --files 500 --studies 10000

* transfer   a 2,000-instance visit pushed with dcmtk's ``storescu`` into Orthanc, then fetched by
             ``dicom_node_study``'s fetch into downloads/ (one counted ZIP), against ``storescu``
             into dcmtk's own ``storescp`` (writing files). Goal: <= 1.5x.
* latency    from the last instance received (``storescu`` returns) to the tick of the
             ``dicom_node_sensor`` that requests the visit's run, with the sensor ticking every
             ``--interval`` seconds as the daemon does. Goal: <= StableAge + one interval.
* idle tick  the sensor's tick with ``--studies`` studies in Orthanc and nothing new (median of 20).
             Goal: <= 0.5 s.

Not a test: wall-clock figures on a shared machine vary with the load.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pydicom  # noqa: E402
from pydicom.dataset import FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid  # noqa: E402

from dicom_assets.core.dicomnode import fetch_study  # noqa: E402
from dicom_assets.testing.dagster_dev import free_port  # noqa: E402
from dicom_assets.testing.demo import build_demo_dataset, write_large_push  # noqa: E402
from dicom_assets.testing.orthanc import OrthancNode, dicom_env, missing_tools, storescu  # noqa: E402
from dicom_assets.testing.samples import ensure_samples  # noqa: E402

GOALS = {"transfer": 1.5, "idle_tick_s": 0.5}


def transfer(work: Path, samples, files: int, side: int) -> dict:
    push = work / "push"
    write_large_push(push, samples, "QPN_004", "ses-02", n=files, side=side)
    size = sum(p.stat().st_size for p in push.iterdir())
    # dcmtk's own receiver: storescp writing each instance to a folder
    out = work / "storescp"
    out.mkdir()
    port = free_port()
    scp = subprocess.Popen(["storescp", "-aet", "SCP", "-od", str(out), "-uf", str(port)], env=dicom_env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    t = time.perf_counter()
    storescu(port, "SCP", push)
    t_scp = time.perf_counter() - t
    scp.terminate()
    scp.wait()
    assert len(list(out.iterdir())) == files, "storescp did not receive every file"
    node = OrthancNode(work / "orthanc", stable_age=1).start()
    try:
        t = time.perf_counter()
        storescu(node.dicom_port, node.aet, push)
        t_push = time.perf_counter() - t
        client = node.client()
        study = client.study(client.get_json("/studies")[0])
        t = time.perf_counter()
        got = fetch_study(client, study, work / "downloads", visit="QPN004_ses-02")
        t_fetch = time.perf_counter() - t
    finally:
        node.stop()
    assert got.instances == files
    return {"files": files, "MB": size / 1e6, "storescu_storescp_s": t_scp, "storescu_orthanc_s": t_push,
            "fetch_s": t_fetch, "ratio": (t_push + t_fetch) / t_scp}


def latency(work: Path, samples, stable_age: int, interval: float) -> dict:
    from dagster import DagsterInstance

    from dicom_assets.defs.dicomnode import OrthancResource
    from dicom_assets.defs.resources import DatasetResource
    from dicom_assets.defs.sensors import dicom_node_sensor
    from dicom_assets.testing.demo import visit_spec, write_node_push

    sys.path.insert(0, str(REPO))
    from dicom_assets_tests.helpers import Ticker

    root = build_demo_dataset(work / "dataset", samples, with_downloads=False)
    node = OrthancNode(work / "orthanc-latency", stable_age=stable_age).start()
    try:
        folder = work / "push-latency"
        write_node_push(folder, samples, visit_spec("QPN_004", "ses-01", 0))
        res = {"dataset": DatasetResource(root=str(root)),
               "dicom_node": OrthancResource(url=node.url, user=node.user, password=node.password)}
        ticker = Ticker(DagsterInstance.ephemeral(), dicom_node_sensor, res)
        ticker.tick()
        storescu(node.dicom_port, node.aet, folder)
        last = time.perf_counter()  # storescu returns once the last instance was stored
        ticks = 0
        while True:
            time.sleep(interval)
            ticks += 1
            if ticker.tick().run_requests:
                break
            if time.perf_counter() - last > 10 * (stable_age + interval):
                raise RuntimeError("no run requested")
        return {"stable_age_s": stable_age, "interval_s": interval, "latency_s": time.perf_counter() - last,
                "ticks": ticks, "goal_s": stable_age + interval}
    finally:
        node.stop()


def tiny_instance(i: int, patient: str) -> bytes:
    """One minimal MR instance (no pixels) of its own study: the index load of a big archive."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MRImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.PatientName = patient, patient
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.StudyDate, ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "20200101", "MR", 1, 1
    ds.StudyDescription = f"archive study {i}"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def idle_tick(work: Path, samples, studies: int) -> dict:
    from dagster import DagsterInstance

    from dicom_assets.defs.dicomnode import OrthancResource
    from dicom_assets.defs.resources import DatasetResource
    from dicom_assets.defs.sensors import dicom_node_sensor
    from dicom_assets_tests.helpers import Ticker

    root = build_demo_dataset(work / "dataset-idle", samples, with_downloads=False)
    node = OrthancNode(work / "orthanc-idle", stable_age=1).start()
    try:
        folder = work / "archive"
        folder.mkdir()
        t = time.perf_counter()
        batch = 5000
        for start in range(0, studies, batch):
            for i in range(start, min(studies, start + batch)):
                (folder / f"{i:06d}.dcm").write_bytes(tiny_instance(i, f"ARCH{i % 1000:04d}"))
            storescu(node.dicom_port, node.aet, folder, timeout=3600)
            shutil.rmtree(folder)
            folder.mkdir()
        t_seed = time.perf_counter() - t
        count = node.client().get_json("/statistics")["CountStudies"]
        time.sleep(2)
        res = {"dataset": DatasetResource(root=str(root)),
               "dicom_node": OrthancResource(url=node.url, user=node.user, password=node.password)}
        ticker = Ticker(DagsterInstance.ephemeral(), dicom_node_sensor, res)
        t = time.perf_counter()
        ticker.tick()  # the first tick reads the change log (every study of it: a PatientID of no participant)
        t_first = time.perf_counter() - t
        last = node.client().last_seq()
        catch_up = 1
        while json.loads(ticker.cursor)["seq"] < last:  # until the whole log is read
            ticker.tick()
            catch_up += 1
        times = []
        for _ in range(20):
            t = time.perf_counter()
            r = ticker.tick()
            times.append(time.perf_counter() - t)
            assert not r.run_requests
        return {"studies": count, "seed_s": t_seed, "first_tick_s": t_first, "catch_up_ticks": catch_up, "idle_tick_median_s": statistics.median(times),
                "idle_tick_max_s": max(times), "cursor_bytes": len(ticker.cursor or "")}
    finally:
        node.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--side", type=int, default=256,
                    help="pixels per side of each instance (256: Case001's real 256 x 256 MR slices, ~130 KB)")
    ap.add_argument("--only", choices=["transfer", "latency", "idle"], action="append",
                    help="run only these parts (repeatable)")
    ap.add_argument("--studies", type=int, default=100_000)
    ap.add_argument("--stable-age", type=int, default=5)
    ap.add_argument("--interval", type=float, default=5.0, help="sensor interval (the sensor's default: 5 s)")
    ap.add_argument("--work", help="work folder (default: a temporary folder)")
    args = ap.parse_args()
    missing = missing_tools()
    if missing:
        print(f"not installed: {', '.join(missing)} (scripts/system-deps.sh)", file=sys.stderr)
        return 2
    samples = ensure_samples(None)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-node-"))
    parts = set(args.only or ["transfer", "latency", "idle"])
    rows = []
    if "transfer" in parts:
        rows += transfer_rows(transfer(work, samples, args.files, args.side))
    if "latency" in parts:
        rows += latency_rows(latency(work, samples, args.stable_age, args.interval))
    if "idle" in parts:
        rows += idle_rows(idle_tick(work, samples, args.studies))
    width = max(len(r[0]) for r in rows)
    print(f"{'DICOM node (Orthanc ' + '1.10' + ')':<{width}}  {'figure':>16}  goal")
    for name, value, goal in rows:
        print(f"{name:<{width}}  {value:>16}  {goal}")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def transfer_rows(tr: dict) -> list[tuple[str, str, str]]:
    met = "met" if tr["ratio"] <= GOALS["transfer"] else "MISSED"
    return [
        (f"push {tr['files']} files ({tr['MB']:.1f} MB): storescu -> storescp", f"{tr['storescu_storescp_s']:.2f} s", ""),
        ("storescu -> Orthanc", f"{tr['storescu_orthanc_s']:.2f} s", ""),
        ("fetch into downloads/ (counted ZIP)", f"{tr['fetch_s']:.2f} s", ""),
        ("(Orthanc push + fetch) / storescp", f"{tr['ratio']:.2f}x", f"<= {GOALS['transfer']}x {met}"),
    ]


def latency_rows(la: dict) -> list[tuple[str, str, str]]:
    met = "met" if la["latency_s"] <= la["goal_s"] else "MISSED"
    return [(f"last instance -> run requested (StableAge {la['stable_age_s']} s, tick every {la['interval_s']:g} s)",
             f"{la['latency_s']:.2f} s", f"<= {la['goal_s']:g} s {met}")]


def idle_rows(it: dict) -> list[tuple[str, str, str]]:
    met = "met" if it["idle_tick_median_s"] <= GOALS["idle_tick_s"] else "MISSED"
    return [
        (f"idle tick, {it['studies']} studies in Orthanc (median of 20)", f"{it['idle_tick_median_s'] * 1000:.1f} ms",
         f"<= {GOALS['idle_tick_s']} s {met}"),
        ("  max of 20; first tick; ticks to read the whole log",
         f"{it['idle_tick_max_s'] * 1000:.1f} ms; {it['first_tick_s']:.2f} s; {it['catch_up_ticks']}", ""),
        ("  seeding the archive with storescu", f"{it['seed_s']:.0f} s", ""),
    ]


if __name__ == "__main__":
    sys.exit(main())
