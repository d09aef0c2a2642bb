"""End to end, as a site manager sees it: `dagster dev` (webserver + daemon) on a demo root,
driven in a real browser (Debian chromium through Playwright).

The sensor must take the dumps with no click; the UI must show the chain, the visit
partitions, the series table and the QC montage; a materialization launched from the UI must
succeed, and the UI must show each step's data and code version as the event log recorded them
and which visit's step a re-delivered dump made stale. Screenshots are saved in test-artifacts/
(and in docs/img/ with DICOM_ASSETS_UPDATE_SCREENSHOTS=1, for the README)."""

import hashlib
import json
import os
import re
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
    from dicom_assets.testing.xnat import XnatTestServer

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
        # SIGINT, as Ctrl-C: `dagster dev` stops its webserver and daemon then (on SIGTERM it
        # waited out the whole minute, every run); SIGKILL to the group if it does not
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        ARTIFACTS.mkdir(exist_ok=True)
        shutil.copy(log, ARTIFACTS / "dagster-dev.log")


def runs_of(home: Path):
    from dagster import DagsterInstance

    os.environ["DAGSTER_HOME"] = str(home)
    with DagsterInstance.get() as inst:
        return [(r.run_id, r.status.value, r.tags) for r in inst.get_runs()]


def events_of(home: Path, asset: str, partition: str, observations: bool = False) -> list[dict]:
    """The tags of an asset partition's materializations (or observations), newest first, as the
    event log recorded them."""
    from dagster import AssetKey, AssetRecordsFilter, DagsterInstance

    os.environ["DAGSTER_HOME"] = str(home)
    with DagsterInstance.get() as inst:
        fetch = inst.fetch_observations if observations else inst.fetch_materializations
        records = fetch(AssetRecordsFilter(asset_key=AssetKey(asset), asset_partitions=[partition]), limit=50).records
        return [dict(r.asset_event.tags or {}) for r in records]


def sensor_status(home: Path, name: str) -> str | None:
    from dagster import DagsterInstance
    from dagster._core.scheduler.instigation import InstigatorType

    os.environ["DAGSTER_HOME"] = str(home)
    with DagsterInstance.get() as inst:
        states = [s for s in inst.all_instigator_state(instigator_type=InstigatorType.SENSOR) if s.name == name]
        return states[0].status.value if states else None


STALE_QUERY = """query($key: AssetKeyInput!, $partition: String!) { assetNodes(assetKeys: [$key]) {
  staleStatus(partition: $partition) staleCauses(partition: $partition) { key { path } category reason } } }"""


def staleness(url: str, asset: str, partition: str):
    """What the webserver tells the UI of an asset partition: ``(status, [(asset, category, reason)])``."""
    req = urllib.request.Request(f"{url}/graphql", method="POST", headers={"Content-Type": "application/json"},
                                 data=json.dumps({"query": STALE_QUERY,
                                                  "variables": {"key": {"path": [asset]}, "partition": partition}}).encode())
    with urllib.request.urlopen(req, timeout=60) as r:
        out = json.loads(r.read())
    assert "errors" not in out, out
    node = out["data"]["assetNodes"][0]
    return node["staleStatus"], [(c["key"]["path"][-1], c["category"], c["reason"]) for c in node["staleCauses"]]


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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


def open_page(p):
    browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(60_000)
    return browser, page


def dismiss_prompt(page):
    from playwright.sync_api import expect

    skip = page.get_by_role("button", name="Skip")  # the first-visit newsletter prompt
    if skip.count() and skip.first.is_visible():
        skip.first.click()
        expect(skip).to_have_count(0)


def goto(page, url):
    page.goto(url)
    page.wait_for_load_state("networkidle")
    try:  # the first-visit prompt appears a moment after the page
        page.get_by_role("button", name="Skip").first.wait_for(state="visible", timeout=4000)
    except Exception:
        pass
    dismiss_prompt(page)


def table_values(page, key: str) -> list[str]:
    """The values of the rows of the page's key/value tables (metadata, tags) whose key is ``key``."""
    return page.locator("tr").evaluate_all(
        "(rows, key) => rows.filter(r => r.cells.length > 1 && r.cells[0].innerText.trim() === key)"
        ".map(r => r.cells[1].innerText.trim())", key)


def open_partition(page, url, asset: str, partition: str):
    """An asset's Partitions tab on one visit, its event tags (data and code version) shown."""
    from playwright.sync_api import expect

    goto(page, f"{url}/assets/{asset}?view=partitions&partition={partition}")
    # the detail's header (its tooltip is the partition key): the key and "Materialized"
    expect(page.locator(f'[data-tooltip="{partition}"]').get_by_text("Materialized", exact=True)).to_be_visible()
    toggle = page.get_by_text(re.compile(r"^(Show tags \(\d+\)|Hide tags)$")).first
    expect(toggle).to_be_visible()
    if toggle.inner_text().startswith("Show"):  # the UI remembers the choice in the browser
        toggle.click()
    expect(page.get_by_text("data_version", exact=True).first).to_be_visible()


def wait_for_the_sensor_chain(dagster_dev):
    """No click: the daemon's sensor takes the three dumps and runs the chain for each, up to XNAT."""
    root, home = dagster_dev["root"], dagster_dev["home"]
    wait_for(lambda: len(list((root / "logs" / "xnat").glob("*.json"))) == 3, 600,
             "the sensor's runs to reach XNAT for 3 visits", log=dagster_dev["log"])
    wait_for(lambda: all(s in ("SUCCESS", "FAILURE", "CANCELED") for _, s, _ in runs_of(home)), 120, "runs to finish")


@pytest.mark.slow
def test_site_manager_sees_the_chain_and_launches_a_visit(dagster_dev, monkeypatch):
    from playwright.sync_api import expect, sync_playwright

    from dicom_assets.defs.lineage import CODE_VERSIONS

    url, root, home = dagster_dev["url"], dagster_dev["root"], dagster_dev["home"]
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    wait_for_the_sensor_chain(dagster_dev)
    # the visits' runs (the other test's "Observe" run, if it ran first, has no partition)
    sensor_runs = [r for r in runs_of(home) if "dagster/partition" in r[2]]
    assert len(sensor_runs) == 3 and all(s == "SUCCESS" for _, s, _ in sensor_runs), sensor_runs
    assert all(t.get("dagster/sensor_name") == "downloads_sensor" for _, _, t in sensor_runs)
    xnat_project = dagster_dev["xnat"].projects["QPN_DEMO"]
    assert sorted(xnat_project.subjects) == ["QPN001", "QPN002", "QPN003"]

    with sync_playwright() as p:
        browser, page = open_page(p)

        # the chain, as a graph
        goto(page, url + "/assets/xnat_session?view=lineage&lineageScope=upstream&lineageDepth=5")
        for name in ("raw_dicoms", "organized_dicoms", "visit_tarball", "visit_metadata", "xnat_session"):
            expect(page.get_by_text(name, exact=True).first).to_be_visible()
        shot(page, "asset-graph")

        # the visits partitions the sensor added
        goto(page, url + "/assets/organized_dicoms?view=partitions")
        for visit in ("QPN001_ses-01", "QPN002_ses-01", "QPN003_ses-01"):
            expect(page.get_by_text(visit).first).to_be_visible()

        # a visit's materialization: counts, the series table and the QC montage
        goto(page, url + "/assets/organized_dicoms?view=events&partition=QPN001_ses-01")
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

        goto(page, url + "/assets/visit_tarball")
        page.get_by_role("button", name="Materialize…").first.click()
        page.get_by_text("Select a partition or create one").click()
        page.get_by_placeholder("Filter partitions").fill("QPN002_ses-01")
        page.locator(".dagster-portal").get_by_text("QPN002_ses-01", exact=True).filter(visible=True).first.click()
        page.keyboard.press("Escape")
        dismiss_prompt(page)
        page.get_by_role("button", name="Launch 1 run").click()
        # keep the page open until the launch reached the instance
        wait_for(lambda: bool(ui_runs()), 90, "the UI's launch request to create a run")
        shot(page, "launched")

        def ui_run_done():
            ui = ui_runs()
            return bool(ui) and ui[0][1] in ("SUCCESS", "FAILURE")

        wait_for(ui_run_done, 240, "the run launched from the UI")
        assert [s for _, s, _ in ui_runs()] == ["SUCCESS"]

        # the re-run wrote the same bytes: the tarball's data version (its sha256) is the one the
        # sensor's run recorded, so Dagster sees nothing downstream as stale
        tarball = root / "store" / "QPN" / "QPN002_ses-01_dicom.tar"
        recorded = events_of(home, "visit_tarball", "QPN002_ses-01")
        assert len(recorded) == 2, recorded
        assert [t.get("dagster/data_version") for t in recorded] == [sha256_of(tarball)] * 2, recorded
        assert [t.get("dagster/code_version") for t in recorded] == [CODE_VERSIONS["visit_tarball"]] * 2, recorded
        for asset in ("visit_tarball", "visit_metadata", "datalad_dataset", "xnat_session"):
            assert staleness(url, asset, "QPN002_ses-01") == ("FRESH", []), asset

        # ... and the UI shows the data and code version of the visit's tarball as recorded
        open_partition(page, url, "visit_tarball", "QPN002_ses-01")
        expect(page.get_by_text("View all historical events (2)")).to_be_visible()
        assert table_values(page, "data_version") == [recorded[0]["dagster/data_version"]]
        assert table_values(page, "sha256") == [recorded[0]["dagster/data_version"]]  # the metadata's
        assert table_values(page, "code_version") == [CODE_VERSIONS["visit_tarball"]]
        expect(page.get_by_text("Unsynced")).to_have_count(0)
        shot(page, "data-versions")

        # the definition's code version, in the asset's Overview
        goto(page, url + "/assets/visit_tarball?view=overview")
        page.get_by_text("Compute details", exact=True).click()
        label = page.get_by_text("Code version", exact=True)
        expect(label).to_be_visible()
        expect(label.locator("xpath=..").locator("[title]").first).to_have_attribute(
            "title", CODE_VERSIONS["visit_tarball"])
        browser.close()


@pytest.mark.slow
def test_a_redelivered_dump_shows_its_visit_unsynced(dagster_dev, monkeypatch):
    """A dump delivered again (here: its files touched) while the sensor is stopped: "Observe" on
    ``downloads`` signs it again, and the UI shows that visit's ``raw_dicoms`` unsynced because
    ``downloads`` has a new data version; the other visits stay in sync."""
    from playwright.sync_api import expect, sync_playwright

    from dicom_assets.defs.lineage import CODE_VERSIONS

    url, root, home = dagster_dev["url"], dagster_dev["root"], dagster_dev["home"]
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    wait_for_the_sensor_chain(dagster_dev)
    sensor_runs = [r for r in runs_of(home) if r[2].get("dagster/sensor_name") == "downloads_sensor"]
    for visit in ("QPN001_ses-01", "QPN003_ses-01"):
        # the sensor's observation of the dump and what raw_dicoms extracted have the same version
        observed = events_of(home, "downloads", visit, observations=True)[0]["dagster/data_version"]
        assert events_of(home, "raw_dicoms", visit)[0]["dagster/data_version"] == observed, visit
        assert staleness(url, "raw_dicoms", visit) == ("FRESH", []), visit

    def observe_runs():
        return [r for r in runs_of(home) if r[2].get("dagster/from_ui") == "true" and "dagster/partition" not in r[2]]

    with sync_playwright() as p:
        browser, page = open_page(p)

        # the site manager stops the sensor (a dump re-delivered now is not taken by itself)
        goto(page, url + "/automation")
        row = page.locator("[data-index]", has_text="downloads_sensor")
        expect(row.locator("input[type=checkbox]").last).to_be_checked()
        row.locator("label").last.click()
        wait_for(lambda: sensor_status(home, "downloads_sensor") == "STOPPED", 60, "the sensor to be stopped")
        expect(row.locator("input[type=checkbox]").last).not_to_be_checked()

        # QPN003's dump is delivered again: same files, new mtimes
        dump, = root.glob("downloads/ses-01/QPN_003*")
        now = time.time()
        for f in [dump, *dump.rglob("*")]:
            os.utime(f, (now, now))

        # "Observe" signs every visit's dumps again
        before = len(observe_runs())
        goto(page, url + "/assets/downloads")
        page.get_by_role("button", name="Observe").first.click()
        wait_for(lambda: len(observe_runs()) > before and observe_runs()[0][1] in ("SUCCESS", "FAILURE"), 180,
                 "the observation run launched from the UI")
        assert observe_runs()[0][1] == "SUCCESS"
        new = events_of(home, "downloads", "QPN003_ses-01", observations=True)
        raw = events_of(home, "raw_dicoms", "QPN003_ses-01")[0]
        assert new[0]["dagster/data_version"] != raw["dagster/data_version"] == new[1]["dagster/data_version"]
        assert staleness(url, "raw_dicoms", "QPN003_ses-01") == (
            "STALE", [("downloads", "DATA", "has a new data version")])
        # QPN001's dump is untouched: same version observed, still in sync
        old = events_of(home, "downloads", "QPN001_ses-01", observations=True)
        assert old[0]["dagster/data_version"] == old[1]["dagster/data_version"]
        assert staleness(url, "raw_dicoms", "QPN001_ses-01") == ("FRESH", [])

        # the UI: QPN003's raw_dicoms unsynced, and why; its recorded data and code version
        open_partition(page, url, "raw_dicoms", "QPN003_ses-01")
        assert table_values(page, "data_version") == [raw["dagster/data_version"]]
        assert table_values(page, "code_version") == [raw["dagster/code_version"]] == [CODE_VERSIONS["raw_dicoms"]]
        unsynced = page.get_by_text("Unsynced (1)")
        expect(unsynced).to_be_visible()
        unsynced.hover()
        popover = page.locator(".dagster-popover").filter(has_text="has a new data version")
        expect(popover).to_be_visible()
        expect(popover.get_by_text("1 upstream data version change")).to_be_visible()
        expect(popover.get_by_text("downloads", exact=True)).to_be_visible()
        shot(page, "unsynced")
        open_partition(page, url, "raw_dicoms", "QPN001_ses-01")
        expect(page.get_by_text("Materialized", exact=True)).to_be_visible()
        expect(page.get_by_text("Unsynced")).to_have_count(0)
        browser.close()

    # the sensor stayed stopped: no run of the re-delivered dump
    assert [r for r in runs_of(home) if r[2].get("dagster/sensor_name") == "downloads_sensor"] == sensor_runs
