"""Issue 15: the downloads sensor at scale, at small N on a real instance. A fresh archive is
taken in bounded batches, each download exactly once and in order; a re-delivered dump is
taken again; a dump that vanishes while pending is dropped; the cursor stays bounded; a
tick the instance did not keep is rolled back. And the curation status updated row by row.

Timings are the benchmark's (bench/run.py --sensor-items 100000), never asserted here."""

import csv
import json
import os
import shutil
import time

from dagster import SensorResult

from dicom_assets.core.curation import compute_status, update_curation_status, update_visit_status
from dicom_assets.core.dataset import Dataset
from dicom_assets.core.downloads_state import DownloadsState, SensorLimits
from dicom_assets.core.ids import Visit
from dicom_assets.core.layout import DatasetLayout
from dicom_assets.definitions import visit_chain_job
from dicom_assets.defs.resources import DatasetResource
from dicom_assets.defs.sensors import build_downloads_sensor

from . import helpers

SESSIONS = ("ses-01", "ses-02")


def make_root(tmp_path, n, extra=0):
    """A dataset root with ``n`` small dumps (the sensor never opens them) and ``n + extra``
    visits in the manifest; the session folders' mtimes set in the past (delivered earlier)."""
    root = tmp_path / "dataset"
    (root / "tabular" / "demographics").mkdir(parents=True)
    (root / "global_config.json").write_text(json.dumps({"dataset_name": "t", "study_id": "T",
                                                         "sessions": list(SESSIONS)}))
    rows = ["participant_id,session_id"]
    for i in range(n + extra):
        ses = SESSIONS[i % 2]
        rows.append(f"P_{i:03d},{ses}")
        if i < n:
            dump(root, i)
    (root / "tabular" / "demographics" / "mr_proc_manifest.csv").write_text("\n".join(rows) + "\n")
    age_folders(root)
    return root


def dump(root, i, data=b"PK\x05\x06" + b"\0" * 18):
    path = root / "downloads" / SESSIONS[i % 2] / f"P_{i:03d}_MR.zip"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def age_folders(root, seconds=60):
    past = time.time() - seconds
    for ses in SESSIONS:
        if (root / "downloads" / ses).is_dir():
            os.utime(root / "downloads" / ses, (past, past))


def rel(i):
    return f"{SESSIONS[i % 2]}/P_{i:03d}_MR.zip"


def ticker(instance, root, **settings):
    sensor = build_downloads_sensor(visit_chain_job, settings=SensorLimits(**settings))
    return helpers.Ticker(instance, sensor, {"dataset": DatasetResource(root=str(root))})


def reqs(result):
    return list(result.run_requests or []) if isinstance(result, SensorResult) else []


def adds(result):
    return [k for r in (result.dynamic_partitions_requests or []) for k in r.partition_keys] \
        if isinstance(result, SensorResult) else []


def skip_text(result):
    return result.skip_reason.skip_message if isinstance(result, SensorResult) and result.skip_reason else ""


def drain(t, max_ticks=60):
    """Tick until nothing is waiting or queued; every run request and partition add, per tick."""
    per_tick = []
    for _ in range(max_ticks):
        r = t.tick()
        per_tick.append((reqs(r), adds(r)))
        c = json.loads(t.cursor)
        if not reqs(r) and c["queued"] == 0 and c["waiting"] == 0:
            return per_tick
    raise AssertionError("the sensor never finished taking the archive")


def test_fresh_archive_is_taken_in_bounded_batches_each_download_once_in_order(instance, tmp_path):
    root = make_root(tmp_path, 23)
    t = ticker(instance, root, batch=5, max_new=7)
    per_tick = drain(t)
    taken = [r.tags["dicom_assets/download"] for rs, _ in per_tick for r in rs]
    assert sorted(taken) == sorted(rel(i) for i in range(23))  # every download ...
    assert len(taken) == len(set(taken))                       # ... exactly once
    assert taken == sorted(taken)                              # in order: as they settled, then by path
    assert max(len(rs) for rs, _ in per_tick) == 5             # batches bounded
    assert all(sorted(a) == sorted({r.partition_key for r in rs}) for rs, a in per_tick)  # adds: same batches
    assert len(per_tick) >= 23 // 5 + 2
    assert set(instance.get_dynamic_partitions("visits")) == {f"P{i:03d}_{SESSIONS[i % 2]}" for i in range(23)}
    for r in (r for rs, _ in per_tick for r in rs):
        assert r.run_key == f"{r.tags['dicom_assets/download']}:{r.run_key.split(':', 1)[1]}"
    assert len(t.cursor) < 200  # the cursor names the state; it does not grow with the archive
    assert not any(reqs(t.tick()) for _ in range(3))  # unchanged downloads never run again


def test_cursor_stays_bounded_while_the_archive_grows(instance, tmp_path):
    root = make_root(tmp_path, 4, extra=60)
    t = ticker(instance, root, batch=50)
    sizes = []
    for k in range(4, 64, 20):
        for i in range(k, k + 20):
            dump(root, i)
        drain(t)
        sizes.append(len(t.cursor))
    assert len(set(sizes)) == 1 and sizes[0] < 200
    assert len(instance.get_dynamic_partitions("visits")) == 64


def test_redelivered_dump_is_taken_again_in_place_or_by_rename(instance, tmp_path):
    root = make_root(tmp_path, 6)
    t = ticker(instance, root)
    first = {r.tags["dicom_assets/download"]: r.run_key for rs, _ in drain(t) for r in rs}
    in_place = root / "downloads" / rel(0)
    st = in_place.stat()
    os.utime(in_place, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same name, same inode
    renamed = root / "downloads" / rel(1)
    tmp = renamed.with_name(renamed.name + ".part")
    tmp.write_bytes(b"PK\x05\x06" + b"\1" * 30)
    os.replace(tmp, renamed)  # a browser finishing a download over the old one: a new inode
    again = [r for rs, _ in drain(t) for r in rs]
    assert sorted(r.tags["dicom_assets/download"] for r in again) == [rel(0), rel(1)]
    assert all(r.run_key != first[r.tags["dicom_assets/download"]] for r in again)
    assert not reqs(t.tick())


def test_identical_copy_put_back_is_not_run_twice_but_a_new_one_is(instance, tmp_path):
    root = make_root(tmp_path, 4)
    t = ticker(instance, root)
    drain(t)
    path = root / "downloads" / rel(2)
    keep = tmp_path / "kept.zip"
    shutil.copy2(path, keep)
    path.unlink()
    assert not reqs(t.tick())
    shutil.copy2(keep, path)  # same size and mtime: the same dump
    assert not any(reqs(t.tick()) for _ in range(3))
    path.write_bytes(b"PK\x05\x06" + b"\2" * 40)  # a new delivery under the same name
    assert [r.tags["dicom_assets/download"] for rs, _ in drain(t) for r in rs] == [rel(2)]


def test_dump_vanishing_while_pending_is_dropped(instance, tmp_path):
    root = make_root(tmp_path, 10)
    t = ticker(instance, root, batch=3)
    first = t.tick()  # all seen, none stable yet
    assert not reqs(first) and "10 download(s) still arriving" in skip_text(first)
    (root / "downloads" / rel(0)).unlink()  # vanishes before it settled
    second = t.tick()
    assert [r.tags["dicom_assets/download"] for r in reqs(second)] == sorted(rel(i) for i in range(1, 10))[:3]
    queued = sorted(rel(i) for i in range(1, 10))[3:]
    (root / "downloads" / queued[0]).unlink()  # ready, queued for a later batch, then gone
    (root / "downloads" / queued[-1]).unlink()
    rest = [r.tags["dicom_assets/download"] for rs, _ in drain(t) for r in rs]
    assert rest == queued[1:-1]
    assert json.loads(t.cursor)["queued"] == 0 and json.loads(t.cursor)["waiting"] == 0


def test_tick_the_instance_did_not_keep_is_rolled_back(instance, tmp_path):
    """The cursor is the commit point: evaluated again from the previous cursor (the daemon
    lost the result), a tick gives the same run requests, none lost and none new."""
    root = make_root(tmp_path, 8)
    t = ticker(instance, root, batch=3)
    t.tick()
    before = t.cursor
    lost = [r.run_key for r in reqs(t.tick())]
    t.cursor = before  # the daemon did not keep that tick
    again = [r.run_key for r in reqs(t.tick())]
    assert again == lost and len(again) == 3
    rest = [r.run_key for rs, _ in drain(t) for r in rs]
    assert sorted(again + rest) == sorted(set(again + rest)) and len(again + rest) == 8


def test_manifest_change_classifies_every_name_again(instance, tmp_path):
    root = make_root(tmp_path, 4)
    stranger = root / "downloads" / "ses-01" / "XYZ_999.zip"
    stranger.write_bytes(b"PK\x05\x06" + b"\0" * 18)
    t = ticker(instance, root)
    drain(t)
    assert "'ses-01/XYZ_999.zip' matches no participant of the manifest" in skip_text(t.tick())
    manifest = root / "tabular" / "demographics" / "mr_proc_manifest.csv"
    manifest.write_text(manifest.read_text() + "XYZ_999,ses-01\n")
    taken = [r.partition_key for rs, _ in drain(t) for r in rs]
    assert taken == ["XYZ999_ses-01"]
    assert "XYZ999_ses-01" in instance.get_dynamic_partitions("visits")


def test_cursor_of_the_previous_format_carries_what_was_taken(instance, tmp_path):
    root = make_root(tmp_path, 4)
    from dicom_assets.core.downloads import signature

    old = {"pending": {}, "reported": {},
           "submitted": {rel(i): signature(root / "downloads" / rel(i)).token() for i in range(3)}}
    t = ticker(instance, root)
    t.cursor = json.dumps(old)
    taken = [r.tags["dicom_assets/download"] for rs, _ in drain(t) for r in rs]
    assert taken == [rel(3)]


# ------------------------------------------------------------- the state itself (no Dagster)
def state_tick(state, gen, root, **settings):
    ds = Dataset(DatasetLayout(root))
    return state.tick(gen, sessions=SESSIONS, ctx_token="fixed",
                      classifier=lambda: (set(ds.manifest.participants), {}), settings=SensorLimits(**settings))


def test_idle_tick_lists_no_folder_and_audits_a_bounded_slice(tmp_path):
    root = make_root(tmp_path, 12, extra=1)
    state = DownloadsState(DatasetLayout(root), "t1")
    opts = dict(settle_window=0.0, audit=5, relist_every=50)
    gen = 0
    for _ in range(5):
        gen = state_tick(state, gen, root, **opts).gen
    idle = state_tick(state, gen, root, **opts)
    assert idle.listed == [] and idle.audited == 5 and not idle.taken
    dump(root, 12, b"PK\x05\x06" + b"\7" * 20)  # a new dump in ses-01 only
    seen = state_tick(state, idle.gen, root, **opts)
    assert seen.listed == ["ses-01"] and seen.waiting == 1
    # every relist_every ticks every folder is listed, changed or not
    out = state_tick(state, seen.gen, root, **{**opts, "relist_every": 1})
    assert out.listed == list(SESSIONS)


def test_taken_tokens_of_a_tick_come_from_its_own_connection(tmp_path, monkeypatch):
    root = make_root(tmp_path, 4)
    (root / "downloads" / "ses-01" / "P_000_MR_part2.zip").write_bytes(b"PK\x05\x06" + b"\1" * 18)
    state = DownloadsState(DatasetLayout(root), "t1")
    opened = []
    connect = DownloadsState.connect
    monkeypatch.setattr(DownloadsState, "connect", lambda self: opened.append(1) or connect(self))
    first = state_tick(state, 0, root, settle_window=0.0)
    assert not first.taken and first.observed == {}
    out = state_tick(state, first.gen, root, settle_window=0.0)
    visits = sorted({t.visit for t in out.taken})
    assert visits == ["P000_ses-01", "P001_ses-02", "P002_ses-01", "P003_ses-02"]
    opened.clear()
    got = state.taken_tokens(visits)
    assert opened == []  # the tick's reading: no second connection to the state file
    assert list(got) == visits and len(got["P000_ses-01"]) == 2
    assert got == out.observed == DownloadsState(DatasetLayout(root), "t1").taken_tokens(visits)  # read anew
    assert opened == [1]
    assert state.taken_tokens([]) == {}
    assert state.taken_tokens(["P000_ses-01", "P009_ses-02"]) == {"P000_ses-01": got["P000_ses-01"],
                                                                "P009_ses-02": []}


# ------------------------------------------------------------- curation status, row by row
def read_rows(path):
    return {r["visit"]: r for r in csv.DictReader(open(path), delimiter="\t")}


def test_curation_step_updates_its_own_row_only(tmp_path):
    root = make_root(tmp_path, 6, extra=2)
    ds = Dataset.open(root)
    path = update_curation_status(ds)
    before = path.read_text().splitlines()
    v = Visit("P003", "ses-02")
    (ds.layout.raw_dir(v)).mkdir(parents=True)
    (ds.layout.raw_dir(v) / "IM1").write_bytes(b"x")
    update_visit_status(ds, v)
    after = path.read_text().splitlines()
    changed = [i for i, (a, b) in enumerate(zip(before, after)) if a != b]
    assert len(after) == len(before) and len(changed) == 1
    assert after[changed[0]].split("\t")[2] == "P003_ses-02"
    assert read_rows(path)["P003_ses-02"]["in_raw_dicoms"] == "true"
    # the same file as a full recompute
    full = tmp_path / "full.tsv"
    shutil.copy(path, full)
    update_curation_status(ds)
    assert path.read_bytes() == full.read_bytes()


def test_curation_in_downloads_is_kept_unless_the_step_knows(tmp_path):
    root = make_root(tmp_path, 2, extra=1)
    ds = Dataset.open(root)
    path = update_curation_status(ds)
    late = Visit("P002", "ses-01")
    assert read_rows(path)["P002_ses-01"]["in_downloads"] == "false"
    dump(root, 2)  # arrives after the last full recompute
    update_visit_status(ds, late)  # a step that does not look at downloads/
    assert read_rows(path)["P002_ses-01"]["in_downloads"] == "false"
    update_visit_status(ds, late, in_downloads=True)  # raw_dicoms knows
    assert read_rows(path)["P002_ses-01"]["in_downloads"] == "true"
    assert [r["in_downloads"] for r in compute_status(ds)] == [True, True, True]  # as the full recompute says


def test_curation_missing_file_or_grown_manifest_is_recomputed_whole(tmp_path):
    root = make_root(tmp_path, 3)
    ds = Dataset.open(root)
    path = ds.layout.curation_status_path
    update_visit_status(ds, Visit("P000", "ses-01"))  # no file yet: written whole
    assert set(read_rows(path)) == {"P000_ses-01", "P001_ses-02", "P002_ses-01"}
    manifest = root / "tabular" / "demographics" / "mr_proc_manifest.csv"
    manifest.write_text(manifest.read_text() + "P_003,ses-02\n")
    ds = Dataset.open(root)
    update_visit_status(ds, Visit("P003", "ses-02"))  # a visit without a row: the manifest grew
    assert set(read_rows(path)) == {"P000_ses-01", "P001_ses-02", "P002_ses-01", "P003_ses-02"}
    text = path.read_bytes()
    update_visit_status(ds, Visit("OTHER", "ses-01"))  # not in the manifest (a TCIA visit): no row
    assert path.read_bytes() == text
