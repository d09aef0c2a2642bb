"""The fast header reader agrees with pydicom on every real sample file."""

import warnings

import pytest

from dicom_assets.core.fasttags import parse_tags, read_tags_pydicom


def _all_dicom_like(samples):
    for p in sorted(samples.root.rglob("*")):
        if p.is_file() and p.suffix not in (".py", ".txt", ".json", ".xml", ".gz", ".bin", ".icc", ".dump"):
            yield p


def test_fast_reader_matches_pydicom(samples):
    compared = fallbacks = 0
    for p in _all_dicom_like(samples):
        data = p.read_bytes()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                expected = read_tags_pydicom(p)
            except Exception:
                continue
        got = parse_tags(data[: 1 << 20])
        if got is None:
            fallbacks += 1
            continue
        compared += 1
        assert got == expected, p
    assert compared > 400  # the GE session, heudiconv, nibabel, pydicom files
    assert fallbacks < compared


@pytest.mark.parametrize("cut", [10, 140, 400])
def test_cut_headers_ask_for_fallback(samples, cut):
    p = next((samples.xnat_case001 / "scans").glob("5_*/DICOM/*.dcm"))
    assert parse_tags(p.read_bytes()[:cut]) is None
