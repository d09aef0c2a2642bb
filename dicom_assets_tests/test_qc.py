"""The QC montage: one labelled tile per kept series, rendered from real pixel data."""

import numpy as np
from PIL import Image

from dicom_assets.core.qc import LABEL_H, TILE, SeriesImage, build_montage


def test_montage_has_a_tile_per_series_with_real_images(samples, tmp_path):
    series = [
        SeriesImage(3, "T1", sorted((samples.xnat_case001 / "scans").glob("5_*/DICOM/*.dcm"))[30]),
        SeriesImage(8, "mosaic", samples.heudiconv_data / "axasc35.dcm"),
        SeriesImage(11, "enhanced multi-frame", samples.heudiconv_data /
                    "MRI_102TD_PHA_S.MR.Chen_Matthews_1.3.1.2022.11.16.15.50.20.357.31204541.dcm"),
        SeriesImage(12, "jpeg-ls", samples.pydicom_files / "MR_small_jpeg_ls_lossless.dcm"),
    ]
    res = build_montage(series, tmp_path / "qc.png")
    img = np.asarray(Image.open(res.path))
    assert img.shape == (TILE + LABEL_H, 4 * TILE) and res.tiles == 4
    for i in range(3):  # the decodable ones show an image, not a blank tile
        tile = img[LABEL_H:, i * TILE:(i + 1) * TILE]
        assert tile.std() > 20, i
    try:
        import pydicom
        pydicom.dcmread(series[3].path).pixel_array
        decodable = True
    except Exception:
        decodable = False
    assert bool(res.notes) is not decodable  # an undecodable series is noted, not fatal
    if not decodable:
        assert "series 12 (jpeg-ls): not rendered" in res.notes[0]


def test_no_series_gives_no_picture(tmp_path):
    res = build_montage([], tmp_path / "qc.png")
    assert res.path is None and res.notes == ["no kept series to show"]
