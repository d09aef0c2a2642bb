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

The file's schema is the pydantic model :class:`GlobalConfig` (unknown fields forbidden, typed
fields, a nested :class:`Limits` model that extraction uses directly; its JSON Schema is
``dicom_assets/schemas/global_config.schema.json``). Every problem is reported as one
:class:`ConfigError` naming the file and the field.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, StrictBool, StrictInt, ValidationError, field_validator

from .deid import DEFAULT_OPTIONS, OPTIONS
from .errors import ConfigError, parse_json_text
from .ids import normalize_session_id

OrganizeMode = Literal["symlink", "copy"]
MixedVisitPolicy = Literal["fail", "warn"]
XnatDuplicatePolicy = Literal["skip", "append", "fail"]
ORGANIZE_MODES = OrganizeMode.__args__
MIXED_VISIT_POLICIES = MixedVisitPolicy.__args__
XNAT_DUPLICATE_POLICIES = XnatDuplicatePolicy.__args__

_STUDY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_STORE_URL = re.compile(r"^(https?|file)://[^\s&#?]+$")


class Limits(BaseModel):
    """What extraction refuses (zip bombs); ``limits`` in global_config.json. The one set of defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # refuse archives whose extracted size or member count exceeds these (zip bombs)
    max_extract_bytes: StrictInt = Field(64 * 1024**3, gt=0)
    max_members: StrictInt = Field(200_000, gt=0)
    # a zip member compressing better than this ratio is treated as a bomb
    max_compression_ratio: StrictInt = Field(1000, gt=0)


class SessionRule(BaseModel):
    """How a study from the DICOM node finds its session (``dicom_node.session_rule``):

    * ``{"kind": "attribute", "attribute": "StudyDescription", "pattern": "ses-([A-Za-z0-9]+)"}``:
      the first group of ``pattern`` (a Python regex, searched) in that DICOM attribute, e.g.
      ``{"kind": "attribute", "attribute": "PatientComments", "pattern": "Session: *(\\w+)"}`` as XNAT's
      default session rule reads it;
    * ``{"kind": "order"}``: the participant's n-th study by StudyDate and StudyTime is its n-th
      session of the manifest (in the order of ``sessions``);
    * ``{"kind": "table", "path": "tabular/dicom_node_sessions.tsv"}``: a table under the dataset
      root with columns StudyInstanceUID and session_id.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["attribute", "order", "table"] = "attribute"
    attribute: str = "StudyDescription"
    pattern: str = r"ses-([A-Za-z0-9]+)"
    path: str | None = None

    @field_validator("attribute")
    @classmethod
    def _keyword(cls, v):
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9]{0,63}", v):
            raise ValueError(f"({v!r}) must be a DICOM keyword such as StudyDescription")
        return v

    @field_validator("pattern")
    @classmethod
    def _regex(cls, v):
        try:
            compiled = re.compile(v)
        except re.error as exc:
            raise ValueError(f"({v!r}) is no regular expression: {exc}") from None
        if compiled.groups > 1:
            raise ValueError(f"({v!r}) may hold at most one group (the session)")
        return v

    @field_validator("path")
    @classmethod
    def _relative(cls, v):
        if v is not None and (not v.strip() or v.startswith("/") or ".." in Path(v).parts):
            raise ValueError(f"({v!r}) must be a path under the dataset root, such as tabular/sessions.tsv")
        return v

    def model_post_init(self, _context) -> None:
        if self.kind == "table" and not self.path:
            raise ValueError("kind 'table' needs a path (a table with columns StudyInstanceUID and session_id)")


class DicomNodeConfig(BaseModel):
    """``dicom_node`` in global_config.json: how studies arriving at the DICOM node map to visits."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    session_rule: SessionRule = SessionRule()


class SafePrivateAttribute(BaseModel):
    """A private attribute the site declares free of identifying information (kept by the
    Retain Safe Private option): ``{"group": "0019", "creator": "SIEMENS MR HEADER", "element": "0C"}``
    is ``(0019,xx0C)`` of the block whose creator is ``SIEMENS MR HEADER``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    group: str
    creator: str
    element: str

    @field_validator("group")
    @classmethod
    def _group(cls, v):
        if not re.fullmatch(r"[0-9A-Fa-f]{4}", v) or int(v, 16) % 2 == 0 or int(v, 16) <= 7:
            raise ValueError(f"({v!r}) must be an odd group of 4 hex digits above 0007, such as 0019")
        return v.upper()

    @field_validator("element")
    @classmethod
    def _element(cls, v):
        if not re.fullmatch(r"[0-9A-Fa-f]{2}", v):
            raise ValueError(f"({v!r}) must be the last 2 hex digits of the element, such as 0C")
        return v.upper()

    @field_validator("creator")
    @classmethod
    def _creator(cls, v):
        if not v.strip():
            raise ValueError("must be the private creator's text, such as SIEMENS MR HEADER")
        return v.strip()


class DeidConfig(BaseModel):
    """``deid`` in global_config.json: the visit's de-identified copy under ``share/`` (off by
    default). ``options``: of DICOM PS3.15 Annex E, applied to its Basic Profile (the names
    are in ``core.deid.OPTIONS``); ``safe_private``: what Retain Safe Private keeps."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: StrictBool = False
    options: tuple[str, ...] = DEFAULT_OPTIONS
    safe_private: tuple[SafePrivateAttribute, ...] = ()

    @field_validator("options", mode="before")
    @classmethod
    def _options(cls, v):
        if not isinstance(v, (list, tuple)) or not all(isinstance(o, str) for o in v):
            raise ValueError("must be a list of option names")
        unknown = [o for o in v if o not in OPTIONS]
        if unknown:
            raise ValueError(f"holds unknown option(s) {', '.join(map(repr, unknown))}; known: {', '.join(OPTIONS)}")
        if {"retain_longitudinal_full_dates", "retain_longitudinal_modified_dates"} <= set(v):
            raise ValueError("may not hold both retain_longitudinal_full_dates and retain_longitudinal_modified_dates")
        return tuple(dict.fromkeys(v))


def _str_list(value: object) -> object:
    if isinstance(value, dict):
        # the established exclusion file form: {"Exclude": ["Localizers", ...]}
        if set(value) != {"Exclude"}:
            raise ValueError(f"as an object must have exactly the key 'Exclude', found {sorted(value)}")
        value = value["Exclude"]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ValueError("must be a list of non-empty strings")
    return tuple(v.strip() for v in value)


class GlobalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset_name: str
    study_id: str
    sessions: tuple[str, ...]
    xnat_project: str | None = None
    exclude_series: tuple[str, ...] = ()
    organize_mode: OrganizeMode = "symlink"
    exclude_derived: StrictBool = True
    derived_series_markers: tuple[str, ...] = ("MoCoSeries",)
    mixed_visit_policy: MixedVisitPolicy = "fail"
    session_label_pattern: str = "{participant}_{session}"
    # dcm2bids' post_op runs commands on the converted files: refused in the dcm2bids config
    # unless the site allows it here
    bids_allow_post_op: bool = False
    xnat_duplicate_policy: XnatDuplicatePolicy = "fail"
    # base URL under which clones of the DataLad datasets reach store/ (default: its file:// URL)
    datalad_store_url: str | None = None
    # datalad/<study>/ as a DataLad superdataset of all visits (each visit a subdataset)
    datalad_superdataset: StrictBool = True
    # a TCIA manifest run succeeds without the series its NBIA server does not know (default: it fails)
    tcia_allow_missing_series: StrictBool = False
    # studies arriving at the DICOM node (Orthanc): PatientID -> participant by the manifest, the session by this rule
    dicom_node: DicomNodeConfig = DicomNodeConfig()
    # a de-identified copy of each visit under share/ (PS3.15 Annex E), leak-checked; off by default
    deid: DeidConfig = DeidConfig()
    limits: Limits = Limits()
    _source: str = PrivateAttr("")

    @field_validator("dataset_name", "study_id", mode="before")
    @classmethod
    def _non_empty(cls, v):
        if not isinstance(v, str) or not v.strip():
            raise ValueError("must be a non-empty string")
        return v.strip()

    @field_validator("study_id")
    @classmethod
    def _study_id(cls, v):
        if not _STUDY_ID.match(v):
            raise ValueError(f"({v!r}) may hold only letters, digits, '_' and '-' (it names a folder of the store)")
        return v

    @field_validator("sessions", mode="before")
    @classmethod
    def _sessions(cls, v):
        if not isinstance(v, (list, tuple)) or not v:
            raise ValueError("must be a non-empty list")
        seen: dict[str, object] = {}
        for raw in v:
            if not isinstance(raw, (str, int)) or isinstance(raw, bool):
                raise ValueError(f"holds {raw!r}, not a session id")
            try:
                ses = normalize_session_id(raw)
            except ValueError as exc:
                raise ValueError(f": {exc}") from None
            if ses in seen:
                raise ValueError(f"lists session {ses!r} twice (as {seen[ses]!r} and {raw!r})")
            seen[ses] = raw
        return tuple(seen)

    @field_validator("xnat_project", mode="before")
    @classmethod
    def _xnat_project(cls, v):
        if v is not None and (not isinstance(v, str) or not _STUDY_ID.match(v)):
            raise ValueError("must be an XNAT project id (letters, digits, '_' and '-')")
        return v

    @field_validator("exclude_series", "derived_series_markers", mode="before")
    @classmethod
    def _series_lists(cls, v):
        return _str_list(v)

    @field_validator("session_label_pattern", mode="before")
    @classmethod
    def _pattern(cls, v):
        problem = label_pattern_problem(v)
        if problem:
            raise ValueError(f"must be a format string using only {{participant}} and {{session}} ({problem})")
        return v

    @field_validator("datalad_store_url", mode="before")
    @classmethod
    def _store_url(cls, v):
        if v is None:
            return None
        if not isinstance(v, str) or not _STORE_URL.match(v):
            raise ValueError("must be an http(s):// or file:// URL without spaces, '&', '#' or '?' "
                             "(the base URL of store/)")
        return v.rstrip("/")

    @property
    def source(self) -> str:
        """The file this config was read from ('' when built in code)."""
        return self._source

    def to_json(self) -> dict:
        return self.model_dump(mode="json")


_TOP_FIELDS = tuple(GlobalConfig.model_fields)
_LIMIT_FIELDS = tuple(Limits.model_fields)
_NESTED_FIELDS = {("limits",): _LIMIT_FIELDS, ("dicom_node",): tuple(DicomNodeConfig.model_fields),
                  ("dicom_node", "session_rule"): tuple(SessionRule.model_fields),
                  ("deid",): tuple(DeidConfig.model_fields),
                  ("deid", "safe_private"): tuple(SafePrivateAttribute.model_fields)}
_ORDER = {"extra_forbidden": 0, "missing": 1}


def _field(loc: tuple) -> str:
    return ".".join(str(p) for p in loc if not isinstance(p, int))


def _message(path: Path, err: dict, errors: list[dict]) -> str:
    """One line naming the file and the field, for one pydantic error (``errors``: all of them,
    so that every unknown top-level field is named at once)."""
    kind, name, ctx = err["type"], _field(err["loc"]), err.get("ctx") or {}
    if kind == "extra_forbidden":
        if len(err["loc"]) > 1:
            known = _NESTED_FIELDS.get(tuple(err["loc"][:-1]), ())
            return f"{path}: unknown field '{name}'; known: {', '.join(known)}"
        unknown = sorted(e["loc"][0] for e in errors if e["type"] == "extra_forbidden" and len(e["loc"]) == 1)
        return (f"{path}: unknown field(s) {', '.join(repr(u) for u in unknown)}; "
                f"known fields are {', '.join(sorted(_TOP_FIELDS))}")
    if kind == "missing":
        return f"{path}: required field '{name}' is missing"
    if kind == "value_error":
        text = str(ctx.get("error", err["msg"]))
        return f"{path}: field '{name}'{'' if text.startswith(':') else ' '}{text}"
    if kind == "literal_error":
        choices = ", ".join(a.strip("'") for a in str(ctx.get("expected", "")).replace(" or ", ", ").split(", "))
        return f"{path}: field '{name}' must be one of {choices}, not {err['input']!r}"
    if kind == "bool_type":
        return f"{path}: field '{name}' must be true or false"
    if kind in ("int_type", "greater_than"):
        return f"{path}: field '{name}' must be a positive integer"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"{path}: field '{name}' must be an object"
    if kind == "string_type":
        return f"{path}: field '{name}' must be a string"
    return f"{path}: field '{name}': {err['msg']}"


def parse_config(data: object, path: Path | str = "<global_config>") -> GlobalConfig:
    path = Path(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a JSON object")
    try:
        cfg = GlobalConfig.model_validate(data)
    except ValidationError as exc:
        errors = sorted(exc.errors(), key=lambda e: (_ORDER.get(e["type"], 2), len(e["loc"])))
        raise ConfigError(_message(path, errors[0], errors)) from None
    except UnicodeEncodeError:  # a JSON escape such as "\ud800": half of a character, no text
        raise ConfigError(f"{path}: a text value holds a lone surrogate escape (\\ud800-\\udfff), which is no "
                          "character; write the character itself") from None
    cfg._source = str(path)
    return cfg


#: ``{participant}`` / ``{session}`` may carry a format spec of fill, alignment and a width
#: up to this (``{participant:>8}``); nothing else is formatted
MAX_LABEL_WIDTH = 64
_LABEL_SPEC = re.compile(r"^(?:.?[<>^])?(\d+)?$")


def label_pattern_problem(v) -> str | None:
    """Why ``v`` is no session label pattern, None when it is one: only the fields
    ``participant`` and ``session``, no attribute or index access (``{participant.__class__}``
    would read Python objects), no conversion, no nested field, a width of at most
    :data:`MAX_LABEL_WIDTH` (a huge one would take all the memory)."""
    import string

    if not isinstance(v, str):
        return "not a string"
    try:
        parts = list(string.Formatter().parse(v))
    except ValueError as exc:
        return str(exc)
    for _literal, name, spec, conversion in parts:
        if name is None:
            continue
        if name not in ("participant", "session"):
            return f"field {{{name}}} is not allowed"
        if conversion is not None:
            return f"conversion !{conversion} is not allowed"
        m = _LABEL_SPEC.match(spec or "")
        if m is None:
            return f"format spec {spec!r} is not allowed (only fill, alignment and a width)"
        if m.group(1) and int(m.group(1)) > MAX_LABEL_WIDTH:
            return f"width {m.group(1)} is over {MAX_LABEL_WIDTH}"
    if not v.strip():
        return "empty"
    return None


def load_config(path: Path | str) -> GlobalConfig:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: global config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the global config: {exc.strerror}") from None
    return parse_config(parse_json_text(raw, path, ConfigError, "global config"), path)


def write_config(path: Path | str, config: GlobalConfig) -> None:
    Path(path).write_text(json.dumps(config.to_json(), indent=2, sort_keys=True) + "\n")


def json_schema() -> dict:
    """The JSON Schema of global_config.json (``dicom_assets/schemas/global_config.schema.json``)."""
    return GlobalConfig.model_json_schema()


SCHEMA_PATH = Path(__file__).parents[1] / "schemas" / "global_config.schema.json"


def write_json_schema(path: Path | str = SCHEMA_PATH) -> Path:
    Path(path).write_text(json.dumps(json_schema(), indent=2, sort_keys=True) + "\n")
    return Path(path)
