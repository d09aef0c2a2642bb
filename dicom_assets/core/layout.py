"""The folder layout of a dataset root: the one place in the code that knows it.

::

    <root>/
      global_config.json
      tabular/demographics/mr_proc_manifest.csv     participant manifest
      tabular/dicom_dir_map.tsv                     optional: visit -> download name
      tabular/curation_status.tsv                   how far each visit got
      downloads/<session>/<item>                    scanner dumps as delivered
      downloads/tcia/<name>.tcia|.csv               TCIA manifest as dropped (never changed)
      downloads/tcia/<name>/series/<uid>.zip|.json  each series as NBIA sent it, and its verification record
      downloads/tcia/<name>/resolved.csv            SeriesInstanceUID -> PatientID, study, visit, session label
      scratch/raw_dicoms/<session>/<participant>/   extracted, messy inside
      scratch/state/                                the downloads sensor's state (SQLite)
      scratch/                                      the XNAT upload's temporary zips
      dicom/<session>/<participant>/                flat list of validated DICOMs
      store/<study>/<visit>_dicom.tar               reproducible visit tarball
      store/<study>/<visit>_metadata_tarball.json   the tarball's size, md5, sha256, store and dataset paths
      store/<study>/<visit>_metadata_dicoms.json    per DICOM: path in the tar, md5, size, series tags
      store/<study>/<visit>_XDLRA--refs|--repo-export   the visit's DataLad dataset, clonable from the store
      datalad/<study>/<visit>/                      DataLad dataset of the visit (``.datalad/`` once made)
      catalog/                                      browsable catalog
      code/dcm2bids_config.json                     dcm2bids config (BIDS conversion)
      bids/dataset_description.json                 the BIDS dataset's description (created when missing)
      bids/sub-<participant>/ses-<session>/         BIDS dataset, one session per visit
      scratch/bids/<visit>.tmp-*/                   one BIDS conversion's scratch
      scratch/bids/.bids.lock                       held while a BIDS session is swapped in
      logs/organize/<visit>_files.tsv               every file of the dump: kept or excluded, and why
      logs/extract/<visit>.json                     what raw_dicoms extracted from each dump
      logs/qc/<visit>_montage.png                   QC montage (middle image of each kept series)
      logs/xnat/<visit>.json                        the visit's XNAT session (labels, status, filtered files)
      logs/bids/<visit>.json                        the last BIDS conversion of the visit

Folders use the manifest's normalized participant id (``QPN001``) and the BIDS session
label (``ses-01``); the BIDS participant form ``sub-QPN001`` is only produced for a BIDS
converter downstream (see docs/layout.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from .config import GlobalConfig, load_config
from .ids import Visit
from .manifest import Manifest, read_manifest


@dataclass(frozen=True)
class DatasetLayout:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).absolute())

    # --- files describing the dataset -------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.root / "global_config.json"

    @property
    def tabular_dir(self) -> Path:
        return self.root / "tabular"

    @property
    def manifest_path(self) -> Path:
        return self.tabular_dir / "demographics" / "mr_proc_manifest.csv"

    @property
    def dicom_dir_map_path(self) -> Path:
        return self.tabular_dir / "dicom_dir_map.tsv"

    @property
    def curation_status_path(self) -> Path:
        return self.tabular_dir / "curation_status.tsv"

    # --- stage folders ----------------------------------------------------------------
    @property
    def downloads_root(self) -> Path:
        return self.root / "downloads"

    @property
    def tcia_root(self) -> Path:
        """``downloads/tcia/``: TCIA manifests, and per manifest its series and resolved CSV."""
        return self.downloads_root / "tcia"

    def tcia_manifest_dir(self, name: str) -> Path:
        """``downloads/tcia/<name>/``: what was fetched for manifest ``<name>``."""
        return self.tcia_root / name

    def tcia_series_dir(self, name: str) -> Path:
        """``downloads/tcia/<name>/series/``: ``<uid>.zip`` as NBIA sent it, ``<uid>.json`` verified."""
        return self.tcia_manifest_dir(name) / "series"

    def tcia_series_zip(self, name: str, series_uid: str) -> Path:
        return self.tcia_series_dir(name) / f"{series_uid}.zip"

    def tcia_resolved_path(self, name: str) -> Path:
        """``downloads/tcia/<name>/resolved.csv``: SeriesInstanceUID -> PatientID, study, visit, label."""
        return self.tcia_manifest_dir(name) / "resolved.csv"

    def downloads_dir(self, session: str) -> Path:
        return self.downloads_root / session

    @property
    def scratch_dir(self) -> Path:
        """``scratch/``: temporary files (the XNAT upload's zips); safe to delete when nothing runs."""
        return self.root / "scratch"

    @property
    def state_dir(self) -> Path:
        """``scratch/state/``: small state files of the platform itself (the downloads sensor's
        settled state, ``downloads-<id>.sqlite``); safe to delete, at the cost of one full rescan."""
        return self.scratch_dir / "state"

    def raw_dir(self, visit: Visit) -> Path:
        return self.scratch_dir / "raw_dicoms" / visit.session / visit.participant

    def dicom_dir(self, visit: Visit) -> Path:
        return self.root / "dicom" / visit.session / visit.participant

    def store_dir(self, study: str) -> Path:
        return self.root / "store" / study

    def tarball_path(self, study: str, visit: Visit) -> Path:
        return self.store_dir(study) / f"{visit.key}_dicom.tar"

    def metadata_tarball_path(self, study: str, visit: Visit) -> Path:
        return self.store_dir(study) / f"{visit.key}_metadata_tarball.json"

    def metadata_dicoms_path(self, study: str, visit: Visit) -> Path:
        return self.store_dir(study) / f"{visit.key}_metadata_dicoms.json"

    @staticmethod
    def deposit_file(store_dir: Path, visit_key: str, part: str) -> Path:
        """``<store_dir>/<visit>_XDLRA--<part>``: a file of the visit's DataLad deposit (datalad-next's
        ``datalad-annex::`` export: ``refs``, ``repo-export``; ``pack`` is its staging folder)."""
        return Path(store_dir) / f"{visit_key}_XDLRA--{part}"

    def deposit_paths(self, study: str, visit: Visit) -> tuple[Path, Path]:
        """``store/<study>/<visit>_XDLRA--refs`` and ``--repo-export``."""
        return tuple(self.deposit_file(self.store_dir(study), visit.key, p) for p in ("refs", "repo-export"))

    def datalad_dir(self, study: str, visit: Visit) -> Path:
        return self.root / "datalad" / study / visit.key

    def datalad_marker_path(self, study: str, visit: Visit) -> Path:
        """``datalad/<study>/<visit>/.datalad/``: there once the visit's dataset was made."""
        return self.datalad_dir(study, visit) / ".datalad"

    @property
    def catalog_dir(self) -> Path:
        return self.root / "catalog"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    def organize_report_path(self, visit: Visit) -> Path:
        return self.logs_dir / "organize" / f"{visit.key}_files.tsv"

    def extract_report_path(self, visit: Visit) -> Path:
        return self.logs_dir / "extract" / f"{visit.key}.json"

    def qc_path(self, visit: Visit) -> Path:
        return self.logs_dir / "qc" / f"{visit.key}_montage.png"

    def xnat_marker_path(self, visit_key: str) -> Path:
        """``logs/xnat/<visit>.json``: the visit's XNAT session as last uploaded."""
        return self.logs_dir / "xnat" / f"{visit_key}.json"

    # --- BIDS ---------------------------------------------------------------------------
    @property
    def dcm2bids_config_path(self) -> Path:
        """``code/dcm2bids_config.json``: the dcm2bids config (BIDS's own place for code)."""
        return self.root / "code" / "dcm2bids_config.json"

    @property
    def bids_root(self) -> Path:
        return self.root / "bids"

    @property
    def bids_description_path(self) -> Path:
        return self.bids_root / "dataset_description.json"

    def bids_session_dir(self, visit: Visit) -> Path:
        return self.bids_root / f"sub-{visit.participant}" / visit.session

    @property
    def bids_scratch_root(self) -> Path:
        """``scratch/bids/``: per-conversion scratch folders (``<visit>.tmp-*``, dcm2bids' tmp_dcm2bids inside)."""
        return self.scratch_dir / "bids"

    @property
    def bids_lock_path(self) -> Path:
        """Held while a session is swapped in and the dataset files are rewritten."""
        return self.bids_scratch_root / ".bids.lock"

    def bids_record_path(self, visit: Visit) -> Path:
        return self.logs_dir / "bids" / f"{visit.key}.json"


@dataclass(frozen=True)
class Dataset:
    """A dataset root with its validated config and manifest, loaded once."""

    layout: DatasetLayout

    @classmethod
    def open(cls, root: Path | str) -> "Dataset":
        ds = cls(DatasetLayout(Path(root)))
        ds.config  # noqa: B018 - validate eagerly so errors surface at once
        ds.manifest  # noqa: B018
        return ds

    @cached_property
    def config(self) -> GlobalConfig:
        return load_config(self.layout.config_path)

    @cached_property
    def manifest(self) -> Manifest:
        return read_manifest(self.layout.manifest_path, sessions=self.config.sessions)

    @property
    def study(self) -> str:
        return self.config.study_id
