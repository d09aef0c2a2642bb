"""core.sources: a visit's source and dumps, with what they look up in the manifest built once
per manifest, not once per visit."""

import gc
import os
import weakref

from dicom_assets.core import downloads, manifest, sources
from dicom_assets.core.dataset import Dataset
from dicom_assets.core.ids import Visit, parse_visit_key
from dicom_assets.core.layout import DatasetLayout


def test_dumps_build_the_participant_index_once_per_manifest(demo_root, monkeypatch):
    ds = Dataset.open(demo_root)
    built = []
    real = downloads.participant_index
    monkeypatch.setattr(manifest, "participant_index", lambda ps: built.append(1) or real(ps))
    keys = [v.key for v in ds.manifest.visits]
    got = {k: [i.name for i in sources.visit_source(ds, k).dumps(ds)] for k in keys}
    assert len(built) == 1
    # the same items as a scan building its own index from the manifest's participants
    lay = ds.layout
    dir_map = downloads.read_dicom_dir_map(lay.dicom_dir_map_path)
    assert got == {k: [i.name for i in downloads.items_for_visit(lay, parse_visit_key(k),
                                                                  set(ds.manifest.participants), dir_map)]
                   for k in keys}
    assert got["QPN001_ses-01"] == ["QPN_001_MR.zip"]


def test_manifest_index_is_kept_per_manifest_object_and_goes_with_it(demo_root):
    ds = Dataset.open(demo_root)
    first = ds.manifest.participant_index
    assert ds.manifest.participant_index is first
    assert first == downloads.participant_index(ds.manifest.participants)
    other = Dataset.open(demo_root)  # the manifest read again: its own index
    assert other.manifest.participant_index is not first
    ref = weakref.ref(other.manifest)  # the index lives on the manifest, and goes with it
    del other
    gc.collect()
    assert ref() is None


def test_problems_for_participant_with_a_prebuilt_index(tmp_path):
    lay = DatasetLayout(tmp_path)
    ses = lay.downloads_dir("ses-01")
    ses.mkdir(parents=True)
    (ses / "QPN_001.7z").write_bytes(b"x")
    participants = {"QPN001", "QPN002"}
    index = downloads.participant_index(participants)
    visit = Visit("QPN001", "ses-01")
    assert downloads.problems_for_participant(lay, visit, participants, index=index) == \
        downloads.problems_for_participant(lay, visit, participants) != []


def test_visit_source_looks_the_visit_up_by_key(demo_root, monkeypatch):
    """The manifest's visits as a set, built once: no whole-table comparison per question,
    the same answer as Manifest.has_visit."""
    ds = Dataset.open(demo_root)
    m = ds.manifest
    t = m.table
    asked = [*m.visits, Visit("QPN001", "ses-09"), Visit("NOBODY", "ses-01"), Visit("QPN0010", "ses-01")]
    expected = {v: bool(((t["participant"] == v.participant) & (t["session"] == v.session)).any()) for v in asked}
    assert sum(expected.values()) == len(m.visits)
    m.participants  # noqa: B018 - read (and kept) before the table goes
    m.has_visit(asked[0])  # the first question builds the set of visits
    # no whole-table comparison per question: the table is not read again
    object.__setattr__(m, "table", None)
    assert {v: m.has_visit(v) for v in asked} == expected
    kinds = {v: sources.visit_source(ds, v).kind for v in asked}
    assert kinds == {v: sources.DUMP if ok else sources.UNKNOWN for v, ok in expected.items()}


def test_resolved_csv_is_read_again_only_when_its_file_token_changes(tmp_path, monkeypatch):
    """One answer to "has this file changed" (fsutil.file_token) for the resolved CSVs and the
    sensor state's context token."""
    from dicom_assets.core import fsutil
    from dicom_assets.core.downloads_state import CLASSIFY_VERSION, context_token

    path = tmp_path / "resolved.csv"
    assert fsutil.file_token(path) == fsutil.NO_FILE == "-"
    assert sources._resolved_rows(path) is None
    reads = []
    real = sources.read_resolved
    monkeypatch.setattr(sources, "read_resolved", lambda p: reads.append(p) or real(p))
    path.write_text("visit,PatientID\nA_ses-01,A\n")
    st = path.stat()
    assert fsutil.file_token(path) == f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"
    assert sources._resolved_rows(path) == [{"visit": "A_ses-01", "PatientID": "A"}]
    assert sources._resolved_rows(path) == [{"visit": "A_ses-01", "PatientID": "A"}] and len(reads) == 1
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: read again
    sources._resolved_rows(path)
    assert len(reads) == 2
    other = tmp_path / "new.csv"  # replaced by a rename, same size and mtime: another inode
    other.write_text("visit,PatientID\nB_ses-01,B\n")
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    os.replace(other, path)
    assert sources._resolved_rows(path) == [{"visit": "B_ses-01", "PatientID": "B"}] and len(reads) == 3
    assert context_token(path, tmp_path / "none", path, ("ses-01",)) == \
        f"{CLASSIFY_VERSION}|ses-01|{fsutil.file_token(path)}|-|{fsutil.file_token(path)}"
