"""``tabular/curation_status.tsv``: how far each visit of the manifest got, as nipoppy
users know it, read from the dataset root itself (so it is never out of step with the files)
and written atomically under a lock so concurrent runs cannot interleave.

Two ways to write it:

* :func:`update_visit_status` (each chain step): the visit's own row only. Its six
  per-visit columns are read from the visit's own paths (a few ``stat`` calls);
  ``in_downloads`` is kept from the row unless the step knows it (``raw_dicoms`` does). The
  row is spliced into the file's bytes: no scan of downloads/ or of the other visits, so a
  step costs the same at 100 visits as at 100,000 (a few ms of reading and writing the
  file, see bench/run.py). A file that is missing, has another header or lacks a row for a
  visit of the manifest (the manifest grew) is recomputed whole, once.
* :func:`update_curation_status` (``dicom-assets status ROOT``): every row recomputed.

Rows: every visit of the manifest, then every visit of a resolved TCIA manifest
(``participant_id`` is TCIA's PatientID; ``in_downloads``: all its series zips are there), as
:func:`core.sources.visit_source` tells a visit's source.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from .dataset import Dataset
from .dicomnode import node_zips
from .downloads import read_dicom_dir_map, scan_downloads
from .fsutil import atomic_write, file_lock, printable
from .sources import tcia_visits, visit_source

COLUMNS = ("participant_id", "session_id", "visit", "in_downloads", "in_raw_dicoms", "in_organized",
           "in_store", "in_datalad", "in_xnat", "in_bids")


def _nonempty_dir(path: Path) -> bool:
    try:
        with os.scandir(path) as it:
            return any(True for _ in it)
    except (FileNotFoundError, NotADirectoryError):
        return False


def visit_row(dataset: Dataset, visit, raw_id: str, in_downloads: bool) -> dict:
    """The row of one visit, from its own paths only."""
    lay, study = dataset.layout, dataset.study
    return {
        "participant_id": raw_id,
        "session_id": visit.session,
        "visit": visit.key,
        "in_downloads": in_downloads,
        "in_raw_dicoms": _nonempty_dir(lay.raw_dir(visit)),
        "in_organized": _nonempty_dir(lay.dicom_dir(visit)),
        "in_store": lay.tarball_path(study, visit).is_file()
        and lay.metadata_tarball_path(study, visit).is_file()
        and lay.metadata_dicoms_path(study, visit).is_file(),
        "in_datalad": lay.datalad_marker_path(study, visit).is_dir(),
        "in_xnat": lay.xnat_marker_path(visit.key).is_file(),
        "in_bids": _nonempty_dir(lay.bids_session_dir(visit)),
    }


def compute_status(dataset: Dataset) -> list[dict]:
    lay = dataset.layout
    participants = set(dataset.manifest.participants)
    dir_map = read_dicom_dir_map(lay.dicom_dir_map_path)
    # one scan of downloads/ for all visits, not one per visit
    downloaded = {s.visit for s in scan_downloads(lay, dataset.config.sessions, participants, dir_map)}
    # and the visits the DICOM node sent a study for: one listing of downloads/dicom_node/
    try:
        node = {p.name for p in lay.dicom_node_root.iterdir() if node_zips(p)}
    except OSError:
        node = set()
    downloaded |= {v for v in dataset.manifest.visits if v.key in node}
    tcia = tcia_visits(lay)
    rows = [visit_row(dataset, visit, raw_id, visit in downloaded)
            for visit, raw_id in zip(dataset.manifest.visits, dataset.manifest.table["participant_id"])
            if visit.key not in tcia]  # a TCIA visit of the same key wins, as in the assets
    for key in sorted(tcia):
        source = visit_source(dataset, key, tcia=tcia)
        rows.append(visit_row(dataset, source.visit, source.raw_participant, not source.missing_zips()))
    return rows


#: a cell a spreadsheet would run as a formula starts with one of these (OWASP, CSV injection)
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _cell(value) -> str:
    """A value as the table shows it: booleans as ``true``/``false``; control characters written
    ``\\xNN`` (``fsutil.printable``); a text a spreadsheet would take for a formula (a raw
    participant id ``=cmd|...``) prefixed with ``'``, as OWASP advises, so opening the status
    table never runs anything."""
    if isinstance(value, bool):
        return str(value).lower()
    text = printable("" if value is None else str(value))  # one line: a CR or LF would split the row
    return "'" + text if text.startswith(FORMULA_STARTS) else text


def _line(row: dict) -> str:
    buf = io.StringIO()
    csv.DictWriter(buf, fieldnames=COLUMNS, delimiter="\t", lineterminator="\n").writerow(
        {k: _cell(v) for k, v in row.items()})
    return buf.getvalue()


_HEADER = ("\t".join(COLUMNS) + "\n").encode("utf-8")


def _write_all(dataset: Dataset, path: Path) -> None:
    rows = compute_status(dataset)
    with atomic_write(path, "wb") as fh:
        fh.write(_HEADER + "".join(_line(r) for r in rows).encode("utf-8"))


def update_curation_status(dataset: Dataset) -> Path:
    """Every row recomputed (``dicom-assets status ROOT``): scans downloads/ once and every visit."""
    path = dataset.layout.curation_status_path
    with file_lock(dataset.layout.curation_lock_path):
        _write_all(dataset, path)
    return path


def _find_row(data: bytes, key: str) -> tuple[int, int] | None:
    """Start and end (after the newline) of the row whose ``visit`` column is ``key``."""
    needle = b"\t" + key.encode("utf-8") + b"\t"
    at = data.find(needle)
    while at >= 0:
        start = data.rfind(b"\n", 0, at) + 1
        end = data.find(b"\n", at)
        end = len(data) if end < 0 else end + 1
        fields = next(csv.reader([data[start:end].decode("utf-8")], delimiter="\t"), [])
        if len(fields) == len(COLUMNS) and fields[2] == key:
            return start, end
        at = data.find(needle, at + 1)
    return None


def update_visit_status(dataset: Dataset, visit, *, in_downloads: bool | None = None) -> Path:
    """The row of one visit brought up to date (each chain step): O(1) in the number of
    visits, no scan. ``in_downloads`` is kept from the row unless given."""
    path = dataset.layout.curation_status_path
    with file_lock(dataset.layout.curation_lock_path):
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            data = b""
        current = data.startswith(_HEADER)
        found = _find_row(data, visit.key) if current else None
        if found is None:
            source = visit_source(dataset, visit) if current else None
            if source is None or source.kind == "dump":
                _write_all(dataset, path)  # no file yet, an old header, or the manifest grew
            elif source.kind == "tcia":  # a TCIA visit resolved since: its row appended
                keep = not source.missing_zips() if in_downloads is None else in_downloads
                line = _line(visit_row(dataset, visit, source.raw_participant, keep)).encode("utf-8")
                with atomic_write(path, "wb") as fh:
                    fh.write(data if data.endswith(b"\n") else data + b"\n")
                    fh.write(line)
            return path  # a visit of no source has no row
        start, end = found
        old = next(csv.DictReader([_HEADER.decode(), data[start:end].decode("utf-8")], delimiter="\t"))
        keep = old["in_downloads"] == "true" if in_downloads is None else in_downloads
        line = _line(visit_row(dataset, visit, old["participant_id"], keep)).encode("utf-8")
        if line != data[start:end]:
            with atomic_write(path, "wb") as fh:
                fh.write(data[:start])
                fh.write(line)
                fh.write(data[end:])
    return path
