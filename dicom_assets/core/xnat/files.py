"""What a visit sends: its files (from the metadata JSON or a classic folder tree), the zip,
the pending-upload record, and what XNAT's importer would refuse."""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import parse_json_text
from ..fsutil import atomic_write
from .errors import XnatError

_HEAD = 64 << 10  # header bytes read to find a file's SOP Class and Instance UIDs


@dataclass(frozen=True)
class UploadFile:
    path: Path
    arcname: str
    sop_instance_uid: str
    series_number: int | None
    series_description: str | None
    study_instance_uid: str = ""
    series_instance_uid: str = ""


def select_files(dicoms_json: list[dict], organized_dir: Path, exclude: tuple[str, ...]) -> tuple[list[UploadFile], list[dict]]:
    """From a visit's metadata_dicoms.json: the files to send and the ones left out (why)."""
    send, skipped = [], []
    for rec in dicoms_json:
        name = rec["path"].rsplit("/", 1)[-1]
        desc = rec.get("SeriesDescription") or ""
        hit = next((x for x in exclude if x.lower() in desc.lower()), None)
        if hit:
            skipped.append({"path": rec["path"], "reason": f"series {desc!r} matches exclusion {hit!r}"})
            continue
        send.append(UploadFile(organized_dir / name, name, rec.get("SOPInstanceUID") or "",
                               rec.get("SeriesNumber"), desc, rec.get("StudyInstanceUID") or "",
                               rec.get("SeriesInstanceUID") or ""))
    return send, skipped


def write_zip(files: list[UploadFile], dest: Path) -> int:
    """Stream the files into a zip (stored: DICOM pixel data hardly compresses)."""
    with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for f in files:
            zf.write(f.path, arcname=f.arcname)
    return dest.stat().st_size


def series_key(f: UploadFile) -> tuple[str, str]:
    """A file's series: (SeriesInstanceUID, SeriesNumber as text); two series sharing a number
    stay apart, a series without a number is still one."""
    return f.series_instance_uid, str(f.series_number if f.series_number is not None else "")


def expected_names(files: list[UploadFile]) -> set[str]:
    """The file names (``<SOPInstanceUID>.dcm``) the XNAT session should hold, whatever scan and
    resource XNAT puts each in (GradualDicomImporter.getSafeFile keeps the uploaded name; scan IDs
    and the DICOM/secondary split are XNAT's, see :func:`compare_series`)."""
    return {f.arcname for f in files}


def compare_series(files: list[UploadFile], held: dict[str, set[str]]) -> list[dict]:
    """One row per series of the visit: its number, description and UID, how many of its files
    the visit expects and how many XNAT holds, and the XNAT scans that hold them (``held``: scan
    ID -> names in its ``DICOM`` and ``secondary`` resources). Matched by instance names, never by
    scan ID: XNAT numbers scans its own way (``3-MR1`` for a number shared by two series, the UID
    for a series without one: DICOMSessionBuilder)."""
    where = {n: sid for sid, names in held.items() for n in names}
    rows: dict[tuple[str, str], dict] = {}
    for f in files:
        row = rows.setdefault(series_key(f), {
            "series_number": f.series_number, "series_description": f.series_description or "",
            "series_uid": f.series_instance_uid, "expected": 0, "on_xnat": 0, "scans": set()})
        row["expected"] += 1
        if f.arcname in where:
            row["on_xnat"] += 1
            row["scans"].add(where[f.arcname])
    out = sorted(rows.values(), key=lambda r: (r["series_number"] is None, r["series_number"] or 0, r["series_uid"]))
    for r in out:
        r["scans"] = ", ".join(sorted(r["scans"]))
    return out


def temp_zip_path(folder: Path | None = None) -> Path:
    if folder is not None:
        Path(folder).mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="xnat-upload-", suffix=".zip", dir=folder)
    os.close(fd)
    return Path(name)


def load_dicoms_json(path: Path) -> list[dict]:
    return json.loads(path.read_text())


def write_pending(path: Path, *, project: str, subject: str, label: str, tag: str, files: list[UploadFile]) -> None:
    """Record, before anything is sent, what this client is about to send for a visit (no
    server, user or password: only XNAT's project, subject, session label and the files)."""
    record = {"project": project, "subject": subject, "session_label": label, "study_instance_uid": tag,
              "files": {f.arcname: f.sop_instance_uid for f in files}}
    with atomic_write(path) as fh:
        fh.write(json.dumps(record, indent=2) + "\n")


def read_pending(path: Path | None, *, project: str, label: str, log) -> set[str]:
    """The file names an unfinished upload of this visit's session recorded as being sent
    (empty when there is no record, or it is for another project or label, or unreadable)."""
    if path is None or not path.is_file():
        return set()
    try:
        record = json.loads(path.read_text())
        if record.get("project") != project or record.get("session_label") != label:
            return set()
        return {str(n) for n in record["files"]}
    except (ValueError, KeyError, TypeError, AttributeError, OSError):
        log(f"{path}: unreadable record of an unfinished upload; an existing session follows the duplicate policy")
        return set()


def importer_refusals(files: list[UploadFile]) -> list[tuple[str, str]]:
    """``(name, why)`` of the files XNAT's importer refuses (``GradualDicomImporter.call``: "object
    <name> contains no SOP Class UID", then the same for the SOP Instance UID; an empty value
    counts as none, and MediaStorageSOPClassUID in the file meta does not stand in)."""
    from ..fasttags import read_tags

    out = []
    for f in files:
        with open(f.path, "rb") as fh:  # a missing file is an OSError of its own, not a refusal
            head = fh.read(_HEAD)
        try:
            tags = read_tags(head, f.path)
        except Exception as exc:  # pydicom could not read it either: XNAT's dcm4che would not
            out.append((f.arcname, f"unreadable DICOM header ({type(exc).__name__})"))
            continue
        if not str(tags.get("SOPClassUID") or "").strip():
            out.append((f.arcname, "no SOP Class UID (0008,0016)"))
        elif not str(tags.get("SOPInstanceUID") or "").strip():
            out.append((f.arcname, "no SOP Instance UID (0008,0018)"))
    return out


def series_summary(names: set[str], files: list[UploadFile]) -> str:
    """``series 3 (T2w): 10 of 20 files, ...`` for the named files."""
    total: dict[tuple[str, str], int] = {}
    count: dict[tuple[str, str], int] = {}
    desc: dict[tuple[str, str], str] = {}
    for f in files:
        key = series_key(f)
        total[key] = total.get(key, 0) + 1
        desc.setdefault(key, f.series_description or "")
        if f.arcname in names:
            count[key] = count.get(key, 0) + 1
    order = sorted(count, key=lambda k: (not k[1].isdigit(), int(k[1]) if k[1].isdigit() else 0, k[1], k[0]))
    return ", ".join(f"series {k[1] or '?'}" + (f" ({desc[k]})" if desc[k] else "")
                     + f": {count[k]} of {total[k]} files" for k in order)


def files_from_records(records, root: Path) -> list[UploadFile]:
    """Kept organize records (of a folder tree) as files to send."""
    return [UploadFile(root / r.source, f"{r.sop_instance_uid}.dcm", r.sop_instance_uid or "", r.series_number,
                       r.series_description, r.study_instance_uid or "", r.series_instance_uid or "")
            for r in records if r.decision == "kept"]


def classic_tree_sessions(root: Path):
    """``<root>/<subject>/<session>/...``, the tree of the classic upload script: (subject, session, folder)."""
    for subj in sorted(p for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith(".")):
        for ses in sorted(p for p in subj.iterdir() if p.is_dir() and not p.name.startswith(".")):
            yield subj.name, ses.name, ses


def read_exclusions(path: Path | None) -> tuple[str, ...]:
    """``{"Exclude": ["Localizers", ...]}`` (the classic script's file) or a plain list."""
    if path is None:
        return ()
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise XnatError(f"{path}: the exclusions file cannot be read ({exc.strerror or exc})") from None
    data = parse_json_text(raw, path, XnatError, "exclusions file")
    values = data.get("Exclude") if isinstance(data, dict) else data
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise XnatError(f"{path}: expected {{\"Exclude\": [\"substring\", ...]}}")
    if any(not v.strip() for v in values):  # "" is a substring of every description: all excluded
        raise XnatError(f"{path}: an empty exclusion would exclude every series; remove it")
    return tuple(values)


def unsafe_names(files: list[UploadFile]) -> list[str]:
    """The zip member names that are no plain file name (a SOPInstanceUID read from a hostile
    header, ``../../x``, would become a path in XNAT's prearchive): refused before sending."""
    return [f.arcname for f in files
            if not f.arcname or "/" in f.arcname or "\\" in f.arcname or f.arcname.strip(".") == ""
            or f.arcname.startswith(".") or "\x00" in f.arcname]

