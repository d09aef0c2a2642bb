"""The folder layout of a dataset root: the one place in the code that knows it.

Every path is built by a member of :class:`DatasetLayout`, registered with ``@layout_path``
(its pattern and a one-line description); the tree below and the table of docs/layout.md are
generated from those entries (``python scripts/gen_docs.py --write``, run from the repo;
dicom_assets_tests/test_layout_docs.py fails when they drift):

::

    <root>/
      global_config.json                                     the dataset's config (study, sessions, XNAT, DataLad, TCIA)
      tabular/                                               the dataset's tables
      tabular/demographics/mr_proc_manifest.csv              participant manifest (nipoppy's): one row per visit
      tabular/dicom_dir_map.tsv                              optional: visit -> download name (dumps named by no convention)
      tabular/curation_status.tsv                            how far each visit got, read from its files
      tabular/.curation_status.lock                          held while a row of curation_status.tsv is written
      tabular/tcia_studies.csv                               every TCIA study and the visit and label it was given, for good
      downloads/                                             what arrives: one folder per session, tcia/ and dicom_node/
      downloads/<session>/                                   the session's scanner dumps, as delivered
      downloads/<session>/<item>                             one scanner dump, named as the site names it
      downloads/tcia/                                        TCIA manifests as dropped (<name>.tcia or <name>.csv), never changed
      downloads/tcia/<name>/                                 what was fetched for manifest <name>
      downloads/tcia/<name>/series/                          the manifest's series, one zip and one record each
      downloads/tcia/<name>/series/<uid>.{zip,json}          a series as NBIA sent it, and its verification record
      downloads/tcia/<name>/series/<uid>.zip                 a series as NBIA sent it (md5 verified)
      downloads/tcia/<name>/resolved.csv                     SeriesInstanceUID -> PatientID, study, visit, session label
      downloads/tcia/<name>/series.csv                       every series of the manifest's last run: outcome, visit, reason
      downloads/dicom_node/                                  studies fetched from the DICOM node (Orthanc), one folder per visit
      downloads/dicom_node/<visit>/                          the visit's studies as the DICOM node sent them
      downloads/dicom_node/<visit>/<study_id>.{zip,json}     one study as one ZIP, and its record: instances, data version
      scratch/                                               temporary files; safe to delete when nothing runs
      scratch/xnat/                                          the XNAT upload's temporary zips (xnat-upload-*.zip), removed after each upload
      scratch/state/                                         the platform's own state; safe to delete (costs one full rescan)
      scratch/state/downloads-<id>.sqlite                    the downloads sensor's settled state (SQLite, WAL)
      scratch/raw_dicoms/<session>/<participant>/            the visit's dumps extracted, messy inside (nipoppy's convention)
      dicom/<session>/<participant>/                         flat list of the visit's validated DICOMs (a BIDS converter's input)
      annotations/<session>/<participant>/                   files a source sends beside a series' images (TCIA's annotation XML), as <SeriesInstanceUID>/<name>
      store/                                                 tarballs and DataLad deposits, served at datalad_store_url
      store/<study>/                                         the study's visit tarballs and deposits
      store/<study>/<visit>_dicom.tar                        reproducible visit tarball
      store/<study>/<visit>_metadata_tarball.json            the tarball's size, md5, sha256, store and dataset paths
      store/<study>/<visit>_metadata_dicoms.json             per DICOM: path in the tar, md5, size, series tags
      store/<study>/<visit>_XDLRA--<part>                    a file of the visit's DataLad deposit (datalad-annex:: export)
      store/<study>/<visit>_XDLRA--{refs,repo-export}        the visit's DataLad dataset, clonable from the store
      datalad/<study>/                                       the study's visit datasets (a superdataset if datalad_superdataset)
      datalad/.<study>.superdataset.lock                     held while a visit is recorded in the study's superdataset
      datalad/<study>/<visit>/                               the visit's DataLad dataset, indexing its tarball
      datalad/<study>/<visit>/.datalad/                      there once the visit's dataset was made
      catalog/                                               the browsable catalog (any static HTTP server shows it)
      catalog/index.html                                     the catalog page, rendered from the entries
      catalog/visits/                                        the catalog's entries, one per visit
      catalog/visits/<visit>.json                            the visit's entry: its dataset's id, version, series
      catalog/.lock                                          held while an entry is written and the page rendered
      code/dcm2bids_config.json                              the dcm2bids config (BIDS's own place for code)
      bids/                                                  the BIDS dataset
      bids/dataset_description.json                          created when missing, never overwritten
      bids/README.md                                         created when missing (unless README, README.txt or README.rst)
      bids/participants.tsv                                  one row per sub-* folder with a session; added columns kept
      bids/sub-<participant>/                                a participant of the BIDS dataset
      bids/sub-<participant>/sub-<participant>_sessions.tsv  session_id, acq_time (StudyDate + StudyTime); added columns kept
      bids/sub-<participant>/<session>/                      one visit's session, replaced whole when the visit changes
      scratch/bids/                                          the BIDS conversions' scratch folders
      scratch/bids/<visit>.tmp-<tag>/                        one BIDS conversion's scratch (in/, niix/, out/); removed at its end
      scratch/bids/.bids.lock                                held while a session is swapped in and the dataset files written
      share/                                                 de-identified copies for sharing, by pseudonym (nothing here names a participant)
      share/<pseudonym>/<session>/                           a visit de-identified (PS3.15 Annex E), leak-checked
      share/<pseudonym>/<session>/<newuid>.dcm               one de-identified DICOM, named by its new SOPInstanceUID
      share/<pseudonym>/<pseudonym>_<session>_dicom.tar      the de-identified visit as a reproducible TAR (as the visit tarball), top folder <pseudonym>_<session>/
      logs/                                                  per-visit reports of the chain's steps
      logs/organize/<visit>_files.tsv                        every file of the dump: kept or excluded, and why
      logs/extract/<visit>.json                              what raw_dicoms extracted from each dump
      logs/qc/<visit>_montage.png                            QC montage (middle image of each kept series)
      logs/xnat/<visit>.json                                 the visit's XNAT session: labels, status, files XNAT filtered
      logs/xnat/<visit>.pending.json                         what an upload of the visit is sending (files by SOPInstanceUID); removed once XNAT holds them all
      logs/dicom_node/unmapped.tsv                           studies on the DICOM node that map to no visit (yet), and why
      logs/bids/<visit>.json                                 the visit's last BIDS conversion: inputs' fingerprint, files, series
      logs/deid/<visit>.json                                 the visit's de-identification: profile, options, key fingerprint, files kept and excluded (why), leaks

Folders use the manifest's normalized participant id (``QPN001``) and the BIDS session
label (``ses-01``); the BIDS participant form ``sub-QPN001`` is only produced for a BIDS
converter downstream (see docs/layout.md).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

from .ids import Visit

# --- the registry: every path-building member of DatasetLayout, described once --------------

#: What each ``<placeholder>`` of a pattern stands for (every one used must be here).
PLACEHOLDERS: dict[str, str] = {
    "session": "a session label in BIDS form (`ses-01`): of `global_config.json`, or `ses-NN` for a TCIA visit",
    "participant": "a participant id normalized to letters and digits: the manifest's (`QPN001`), or a PatientID",
    "visit": "the visit id, the Dagster partition key: `<participant>_<session>` (`QPN001_ses-01`)",
    "study": "`study_id` of `global_config.json` (`QPN`)",
    "item": "a dump (zip, tar or folder) as the site named it (`QPN_001_MR.zip`)",
    "name": "a TCIA manifest's name: the stem of `<name>.tcia`, or for another file its stem made safe plus `-` and 8 hex digits of its name's sha1",
    "uid": "a SeriesInstanceUID",
    "id": "the downloads sensor's state id (random, held by its cursor)",
    "part": "a file of a DataLad deposit: `refs`, `repo-export` (`pack` while it is written)",
    "tag": "random hex making a scratch folder unique",
    "study_id": "Orthanc's ID of a study (a hash of its StudyInstanceUID and PatientID)",
    "pseudonym": "a participant's keyed pseudonym (`S` and 12 hex digits, from `DICOM_ASSETS_DEID_KEY`), never the real id",
    "newuid": "a SOPInstanceUID of the de-identified copy (`2.25.` and the digits of a keyed digest)",
}

_ENTRY_ATTR = "__layout_path__"


@dataclass(frozen=True)
class PathEntry:
    """One registered member: the path it builds (relative to the root, ``<placeholders>``,
    a trailing ``/`` for a folder, ``{a,b}`` for a tuple of paths) and what is there."""

    member: str
    signature: str
    pattern: str
    description: str


def layout_path(pattern: str, description: str):
    """Register a path-building member of :class:`DatasetLayout` (put it under ``@property``
    or ``@staticmethod``): the pattern of the path it returns and one line on what is there."""
    if "|" in pattern + description or "\n" in pattern + description:
        raise ValueError(f"{pattern}: a pattern or description holds no '|' and no newline")

    def mark(fn):
        setattr(fn, _ENTRY_ATTR, (pattern, description))
        return fn

    return mark


def _function(attr):
    if isinstance(attr, property):
        return attr.fget
    if isinstance(attr, (staticmethod, classmethod)):
        return attr.__func__
    return attr if inspect.isfunction(attr) else None


def layout_entries() -> list[PathEntry]:
    """The registered members of :class:`DatasetLayout`, in the order of the class."""
    out = []
    for name, attr in vars(DatasetLayout).items():
        fn = _function(attr)
        entry = getattr(fn, _ENTRY_ATTR, None)
        if entry is None:
            continue
        params = [p for p in inspect.signature(fn).parameters if p != "self"]
        sig = name if isinstance(attr, property) else f"{name}({', '.join(params)})"
        out.append(PathEntry(name, sig, *entry))
    return out


@dataclass(frozen=True)
class DatasetLayout:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).absolute())

    # --- files describing the dataset -------------------------------------------------
    @property
    @layout_path("global_config.json", "the dataset's config (study, sessions, XNAT, DataLad, TCIA)")
    def config_path(self) -> Path:
        return self.root / "global_config.json"

    @property
    @layout_path("tabular/", "the dataset's tables")
    def tabular_dir(self) -> Path:
        return self.root / "tabular"

    @property
    @layout_path("tabular/demographics/mr_proc_manifest.csv", "participant manifest (nipoppy's): one row per visit")
    def manifest_path(self) -> Path:
        return self.tabular_dir / "demographics" / "mr_proc_manifest.csv"

    @property
    @layout_path("tabular/dicom_dir_map.tsv", "optional: visit -> download name (dumps named by no convention)")
    def dicom_dir_map_path(self) -> Path:
        return self.tabular_dir / "dicom_dir_map.tsv"

    @property
    @layout_path("tabular/curation_status.tsv", "how far each visit got, read from its files")
    def curation_status_path(self) -> Path:
        return self.tabular_dir / "curation_status.tsv"

    @property
    @layout_path("tabular/.curation_status.lock", "held while a row of curation_status.tsv is written")
    def curation_lock_path(self) -> Path:
        return self.tabular_dir / ".curation_status.lock"

    @property
    @layout_path("tabular/tcia_studies.csv", "every TCIA study and the visit and label it was given, for good")
    def tcia_studies_path(self) -> Path:
        return self.tabular_dir / "tcia_studies.csv"

    # --- downloads --------------------------------------------------------------------
    @property
    @layout_path("downloads/", "what arrives: one folder per session, tcia/ and dicom_node/")
    def downloads_root(self) -> Path:
        return self.root / "downloads"

    @layout_path("downloads/<session>/", "the session's scanner dumps, as delivered")
    def downloads_dir(self, session: str) -> Path:
        return self.downloads_root / session

    @layout_path("downloads/<session>/<item>", "one scanner dump, named as the site names it")
    def download_path(self, session: str, item: str) -> Path:
        return self.downloads_dir(session) / item

    @property
    @layout_path("downloads/tcia/", "TCIA manifests as dropped (<name>.tcia or <name>.csv), never changed")
    def tcia_root(self) -> Path:
        return self.downloads_root / "tcia"

    @layout_path("downloads/tcia/<name>/", "what was fetched for manifest <name>")
    def tcia_manifest_dir(self, name: str) -> Path:
        return self.tcia_root / name

    @layout_path("downloads/tcia/<name>/series/", "the manifest's series, one zip and one record each")
    def tcia_series_dir(self, name: str) -> Path:
        return self.tcia_manifest_dir(name) / "series"

    @staticmethod
    @layout_path("downloads/tcia/<name>/series/<uid>.{zip,json}",
                 "a series as NBIA sent it, and its verification record")
    def tcia_series_files(series_dir: Path, series_uid: str) -> tuple[Path, Path]:
        return Path(series_dir) / f"{series_uid}.zip", Path(series_dir) / f"{series_uid}.json"

    @layout_path("downloads/tcia/<name>/series/<uid>.zip", "a series as NBIA sent it (md5 verified)")
    def tcia_series_zip(self, name: str, series_uid: str) -> Path:
        return self.tcia_series_files(self.tcia_series_dir(name), series_uid)[0]

    @layout_path("downloads/tcia/<name>/resolved.csv", "SeriesInstanceUID -> PatientID, study, visit, session label")
    def tcia_resolved_path(self, name: str) -> Path:
        return self.tcia_manifest_dir(name) / "resolved.csv"

    @layout_path("downloads/tcia/<name>/series.csv", "every series of the manifest's last run: outcome, visit, reason")
    def tcia_series_table_path(self, name: str) -> Path:
        return self.tcia_manifest_dir(name) / "series.csv"

    @property
    @layout_path("downloads/dicom_node/", "studies fetched from the DICOM node (Orthanc), one folder per visit")
    def dicom_node_root(self) -> Path:
        return self.downloads_root / "dicom_node"

    @layout_path("downloads/dicom_node/<visit>/", "the visit's studies as the DICOM node sent them")
    def dicom_node_dir(self, visit_key: str) -> Path:
        return self.dicom_node_root / visit_key

    @staticmethod
    @layout_path("downloads/dicom_node/<visit>/<study_id>.{zip,json}",
                 "one study as one ZIP, and its record: instances, data version")
    def dicom_node_files(visit_dir: Path, study_id: str) -> tuple[Path, Path]:
        return Path(visit_dir) / f"{study_id}.zip", Path(visit_dir) / f"{study_id}.json"

    # --- scratch ----------------------------------------------------------------------
    @property
    @layout_path("scratch/", "temporary files; safe to delete when nothing runs")
    def scratch_dir(self) -> Path:
        return self.root / "scratch"

    @property
    @layout_path("scratch/xnat/", "the XNAT upload's temporary zips (xnat-upload-*.zip), removed after each upload")
    def xnat_upload_dir(self) -> Path:
        return self.scratch_dir / "xnat"

    @property
    @layout_path("scratch/state/", "the platform's own state; safe to delete (costs one full rescan)")
    def state_dir(self) -> Path:
        return self.scratch_dir / "state"

    @layout_path("scratch/state/downloads-<id>.sqlite", "the downloads sensor's settled state (SQLite, WAL)")
    def downloads_state_path(self, state_id: str) -> Path:
        return self.state_dir / f"downloads-{state_id}.sqlite"

    @layout_path("scratch/raw_dicoms/<session>/<participant>/", "the visit's dumps extracted, messy inside (nipoppy's convention)")
    def raw_dir(self, visit: Visit) -> Path:
        return self.scratch_dir / "raw_dicoms" / visit.session / visit.participant

    # --- organized DICOMs, store, DataLad, catalog ------------------------------------
    @layout_path("dicom/<session>/<participant>/", "flat list of the visit's validated DICOMs (a BIDS converter's input)")
    def dicom_dir(self, visit: Visit) -> Path:
        return self.root / "dicom" / visit.session / visit.participant

    @layout_path("annotations/<session>/<participant>/",
                 "files a source sends beside a series' images (TCIA's annotation XML), as <SeriesInstanceUID>/<name>")
    def annotations_dir(self, visit: Visit) -> Path:
        return self.root / "annotations" / visit.session / visit.participant

    @property
    @layout_path("store/", "tarballs and DataLad deposits, served at datalad_store_url")
    def store_root(self) -> Path:
        return self.root / "store"

    @layout_path("store/<study>/", "the study's visit tarballs and deposits")
    def store_dir(self, study: str) -> Path:
        return self.store_root / study

    @layout_path("store/<study>/<visit>_dicom.tar", "reproducible visit tarball")
    def tarball_path(self, study: str, visit: Visit) -> Path:
        return self.store_dir(study) / tarball_name(visit.key)

    @layout_path("store/<study>/<visit>_metadata_tarball.json",
                 "the tarball's size, md5, sha256, store and dataset paths")
    def metadata_tarball_path(self, study: str, visit: Visit) -> Path:
        return self.store_dir(study) / f"{visit.key}_metadata_tarball.json"

    @layout_path("store/<study>/<visit>_metadata_dicoms.json", "per DICOM: path in the tar, md5, size, series tags")
    def metadata_dicoms_path(self, study: str, visit: Visit) -> Path:
        return self.store_dir(study) / f"{visit.key}_metadata_dicoms.json"

    @staticmethod
    @layout_path("store/<study>/<visit>_XDLRA--<part>",
                 "a file of the visit's DataLad deposit (datalad-annex:: export)")
    def deposit_file(store_dir: Path, visit_key: str, part: str) -> Path:
        return Path(store_dir) / f"{visit_key}_XDLRA--{part}"

    @layout_path("store/<study>/<visit>_XDLRA--{refs,repo-export}",
                 "the visit's DataLad dataset, clonable from the store")
    def deposit_paths(self, study: str, visit: Visit) -> tuple[Path, Path]:
        return tuple(self.deposit_file(self.store_dir(study), visit.key, p) for p in ("refs", "repo-export"))

    @layout_path("datalad/<study>/", "the study's visit datasets (a superdataset if datalad_superdataset)")
    def datalad_study_dir(self, study: str) -> Path:
        return self.root / "datalad" / study

    @staticmethod
    @layout_path("datalad/.<study>.superdataset.lock",
                 "held while a visit is recorded in the study's superdataset")
    def superdataset_lock_path(superdataset: Path) -> Path:
        superdataset = Path(superdataset)
        return superdataset.parent / f".{superdataset.name}.superdataset.lock"

    @layout_path("datalad/<study>/<visit>/", "the visit's DataLad dataset, indexing its tarball")
    def datalad_dir(self, study: str, visit: Visit) -> Path:
        return self.datalad_study_dir(study) / visit.key

    @layout_path("datalad/<study>/<visit>/.datalad/", "there once the visit's dataset was made")
    def datalad_marker_path(self, study: str, visit: Visit) -> Path:
        return self.datalad_dir(study, visit) / ".datalad"

    @property
    @layout_path("catalog/", "the browsable catalog (any static HTTP server shows it)")
    def catalog_dir(self) -> Path:
        return self.root / "catalog"

    @property
    @layout_path("catalog/index.html", "the catalog page, rendered from the entries")
    def catalog_page_path(self) -> Path:
        return self.catalog_dir / "index.html"

    @property
    @layout_path("catalog/visits/", "the catalog's entries, one per visit")
    def catalog_entries_dir(self) -> Path:
        return self.catalog_dir / "visits"

    @layout_path("catalog/visits/<visit>.json", "the visit's entry: its dataset's id, version, series")
    def catalog_entry_path(self, visit_key: str) -> Path:
        return self.catalog_entries_dir / f"{visit_key}.json"

    @property
    @layout_path("catalog/.lock", "held while an entry is written and the page rendered")
    def catalog_lock_path(self) -> Path:
        return self.catalog_dir / ".lock"

    # --- BIDS ---------------------------------------------------------------------------
    @property
    @layout_path("code/dcm2bids_config.json", "the dcm2bids config (BIDS's own place for code)")
    def dcm2bids_config_path(self) -> Path:
        return self.root / "code" / "dcm2bids_config.json"

    @property
    @layout_path("bids/", "the BIDS dataset")
    def bids_root(self) -> Path:
        return self.root / "bids"

    @property
    @layout_path("bids/dataset_description.json", "created when missing, never overwritten")
    def bids_description_path(self) -> Path:
        return self.bids_root / "dataset_description.json"

    @property
    @layout_path("bids/README.md", "created when missing (unless README, README.txt or README.rst)")
    def bids_readme_path(self) -> Path:
        return self.bids_root / "README.md"

    @property
    @layout_path("bids/participants.tsv", "one row per sub-* folder with a session; added columns kept")
    def bids_participants_path(self) -> Path:
        return self.bids_root / "participants.tsv"

    @layout_path("bids/sub-<participant>/", "a participant of the BIDS dataset")
    def bids_subject_dir(self, participant: str) -> Path:
        return self.bids_root / f"sub-{participant}"

    @layout_path("bids/sub-<participant>/sub-<participant>_sessions.tsv",
                 "session_id, acq_time (StudyDate + StudyTime); added columns kept")
    def bids_sessions_path(self, participant: str) -> Path:
        return self.bids_subject_dir(participant) / f"sub-{participant}_sessions.tsv"

    @layout_path("bids/sub-<participant>/<session>/", "one visit's session, replaced whole when the visit changes")
    def bids_session_dir(self, visit: Visit) -> Path:
        return self.bids_subject_dir(visit.participant) / visit.session

    @property
    @layout_path("scratch/bids/", "the BIDS conversions' scratch folders")
    def bids_scratch_root(self) -> Path:
        return self.scratch_dir / "bids"

    @layout_path("scratch/bids/<visit>.tmp-<tag>/", "one BIDS conversion's scratch (in/, niix/, out/); removed at its end")
    def bids_work_dir(self, visit_key: str, tag: str) -> Path:
        return self.bids_scratch_root / f"{visit_key}.tmp-{tag}"

    @property
    @layout_path("scratch/bids/.bids.lock", "held while a session is swapped in and the dataset files written")
    def bids_lock_path(self) -> Path:
        return self.bids_scratch_root / ".bids.lock"

    # --- the de-identified copy ------------------------------------------------------------
    @property
    @layout_path("share/", "de-identified copies for sharing, by pseudonym (nothing here names a participant)")
    def share_root(self) -> Path:
        return self.root / "share"

    @layout_path("share/<pseudonym>/<session>/", "a visit de-identified (PS3.15 Annex E), leak-checked")
    def share_dir(self, pseudonym: str, session: str) -> Path:
        return self.share_root / pseudonym / session

    @layout_path("share/<pseudonym>/<session>/<newuid>.dcm", "one de-identified DICOM, named by its new SOPInstanceUID")
    def share_file(self, pseudonym: str, session: str, new_uid: str) -> Path:
        return self.share_dir(pseudonym, session) / f"{new_uid}.dcm"

    @layout_path("share/<pseudonym>/<pseudonym>_<session>_dicom.tar",
                 "the de-identified visit as a reproducible TAR (as the visit tarball), top folder <pseudonym>_<session>/")
    def share_tarball_path(self, pseudonym: str, session: str) -> Path:
        return self.share_root / pseudonym / share_tarball_name(pseudonym, session)

    # --- logs ---------------------------------------------------------------------------
    @property
    @layout_path("logs/", "per-visit reports of the chain's steps")
    def logs_dir(self) -> Path:
        return self.root / "logs"

    @layout_path("logs/organize/<visit>_files.tsv", "every file of the dump: kept or excluded, and why")
    def organize_report_path(self, visit: Visit) -> Path:
        return self.logs_dir / "organize" / f"{visit.key}_files.tsv"

    @layout_path("logs/extract/<visit>.json", "what raw_dicoms extracted from each dump")
    def extract_report_path(self, visit: Visit) -> Path:
        return self.logs_dir / "extract" / f"{visit.key}.json"

    @layout_path("logs/qc/<visit>_montage.png", "QC montage (middle image of each kept series)")
    def qc_path(self, visit: Visit) -> Path:
        return self.logs_dir / "qc" / f"{visit.key}_montage.png"

    @layout_path("logs/xnat/<visit>.json", "the visit's XNAT session: labels, status, files XNAT filtered")
    def xnat_marker_path(self, visit_key: str) -> Path:
        return self.logs_dir / "xnat" / f"{visit_key}.json"

    @layout_path("logs/xnat/<visit>.pending.json",
                 "what an upload of the visit is sending (files by SOPInstanceUID); removed once XNAT holds them all")
    def xnat_pending_path(self, visit_key: str) -> Path:
        return self.logs_dir / "xnat" / f"{visit_key}.pending.json"

    @property
    @layout_path("logs/dicom_node/unmapped.tsv", "studies on the DICOM node that map to no visit (yet), and why")
    def dicom_node_unmapped_path(self) -> Path:
        return self.logs_dir / "dicom_node" / "unmapped.tsv"

    @layout_path("logs/bids/<visit>.json", "the visit's last BIDS conversion: inputs' fingerprint, files, series")
    def bids_record_path(self, visit: Visit) -> Path:
        return self.logs_dir / "bids" / f"{visit.key}.json"

    @layout_path("logs/deid/<visit>.json",
                 "the visit's de-identification: profile, options, key fingerprint, files kept and excluded (why), leaks")
    def deid_report_path(self, visit: Visit) -> Path:
        return self.logs_dir / "deid" / f"{visit.key}.json"


# --- inside a visit's DataLad dataset (paths relative to the dataset, not to the root) -------

def share_tarball_name(pseudonym: str, session: str) -> str:
    """The shared copy's tarball file name: the visit tarball's, with the pseudonym for the participant."""
    return f"{pseudonym}_{session}_dicom.tar"


def tarball_name(visit_key: str) -> str:
    """The visit tarball's file name: in ``store/<study>/`` and in the visit's DataLad dataset."""
    return f"{visit_key}_dicom.tar"


def dataset_tarball_path(tar_name: str) -> str:
    """Where a visit's tarball (file name ``tar_name``, normally :func:`tarball_name`) sits in the
    visit's DataLad dataset: ``dspath`` of the tarball metadata."""
    return f"icf/{tar_name}"
