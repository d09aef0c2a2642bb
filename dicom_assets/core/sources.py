"""Where a visit comes from: the one answer, used by the assets and the curation status.

A visit is either a **scanner dump** (a manifest visit; its items in ``downloads/<session>/``,
and the studies the DICOM node sent for it in ``downloads/dicom_node/<visit>/``)
or a **TCIA** visit (a visit of a resolved TCIA manifest, ``downloads/tcia/<name>/resolved.csv``;
its dump is the series zips, its XNAT subject TCIA's PatientID and its session label the
XNAT-TCIA one). A TCIA visit wins over a manifest visit of the same key, as before.

Each ``resolved.csv`` is read once per change of the file (its :func:`~.fsutil.file_token`: size,
mtime, inode), not at every question;
what the questions look up in the manifest (its visit keys, its participants' prefix index) is
built once per manifest read (``Manifest.has_visit``, ``Manifest.participant_index``), not once per visit.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from .dataset import Dataset
from .dicomnode import node_zips
from .downloads import DownloadItem, items_for_visit, read_dicom_dir_map
from .extract import item_folders
from .fsutil import NO_FILE, file_token
from .ids import Visit, parse_visit_key
from .layout import DatasetLayout
from .tcia import (
    TciaManifestError,
    TciaVisitSource,
    annotation_files,
    manifest_files,
    manifest_name,
    manifests,
    read_resolved,
)

DUMP, TCIA, UNKNOWN = "dump", "tcia", "unknown"

_lock = threading.Lock()
_resolved_cache: dict[str, tuple[str, list[dict]]] = {}


def _resolved_rows(path: Path) -> list[dict] | None:
    """The rows of one resolved.csv, re-read only when its file token (size, mtime, inode) changed."""
    sig = file_token(path)
    if sig == NO_FILE:
        return None
    with _lock:
        hit = _resolved_cache.get(str(path))
    if hit is not None and hit[0] == sig:
        return hit[1]
    rows = read_resolved(path)
    with _lock:
        _resolved_cache[str(path)] = (sig, rows)
    return rows


def tcia_visits(layout: DatasetLayout) -> dict[str, TciaVisitSource]:
    """Every visit of every resolved TCIA manifest, by visit key. A study whose series come in
    several manifests is one visit (its label is the study register's): its zips are those of
    every manifest, each series once (the first manifest's copy)."""
    by_visit: dict[str, dict[str, Path]] = {}
    first: dict[str, dict] = {}
    where: dict[str, list[tuple[Path, Path]]] = {}
    try:
        files = manifest_files(layout.tcia_root)
    except TciaManifestError:
        files = {manifest_name(m): m for m in manifests(layout.tcia_root)}
    for name, m in files.items():
        res = layout.tcia_resolved_path(name)
        for r in _resolved_rows(res) or ():
            v = r["visit"]
            first.setdefault(v, r)
            if (m, res) not in where.setdefault(v, []):
                where[v].append((m, res))
            by_visit.setdefault(v, {}).setdefault(r["SeriesInstanceUID"],
                                                 layout.tcia_series_zip(name, r["SeriesInstanceUID"]))
    return {v: TciaVisitSource(tuple(m for m, _ in where[v]), tuple(r for _, r in where[v]), first[v]["PatientID"],
                               first[v]["session_label"], tuple(zips[u] for u in sorted(zips)))
            for v, zips in by_visit.items()}


@dataclass(frozen=True)
class VisitSource:
    """A visit's source: ``kind`` is ``dump``, ``tcia`` or ``unknown`` (neither)."""

    visit: Visit
    kind: str
    subject: str                 # the XNAT subject (the participant; TCIA's PatientID)
    session_label: str           # the XNAT session label
    raw_participant: str | None  # the participant as the site (manifest) or TCIA names it
    tcia: TciaVisitSource | None = None

    @property
    def project_files(self) -> dict[str, list[Path]] | None:
        """Files kept as XNAT project resources (a TCIA visit: its manifest and resolved CSV)."""
        if not self.tcia:
            return None
        return {"TCIA": [*self.tcia.manifests, *self.tcia.resolved_files]}

    def annotations(self, dataset: Dataset) -> dict[str, str]:
        """The visit's annotation files: path in the raw folder -> path in its annotations folder
        (``<SeriesInstanceUID>/<name>``). A TCIA visit's are those NBIA sent with each series (the
        series record lists them; each zip is extracted into its own sub-folder); other visits
        have none."""
        if self.tcia is None:
            return {}
        out = {}
        for item, folder in item_folders(self.dumps(dataset, present_only=False)):
            for name in annotation_files(item.path):
                out[f"{folder}/{name}"] = f"{item.path.stem}/{name}"
        return out

    def missing_zips(self) -> list[Path]:
        return [z for z in self.tcia.zips if not z.is_file()] if self.tcia else []

    def dumps(self, dataset: Dataset, *, present_only: bool = True) -> list[DownloadItem]:
        """The visit's dump(s): a TCIA visit's series zips (those present, unless ``present_only``
        is false), a manifest visit's items in downloads/<session>/; none for an unknown visit."""
        if self.tcia is not None:
            return [DownloadItem(z, self.visit.session, "zip") for z in self.tcia.zips
                    if not present_only or z.is_file()]
        if self.kind != DUMP:
            return []
        lay = dataset.layout
        m = dataset.manifest
        items = items_for_visit(lay, self.visit, m.participants.keys(), read_dicom_dir_map(lay.dicom_dir_map_path),
                                index=m.participant_index)
        # and the studies the DICOM node sent for it (downloads/dicom_node/<visit>/<study>.zip)
        return items + [DownloadItem(z, self.visit.session, "zip") for z in node_zips(lay.dicom_node_dir(self.visit.key))]


def visit_source(dataset: Dataset, visit: Visit | str, *, tcia: dict[str, TciaVisitSource] | None = None) -> VisitSource:
    """The source of one visit (``tcia``: :func:`tcia_visits` when already at hand)."""
    visit = parse_visit_key(visit) if isinstance(visit, str) else visit
    found = (tcia if tcia is not None else tcia_visits(dataset.layout)).get(visit.key)
    if found is not None:  # TCIA's convention: subject = PatientID, session <PatientID>[_NN]
        return VisitSource(visit, TCIA, found.patient_id, found.session_label, found.patient_id, found)
    label = dataset.config.session_label_pattern.format(participant=visit.participant, session=visit.session)
    if dataset.manifest.has_visit(visit):
        return VisitSource(visit, DUMP, visit.participant, label,
                           dataset.manifest.raw_participant_id(visit.participant))
    return VisitSource(visit, UNKNOWN, visit.participant, label, None)
