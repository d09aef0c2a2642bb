"""De-identification of a visit's DICOMs by DICOM PS3.15 Annex E, and the leak check after it.

The profile is the standard's own Table E.1-1 (edition :data:`PROFILE_EDITION`), kept as data
in ``dicom_assets/deid_profile/`` (its README says where the copy came from); nothing here
lists attributes by hand. :func:`load_profile` turns the table and the chosen options into one
action per attribute:

* options: each chosen option's column overrides the Basic Profile's code where its cell is
  not empty; when two chosen options disagree, ``C`` (clean) wins over ``K`` (keep);
* the combined codes are resolved without the IOD's attribute types (not read here) to the
  choice that is valid whatever the type: ``X/Z`` -> ``Z`` (on a sequence: its items kept and
  de-identified, as an empty sequence is invalid where it is Type 3), ``X/D``, ``Z/D`` and
  ``X/Z/D`` -> ``D``, ``X/Z/U*`` -> the sequence is kept and its content de-identified (its UIDs
  replaced);
* the actions: ``X`` removed, ``Z`` emptied, ``D`` a dummy of the VR (a UID: replaced), ``K`` kept,
  ``U`` replaced by a keyed UID, ``C`` cleaned: a date (DA, DT) shifted by the participant's
  shift (Retain Longitudinal Temporal Information with Modified Dates), a text kept with every
  identifying value of the visit cut out of it, a private attribute kept only when it is on
  the site's safe list (Retain Safe Private);
* an attribute not in the table is kept; the table is applied inside sequences at every
  depth; private attributes are removed unless Retain Safe Private is chosen and they are on
  the safe list (their creator is kept with them).

Keys: pseudonyms, UIDs (``2.25.`` and the integer of an HMAC-SHA256 digest of the original UID)
and the date shift all come from one site secret, so the same key gives the same bytes, a
UID keeps its new value across files, series and a participant's visits, and another key gives
nothing in common. The key itself is never stored; :func:`key_fingerprint` may be shown.

The leak check (:func:`leak_check`) reads the written files back and looks, in every element
(nested sequences, private attributes, the file meta) and in the file names, for every value
the profile took out of the source visit (:func:`identifying_values`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID

from .errors import DicomAssetsError

PROFILE_DIR = Path(__file__).parents[1] / "deid_profile"
PROFILE_EDITION = "2024b"
PROFILE_FILE = PROFILE_DIR / f"ps3.15_table_e.1-1_{PROFILE_EDITION}.json"
PROFILE_SHA256 = "a99a35d1278e2bace8d90ff791b11aea2d45f1e3e1230388eb5224c9dbcd29e6"

#: the options a site may choose: config name -> (column of the table, CID 7050 code, meaning)
OPTIONS: dict[str, tuple[str, str, str]] = {
    "retain_safe_private": ("rtnSafePrivOpt", "113111", "Retain Safe Private Option"),
    "retain_uids": ("rtnUIDsOpt", "113110", "Retain UIDs Option"),
    "retain_device_identity": ("rtnDevIdOpt", "113109", "Retain Device Identity Option"),
    "retain_institution_identity": ("rtnInstIdOpt", "113112", "Retain Institution Identity Option"),
    "retain_patient_characteristics": ("rtnPatCharsOpt", "113108", "Retain Patient Characteristics Option"),
    "retain_longitudinal_full_dates": ("rtnLongFullDatesOpt", "113106",
                                       "Retain Longitudinal Temporal Information Full Dates Option"),
    "retain_longitudinal_modified_dates": ("rtnLongModifDatesOpt", "113107",
                                           "Retain Longitudinal Temporal Information Modified Dates Option"),
    "clean_descriptors": ("cleanDescOpt", "113105", "Clean Descriptors Option"),
}
DEFAULT_OPTIONS = ("retain_longitudinal_modified_dates", "retain_patient_characteristics",
                   "retain_device_identity", "clean_descriptors", "retain_safe_private")
_RESOLVE = {"X": "X", "Z": "Z", "D": "D", "K": "K", "C": "C", "U": "U",
            "X/Z": "XZ", "X/D": "D", "Z/D": "D", "X/Z/D": "D", "X/Z/U*": "U*", "X/Z/U": "U*"}
MIN_KEY_CHARS = 16
DATE_SHIFT_DAYS = (365, 3650)  # a participant's dates move this many days back (from the key)

_TEXT_VRS = {"AE", "CS", "DS", "IS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT", "AS"}
_BINARY_VRS = {"OB", "OW", "OF", "OD", "OL", "OV", "UN"}
_NUMBER_VRS = {"US", "SS", "UL", "SL", "FL", "FD", "SV", "UV"}
_DUMMY_TEXT = {"DA": "19000101", "TM": "000000", "DT": "19000101000000", "DS": "0", "IS": "0", "AS": "000D",
               "UR": ""}
DUMMY = "ANONYMIZED"
_BULK = {0x7FE00010, 0x7FE00008, 0x7FE00009}  # pixel data: not text, not searched
_WELL_KNOWN_UID = "1.2.840.10008."
_NEW_UID = re.compile(r"2\.25\.\d+")
MIN_UID_TEXT = 20  # a source UID this long (and of 5 parts or more) is also searched inside text and bytes


class DeidError(DicomAssetsError):
    """A de-identification that cannot be done as configured (no key, an unknown option)."""


# --------------------------------------------------------------------------- the profile
@dataclass(frozen=True)
class Profile:
    """Table E.1-1 with options applied: one resolved action per tag (see the module docstring)."""

    edition: str
    table_sha256: str
    options: tuple[str, ...]
    exact: dict[int, str]
    masked: tuple[tuple[int, int, int, int, str], ...]  # (group mask, group, element mask, element, action)
    private: str  # the Private Attributes row: "X", or "C" with Retain Safe Private
    names: dict[int, str]

    def action(self, tag: int) -> str | None:
        found = self.exact.get(tag)
        if found is not None:
            return found
        group, elem = tag >> 16, tag & 0xFFFF
        for gmask, gval, emask, evalue, action in self.masked:
            if group & gmask == gval and elem & emask == evalue:
                return action
        return None

    @property
    def version(self) -> str:
        """Changes when the table or the options change (a code/data version of the copy)."""
        text = json.dumps([self.edition, self.table_sha256, sorted(self.options)])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def describe(self) -> str:
        names = ", ".join(OPTIONS[o][2] for o in self.options) or "no option"
        return f"DICOM PS3.15 {self.edition} Basic Application Level Confidentiality Profile; {names}"


def _effective(row: dict, options: tuple[str, ...]) -> str:
    codes = [row[OPTIONS[o][0]] for o in options if row.get(OPTIONS[o][0])]
    code = "C" if "C" in codes else "K" if "K" in codes else row["basicProfile"].strip()
    if code not in _RESOLVE:
        raise DeidError(f"{PROFILE_FILE.name}: {row['tag']} has the unknown action code {code!r}")
    return _RESOLVE[code]


def _mask(part: str) -> tuple[int, int]:
    mask = value = 0
    for i, ch in enumerate(part.upper()):
        shift = (3 - i) * 4
        if ch != "X":
            mask |= 0xF << shift
            value |= int(ch, 16) << shift
    return mask, value


def load_profile(options: tuple[str, ...] | list[str] = DEFAULT_OPTIONS) -> Profile:
    """The table of :data:`PROFILE_FILE` (its sha256 checked) with ``options`` chosen."""
    options = tuple(dict.fromkeys(options))
    unknown = [o for o in options if o not in OPTIONS]
    if unknown:
        raise DeidError(f"unknown de-identification option(s) {unknown}; known: {', '.join(OPTIONS)}")
    if {"retain_longitudinal_full_dates", "retain_longitudinal_modified_dates"} <= set(options):
        raise DeidError("retain_longitudinal_full_dates and retain_longitudinal_modified_dates exclude each other")
    raw = PROFILE_FILE.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != PROFILE_SHA256:
        raise DeidError(f"{PROFILE_FILE}: sha256 {digest}, not the recorded copy of the table ({PROFILE_SHA256})")
    exact, masked, names, private = {}, [], {}, "X"
    for row in json.loads(raw):
        action = _effective(row, options)
        m = re.fullmatch(r"\(([0-9A-FX]{4}),([0-9A-FX]{4})\)", row["tag"].upper())
        if m is None:  # the Private Attributes row: (GGGG,EEEE) where GGGG is odd
            private = action
            continue
        if "X" in m.group(1) + m.group(2):
            masked.append((*_mask(m.group(1)), *_mask(m.group(2)), action))
            continue
        tag = int(m.group(1) + m.group(2), 16)
        exact[tag], names[tag] = action, row["name"]
    return Profile(PROFILE_EDITION, digest, tuple(sorted(options)), exact, tuple(masked), private, names)


# --------------------------------------------------------------------------- keys
def _digest(key: bytes, purpose: str, value: str) -> bytes:
    return hmac.new(key, purpose.encode() + b"\0" + value.encode("utf-8", "surrogateescape"), hashlib.sha256).digest()


def check_key(key: str | None, variable: str = "DICOM_ASSETS_DEID_KEY") -> bytes:
    if not key:
        raise DeidError(f"{variable} is not set: the de-identification key (a site secret) is needed")
    if len(key) < MIN_KEY_CHARS:
        raise DeidError(f"{variable} is shorter than {MIN_KEY_CHARS} characters: too weak a key")
    return key.encode()


def key_fingerprint(key: bytes) -> str:
    """12 hex digits that tell two keys apart (a hash of the key; the key cannot be read back)."""
    return hashlib.sha256(b"dicom-assets deid key fingerprint\0" + key).hexdigest()[:12]


def share_version(profile: Profile, safe_private: tuple[SafePrivate, ...], fingerprint: str) -> str:
    """One version of all that decides a shared copy besides its source: the table (edition,
    sha256), the options, the safe list and the key (by its fingerprint). Another value: every
    copy made before is stale."""
    safe = sorted((s.group, s.creator, s.element) for s in safe_private)
    text = json.dumps([profile.version, safe, fingerprint])
    return "deid-" + hashlib.sha256(text.encode()).hexdigest()[:16]


def pseudonym(key: bytes, participant: str) -> str:
    """The participant's keyed pseudonym: letters and digits (a participant id of the layout)."""
    return "S" + _digest(key, "participant", participant).hex()[:12].upper()


def date_shift_days(key: bytes, participant: str) -> int:
    lo, hi = DATE_SHIFT_DAYS
    return lo + int.from_bytes(_digest(key, "dateshift", participant)[:8], "big") % (hi - lo + 1)


def remap_uid(key: bytes, uid: str) -> str:
    """``2.25.`` and the 128-bit integer of the keyed digest of ``uid`` (at most 44 characters);
    a UID of the standard (``1.2.840.10008.``) is kept."""
    uid = str(uid).strip().rstrip("\0")
    if not uid or uid.startswith(_WELL_KNOWN_UID):
        return uid
    return "2.25." + str(int.from_bytes(_digest(key, "uid", uid)[:16], "big"))


@dataclass(frozen=True)
class SafePrivate:
    """A private attribute the site declares safe: its group, its creator, the last two hex
    digits of its element (``(0019,xx0C)`` of ``SIEMENS MR HEADER``: b-value)."""

    group: int
    creator: str
    element: int


#: Siemens private attributes dcm2niix reads to rebuild what was acquired: the CSA Image Header
#: (mosaic layout, diffusion direction and b-value, slice normal, phase encoding direction) and
#: the MR header's mosaic, diffusion and slice-timing elements. Without them a mosaic stays a
#: mosaic and a DWI loses its gradients. A safe list a site may start from (core.config's
#: ``deid.safe_private`` form); none of them holds an identifying value in the samples (the leak
#: check reads their bytes), but they are the site's to declare. The CSA Series Header (the
#: Phoenix protocol, which names reference images by UID) is left out.
DCM2NIIX_SIEMENS_SAFE_PRIVATE = (
    {"group": "0029", "creator": "SIEMENS CSA HEADER", "element": "10"},
    *({"group": "0019", "creator": "SIEMENS MR HEADER", "element": e}
      for e in ("08", "09", "0A", "0B", "0C", "0D", "0E", "27", "28", "29")),
)


@dataclass
class Context:
    """What de-identifying one participant's files needs."""

    key: bytes
    participant: str
    profile: Profile
    safe_private: tuple[SafePrivate, ...] = ()
    identifiers: list[str] = field(default_factory=list)  # cut out of the texts that are cleaned
    _pattern: tuple | None = None

    def scrub_pattern(self) -> re.Pattern | None:
        if self._pattern is None or self._pattern[0] != self.identifiers:
            self._pattern = (list(self.identifiers), terms_pattern(self.identifiers))
        return self._pattern[1]

    @property
    def pseudonym(self) -> str:
        return pseudonym(self.key, self.participant)

    @property
    def shift(self) -> int:
        return date_shift_days(self.key, self.participant)


# --------------------------------------------------------------------------- applying it
def _shift_date(value: str, days: int) -> str:
    text = str(value).strip()
    try:
        day = dt.datetime.strptime(text[:8], "%Y%m%d").date()
    except ValueError:
        return ""
    return (day - dt.timedelta(days=days)).strftime("%Y%m%d") + text[8:]


def _values(elem: DataElement) -> list:
    value = elem.value
    if value is None or value == "":
        return []
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return list(value)
    return [value]


def _set(elem: DataElement, values: list) -> None:
    elem.value = values[0] if len(values) == 1 else values


def _dummy(elem: DataElement, ctx: Context) -> None:
    if elem.VR == "UI":
        _set(elem, [remap_uid(ctx.key, v) for v in _values(elem)] or [""])
    elif elem.VR in _DUMMY_TEXT:
        elem.value = _DUMMY_TEXT[elem.VR]
    elif elem.VR in _NUMBER_VRS:
        elem.value = 0
    elif elem.VR in _BINARY_VRS:
        elem.value = b""
    elif elem.VR in _TEXT_VRS:
        elem.value = DUMMY


def terms_pattern(terms) -> re.Pattern | None:
    """One case-insensitive pattern matching any of ``terms``, the longest first (None: no term)."""
    terms = sorted({t.lower() for t in terms}, key=lambda t: (-len(t), t))
    return re.compile("|".join(map(re.escape, terms)), re.IGNORECASE) if terms else None


def scrub_text(text: str, pattern: re.Pattern | None) -> str:
    """``text`` with every identifying value (``pattern``, :func:`terms_pattern`) cut out, spaces tidied."""
    out = pattern.sub("", str(text)) if pattern is not None else str(text)
    return re.sub(r"\s{2,}", " ", out).strip(" ^-_,;")


def _clean(elem: DataElement, ctx: Context) -> None:
    if elem.VR in ("DA", "DT"):
        if "retain_longitudinal_modified_dates" in ctx.profile.options:
            _set(elem, [_shift_date(v, ctx.shift) for v in _values(elem)] or [""])
        else:
            elem.value = elem.empty_value
    elif elem.VR in _TEXT_VRS:
        # a value that was nothing but identifying values becomes a dummy, not empty: an attribute
        # of Type 1 (Structure Set Label holding the Study ID) must keep a value
        pattern = ctx.scrub_pattern()
        dummy = _DUMMY_TEXT.get(elem.VR, DUMMY) or DUMMY
        _set(elem, [scrub_text(v, pattern) or dummy for v in _values(elem)] or [""])
    elif elem.VR not in ("TM", "SQ") and elem.VR not in _NUMBER_VRS:
        elem.value = elem.empty_value


def _apply(elem: DataElement, action: str | None, ctx: Context) -> bool:
    """Apply ``action`` to ``elem``; False when the element goes."""
    if action == "X":
        return False
    if elem.VR == "SQ":
        if action == "Z":
            elem.value = Sequence()
        else:  # kept, cleaned, dummy, X/Z or U*: the table applied to its items
            for item in elem.value or []:
                deidentify_dataset(item, ctx)
        return True
    if action == "XZ":
        action = "Z"
    if action == "Z":
        elem.value = elem.empty_value
    elif action == "D":
        _dummy(elem, ctx)
    elif action in ("U", "U*"):
        _set(elem, [remap_uid(ctx.key, v) for v in _values(elem)] or [""])
    elif action == "C":
        _clean(elem, ctx)
    return True


def _creator(ds: Dataset, tag: int) -> str | None:
    group, elem = tag >> 16, tag & 0xFFFF
    if elem < 0x1000:
        return None
    creator = ds.get((group << 16) | (elem >> 8))
    return str(creator.value).strip() if creator is not None and creator.value else None


def _safe_private_tags(ds: Dataset, ctx: Context) -> set[int]:
    """The private tags of ``ds`` to keep: safe-listed elements and the creators of their blocks."""
    if ctx.profile.private != "C" or not ctx.safe_private:
        return set()
    keep: set[int] = set()
    for elem in ds:
        tag = int(elem.tag)
        if not elem.tag.is_private or (tag & 0xFFFF) < 0x1000:
            continue
        creator = _creator(ds, tag)
        group, low = tag >> 16, tag & 0xFF
        if any(s.group == group and s.element == low and s.creator == creator for s in ctx.safe_private):
            keep |= {tag, (group << 16) | ((tag & 0xFFFF) >> 8)}
    return keep


def deidentify_dataset(ds: Dataset, ctx: Context) -> None:
    """Apply the profile to ``ds`` in place, at every depth of its sequences. An element that
    goes (private, ``X``) or stays as it is (``K``, not in the table; not a sequence, nor of an
    unknown VR that may be one) is never decoded: pydicom's value conversion was half the time
    (bench/deid.py)."""
    safe = _safe_private_tags(ds, ctx)
    for tag in [int(t) for t in ds.keys()]:
        if (tag >> 16) % 2:  # private: an odd group
            if tag not in safe:
                del ds[tag]
            continue
        action = ctx.profile.action(tag)
        if action == "X":
            del ds[tag]
            continue
        if action in (None, "K") and ds.get_item(tag).VR not in (None, "SQ", "UN"):
            continue
        if not _apply(ds[tag], action, ctx):
            del ds[tag]
    _drop_orphan_overlays(ds)
    _drop_unconditioned(ds)


#: Type 1C attributes that may be present only with another (PS3.3), where Table E.1-1 removes
#: the condition (X) but replaces the dependent (D): once the condition is gone, the dependent
#: goes too, as the module requires. C.7.1.3 Clinical Trial Subject Module: Clinical Trial
#: Protocol Ethics Committee Name (0012,0081) is "Required if Clinical Trial Protocol Ethics
#: Committee Approval Number (0012,0082) is present" (dciodvfy: "Attribute present when
#: condition unsatisfied"; bench/deid.py found it, Orthanc has the same error).
PRESENT_ONLY_WITH = {0x00120081: 0x00120082}


def _drop_unconditioned(ds: Dataset) -> None:
    for dependent, condition in PRESENT_ONLY_WITH.items():
        if dependent in ds and condition not in ds:
            del ds[dependent]


def _drop_orphan_overlays(ds: Dataset) -> None:
    """An overlay group (60xx) whose Overlay Data the profile removed goes whole: its other
    attributes alone would be an Overlay Plane module without its Type 1 data (dciodvfy's error)."""
    groups = {int(t) >> 16 for t in ds.keys() if 0x6000 <= int(t) >> 16 <= 0x601E and not (int(t) >> 16) % 2}
    for group in groups:
        if (group << 16 | 0x3000) not in ds:
            for tag in [int(t) for t in ds.keys() if int(t) >> 16 == group]:
                del ds[tag]


def _method_codes(profile: Profile) -> Sequence:
    items = []
    for code, meaning in [("113100", "Basic Application Confidentiality Profile")] + [
            (OPTIONS[o][1], OPTIONS[o][2]) for o in profile.options]:
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code, "DCM", meaning
        items.append(item)
    return Sequence(items)


def mark_deidentified(ds: Dataset, ctx: Context) -> None:
    """The participant's pseudonym as name and id, and the attributes that say how the copy was
    made (PS3.15 E.1.1: Patient Identity Removed, De-identification Method and its codes)."""
    ds.PatientName = ctx.pseudonym
    ds.PatientID = ctx.pseudonym
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = ctx.profile.describe()[:64]
    ds.DeidentificationMethodCodeSequence = _method_codes(ctx.profile)
    opts = ctx.profile.options
    ds.LongitudinalTemporalInformationModified = (
        "MODIFIED" if "retain_longitudinal_modified_dates" in opts
        else "UNMODIFIED" if "retain_longitudinal_full_dates" in opts else "REMOVED")


def deidentify(ds: Dataset, ctx: Context) -> Dataset:
    """``ds`` (read with its file meta) de-identified in place, with a new file meta; returned."""
    deidentify_dataset(ds, ctx)
    mark_deidentified(ds, ctx)
    old = getattr(ds, "file_meta", None) or FileMetaDataset()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = old.get("TransferSyntaxUID", "1.2.840.10008.1.2.1")
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    return ds


# --------------------------------------------------------------------------- burned-in text
SECONDARY_CAPTURE = {
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.7.1": "Multi-frame Single Bit Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.7.2": "Multi-frame Grayscale Byte Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.7.3": "Multi-frame Grayscale Word Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.7.4": "Multi-frame True Color Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.104.1": "Encapsulated PDF",
}
#: ImageType values and series descriptions of vendor series that carry text in their pixels
#: (screen saves, dose and protocol reports, Siemens' CSA and Phoenix reports)
TEXT_IMAGE_TYPES = ("SCREEN SAVE", "SCREENSHOT", "CSA REPORT", "DOSE REPORT", "DOSE_INFO", "REPORT")
TEXT_SERIES = re.compile(r"dose report|patient protocol|phoenix ?zip ?report|screen ?save|screen ?shot|"
                         r"exam protocol", re.IGNORECASE)


def burned_in_reason(ds: Dataset) -> str | None:
    """Why the image may carry burned-in text (so it stays out of the shared copy), or None."""
    if str(ds.get("BurnedInAnnotation", "")).strip().upper() == "YES":
        return "BurnedInAnnotation is YES"
    sop = str(ds.get("SOPClassUID", ""))
    if sop in SECONDARY_CAPTURE:
        return f"SOP class {SECONDARY_CAPTURE[sop]} ({sop}): may carry burned-in text"
    image_type = [str(v).strip().upper() for v in _values(ds["ImageType"])] if "ImageType" in ds else []
    hits = [t for t in TEXT_IMAGE_TYPES if t in image_type]
    if hits:
        return f"ImageType {'/'.join(image_type)} holds {hits[0]}: a screen or report image"
    desc = str(ds.get("SeriesDescription", ""))
    if "DERIVED" in image_type and TEXT_SERIES.search(desc):
        return f"derived series described as {desc!r}: a vendor report with text in its pixels"
    return None


# --------------------------------------------------------------------------- the leak check
@dataclass(frozen=True)
class Identifier:
    """A value the profile took out of the source, and where it was (a keyword or tag)."""

    value: str
    source: str


def _terms(elem: DataElement) -> list[str]:
    out: list[str] = []
    for v in _values(elem):
        text = str(v).strip().rstrip("\0")
        if elem.VR == "PN":
            out += [p.strip() for p in re.split(r"[\^=]", text)]
        if elem.VR in ("DA", "DT") and len(text) >= 8:
            out += [text[:8], f"{text[:4]}-{text[4:6]}-{text[6:8]}"]
            continue
        out.append(text)
    return [t for t in out if t]


def _removing(action: str | None, vr: str) -> bool:
    return action in ("X", "Z", "XZ", "D", "U", "U*") or (action == "C" and vr in ("DA", "DT"))


def identifying_values(ds: Dataset, profile: Profile, into: dict[str, Identifier] | None = None
                       ) -> dict[str, Identifier]:
    """Every value of ``ds`` (at every depth) that the profile removes, empties, replaces or
    shifts: names and their parts, ids, dates (as ``YYYYMMDD`` and ``YYYY-MM-DD``), UIDs,
    institutions, addresses, descriptions (unless Clean Descriptors keeps them cleaned). By
    lowercased value."""
    into = {} if into is None else into
    for elem in ds:
        tag = int(elem.tag)
        if elem.tag.is_private:
            continue
        action = profile.action(tag)
        if elem.VR == "SQ":
            for item in elem.value or []:
                identifying_values(item, profile, into)
            continue
        if not _removing(action, elem.VR) or elem.VR in _BINARY_VRS or elem.VR in _NUMBER_VRS:
            continue
        for term in _terms(elem):
            if elem.VR == "UI" and term.startswith(_WELL_KNOWN_UID):
                continue
            into.setdefault(term.lower(), Identifier(term, elem.keyword or f"({tag >> 16:04X},{tag & 0xFFFF:04X})"))
    return into


def kept_values(ds: Dataset, profile: Profile, into: set[str] | None = None) -> set[str]:
    """The lowercased text values of ``ds`` (at every depth) that the profile keeps as they are:
    standard attributes not in the table or marked K."""
    into = set() if into is None else into
    for elem in ds:
        if elem.tag.is_private:
            continue
        if elem.VR == "SQ":
            for item in elem.value or []:
                kept_values(item, profile, into)
        elif elem.VR in _TEXT_VRS and profile.action(int(elem.tag)) in (None, "K"):
            into.update(str(v).strip().lower() for v in _values(elem) if str(v).strip())
    return into


_ALWAYS_SEARCHED = re.compile(r"(ID|IDs|Number|Numbers|Address|Telephone.*|Patient.*|.*Physician.*|.*Operator.*)$")


def _kept_elsewhere(term: str, ident: Identifier, kept: set[str]) -> bool:
    """A description or institution-like value that the source also carries in an attribute the
    profile keeps (``TOSHIBA`` as InstitutionName and inside Manufacturer ``TOSHIBA_MEC``): the copy
    carries it by the profile's decision, so it is not searched. Names, ids, numbers, addresses,
    dates and UIDs are always searched."""
    if re.fullmatch(r"[0-9.\-]+", term) or _ALWAYS_SEARCHED.search(ident.source) or "^" in term:
        return False
    return any(term in value for value in kept)


def searchable(identifiers: dict[str, Identifier]) -> dict[str, Identifier]:
    """The identifiers worth searching in text: 4 characters or more, and 6 or more when only
    digits (a shorter one is found everywhere: in counts, in the digits of the new UIDs)."""
    return {k: v for k, v in identifiers.items() if len(k) >= (6 if k.isdigit() else 4)}


@dataclass(frozen=True)
class LeakHit:
    file: str      # the output file, relative to the shared copy's folder
    path: str      # the tag path, e.g. ReferencedImageSequence[0].ReferencedSOPInstanceUID, or "file name"
    source: str    # the source attribute whose value was found (never the value itself)


def _tag_name(elem: DataElement) -> str:
    tag = int(elem.tag)
    hexed = f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
    return hexed if elem.tag.is_private or not elem.keyword else elem.keyword


def _as_text(elem: DataElement) -> str:
    if elem.VR in _BINARY_VRS or isinstance(elem.value, bytes):
        raw = elem.value if isinstance(elem.value, bytes) else b""
        return raw.decode("latin-1")
    return "\\".join(str(v) for v in _values(elem))


def _scan(ds: Dataset, prefix: str, idents: dict[str, Identifier], uids: dict[str, Identifier],
          file: str, hits: list[LeakHit], pattern: re.Pattern | None = None) -> None:
    for elem in ds:
        path = f"{prefix}{_tag_name(elem)}"
        if elem.VR == "SQ":
            for i, item in enumerate(elem.value or []):
                _scan(item, f"{path}[{i}].", idents, uids, file, hits, pattern)
            continue
        if int(elem.tag) in _BULK:
            continue
        if elem.VR == "UI":
            for v in _values(elem):
                found = uids.get(str(v).strip().rstrip("\0").lower())
                if found is not None:
                    hits.append(LeakHit(file, path, found.source))
            continue
        m = pattern.search(_as_text(elem)) if pattern is not None else None
        if m is not None:
            hits.append(LeakHit(file, path, idents[m.group(0).lower()].source))


@dataclass(frozen=True)
class Needles:
    """The identifiers prepared for scanning: UIDs compared whole in UI elements, the rest searched
    in text; a UID of :data:`MIN_UID_TEXT` characters or more is searched in text too (the bytes of
    a safe-listed private attribute, a description), where no short number can match it."""

    idents: dict[str, Identifier]
    uids: dict[str, Identifier]
    pattern: re.Pattern | None

    @classmethod
    def of(cls, identifiers: dict[str, Identifier]) -> Needles:
        uids = {k: v for k, v in identifiers.items() if re.fullmatch(r"[0-9.]+", k) and "." in k}
        idents = searchable({k: v for k, v in identifiers.items() if k not in uids})
        idents.update({k: v for k, v in uids.items() if len(k) >= MIN_UID_TEXT and k.count(".") >= 4})
        return cls(idents, uids, terms_pattern(idents))


def scan_dataset(ds: Dataset, identifiers: dict[str, Identifier] | Needles, file: str) -> list[LeakHit]:
    """The identifying values found in ``ds`` (its file meta and preamble included) and in its
    ``file`` name."""
    n = identifiers if isinstance(identifiers, Needles) else Needles.of(identifiers)
    hits: list[LeakHit] = []
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        _scan(meta, "file meta.", n.idents, n.uids, file, hits, n.pattern)
    _scan(ds, "", n.idents, n.uids, file, hits, n.pattern)
    name = file.lower()
    stripped = _NEW_UID.sub("", name)  # the digits of a new UID are no value of the source
    m = n.pattern.search(stripped) if n.pattern is not None else None
    if m is not None:
        hits.append(LeakHit(file, "file name", n.idents[m.group(0).lower()].source))
    hits += [LeakHit(file, "file name", i.source) for t, i in n.uids.items() if t in name]
    preamble = (getattr(ds, "preamble", None) or b"").decode("latin-1")
    m = n.pattern.search(preamble) if n.pattern is not None else None
    if m is not None:
        hits.append(LeakHit(file, "preamble", n.idents[m.group(0).lower()].source))
    return hits


def leak_check(folder: Path, identifiers: dict[str, Identifier]) -> tuple[list[LeakHit], int]:
    """Every file under ``folder`` read back and scanned (:func:`scan_dataset`); (hits, files)."""
    from pydicom import dcmread

    hits: list[LeakHit] = []
    needles = Needles.of(identifiers)
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
    for path in files:
        rel = path.relative_to(folder).as_posix()
        hits += scan_dataset(dcmread(path, force=True), needles, rel)
    return hits, len(files)


# --------------------------------------------------------------------------- a visit
@dataclass
class VisitResult:
    kept: list[tuple[str, str]] = field(default_factory=list)      # (source file name, output file name)
    excluded: list[tuple[str, str]] = field(default_factory=list)  # (source file name, reason)
    identifiers: dict[str, Identifier] = field(default_factory=dict)
    pixel_sha256: dict[str, str] = field(default_factory=dict)     # output name -> sha256 of PixelData


def output_name(ds: Dataset) -> str:
    return f"{ds.SOPInstanceUID}.dcm"


def visit_identifiers(files: list[Path], profile: Profile, extra: dict[str, str] | None = None
                      ) -> dict[str, Identifier]:
    """:func:`identifying_values` of every file of a visit, plus ``extra`` (value -> what it
    is: the participant id of the manifest, the visit key), so a value of one file is looked for
    in all of them."""
    from pydicom import dcmread

    found: dict[str, Identifier] = {}
    kept: set[str] = set()
    for path in files:
        ds = dcmread(path, stop_before_pixels=True, force=True)
        identifying_values(ds, profile, found)
        kept |= kept_values(ds, profile)
    found = {k: v for k, v in found.items() if not _kept_elsewhere(k, v, kept)}
    for value, what in (extra or {}).items():
        if value:
            found.setdefault(value.lower(), Identifier(value, what))
    return found


def deidentify_files(files: list[Path], dest: Path, ctx: Context, identifiers: dict[str, Identifier]
                     ) -> VisitResult:
    """Each file of ``files`` de-identified into ``dest`` (a new folder, made here) as
    ``<new SOPInstanceUID>.dcm``, or excluded with the reason (burned-in text, not DICOM)."""
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    res = VisitResult(identifiers=identifiers)
    ctx.identifiers = sorted({i.value for i in searchable(identifiers).values()}, key=lambda v: (-len(v), v))
    dest.mkdir(parents=True)
    for path in sorted(files, key=lambda p: p.name):
        try:
            try:
                ds = dcmread(path)
            except InvalidDicomError:  # no preamble or no file meta (organize keeps those): read as it is
                ds = dcmread(path, force=True)
        except (InvalidDicomError, OSError, ValueError) as exc:
            res.excluded.append((path.name, f"not readable as DICOM: {exc}"))
            continue
        reason = burned_in_reason(ds) or (None if "SOPInstanceUID" in ds and "SOPClassUID" in ds
                                           else "no SOPClassUID or SOPInstanceUID: not a storable instance")
        if reason is not None:
            res.excluded.append((path.name, reason))
            continue
        deidentify(ds, ctx)
        name = output_name(ds)
        ds.save_as(dest / name, enforce_file_format=True)
        res.kept.append((path.name, name))
        if "PixelData" in ds:
            res.pixel_sha256[name] = hashlib.sha256(ds.PixelData).hexdigest()
    return res


@dataclass
class ShareResult:
    """A visit's shared copy: what was kept and excluded, the leak check, where it went."""

    files: VisitResult
    hits: list[LeakHit]          # with the source file's name in ``file`` (never the new name)
    scanned: int
    placed: bool                 # False: leaks found, nothing was put in share/
    digests: dict[str, str] = field(default_factory=dict)  # new file name -> sha256
    pixels_changed: list[str] = field(default_factory=list)  # source names whose PixelData differs


def _pixel_digests(files: list[Path]) -> dict[str, str]:
    from pydicom import dcmread

    out = {}
    for path in files:
        ds = dcmread(path, force=True)
        if "PixelData" in ds:
            out[path.name] = hashlib.sha256(ds.PixelData).hexdigest()
    return out


def share_visit(files: list[Path], target: Path, ctx: Context, extra: dict[str, str] | None = None) -> ShareResult:
    """De-identify a visit's ``files`` into ``target`` (``share/<pseudonym>/<session>/``), then
    leak-check what was written. Staged beside ``target`` and swapped in whole only when the
    check finds nothing; with a hit, neither the new copy nor an older one stays in share/."""
    import shutil

    from .fsutil import swap_dir, temp_sibling, tree_digests

    target = Path(target)
    staged = temp_sibling(target)
    identifiers = visit_identifiers(files, ctx.profile, extra)
    try:
        res = deidentify_files(files, staged, ctx, identifiers)
        hits, scanned = leak_check(staged, identifiers)
        source_of = {new: old for old, new in res.kept}
        hits = [LeakHit(source_of.get(h.file, h.file), h.path, h.source) for h in hits]
        before = _pixel_digests([p for p in files if p.name in source_of.values()])
        changed = [old for old, new in res.kept if old in before and res.pixel_sha256.get(new) != before[old]]
        digests = tree_digests(staged)
        if hits:
            shutil.rmtree(staged)
            if target.exists():
                shutil.rmtree(target)
            return ShareResult(res, hits, scanned, False, {}, changed)
        target.parent.mkdir(parents=True, exist_ok=True)
        swap_dir(staged, target)
    except BaseException:
        if staged.exists():
            shutil.rmtree(staged)
        raise
    return ShareResult(res, hits, scanned, True, digests, changed)


def record_pseudonym(map_path: Path, participant: str, pseudo: str, fingerprint: str) -> bool:
    """Add ``participant -> pseudo`` (made with the key of ``fingerprint``) to the site's map, a
    TSV, under a lock; True when the row was new."""
    from .fsutil import atomic_write, file_lock

    map_path = Path(map_path)
    with file_lock(map_path.with_name(f".{map_path.name}.lock")):
        rows = []
        if map_path.is_file():
            rows = [line.split("\t") for line in map_path.read_text(encoding="utf-8").splitlines()[1:] if line]
        row = [participant, pseudo, fingerprint]
        if row in rows:
            return False
        rows = sorted([r for r in rows if r[:1] != [participant] or r[2:3] != [fingerprint]] + [row])
        with atomic_write(map_path, encoding="utf-8") as fh:
            fh.write("participant_id\tpseudonym\tkey_fingerprint\n")
            fh.writelines("\t".join(r) + "\n" for r in rows)
    return True
