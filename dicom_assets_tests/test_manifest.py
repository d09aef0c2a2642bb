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


# ------------------------------------------------------------ issue 13: strict parsing, the line named
@pytest.mark.faults
def test_row_with_one_field_too_many_is_an_error_not_a_shift(tmp_path):
    """pandas took the extra leading field as the index: every column shifted, silently
    (participant 'ses-01', session 'anat' ...)."""
    p = write(tmp_path, "participant_id,session_id,datatype\nQPN_001,ses-01,anat\nX,QPN_002,ses-01,anat\n")
    with pytest.raises(ManifestError, match=r"manifest\.csv: line 3: 4 field\(s\) where the header has 3 "
                                            r"\(participant_id, session_id, datatype\)"):
        read_manifest(p)


@pytest.mark.faults
@pytest.mark.parametrize("data, message", [
    (b"participant_id,session_id,datatype\nA,ses-01\n", r"line 2: 2 field\(s\) where the header has 3"),
    (b"participant_id,session_id\nA,ses-01\n\"B,ses-01\n", r"line 3: not a well-formed CSV row"),
    (b"participant_id,session_id\nA,ses-01\nB\x00,ses-01\n", r"line 3: a NUL byte"),
    (b"participant_id,session_id\nA,ses-01\n\xff\xfe,ses-01\n", r"line 3: not UTF-8 text"),
    (b"participant_id,session_id,session_id\nA,ses-01,ses-02\n", r"line 1: column 'session_id' appears twice"),
    (b"", r"the participant manifest is empty"),
    (b"participant_id,session_id\nA,ses-01\n\nA,01\n", r"line 4: participant 'A' session '01' is listed more "
                                                       r"than once \(first on line 2\)"),
], ids=["short-row", "open-quote", "nul", "not-utf8", "column-twice", "empty", "duplicate-line"])
def test_malformed_csv_names_the_line(tmp_path, data, message):
    p = tmp_path / "manifest.csv"
    p.write_bytes(data)
    with pytest.raises(ManifestError, match=message):
        read_manifest(p)


def test_bom_quotes_and_blank_lines_are_fine(tmp_path):
    p = tmp_path / "manifest.csv"
    p.write_bytes(b'\xef\xbb\xbfparticipant_id,session_id,notes\r\n"QPN_001",ses-01,"two, fields\r\nand a line"\r\n'
                  b"\r\nQPN_002,ses-01,\r\n")
    m = read_manifest(p)
    assert m.participants == {"QPN001": "QPN_001", "QPN002": "QPN_002"}
    assert list(m.table["notes"]) == ["two, fields\r\nand a line", ""]
