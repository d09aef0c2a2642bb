"""Find DICOM files by content and classify each as kept or excluded, with a reason.

Only headers are read (``stop_before_pixels``): pixel data is never loaded. A truncated
file is still caught, by comparing the length the pixel data element declares with the
bytes the file really has.

Reasons (a fixed vocabulary, in the order they are tested):

==================  ==============================================================
``not_dicom``       not a DICOM file (no ``DICM`` marker and no parsable header),
                    empty, or gzip-compressed
``unreadable``      a DICOM file whose header cannot be parsed (whatever the reader
                    raises: the file is excluded, the visit goes on), whose pixel
                    data is cut short (truncated transfer), whose deflated data set
                    is corrupt or cut short, or unreadable permissions; a header
                    with neither a SOP Class UID nor pixel data (a DICM marker then
                    garbage), an image storage object without its pixel data (a
                    damaged header); also what the walk finds but cannot read as a
                    file: a folder that cannot be listed, a broken link, a link to a
                    folder, a FIFO/socket
``no_pixel_data``   a non-image object: DICOMDIR, structured report, presentation
                    state, raw data, spectroscopy, Siemens CSA report, ... or an
                    object of another (private) class with no pixel data element
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

import io
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from .fasttags import (
    LONG_VRS,
    PIXEL_TAGS,
    HeaderScan,
    InflateError,
    deflated_dataset,
    scan_dataset,
    scan_header,
    tags_from_dataset,
)

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


def sniff(head: bytes, size: int) -> str | None:
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


def _pixel_element(fp, ds) -> tuple[bool, int, int | None]:
    """(has pixel data, value start, declared length) at the element where pydicom stopped."""
    pos = fp.tell()
    head = fp.read(12)
    if len(head) < 8:
        return False, 0, 0
    implicit, little = getattr(ds, "original_encoding", (False, True))
    if implicit is None:
        implicit, little = False, True
    end = "<" if little is not False else ">"
    group, elem = struct.unpack(end + "HH", head[:4])
    if (group << 16) | elem not in PIXEL_TAGS:
        return False, 0, 0
    if implicit:
        return True, pos + 8, struct.unpack(end + "I", head[4:8])[0]
    if head[4:6] in LONG_VRS:
        if len(head) < 12:
            return True, 0, None
        return True, pos + 12, struct.unpack(end + "I", head[8:12])[0]
    return True, pos + 8, struct.unpack(end + "H", head[6:8])[0]


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


def _truncation(scan: HeaderScan, fp, size: int) -> str | None:
    """Why the pixel data is cut short, or None: checked from the declared length alone."""
    if not scan.has_pixels:
        return None
    if scan.pixel_length is None:
        return "pixel data header is cut short"
    if scan.pixel_length == 0xFFFFFFFF:  # encapsulated frames end with a sequence delimiter
        fp.seek(max(0, size - 256))
        return None if _SEQ_DELIM in fp.read() else "compressed pixel data has no end (file truncated)"
    missing = scan.pixel_value_start + scan.pixel_length - size
    if missing > 0:
        return f"pixel data declares {scan.pixel_length} bytes but the file ends {missing} bytes early (truncated)"
    return None


def _record_from_scan(rec: FileRecord, scan: HeaderScan, fp, size: int) -> FileRecord:
    """One way from header tags to a record, whichever reader produced them."""
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
    problem = _truncation(scan, fp, size)
    if problem:
        return rec.exclude("unreadable", problem)
    return _classify_object(rec, scan.has_pixels)


def is_image_storage(sop_class: str | None) -> bool:
    """Whether a SOP class is an image storage class of the standard (its PS3.6 name says
    "Image Storage"): such an object without pixel data is damaged, not a non-image object."""
    if not sop_class:
        return False
    from pydicom.uid import UID_dictionary

    entry = UID_dictionary.get(sop_class)
    return bool(entry) and "Image Storage" in entry[0]


def _classify_object(rec: FileRecord, has_pixels: bool) -> FileRecord:
    kind = non_image_kind(rec.sop_class_uid)
    if kind:
        return rec.exclude("no_pixel_data", f"non-image object: {kind} ({rec.sop_class_uid})")
    if has_pixels:
        return rec
    # a reason a curator acts on must be the true one: a header with nothing that makes it an
    # object (no SOP Class UID), or an image object without its image, is damaged
    if not rec.sop_class_uid or not rec.sop_instance_uid:
        return rec.exclude("unreadable", "the header holds no SOP Class UID or no SOP Instance UID, and no pixel "
                                         "data: damaged, cut short, or not a DICOM object after its DICM marker")
    if is_image_storage(rec.sop_class_uid) or rec.image_type:  # ImageType: an image IOD's (Type 1)
        return rec.exclude("unreadable", f"an image object ({rec.sop_class_uid}) without pixel data: the header "
                                         "is damaged or the file cut")
    return rec.exclude("no_pixel_data", "no pixel data element")


def _pydicom_scan(fp, rec: FileRecord, media: str | None = None) -> HeaderScan | FileRecord:
    """The header through pydicom (any encoding), or the record excluded with the reason.

    ``media``: the media storage SOP class when fp is a data set without its file meta
    (an inflated deflated file)."""
    import pydicom  # here, not at the top: a header-reading worker starts without it (most files never need it)

    fp.seek(0)
    try:
        ds = pydicom.dcmread(fp, stop_before_pixels=True, force=True)
        has_pixels, start, length = _pixel_element(fp, ds)
    except Exception as exc:  # whatever a corrupt header makes pydicom raise: this file only
        return rec.exclude("unreadable", f"header cannot be parsed: {type(exc).__name__}: {exc}"[:300])
    try:
        tags = tags_from_dataset(ds)
        meta = getattr(ds, "file_meta", None)
        if meta:
            media = str(meta.get("MediaStorageSOPClassUID", "") or "").strip() or media
    except Exception as exc:  # a value that cannot be decoded is a corrupt header
        return rec.exclude("unreadable", f"header values cannot be decoded: {type(exc).__name__}: {exc}"[:300])
    if len(ds) == 0 and not (tags["SOPClassUID"] or media):
        return rec.exclude("not_dicom", "no DICOM elements could be read")
    return HeaderScan(tags, media, has_pixels, start, length)


def _scan(fp, head: bytes, size: int, rec: FileRecord, force_pydicom: bool) -> FileRecord:
    scan = None if force_pydicom else scan_header(head, size)
    media = None
    if scan is None:
        try:
            deflated = deflated_dataset(head, fp)
        except InflateError as exc:
            return rec.exclude("unreadable", str(exc))
        if deflated is not None:  # the pixel data is found in the inflated data set, never in the stream
            media = deflated.media_sop_class
            fp, size = io.BytesIO(deflated.data), len(deflated.data)
            scan = None if force_pydicom else scan_dataset(deflated.data, media)
    if scan is None:
        scan = _pydicom_scan(fp, rec, media)
        if isinstance(scan, FileRecord):
            return scan  # excluded: the header could not be read
    return _record_from_scan(rec, scan, fp, size)


def read_record(path: Path, rel: str, force_pydicom: bool = False) -> FileRecord:
    """Read one file's header and classify it on its own (no duplicate check yet).

    The fast reader (``fasttags.scan_header``) handles the common encodings from the first
    64 KiB; anything else goes through pydicom. Both give the same record (tested). Whatever
    a hostile file makes either reader raise excludes that file as ``unreadable``; it never
    stops the visit (one ``try`` around the whole file, nothing per tag)."""
    size = 0
    try:
        size = os.stat(path).st_size
        with open(path, "rb") as fp:
            head = fp.read(HEAD_BYTES)
            rec = FileRecord(source=rel, size=size)
            problem = sniff(head, size)
            if problem:
                return rec.exclude("not_dicom", problem)
            return _scan(fp, head, size, rec, force_pydicom)
    except PermissionError:
        return FileRecord(source=rel, size=size).exclude("unreadable", "permission denied")
    except OSError as exc:
        return FileRecord(source=rel, size=size).exclude("unreadable", f"cannot read: {exc.strerror or exc}")
    except Exception as exc:  # RecursionError, MemoryError, zlib.error, ...: this file only
        return FileRecord(source=rel, size=size).exclude(
            "unreadable", f"header cannot be parsed: {type(exc).__name__}: {exc}"[:300])


def read_records(files: list[tuple[Path, str]]) -> list[FileRecord]:
    """:func:`read_record` of each (path, rel), in order (a process pool's unit of work)."""
    return [read_record(path, rel) for path, rel in files]


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

    Nothing is skipped silently: a folder that cannot be listed, a broken link, a link to a
    folder (not followed) and anything else that is no regular file (a FIFO, a socket, a
    device) is appended to ``errors`` as (relative path, why).
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
                errors.append((rel + "/", f"folder cannot be listed: {exc.strerror or exc}"))
            continue
        for e in entries:
            try:
                if e.is_dir(follow_symlinks=False):
                    stack.append(Path(e.path))
                    continue
                if e.is_file():  # follows links to files inside the dump
                    out.append(Path(e.path))
                    continue
                why = _not_a_file(e)
            except OSError as exc:
                why = f"cannot be examined: {exc.strerror or exc}"
            if errors is not None:
                errors.append((Path(e.path).relative_to(root).as_posix(), why))
    out.sort()
    return [(p, p.relative_to(root).as_posix()) for p in out]


def _not_a_file(e: os.DirEntry) -> str:
    if e.is_symlink():
        target = os.readlink(e.path)
        return f"a link to a folder, not followed ({target})" if os.path.isdir(e.path) else f"a broken link ({target})"
    return "not a regular file (a FIFO, socket or device)"
