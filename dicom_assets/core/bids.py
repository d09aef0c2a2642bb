"""BIDS: a visit converted to a BIDS session with dcm2bids and dcm2niix, validated with the
official BIDS validator (``bids-validator-deno``, run by the ``deno`` of the ``deno`` wheel).

::

    <root>/code/dcm2bids_config.json        the dcm2bids (3.x) config, as sites already write it
    <root>/bids/                            the BIDS dataset
      dataset_description.json, README, participants.tsv
      sub-<participant>/sub-<participant>_sessions.tsv
      sub-<participant>/ses-<label>/<datatype>/...
    <root>/scratch/bids/<visit>.tmp-<hex>/  one conversion's scratch, removed when it ends:
      in/<n>/<participant>/                 links to the kept DICOMs of series n
      niix/                                 dcm2niix's output, one run per series
      out/                                  dcm2bids' output folder (its tmp_dcm2bids/ is here)
    <root>/logs/bids/<visit>.json           what the last conversion of the visit did

A conversion: dcm2niix runs once per series of the organize report (with the config's
``dcm2niixOptions``), so a series it cannot convert (a transfer syntax it lacks, slices it
cannot stack, a crash) is reported with dcm2niix's own lines and its files removed, and the
other series go on. ``dcm2bids --skip_dcm2niix`` then pairs the sidecars with the config's
descriptions and writes ``out/sub-P/ses-S/``. That folder is compared with the session folder
in ``bids/``: the same bytes, nothing is written; otherwise it is swapped in for the old one
with ``fsutil.swap_dir`` (one ``renameat2(RENAME_EXCHANGE)``: a reader sees the old session or
the new one, never a mix). The dataset files are rewritten under a lock, only when their content changes.

A visit whose inputs (the kept rows of its organize report and the files' sizes and mtimes),
config and tool versions are those of the last conversion, and whose session folder still
holds the files written then, is not converted again: nothing is written at all.

Nothing here imports Dagster.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
import zlib
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

from .errors import DicomAssetsError, parse_json_text
from .fsutil import atomic_write, file_digest, file_lock, recover_dir, swap_dir, temp_sibling, tree_digests
from .ids import Visit
from .layout import DatasetLayout

CONVERTER_VERSION = "1"  # bump when a change here changes what a conversion writes
BIDS_VERSION = "1.10.1"
DEFAULT_DCM2NIIX_OPTIONS = "-b y -ba y -z y -f '%3s_%f_%p_%t'"

# dcm2bids 3.x config: top-level keys and the keys of one description (its documentation,
# "How to create a configuration file", and dcm2bids_gen.py / sidecar.py of 3.3.1)
_TOP_KEYS = {"descriptions", "dcm2niixOptions", "compKeys", "search_method", "case_sensitive", "dup_method",
             "post_op", "bids_uri", "extractors"}
_DESC_KEYS = {"id", "datatype", "suffix", "custom_entities", "criteria", "sidecar_changes"}
_OLD_DESC_KEYS = {"dataType": "datatype", "modalityLabel": "suffix", "customLabels": "custom_entities",
                  "sidecarChanges": "sidecar_changes", "intendedFor": "sidecar_changes.IntendedFor"}
DATATYPES = ("anat", "func", "dwi", "fmap", "perf", "pet", "meg", "eeg", "ieeg", "beh", "micr", "nirs", "motion",
             "mrs")
_LABEL = re.compile(r"^[A-Za-z0-9]+$")
_ENTITY = re.compile(r"^[a-z]+-[A-Za-z0-9]+$")


class BidsError(DicomAssetsError):
    """A visit cannot be converted to BIDS (missing or malformed config, a tool that fails)."""


class BidsConfigError(BidsError):
    """The dcm2bids config is missing or malformed: the message names the file and the entry."""


# --------------------------------------------------------------------------- the config
@dataclass(frozen=True)
class Dcm2bidsConfig:
    path: Path
    data: dict
    sha256: str

    @property
    def dcm2niix_options(self) -> str:
        return self.data.get("dcm2niixOptions", DEFAULT_DCM2NIIX_OPTIONS)


def _entry_name(i: int, desc: object) -> str:
    name = f"descriptions[{i}]"
    if isinstance(desc, dict) and isinstance(desc.get("id"), str):
        name += f" (id {desc['id']!r})"
    return name


def _key_problem(desc: dict) -> str | None:
    old = sorted(set(desc) & set(_OLD_DESC_KEYS))
    if old:
        return ", ".join(f"{k!r} is a dcm2bids 2.x key (3.x: {_OLD_DESC_KEYS[k]!r})" for k in old)
    unknown = sorted(set(desc) - _DESC_KEYS)
    if unknown:
        return f"unknown key(s) {', '.join(map(repr, unknown))}; known: {', '.join(sorted(_DESC_KEYS))}"
    missing = [k for k in ("datatype", "suffix", "criteria") if k not in desc]
    return f"required key {missing[0]!r} is missing" if missing else None


def _criteria_problem(crit: object, regex: bool) -> str | None:
    if not isinstance(crit, dict) or not crit:
        return "'criteria' must be a non-empty object of sidecar fields (e.g. {\"SeriesDescription\": \"T1w*\"})"
    if not regex:
        return None
    for k, v in crit.items():
        for pattern in (v if isinstance(v, list) else [v]):
            if isinstance(pattern, str):
                try:
                    re.compile(pattern)
                except re.error as exc:
                    return f"criteria {k!r}: {pattern!r} is no regular expression ({exc})"
    return None


def _optional_problem(desc: dict) -> str | None:
    ents = desc.get("custom_entities", [])
    for e in ([ents] if isinstance(ents, str) else ents if isinstance(ents, list) else [None]):
        if not isinstance(e, str) or not (_ENTITY.match(e) or e.isalpha()):
            return f"'custom_entities' must be 'key-value' strings (e.g. 'acq-mprage', 'task-rest'), not {e!r}"
    if "sidecar_changes" in desc and not isinstance(desc["sidecar_changes"], dict):
        return "'sidecar_changes' must be an object"
    if "id" in desc and (not isinstance(desc["id"], str) or not desc["id"]):
        return "'id' must be a non-empty string"
    return None


def _description_problem(desc: object, regex: bool) -> str | None:
    """What is wrong with one entry of ``descriptions`` (the first thing found), None if nothing."""
    if not isinstance(desc, dict):
        return "must be an object with 'datatype', 'suffix' and 'criteria'"
    problem = _key_problem(desc)
    if problem:
        return problem
    if desc["datatype"] not in DATATYPES:
        return f"'datatype' {desc['datatype']!r} is not a BIDS datatype ({', '.join(DATATYPES)})"
    if not isinstance(desc["suffix"], str) or not _LABEL.match(desc["suffix"]):
        return f"'suffix' must be letters and digits (a BIDS suffix such as 'T1w'), not {desc['suffix']!r}"
    return _criteria_problem(desc["criteria"], regex) or _optional_problem(desc)


def _check_description(path: Path, i: int, desc: object, regex: bool) -> None:
    problem = _description_problem(desc, regex)
    if problem:
        raise BidsConfigError(f"{path}: {_entry_name(i, desc)}: {problem}")


def _check_options(path: Path, data: dict, allow_post_op: bool) -> None:
    """``post_op`` (allowed only by the site), and ``dcm2niixOptions`` (no -o, no -b n, a -f that is a name)."""
    if "post_op" in data and not allow_post_op:
        raise BidsConfigError(f"{path}: 'post_op' runs commands on the converted files; it is refused unless the "
                              "site allows it with \"bids_allow_post_op\": true in global_config.json")
    opts = data.get("dcm2niixOptions", DEFAULT_DCM2NIIX_OPTIONS)
    if not isinstance(opts, str) or re.search(r"(^|\s)-o(\s|$)", opts):
        raise BidsConfigError(f"{path}: 'dcm2niixOptions' must be a string of dcm2niix options without -o "
                              "(the output folder is the visit's scratch)")
    if re.search(r"(^|\s)-b\s+n", opts):
        raise BidsConfigError(f"{path}: 'dcm2niixOptions' has '-b n': dcm2bids needs dcm2niix's JSON sidecars")
    for m in re.finditer(r"(?:^|\s)-f\s+(\S+)", opts):
        name = m.group(1)
        if "/" in name or "\\" in name or name.strip(".") == "":
            raise BidsConfigError(f"{path}: 'dcm2niixOptions' has '-f {name}': dcm2niix's output file name must "
                                  "be a name, not a path (no '/', no '..'): each series is converted into the "
                                  "visit's scratch folder")


def load_dcm2bids_config(path: Path, *, allow_post_op: bool = False) -> Dcm2bidsConfig:
    """The dcm2bids config, checked as dcm2bids 3.x reads it; one :class:`BidsConfigError`
    naming the file and the entry at fault. ``post_op`` (commands dcm2bids runs on the
    converted files) is refused unless the site allows it (``bids_allow_post_op`` in
    global_config.json): a config file must not be a way to run any command."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise BidsConfigError(
            f"{path}: no dcm2bids config. Write one (dcm2bids 3.x format: "
            "{\"descriptions\": [{\"datatype\": \"anat\", \"suffix\": \"T1w\", \"criteria\": "
            "{\"SeriesDescription\": \"*MPRAGE*\"}}]}); the series of a visit are listed in its "
            "bids_session materialization and in logs/organize/<visit>_files.tsv") from None
    except OSError as exc:
        raise BidsConfigError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BidsConfigError(f"{path}: not UTF-8 text") from None
    data = parse_json_text(text, path, BidsConfigError, "dcm2bids config")
    if not isinstance(data, dict):
        raise BidsConfigError(f"{path}: the top level must be a JSON object with 'descriptions'")
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise BidsConfigError(f"{path}: unknown key(s) {', '.join(map(repr, unknown))}; "
                              f"known: {', '.join(sorted(_TOP_KEYS))}")
    descs = data.get("descriptions")
    if not isinstance(descs, list) or not descs:
        raise BidsConfigError(f"{path}: 'descriptions' must be a non-empty list")
    method = data.get("search_method", "fnmatch")
    if method not in ("fnmatch", "re"):
        raise BidsConfigError(f"{path}: 'search_method' must be 'fnmatch' or 're', not {method!r}")
    ids: dict[str, int] = {}
    for i, desc in enumerate(descs):
        _check_description(path, i, desc, regex=method == "re")
        if "id" in desc:
            if desc["id"] in ids:
                raise BidsConfigError(f"{path}: {_entry_name(i, desc)}: id already used by "
                                      f"descriptions[{ids[desc['id']]}]")
            ids[desc["id"]] = i
    _check_options(path, data, allow_post_op)
    return Dcm2bidsConfig(path, data, hashlib.sha256(raw).hexdigest())


# --------------------------------------------------------------------------- tools
def tool_versions() -> dict[str, str]:
    out = {"converter": CONVERTER_VERSION}
    for dist in ("dcm2bids", "dcm2niix", "bids-validator-deno", "deno"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "missing"
    return out


def _dcm2niix_bin() -> str:
    try:
        import dcm2niix
    except ImportError:
        raise BidsError("dcm2niix is not installed (pip install dcm2niix)") from None
    return dcm2niix.bin


def _tool_env() -> dict[str, str]:
    """The environment of the tools: dcm2niix first on PATH (dcm2bids asks it its version),
    no colours, no update checks."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(_dcm2niix_bin()).parent), str(Path(sys.executable).parent),
                                   env.get("PATH", "")])
    env.update({"NO_COLOR": "1", "DENO_NO_UPDATE_CHECK": "1", "DENO_NO_PROMPT": "1", "PYTHONIOENCODING": "utf-8"})
    return env


# --------------------------------------------------------------------------- the visit's series
@dataclass
class Series:
    number: int | None
    description: str
    uid: str
    files: list[str] = field(default_factory=list)  # flat names in dicom/<ses>/<participant>/
    status: str = "pending"  # converted | unmatched | several_matches | not_converted
    detail: str = ""
    bids_files: list[str] = field(default_factory=list)
    dcm2niix_lines: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"series {self.number if self.number is not None else '?'} {self.description!r}"


def read_series(report_path: Path) -> list[Series]:
    """The kept series of a visit, from its organize report (``logs/organize/<visit>_files.tsv``)."""
    try:
        with open(report_path, newline="", encoding="utf-8") as fh:
            rows = [r for r in csv.DictReader(fh, delimiter="\t") if r.get("decision") == "kept"]
    except FileNotFoundError:
        raise BidsError(f"{report_path}: no organize report; materialize organized_dicoms first") from None
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        raise BidsError(f"{report_path}: the organize report cannot be read ({exc})") from None
    by_uid: dict[str, Series] = {}
    for r in rows:
        uid = r.get("series_instance_uid") or f"(no SeriesInstanceUID, number {r.get('series_number')})"
        s = by_uid.get(uid)
        if s is None:
            num = r.get("series_number") or ""
            s = by_uid[uid] = Series(int(num) if num.lstrip("-").isdigit() else None,
                                     r.get("series_description") or "", uid)
        s.files.append(r["dest"])
    return sorted(by_uid.values(), key=lambda s: (s.number is None, s.number or 0, s.description, s.uid))


def input_fingerprint(series: list[Series], dicom_dir: Path, config: Dcm2bidsConfig, participant: str,
                      session: str) -> str:
    """What a conversion depends on: the kept files (name, size, mtime), the config's bytes, the
    converters' versions (not the validator's). Same fingerprint: same conversion."""
    h = hashlib.sha256()
    converters = {k: v for k, v in tool_versions().items() if k in ("converter", "dcm2bids", "dcm2niix")}
    h.update(json.dumps([participant, session, config.sha256, converters], sort_keys=True).encode())
    for s in series:
        h.update(f"\n{s.uid}\t{s.number}\t{s.description}".encode("utf-8", "surrogateescape"))
        for name in sorted(s.files):
            try:
                st = (dicom_dir / name).stat()
                h.update(f"\n{name}\t{st.st_size}\t{st.st_mtime_ns}".encode())
            except OSError as exc:
                raise BidsError(f"{dicom_dir / name}: a kept DICOM of {s.label} cannot be read "
                                f"({exc.strerror or exc}); materialize organized_dicoms again") from None
    return h.hexdigest()


# --------------------------------------------------------------------------- dcm2niix, one series at a time
_NIFTI = (".nii.gz", ".nii")


def _data_file(sidecar: Path) -> Path | None:
    stem = sidecar.name[: -len(".json")]
    for ext in _NIFTI:
        p = sidecar.with_name(stem + ext)
        if p.is_file():
            return p
    return None


def _gzip_complete(path: Path) -> str | None:
    """None when the gzip stream reads to its end with a good CRC; else why not."""
    try:
        with gzip.open(path, "rb") as fh:
            while fh.read(1 << 20):
                pass
    except (OSError, EOFError, zlib.error) as exc:
        return f"{path.name} is not a complete gzip stream ({exc})"
    return None


def _check_output(files: list[Path]) -> str | None:
    """Why the files dcm2niix wrote for one series are not a complete conversion (None if they are)."""
    sidecars = [f for f in files if f.name.endswith(".json")]
    if not sidecars:
        images = [f.name for f in files if f.name.endswith(_NIFTI)]
        return ("dcm2niix wrote " + (f"{', '.join(images)} but no JSON sidecar" if images else "nothing"))
    for sc in sidecars:
        try:
            json.loads(sc.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            return f"{sc.name} is not a readable JSON sidecar ({exc})"
        data = _data_file(sc)
        if data is None:
            return f"{sc.name} has no image beside it"
        if data.name.endswith(".gz"):
            why = _gzip_complete(data)
            if why:
                return why
    return None


_DCM2NIIX_NOISE = re.compile(r"^(Chris Rorden's dcm2niiX|Found \d+ DICOM|Conversion required|Convert \d+ DICOM)")


def run_dcm2niix_per_series(series: list[Series], dicom_dir: Path, work: Path, participant: str,
                            options: str, timeout: float = 1800) -> Path:
    """dcm2niix on each series alone, all into ``work/niix``; a series that fails is marked
    ``not_converted`` with dcm2niix's lines, and every file it wrote is removed."""
    import shlex

    out = work / "niix"
    out.mkdir(parents=True)
    exe, env = _dcm2niix_bin(), _tool_env()
    for i, s in enumerate(series):
        indir = work / "in" / f"{i:03d}" / participant  # %f in dcm2bids' default -f is this folder's name
        indir.mkdir(parents=True)
        for name in s.files:
            os.symlink((dicom_dir / name).resolve(), indir / name)
        before = set(os.listdir(out))
        try:
            proc = subprocess.run([exe, *shlex.split(options), "-o", str(out), str(indir)], capture_output=True,
                                  env=env, timeout=timeout)
            text = (proc.stdout + proc.stderr).decode("utf-8", "replace")
            rc: int | str = proc.returncode
        except subprocess.TimeoutExpired:
            text, rc = f"dcm2niix did not finish within {timeout:.0f} s", "timeout"
        new = sorted(out / n for n in set(os.listdir(out)) - before)
        lines = (ln.strip() for ln in text.splitlines())
        s.dcm2niix_lines = [ln for ln in lines if ln and not _DCM2NIIX_NOISE.match(ln)]
        why = _check_output(new) if rc == 0 else f"dcm2niix exit status {rc}"
        if why is not None:
            for f in new:
                f.unlink(missing_ok=True)
            msg = [ln for ln in s.dcm2niix_lines if re.match(r"(Error|Unable|Unsupported|Warning: Unsupported)", ln)]
            s.status, s.detail = "not_converted", "; ".join([why] + (msg or s.dcm2niix_lines[-2:]))
    return out


# --------------------------------------------------------------------------- dcm2bids
def _seed_version_cache(out: Path) -> None:
    """dcm2bids asks GitHub for newer releases unless its log folder holds a fresh answer:
    write one (the installed versions), so a conversion never touches the network."""
    log_dir = out / "tmp_dcm2bids" / "log"
    log_dir.mkdir(parents=True)
    v = tool_versions()
    now = time.time()
    cache = {"UNFmontreal/Dcm2Bids": {"latest": v["dcm2bids"], "timestamp": now},
             "rordenlab/dcm2niix": {"latest": "v" + v["dcm2niix"], "timestamp": now}}
    (log_dir / "version_check.json").write_text(json.dumps(cache))


def run_dcm2bids(niix: Path, work: Path, participant: str, session_label: str, config: Dcm2bidsConfig,
                 timeout: float = 1800) -> tuple[Path, str]:
    """``dcm2bids --skip_dcm2niix`` on the sidecars of ``niix``; returns its output folder and log."""
    out = work / "out"
    out.mkdir()
    _seed_version_cache(out)
    cmd = [sys.executable, "-m", "dcm2bids.cli.dcm2bids", "-d", str(niix), "-p", participant, "-s", session_label,
           "-c", str(config.path), "-o", str(out), "--skip_dcm2niix", "-l", "INFO"]
    try:
        proc = subprocess.run(cmd, capture_output=True, env=_tool_env(), timeout=timeout, cwd=work)
    except subprocess.TimeoutExpired:
        raise BidsError(f"dcm2bids did not finish within {timeout:.0f} s") from None
    text = (proc.stdout + proc.stderr).decode("utf-8", "replace")
    if proc.returncode != 0:
        tail = [ln for ln in text.splitlines() if ln.strip()][-6:]
        raise BidsError(f"dcm2bids failed (exit status {proc.returncode}) with {config.path}: " + " | ".join(tail))
    return out, text


# --------------------------------------------------------------------------- dataset files
def _read_tsv(path: Path) -> tuple[list[str], list[dict]]:
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh, delimiter="\t")
            return list(reader.fieldnames or []), list(reader)
    except FileNotFoundError:
        return [], []


def _tsv_text(columns: list[str], rows: list[dict]) -> str:
    lines = ["\t".join(columns)]
    for r in rows:
        lines.append("\t".join((r.get(c) or "n/a").replace("\t", " ").replace("\n", " ") for c in columns))
    return "\n".join(lines) + "\n"


def _write_if_changed(path: Path, text: str) -> bool:
    try:
        if path.read_text(encoding="utf-8") == text:
            return False
    except (FileNotFoundError, UnicodeDecodeError):
        pass
    with atomic_write(path, encoding="utf-8", newline="") as fh:
        fh.write(text)
    return True


def _merge_tsv(path: Path, key: str, wanted: dict[str, dict], first_columns: list[str]) -> bool:
    """``path`` holding one row per key of ``wanted`` (sorted), columns a site added kept
    (their values too), the values of ``wanted`` set."""
    columns, rows = _read_tsv(path)
    old = {r.get(key): r for r in rows}
    cols = first_columns + [c for c in columns if c not in first_columns]
    out = []
    for k in sorted(wanted):
        row = dict(old.get(k, {}))
        row.update(wanted[k])
        row[key] = k
        out.append(row)
    return _write_if_changed(path, _tsv_text(cols, out))


def update_dataset_files(layout: DatasetLayout, dataset_name: str, acq_times: dict[tuple[str, str], str]) -> list[str]:
    """``dataset_description.json`` and ``README`` when missing (a site's own are never
    overwritten), ``participants.tsv`` and every ``sub-*/sub-*_sessions.tsv`` from the session
    folders present. Call under the dataset lock. Returns the files written."""
    written = []
    bids_root = layout.bids_root
    desc = layout.bids_description_path
    if not desc.exists():
        v = tool_versions()
        _write_if_changed(desc, json.dumps({
            "Name": dataset_name, "BIDSVersion": BIDS_VERSION, "DatasetType": "raw",
            "GeneratedBy": [{"Name": "dcm2bids", "Version": v["dcm2bids"]},
                            {"Name": "dcm2niix", "Version": v["dcm2niix"]},
                            {"Name": "dicom-assets", "Description": "bids_session asset"}],
        }, indent=2) + "\n")
        written.append(desc.name)
    readme = layout.bids_readme_path
    if not readme.exists() and not any(readme.with_name(n).exists() for n in ("README", "README.txt", "README.rst")):
        _write_if_changed(readme, f"# {dataset_name}\n\nBIDS dataset converted from the site's DICOM visits by "
                                  "dicom-assets (dcm2bids + dcm2niix). Edit this file to describe the dataset.\n")
        written.append(readme.name)
    subjects = sorted(p.name for p in bids_root.glob("sub-*") if p.is_dir()
                      and any(q.is_dir() for q in p.glob("ses-*")))
    if _merge_tsv(layout.bids_participants_path, "participant_id", {s: {} for s in subjects}, ["participant_id"]):
        written.append("participants.tsv")
    for sub in subjects:
        participant = sub.removeprefix("sub-")
        sessions = sorted(q.name for q in layout.bids_subject_dir(participant).glob("ses-*") if q.is_dir())
        wanted = {s: ({"acq_time": acq_times[(sub, s)]} if (sub, s) in acq_times else {}) for s in sessions}
        path = layout.bids_sessions_path(participant)
        columns, _ = _read_tsv(path)
        first = ["session_id", "acq_time"] if ("acq_time" in columns or any(wanted.values())) else ["session_id"]
        if _merge_tsv(path, "session_id", wanted, first):
            written.append(f"{sub}/{path.name}")
    return written


def acq_time_of(dicom_file: Path) -> str | None:
    """StudyDate + StudyTime of a DICOM as a BIDS datetime (``2024-04-22T08:24:10``)."""
    import pydicom

    try:
        ds = pydicom.dcmread(dicom_file, stop_before_pixels=True, specific_tags=["StudyDate", "StudyTime"], force=True)
        d, t = str(ds.get("StudyDate", "")), str(ds.get("StudyTime", ""))
    except Exception:  # noqa: BLE001 - a missing time is only a missing column value
        return None
    if not re.fullmatch(r"\d{8}", d):
        return None
    t = (t.split(".")[0] + "000000")[:6] if re.fullmatch(r"\d{2,6}(\.\d*)?", t) else "000000"
    try:  # 00000000, 20241399: no date, so no acq_time (the BIDS validator refuses one)
        from datetime import datetime

        datetime.strptime(d + t, "%Y%m%d%H%M%S")
    except ValueError:
        return None
    return f"{d[:4]}-{d[4:6]}-{d[6:]}T{t[:2]}:{t[2:4]}:{t[4:]}"


# --------------------------------------------------------------------------- validation
@dataclass
class Validation:
    errors: list[dict]
    warnings: list[dict]
    other_errors: int  # errors in other sessions of the dataset
    summary: dict
    version: str
    seconds: float

    @property
    def passed(self) -> bool:
        return not self.errors


@contextmanager
def _no_lock():
    yield


def _validator_cmd(bids_root: Path) -> list[str]:
    try:
        import bids_validator_deno
        from deno import find_deno_bin
    except ImportError:
        raise BidsError("the BIDS validator is not installed (pip install bids-validator-deno deno)") from None
    bundle = Path(bids_validator_deno.__file__).with_name("bids-validator.js")
    # the launcher's permissions less --allow-net and --allow-write: the validator runs offline
    # and writes nothing (a network access would be refused, never waited for)
    return [os.fsdecode(find_deno_bin()), "run", "--no-prompt", "--cached-only", "--no-config", "--allow-read",
            "--allow-env", "--allow-run=git", str(bundle), str(bids_root), "--format", "json"]


def validate(bids_root: Path, participant: str, session: str, lock_path: Path | None = None,
             timeout: float = 600) -> Validation:
    """The official BIDS validator on the whole dataset (under the dataset lock, so no session is
    swapped while it reads); the issues located in this session (or in dataset-level files) are
    the session's, errors elsewhere are only counted."""
    t0 = time.monotonic()
    try:
        with (file_lock(lock_path) if lock_path is not None else _no_lock()):
            proc = subprocess.run(_validator_cmd(bids_root), capture_output=True, env=_tool_env(), timeout=timeout,
                                  cwd=bids_root)
    except subprocess.TimeoutExpired:
        raise BidsError(f"the BIDS validator did not finish within {timeout:.0f} s on {bids_root}") from None
    try:
        report = json.loads(proc.stdout)
        issues = report["issues"]["issues"]
    except (json.JSONDecodeError, KeyError, TypeError):
        err = (proc.stderr or proc.stdout).decode("utf-8", "replace").strip().splitlines()[-5:]
        raise BidsError(f"the BIDS validator gave no report on {bids_root} (exit status {proc.returncode}): "
                        + " | ".join(err)) from None
    messages = report["issues"].get("codeMessages", {})
    sub, ses = f"sub-{participant}", session
    mine, other = [], 0
    for it in issues:
        loc = it.get("location") or ""
        parts = loc.strip("/").split("/")
        in_other = (parts[0].startswith("sub-") and parts[0] != sub) or (
            parts[0] == sub and len(parts) > 2 and parts[1].startswith("ses-") and parts[1] != ses)
        row = {"severity": it.get("severity", ""), "code": it.get("code", ""),
               "sub_code": it.get("subCode", ""), "location": loc,
               "message": (it.get("issueMessage") or messages.get(it.get("code", ""), "")).strip()[:300]}
        if in_other:
            other += it.get("severity") == "error"
        else:
            mine.append(row)
    errors = [r for r in mine if r["severity"] == "error"]
    warnings = [r for r in mine if r["severity"] == "warning"]
    summary = report.get("summary", {})
    return Validation(errors, warnings, other, {k: summary.get(k) for k in
                                                ("subjects", "sessions", "dataTypes", "totalFiles", "schemaVersion")},
                      tool_versions()["bids-validator-deno"], time.monotonic() - t0)


# --------------------------------------------------------------------------- one visit
@dataclass
class ConversionResult:
    visit: str
    session_dir: str
    changed: bool  # the session folder was written
    converted: bool  # dcm2niix/dcm2bids ran (False: inputs unchanged since the last conversion)
    files: list[str]  # BIDS files of the session, relative to bids/
    series: list[dict]
    dcm2niix_warnings: list[dict]
    dataset_files_written: list[str]
    fingerprint: str
    versions: dict
    seconds: float
    note: str = ""  # why nothing was written, when nothing matched the config; or what was left out
    # sha256 of every file of the session folder as the conversion leaves it (relative path:
    # digest; None without a folder): the asset's data version is made from it, so the session
    # is hashed once per run
    tree: dict[str, str] | None = None

    def files_per_datatype(self) -> dict[str, int]:
        return dict(sorted(Counter(f.split("/")[2] for f in self.files if f.count("/") >= 3).items()))


def _sidecar_series(path: Path) -> tuple[int | None, str]:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None, ""
    n = d.get("SeriesNumber")
    return (int(n) if isinstance(n, (int, float)) else None), str(d.get("SeriesDescription", ""))


def _assign(series: list[Series], out: Path, niix: Path, tmp: Path, log: str, session_rel: str) -> None:
    """Status of each converted series: which BIDS files came from it, or why none did."""
    by_number: dict[int | None, list[Series]] = {}
    for s in series:
        by_number.setdefault(s.number, []).append(s)
    plain = re.sub(r"\x1b\[[0-9;]*m", "", log)  # dcm2bids colours its console lines
    several = set(re.findall(r"Several Pairing\s+<-\s+(\S+)", plain))
    # each BIDS sidecar came from one dcm2niix sidecar: match them by SeriesNumber (dcm2bids keeps it)
    sess = out / session_rel
    for sc in sorted(sess.rglob("*.json")) if sess.is_dir() else []:
        num, _ = _sidecar_series(sc)
        stem = sc.name[: -len(".json")]
        files = sorted(p.relative_to(out).as_posix() for p in sc.parent.glob(stem + ".*"))
        for s in by_number.get(num, []):
            if s.status == "pending":
                s.status = "converted"
            s.bids_files += files
    for s in series:
        if s.status != "pending":
            continue
        left = [p for p in sorted(tmp.glob("*.json")) if _sidecar_series(p)[0] == s.number]
        if any(p.name[: -len(".json")] in several for p in left):
            s.status, s.detail = "several_matches", "its sidecar matches several config entries: make them exclusive"
        else:
            s.status = "unmatched"
            s.detail = "no config entry matches it (SeriesDescription " + repr(s.description) + ")"


def _holds(root: Path, digests: dict[str, str]) -> bool:
    """Whether the folder ``root`` holds exactly the files of ``digests`` (relative path: sha256),
    with that content: the names are compared first, and the reading stops at the first file
    that differs (only a folder that is the same is read whole)."""
    if not root.is_dir() or not isinstance(digests, dict):
        return False
    names = set()
    for dirpath, _dirs, files in os.walk(root):
        names.update((Path(dirpath) / n).relative_to(root).as_posix() for n in files)
    return names == set(digests) and all(file_digest(root / rel) == digests[rel] for rel in sorted(names))


def convert_visit(*, visit: Visit, layout: DatasetLayout, dicom_dir: Path, config: Dcm2bidsConfig,
                  dataset_name: str) -> ConversionResult:
    """Convert one visit to ``bids/sub-<participant>/<session>/`` (see the module docstring), from
    its organized DICOMs in ``dicom_dir`` and its organize report; every other path (session
    folder, scratch, record, lock) is the layout's.

    Raises :class:`BidsError` when nothing could be converted; the session folder is then left
    as it was."""
    t0 = time.monotonic()
    participant, session = visit.participant, visit.session
    report_path, record_path = layout.organize_report_path(visit), layout.bids_record_path(visit)
    lock_path = layout.bids_lock_path
    series = read_series(report_path)
    if not series:
        raise BidsError(f"{report_path}: the visit has no kept DICOM to convert")
    sub = f"sub-{participant}"
    session_rel = f"{sub}/{session}"
    target = layout.bids_session_dir(visit)
    with file_lock(lock_path):  # a swap cut short by a crash: the old session back, strays gone
        recover_dir(target)
    fp = input_fingerprint(series, dicom_dir, config, participant, session)
    previous = _read_record(record_path)
    acq_times = {}
    if previous and previous.get("fingerprint") == fp and _holds(target, previous["tree"]):
        with file_lock(lock_path):
            if previous.get("acq_time"):
                acq_times[(sub, session)] = previous["acq_time"]
            written = update_dataset_files(layout, dataset_name, acq_times)
        return ConversionResult(visit.key, str(target), False, False, previous["files"], previous["series"],
                                previous["dcm2niix_warnings"], written, fp, tool_versions(),
                                time.monotonic() - t0, tree=previous["tree"])
    work = layout.bids_work_dir(visit.key, uuid.uuid4().hex[:8])
    work.parent.mkdir(parents=True, exist_ok=True)
    work.mkdir()
    try:
        niix = run_dcm2niix_per_series(series, dicom_dir, work, participant, config.dcm2niix_options)
        if not any(niix.glob("*.json")):
            raise BidsError(f"{visit.key}: dcm2niix converted none of the {len(series)} series: " + "; ".join(
                f"{s.label}: {s.detail}" for s in series)[:2000])
        out, log = run_dcm2bids(niix, work, participant, session.removeprefix("ses-"), config)
        tmp = out / "tmp_dcm2bids" / f"{sub}_{session}"
        _assign(series, out, niix, tmp, log, session_rel)
        staged = out / sub / session
        warnings = [{"series_number": s.number, "series_description": s.description, "message": ln}
                    for s in series for ln in s.dcm2niix_lines if ln.startswith("Warning")]
        if not staged.is_dir() or not any(staged.rglob("*.json")):
            # a visit with nothing for the BIDS dataset (a config matching none of its series):
            # nothing is written, and a session folder of an earlier conversion is left as it was
            # (a config typo must not delete sessions); the record is not written either
            return ConversionResult(visit.key, str(target), False, True, [], [_series_row(s) for s in series], warnings,
                                    [], fp, tool_versions(), time.monotonic() - t0,
                                    note=f"no series matched an entry of {config.path}: nothing written"
                                    + (" (the session folder of an earlier conversion is left as it was)"
                                       if target.exists() else ""),
                                    tree=tree_digests(target) if target.is_dir() else None)
        new_tree = tree_digests(staged)
        acq = acq_time_of(dicom_dir / series[0].files[0])
        files = sorted(f"{session_rel}/{k}" for k in new_tree)
        with file_lock(lock_path):
            changed = not _holds(target, new_tree)
            if changed:
                target.parent.mkdir(parents=True, exist_ok=True)
                final = temp_sibling(target)
                os.replace(staged, final)  # same filesystem: scratch/ and bids/ share the root
                try:
                    swap_dir(final, target)
                except BaseException:
                    shutil.rmtree(final, ignore_errors=True)
                    raise
            if acq:
                acq_times[(sub, session)] = acq
            written = update_dataset_files(layout, dataset_name, acq_times)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = ConversionResult(visit.key, str(target), changed, True, files, [_series_row(s) for s in series], warnings,
                              written, fp, tool_versions(), time.monotonic() - t0, tree=new_tree,
                              note="" if acq else "the visit's StudyDate/StudyTime is no valid date (00000000?): "
                                                  "acq_time is left out of sessions.tsv")
    record = {**asdict(result), "acq_time": acq, "config": str(config.path)}
    for k in ("seconds", "note"):
        record.pop(k)
    _write_if_changed(record_path, json.dumps(record, indent=1, sort_keys=True) + "\n")
    return result


def _series_row(s: Series) -> dict:
    return {"series_number": s.number, "series_description": s.description, "status": s.status,
            "bids_files": ", ".join(f.rsplit("/", 1)[-1] for f in s.bids_files if f.endswith((".nii.gz", ".nii"))),
            "detail": s.detail[:500], "dicoms": len(s.files)}


def _read_record(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) and {"fingerprint", "tree", "files", "series"} <= set(data) else None

