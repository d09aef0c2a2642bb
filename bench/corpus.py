"""Benchmark corpora made of real files.

``build_real_corpus``: a visit of real GE MR files as the scanner wrote them (the 10-series
session of the xnat 0.8.1 sdist: 325 files of about 130 KiB, 256 x 256 16-bit images), copied
round-robin up to ``n_files``. Each copy gets new SOPInstanceUID / SeriesInstanceUID (one new
series per source series and round), as ``testing.demo.build_corpus`` does, so organize keeps
every copy; the pixel data and the rest of the header stay as the scanner wrote them. The
256 KiB synthetic corpus hides the per-file overhead; this one shows it (issue 14).
"""

from __future__ import annotations

from pathlib import Path

from dicom_assets.testing.demo import _uid, rewrite_dicom
from dicom_assets.testing.samples import Samples


def real_ge_files(samples: Samples) -> list[Path]:
    """Every DICOM of the GE MR session (Case001), sorted by series folder then name."""
    scans = samples.xnat_case001 / "scans"
    return sorted(p for p in scans.glob("*/DICOM/*") if p.is_file())


def build_real_corpus(out: Path | str, samples: Samples, *, n_files: int = 2000, seed: int = 0,
                      participant: str = "REAL_001") -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sources = real_ge_files(samples)
    study_uid = _uid(seed, participant, "real-study")
    for k in range(n_files):
        src = sources[k % len(sources)]
        rnd = k // len(sources)
        folder = src.parent.parent.name  # "<number>_<description>"
        number = int(folder.split("_", 1)[0])
        series_uid = _uid(study_uid, folder, rnd)
        s = number + 100 * rnd
        data = rewrite_dicom(
            src, patient_id=participant, patient_name=f"real^{participant}", study_uid=study_uid,
            series_uid=series_uid, sop_uid=_uid(series_uid, src.name), series_number=s,
            series_description=f"{folder.split('_', 1)[1]} {rnd}", instance_number=k % len(sources) + 1,
            study_date="20240304", study_time="101010.500000",
        )
        path = out / f"series_{s:03d}" / f"IM{k:05d}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return out
