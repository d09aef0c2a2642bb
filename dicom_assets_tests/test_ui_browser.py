"""End to end, as a site manager sees it: `dagster dev` (webserver + daemon) on a demo root,
driven in a real browser (Debian chromium through Playwright).

The sensor must take the dumps with no click; the UI must show the chain, the visit
partitions, the series table and the QC montage; a materialization launched from the UI must
succeed. Screenshots are saved in test-artifacts/ (and in docs/img/ with
DICOM_ASSETS_UPDATE_SCREENSHOTS=1, for the README)."""

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from .helpers import BROWSER_ARGS, CHROMIUM, free_port

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"

pytestmark = pytest.mark.browser


def wait_for(predicate, timeout, what, proc=None, log=None):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(1)
    tail = log.read_text()[-4000:] if log and log.exists() else ""
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{tail}")


def http_ok(url) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def dagster_dev(pristine_demo, samples, tmp_path_factory):
    from dicom_assets.testing.xnat_server import XnatTestServer

    if not os.path.exists(CHROMIUM):
        pytest.skip("no chromium here and none installable: `make test` installs Debian's chromium with apt")
    tmp = tmp_path_factory.mktemp("ui")
    root = tmp / "dataset"
    shutil.copytree(pristine_demo, root)
    shutil.rmtree(root / "downloads" / "ses-02")  # three visits are enough for the UI
    home = tmp / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    port = free_port()
    log = tmp / "dagster-dev.log"
    xnat_password = "ui-" + os.urandom(6).hex()
    xnat = XnatTestServer(samples.xnat_schemas, "demo", xnat_password, storage=tmp / "xnat").start()
    env = {**os.environ, "DAGSTER_HOME": str(home), "DICOM_ASSETS_ROOT": str(root),
           "XNAT_HOST": xnat.url, "XNAT_USER": "demo", "XNAT_PASSWORD": xnat_password,
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    with open(log, "w") as fh:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "dagster"), "dev", "-w", str(REPO / "workspace.yaml"),
                                 "-h", "127.0.0.1", "-p", str(port)], cwd=REPO, env=env, stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: http_ok(f"{url}/server_info"), 240, "the Dagster webserver", proc, log)
        yield {"url": url, "root": root, "home": home, "log": log, "xnat": xnat}
    finally:
        xnat.stop()
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        ARTIFACTS.mkdir(exist_ok=True)
        shutil.copy(log, ARTIFACTS / "dagster-dev.log")


def runs_of(home: Path):
    from dagster import DagsterInstance

    os.environ["DAGSTER_HOME"] = str(home)
    with DagsterInstance.get() as inst:
        return [(r.run_id, r.status.value, r.tags) for r in inst.get_runs()]


def shot(page, name):
    ARTIFACTS.mkdir(exist_ok=True)
    page.wait_for_timeout(500)
    skip = page.get_by_role("button", name="Skip")  # the newsletter prompt may come late
    if skip.count() and skip.first.is_visible():
        skip.first.click()
        page.wait_for_timeout(500)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path))
    if os.environ.get("DICOM_ASSETS_UPDATE_SCREENSHOTS"):
        (REPO / "docs" / "img").mkdir(parents=True, exist_ok=True)
        shutil.copy(path, REPO / "docs" / "img" / f"{name}.png")


def test_site_manager_sees_the_chain_and_launches_a_visit(dagster_dev, monkeypatch):
    from playwright.sync_api import expect, sync_playwright

    url, root, home = dagster_dev["url"], dagster_dev["root"], dagster_dev["home"]
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    xnat_markers = root / "logs" / "xnat"
    # no click: the daemon's sensor takes the three dumps and runs the chain for each, up to XNAT
    wait_for(lambda: len(list(xnat_markers.glob("*.json"))) == 3, 600, "the sensor's runs to reach XNAT for 3 visits",
             log=dagster_dev["log"])
    wait_for(lambda: all(s in ("SUCCESS", "FAILURE", "CANCELED") for _, s, _ in runs_of(home)), 120, "runs to finish")
    sensor_runs = runs_of(home)
    assert len(sensor_runs) == 3 and all(s == "SUCCESS" for _, s, _ in sensor_runs), sensor_runs
    assert all(t.get("dagster/sensor_name") == "downloads_sensor" for _, _, t in sensor_runs)
    xnat_project = dagster_dev["xnat"].projects["QPN_DEMO"]
    assert sorted(xnat_project.subjects) == ["QPN001", "QPN002", "QPN003"]

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)

        def dismiss_prompt():
            skip = page.get_by_role("button", name="Skip")  # the first-visit newsletter prompt
            if skip.count() and skip.first.is_visible():
                skip.first.click()
                expect(skip).to_have_count(0)

        def goto(path):
            page.goto(url + path)
            page.wait_for_load_state("networkidle")
            try:  # the first-visit prompt appears a moment after the page
                page.get_by_role("button", name="Skip").first.wait_for(state="visible", timeout=4000)
            except Exception:
                pass
            dismiss_prompt()

        # the chain, as a graph
        goto("/assets/xnat_session?view=lineage&lineageScope=upstream&lineageDepth=5")
        for name in ("raw_dicoms", "organized_dicoms", "visit_tarball", "visit_metadata", "xnat_session"):
            expect(page.get_by_text(name, exact=True).first).to_be_visible()
        shot(page, "asset-graph")

        # the visits partitions the sensor added
        goto("/assets/organized_dicoms?view=partitions")
        for visit in ("QPN001_ses-01", "QPN002_ses-01", "QPN003_ses-01"):
            expect(page.get_by_text(visit).first).to_be_visible()

        # a visit's materialization: counts, the series table and the QC montage
        goto("/assets/organized_dicoms?view=events&partition=QPN001_ses-01")
        expect(page.get_by_text("excluded_excluded_series").first).to_be_visible()
        expect(page.get_by_text("T1w_MPRAGE").first).to_be_visible()
        expect(page.get_by_text("Localizers").first).to_be_visible()
        shot(page, "visit-metadata")
        page.get_by_text("[Show Markdown]").first.click()
        img = page.locator("img[src^='data:image/png']").first
        expect(img).to_be_visible()
        width = img.evaluate("e => e.complete ? e.naturalWidth : 0")
        assert width >= 160 * 4, width  # a real picture, 4 tiles wide
        shot(page, "qc-montage")
        page.keyboard.press("Escape")

        # launch one visit's tarball from the UI
        def ui_runs():
            return [r for r in runs_of(home) if r[2].get("dagster/partition") == "QPN002_ses-01"
                    and "dagster/sensor_name" not in r[2]]

        goto("/assets/visit_tarball")
        page.get_by_role("button", name="Materialize…").first.click()
        page.get_by_text("Select a partition or create one").click()
        page.get_by_placeholder("Filter partitions").fill("QPN002_ses-01")
        page.locator(".dagster-portal").get_by_text("QPN002_ses-01", exact=True).filter(visible=True).first.click()
        page.keyboard.press("Escape")
        dismiss_prompt()
        page.get_by_role("button", name="Launch 1 run").click()
        # keep the page open until the launch reached the instance
        wait_for(lambda: bool(ui_runs()), 90, "the UI's launch request to create a run")
        shot(page, "launched")
        browser.close()

    def ui_run_done():
        ui = ui_runs()
        return bool(ui) and ui[0][1] in ("SUCCESS", "FAILURE")

    wait_for(ui_run_done, 240, "the run launched from the UI")
    manual = [r for r in runs_of(home) if "dagster/sensor_name" not in r[2]]
    assert [s for _, s, _ in manual] == ["SUCCESS"]
