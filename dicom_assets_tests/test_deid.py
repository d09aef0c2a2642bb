"""The de-identified copy (issue 29): DICOM PS3.15 Annex E applied to real scanner files with an
identifying value planted in every attribute of the standard's table (in sequences and private
attributes too), and the leak check that must catch each one when its treatment is switched off."""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import hashlib
import json
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dicom_assets.core import deid
from dicom_assets.core.fsutil import tree_digests

KEY = b"site-secret-key-for-tests-0001"
OTHER_KEY = b"another-site-secret-key-0002"
PATIENT = "QPN001"
PRIVATE_GROUP, PRIVATE_CREATOR = 0x0033, "ACME LEAKY HEADER"
NAME = "Leakyfamily^Leakygiven"


@pytest.fixture(scope="module")
def pydicom_files(samples) -> Path:
    """pydicom's real scanner files (its wheel's test_files/)."""
    return samples.pydicom_files


def _marker(n: int, vr: str) -> object:
    """A unique identifying value for the n-th attribute of the table, of its VR."""
    day = dt.date(2023, 1, 15) + dt.timedelta(days=n % 28)  # one month: no shifted date lands on another
    return {
        "PN": f"Fam{n:03d}x^Giv{n:03d}y", "DA": day.strftime("%Y%m%d"), "DT": day.strftime("%Y%m%d") + "101010",
        "UI": f"1.2.826.0.1.3680043.10.999.{n}", "CS": f"LKCS{n:03d}Q", "AE": f"LKAE{n:03d}Q",
        "UR": f"http://leak{n:03d}.example.org",
    }.get(vr, f"Leak{n:03d}value")


PLANTED_VRS = {"PN", "DA", "DT", "UI", "CS", "AE", "UR", "LO", "SH", "ST", "LT", "UT", "UC"}


def plant(ds: Dataset, profile: deid.Profile) -> list[int]:
    """An identifying value in every attribute of Table E.1-1 of a VR that holds one (the file's
    own values kept where it has them), a sequence item with a name in each sequence of the table,
    the patient's name in a private block (text and bytes) and in a nested kept sequence."""
    planted = []
    for n, tag in enumerate(sorted(profile.exact)):
        if (tag in ds and ds[tag].value not in (None, "", b"")) or (tag >> 16) in (0x0000, 0x0002):  # command and file meta groups: not in a data set
            continue
        try:
            vr = dictionary_VR(tag).split(" ")[0]
        except KeyError:
            continue
        if vr == "SQ":
            item = Dataset()
            item.OtherPatientNames = f"Nest{n:03d}x^Leak{n:03d}y"
            item.ReferencedSOPInstanceUID = f"1.2.826.0.1.3680043.10.998.{n}"
            ds.add_new(tag, "SQ", Sequence([item]))
        elif vr in PLANTED_VRS:
            ds.add_new(tag, vr, _marker(n, vr))
        else:
            continue
        planted.append(tag)
    ds.PatientName, ds.OtherPatientNames = NAME, "Otherfamily^Othergiven"
    ds.StudyDescription = "brain scan of Leakyfamily"  # a description holding the name: cleaned
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(0x10, "LO", "Leakyfamily private")
    block.add_new(0x11, "OB", b"\x01\x02Leakygiven\x00")
    block.add_new(0x12, "DS", "0.5")  # declared safe in the safe-list test
    ref = ds.ReferencedImageSequence[0] if "ReferencedImageSequence" in ds else Dataset()
    ref.OperatorsName = "Deepfamily^Deepgiven"  # an attribute removed at depth inside a kept sequence
    inner = Dataset()
    inner.InstitutionAddress = "12 Leaky Street, Leakytown"
    inner.ReferencedSOPClassUID, inner.ReferencedSOPInstanceUID = ds.SOPClassUID, "1.2.826.0.1.3680043.10.997.2"
    ref.SourceImageSequence = Sequence([inner])
    if "ReferencedImageSequence" not in ds:
        ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = ds.SOPClassUID, "1.2.826.0.1.3680043.10.997.1"
        ds.ReferencedImageSequence = Sequence([ref])
    return planted


@pytest.fixture(scope="module")
def planted_dir(pydicom_files, tmp_path_factory) -> Path:
    """Real scanner files (pydicom's CT and MR) with the planted values."""
    out = tmp_path_factory.mktemp("planted")
    profile = deid.load_profile()
    for name in ("CT_small.dcm", "MR_small.dcm"):
        ds = dcmread(pydicom_files / name)
        plant(ds, profile)
        ds.save_as(out / name)
    return out


def _run(files, dest, *, key=KEY, profile=None, participant=PATIENT, safe=(), identifying_profile=None):
    profile = profile or deid.load_profile()
    ctx = deid.Context(key=key, participant=participant, profile=profile, safe_private=safe)
    ids = deid.visit_identifiers(files, identifying_profile or profile, {participant: "participant_id"})
    res = deid.deidentify_files(files, dest, ctx, ids)
    hits, scanned = deid.leak_check(dest, ids)
    return res, hits, scanned


def test_the_table_is_the_recorded_copy_of_the_standard():
    """The data file is the one its README names (sha256), with the standard's columns and codes."""
    raw = deid.PROFILE_FILE.read_bytes()
    assert hashlib.sha256(raw).hexdigest() == deid.PROFILE_SHA256
    rows = json.loads(raw)
    assert len(rows) == 621 and deid.PROFILE_EDITION in deid.PROFILE_FILE.name
    assert deid.PROFILE_SHA256 in (deid.PROFILE_DIR / "README.md").read_text()
    by_tag = {r["tag"]: r for r in rows}
    assert by_tag["(0010,0010)"]["basicProfile"] == "Z"           # Patient's Name
    assert by_tag["(0008,0020)"]["rtnLongModifDatesOpt"] == "C"   # Study Date
    assert by_tag["(0008,1140)"]["basicProfile"] == "X/Z/U*"      # Referenced Image Sequence
    basic = deid.load_profile(())
    assert basic.action(0x00100010) == "Z" and basic.action(0x00081030) == "X"
    assert basic.action(0x00081140) == "U*" and basic.action(0x60023000) == "X"  # overlay data, repeating group
    opts = deid.load_profile()
    assert opts.action(0x00080020) == "C" and opts.action(0x00101010) == "K"  # dates shifted, age kept
    assert opts.action(0x00181000) == "K" and opts.action(0x0008103E) == "C"  # device serial kept, descr. cleaned
    assert opts.private == "C" and basic.private == "X"
    with pytest.raises(deid.DeidError, match="exclude each other"):
        deid.load_profile(("retain_longitudinal_full_dates", "retain_longitudinal_modified_dates"))


def test_planted_everywhere_nothing_leaks(planted_dir, tmp_path):
    files = sorted(planted_dir.glob("*.dcm"))
    sources = {p.name: dcmread(p) for p in files}
    res, hits, scanned = _run(files, tmp_path / "out")
    assert hits == [] and scanned == 2 and len(res.kept) == 2
    assert len(res.identifiers) > 500  # the planted values are all looked for
    out = {p.name: dcmread(p) for p in (tmp_path / "out").iterdir()}
    ct = next(d for d in out.values() if d.Modality == "CT")
    src = sources["CT_small.dcm"]
    pseudo = deid.pseudonym(KEY, PATIENT)
    assert ct.PatientName == pseudo and ct.PatientID == pseudo and ct.PatientIdentityRemoved == "YES"
    assert "OtherPatientNames" not in ct and ct.StudyDescription == "brain scan of"
    assert not [e for e in ct if e.tag.is_private]
    assert ct.ReferencedImageSequence[0].OperatorsName == deid.DUMMY  # X/D at depth: a dummy
    assert "SourceImageSequence" in ct.ReferencedImageSequence[0]  # X/Z/U*: kept, its content cleaned
    assert "InstitutionAddress" not in ct.ReferencedImageSequence[0].SourceImageSequence[0]
    shift = dt.timedelta(days=deid.date_shift_days(KEY, PATIENT))
    assert ct.StudyDate == (dt.datetime.strptime(src.StudyDate, "%Y%m%d") - shift).strftime("%Y%m%d")
    assert ct.StudyInstanceUID.startswith("2.25.") and ct.StudyInstanceUID != src.StudyInstanceUID
    assert ct.file_meta.MediaStorageSOPInstanceUID == ct.SOPInstanceUID
    assert ct.PatientSex == src.PatientSex and ct.LongitudinalTemporalInformationModified == "MODIFIED"
    for name, d in out.items():  # the pixels untouched: the same bytes as the source's
        source = next(s for s in sources.values() if deid.remap_uid(KEY, s.SOPInstanceUID) == d.SOPInstanceUID)
        assert hashlib.sha256(d.PixelData).digest() == hashlib.sha256(source.PixelData).digest(), name


LEAKS = [  # (what is switched off, tag or part, the tag path the check must name)
    ("a name", 0x00101001, "OtherPatientNames"),
    ("an address", 0x00081040, "InstitutionalDepartmentName"),
    ("an accession number", 0x00080050, "AccessionNumber"),
    ("a birth date", 0x00100030, "PatientBirthDate"),
    ("an unshifted date", 0x00080020, "StudyDate"),
    ("a free-text description", 0x00081030, "StudyDescription"),
    ("a UID", 0x00200052, "FrameOfReferenceUID"),
    ("a UID in a nested sequence", 0x00081155, "ReferencedImageSequence[0].ReferencedSOPInstanceUID"),
    ("a name at depth", 0x00081070, "ReferencedImageSequence[0].OperatorsName"),
    ("an address two sequences deep", 0x00080081,
     "ReferencedImageSequence[0].SourceImageSequence[0].InstitutionAddress"),
    ("the file name and the file meta", 0x00080018, "file name"),
    ("a private attribute", "private", "(0033,1010)"),
    ("private bytes", "private", "(0033,1011)"),
]


@pytest.mark.parametrize("what,tag,where", LEAKS, ids=[c[0] for c in LEAKS])
def test_the_check_finds_a_value_left_in_place(planted_dir, tmp_path, what, tag, where):
    """The same run with the treatment of one attribute switched off: the check fails, naming where."""
    real = deid.load_profile()
    files = [planted_dir / "CT_small.dcm"]
    if tag == "private":
        off = dataclasses.replace(real, private="C")
        safe = tuple(deid.SafePrivate(PRIVATE_GROUP, PRIVATE_CREATOR, e) for e in (0x10, 0x11))
    else:
        off = dataclasses.replace(real, exact={**real.exact, tag: "K"})
        safe = ()
    _, hits, _ = _run(files, tmp_path / "out", profile=off, identifying_profile=real, safe=safe)
    assert where in {h.path for h in hits}, f"{what}: {hits}"
    if tag == 0x00080018:
        assert {"SOPInstanceUID", "file meta.MediaStorageSOPInstanceUID"} <= {h.path for h in hits}
    _, clean, _ = _run(files, tmp_path / "again", profile=real)
    assert clean == []


def test_safe_private_keeps_only_the_safe_list(planted_dir, tmp_path):
    safe = (deid.SafePrivate(PRIVATE_GROUP, PRIVATE_CREATOR, 0x12),)
    res, hits, _ = _run([planted_dir / "MR_small.dcm"], tmp_path / "out", safe=safe)
    assert hits == []
    out = dcmread(next((tmp_path / "out").iterdir()))
    private = {int(e.tag): e.value for e in out if e.tag.is_private}
    assert private == {0x00330010: PRIVATE_CREATOR, 0x00331012: "0.5"}


def test_a_source_uid_inside_a_safe_listed_attribute_is_caught(planted_dir, tmp_path):
    """A safe-listed private attribute is kept whole: a UID of the source in its bytes (as Siemens'
    Phoenix protocol names reference images) is searched as text, and found."""
    ds = dcmread(planted_dir / "CT_small.dcm")
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
    block.add_new(0x13, "OB", b'tReferenceImage0 = "' + str(ds.StudyInstanceUID).encode() + b'"\n')
    ds.save_as(tmp_path / "ct.dcm")
    safe = (deid.SafePrivate(PRIVATE_GROUP, PRIVATE_CREATOR, 0x13),)
    _, hits, _ = _run([tmp_path / "ct.dcm"], tmp_path / "out", safe=safe)
    assert [h.path for h in hits] == ["(0033,1013)"] and hits[0].source.endswith("UID")


def test_same_key_same_bytes_other_key_nothing_in_common(planted_dir, tmp_path):
    files = sorted(planted_dir.glob("*.dcm"))
    _run(files, tmp_path / "a")
    _run(files, tmp_path / "b")
    _run(files, tmp_path / "c", key=OTHER_KEY)
    a, b, c = (tree_digests(tmp_path / x) for x in "abc")
    assert a == b and len(a) == 2
    assert not set(a) & set(c)

    def uids(folder):
        return {str(e.value) for p in folder.iterdir() for e in dcmread(p).iterall()
                if e.VR == "UI" and str(e.value).startswith("2.25.")}
    assert uids(tmp_path / "a") and not uids(tmp_path / "a") & uids(tmp_path / "c")
    assert deid.pseudonym(KEY, PATIENT) != deid.pseudonym(OTHER_KEY, PATIENT)
    assert deid.key_fingerprint(KEY) != deid.key_fingerprint(OTHER_KEY)
    assert KEY.decode() not in json.dumps([deid.key_fingerprint(KEY), deid.pseudonym(KEY, PATIENT)])


def test_uids_consistent_across_a_participants_visits(pydicom_files, tmp_path):
    """Visit 2 refers to an image of visit 1 and shares its frame of reference: both stay linked."""
    first = dcmread(pydicom_files / "MR_small.dcm")
    second = copy.deepcopy(first)
    second.SOPInstanceUID = first.SOPInstanceUID + ".2"
    second.StudyInstanceUID = first.StudyInstanceUID + ".2"
    ref = Dataset()
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = first.SOPClassUID, first.SOPInstanceUID
    second.ReferencedImageSequence = Sequence([ref])
    (tmp_path / "v1").mkdir()
    (tmp_path / "v2").mkdir()
    first.save_as(tmp_path / "v1" / "a.dcm")
    second.save_as(tmp_path / "v2" / "b.dcm")
    _run([tmp_path / "v1" / "a.dcm"], tmp_path / "o1")
    _run([tmp_path / "v2" / "b.dcm"], tmp_path / "o2")
    o1, o2 = (dcmread(next((tmp_path / o).iterdir())) for o in ("o1", "o2"))
    assert o1.FrameOfReferenceUID == o2.FrameOfReferenceUID != first.FrameOfReferenceUID
    assert o2.ReferencedImageSequence[0].ReferencedSOPInstanceUID == o1.SOPInstanceUID
    assert o1.StudyInstanceUID != o2.StudyInstanceUID and o1.PatientID == o2.PatientID
    assert o1.StudyDate == o2.StudyDate  # one shift per participant


def test_burned_in_images_are_excluded_with_the_reason(pydicom_files, tmp_path):
    marked = dcmread(pydicom_files / "MR_small.dcm")
    marked.BurnedInAnnotation = "YES"
    marked.save_as(tmp_path / "burned.dcm")
    screen = dcmread(pydicom_files / "CT_small.dcm")
    screen.ImageType = ["DERIVED", "SECONDARY", "SCREEN SAVE"]
    screen.save_as(tmp_path / "screen.dcm")
    files = [tmp_path / "burned.dcm", tmp_path / "screen.dcm", pydicom_files / "SC_rgb_rle.dcm",
             pydicom_files / "MR_small.dcm"]
    res = deid.deidentify_files(files, tmp_path / "out", deid.Context(KEY, PATIENT, deid.load_profile()), {})
    reasons = dict(res.excluded)
    assert reasons["burned.dcm"] == "BurnedInAnnotation is YES"
    assert "SCREEN SAVE" in reasons["screen.dcm"]
    assert "Secondary Capture" in reasons["SC_rgb_rle.dcm"]
    assert [k[0] for k in res.kept] == ["MR_small.dcm"] and len(list((tmp_path / "out").iterdir())) == 1


def test_no_module_left_invalid_by_a_combined_code(pydicom_files, tmp_path):
    """What dciodvfy objected to: an overlay whose data the table removes goes whole, and an X/Z
    sequence with items (Referenced Study Sequence, Type 3) keeps them, de-identified, never
    becoming an empty Type 3 sequence."""
    ds = dcmread(pydicom_files / "examples_overlay.dcm")
    assert 0x60000010 in ds and 0x60003000 in ds  # Overlay Rows, Overlay Data (repeating group)
    ref = Dataset()
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = "1.2.840.10008.3.1.2.3.1", ds.StudyInstanceUID + ".9"
    ds.ReferencedStudySequence = Sequence([ref])
    ds.save_as(tmp_path / "overlay.dcm")
    res, hits, _ = _run([tmp_path / "overlay.dcm"], tmp_path / "out")
    assert hits == [] and len(res.kept) == 1
    out = dcmread(tmp_path / "out" / res.kept[0][1])
    assert not [e for e in out if 0x6000 <= e.tag.group <= 0x601E]
    assert len(out.ReferencedStudySequence) == 1
    assert out.ReferencedStudySequence[0].ReferencedSOPInstanceUID == deid.remap_uid(KEY, ref.ReferencedSOPInstanceUID)


def test_kept_attributes_keep_their_source_bytes(pydicom_files, tmp_path):
    """An attribute kept as it is (K, or not in the table) is written as the source wrote it,
    never decoded and re-encoded (pydicom's decoding was half of the time, bench/deid.py): an IS
    padded in front keeps its padding; what the profile removes goes, undecoded."""
    ds = dcmread(pydicom_files / "MR_small.dcm")
    ds.SeriesNumber = "7"
    ds.StudyDescription = "Leakyfamily study"  # X
    ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True).add_new(0x10, "LO", "Leakyfamily")
    ds.save_as(tmp_path / "src.dcm")
    raw = (tmp_path / "src.dcm").read_bytes()
    element = b"\x20\x00\x11\x00IS\x02\x007 "
    assert raw.count(element) == 1
    (tmp_path / "src.dcm").write_bytes(raw.replace(element, element[:-2] + b" 7"))
    res, hits, _ = _run([tmp_path / "src.dcm"], tmp_path / "out", profile=deid.load_profile(()))
    assert hits == [] and len(res.kept) == 1
    out = dcmread(tmp_path / "out" / res.kept[0][1])
    assert out.get_item(0x00200011).value == b" 7" and out.SeriesNumber == 7
    assert "StudyDescription" not in out and not [e for e in out if e.tag.is_private]


# --------------------------------------------------------------------------- in Dagster
@pytest.fixture
def share_root(demo_root, monkeypatch, tmp_path):
    cfg_path = demo_root / "global_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["deid"] = {"enabled": True}
    cfg_path.write_text(json.dumps(cfg))
    monkeypatch.setenv("DICOM_ASSETS_DEID_KEY", KEY.decode())
    monkeypatch.setenv("DICOM_ASSETS_DEID_MAP", str(tmp_path / "site" / "pseudonyms.tsv"))
    return demo_root


VISIT = "QPN001_ses-01"


def _materialize(instance, root, selection=None):
    from dagster import materialize

    from dicom_assets.defs.ingest import downloads, organized_dicoms, raw_dicoms
    from dicom_assets.defs.resources import DatasetResource
    from dicom_assets.defs.share import deid_profile, deidentified_dicoms, deidentified_tarball

    if VISIT not in instance.get_dynamic_partitions("visits"):
        instance.add_dynamic_partitions("visits", [VISIT])
    return materialize([downloads, deid_profile, raw_dicoms, organized_dicoms, deidentified_dicoms,
                        deidentified_tarball], partition_key=VISIT,
                       resources={"dataset": DatasetResource(root=str(root))}, instance=instance,
                       selection=selection, raise_on_error=False)


def _shared_tarball(root: Path, key: bytes = KEY) -> Path:
    pseudo = deid.pseudonym(key, PATIENT)
    return root / "share" / pseudo / f"{pseudo}_ses-01_dicom.tar"


def test_asset_and_its_blocking_check_in_dagster(share_root, instance, tmp_path):
    from .helpers import checks_of, metadata_of

    result = _materialize(instance, share_root)
    assert result.success
    assert checks_of(result)["no_identifying_value"] is True
    meta = metadata_of(result, "deidentified_dicoms")
    pseudo = deid.pseudonym(KEY, PATIENT)
    folder = share_root / "share" / pseudo / "ses-01"
    written = sorted(folder.iterdir())
    assert written and meta["files_kept"] == len(written) and meta["state"] == "placed in share/"
    assert meta["key_fingerprint"] == deid.key_fingerprint(KEY) and "2024b" in meta["standard_edition"]
    shown = json.dumps({k: str(v) for k, v in meta.items()}) + (share_root / "logs/deid" / f"{VISIT}.json").read_text()
    assert KEY.decode() not in shown and pseudo not in shown  # the map is only where the site says
    assert not list((share_root / "share").rglob("*QPN001*"))
    assert (tmp_path / "site" / "pseudonyms.tsv").read_text().splitlines()[1].split("\t")[:2] == [PATIENT, pseudo]
    assert dcmread(written[0]).PatientID == pseudo and meta["pixel_data_changed"] == 0

    # a source value the standard keeps (an attribute not in its table) holding the patient's name:
    # the check fails, names where, and nothing stays in share/
    organized = share_root / "dicom" / "ses-01" / "QPN001"
    victim = sorted(organized.iterdir())[0].resolve()
    ds = dcmread(victim)
    name = str(ds.PatientName) or "Leakyfamily"
    ds.PatientName = name
    ds.Manufacturer = f"made for {name}"
    ds.save_as(victim)
    again = _materialize(instance, share_root, selection=["deidentified_dicoms"])
    evaluation = next(ev for ev in again.get_asset_check_evaluations())
    assert not evaluation.passed
    paths = {r.data["path"] for r in evaluation.metadata["hit_paths"].value.records}
    assert "Manufacturer" in paths
    assert not folder.exists() and not _shared_tarball(share_root).exists()  # share/ holds only checked copies


def test_off_by_default_nothing_shared(demo_root, instance, monkeypatch):
    from .helpers import checks_of

    monkeypatch.delenv("DICOM_ASSETS_DEID_KEY", raising=False)
    result = _materialize(instance, demo_root)
    assert result.success
    assert "deidentified_dicoms" not in {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert checks_of(result)["no_identifying_value"] is True
    assert not (demo_root / "share").exists()


def test_the_config_the_key_and_the_runs_the_sensor_requests(demo_root, monkeypatch):
    from dicom_assets.core.config import parse_config
    from dicom_assets.core.errors import ConfigError
    from dicom_assets.core.layout import DatasetLayout
    from dicom_assets.defs.sensors import run_selection
    from dicom_assets.settings import current

    base = {"dataset_name": "d", "study_id": "S", "sessions": ["ses-01"]}
    assert parse_config(base).deid.enabled is False
    with pytest.raises(ConfigError, match="deid.options.*'retain_everything'"):
        parse_config({**base, "deid": {"options": ["retain_everything"]}})
    with pytest.raises(ConfigError, match=r"deid.safe_private.group' \('0018'\) must be an odd group"):
        parse_config({**base, "deid": {"safe_private": [{"group": "0018", "creator": "X", "element": "0C"}]}})
    with pytest.raises(deid.DeidError, match="DICOM_ASSETS_DEID_KEY is not set"):
        deid.check_key(None)
    with pytest.raises(deid.DeidError, match="shorter than 16"):
        deid.check_key("short")
    monkeypatch.setenv("DICOM_ASSETS_DEID_KEY", KEY.decode())
    assert KEY.decode() not in repr(current()) and current().deid_key.get_secret_value() == KEY.decode()

    lay = DatasetLayout(demo_root)
    assert "deidentified_dicoms" not in {k.to_user_string() for k in run_selection(lay)}
    cfg = json.loads(lay.config_path.read_text())
    lay.config_path.write_text(json.dumps({**cfg, "deid": {"enabled": True}}))
    assert "deidentified_dicoms" in {k.to_user_string() for k in run_selection(lay)}


@pytest.mark.slow
def test_the_shared_tarball_is_reproducible_and_names_no_one(share_root, instance, monkeypatch):
    """``deidentified_tarball``: the shared folder as a TAR written like the visit tarball (mtimes
    from the copies' shifted dates), the same bytes from the same key, nothing in common with
    another key's, and its metadata names neither the pseudonym nor the participant."""
    import tarfile

    from dicom_assets.core.tarball import parse_da_tm

    from .helpers import metadata_of

    result = _materialize(instance, share_root)
    assert result.success
    tar = _shared_tarball(share_root)
    folder = tar.parent / "ses-01"
    data = tar.read_bytes()
    meta = metadata_of(result, "deidentified_tarball")
    files = sorted(folder.iterdir())
    assert meta["size"] == len(data) and meta["md5"] == hashlib.md5(data).hexdigest()
    assert meta["members"] == len(files) == metadata_of(result, "deidentified_dicoms")["files_kept"]
    pseudo = deid.pseudonym(KEY, PATIENT)
    shown = json.dumps({k: str(v) for k, v in meta.items()})
    assert pseudo not in shown and PATIENT not in shown and KEY.decode() not in shown

    with tarfile.open(tar) as tf:
        members = tf.getmembers()
        assert [m.name for m in members] == [f"{pseudo}_ses-01"] + [f"{pseudo}_ses-01/{p.name}" for p in files]
        for m, p in zip(members[1:], files):
            assert tf.extractfile(m).read() == p.read_bytes()
            ds = dcmread(p, stop_before_pixels=True)
            assert m.mtime == parse_da_tm(ds.StudyDate, ds.StudyTime)  # the shifted date, not the source's
            assert (m.uid, m.gid, m.uname, m.mode) == (0, 0, "root", 0o644)
    source = dcmread(next((share_root / "dicom" / "ses-01" / "QPN001").iterdir()), stop_before_pixels=True)
    assert members[1].mtime < parse_da_tm(source.StudyDate, source.StudyTime) - 364 * 86400

    # made again from nothing with the same key: the same bytes
    import shutil
    shutil.rmtree(share_root / "share")
    assert _materialize(instance, share_root, selection=["deidentified_dicoms", "deidentified_tarball"]).success
    assert tar.read_bytes() == data
    # another key: another pseudonym, and no member name in common
    monkeypatch.setenv("DICOM_ASSETS_DEID_KEY", OTHER_KEY.decode())
    assert _materialize(instance, share_root, selection=["deidentified_dicoms", "deidentified_tarball"]).success
    other = _shared_tarball(share_root, OTHER_KEY)
    with tarfile.open(tar) as a, tarfile.open(other) as b:
        assert not set(a.getnames()) & set(b.getnames())


@pytest.mark.slow
def test_changed_options_or_key_show_the_copy_stale(share_root, instance, monkeypatch):
    """The options, the safe list and the key are configuration, not code: ``deid_profile`` is
    observed (by the downloads sensor's tick) with their version, and the UI shows every copy
    made before as stale, naming it; a run made with the new profile is fresh again."""
    from dicom_assets.definitions import downloads_sensor
    from dicom_assets.defs.lineage import observed_version
    from dicom_assets.defs.resources import DatasetResource
    from dicom_assets.defs.share import DEID_PROFILE

    from .helpers import Ticker
    from .test_lineage import ui

    ticker = Ticker(instance, downloads_sensor, {"dataset": DatasetResource(root=str(share_root))})
    assert _materialize(instance, share_root).success
    ticker.tick()  # the sensor sees the profile it was made with: nothing to observe
    with ui(instance) as view:
        assert view("deidentified_dicoms")["status"] == view("deidentified_tarball")["status"] == "FRESH"
    first = observed_version(instance, DEID_PROFILE)  # recorded by the run, with what it used
    assert first and first.startswith("deid-")

    cfg_path = share_root / "global_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["deid"]["options"] = [o for o in deid.DEFAULT_OPTIONS if o != "clean_descriptors"]
    cfg_path.write_text(json.dumps(cfg))
    ticker.tick()
    assert observed_version(instance, DEID_PROFILE) != first
    with ui(instance) as view:
        copy_ = view("deidentified_dicoms")
        assert copy_["status"] == "STALE" and copy_["causes"] == [("deid_profile", "has a new data version", None)]

    # the options changed back and the copy made again before any tick: the run itself records
    # the profile it used, so the UI shows it fresh at once (and the next tick observes nothing)
    cfg["deid"]["options"] = list(deid.DEFAULT_OPTIONS)
    cfg_path.write_text(json.dumps(cfg))
    assert _materialize(instance, share_root, selection=["deidentified_dicoms", "deidentified_tarball"]).success
    assert observed_version(instance, DEID_PROFILE) == first
    with ui(instance) as view:
        assert view("deidentified_dicoms")["status"] == view("deidentified_tarball")["status"] == "FRESH"
    assert not [e for e in ticker.tick().asset_events or [] if e.asset_key.to_user_string() == "deid_profile"]

    # another key: stale too (its fingerprint is in the version, never the key)
    monkeypatch.setenv("DICOM_ASSETS_DEID_KEY", OTHER_KEY.decode())
    events = [e for e in ticker.tick().asset_events if e.asset_key.to_user_string() == "deid_profile"]
    assert len(events) == 1 and KEY.decode() not in str(events[0]) and OTHER_KEY.decode() not in str(events[0])
    with ui(instance) as view:
        assert view("deidentified_dicoms")["status"] == "STALE"


def _demo_key() -> str:
    """The demo key scripts/demo-servers.sh sets when DICOM_ASSETS_DEID_KEY is unset."""
    import re

    script = (Path(__file__).parents[1] / "scripts" / "demo-servers.sh").read_text()
    return re.search(r'DICOM_ASSETS_DEID_KEY="\$\{DICOM_ASSETS_DEID_KEY:-([^}]+)\}"', script).group(1)


@pytest.mark.slow
def test_the_demo_run_shares_the_visit(samples, tmp_path, instance, monkeypatch):
    """``make demo``'s dataset (``dicom-assets demo-data``: deid on) with the demo key: the run the
    downloads sensor requests succeeds, and the visit's copy and tarball are in share/, checked."""
    from dicom_assets.core.ids import Visit
    from dicom_assets.core.layout import DatasetLayout
    from dicom_assets.definitions import build_definitions
    from dicom_assets.defs.sensors import run_selection
    from dicom_assets.testing.demo import build_demo_dataset

    from .helpers import checks_of

    key = _demo_key()
    assert "DEMO" in key and len(key) >= deid.MIN_KEY_CHARS
    monkeypatch.setenv("DICOM_ASSETS_DEID_KEY", key)
    monkeypatch.setenv("DICOM_ASSETS_DEID_MAP", str(tmp_path / "pseudonyms.tsv"))
    monkeypatch.delenv("XNAT_HOST", raising=False)
    root = build_demo_dataset(tmp_path / "dataset", samples, share=True)
    lay = DatasetLayout(root)
    selection = run_selection(lay)
    assert {"deidentified_dicoms", "deidentified_tarball"} <= {k.to_user_string() for k in selection}
    instance.add_dynamic_partitions("visits", [VISIT])
    job = build_definitions(str(root)).resolve_job_def("visit_chain")
    result = job.execute_in_process(partition_key=VISIT, instance=instance, asset_selection=selection)
    assert result.success
    assert checks_of(result)["no_identifying_value"] is True
    pseudo = deid.pseudonym(key.encode(), PATIENT)
    assert (root / "share" / pseudo / f"{pseudo}_ses-01_dicom.tar").is_file()
    copies = list((root / "share" / pseudo / "ses-01").iterdir())
    assert len(copies) == len(list(lay.dicom_dir(Visit(PATIENT, "ses-01")).iterdir()))
    # the Siemens safe list of the demo kept what dcm2niix needs, and nothing else private
    kept = {f"({e.tag.group:04X},{e.tag.element & 0xFF:02X})" for p in copies for e in dcmread(p) if e.tag.is_private
            and e.tag.element >= 0x1000}
    assert kept and kept <= {f"({s['group']},{s['element']})" for s in deid.DCM2NIIX_SIEMENS_SAFE_PRIVATE}


def test_observe_deid_profile_gives_the_version_of_the_config_and_key(share_root, instance, monkeypatch):
    """*Observe* on ``deid_profile`` (the UI's button runs this job): the version of the options,
    safe list and key in use, never the key; ``off`` while deid is off."""
    from dagster import Definitions

    from dicom_assets.defs.lineage import observed_version
    from dicom_assets.defs.resources import DatasetResource
    from dicom_assets.defs.share import DEID_PROFILE, deid_profile

    def observe(root):
        defs = Definitions(assets=[deid_profile], resources={"dataset": DatasetResource(root=str(root))})
        job = defs.resolve_implicit_global_asset_job_def()
        assert job.execute_in_process(instance=instance, asset_selection=[DEID_PROFILE]).success
        return observed_version(instance, DEID_PROFILE)

    expected = deid.share_version(deid.load_profile(), (), deid.key_fingerprint(KEY))
    assert observe(share_root) == expected and KEY.decode() not in expected
    monkeypatch.setenv("DICOM_ASSETS_DEID_KEY", OTHER_KEY.decode())
    assert observe(share_root) == deid.share_version(deid.load_profile(), (), deid.key_fingerprint(OTHER_KEY))
    cfg_path = share_root / "global_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "deid": {"enabled": False}}))
    assert observe(share_root) == "off"
