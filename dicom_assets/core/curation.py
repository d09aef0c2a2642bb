"""``tabular/curation_status.tsv``: how far each visit of the manifest got, as nipoppy
users know it. Recomputed from the dataset root itself (so it is never out of step with
the files), written atomically under a lock so concurrent runs cannot interleave.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from .downloads import read_dicom_dir_map, scan_downloads
from .fsutil import atomic_write, file_lock
from .layout import Dataset

COLUMNS = ("participant_id", "session_id", "visit", "in_downloads", "in_raw_dicoms", "in_organized",
           "in_store", "in_datalad", "in_xnat")


def _nonempty_dir(path: Path) -> bool:
    try:
        with os.scandir(path) as it:
            return any(True for _ in it)
    except (FileNotFoundError, NotADirectoryError):
        return False


def xnat_marker_path(dataset: Dataset, visit_key: str) -> Path:
    return dataset.layout.logs_dir / "xnat" / f"{visit_key}.json"


def compute_status(dataset: Dataset) -> list[dict]:
    lay, study = dataset.layout, dataset.study
    participants = set(dataset.manifest.participants)
    dir_map = read_dicom_dir_map(lay.dicom_dir_map_path)
    # one scan of downloads/ for all visits, not one per visit
    downloaded = {s.visit for s in scan_downloads(lay.downloads_root, dataset.config.sessions, participants, dir_map)}
    rows = []
    for visit, raw_id in zip(dataset.manifest.visits, dataset.manifest.table["participant_id"]):
        rows.append({
            "participant_id": raw_id,
            "session_id": visit.session,
            "visit": visit.key,
            "in_downloads": visit in downloaded,
            "in_raw_dicoms": _nonempty_dir(lay.raw_dir(visit)),
            "in_organized": _nonempty_dir(lay.dicom_dir(visit)),
            "in_store": lay.tarball_path(study, visit).is_file()
            and lay.metadata_tarball_path(study, visit).is_file()
            and lay.metadata_dicoms_path(study, visit).is_file(),
            "in_datalad": (lay.datalad_dir(study, visit) / ".datalad").is_dir(),
            "in_xnat": xnat_marker_path(dataset, visit.key).is_file(),
        })
    return rows


def update_curation_status(dataset: Dataset) -> Path:
    path = dataset.layout.curation_status_path
    with file_lock(path.with_name(".curation_status.lock")):
        rows = compute_status(dataset)
        with atomic_write(path, newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=COLUMNS, delimiter="\t", lineterminator="\n")
            w.writeheader()
            for r in rows:
                w.writerow({k: (str(v).lower() if isinstance(v, bool) else v) for k, v in r.items()})
    return path
