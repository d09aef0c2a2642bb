import pytest

from dicom_assets.core.errors import ManifestError
from dicom_assets.core.ids import Visit
from dicom_assets.core.manifest import read_manifest


def write(tmp_path, text):
    p = tmp_path / "manifest.csv"
    p.write_text(text)
    return p


def test_manifest_normalizes_ids(tmp_path):
    m = read_manifest(write(tmp_path, "participant_id,visit_id,session_id,datatype\n"
                                      "QPN_001,01,ses-01,anat\nQPN_001,02,02,anat\nMNI-7,01,ses-01,\n"))
    assert m.participants == {"QPN001": "QPN_001", "MNI7": "MNI-7"}
    assert Visit("QPN001", "ses-02") in m.visits
    assert m.has_visit(Visit("MNI7", "ses-01"))
    assert not m.has_visit(Visit("MNI7", "ses-02"))


@pytest.mark.faults
def test_two_ids_normalizing_alike_is_an_error(tmp_path):
    p = write(tmp_path, "participant_id,session_id\nQPN_001,ses-01\nQPN-001,ses-01\n")
    with pytest.raises(ManifestError, match=r"ids 'QPN-001', 'QPN_001' all normalize to 'QPN001'|"
                                            r"ids 'QPN_001', 'QPN-001' all normalize to 'QPN001'"):
        read_manifest(p)


@pytest.mark.faults
def test_missing_file(tmp_path):
    with pytest.raises(ManifestError, match="participant manifest not found"):
        read_manifest(tmp_path / "nope.csv")


@pytest.mark.faults
def test_unknown_session_names_line(tmp_path):
    p = write(tmp_path, "participant_id,session_id\nA,ses-01\nB,ses-09\n")
    with pytest.raises(ManifestError, match="line 3: column 'session_id': session 'ses-09' is not one of"):
        read_manifest(p, sessions=("ses-01",))


@pytest.mark.faults
@pytest.mark.parametrize("text, message", [
    ("participant_id,visit\nA,1\n", "missing column\\(s\\) session_id"),
    ("participant_id,session_id\n__,ses-01\n", "line 2: column 'participant_id'"),
    ("participant_id,session_id\nA,ses-01\nA,01\n", "listed more than once"),
], ids=["missing-column", "empty-participant", "duplicate-visit"])
def test_bad_manifest_content_is_named(tmp_path, text, message):
    with pytest.raises(ManifestError, match=message):
        read_manifest(write(tmp_path, text))
