"""Scanner dumps in ``downloads/<session>/``: recognize items, match them to participants,
and tell complete downloads from ones still arriving.

An *item* is a ``.zip``, ``.tar``, ``.tar.gz``/``.tgz``, ``.tar.bz2``, ``.tar.xz``/``.txz``
file or a plain folder directly inside ``downloads/<session>/``. Its participant comes from
its name, matched against the manifest after normalization (``QPN_001_MR.zip`` -> ``QPN001``),
or from ``tabular/dicom_dir_map.tsv`` for names that follow no convention.

Every other entry the scan does not take is reported with the reason (never dropped
silently): an archive format that cannot be extracted here (``.7z``, ``.rar``, ``.tar.zst``,
...), a file that is no download item, a symbolic link, a dump whose name says another
session than its folder. Only hidden names (``.*``), ``<item>.done`` markers and partial
names (``.part``, ``.crdownload``, ...) are passed over without a word.
"""

from __future__ import annotations

import csv
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from .errors import DownloadError
from .fsutil import printable
from .ids import Visit, normalize_participant_id, normalize_session_id
from .layout import DatasetLayout

ARCHIVE_SUFFIXES = (".tar.gz", ".tar.bz2", ".tar.xz", ".tgz", ".txz", ".tar", ".zip")
# archives seen in the wild that cannot be extracted here: reported, with what to do
UNSUPPORTED_SUFFIXES = {
    ".7z": "a 7-Zip archive", ".rar": "a RAR archive", ".tar.zst": "a Zstandard-compressed tar",
    ".tzst": "a Zstandard-compressed tar", ".zst": "a Zstandard-compressed file",
    ".tar.lz": "an lzip-compressed tar", ".tar.lzma": "an LZMA-compressed tar", ".tar.z": "a compress(1) tar",
    ".tar.lz4": "an LZ4-compressed tar", ".gz": "a gzip-compressed file (not a tar)",
    ".bz2": "a bzip2-compressed file (not a tar)", ".xz": "an xz-compressed file (not a tar)",
    ".iso": "a disc image", ".dmg": "a disc image", ".cab": "a cabinet archive",
}
ITEM_FORMATS = ".zip, .tar, .tar.gz/.tgz, .tar.bz2, .tar.xz/.txz or a folder"
PARTIAL_SUFFIXES = (".part", ".crdownload", ".tmp", ".partial", ".download")
DONE_SUFFIX = ".done"


def item_kind(name: str, is_dir: bool) -> str | None:
    """'folder', 'zip', 'tar', ... or None when the entry is not a download item."""
    low = name.lower()
    if name.startswith("."):
        return None
    if is_dir:
        return "folder"
    for suf in ARCHIVE_SUFFIXES:
        if low.endswith(suf):
            return {".tgz": "tar.gz", ".txz": "tar.xz"}.get(suf, suf[1:])
    return None


def not_an_item_reason(name: str, is_dir: bool) -> str:
    """Why an entry of ``downloads/<session>/`` is not a download item."""
    low = name.lower()
    for suf in sorted(UNSUPPORTED_SUFFIXES, key=len, reverse=True):
        if low.endswith(suf):
            return (f"is {UNSUPPORTED_SUFFIXES[suf]}, which cannot be extracted here; unpack it into a folder "
                    f"beside it, or re-pack it as {ITEM_FORMATS.replace(' or a folder', '')}")
    return f"is not a download item (expected {ITEM_FORMATS})"


_SESSION_IN_NAME = re.compile(r"(?:^|[^A-Za-z0-9])ses[-_]([A-Za-z0-9]+)", re.IGNORECASE)


def _same_session(label: str, session: str) -> bool:
    other = session[4:]
    if label.isdigit() and other.isdigit():
        return int(label) == int(other)
    return label.lower() == other.lower()


def named_session(name: str, session: str) -> str | None:
    """The session an item's name says when it is not ``session`` (``QPN_001_ses-02.zip``
    in ``ses-01/``), else None."""
    for m in _SESSION_IN_NAME.finditer(item_stem(name)):
        if not _same_session(m.group(1), session):
            return f"ses-{m.group(1)}"
    return None


def item_stem(name: str) -> str:
    low = name.lower()
    for suf in ARCHIVE_SUFFIXES:
        if low.endswith(suf):
            return name[: -len(suf)]
    return name


def shown(name: str) -> str:
    """A file name as messages show it: bytes that are no UTF-8 (kept by the OS as lone
    surrogates) as ``\\xNN``, so a message can always be logged and stored
    (:func:`~.fsutil.printable`, control characters left as they are)."""
    return printable(name, controls=False)


def is_partial_name(name: str) -> bool:
    return name.lower().endswith(PARTIAL_SUFFIXES)


def read_dicom_dir_map(path: Path) -> dict[tuple[str, str], str]:
    """``participant_id  session_id  download`` (TSV) -> {(participant, session): name}."""
    if not path.exists():
        return {}
    try:
        return _read_dir_map(path)
    except UnicodeDecodeError as exc:
        raise DownloadError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason}); save the table as UTF-8") from None
    except csv.Error as exc:  # a field over csv's size limit, a NUL byte, ...
        raise DownloadError(f"{path}: the table cannot be read as tab-separated text ({exc})") from None


def _read_dir_map(path: Path) -> dict[tuple[str, str], str]:
    out: dict[tuple[str, str], str] = {}
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh, delimiter="\t")
        need = {"participant_id", "session_id", "download"}
        if reader.fieldnames is None or not need <= set(reader.fieldnames):
            raise DownloadError(f"{path}: needs the tab-separated columns {', '.join(sorted(need))}")
        for line, row in enumerate(reader, start=2):
            short = [k for k in ("participant_id", "session_id", "download") if row.get(k) is None]
            if short:  # csv gives None to the columns a short row lacks
                raise DownloadError(f"{path}: line {line}: the row has no {', '.join(short)} column (a tab missing?)")
            try:
                key = (normalize_participant_id(row["participant_id"]), normalize_session_id(row["session_id"]))
            except ValueError as exc:
                raise DownloadError(f"{path}: line {line}: {exc}") from None
            out[key] = row["download"].strip()
    return out


def _consumes(stem: str, participant: str) -> int | None:
    """Index in the raw stem right after the participant's characters (separators skipped),
    or None when the stem does not start with the participant."""
    i = k = 0
    while i < len(stem) and k < len(participant):
        ch = stem[i]
        if ch.isalnum():
            if ch.lower() != participant[k].lower():
                return None
            k += 1
        i += 1
    return i if k == len(participant) else None


def participant_index(participants) -> dict[str, list[str]]:
    """Lower-cased participant id -> participants: built once per scan of the downloads."""
    index: dict[str, list[str]] = {}
    for p in participants:
        index.setdefault(p.lower(), []).append(p)
    return index


def match_participant(name: str, participants, index: dict[str, list[str]] | None = None) -> list[str]:
    """Participants of the manifest an item name belongs to.

    The normalized stem must equal a participant, or start with it and continue, in the
    raw name, after a separator (``QPN_001_MR`` matches ``QPN001`` but not ``QPN0010``).
    With a prebuilt ``index`` it costs one look-up per prefix of the stem, whatever the size
    of the manifest.
    """
    index = index if index is not None else participant_index(participants)
    stem = item_stem(name)
    if stem.lower().startswith("sub-"):
        stem = stem[4:]
    norm = "".join(ch for ch in stem if ch.isalnum())
    hits = []
    for n in range(1, len(norm) + 1):
        for p in index.get(norm[:n].lower(), ()):
            end = _consumes(stem, p)
            if end is not None and (end == len(stem) or not stem[end].isalnum()):
                hits.append(p)
    return sorted(set(hits))


@dataclass(frozen=True)
class DownloadItem:
    path: Path
    session: str
    kind: str  # folder | zip | tar | tar.gz | tar.bz2 | tar.xz; "none" for an entry that is no item

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def stem(self) -> str:
        return item_stem(self.path.name)


@dataclass(frozen=True)
class Signature:
    """What tells a download changed or is still growing."""

    size: int
    mtime_ns: int
    files: int

    def token(self) -> str:
        return f"{self.size}:{self.mtime_ns}:{self.files}"


def signature(path: Path) -> Signature:
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        return Signature(st.st_size, st.st_mtime_ns, 1)
    size, mtime, files = 0, st.st_mtime_ns, 0
    for dirpath, dirs, names in os.walk(path):
        for d in dirs:
            mtime = max(mtime, os.stat(os.path.join(dirpath, d), follow_symlinks=False).st_mtime_ns)
        for n in names:
            s = os.stat(os.path.join(dirpath, n), follow_symlinks=False)
            size += s.st_size
            mtime = max(mtime, s.st_mtime_ns)
            files += 1
    return Signature(size, mtime, files)


@dataclass(frozen=True)
class ScannedItem:
    item: DownloadItem
    visit: Visit | None
    problem: str | None  # why not taken: unknown participant, ambiguous, other session, format, link
    done_marker: bool


def classify_entry(ses: str, name: str, path: Path, is_dir: bool, is_symlink: bool, done: bool,
                   participants, index: dict[str, list[str]],
                   by_name: dict[tuple[str, str], str]) -> ScannedItem:
    """One entry of ``downloads/<ses>/`` (not hidden, no marker, no partial name): its visit,
    or the reason it has none. Needs no stat: what a directory listing tells is enough."""
    where = f"'{ses}/{shown(name)}'"
    if is_symlink:
        return ScannedItem(DownloadItem(path, ses, "none"), None,
                           f"{where} is a symbolic link; links are not followed (move or copy the "
                           "dump itself into the downloads folder)", done)
    kind = item_kind(name, is_dir)
    if kind is None:
        return ScannedItem(DownloadItem(path, ses, "none"), None, f"{where} {not_an_item_reason(name, is_dir)}", done)
    item = DownloadItem(path, ses, kind)
    mapped = by_name.get((ses, name)) or by_name.get((ses, item.stem))
    if mapped:
        return ScannedItem(item, Visit(mapped, ses), None, done)
    other = named_session(name, ses)
    if other:
        return ScannedItem(item, None, f"{where} is named for session {other} but lies in {ses}/; "
                           f"move it to downloads/{other}/ (or map it in tabular/dicom_dir_map.tsv)", done)
    hits = match_participant(name, participants, index)
    if len(hits) == 1:
        return ScannedItem(item, Visit(hits[0], ses), None, done)
    if not hits:
        return ScannedItem(item, None, f"'{ses}/{name}' matches no participant of the manifest "
                           "(add it to the manifest or map it in tabular/dicom_dir_map.tsv)", done)
    return ScannedItem(item, None, f"'{ses}/{name}' matches several participants "
                       f"({', '.join(hits)}); map it in tabular/dicom_dir_map.tsv", done)


def names_by_download(dir_map: dict[tuple[str, str], str] | None) -> dict[tuple[str, str], str]:
    """``dicom_dir_map.tsv`` turned around: {(session, download name): participant}."""
    return {(ses, name): p for (p, ses), name in (dir_map or {}).items()}


def passed_over(name: str) -> bool:
    """Entries a scan passes over without a word: hidden names, ``.done`` markers, partial names."""
    return name[:1] == "." or name.endswith(DONE_SUFFIX) or is_partial_name(name)


def entry_is_dir(e: os.DirEntry) -> bool:
    try:
        return e.is_dir(follow_symlinks=False)
    except OSError:
        return False


def scan_downloads(layout: DatasetLayout, sessions: tuple[str, ...], participants: set[str],
                   dir_map: dict[tuple[str, str], str] | None = None,
                   name_filter=None, index: dict[str, list[str]] | None = None) -> list[ScannedItem]:
    """Every item of every session folder (``layout.downloads_dir``), each with its visit or the reason it has none
    (with ``name_filter``, only the entries whose name it accepts are classified).

    ``index``: :func:`participant_index` of ``participants`` when the caller keeps one (a
    caller asking visit after visit builds it once per manifest, not once per question);
    built here otherwise."""
    by_name = names_by_download(dir_map)
    index = index if index is not None else participant_index(participants)
    out: list[ScannedItem] = []
    for ses in sessions:
        folder = layout.downloads_dir(ses)
        try:
            entries = list(os.scandir(folder))
        except FileNotFoundError:
            continue
        names = {e.name for e in entries}
        for e in sorted(entries, key=lambda e: e.name):
            if passed_over(e.name):
                continue  # hidden, a marker, or still being written by a browser/downloader
            if name_filter is not None and not name_filter(ses, e.name):
                continue
            out.append(classify_entry(ses, e.name, Path(e.path), entry_is_dir(e), e.is_symlink(),
                                      (e.name + DONE_SUFFIX) in names, participants, index, by_name))
    return out


def _bare_stem(name: str) -> str:
    stem = item_stem(name)
    return stem[4:] if stem.lower().startswith("sub-") else stem


def _could_be_visit(visit: Visit, dir_map: dict[tuple[str, str], str] | None):
    """A cheap filter of names before classification: those starting like the participant,
    or named in ``dicom_dir_map.tsv`` (a session folder of 50,000 dumps is not classified
    whole for one visit)."""
    mapped = {name for (_, ses), name in (dir_map or {}).items() if ses == visit.session}

    def accept(ses: str, name: str) -> bool:
        return (name in mapped or item_stem(name) in mapped
                or _consumes(_bare_stem(name), visit.participant) is not None)
    return accept


def items_for_visit(layout: DatasetLayout, visit: Visit, participants: set[str],
                    dir_map: dict[tuple[str, str], str] | None = None,
                    index: dict[str, list[str]] | None = None) -> list[DownloadItem]:
    """The downloads of one visit (usually one; a dump split in parts gives several).
    ``index``: the participants' prebuilt :func:`participant_index`, if at hand."""
    scanned = scan_downloads(layout, (visit.session,), participants, dir_map,
                             name_filter=_could_be_visit(visit, dir_map), index=index)
    return [s.item for s in scanned if s.visit == visit]


def problems_for_participant(layout: DatasetLayout, visit: Visit, participants: set[str],
                             dir_map: dict[tuple[str, str], str] | None = None,
                             index: dict[str, list[str]] | None = None) -> list[str]:
    """Why entries of the visit's session folder whose name starts like the participant were
    not taken (a .7z, a link, another session's dump): for the message of a visit without
    download. ``index`` as for :func:`items_for_visit`."""
    scanned = scan_downloads(layout, (visit.session,), participants, dir_map,
                             name_filter=_could_be_visit(visit, dir_map), index=index)
    return [s.problem for s in scanned if s.problem and s.visit is None
            and _consumes(_bare_stem(s.item.name), visit.participant) is not None]


_SAFE_COMPONENT = re.compile(r"[^A-Za-z0-9._+-]")


def safe_folder_name(name: str) -> str:
    """A folder name for an item's extraction that cannot escape or hide."""
    out = _SAFE_COMPONENT.sub("_", name).strip(".") or "item"
    return out
