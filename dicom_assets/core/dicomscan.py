"""Find DICOM files by content and classify each as kept or excluded, with a reason.

Only headers are read (``stop_before_pixels``): pixel data is never loaded. A truncated
file is still caught, by comparing the length the pixel data element declares with the
bytes the file really has.

Reasons (a fixed vocabulary, in the order they are tested):

==================  ==============================================================
``not_dicom``       not a DICOM file (no ``DICM`` marker and no parsable header),
                    empty, or gzip-compressed
``unreadable``      a DICOM file whose header cannot be parsed, or whose pixel data
                    is cut short (truncated transfer), or unreadable permissions
``no_pixel_data``   a non-image object: DICOMDIR, structured report, presentation
                    state, raw data, spectroscopy, Siemens CSA report, ... or an
                    image class with no pixel data element
``derived``         ``ImageType`` contains ``DERIVED`` (any value, not just the first),
                    a secondary capture, or a series description carrying a derived
                    marker (``MoCoSeries`` by default)
``excluded_series`` the series description or a folder of the file's path contains
                    one of the global config's exclusion substrings
``missing_uid``     no SOPInstanceUID: the file cannot be named or de-duplicated
``duplicate``       same SOPInstanceUID as a file already kept, identical bytes
``duplicate_conflict``  same SOPInstanceUID as a kept file, different bytes
==================  ==============================================================
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from .fasttags import scan_header

KEPT = "kept"
REASONS = (
    "not_dicom",
    "unreadable",
    "no_pixel_data",
    "derived",
    "excluded_series",
    "missing_uid",
    "duplicate",
    "duplicate_conflict",
)

# SOP classes converters cannot turn into images: keep this list in this one place.
NON_IMAGE_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.1.3.10": "Media Storage Directory (DICOMDIR)",
    "1.2.840.10008.5.1.4.1.1.66": "Raw Data",
    "1.2.840.10008.5.1.4.1.1.4.2": "MR Spectroscopy",
    "1.2.840.10008.5.1.4.1.1.104.1": "Encapsulated PDF",
    "1.2.840.10008.5.1.4.1.1.104.2": "Encapsulated CDA",
    "1.2.840.10008.5.1.4.1.1.481.3": "RT Structure Set",
    "1.2.840.10008.5.1.4.1.1.481.5": "RT Plan",
    "1.3.12.2.1107.5.9.1": "Siemens CSA Non-Image",
}
NON_IMAGE_SOP_PREFIXES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.88.": "Structured Report",
    "1.2.840.10008.5.1.4.1.1.11.": "Presentation State",
    "1.2.840.10008.5.1.4.1.1.9.": "Waveform",
}
SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"

PIXEL_TAGS = {0x7FE00010, 0x7FE00008, 0x7FE00009}
_LONG_VRS = {b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN", b"SQ", b"UT", b"UC", b"UR"}
_SEQ_DELIM = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"

HEADER_TAGS = (
    "SOPClassUID",
    "SOPInstanceUID",
    "SeriesInstanceUID",
    "StudyInstanceUID",
    "PatientID",
    "SeriesNumber",
    "SeriesDescription",
    "ProtocolName",
    "Modality",
    "ImageType",
    "StudyDate",
    "StudyTime",
)


@dataclass
class FileRecord:
    """What organize knows of one file found in a dump."""

    source: str  # path relative to the participant's raw folder
    size: int
    decision: str = KEPT  # kept | excluded
    reason: str = KEPT
    detail: str = ""
    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None
    series_instance_uid: str | None = None
    study_instance_uid: str | None = None
    patient_id: str | None = None
    series_number: int | None = None
    instance_number: int | None = None
    series_description: str | None = None
    protocol_name: str | None = None
    modality: str | None = None
    image_type: list[str] = field(default_factory=list)
    dest: str = ""

    def exclude(self, reason: str, detail: str) -> "FileRecord":
        assert reason in REASONS, reason
        self.decision, self.reason, self.detail = "excluded", reason, detail
        return self


def _looks_like_preambleless(head: bytes) -> bool:
    """A raw data set starts with a low group tag (0002, 0008 or 0010), little or big endian."""
    if len(head) < 8:
        return False
    for fmt in ("<HH", ">HH"):
        group, elem = struct.unpack(fmt, head[:4])
        if group in (0x0002, 0x0008) and elem < 0x0200:
            return True
    return False


def sniff(path: Path, head: bytes, size: int) -> str | None:
    """None when the file may be DICOM, else the reason detail for 'not_dicom'."""
    if size == 0:
        return "empty file"
    if head[:2] == b"\x1f\x8b":
        return "gzip-compressed file (decompress it before delivery)"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return None
    if _looks_like_preambleless(head):
        return None
    return "no DICM marker and no DICOM header at the start of the file"


def _pixel_data_problem(fp, ds: pydicom.Dataset, size: int) -> tuple[bool, str | None]:
    """(has_pixel_data, truncation problem) from the element where the header read stopped."""
    pos = fp.tell()
    head = fp.read(12)
    if len(head) < 8:
        return False, None
    implicit, little = getattr(ds, "original_encoding", (False, True))
    if implicit is None:
        implicit, little = False, True
    end = "<" if little is not False else ">"
    group, elem = struct.unpack(end + "HH", head[:4])
    tag = (group << 16) | elem
    if tag not in PIXEL_TAGS:
        return False, None
    if implicit:
        (length,) = struct.unpack(end + "I", head[4:8])
        value_start = pos + 8
    elif head[4:6] in _LONG_VRS:
        if len(head) < 12:
            return True, "pixel data header is cut short"
        (length,) = struct.unpack(end + "I", head[8:12])
        value_start = pos + 12
    else:
        (length,) = struct.unpack(end + "H", head[6:8])
        value_start = pos + 8
    if length == 0xFFFFFFFF:  # encapsulated (compressed) frames end with a sequence delimiter
        fp.seek(max(0, size - 256))
        if _SEQ_DELIM not in fp.read():
            return True, "compressed pixel data has no end (file truncated)"
        return True, None
    if value_start + length > size:
        return True, (f"pixel data declares {length} bytes but the file ends "
                      f"{value_start + length - size} bytes early (truncated)")
    return True, None


def _first(value) -> str | None:
    if value is None:
        return None
    s = str(value).strip()
    return s or None


def _int(value) -> int | None:
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return None


def non_image_kind(sop_class: str | None) -> str | None:
    if not sop_class:
        return None
    if sop_class in NON_IMAGE_SOP_CLASSES:
        return NON_IMAGE_SOP_CLASSES[sop_class]
    for prefix, name in NON_IMAGE_SOP_PREFIXES.items():
        if sop_class.startswith(prefix):
            return name
    return None


@dataclass(frozen=True)
class Rules:
    exclude_series: tuple[str, ...] = ()
    exclude_derived: bool = True
    derived_series_markers: tuple[str, ...] = ("MoCoSeries",)


HEAD_BYTES = 64 << 10


def _encapsulated_end_ok(fp, size: int) -> bool:
    fp.seek(max(0, size - 256))
    return _SEQ_DELIM in fp.read()


def _fast_record(rec: FileRecord, scan, fp, size: int) -> FileRecord:
    t = scan.tags
    rec.sop_class_uid = t["SOPClassUID"] or scan.media_sop_class
    rec.sop_instance_uid = t["SOPInstanceUID"]
    rec.series_instance_uid = t["SeriesInstanceUID"]
    rec.study_instance_uid = t["StudyInstanceUID"]
    rec.patient_id = t["PatientID"]
    rec.series_number = t["SeriesNumber"]
    rec.instance_number = t["InstanceNumber"]
    rec.series_description = t["SeriesDescription"]
    rec.protocol_name = t["ProtocolName"]
    rec.modality = t["Modality"]
    rec.image_type = list(t["ImageType"] or [])
    if scan.has_pixels:
        if scan.pixel_length == 0xFFFFFFFF:
            if not _encapsulated_end_ok(fp, size):
                return rec.exclude("unreadable", "compressed pixel data has no end (file truncated)")
        elif scan.pixel_value_start + scan.pixel_length > size:
            return rec.exclude("unreadable", f"pixel data declares {scan.pixel_length} bytes but the file ends "
                                             f"{scan.pixel_value_start + scan.pixel_length - size} bytes early (truncated)")
    return _classify_object(rec, scan.has_pixels)


def _classify_object(rec: FileRecord, has_pixels: bool) -> FileRecord:
    kind = non_image_kind(rec.sop_class_uid)
    if kind:
        return rec.exclude("no_pixel_data", f"non-image object: {kind} ({rec.sop_class_uid})")
    if not has_pixels:
        return rec.exclude("no_pixel_data", "no pixel data element")
    return rec


def read_record(path: Path, rel: str, force_pydicom: bool = False) -> FileRecord:
    """Read one file's header and classify it on its own (no duplicate check yet).

    The fast reader (``fasttags.scan_header``) handles the common encodings from the first
    64 KiB; anything else goes through pydicom. Both give the same record (tested)."""
    try:
        size = os.stat(path).st_size
        with open(path, "rb") as fp:
            head = fp.read(HEAD_BYTES)
            rec = FileRecord(source=rel, size=size)
            problem = sniff(path, head, size)
            if problem:
                return rec.exclude("not_dicom", problem)
            scan = None if force_pydicom else scan_header(head, size)
            if scan is not None:
                return _fast_record(rec, scan, fp, size)
            fp.seek(0)
            try:
                ds = pydicom.dcmread(fp, stop_before_pixels=True, force=True)
            except (InvalidDicomError, EOFError, OSError, ValueError, TypeError, KeyError,
                    struct.error, NotImplementedError) as exc:
                return rec.exclude("unreadable", f"header cannot be parsed: {type(exc).__name__}: {exc}"[:300])
            has_pixels, trunc = _pixel_data_problem(fp, ds, size)
    except PermissionError:
        return FileRecord(source=rel, size=0).exclude("unreadable", "permission denied")
    except OSError as exc:
        return FileRecord(source=rel, size=0).exclude("unreadable", f"cannot read: {exc.strerror}")
    try:
        meta = getattr(ds, "file_meta", None)
        sop_class = _first(ds.get("SOPClassUID")) or _first(meta.get("MediaStorageSOPClassUID") if meta else None)
        rec.sop_class_uid = sop_class
        rec.sop_instance_uid = _first(ds.get("SOPInstanceUID"))
        rec.series_instance_uid = _first(ds.get("SeriesInstanceUID"))
        rec.study_instance_uid = _first(ds.get("StudyInstanceUID"))
        rec.patient_id = _first(ds.get("PatientID"))
        rec.series_number = _int(ds.get("SeriesNumber"))
        rec.instance_number = _int(ds.get("InstanceNumber"))
        rec.series_description = _first(ds.get("SeriesDescription"))
        rec.protocol_name = _first(ds.get("ProtocolName"))
        rec.modality = _first(ds.get("Modality"))
        it = ds.get("ImageType")
        rec.image_type = ([str(v).strip() for v in it] if isinstance(it, (list, pydicom.multival.MultiValue))
                          else ([str(it).strip()] if it else []))
    except Exception as exc:  # a value that cannot be decoded is a corrupt header
        return rec.exclude("unreadable", f"header values cannot be decoded: {type(exc).__name__}: {exc}"[:300])
    if len(ds) == 0 and not rec.sop_class_uid:
        return rec.exclude("not_dicom", "no DICOM elements could be read")
    if trunc:
        return rec.exclude("unreadable", trunc)
    return _classify_object(rec, has_pixels)


def apply_rules(rec: FileRecord, rules: Rules) -> FileRecord:
    """Derived / excluded-series / missing-UID decisions, on a record kept so far."""
    if rec.decision != KEPT:
        return rec
    if rules.exclude_derived:
        derived = [v for v in rec.image_type if v.strip().upper() == "DERIVED"]
        if derived:
            image_type = "\\".join(rec.image_type)
            return rec.exclude("derived", f"ImageType is {image_type}")
        if rec.sop_class_uid and rec.sop_class_uid.startswith(SECONDARY_CAPTURE_PREFIX):
            return rec.exclude("derived", f"secondary capture ({rec.sop_class_uid})")
        desc = rec.series_description or ""
        for marker in rules.derived_series_markers:
            if marker.lower() in desc.lower():
                return rec.exclude("derived", f"series description {desc!r} contains {marker!r}")
    if rules.exclude_series:
        desc = rec.series_description or ""
        folders = Path(rec.source).parts[:-1]
        for sub in rules.exclude_series:
            s = sub.lower()
            if s in desc.lower():
                return rec.exclude("excluded_series", f"series description {desc!r} contains {sub!r}")
            for f in folders:
                if s in f.lower():
                    return rec.exclude("excluded_series", f"folder {f!r} contains {sub!r}")
    if not rec.sop_instance_uid:
        return rec.exclude("missing_uid", "no SOPInstanceUID")
    return rec


def walk_files(root: Path, errors: list | None = None):
    """Every regular file (or link to one) under root, at any depth, sorted: (path, rel).

    A folder that cannot be listed is never skipped silently: it is appended to
    ``errors`` as (relative folder path, reason).
    """
    stack = [root]
    out = []
    while stack:
        d = stack.pop()
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as exc:
            if errors is not None:
                rel = d.relative_to(root).as_posix() if d != root else "."
                errors.append((rel + "/", exc.strerror or str(exc)))
            continue
        for e in entries:
            if e.is_dir(follow_symlinks=False):
                stack.append(Path(e.path))
            elif e.is_file():  # follows links to files inside the dump
                out.append(Path(e.path))
    out.sort()
    return [(p, p.relative_to(root).as_posix()) for p in out]
