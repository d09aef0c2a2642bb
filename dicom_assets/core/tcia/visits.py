"""TCIA visits: one per (PatientID, StudyInstanceUID), labelled once and for good.

Labels follow the XNAT-TCIA convention: the studies of a patient sorted by StudyDate, StudyTime,
then StudyInstanceUID are labelled ``<PatientID>``, ``<PatientID>_01``, ``<PatientID>_02``, ...;
the visit is ``<participant>_ses-<n>``. A label is a property of the study across every
manifest, not of one manifest: the dataset's study register (``downloads/tcia/studies.csv``)
holds each study's label from the first manifest that brought it, and every later manifest
reads it there. A study found later never renames a visit already given (the tarball, DataLad
and XNAT carry its name): it takes its place by date when that place is free, else the next
free number, and the assignment says so (``out_of_order``).

A study with a series that could not be fetched waits (no label yet, no visit); the other
studies of the manifest go on.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..fsutil import atomic_write, file_lock
from ..ids import normalize_participant_id
from .download import SeriesResult
from .manifest import TciaManifestError

RESOLVED_COLUMNS = ("SeriesInstanceUID", "PatientID", "StudyInstanceUID", "visit", "session_label")
STUDY_COLUMNS = ("PatientID", "StudyInstanceUID", "StudyDate", "StudyTime", "participant", "visit",
                 "session_label", "manifest")
SERIES_COLUMNS = ("uid", "status", "files", "annotations", "PatientID", "StudyInstanceUID", "StudyDate", "server",
                  "visit", "message")
_FETCHED = ("downloaded", "cached")


@dataclass(frozen=True)
class TciaVisit:
    patient_id: str
    study_uid: str
    visit: str
    session_label: str
    series: tuple[str, ...]


@dataclass
class Assignment:
    """What one manifest's series become: ``visits`` (complete studies, labelled), ``new_studies``
    (register rows to add), ``waiting`` (study -> the failed series that hold it back), and
    ``out_of_order`` (messages: a study labelled out of date order to keep published names)."""

    visits: list[TciaVisit]
    new_studies: list[dict] = field(default_factory=list)
    waiting: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    out_of_order: list[str] = field(default_factory=list)
    unattributed: list[str] = field(default_factory=list)  # failed series whose study getSeries never said


def _label(patient: str, i: int) -> str:
    return patient if i == 0 else f"{patient}_{i:02d}"


def _index_of(row: dict) -> int:
    m = re.search(r"_ses-([0-9]+)$", row["visit"])
    return int(m.group(1)) - 1 if m else -1


def _studies(results: list[SeriesResult]) -> tuple[dict, dict, list[str]]:
    complete: dict[tuple[str, str], dict] = {}
    waiting: dict[tuple[str, str], list[str]] = {}
    unattributed: list[str] = []
    for r in results:
        key = (r.PatientID, r.StudyInstanceUID)
        if r.status in _FETCHED:
            complete.setdefault(key, {"date": r.StudyDate, "time": r.StudyTime, "series": []})["series"].append(r.uid)
        elif r.status == "failed":
            if r.StudyInstanceUID:
                waiting.setdefault(key, []).append(r.uid)
            else:
                unattributed.append(r.uid)
    for key in waiting:
        complete.pop(key, None)
    return complete, waiting, unattributed


def assign_visits(results: list[SeriesResult], known: list[dict] = (), manifest: str = "") -> Assignment:
    """The visits of one manifest's series, given the register's rows (``known``). Pure."""
    complete, waiting, unattributed = _studies(results)
    if unattributed:  # a series of no known study may belong to any visit: none is known complete
        return Assignment([], [], waiting, [], unattributed)
    by_study = {(r["PatientID"], r["StudyInstanceUID"]): r for r in known}
    participants = _participants({p for p, _ in complete} | {r["PatientID"] for r in known}, complete)
    new_rows, notes, visits = [], [], []
    for patient in sorted({p for p, _ in complete}):
        mine = {k: v for k, v in complete.items() if k[0] == patient}
        theirs = {k: r for k, r in by_study.items() if k[0] == patient}
        order = sorted({**{k: (v["date"], v["time"], k[1]) for k, v in mine.items()},
                        **{k: (r["StudyDate"], r["StudyTime"], k[1]) for k, r in theirs.items()}}.items(),
                       key=lambda kv: kv[1])
        used = {_index_of(r) for r in theirs.values()}
        for pos, (key, _) in enumerate(order):
            if key in theirs or key not in mine:
                continue
            i = pos
            if i in used:
                i = max(used) + 1
                notes.append(f"study {key[1]} of {patient} ({mine[key]['date'] or 'no date'}) comes before visits "
                             f"already given by date order; it is labelled {_label(patient, i)} (visit "
                             f"{participants[patient]}_ses-{i + 1:02d}) so that no published visit is renamed")
            used.add(i)
            row = {"PatientID": patient, "StudyInstanceUID": key[1], "StudyDate": mine[key]["date"],
                   "StudyTime": mine[key]["time"], "participant": participants[patient],
                   "visit": f"{participants[patient]}_ses-{i + 1:02d}", "session_label": _label(patient, i),
                   "manifest": manifest}
            new_rows.append(row)
            theirs[key] = row
        for key, v in sorted(mine.items()):
            r = theirs[key]
            visits.append(TciaVisit(patient, key[1], r["visit"], r["session_label"], tuple(sorted(v["series"]))))
    return Assignment(visits, new_rows, waiting, notes, [])


def group_visits(results: list[SeriesResult]) -> list[TciaVisit]:
    """One visit per (PatientID, StudyInstanceUID) of complete studies, labelled by date, as a
    first manifest on an empty register would be (no download order enters)."""
    return sorted(assign_visits(results).visits, key=lambda v: v.visit)


def _participants(patients: set[str], studies: dict) -> dict[str, str]:
    """PatientID -> participant; two PatientIDs that normalize alike (``TCGA-02-0001`` and
    ``TCGA-020-001``) are two people: refused naming both, never merged into one visit; a
    PatientID with no letter or digit is refused naming a series of it."""
    out: dict[str, str] = {}
    by_norm: dict[str, str] = {}
    for patient in sorted(patients):
        try:
            norm = normalize_participant_id(patient)
        except ValueError:
            series = next((v["series"][0] for k, v in studies.items() if k[0] == patient), "?")
            raise TciaManifestError(f"series {series}: PatientID {patient!r} has no letter or digit, so it names "
                                    "no participant; the series cannot be given a visit") from None
        if norm in by_norm:
            raise TciaManifestError(f"PatientIDs {by_norm[norm]!r} and {patient!r} both normalize to participant "
                                    f"{norm!r}: two people's data would be merged into one visit; refused")
        by_norm[norm] = patient
        out[patient] = norm
    return out


# ---------------------------------------------------------------------------- the register
def read_studies(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def register_visits(register: Path, results: list[SeriesResult], manifest: str) -> Assignment:
    """:func:`assign_visits` against the dataset's study register, adding the new studies to it;
    one manifest at a time (a lock beside the register), so two runs never give one label twice."""
    register = Path(register)
    with file_lock(register.with_name(f".{register.name}.lock")):
        known = read_studies(register)
        done = assign_visits(results, known, manifest)
        if done.new_studies:
            rows = sorted([*known, *done.new_studies], key=lambda r: (r["PatientID"], r["visit"]))
            with atomic_write(register, newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=STUDY_COLUMNS, extrasaction="ignore")
                w.writeheader()
                w.writerows(rows)
    return done


def write_resolved(path: Path, visits: list[TciaVisit]) -> None:
    rows = [{"SeriesInstanceUID": s, "PatientID": v.patient_id, "StudyInstanceUID": v.study_uid, "visit": v.visit,
             "session_label": v.session_label} for v in visits for s in v.series]
    with atomic_write(path, newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=RESOLVED_COLUMNS)
        w.writeheader()
        w.writerows(sorted(rows, key=lambda r: (r["visit"], r["SeriesInstanceUID"])))


def read_resolved(path: Path) -> list[dict]:
    with Path(path).open(newline="") as fh:
        return list(csv.DictReader(fh))


def write_series_table(path: Path, results: list[SeriesResult], visits: list[TciaVisit]) -> None:
    """Every series of a manifest run, its outcome and its visit (blank while it waits): the
    table the run's metadata links to, instead of carrying it in every event."""
    visit_of = {s: v.visit for v in visits for s in v.series}
    with atomic_write(path, newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=SERIES_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in results:
            w.writerow({**vars(r), "visit": visit_of.get(r.uid, "")})


@dataclass(frozen=True)
class TciaVisitSource:
    """A TCIA visit's manifests and resolved CSVs (every manifest holding series of it, the first
    first), labels and series zips (see core.sources)."""

    manifests: tuple[Path, ...]
    resolved_files: tuple[Path, ...]
    patient_id: str
    session_label: str
    zips: tuple[Path, ...]
