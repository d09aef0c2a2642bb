"""Hostile configuration and tables (issue 25, items 7, 8 and 12): each ends in the whole data
or a named refusal, never a raw traceback, a format string reading Python objects, unbounded
memory, or a spreadsheet formula."""

from __future__ import annotations

import json
import re

import pytest

from dicom_assets.core.config import MAX_LABEL_WIDTH, label_pattern_problem, load_config
from dicom_assets.core.curation import COLUMNS, _line
from dicom_assets.core.downloads import read_dicom_dir_map
from dicom_assets.core.errors import ConfigError, DownloadError

GOOD = {"dataset_name": "demo", "study_id": "QPN", "sessions": ["ses-01"], "xnat_project": "QPN_X"}


@pytest.mark.faults
@pytest.mark.parametrize("encoding", ["utf-16", "utf-8-sig", "utf-32"])
def test_config_saved_as_utf16_or_with_a_bom_loads(tmp_path, encoding):
    """RFC 8259 readers accept UTF-16/32 JSON; an editor on Windows saves it so."""
    p = tmp_path / "global_config.json"
    p.write_bytes(json.dumps(GOOD).encode(encoding))
    assert load_config(p).study_id == "QPN"


@pytest.mark.faults
def test_config_in_another_encoding_is_named(tmp_path):
    p = tmp_path / "global_config.json"
    p.write_bytes('{"dataset_name": "d\xe9mo", "study_id": "QPN"}'.encode("latin-1"))
    with pytest.raises(ConfigError, match="global_config.json: not UTF-8 .*save the global config as UTF-8"):
        load_config(p)


@pytest.mark.faults
@pytest.mark.parametrize("pattern,says", [
    ("{participant.__class__.__mro__}", "field {participant.__class__.__mro__} is not allowed"),
    ("{participant[0]}", "is not allowed"),
    ("{session!r}", "conversion !r is not allowed"),
    ("{participant:>999999999}", f"width 999999999 is over {MAX_LABEL_WIDTH}"),
    ("{participant:{session}}", "format spec"),
    ("{participant:.2f}", "format spec"),
    ("{visit}", "field {visit} is not allowed"),
    ("{participant", "expected '}'"),
])
def test_label_pattern_allows_only_its_fields_with_bounded_widths(tmp_path, pattern, says):
    assert says in label_pattern_problem(pattern)
    p = tmp_path / "global_config.json"
    p.write_text(json.dumps({**GOOD, "session_label_pattern": pattern}))
    with pytest.raises(ConfigError, match="session_label_pattern"):
        load_config(p)


@pytest.mark.parametrize("pattern", ["{participant}_{session}", "{participant:>8}-{session}", "{session:_<12}",
                                     "MR_{participant}"])
def test_label_patterns_a_site_writes_still_load(tmp_path, pattern):
    assert label_pattern_problem(pattern) is None
    p = tmp_path / "global_config.json"
    p.write_text(json.dumps({**GOOD, "session_label_pattern": pattern}))
    assert load_config(p).session_label_pattern == pattern


@pytest.mark.faults
def test_dir_map_row_missing_its_last_column_is_named(tmp_path):
    p = tmp_path / "dicom_dir_map.tsv"
    p.write_text("participant_id\tsession_id\tdownload\nQPN_001\t01\tQPN_001_MR.zip\nQPN_002\t01\n")
    with pytest.raises(DownloadError, match=r"dicom_dir_map.tsv: line 3: the row has no download column"):
        read_dicom_dir_map(p)


@pytest.mark.faults
@pytest.mark.parametrize("raw", ["=cmd|' /C calc'!A0", "+1+1", "-2+3", "@SUM(A1:A9)", "\t=1", "\r=1"])
def test_status_table_cells_never_start_a_formula(raw):
    import csv
    import io

    row = {"participant_id": raw, "session_id": "ses-01", "visit": "X_ses-01"}
    cells = next(csv.reader(io.StringIO(_line(row), newline=""), delimiter="\t"))
    assert len(cells) == len(COLUMNS) and cells[2] == "X_ses-01", cells  # one row, whatever the id holds
    assert not cells[0].startswith(("=", "+", "-", "@", "\t", "\r")) and raw.strip("\t\r") in cells[0]
    assert _line({"participant_id": "QPN_001"}).startswith("QPN_001")  # ordinary ids are left as they are


@pytest.mark.faults
def test_xnat_exclusions_of_an_empty_string_are_refused(tmp_path):
    from dicom_assets.core.xnat import XnatError, read_exclusions

    p = tmp_path / "exclusions.json"
    p.write_text(json.dumps({"Exclude": ["Localizers", ""]}))
    with pytest.raises(XnatError, match="an empty exclusion would exclude every series"):
        read_exclusions(p)


@pytest.mark.faults
@pytest.mark.parametrize("uid", ["../../etc/x", "a/b", "..", ".hidden"])
def test_files_named_from_a_hostile_uid_are_refused_before_sending(tmp_path, uid):
    """The classic-tree CLI names zip members from the file's SOPInstanceUID: one read from a
    hostile header must not become a path; nothing is sent (no XNAT is even contacted)."""
    from dicom_assets.core.xnat import UploadFile, XnatError, upload_visit

    f = tmp_path / "x.dcm"
    f.write_bytes(b"\0" * 132)
    files = [UploadFile(f, f"{uid}.dcm" if uid != ".." else "..", uid, 1, "T1", "1.2.3", "1.2.3.4")]
    with pytest.raises(XnatError, match="no plain file name"):
        upload_visit(object(), server="http://127.0.0.1:9", project="P", subject="S", session_label="V",
                     files=files, excluded=[], metadata_files=[])


def _dcm2bids_config(tmp_path, **extra):
    from dicom_assets.testing.demo import DEMO_DCM2BIDS_CONFIG

    p = tmp_path / "dcm2bids_config.json"
    p.write_text(json.dumps({**DEMO_DCM2BIDS_CONFIG, **extra}))
    return p


@pytest.mark.faults
def test_dcm2bids_post_op_runs_nothing_unless_the_site_allows_it(tmp_path):
    """dcm2bids' post_op runs a command on the converted files: refused in the config unless
    global_config.json says bids_allow_post_op."""
    from dicom_assets.core.bids import BidsConfigError, load_dcm2bids_config

    p = _dcm2bids_config(tmp_path, post_op=[{"cmd": "touch /tmp/pwned src_file dst_file",
                                              "datatype": "anat", "suffix": ["T1w"]}])
    with pytest.raises(BidsConfigError, match="'post_op' runs commands .* \"bids_allow_post_op\": true"):
        load_dcm2bids_config(p)
    assert "post_op" in load_dcm2bids_config(p, allow_post_op=True).data
    cfg = tmp_path / "global_config.json"
    cfg.write_text(json.dumps({**GOOD, "bids_allow_post_op": True}))
    assert load_config(cfg).bids_allow_post_op is True
    cfg.write_text(json.dumps(GOOD))
    assert load_config(cfg).bids_allow_post_op is False


@pytest.mark.faults
@pytest.mark.parametrize("name", ["%p/%s", "../%s", "/tmp/%s", ".."])
def test_dcm2niix_output_name_that_is_a_path_is_refused(tmp_path, name):
    from dicom_assets.core.bids import BidsConfigError, load_dcm2bids_config

    p = _dcm2bids_config(tmp_path, dcm2niixOptions=f"-b y -z y -f {name}")
    with pytest.raises(BidsConfigError, match=f"'dcm2niixOptions' has '-f {re.escape(name)}'"):
        load_dcm2bids_config(p)


@pytest.mark.parametrize("date,time,want", [
    ("00000000", "000000", None), ("20241399", "120000", None), ("20240229", "250000", None),
    ("20240422", "082410.5", "2024-04-22T08:24:10"),
])
def test_an_unknown_study_date_gives_no_acq_time(tmp_path, samples, date, time, want):
    """acq_time 0000-00-00 failed the blocking BIDS validation: an unknown date is left out."""
    import pydicom

    from dicom_assets.core.bids import acq_time_of

    src = next(samples.root.rglob("*.dcm"))
    ds = pydicom.dcmread(src, force=True)
    ds.StudyDate, ds.StudyTime = date, time
    out = tmp_path / "x.dcm"
    ds.save_as(out)
    assert acq_time_of(out) == want


@pytest.mark.faults
def test_a_preambleless_dicom_starting_at_its_sop_class_is_described_too(samples, tmp_path):
    """Issue 25, item 4: a preamble-less file whose first element is (0008,0016) was kept by
    organize but left out of metadata_dicoms.json (the metadata reader had its own test of what is
    DICOM), and the count check stopped the visit naming no file. One test for both stages."""
    import io

    import pydicom

    from dicom_assets.core.dicomscan import Rules
    from dicom_assets.core.metadata import describe_tarball
    from dicom_assets.core.organize import organize_visit, read_kept
    from dicom_assets.core.tarball import organized_files, write_tarball

    src = sorted((samples.xnat_case001 / "scans").glob("2_*/DICOM/*.dcm"))[0]
    ds = pydicom.dcmread(src)
    for kw in ("SpecificCharacterSet", "ImageType", "InstanceCreationDate", "InstanceCreationTime"):
        if kw in ds:
            delattr(ds, kw)
    assert ds[next(iter(ds.keys()))].tag == 0x00080016  # the data set starts at SOPClassUID
    ds.preamble, ds.file_meta = None, pydicom.dataset.FileMetaDataset()
    buf = io.BytesIO()
    pydicom.filewriter.dcmwrite(buf, ds, enforce_file_format=False, implicit_vr=True, little_endian=True)
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "IM0001").write_bytes(buf.getvalue())
    report = tmp_path / "files.tsv"
    result = organize_visit("P_ses-01", raw, tmp_path / "dicom", Rules(), report_path=report)
    assert [r.reason for r in result.records] == ["kept"]
    tar = write_tarball(organized_files(tmp_path / "dicom", expected=read_kept(report)), tmp_path / "V_dicom.tar", "V")
    meta = describe_tarball(tar.path, visit="V", study="S", participant="P", session="ses-01", tool_version="0")
    assert [d["SOPInstanceUID"] for d in meta.dicoms] == [str(ds.SOPInstanceUID)]
