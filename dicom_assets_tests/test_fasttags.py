"""The fast header reader agrees with pydicom on every real sample file."""

import warnings

import pytest

from dicom_assets.core.fasttags import parse_tags, read_tags_pydicom, scan_header


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


def test_deflated_data_set_is_inflated_and_read_like_pydicom(samples):
    """The deflated transfer syntax: the fast reader scans the inflated data set (pixel data
    element included) and agrees with pydicom's tags."""
    import io

    from dicom_assets.core.fasttags import deflated_dataset, scan_dataset

    p = samples.pydicom_files / "image_dfl.dcm"
    data = p.read_bytes()
    assert scan_header(data, len(data)) is None  # the compressed stream is never parsed as elements
    inflated = deflated_dataset(data, io.BytesIO(data))
    scan = scan_dataset(inflated.data, inflated.media_sop_class)
    assert scan.has_pixels and scan.pixel_value_start + scan.pixel_length <= len(inflated.data)
    assert scan.tags == read_tags_pydicom(p)
    assert deflated_dataset((samples.pydicom_files / "MR_small.dcm").read_bytes(), None) is None  # not deflated


@pytest.mark.faults
@pytest.mark.parametrize("damage", ["cut", "corrupt", "bomb"])
def test_deflate_damage_is_a_clear_error(samples, monkeypatch, damage):
    import io
    import zlib

    from dicom_assets.core import fasttags

    data = (samples.pydicom_files / "image_dfl.dcm").read_bytes()
    _ts, _media, start = fasttags._meta(data)
    if damage == "cut":
        data = data[:-50]
    elif damage == "corrupt":
        data = data[: start + 10] + bytes(b ^ 0x5A for b in data[start + 10: start + 30]) + data[start + 30:]
    else:  # a small file that would inflate to 4 MiB of zeros, against a 1 MiB limit
        z = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        data = data[:start] + z.compress(bytes(4 << 20)) + z.flush()
        monkeypatch.setattr(fasttags, "MAX_INFLATED", 1 << 20)
    with pytest.raises(fasttags.InflateError, match={"cut": "cut short", "corrupt": "corrupt",
                                                     "bomb": "inflates past 1 MiB"}[damage]):
        fasttags.deflated_dataset(data, io.BytesIO(data))
