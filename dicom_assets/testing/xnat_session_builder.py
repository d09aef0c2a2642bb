"""How XNAT builds a session out of the files it received, for the XNAT test server: scan IDs,
the resource a file lands in, and how the scans of a new upload are renamed when they are
merged into an existing session. Each rule names the XNAT class it was read from (the
``NrgXnat/xnat`` repository: dicom-xnat-mx, dicom-xnat-sop, xnat-web); no XNAT code is copied
and nothing here comes from the client (``dicom_assets/core/xnat``).
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass

from pydicom.uid import UID_dictionary

# dicom-xnat-sop/src/main/resources/primary-sops.txt: the SOP classes SOPModel.isPrimaryImagingSOP
# calls primary imaging, by their dcm4che keywords (SOPModel resolves them with UID.forName).
# Five of them (DermoscopyImageStorage, MicroscopyBulkSimpleAnnotationStorage,
# ElectroocularWaveformStorage, EncapsulatedObjStorage, MaterialLibraryStorage) are spelled in a
# way pydicom's dictionary does not know; none is an MR/CT/PET class.
PRIMARY_SOP_KEYWORDS = (
    "AmbulatoryECGWaveformStorage", "BasicTextSRStorage", "CTImageStorage", "CardiacElectrophysiologyWaveformStorage",
    "ComputedRadiographyImageStorage", "DigitalIntraOralXRayImageStorageForPresentation",
    "DigitalIntraOralXRayImageStorageForProcessing", "DigitalMammographyXRayImageStorageForPresentation",
    "DigitalMammographyXRayImageStorageForProcessing", "BreastTomosynthesisImageStorage",
    "DigitalXRayImageStorageForPresentation", "DigitalXRayImageStorageForProcessing", "EnhancedCTImageStorage",
    "EnhancedMRImageStorage", "EnhancedPETImageStorage", "EnhancedSRStorage", "HemodynamicWaveformStorage",
    "MRImageStorage", "NuclearMedicineImageStorage", "OphthalmicPhotography16BitImageStorage",
    "OphthalmicPhotography8BitImageStorage", "OphthalmicTomographyImageStorage",
    "PositronEmissionTomographyImageStorage", "RTDoseStorage", "RTImageStorage", "UltrasoundImageStorage",
    "UltrasoundMultiFrameImageStorage", "VideoEndoscopicImageStorage", "VideoMicroscopicImageStorage",
    "VideoPhotographicImageStorage", "XRay3DCraniofacialImageStorage", "XRayAngiographicImageStorage",
    "XRay3DAngiographicImageStorage", "XRayRadiofluoroscopicImageStorage", "TwelveLeadECGWaveformStorage",
    "VLWholeSlideMicroscopyImageStorage", "VLMicroscopicImageStorage", "DermoscopyImageStorage",
    "ConfocalMicroscopyImageStorage", "PhotoacousticImageStorage", "MicroscopyBulkSimpleAnnotationStorage",
    "ElectromyogramWaveformStorage", "ElectroocularWaveformStorage", "RespiratoryWaveformStorage",
    "BodyPositionWaveformStorage", "EncapsulatedObjStorage", "MaterialLibraryStorage",
)
_BY_KEYWORD = {entry[4]: uid for uid, entry in UID_dictionary.items()}
PRIMARY_SOP_UIDS = frozenset(_BY_KEYWORD[k] for k in PRIMARY_SOP_KEYWORDS if k in _BY_KEYWORD)

#: DICOMSessionBuilder.UNKNOWN_MODALITY: a series whose modality is not known ("Other")
UNKNOWN_MODALITY = "OT"
PRIMARY, SECONDARY = "DICOM", "secondary"


def resource_label(sop_class_uid: str, separate_secondary: bool = True) -> str:
    """The scan resource a file lands in (CatalogBuilder: ``!separateSecondaryDicomOnArchive ||
    SOPModel.isPrimaryImagingSOP(sopClass)`` goes to the primary catalog ``DICOM``, anything else
    to ``secondary``; the site preference is true by default since XNAT 1.9.1)."""
    return PRIMARY if not separate_secondary or sop_class_uid in PRIMARY_SOP_UIDS else SECONDARY


def series_number_key(series_number: str, series_uid: str) -> str:
    """What DICOMSessionBuilder.call groups a series under: its SeriesNumber, a leading ``+``
    made ``_``; a blank number becomes the SeriesInstanceUID with every non-word character
    replaced by ``_`` (``replaceAll("[^\\\\w]", "_")``)."""
    number = (series_number or "").strip()
    if number.startswith("+"):
        number = "_" + number[1:]
    return number or re.sub(r"[^\w]", "_", series_uid, flags=re.ASCII)


def _maybe_numeric(key: str):
    """Utils.MaybeNumericStringComparator: numbers in numeric order, before other strings."""
    return (0, int(key), "") if key.isdigit() else (1, 0, key)


@dataclass(frozen=True)
class SeriesSeen:
    """One series of a session being built: its grouping key, UID and modalities."""

    number: str
    uid: str
    modalities: frozenset[str]


def scan_ids(series: list[SeriesSeen]) -> dict[str, str]:
    """SeriesInstanceUID -> scan ID, as DICOMSessionBuilder.call numbers the scans ("one scan per
    value of Series Instance UID"): a number held by one UID is the scan ID; a number held by
    several becomes ``<number>-<modality><index>`` for each (``3-MR1``, ``3-MR2``: no plain
    ``3``), the UIDs in their string order, the index counted per lead modality. The lead
    modality is SOPModel.getLeadModality over the series' modalities; XNAT's order of lead
    modalities (lead-modalities.txt) is not modelled: a series here has one modality."""
    by_number: dict[str, dict[str, SeriesSeen]] = defaultdict(dict)
    for s in series:
        by_number[s.number][s.uid] = s
    out: dict[str, str] = {}
    for number in sorted(by_number, key=_maybe_numeric):
        uids = by_number[number]
        if len(uids) == 1:
            out[next(iter(uids))] = number
            continue
        counts: dict[str, int] = defaultdict(int)
        for uid in sorted(uids):
            modality = sorted(uids[uid].modalities)[0] if uids[uid].modalities else UNKNOWN_MODALITY
            counts[modality] += 1
            out[uid] = f"{number}-{modality}{counts[modality]}"
    return out


def merged_scan_ids(new: dict[str, str], modality_of: dict[str, str], existing: dict[str, str]) -> dict[str, str]:
    """PrearcSessionArchiver.correctScanID, before a merge into an existing session
    (``existing``: its scans' SeriesInstanceUID -> scan ID): a new scan whose UID the session has
    takes that scan's ID (MergeUtils.getMatchingScanByUID); one whose ID the session already uses
    for another series is renamed ``<id>-<modality><n>`` with the first free n. An ID of the form
    ``<c>-<modality><k>`` keeps its stem ``<c>``, but only for a one-character ``c``: XNAT tests
    ``scan_id.matches(".-" + modalityCode + "[0-9]+$")``, and Java's ``matches`` is a full match
    (so ``12-MR1`` becomes ``12-MR1-MR1``). XNAT takes the modality code from the scan's xsi type
    (``xnat:mrScanData`` -> ``MR``); here it is the series' Modality, the same for MR and CT."""
    used = set(existing.values())
    out: dict[str, str] = {}
    for uid, scan_id in new.items():
        if uid in existing:
            out[uid] = existing[uid]
            continue
        modality = modality_of.get(uid, "")
        stem = scan_id.rsplit("-", 1)[0] if re.fullmatch(rf".-{re.escape(modality)}[0-9]+", scan_id) else None
        candidate, count = scan_id, 1
        while candidate in used:
            candidate = f"{stem if stem is not None else scan_id}-{modality}{count}"
            count += 1
        used.add(candidate)
        out[uid] = candidate
    return out
