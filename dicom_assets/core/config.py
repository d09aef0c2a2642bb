"""``global_config.json``: one file describing a dataset, loaded once and validated.

Example::

    {
      "dataset_name": "qpn-demo",
      "study_id": "QPN",
      "sessions": ["ses-01", "ses-02"],
      "xnat_project": "QPN_DEMO",
      "exclude_series": {"Exclude": ["Localizers", "AAHEAD", "MoCoSeries"]},
      "organize_mode": "symlink"
    }

Every problem is reported as one :class:`ConfigError` naming the file and the field.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import ConfigError
from .ids import normalize_session_id

ORGANIZE_MODES = ("symlink", "copy")
MIXED_VISIT_POLICIES = ("fail", "warn")
XNAT_DUPLICATE_POLICIES = ("skip", "append", "fail")
_CHOICES = {"organize_mode": ORGANIZE_MODES, "mixed_visit_policy": MIXED_VISIT_POLICIES,
            "xnat_duplicate_policy": XNAT_DUPLICATE_POLICIES}

_DEFAULT_LIMITS = {
    # refuse archives whose extracted size or member count exceeds these (zip bombs)
    "max_extract_bytes": 64 * 1024**3,
    "max_members": 200_000,
    # a zip member compressing better than this ratio is treated as a bomb
    "max_compression_ratio": 1000,
}

_STUDY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


@dataclass(frozen=True)
class GlobalConfig:
    dataset_name: str
    study_id: str
    sessions: tuple[str, ...]
    xnat_project: str | None = None
    exclude_series: tuple[str, ...] = ()
    organize_mode: str = "symlink"
    exclude_derived: bool = True
    derived_series_markers: tuple[str, ...] = ("MoCoSeries",)
    mixed_visit_policy: str = "fail"
    session_label_pattern: str = "{participant}_{session}"
    xnat_duplicate_policy: str = "fail"
    # base URL under which clones of the DataLad datasets reach store/ (default: its file:// URL)
    datalad_store_url: str | None = None
    # datalad/<study>/ as a DataLad superdataset of all visits (each visit a subdataset)
    datalad_superdataset: bool = True
    # a TCIA manifest run succeeds without the series its NBIA server does not know (default: it fails)
    tcia_allow_missing_series: bool = False
    limits: dict = field(default_factory=lambda: dict(_DEFAULT_LIMITS))
    source: str = ""

    def to_json(self) -> dict:
        data = asdict(self)
        data.pop("source")
        for k, v in data.items():
            if isinstance(v, tuple):
                data[k] = list(v)
        return data


_FIELDS = {
    "dataset_name",
    "study_id",
    "sessions",
    "xnat_project",
    "exclude_series",
    "organize_mode",
    "exclude_derived",
    "derived_series_markers",
    "mixed_visit_policy",
    "session_label_pattern",
    "xnat_duplicate_policy",
    "datalad_store_url",
    "datalad_superdataset",
    "tcia_allow_missing_series",
    "limits",
}
_REQUIRED = ("dataset_name", "study_id", "sessions")


def _str_list(path: Path, name: str, value: object) -> tuple[str, ...]:
    if isinstance(value, dict):
        # the established exclusion file form: {"Exclude": ["Localizers", ...]}
        keys = set(value)
        if keys != {"Exclude"}:
            raise ConfigError(
                f"{path}: field '{name}' as an object must have exactly the key 'Exclude', "
                f"found {sorted(keys)}"
            )
        value = value["Exclude"]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ConfigError(f"{path}: field '{name}' must be a list of non-empty strings")
    return tuple(v.strip() for v in value)


def parse_config(data: object, path: Path | str = "<global_config>") -> GlobalConfig:
    path = Path(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a JSON object")
    unknown = sorted(set(data) - _FIELDS)
    if unknown:
        raise ConfigError(
            f"{path}: unknown field(s) {', '.join(repr(u) for u in unknown)}; "
            f"known fields are {', '.join(sorted(_FIELDS))}"
        )
    for name in _REQUIRED:
        if name not in data:
            raise ConfigError(f"{path}: required field '{name}' is missing")
    kw: dict = {"source": str(path)}
    for name in ("dataset_name", "study_id"):
        v = data[name]
        if not isinstance(v, str) or not v.strip():
            raise ConfigError(f"{path}: field '{name}' must be a non-empty string")
        kw[name] = v.strip()
    if not _STUDY_ID.match(kw["study_id"]):
        raise ConfigError(
            f"{path}: field 'study_id' ({kw['study_id']!r}) may hold only letters, digits, '_' "
            "and '-' (it names a folder of the store)"
        )
    sessions = data["sessions"]
    if not isinstance(sessions, list) or not sessions:
        raise ConfigError(f"{path}: field 'sessions' must be a non-empty list")
    seen: dict[str, object] = {}
    for raw in sessions:
        if not isinstance(raw, (str, int)) or isinstance(raw, bool):
            raise ConfigError(f"{path}: field 'sessions' holds {raw!r}, not a session id")
        try:
            ses = normalize_session_id(raw)
        except ValueError as exc:
            raise ConfigError(f"{path}: field 'sessions': {exc}") from None
        if ses in seen:
            raise ConfigError(
                f"{path}: field 'sessions' lists session {ses!r} twice "
                f"(as {seen[ses]!r} and {raw!r})"
            )
        seen[ses] = raw
    kw["sessions"] = tuple(seen)
    if "xnat_project" in data and data["xnat_project"] is not None:
        v = data["xnat_project"]
        if not isinstance(v, str) or not _STUDY_ID.match(v):
            raise ConfigError(
                f"{path}: field 'xnat_project' must be an XNAT project id "
                "(letters, digits, '_' and '-')"
            )
        kw["xnat_project"] = v
    for name in ("exclude_series", "derived_series_markers"):
        if name in data:
            kw[name] = _str_list(path, name, data[name])
    for name, choices in _CHOICES.items():
        if name in data:
            if data[name] not in choices:
                raise ConfigError(f"{path}: field '{name}' must be one of {', '.join(choices)}, "
                                  f"not {data[name]!r}")
            kw[name] = data[name]
    for name in ("exclude_derived", "datalad_superdataset", "tcia_allow_missing_series"):
        if name in data:
            if not isinstance(data[name], bool):
                raise ConfigError(f"{path}: field '{name}' must be true or false")
            kw[name] = data[name]
    if "session_label_pattern" in data:
        pat = data["session_label_pattern"]
        try:
            ok = isinstance(pat, str) and bool(pat.format(participant="P", session="ses-01"))
        except (KeyError, IndexError, ValueError):
            ok = False
        if not ok:
            raise ConfigError(
                f"{path}: field 'session_label_pattern' must be a format string using only "
                "{participant} and {session}"
            )
        kw["session_label_pattern"] = pat
    if data.get("datalad_store_url") is not None:
        url = data["datalad_store_url"]
        if not isinstance(url, str) or not re.match(r"^(https?|file)://[^\s&#?]+$", url):
            raise ConfigError(f"{path}: field 'datalad_store_url' must be an http(s):// or file:// URL "
                              "without spaces, '&', '#' or '?' (the base URL of store/)")
        kw["datalad_store_url"] = url.rstrip("/")
    limits = dict(_DEFAULT_LIMITS)
    if "limits" in data:
        given = data["limits"]
        if not isinstance(given, dict):
            raise ConfigError(f"{path}: field 'limits' must be an object")
        for k, v in given.items():
            if k not in _DEFAULT_LIMITS:
                raise ConfigError(
                    f"{path}: unknown field 'limits.{k}'; known: {', '.join(_DEFAULT_LIMITS)}"
                )
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"{path}: field 'limits.{k}' must be a positive integer")
            limits[k] = v
    kw["limits"] = limits
    return GlobalConfig(**kw)


def load_config(path: Path | str) -> GlobalConfig:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: global config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the global config: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
        ) from None
    return parse_config(data, path)


def write_config(path: Path | str, config: GlobalConfig) -> None:
    Path(path).write_text(json.dumps(config.to_json(), indent=2, sort_keys=True) + "\n")
