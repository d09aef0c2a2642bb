"""The downloads sensor on a real Dagster instance: new complete downloads -> partitions
and runs; growing, partial and unknown downloads -> nothing, with a reason."""

import json
import os
import shutil

import pytest
from dagster import SensorResult, SkipReason

from dicom_assets.definitions import downloads_sensor
from dicom_assets.defs.resources import DatasetResource

from . import helpers


def downloads_ticker(instance, root):
    return helpers.Ticker(instance, downloads_sensor, {"dataset": DatasetResource(root=str(root))})


def requests(result):
    return result.run_requests or [] if isinstance(result, SensorResult) else []


def skip_text(result):
    if isinstance(result, SkipReason):
        return result.skip_message
    return result.skip_reason.skip_message if result.skip_reason else ""


def test_new_downloads_wait_one_tick_then_run_once(instance, demo_root):
    t = downloads_ticker(instance, demo_root)
    first = t.tick()
    assert not requests(first)
    assert "still arriving or not yet stable" in skip_text(first)
    second = t.tick()
    reqs = requests(second)
    assert sorted(r.partition_key for r in reqs) == ["QPN001_ses-01", "QPN001_ses-02", "QPN002_ses-01",
                                                      "QPN002_ses-02", "QPN003_ses-01", "QPN003_ses-02"]
    assert set(instance.get_dynamic_partitions("visits")) == {r.partition_key for r in reqs}
    for r in reqs:
        assert r.tags["dicom_assets/visit"] == r.partition_key
        assert r.run_key.startswith(r.tags["dicom_assets/download"] + ":")
    assert not requests(t.tick())  # unchanged downloads never run again


@pytest.mark.faults
def test_growing_download_is_not_taken(instance, demo_root):
    t = downloads_ticker(instance, demo_root)
    t.tick(), t.tick()
    item = demo_root / "downloads" / "ses-01" / "QPN_004_MR.zip"
    item.write_bytes(b"PK\x03\x04" + b"\0" * 1000)  # a download arriving
    assert not requests(t.tick())
    with open(item, "ab") as fh:
        fh.write(b"\0" * 1000)  # still growing at the next tick
    assert not requests(t.tick())
    reqs = requests(t.tick())  # stable for a whole tick: taken
    assert [r.partition_key for r in reqs] == ["QPN004_ses-01"]


@pytest.mark.faults
def test_partial_names_are_ignored_and_done_marker_is_immediate(instance, demo_root):
    t = downloads_ticker(instance, demo_root)
    t.tick(), t.tick()
    ses = demo_root / "downloads" / "ses-02"
    (ses / "QPN_004_MR.zip.part").write_bytes(b"x" * 100)
    (ses / "QPN_004_MR.zip.crdownload").write_bytes(b"x" * 100)
    assert not requests(t.tick()) and not requests(t.tick())
    shutil.copy(demo_root / "downloads/ses-01/QPN_001_MR.zip", ses / "QPN_004_MR.zip")
    (ses / "QPN_004_MR.zip.done").touch()
    assert [r.partition_key for r in requests(t.tick())] == ["QPN004_ses-02"]


@pytest.mark.faults
def test_unknown_participant_is_reported_not_guessed(instance, demo_root):
    t = downloads_ticker(instance, demo_root)
    t.tick(), t.tick()
    shutil.copy(demo_root / "downloads/ses-01/QPN_001_MR.zip", demo_root / "downloads/ses-01/XYZ_999.zip")
    r1, r2 = t.tick(), t.tick()
    assert not requests(r1) and not requests(r2)
    assert "'ses-01/XYZ_999.zip' matches no participant of the manifest" in skip_text(r2)
    assert "XYZ999_ses-01" not in instance.get_dynamic_partitions("visits")


def test_redelivered_download_runs_again(instance, demo_root):
    t = downloads_ticker(instance, demo_root)
    t.tick()
    first = {r.partition_key: r.run_key for r in requests(t.tick())}
    item = demo_root / "downloads/ses-01/QPN_001_MR.zip"
    st = item.stat()
    os.utime(item, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the site re-delivered it
    t.tick()
    again = requests(t.tick())
    assert [r.partition_key for r in again] == ["QPN001_ses-01"]
    assert again[0].run_key != first["QPN001_ses-01"]


@pytest.mark.faults
def test_folder_download_still_being_copied(instance, demo_root):
    t = downloads_ticker(instance, demo_root)
    t.tick(), t.tick()
    folder = demo_root / "downloads/ses-02/QPN_004"
    (folder / "s1").mkdir(parents=True)
    (folder / "s1" / "IM1").write_bytes(b"1")
    t.tick()
    (folder / "s1" / "IM2").write_bytes(b"2")  # a copy in progress
    assert not requests(t.tick())
    assert [r.partition_key for r in requests(t.tick())] == ["QPN004_ses-02"]


@pytest.mark.faults
def test_broken_config_is_a_skip_with_the_reason(instance, demo_root):
    (demo_root / "global_config.json").write_text("{")
    result = downloads_ticker(instance, demo_root).tick()
    assert "dataset not usable" in skip_text(result) and "global_config.json" in skip_text(result)


def test_cursor_names_the_state_file_only(instance, demo_root):
    """The cursor is the state's id and the tick number; the settled state is a SQLite file
    under scratch/state/, holding every download taken."""
    import sqlite3

    t = downloads_ticker(instance, demo_root)
    t.tick(), t.tick()
    data = json.loads(t.cursor)
    assert set(data) == {"v", "state", "gen", "queued", "waiting"} and data["gen"] == 2 and data["queued"] == 0
    db = demo_root / "scratch" / "state" / f"downloads-{data['state']}.sqlite"
    with sqlite3.connect(db) as con:
        taken = sorted(r[0].decode() for r in con.execute("SELECT rel FROM items WHERE state='taken'"))
    assert len(taken) == 6 and taken[0] == "ses-01/QPN_001_MR.zip"


@pytest.mark.parametrize("name,expected", [
    ("QPN_001_MR.zip", ["QPN001"]), ("QPN001.tar.gz", ["QPN001"]), ("sub-QPN_001", ["QPN001"]),
    ("QPN_0010_MR.zip", ["QPN0010"]), ("qpn-001 scan.tgz", ["QPN001"]), ("QPN_00_1.zip", ["QPN001"]),
    ("QPN_0011.zip", []), ("XQPN_001.zip", []),
])
def test_item_names_match_participants_at_a_boundary(name, expected):
    from dicom_assets.core.downloads import match_participant

    assert match_participant(name, {"QPN001", "QPN0010", "QPN002"}) == expected


# ------------------------------------------------ issue 13: every download not taken has its reason
@pytest.mark.faults
def test_every_download_not_taken_is_reported_with_its_reason(tmp_path):
    from dicom_assets.core.downloads import scan_downloads
    from dicom_assets.core.layout import DatasetLayout

    lay = DatasetLayout(tmp_path)
    ses = lay.downloads_dir("ses-01")
    ses.mkdir(parents=True)
    for name in ("QPN_001.7z", "QPN_002.rar", "QPN_003.tar.zst", "QPN_001_ses-02.zip", "notes.txt"):
        (ses / name).write_bytes(b"x")
    (tmp_path / "elsewhere" / "s1").mkdir(parents=True)
    os.symlink(tmp_path / "elsewhere", ses / "QPN_004")  # a dump folder that is a link
    (ses / "QPN_005.tar.xz").write_bytes(b"x")
    (ses / ".hidden").write_bytes(b"x")
    (ses / "QPN_005.tar.xz.done").touch()
    scanned = {s.item.name: s for s in scan_downloads(lay, ("ses-01",), {f"QPN00{i}" for i in range(1, 6)})}
    assert scanned["QPN_005.tar.xz"].visit.key == "QPN005_ses-01" and scanned["QPN_005.tar.xz"].item.kind == "tar.xz"
    reasons = {n: s.problem for n, s in scanned.items() if s.visit is None}
    assert reasons == {
        "QPN_001.7z": "'ses-01/QPN_001.7z' is a 7-Zip archive, which cannot be extracted here; unpack it into a "
                      "folder beside it, or re-pack it as .zip, .tar, .tar.gz/.tgz, .tar.bz2, .tar.xz/.txz",
        "QPN_002.rar": "'ses-01/QPN_002.rar' is a RAR archive, which cannot be extracted here; unpack it into a "
                       "folder beside it, or re-pack it as .zip, .tar, .tar.gz/.tgz, .tar.bz2, .tar.xz/.txz",
        "QPN_003.tar.zst": "'ses-01/QPN_003.tar.zst' is a Zstandard-compressed tar, which cannot be extracted here; "
                           "unpack it into a folder beside it, or re-pack it as .zip, .tar, .tar.gz/.tgz, .tar.bz2, "
                           ".tar.xz/.txz",
        "QPN_001_ses-02.zip": "'ses-01/QPN_001_ses-02.zip' is named for session ses-02 but lies in ses-01/; move it "
                              "to downloads/ses-02/ (or map it in tabular/dicom_dir_map.tsv)",
        "notes.txt": "'ses-01/notes.txt' is not a download item (expected .zip, .tar, .tar.gz/.tgz, .tar.bz2, "
                     ".tar.xz/.txz or a folder)",
        "QPN_004": "'ses-01/QPN_004' is a symbolic link; links are not followed (move or copy the dump itself into "
                   "the downloads folder)",
    }


@pytest.mark.faults
def test_sensor_skip_reason_names_downloads_it_cannot_take(instance, demo_root):
    t = downloads_ticker(instance, demo_root)
    t.tick(), t.tick()
    ses = demo_root / "downloads" / "ses-01"
    shutil.copy(ses / "QPN_001_MR.zip", ses / "QPN_004_MR.7z")
    os.symlink(demo_root / "downloads" / "ses-02", ses / "QPN_004")
    os.symlink("loop", ses / "QPN_004_loop")  # a link loop must not crash the tick
    r1, r2 = t.tick(), t.tick()
    assert not requests(r1) and not requests(r2)
    text = skip_text(r2)
    assert "3 download(s) not taken: 'ses-01/QPN_004' is a symbolic link" in text and "and 2 more" in text
    assert "QPN004_ses-01" not in instance.get_dynamic_partitions("visits")
    for link in ("QPN_004", "QPN_004_loop"):  # the downloads guard digests files, following links
        (ses / link).unlink()


@pytest.mark.faults
def test_raw_dicoms_names_the_download_it_cannot_take(instance, demo_root):
    """A visit whose only dump is a .7z: raw_dicoms fails saying why that dump was not taken."""
    shutil.copy(demo_root / "downloads/ses-01/QPN_001_MR.zip", demo_root / "downloads/ses-02/QPN_004_MR.7z")
    result = helpers.run_chain(instance, demo_root, "QPN004_ses-02", selection=helpers.AssetSelection.assets("raw_dicoms"),
                               raise_on_error=False)
    failure = next(ev for ev in result.all_events if ev.event_type_value == "STEP_FAILURE")
    message = failure.event_specific_data.error.message
    assert "no download for visit QPN004_ses-02" in message
    assert "not taken: 'ses-02/QPN_004_MR.7z' is a 7-Zip archive, which cannot be extracted here" in message


def _state_file(result, root):
    from dicom_assets.core.downloads_state import parse_cursor
    from dicom_assets.core.layout import DatasetLayout

    return DatasetLayout(root).downloads_state_path(parse_cursor(result.cursor)["state"])


def _zero(path):
    path.write_bytes(b"\0" * max(path.stat().st_size, 4096))


def _garble_undo(path):
    """An undo row that cannot be read, of a tick the instance did not keep (rolled back next)."""
    import sqlite3

    db = sqlite3.connect(path)
    gen = int(db.execute("SELECT value FROM meta WHERE key='gen'").fetchone()[0])
    db.execute("UPDATE meta SET value=? WHERE key='gen'", (str(gen + 1),))
    db.execute("INSERT INTO undo VALUES (?, 'item', ?, ?)", (gen + 1, b"ses-01/x.zip", "{not json"))
    db.commit()
    db.close()


@pytest.mark.faults
@pytest.mark.parametrize("damage", [_zero, _garble_undo], ids=["zeroed", "garbled-undo"])
def test_a_damaged_state_is_set_aside_and_rebuilt_taking_nothing_twice(instance, demo_root, damage, capfd):
    """The sensor's state is a cache: damaged, it is set aside (named in the log, never deleted)
    and rebuilt on its own. Nothing is taken twice (same run keys, which the daemon runs once)
    and nothing is missed (a dump that arrived meanwhile is taken)."""
    t = downloads_ticker(instance, demo_root)
    t.tick()
    first = t.tick()
    keys = {r.run_key for r in requests(first)}
    assert len(keys) == 6
    state = _state_file(first, demo_root)
    damage(state)
    (demo_root / "downloads" / "ses-01" / "QPN_004_MR.zip").write_bytes(
        (demo_root / "downloads" / "ses-01" / "QPN_001_MR.zip").read_bytes())
    capfd.readouterr()
    healed = t.tick()  # no exception, no dead sensor
    logged = capfd.readouterr().err  # the sensor's log (the daemon keeps it with the tick)
    assert isinstance(healed, SensorResult)
    aside = [p for p in state.parent.iterdir() if p.name.startswith(state.name + ".damaged-")]
    assert aside, "the damaged state is kept aside"
    assert f"sensor state {state} is damaged" in logged and "set aside as" in logged, logged[-2000:]
    assert _state_file(healed, demo_root) != state
    again = requests(t.tick())
    # every dump is signed again: the six taken ones come with the same run keys (run once), plus the new one
    assert {r.run_key for r in again} - keys == {r.run_key for r in again if "QPN_004" in r.run_key}
    assert keys <= {r.run_key for r in again} and any(r.partition_key == "QPN004_ses-01" for r in again)


@pytest.mark.faults
def test_a_dump_name_that_is_no_utf8_is_printed_not_passed_on_raw(instance, demo_root, capfd):
    """A name with a byte that is no UTF-8 (a Latin-1 export) reaches the skip reason and the log
    as \\xNN, as the organize report writes it: never a lone surrogate that breaks a UTF-8 log."""
    folder = os.fsencode(demo_root / "downloads" / "ses-01")
    with open(os.path.join(folder, b"NOBODY_\xe9t\xe9.zip"), "wb") as fh:
        fh.write(b"PK\x05\x06" + b"\0" * 18)
    t = downloads_ticker(instance, demo_root)
    capfd.readouterr()
    results = [t.tick(), t.tick(), t.tick()]
    logged = capfd.readouterr().err
    reason = " ".join(skip_text(r) for r in results if not requests(r))
    for text in (reason, logged):
        text.encode("utf-8")  # no lone surrogate
    assert "NOBODY_\\xe9t\\xe9.zip" in reason + logged


@pytest.mark.faults
def test_a_read_only_state_file_is_set_aside_too(nobody_dir):
    """A state file the sensor may not write (restored read-only, another user's): sqlite refuses
    every tick ("attempt to write a readonly database"); it is set aside and rebuilt as well.
    Run as an unprivileged user, for whom the permission holds."""
    from dicom_assets.core.downloads_state import DownloadsState, StateDamaged
    from dicom_assets.core.layout import DatasetLayout

    from .helpers import as_nobody

    lay = DatasetLayout(nobody_dir / "root")
    ses = lay.downloads_dir("ses-01")
    ses.mkdir(parents=True)
    (ses / "QPN_001_MR.zip").write_bytes(b"PK\x05\x06" + b"\0" * 18)
    kw = dict(sessions=("ses-01",), ctx_token="t", classifier=lambda: ({"QPN001": "QPN_001"}, {}))
    state = DownloadsState(lay, "0123456789abcdef")
    state.tick(0, **kw)
    for p in [nobody_dir, *nobody_dir.rglob("*")]:
        os.chown(p, 65534, 65534)
    for p in state.path.parent.glob(state.path.name + "*"):
        os.chmod(p, 0o444)

    def tick_as_the_sensor():
        try:
            state.tick(1, **kw)
            return "no damage seen"
        except StateDamaged as damage:
            fresh, note = state.healed(damage)
            out = fresh.tick(0, **kw)
            return note, fresh.path.exists(), out.waiting
    res = as_nobody(tick_as_the_sensor)
    assert res[0] == "ok", res
    note, created, waiting = res[1]
    assert "readonly" in note and "set aside as" in note and created and waiting == 1
