"""The Dagster UI with many visit partitions, in the real browser (issue 15): how long the
asset page and its partitions page take to show, with N visit partitions in the instance.

    .venv/bin/python bench/ui_partitions.py --partitions 100000

Starts `dagster-webserver` (no daemon, sensors off) on a throwaway DAGSTER_HOME whose
instance holds N visit partitions, then drives headless Chromium as test_ui_browser.py does.
Not a test: numbers vary by machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dicom_assets_tests.helpers import BROWSER_ARGS, CHROMIUM, free_port  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--partitions", type=int, default=100000)
    ap.add_argument("--asset", default="raw_dicoms")
    ap.add_argument("--timeout", type=int, default=180, help="seconds a page may take")
    args = ap.parse_args()
    from dagster import DagsterInstance
    from playwright.sync_api import sync_playwright

    tmp = Path(tempfile.mkdtemp(prefix="dicom-assets-ui-"))
    home, root = tmp / "home", tmp / "dataset"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    (root / "tabular" / "demographics").mkdir(parents=True)
    (root / "global_config.json").write_text(json.dumps({"dataset_name": "ui", "study_id": "U",
                                                         "sessions": ["ses-01"]}))
    (root / "tabular" / "demographics" / "mr_proc_manifest.csv").write_text("participant_id,session_id\n")
    os.environ["DAGSTER_HOME"] = str(home)
    keys = [f"P{i:06d}_ses-01" for i in range(args.partitions)]
    with DagsterInstance.get() as inst:
        for i in range(0, len(keys), 10000):
            inst.add_dynamic_partitions("visits", keys[i:i + 10000])
    port = free_port()
    env = {**os.environ, "DICOM_ASSETS_ROOT": str(root), "DICOM_ASSETS_SENSORS": "off"}
    log = open(tmp / "webserver.log", "w")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "dagster-webserver"), "-w", str(REPO / "workspace.yaml"),
                             "-h", "127.0.0.1", "-p", str(port)], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    out = {"partitions": args.partitions}
    try:
        t0 = time.time()
        while time.time() - t0 < 240:
            try:
                urllib.request.urlopen(f"{url}/server_info", timeout=2)
                break
            except OSError:
                time.sleep(1)
        n = f"{args.partitions:,}"
        first, last = keys[0], keys[-1]
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(args.timeout * 1000)
            # each figure: from navigation to the page's own content being on screen (not the
            # frame, not "networkidle": the UI polls); one tab, so "again" has the JS cached
            for label, path, steps in (
                ("asset page: status panel and definition", f"/assets/{args.asset}", [
                    ("status", lambda: page.get_by_text("Latest materialization").first),
                    ("status value", lambda: page.get_by_text("Never materialized").first),
                    ("definition", lambda: page.get_by_text("Code location").first),
                    ("lineage", lambda: page.get_by_text("Upstream assets").first),
                ]),
                ("partitions tab: count, status filters, first rows", f"/assets/{args.asset}?view=partitions", [
                    ("count", lambda: page.get_by_text(f"{n} Partitions Selected")),
                    ("status filters", lambda: page.get_by_text(f"Missing ({args.partitions})")),
                    ("first row", lambda: page.get_by_text(first, exact=True).first),
                ]),
                ("partitions tab, again", f"/assets/{args.asset}?view=partitions", [
                    ("count", lambda: page.get_by_text(f"{n} Partitions Selected")),
                    ("first row", lambda: page.get_by_text(first, exact=True).first),
                ]),
            ):
                t, what = time.perf_counter(), "navigation"
                try:
                    page.goto(url + path, wait_until="commit")
                    for what, locate in steps:
                        locate().wait_for(state="visible")
                        out[f"{label} | {what} s"] = time.perf_counter() - t
                except Exception as exc:  # noqa: BLE001 - a page that never shows is the figure
                    out[f"{label} | {what}"] = f"not shown after {args.timeout} s ({type(exc).__name__})"
                page.screenshot(path=str(tmp / f"{label.split(':')[0].replace(' ', '_').replace(',', '')}.png"))
                if label.startswith("partitions tab:") and not isinstance(out.get(f"{label} | {what}"), str):
                    # usable, not only drawn: find the last partition by name and open it
                    t = time.perf_counter()
                    try:
                        skip = page.get_by_role("button", name="Skip")  # Dagster's newsletter prompt
                        if skip.count():
                            skip.first.click()
                        page.get_by_placeholder("Filter by name").fill(last)
                        page.get_by_text(last, exact=True).first.click()
                        page.get_by_text("No partition selected").wait_for(state="hidden")
                        page.get_by_text(last, exact=True).filter(visible=True).nth(1).wait_for(state="visible")
                        out["partitions tab: filter to the last key and open it s"] = time.perf_counter() - t
                    except Exception as exc:  # noqa: BLE001
                        out["partitions tab: filter to the last key and open it"] = (
                            f"not done after {args.timeout} s ({type(exc).__name__})")
                    page.screenshot(path=str(tmp / "partition_opened.png"))
            browser.close()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
    for k, v in out.items():
        print(f"  {k:<70} {v:.2f}" if isinstance(v, float) else f"  {k:<70} {v}")
    print(f"screenshots and webserver log: {tmp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
