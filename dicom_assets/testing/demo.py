"""Build demo and benchmark dataset roots from real scanner DICOM files.

Every image starts as a real file from a PyPI package (see :mod:`samples`); the builder
rewrites identifying and grouping tags (PatientID, Study/Series/SOP UIDs, dates, series
descriptions) so each dump looks like a real visit, and places the files in a messy nested
tree with the junk real dumps carry (a ``DICOMDIR``, ``.DS_Store``, notes, a derived image,
a non-image report, a truncated file). Same seed -> same bytes.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import tarfile
import zipfile
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import generate_uid

from ..core.config import DeidConfig, GlobalConfig, write_config
from ..core.deid import DCM2NIIX_SIEMENS_SAFE_PRIVATE
from ..core.fsutil import tree_digests
from ..core.layout import DatasetLayout
from .samples import Samples

# fixed timestamps inside generated archives, so their bytes never depend on "now"
_ARCHIVE_TIME = (2024, 1, 1, 0, 0, 0)
_ARCHIVE_EPOCH = 1704067200  # 2024-01-01T00:00:00Z


@dataclass(frozen=True)
class SeriesTemplate:
    """One series of a demo visit: real source files plus the description it gets."""

    number: int
    description: str
    sources: tuple[Path, ...]
    image_type: tuple[str, ...] | None = None  # override ImageType (e.g. a MoCo series)
    optional: bool = True


def _case001_series(samples: Samples, number: int) -> list[Path]:
    scans = samples.xnat_case001 / "scans"
    folder = next(p for p in scans.iterdir() if p.name.split("_", 1)[0] == str(number))
    return sorted((folder / "DICOM").iterdir())


def _volume(files: list[Path], n: int) -> tuple[Path, ...]:
    """n slices of one real volume, evenly spaced (one step between all of them) and centred on
    it, in the scanner's slice order (its InstanceNumber): a stack dcm2niix converts as it is,
    each slice at its own position."""
    files = sorted(files, key=lambda f: int(pydicom.dcmread(f, stop_before_pixels=True,
                                                            specific_tags=["InstanceNumber"]).InstanceNumber))
    n = min(n, len(files))
    step = (len(files) - 1) // (n - 1) if n > 1 else 1
    start = (len(files) - 1 - step * (n - 1)) // 2
    return tuple(files[start + k * step] for k in range(n))


def _pick(files: list[Path], n: int) -> tuple[Path, ...]:
    """n files spread evenly over a series (the middle of the volume included)."""
    if n >= len(files):
        return tuple(files)
    idx = np.linspace(0, len(files) - 1, n).round().astype(int)
    return tuple(files[i] for i in idx)


def t1w_volume(samples: Samples, slices: int = 8) -> tuple[Path, ...]:
    """The demo T1w's slices (of the GE 3D SPGR volume, Case001 series 5): ``slices`` of them
    written as the series' files ``IM0001``..., and one more, the last of the stack, written
    preamble-less as ``IM9999``. Every slice has its own position and InstanceNumber."""
    return _volume(_case001_series(samples, 5), slices + 1)


def series_library(samples: Samples, slices: int = 8) -> list[SeriesTemplate]:
    h = samples.heudiconv_data
    nb = samples.nibabel_data
    return [
        SeriesTemplate(1, "Localizers", (h / "01-anat-scout" / "0001.dcm",) * 3, optional=False),
        SeriesTemplate(2, "AAHEAD_Scout_32ch-head-coil", (h / "Phoenix" / "01+AA" / "01+AA+00001.dcm",) * 2),
        SeriesTemplate(3, "T1w_MPRAGE", t1w_volume(samples, slices)[:-1], optional=False),
        SeriesTemplate(4, "T2w_PD_dual_echo", _pick(_case001_series(samples, 3), slices)),
        SeriesTemplate(5, "T1_SE_axial", _pick(_case001_series(samples, 2), slices)),
        SeriesTemplate(6, "SWI_HEME", _pick(_case001_series(samples, 9), slices)),
        SeriesTemplate(7, "fmap_acq-3mm", tuple(sorted((h / "01-fmap_acq-3mm").iterdir())) * 2),
        SeriesTemplate(8, "rsfMRI_mosaic", (h / "axasc35.dcm",) * 3, optional=False),
        SeriesTemplate(9, "MoCoSeries", (h / "axasc35.dcm",) * 2, image_type=("DERIVED", "PRIMARY", "MOCO", "MOSAIC")),
        SeriesTemplate(10, "DTI_64dir", (nb / "0.dcm", nb / "1.dcm")),
        SeriesTemplate(11, "T1w_MPR_cor", (h / "MRI_102TD_PHA_S.MR.Chen_Matthews_1.3.1.2022.11.16.15.50.20.357.31204541.dcm",)),
        SeriesTemplate(99, "PhoenixZIPReport", (h / "Phoenix" / "99+PhoenixDocument" / "99+PhoenixDocument+00001.dcm",), optional=False),
    ]


@dataclass(frozen=True)
class VisitSpec:
    raw_participant: str  # as written in the manifest, e.g. QPN_001
    session: str  # ses-01
    form: str  # zip | tar | tgz | folder
    study_date: date
    study_time: str  # HHMMSS.ffffff


def _uid(*parts: object) -> str:
    return generate_uid(entropy_srcs=[str(p) for p in parts])


def rewrite_dicom(
    src: Path,
    *,
    patient_id: str,
    patient_name: str,
    study_uid: str,
    series_uid: str,
    sop_uid: str,
    series_number: int,
    series_description: str,
    instance_number: int,
    study_date: str,
    study_time: str,
    image_type: tuple[str, ...] | None = None,
    pixel_side: int | None = None,
    pixel_seed: int | None = None,
) -> bytes:
    """Read a real DICOM file and return its bytes with visit identity rewritten."""
    ds = pydicom.dcmread(src, force=True)
    ds.PatientID = patient_id
    ds.PatientName = patient_name
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.SOPInstanceUID = sop_uid
    if getattr(ds, "file_meta", None) is not None and "MediaStorageSOPInstanceUID" in ds.file_meta:
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = series_description
    ds.ProtocolName = series_description
    ds.InstanceNumber = instance_number
    for tag in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate"):
        setattr(ds, tag, study_date)
    for tag in ("StudyTime", "SeriesTime", "AcquisitionTime", "ContentTime"):
        setattr(ds, tag, study_time)
    ds.StudyID = "1"
    ds.AccessionNumber = hashlib.sha1(study_uid.encode()).hexdigest()[:12].upper()
    if image_type is not None:
        ds.ImageType = list(image_type)
    if "FrameOfReferenceUID" in ds:
        ds.FrameOfReferenceUID = _uid("for", study_uid)
    if pixel_side is not None:
        _resize_pixels(ds, pixel_side, pixel_seed or 0)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=getattr(ds, "preamble", None) is not None)
    return buf.getvalue()


def preambleless(data: bytes) -> bytes:
    """The same data set written the way old exporters do: no preamble, no file meta,
    implicit VR little endian."""
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.preamble = None
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    buf = io.BytesIO()
    pydicom.filewriter.dcmwrite(buf, ds, enforce_file_format=False, implicit_vr=True, little_endian=True)
    return buf.getvalue()


def _resize_pixels(ds: pydicom.Dataset, side: int, seed: int) -> None:
    """Scale a real image up (nearest neighbour) to side x side, with a small offset so
    scaled copies of one source differ; keeps the real anatomy, never zeros."""
    arr = ds.pixel_array
    if arr.ndim != 2:
        arr = arr.reshape(-1, arr.shape[-2], arr.shape[-1])[0]
    rows = (np.arange(side) * arr.shape[0] // side).astype(np.intp)
    cols = (np.arange(side) * arr.shape[1] // side).astype(np.intp)
    big = arr[rows][:, cols]
    shift = seed % 7
    big = np.roll(big, shift, axis=1).astype(arr.dtype, copy=False)
    ds.Rows, ds.Columns = side, side
    ds.PixelData = np.ascontiguousarray(big).tobytes()
    if "NumberOfFrames" in ds:
        del ds.NumberOfFrames


def _visit_files(samples: Samples, spec: VisitSpec, seed: int, dataset: str, slices: int) -> dict[str, bytes]:
    """The files of one dump: relative path inside the dump -> bytes."""
    rng = random.Random(f"{seed}/{spec.raw_participant}/{spec.session}")
    lib = series_library(samples, slices)
    required = [s for s in lib if not s.optional]
    optional = [s for s in lib if s.optional]
    chosen = required + rng.sample(optional, k=rng.randint(3, len(optional)))
    chosen.sort(key=lambda s: s.number)
    study_uid = _uid(seed, dataset, spec.raw_participant, spec.session, "study")
    sdate = spec.study_date.strftime("%Y%m%d")
    top = f"{spec.raw_participant}/{sdate}_{spec.session}"
    files: dict[str, bytes] = {}
    first_kept: tuple[str, bytes] | None = None
    for s in chosen:
        series_uid = _uid(study_uid, s.number, "series")
        folder = f"{top}/{s.number:02d}_{s.description}"
        if s.number in (3, 6):  # some scanners nest one level deeper
            folder += "/DICOM"
        for i, src in enumerate(s.sources, start=1):
            data = rewrite_dicom(
                src,
                patient_id=spec.raw_participant,
                patient_name=f"{dataset}^{spec.raw_participant}",
                study_uid=study_uid,
                series_uid=series_uid,
                sop_uid=_uid(series_uid, i, "sop"),
                series_number=s.number,
                series_description=s.description,
                instance_number=i,
                study_date=sdate,
                study_time=spec.study_time,
                image_type=s.image_type,
            )
            # every series folder uses the same names, as many scanners do
            files[f"{folder}/IM{i:04d}"] = data
            if first_kept is None and s.number == 3:
                first_kept = (folder, data)
    # junk a real dump carries
    files[f"{spec.raw_participant}/DICOMDIR"] = (samples.pydicom_files / "dicomdirtests" / "DICOMDIR").read_bytes()
    files[f"{top}/.DS_Store"] = b"\x00\x00\x00\x01Bud1" + bytes(rng.getrandbits(8) for _ in range(58))
    files[f"{top}/scanner_notes.txt"] = (
        f"Visit {spec.raw_participant} {spec.session} on {sdate}. Operator: demo.\n".encode()
    )
    assert first_kept is not None
    folder, data = first_kept
    # a transfer cut short: the end of the pixel data is missing
    files[f"{folder}/IM9998"] = data[: len(data) * 2 // 3]
    # a preamble-less file (no 128-byte preamble, no file meta), as old exporters write: the
    # last slice of the T1w stack (its own position, the next InstanceNumber), so the series is
    # still one volume dcm2niix converts
    volume = t1w_volume(samples, slices)
    files[f"{folder}/IM9999"] = preambleless(rewrite_dicom(
        volume[-1], patient_id=spec.raw_participant, patient_name=f"{dataset}^{spec.raw_participant}",
        study_uid=study_uid, series_uid=_uid(study_uid, 3, "series"),
        sop_uid=_uid(study_uid, "nometa"), series_number=3, series_description="T1w_MPRAGE",
        instance_number=len(volume), study_date=sdate, study_time=spec.study_time,
    ))
    return files


def _write_zip(path: Path, files: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(files):
            info = zipfile.ZipInfo(name, date_time=_ARCHIVE_TIME)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, files[name])


def _write_tar(path: Path, files: dict[str, bytes], gz: bool) -> None:
    with open(path, "wb") as raw:
        fileobj = gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) if gz else raw
        with tarfile.open(fileobj=fileobj, mode="w", format=tarfile.PAX_FORMAT) as tf:
            for name in sorted(files):
                info = tarfile.TarInfo(name)
                info.size = len(files[name])
                info.mtime = _ARCHIVE_EPOCH
                info.mode = 0o644
                tf.addfile(info, io.BytesIO(files[name]))
        if gz:
            fileobj.close()


def _write_folder(path: Path, files: dict[str, bytes]) -> None:
    for name in sorted(files):
        out = path / name
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(files[name])


def write_dump(path: Path, form: str, files: dict[str, bytes]) -> Path:
    """Write files as a download of the given form; returns the item's path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if form == "zip":
        target = path.with_name(path.name + ".zip")
        _write_zip(target, files)
    elif form == "tar":
        target = path.with_name(path.name + ".tar")
        _write_tar(target, files, gz=False)
    elif form == "tgz":
        target = path.with_name(path.name + ".tar.gz")
        _write_tar(target, files, gz=True)
    elif form == "folder":
        target = path
        _write_folder(target, files)
    else:  # pragma: no cover - programming error
        raise ValueError(form)
    return target


DEMO_PARTICIPANTS = ("QPN_001", "QPN_002", "QPN_003")
DEMO_SESSIONS = ("ses-01", "ses-02")
_FORMS = {("QPN_001", "ses-01"): "zip", ("QPN_002", "ses-01"): "tgz", ("QPN_003", "ses-01"): "folder",
          ("QPN_001", "ses-02"): "zip", ("QPN_002", "ses-02"): "tar", ("QPN_003", "ses-02"): "zip"}


def demo_config(share: bool = False) -> GlobalConfig:
    """The demo's config; ``share``: with the de-identified copy on (``deid``, the default options and
    the Siemens safe list dcm2niix needs), as ``dicom-assets demo-data`` builds it for ``make demo``."""
    return GlobalConfig(
        dataset_name="qpn-demo",
        study_id="QPN",
        sessions=DEMO_SESSIONS,
        xnat_project="QPN_DEMO",
        exclude_series=("Localizers", "AAHEAD", "MoCoSeries"),
        deid=DeidConfig(enabled=True, safe_private=DCM2NIIX_SIEMENS_SAFE_PRIVATE) if share else DeidConfig(),
    )


# the demo's dcm2bids config (code/dcm2bids_config.json), for the series of series_library:
# SWI_HEME and fmap_acq-3mm are left out on purpose (dcm2niix splits the SWI into echoes and
# converts only one phase image of the field map), so the UI shows unmatched series
DEMO_DCM2BIDS_CONFIG = {
    "descriptions": [
        {"id": "t1w_mprage", "datatype": "anat", "suffix": "T1w", "custom_entities": "acq-mprage",
         "criteria": {"SeriesDescription": "T1w_MPRAGE"}},
        {"id": "t1w_se", "datatype": "anat", "suffix": "T1w", "custom_entities": "acq-se",
         "criteria": {"SeriesDescription": "T1_SE_axial"}},
        {"id": "t1w_cor", "datatype": "anat", "suffix": "T1w", "custom_entities": "acq-cor",
         "criteria": {"SeriesDescription": "T1w_MPR_cor"}},
        {"id": "t2w", "datatype": "anat", "suffix": "T2w", "criteria": {"SeriesDescription": "T2w_PD_dual_echo"}},
        {"id": "task_rest", "datatype": "func", "suffix": "bold", "custom_entities": "task-rest",
         "criteria": {"SeriesDescription": "rsfMRI_mosaic"}, "sidecar_changes": {"TaskName": "rest"}},
        {"id": "dwi", "datatype": "dwi", "suffix": "dwi", "criteria": {"SeriesDescription": "DTI_64dir"}},
    ]
}


def write_dcm2bids_config(root: Path | str, config: dict | None = None) -> Path:
    """``code/dcm2bids_config.json`` of a dataset root (the demo's by default)."""
    path = DatasetLayout(Path(root)).dcm2bids_config_path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config or DEMO_DCM2BIDS_CONFIG, indent=2) + "\n")
    return path


def build_demo_dataset(
    root: Path | str,
    samples: Samples,
    *,
    seed: int = 0,
    slices: int = 8,
    with_downloads: bool = True,
    participants: tuple[str, ...] = DEMO_PARTICIPANTS,
    extra_manifest_participants: tuple[str, ...] = ("QPN_004",),
    bids_config: bool = True,
    share: bool = False,
) -> Path:
    """A dataset root: config, manifest, and one scanner dump per participant x session, and
    the dcm2bids config of its series (``bids_config``); ``share``: deid on (:func:`demo_config`).

    ``QPN_004`` is in the manifest with no download yet, as on a real site.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    lay = DatasetLayout(root)
    cfg = demo_config(share)
    write_config(lay.config_path, cfg)
    if bids_config:
        write_dcm2bids_config(root)
    manifest = lay.manifest_path
    manifest.parent.mkdir(parents=True, exist_ok=True)
    rows = ["participant_id,visit_id,session_id,datatype"]
    for p in participants + extra_manifest_participants:
        for s in cfg.sessions:
            rows.append(f"{p},{s.removeprefix('ses-')},{s},\"['anat', 'func', 'dwi']\"")
    manifest.write_text("\n".join(rows) + "\n")
    if with_downloads:
        for i, p in enumerate(participants):
            for j, s in enumerate(cfg.sessions):
                spec = visit_spec(p, s, seed, i, j)
                write_visit_download(root, samples, spec, seed=seed, slices=slices)
    return root


def visit_spec(participant: str, session: str, seed: int, i: int = 0, j: int = 0, form: str | None = None) -> VisitSpec:
    rng = random.Random(f"{seed}/{participant}/{session}/date")
    d = date(2024, 3, 4) + timedelta(days=rng.randint(0, 60) + 180 * j)
    t = f"{rng.randint(8, 17):02d}{rng.randint(0, 59):02d}{rng.randint(0, 59):02d}.{rng.randint(0, 999999):06d}"
    return VisitSpec(participant, session, form or _FORMS.get((participant, session), "zip"), d, t)


def write_visit_download(root: Path, samples: Samples, spec: VisitSpec, *, seed: int = 0, slices: int = 8,
                         name: str | None = None) -> Path:
    """Write one scanner dump into ``downloads/<session>/`` and return its path."""
    lay = DatasetLayout(Path(root))
    files = _visit_files(samples, spec, seed, json.loads(lay.config_path.read_text())["dataset_name"], slices)
    item = lay.downloads_dir(spec.session) / (name or f"{spec.raw_participant}_MR")
    return write_dump(item, spec.form, files)


def build_corpus(out: Path | str, samples: Samples, *, n_files: int = 2000, file_kb: int = 256,
                 seed: int = 0, participant: str = "BENCH_001", series_count: int = 8) -> Path:
    """A large visit for benchmarks: n_files real-derived DICOMs of about file_kb each.

    Pixel data is a real GE MR image scaled up (not zeros); one folder per series.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    side = int((file_kb * 1024 / 2) ** 0.5)
    sources = []
    for n in (2, 3, 5, 6, 7, 8, 9, 10):
        sources.extend(_case001_series(samples, n))
    study_uid = _uid(seed, participant, "bench-study")
    per_series = max(1, -(-n_files // series_count))
    for k in range(n_files):
        s = k // per_series + 1
        series_uid = _uid(study_uid, s)
        src = sources[(k * 7919 + seed) % len(sources)]
        data = rewrite_dicom(
            src, patient_id=participant, patient_name=f"bench^{participant}", study_uid=study_uid,
            series_uid=series_uid, sop_uid=_uid(series_uid, k), series_number=s,
            series_description=f"bench_series_{s:02d}", instance_number=k % per_series + 1,
            study_date="20240304", study_time="101010.500000", pixel_side=side, pixel_seed=k,
        )
        path = out / f"series_{s:02d}" / f"IM{k % per_series + 1:05d}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return out


def tree_digest(root: Path | str) -> dict[str, str]:
    """sha256 of every file under root, by relative path (for reproducibility checks)."""
    return tree_digests(Path(root))


def write_node_push(out: Path | str, samples: Samples, spec: VisitSpec, *, dataset: str = "qpn-demo", seed: int = 0,
                    slices: int = 8, study_description: str | None = None, patient_id: str | None = None,
                    series: tuple[int, ...] | None = None) -> list[Path]:
    """What a scanner console pushes for one visit (C-STORE): the visit's real DICOM images
    only (no DICOMDIR, junk or truncated file, which a console never sends), each a Part 10 file
    in ``out``, StudyDescription ``study_description`` (default ``<dataset> <session>``, which the
    default session rule reads). ``series``: only these SeriesNumbers (a series sent later)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, data in sorted(_visit_files(samples, spec, seed, dataset, slices).items()):
        if not (name.rsplit("/", 1)[-1].startswith("IM") and name[-4:].isdigit()) or name.endswith(("IM9998", "IM9999")):
            continue
        ds = pydicom.dcmread(io.BytesIO(data))
        if series is not None and int(ds.SeriesNumber) not in series:
            continue
        ds.StudyDescription = study_description or f"{dataset} {spec.session}"
        if patient_id is not None:
            ds.PatientID = patient_id
        path = out / f"{ds.SeriesNumber:>03}_{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        written.append(path)
    return written


def write_large_push(out: Path | str, samples: Samples, raw_participant: str, session: str, *, n: int = 2000,
                     per_series: int = 500, side: int = 64, dataset: str = "qpn-demo") -> list[Path]:
    """A large study as a console pushes it: ``n`` real MR slices (Case001's 3D volume, cycled),
    ``per_series`` per series, each its own SOPInstanceUID and InstanceNumber, pixels resampled to
    ``side`` x ``side`` so the study stays small on disk. StudyDescription ``<dataset> <session>``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sources = _case001_series(samples, 5)
    study_uid = _uid("large", raw_participant, session, n)
    written = []
    resized: dict[int, bytes] = {}  # each real slice resampled once, then given each instance's identity
    for k in range(n):
        number = 1 + k // per_series
        series_uid = _uid(study_uid, number, "series")
        src = k % len(sources)
        if src not in resized:
            resized[src] = rewrite_dicom(
                sources[src], patient_id=raw_participant, patient_name=f"{dataset}^{raw_participant}",
                study_uid=study_uid, series_uid=series_uid, sop_uid=_uid(study_uid, src, "template"),
                series_number=number, series_description="T1w", instance_number=1, study_date="20240601",
                study_time="101500", pixel_side=side, pixel_seed=src)
        ds = pydicom.dcmread(io.BytesIO(resized[src]))
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.SeriesDescription = series_uid, number, f"T1w_run{number}"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = _uid(series_uid, k, "sop")
        ds.InstanceNumber = k % per_series + 1
        ds.StudyDescription = f"{dataset} {session}"
        path = out / f"{number:03d}_{k:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        written.append(path)
    return written
