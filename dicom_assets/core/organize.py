"""Organize a visit: every file of the messy raw tree classified, the kept DICOMs laid out
as a flat folder of stable, unique names (``<SOPInstanceUID>.dcm``).

Better than the established reorg scripts on each known weakness: headers only (no pixel
data read), derived files excluded (every ImageType value checked), one bad file never
stops the visit, names never collide (two series with ``IM0001`` each are fine), and a
re-run replaces the folder atomically instead of refusing with "already exists".
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
import shutil
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from .dicomscan import KEPT, REASONS, FileRecord, Rules, apply_rules, read_records, walk_files
from .errors import OrganizedFolderError
from .fsutil import atomic_write, file_digest, printable, swap_dir, temp_sibling

_UID_SAFE = re.compile(r"[^0-9A-Za-z.]")
# the longest flat name (".dcm" included): fits a ustar name field, far below any NAME_MAX
MAX_NAME = 100


def dest_name(sop_uid: str) -> str:
    """The flat file name of a kept DICOM: ``<SOPInstanceUID>.dcm`` for a valid UID of up to
    96 characters. Otherwise still deterministic and unique, never longer than ``MAX_NAME``:

    * a UID with characters outside ``[0-9A-Za-z.]``: those become ``_`` and
      ``-<8 hex of sha1(UID)>`` is appended;
    * a name that would exceed ``MAX_NAME``: the first characters, then
      ``-<16 hex of sha256(UID)>``.

    ``-`` never occurs in a UID's safe form, and the hex after it is 8 or 16 long, so the
    three forms cannot meet."""
    safe = _UID_SAFE.sub("_", sop_uid)
    raw = sop_uid.encode("utf-8", "surrogatepass")
    if safe != sop_uid:  # a vendor's odd UID: keep it recognizable and unique
        safe += "-" + hashlib.sha1(raw).hexdigest()[:8]
    if len(safe) + 4 > MAX_NAME:  # an overlong UID: a prefix to recognize it, a digest to keep it unique
        safe = _UID_SAFE.sub("_", sop_uid)[: MAX_NAME - 4 - 17] + "-" + hashlib.sha256(raw).hexdigest()[:16]
    return f"{safe}.dcm"


#: the decision (and reason) of a file its source names an annotation of a series (TCIA's
#: radiologist XML, sent by NBIA beside the series' images): not a DICOM and not excluded, it is
#: laid out in the visit's annotations folder, beside the flat DICOM folder, never in it
ANNOTATION = "annotation"
MAX_CELL = 1000  # a longer tag value (a corrupt length swallowing the file) is cut in the report


def cell(text: str, limit: int = MAX_CELL) -> str:
    """:func:`~.fsutil.printable`, cut to ``limit`` characters with a note of how many were dropped."""
    text = printable(text)
    return text if len(text) <= limit else f"{text[:limit]}…[{len(text) - limit} more characters]"


@dataclass
class SeriesSummary:
    series_number: int | None
    series_description: str | None
    protocol_name: str | None
    modality: str | None
    series_instance_uid: str | None
    files: int = 0
    excluded: int = 0


@dataclass
class OrganizeResult:
    visit: str
    source_dir: str
    dest_dir: str
    mode: str
    records: list[FileRecord] = field(default_factory=list)

    @property
    def kept(self) -> list[FileRecord]:
        return [r for r in self.records if r.decision == KEPT]

    @property
    def excluded(self) -> list[FileRecord]:
        return [r for r in self.records if r.decision not in (KEPT, ANNOTATION)]

    @property
    def annotations(self) -> list[FileRecord]:
        return [r for r in self.records if r.decision == ANNOTATION]

    def counts(self) -> dict[str, int]:
        c = Counter(r.reason for r in self.records)
        return {k: c.get(k, 0) for k in (KEPT, *REASONS)}

    @property
    def conflicts(self) -> list[FileRecord]:
        return [r for r in self.records if r.reason == "duplicate_conflict"]

    @property
    def patient_ids(self) -> list[str]:
        return sorted({r.patient_id or "" for r in self.kept})

    @property
    def study_uids(self) -> list[str]:
        return sorted({r.study_instance_uid or "" for r in self.kept})

    @property
    def mixed(self) -> bool:
        return len(self.patient_ids) > 1 or len(self.study_uids) > 1

    def series(self) -> list[SeriesSummary]:
        out: dict[str | None, SeriesSummary] = {}
        for r in self.records:
            if (r.series_instance_uid is None and r.decision != KEPT) or r.decision == ANNOTATION:
                continue
            s = out.get(r.series_instance_uid)
            if s is None:
                s = out[r.series_instance_uid] = SeriesSummary(
                    r.series_number, r.series_description, r.protocol_name, r.modality, r.series_instance_uid)
            if r.decision == KEPT:
                s.files += 1
            else:
                s.excluded += 1
        return sorted(out.values(), key=lambda s: (s.series_number is None, s.series_number or 0,
                                                   s.series_description or ""))


# Header reads of a large visit are shared with helper processes (the parsing is pure Python:
# threads would share one core): this process reads one share, each helper another. A helper's
# start (a Python process importing the header reader, ~70 ms; pydicom only when a file needs it)
# is worth ~800 files of reading (~90 us each), so this process takes that many more; below
# POOL_MIN_FILES the helper saves nothing measurable (on the shared 2-core machine a 2,000-file
# visit was as fast with one process as with two, 4,000 files gained ~10 %): bench/run.py
# times both, docs/decisions.md has the figures. DICOM_ASSETS_ORGANIZE_WORKERS sets the number
# of processes (1: never a helper).
POOL_MIN_FILES = 3000
HELPER_START_FILES = 800
MIN_SHARE = 50  # a helper gets at least this many files, or there is no helper
_HELPER = ("import pickle, sys; sys.path.insert(0, sys.argv[1]); "
           "from dicom_assets.core.dicomscan import read_records; "
           "sys.stdout.buffer.write(pickle.dumps(read_records(pickle.load(sys.stdin.buffer)), 5))")


def organize_workers() -> int:
    """Processes reading headers by default: min(2, CPUs) (a site sets another number with
    ``DICOM_ASSETS_ORGANIZE_WORKERS``, which the asset passes as ``workers``)."""
    return max(1, min(2, os.cpu_count() or 1))


def read_all(files: list[tuple[Path, str]], workers: int | None = None) -> list[FileRecord]:
    """One :class:`FileRecord` per (path, rel), in order; shared among ``workers`` processes
    for a large visit (this one and ``workers - 1`` helpers, each a contiguous share).

    Every per-file error is already a record (``read_record`` catches it, in any process). A
    helper that cannot start, dies or answers garbage has its share read here instead, so the
    result never depends on the helpers. Helpers are plain ``python -c`` processes, not a
    multiprocessing fork (the Dagster process has threads a fork would copy mid-flight) nor its
    spawn (which re-imports the ``__main__`` module, the whole ``dagster`` CLI in a run)."""
    workers = organize_workers() if workers is None else max(1, workers)
    if workers == 1 or len(files) < max(POOL_MIN_FILES, 2):
        return read_records(files)
    import pickle
    import subprocess
    import sys

    per = (len(files) - HELPER_START_FILES) // workers  # each helper's share
    if per < MIN_SHARE:
        return read_records(files)
    first = len(files) - (workers - 1) * per
    shares = [files[:first]] + [files[i:i + per] for i in range(first, len(files), per)]
    package_parent = str(Path(__file__).resolve().parents[2])
    helpers = []
    for share in shares[1:]:
        try:
            proc = subprocess.Popen([sys.executable, "-c", _HELPER, package_parent], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            proc.stdin.write(pickle.dumps(share, 5))
            proc.stdin.close()
        except (OSError, ValueError):  # no process could start (limits), or it died at once
            proc = None
        helpers.append((proc, share))
    out = read_records(shares[0])
    for proc, share in helpers:
        recs = None
        if proc is not None:
            try:
                data = proc.stdout.read()
                if proc.wait() == 0:
                    recs = pickle.loads(data)
            except Exception:  # a truncated or garbled answer: read that share here
                recs = None
            finally:
                proc.stdout.close()
        if not (isinstance(recs, list) and len(recs) == len(share)
                and all(isinstance(r, FileRecord) and r.source == rel for r, (_p, rel) in zip(recs, share))):
            recs = read_records(share)
        out.extend(recs)
    return out


def _annotation_records(files: list[tuple[Path, str]], annotations: dict[str, str],
                        source_dir: Path) -> list[FileRecord]:
    """The records of the files ``annotations`` names (raw path -> path in the annotations
    folder); one it names that the raw tree lacks is an error naming it, never left out."""
    found = {rel: path for path, rel in files if rel in annotations}
    missing = sorted(set(annotations) - set(found))
    if missing:
        raise OrganizedFolderError(f"{printable(source_dir / missing[0], controls=False)}: an annotation file its "
                                   f"source lists is not in the raw dump ({len(missing)} missing); materialize "
                                   "raw_dicoms again")
    records = []
    for rel in sorted(found):
        dest = annotations[rel]
        parts = dest.split("/")
        if dest.startswith("/") or any(p in ("", ".", "..") for p in parts) or printable(dest, controls=False) != dest:
            raise OrganizedFolderError(f"{printable(dest)!r}: not a safe path in the annotations folder")
        rec = FileRecord(source=rel, size=found[rel].stat().st_size, decision=ANNOTATION, reason=ANNOTATION,
                         detail=f"annotation file its source lists; kept as annotations/{dest}", dest=dest)
        records.append(rec)
    return records


def classify_tree(source_dir: Path, rules: Rules, workers: int | None = None,
                  annotations: dict[str, str] | None = None) -> list[FileRecord]:
    """Classify every file under source_dir; duplicates resolved in sorted path order.

    ``annotations`` (raw path -> path in the annotations folder): files the visit's source names
    annotations (a TCIA series' annotation files); they are not read as DICOM."""
    records: list[FileRecord] = []
    by_sop: dict[str, FileRecord] = {}
    md5_cache: dict[str, str] = {}
    errors: list[tuple[str, str]] = []
    files = walk_files(source_dir, errors)
    for rel, why in errors:  # nothing found is left out of the records
        records.append(FileRecord(source=rel, size=0).exclude("unreadable", why))
    if annotations:
        records.extend(_annotation_records(files, annotations, source_dir))
        files = [(p, rel) for p, rel in files if rel not in annotations]
    # DICOMDIR files need no special case: their SOP class is a non-image one
    for (path, _rel), rec in zip(files, read_all(files, workers)):
        rec = apply_rules(rec, rules)
        if rec.decision == KEPT:
            first = by_sop.get(rec.sop_instance_uid)
            if first is not None:
                if first.source not in md5_cache:
                    md5_cache[first.source] = file_digest(source_dir / first.source, "md5")
                a = md5_cache[first.source]
                b = file_digest(path, "md5")
                if a == b:
                    rec.exclude("duplicate", f"same SOPInstanceUID and bytes as {first.source}")
                else:
                    rec.exclude("duplicate_conflict",
                                f"same SOPInstanceUID as {first.source} but different bytes")
            else:
                by_sop[rec.sop_instance_uid] = rec
        records.append(rec)
    return records


def _link_or_copy(src: Path, out: Path, final_dir: Path, mode: str) -> None:
    """``out`` (in a staging folder that becomes ``final_dir``) as a relative link to ``src``
    (links stay valid when the dataset root moves) or a copy of it."""
    if mode == "copy":
        shutil.copy2(src, out)
    elif os.path.islink(src):  # a link inside the dump (never a folder: the walk does not follow those)
        os.symlink(os.path.relpath(src.resolve(), final_dir), out)
    else:
        os.symlink(os.path.relpath(src, final_dir), out)


def _stage_annotations(result: OrganizeResult, source_dir: Path, annotations_dir: Path) -> Path | None:
    """The annotations folder built aside (its files under their paths), or None for none."""
    notes = result.annotations
    if not notes:
        return None
    annotations_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = temp_sibling(annotations_dir)
    staging.mkdir()
    try:
        for rec in notes:
            out = staging / rec.dest
            out.parent.mkdir(parents=True, exist_ok=True)
            _link_or_copy(source_dir / rec.source, out, (annotations_dir / rec.dest).parent, result.mode)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging


def organize_visit(visit: str, source_dir: Path, dest_dir: Path, rules: Rules, mode: str = "symlink",
                   report_path: Path | None = None, workers: int | None = None, *,
                   annotations: dict[str, str] | None = None,
                   annotations_dir: Path | None = None) -> OrganizeResult:
    """Classify source_dir and lay out the kept files flat in dest_dir (atomically).

    ``workers``: processes reading headers for a large visit (default: :func:`organize_workers`).
    ``annotations`` (raw path -> path under ``annotations_dir``): the files the visit's source
    names annotations, laid out (same ``mode``) in ``annotations_dir``, swapped in before the
    DICOM folder; a visit without any has no annotations folder (an old one is removed)."""
    if mode not in ("symlink", "copy"):
        raise ValueError(f"organize mode must be 'symlink' or 'copy', not {mode!r}")
    if not source_dir.is_dir():
        raise FileNotFoundError(f"{source_dir}: the raw DICOM folder of visit {visit} does not exist; "
                                "materialize raw_dicoms first")
    result = OrganizeResult(visit, str(source_dir), str(dest_dir), mode)
    result.records = classify_tree(source_dir, rules, workers, annotations)
    if result.annotations and annotations_dir is None:
        raise ValueError("annotations given without annotations_dir")
    dest_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = temp_sibling(dest_dir)
    staging.mkdir()
    notes_staging = None
    # links are relative to where they will finally live, so the dataset root can move; the
    # relative path of source_dir is computed once (os.path.relpath is lexical: same result)
    rel_source = os.path.relpath(source_dir, dest_dir)
    try:
        if annotations_dir is not None:
            notes_staging = _stage_annotations(result, source_dir, annotations_dir)
        used: set[str] = set()
        for rec in result.kept:
            name = base = dest_name(rec.sop_instance_uid)
            n = 1
            while name.lower() in used:  # a digest collision (or a case-insensitive disk): stay unique
                n += 1
                name = f"{base[:-4]}-{n}.dcm"
            used.add(name.lower())
            rec.dest = name
            src = source_dir / rec.source
            out = staging / name
            if mode == "symlink" and not os.path.islink(src):
                os.symlink(f"{rel_source}/{rec.source}", out)  # the common case, without a relpath per file
            else:
                _link_or_copy(src, out, dest_dir, mode)
        if report_path is None:
            _swap_both(notes_staging, annotations_dir, staging, dest_dir)
        else:
            # the report is written (to a temporary file) first: if it cannot be, the previous
            # dicom/ folder and report stay as they were; it replaces the old one after the swap
            with atomic_write(report_path, newline="", encoding="utf-8") as fh:
                _write_rows(fh, result)
                _swap_both(notes_staging, annotations_dir, staging, dest_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if notes_staging is not None:
            shutil.rmtree(notes_staging, ignore_errors=True)
        raise
    return result


def _swap_both(notes_staging: Path | None, annotations_dir: Path | None, staging: Path, dest_dir: Path) -> None:
    """The annotations folder first, then the DICOM folder. A crash between the two leaves new
    annotations beside the old DICOM folder and old report: the archive steps compare both
    folders with the report and name the difference, never archive a mixture silently."""
    if notes_staging is not None:
        swap_dir(notes_staging, annotations_dir)
    elif annotations_dir is not None and (annotations_dir.exists() or annotations_dir.is_symlink()):
        shutil.rmtree(annotations_dir)  # the visit has none now (a re-run without them)
    swap_dir(staging, dest_dir)


REPORT_COLUMNS = ("source", "decision", "reason", "detail", "series_number", "series_description",
                  "modality", "sop_instance_uid", "series_instance_uid", "size", "dest")


def _row(r: FileRecord) -> list:
    row = []
    for c in REPORT_COLUMNS:
        v = getattr(r, c)
        # the source is never cut (it names the file); a tag value may be
        row.append("" if v is None else (printable(v) if c == "source" else cell(v)) if isinstance(v, str) else v)
    return row


def _write_rows(fh, result: OrganizeResult) -> None:
    """The report's rows to ``fh`` (flushed, so a full disk fails here, before any swap)."""
    w = csv.writer(fh, delimiter="\t", lineterminator="\n")
    w.writerow(REPORT_COLUMNS)
    for r in result.records:
        w.writerow(_row(r))
    fh.flush()


def write_report(result: OrganizeResult, path: Path) -> None:
    """``logs/organize/<visit>_files.tsv``: one row per file, valid UTF-8 whatever the file
    names (see :func:`~.fsutil.printable`: a byte that is no UTF-8 and a control character as
    ``\\xNN``)."""
    with atomic_write(path, newline="", encoding="utf-8") as fh:
        _write_rows(fh, result)


def _report_rows(path: Path) -> list[dict]:
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
    except FileNotFoundError:
        raise OrganizedFolderError(f"{path}: no organize report; materialize organized_dicoms again") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise OrganizedFolderError(f"{path}: the organize report cannot be read ({exc}); "
                                  "materialize organized_dicoms again") from None
    if rows and not {"decision", "dest"} <= set(rows[0]):
        raise OrganizedFolderError(f"{path}: not an organize report (no decision/dest columns)")
    return rows


def read_kept(path: Path) -> list[str]:
    """The flat names of the files an organize report says were kept (its ``dest`` column):
    the list the archive steps check the organized folder against."""
    return sorted(r["dest"] for r in _report_rows(path) if r["decision"] == KEPT)


def read_annotations(path: Path) -> list[str]:
    """The paths (in the visit's annotations folder) of the files an organize report says are
    annotations: what the archive steps check that folder against."""
    return sorted(r["dest"] for r in _report_rows(path) if r["decision"] == ANNOTATION)


def series_rows(result: OrganizeResult) -> list[dict]:
    return [
        {"series_number": s.series_number, "series_description": cell(s.series_description or "", 200),
         "protocol_name": cell(s.protocol_name or "", 200), "modality": cell(s.modality or "", 200),
         "files": s.files, "excluded": s.excluded}
        for s in result.series()
    ]


def excluded_summary(result: OrganizeResult, limit: int = 50) -> list[dict]:
    by_reason: dict[str, list[FileRecord]] = defaultdict(list)
    for r in result.excluded:
        by_reason[r.reason].append(r)
    rows = []
    for reason in REASONS:
        for r in by_reason.get(reason, [])[:limit]:
            rows.append({"source": printable(r.source), "reason": r.reason, "detail": cell(r.detail)})
    return rows
