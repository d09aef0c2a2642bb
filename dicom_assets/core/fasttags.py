"""A small, fast reader of the few header tags the archive steps need, from bytes in hand.

The tarball and metadata steps already hold each file's first bytes (they copy or hash
them), so parsing a dozen tags from those bytes avoids a second read and pydicom's full
dataset machinery. It handles the common encodings (explicit and implicit VR little
endian, and any encapsulated transfer syntax, whose data sets are explicit VR little
endian) and skips sequences of undefined length. Anything else (big endian, preamble-less
files, exotic character sets, a header longer than the bytes given) returns ``None`` so the
caller falls back to pydicom; tests check both readers agree on every real sample file.

The deflated transfer syntax compresses everything after the file meta: its pixel data
element can only be found in the *inflated* data set. :func:`deflated_dataset` inflates it
(bounded, so a deflate bomb cannot fill memory) and :func:`scan_dataset` reads it as the
explicit VR little endian data set it is.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass

# tag -> (keyword, kind)  kind: s = string, i = integer string, m = multi-valued string
WANTED: dict[int, tuple[str, str]] = {
    0x00080008: ("ImageType", "m"),
    0x00080016: ("SOPClassUID", "s"),
    0x00080018: ("SOPInstanceUID", "s"),
    0x00080020: ("StudyDate", "s"),
    0x00080021: ("SeriesDate", "s"),
    0x00080022: ("AcquisitionDate", "s"),
    0x00080030: ("StudyTime", "s"),
    0x00080031: ("SeriesTime", "s"),
    0x00080032: ("AcquisitionTime", "s"),
    0x00080060: ("Modality", "s"),
    0x00080070: ("Manufacturer", "s"),
    0x0008103E: ("SeriesDescription", "s"),
    0x00100020: ("PatientID", "s"),
    0x00180023: ("MRAcquisitionType", "s"),
    0x00181030: ("ProtocolName", "s"),
    0x00189005: ("PulseSequenceName", "s"),
    0x0020000D: ("StudyInstanceUID", "s"),
    0x0020000E: ("SeriesInstanceUID", "s"),
    0x00200011: ("SeriesNumber", "i"),
    0x00200013: ("InstanceNumber", "i"),
}
KEYWORDS = tuple(k for k, _ in WANTED.values())
_LAST = max(WANTED)
LONG_VRS = {b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN", b"SQ", b"UT", b"UC", b"UR"}
_IMPLICIT_LE = "1.2.840.10008.1.2"
DEFLATED_TS = "1.2.840.10008.1.2.1.99"
_FALLBACK_TS = {"1.2.840.10008.1.2.2", DEFLATED_TS}  # explicit BE; deflated (see deflated_dataset)
_UNDEFINED = 0xFFFFFFFF


class _NeedFallback(Exception):
    pass


def _decode(raw: bytes, kind: str, utf8: bool):
    text = raw.decode("utf-8" if utf8 else "latin-1").rstrip("\x00 ")
    if kind == "m":
        return [v.strip() for v in text.split("\\")] if text else None
    text = text.strip()
    if not text:
        return None
    if kind == "i":
        try:
            return int(text)
        except ValueError:
            return None
    return text


def _skip_undefined(buf: bytes, pos: int, implicit: bool) -> int:
    """Skip a sequence of undefined length starting at pos (its first item); return the
    position after its delimiter."""
    n = len(buf)
    while True:
        if pos + 8 > n:
            raise _NeedFallback
        group, elem, length = struct.unpack_from("<HHI", buf, pos)
        pos += 8
        if (group, elem) == (0xFFFE, 0xE0DD):  # sequence delimiter
            return pos
        if (group, elem) != (0xFFFE, 0xE000):
            raise _NeedFallback
        if length != _UNDEFINED:
            pos += length
            continue
        # an item of undefined length: walk its elements until the item delimiter
        while True:
            if pos + 8 > n:
                raise _NeedFallback
            group, elem = struct.unpack_from("<HH", buf, pos)
            if (group, elem) == (0xFFFE, 0xE00D):
                pos += 8
                break
            pos, _tag, _vr, length, _vstart = _element(buf, pos, implicit)
            if length == _UNDEFINED:
                pos = _skip_undefined(buf, pos, implicit)
            else:
                pos += length


def _element(buf: bytes, pos: int, implicit: bool):
    """(position after header, tag, vr, length, value start)."""
    if pos + 8 > len(buf):
        raise _NeedFallback
    group, elem = struct.unpack_from("<HH", buf, pos)
    tag = (group << 16) | elem
    if implicit or group == 0xFFFE:
        (length,) = struct.unpack_from("<I", buf, pos + 4)
        return pos + 8, tag, None, length, pos + 8
    vr = buf[pos + 4: pos + 6]
    if not (vr.isalpha() and vr.isupper()):
        raise _NeedFallback  # not explicit VR after all (a malformed file): let pydicom guess
    if vr in LONG_VRS:
        if pos + 12 > len(buf):
            raise _NeedFallback
        (length,) = struct.unpack_from("<I", buf, pos + 8)
        return pos + 12, tag, vr, length, pos + 12
    (length,) = struct.unpack_from("<H", buf, pos + 6)
    return pos + 8, tag, vr, length, pos + 8


DATE_TAGS_END = 0x00080032  # AcquisitionTime: the last tag the tarball's mtimes need


def parse_tags(buf: bytes, last: int = _LAST) -> dict | None:
    """The WANTED tags (up to tag ``last``) from a DICOM file's leading bytes, or None to
    ask for pydicom."""
    try:
        return _parse(buf, last)
    except (_NeedFallback, struct.error, UnicodeDecodeError):
        return None


PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})


@dataclass
class HeaderScan:
    """What organize needs of a file, read up to its pixel data."""

    tags: dict
    media_sop_class: str | None
    has_pixels: bool
    pixel_value_start: int = 0
    pixel_length: int | None = 0  # 0xFFFFFFFF: encapsulated frames; None: element header cut short


def scan_header(buf: bytes, file_size: int) -> HeaderScan | None:
    """Parse every element up to the pixel data (decoding only WANTED tags); None asks
    for pydicom (unusual encodings, or a header longer than buf)."""
    try:
        return _parse(buf, None, file_size)
    except (_NeedFallback, struct.error, UnicodeDecodeError):
        return None


def _meta(buf: bytes) -> tuple[str | None, str | None, int]:
    """(transfer syntax, media storage SOP class, position after the file meta) of a file
    with a preamble; the file meta is always explicit VR little endian, group 0002."""
    if len(buf) < 132 or buf[128:132] != b"DICM":
        raise _NeedFallback
    pos = 132
    ts = None
    media_sop = None
    while pos + 8 <= len(buf):
        group = struct.unpack_from("<H", buf, pos)[0]
        if group != 0x0002:
            break
        after, tag, _vr, length, vstart = _element(buf, pos, False)
        if tag == 0x00020010:
            ts = buf[vstart: vstart + length].decode("ascii", "replace").rstrip("\x00 ")
        elif tag == 0x00020002:
            media_sop = buf[vstart: vstart + length].decode("ascii", "replace").rstrip("\x00 ") or None
        pos = after + length
    return ts, media_sop, pos


def _parse(buf: bytes, last: int | None = _LAST, file_size: int | None = None):
    ts, media_sop, pos = _meta(buf)
    if ts is None or ts in _FALLBACK_TS:
        raise _NeedFallback
    return _body(buf, pos, ts == _IMPLICIT_LE, media_sop, last, file_size)


# A deflated data set inflating past this is refused (a deflate bomb, or no image to keep).
MAX_INFLATED = 512 << 20


class InflateError(ValueError):
    """The deflated data set of a file cannot be inflated (corrupt, cut short or a bomb)."""


@dataclass
class Deflated:
    """A deflated-transfer-syntax file's data set, inflated."""

    data: bytes  # the data set (explicit VR little endian), without preamble or file meta
    media_sop_class: str | None


def deflated_dataset(head: bytes, fp) -> Deflated | None:
    """None unless ``head`` (a file's leading bytes) is a file in the deflated transfer
    syntax; else its data set, inflated from ``fp`` (the whole file, any position).

    Raises :class:`InflateError` when the deflate stream is corrupt, ends early, or
    inflates past ``MAX_INFLATED``."""
    try:
        ts, media_sop, pos = _meta(head)
    except (_NeedFallback, struct.error):
        return None
    if ts != DEFLATED_TS:
        return None
    fp.seek(pos)
    z = zlib.decompressobj(-zlib.MAX_WBITS)
    parts: list[bytes] = []
    total = 0
    try:
        while not z.eof:
            chunk = z.unconsumed_tail or fp.read(1 << 20)
            if not chunk:
                raise InflateError("the deflated data set is cut short (file truncated)")
            out = z.decompress(chunk, MAX_INFLATED + 1 - total)
            total += len(out)
            if total > MAX_INFLATED:
                raise InflateError(f"the deflated data set inflates past {MAX_INFLATED >> 20} MiB")
            parts.append(out)
    except zlib.error as exc:
        raise InflateError(f"the deflated data set is corrupt ({exc})") from None
    return Deflated(b"".join(parts), media_sop)


def scan_dataset(data: bytes, media_sop_class: str | None) -> HeaderScan | None:
    """:func:`scan_header` for a whole data set without preamble or file meta in explicit VR
    little endian (an inflated deflated file); None asks for pydicom."""
    try:
        return _body(data, 0, False, media_sop_class, None, len(data))
    except (_NeedFallback, struct.error, UnicodeDecodeError):
        return None


def _is_utf8(value: bytes) -> bool:
    """Whether a Specific Character Set value means UTF-8 (ISO_IR 192), False for the default
    repertoire and Latin-1; any other character set is left to pydicom (:class:`_NeedFallback`)."""
    cs = value.decode("ascii", "replace").strip("\x00 ").upper()
    if cs in ("", "ISO_IR 100", "ISO_IR 6", "ISO 2022 IR 6"):
        return False
    if cs == "ISO_IR 192":
        return True
    raise _NeedFallback  # other character sets: let pydicom decode


_ELEMENT = struct.Struct("<HH2sH")  # group, element, VR (explicit) and its 16-bit length
_U32 = struct.Struct("<I")


def _body(buf: bytes, pos: int, implicit: bool, media_sop: str | None, last: int | None,
          file_size: int | None):
    # the element header is read inline (what _element does, one struct call): this loop runs
    # for every element of every file's header, the hottest code of organize and metadata
    out: dict = dict.fromkeys(KEYWORDS)
    utf8 = False
    n = len(buf)
    whole = file_size is not None and n >= file_size
    element, u32 = _ELEMENT.unpack_from, _U32.unpack_from
    while True:
        if pos + 8 > n:
            if last is None and whole and pos == n:
                return HeaderScan(out, media_sop, False)  # the file ends without pixel data
            raise _NeedFallback  # header continues past the bytes we were given
        group, elem, vr, length = element(buf, pos)
        tag = (group << 16) | elem
        if implicit or group == 0xFFFE:
            (length,) = u32(buf, pos + 4)
            vstart = pos + 8
        elif vr in LONG_VRS:
            if pos + 12 > n:
                raise _NeedFallback
            (length,) = u32(buf, pos + 8)
            vstart = pos + 12
        elif vr.isalpha() and vr.isupper():
            vstart = pos + 8
        else:
            raise _NeedFallback  # not explicit VR after all (a malformed file): let pydicom guess
        if last is None and tag in PIXEL_TAGS:
            return HeaderScan(out, media_sop, True, vstart, length)
        if last is not None and tag > last:
            return out
        if tag == 0x00080005:  # Specific Character Set
            utf8 = _is_utf8(buf[vstart: vstart + length])
        if length == _UNDEFINED:
            pos = _skip_undefined(buf, vstart, implicit)
            continue
        if vstart + length > n:
            raise _NeedFallback
        spec = WANTED.get(tag)
        if spec is not None:
            out[spec[0]] = _decode(buf[vstart: vstart + length], spec[1], utf8)
        pos = vstart + length


def _value(ds, kw: str, kind: str):
    from pydicom.multival import MultiValue

    v = ds.get(kw)
    if v is None or v == "":
        return None
    if kind == "m":
        vals = list(v) if isinstance(v, (list, MultiValue)) else [v]
        return [str(x).strip() for x in vals] or None
    if kind == "i":
        try:
            return int(str(v).strip())
        except ValueError:
            return None
    s = str(v).strip()
    return s or None


def tags_from_dataset(ds) -> dict:
    """The WANTED tags of a pydicom data set, in the fast reader's forms."""
    return {kw: _value(ds, kw, kind) for kw, kind in WANTED.values()}


def read_tags_pydicom(fp) -> dict:
    """The same tags read with pydicom (slower, handles every encoding)."""
    import pydicom  # here: the fast path (most files) runs without it, so a reader process starts fast

    ds = pydicom.dcmread(fp, stop_before_pixels=True, force=True,
                         specific_tags=list(KEYWORDS) + ["SpecificCharacterSet"])
    return tags_from_dataset(ds)


def read_tags(head: bytes, full=None, last: int = _LAST) -> dict:
    """Tags from leading bytes; falls back to pydicom on ``full`` (a path or file object
    of the whole file) or, when not given, on the bytes in hand."""
    tags = parse_tags(head, last)
    if tags is not None:
        return tags
    return read_tags_pydicom(full if full is not None else io.BytesIO(head))
