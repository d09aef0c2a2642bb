"""XNAT's series import filters, read from its configuration and applied as it does."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from .errors import http_status
from .files import UploadFile


@dataclass
class SeriesFilter:
    """One series import filter XNAT applies to this project's uploads, as read from its
    configuration (see :func:`series_import_filters`)."""

    scope: str  # "site-wide" | "project <id>"
    mode: str  # blacklist | whitelist
    patterns: dict[int, list[re.Pattern]]  # header tag -> patterns
    text: str  # the filter's list, for messages

    def keeps(self, ds) -> bool:
        """RegExBasedSeriesImportFilter.shouldIncludeDicomObject: the first pattern that matches
        includes the object in a whitelist and drops it in a blacklist; no match, the opposite."""
        for tag, patterns in self.patterns.items():
            elem = ds.get(tag)
            # XNAT reads at most 300 characters of a header (getValueAsString(characterSet, 300))
            value = None if elem is None else _header_text(elem.value)[:300]
            for p in patterns:
                if (p.pattern == "EXISTS" and value is not None) or (p.pattern == "!EXISTS" and value is None) \
                        or (value is not None and p.search(value)):
                    return self.mode == "whitelist"
        return self.mode == "blacklist"

    def describe(self) -> str:
        shown = "; ".join(line.strip() for line in self.text.split("\n") if line.strip())
        return f"the {self.scope} filter ({self.mode}: {shown[:120] or 'no patterns'})"


@dataclass
class SeriesFilters:
    """What the client knows of the series import filters XNAT applies to a project."""

    filters: list[SeriesFilter] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)  # filters the client could not read or evaluate

    def drops(self, f: UploadFile) -> bool:
        """True only when a filter the client read drops this file; a file whose header cannot
        be read is not explained."""
        if not self.filters:
            return False
        import pydicom

        try:
            ds = pydicom.dcmread(f.path, stop_before_pixels=True, force=True)
        except Exception:
            return False
        return not all(flt.keeps(ds) for flt in self.filters)

    def describe(self) -> str:
        parts = [flt.describe() for flt in self.filters] + self.unknown
        return "; ".join(parts) if parts else "no series import filter is set for the site or the project"


def _header_text(value) -> str:
    """A header value as dicomtools reads it for a filter (several values joined by ``\\``)."""
    from pydicom.multival import MultiValue

    if isinstance(value, (list, tuple, MultiValue)):
        return "\\".join(str(v) for v in value)
    return "" if value is None else str(value)


def _filter_tag(name: str) -> int | None:
    """DicomUtils.parseDicomHeaderId: ``(gggg,eeee)``, ``gggg,eeee`` or an attribute keyword."""
    from pydicom.datadict import tag_for_keyword

    m = re.fullmatch(r"(\(?)([0-9A-Fa-f]{4}),([0-9A-Fa-f]{4})(\)?)", name.strip())
    if m and bool(m.group(1)) == bool(m.group(4)):
        return int(m.group(2) + m.group(3), 16)
    return tag_for_keyword(name.strip())


def parse_series_filter(scope: str, contents: str) -> SeriesFilter:
    """A filter from its stored contents (``AbstractSeriesImportFilter.toMap`` as JSON: ``mode``,
    ``list``). Raises ValueError for what the client cannot evaluate (the ``modalityMap`` mode,
    whose per-modality JavaScript only XNAT runs; a pattern or header it cannot read)."""
    data = json.loads(contents or "{}")
    if not isinstance(data, dict):
        raise ValueError(f"the {scope} filter's configuration is not the map the client expects")
    mode = str(data.get("mode") or "blacklist")  # DicomFilterService: blank contents = empty blacklist
    if mode not in ("blacklist", "whitelist"):
        raise ValueError(f"the {scope} filter is in mode {mode!r}, which only XNAT can evaluate")
    text = str(data.get("list") or "")
    patterns: dict[int, list[re.Pattern]] = {}
    tag = 0x0008103E  # RegExBasedSeriesImportFilter's DEFAULT_FIELD: SeriesDescription
    for line in text.split("\n"):
        if not line.strip() or line.startswith("#"):
            continue
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            tag = _filter_tag(line[1:-1])
            if tag is None:
                raise ValueError(f"the {scope} filter names a header the client does not know ({line})")
            patterns.setdefault(tag, [])
            continue
        try:  # Java's Pattern.CASE_INSENSITIVE, tested with find(); Python's syntax is close enough
            patterns.setdefault(tag, []).append(re.compile(line, re.IGNORECASE))
        except re.error:
            raise ValueError(f"the {scope} filter holds a pattern the client cannot read ({line!r})") from None
    return SeriesFilter(scope, mode, patterns, text)


def enabled_configs(session, project: str, site_path: str, what: str, unknown: list[str],
                    project_path: str | None = None) -> list[tuple[str, str]]:
    """(scope, contents) of the site-wide and the project's configuration of one XNAT tool, as its
    configuration service (ConfigResource) serves them: ``/data/config/<site_path>`` to any user,
    ``/data/projects/<id>/config/<project_path>`` (default: ``site_path``) to those who read the
    project's data, 404 when there is none (as Restlet's HTML status page, which xnatpy
    refuses). Only an ``enabled`` one is returned; one the client cannot read is named in
    ``unknown`` (``what`` says what it is)."""
    out = []
    for scope, uri in (("site-wide", f"/data/config/{site_path}"),
                       (f"project {project}", f"/data/projects/{project}/config/{project_path or site_path}")):
        try:
            resp = session.get(uri, query={"format": "json"}, accepted_status=[200, 404])
            if resp.status_code == 404:
                continue
            rows = resp.json()["ResultSet"]["Result"]
        except Exception as exc:
            if http_status(exc) == 404:
                continue
            unknown.append(f"the {scope} {what}, which the client could not read "
                           f"({http_status(exc) or type(exc).__name__})")
            continue
        row = rows[0] if rows else {}
        if str(row.get("status") or "").lower() == "enabled":
            out.append((scope, str(row.get("contents") or "")))
    return out


def series_import_filters(session, project: str) -> SeriesFilters:
    """The series import filters XNAT applies to uploads into ``project``: the site-wide one and
    the project's (GradualDicomImporter drops an object unless both include it), each read from
    XNAT's configuration service (DicomFilterService: tool ``seriesImportFilter``, path ``config``;
    ConfigResource answers ``/data/config/...`` to any user and ``/data/projects/<id>/config/...``
    to those who read the project's data; 404 when there is none). A configuration that is not
    ``enabled`` does not apply. A filter the client cannot read or evaluate is listed in
    ``unknown``: it explains nothing."""
    out = SeriesFilters()
    for scope, contents in enabled_configs(session, project, "seriesImportFilter/config", "filter", out.unknown):
        try:
            out.filters.append(parse_series_filter(scope, contents))
        except ValueError as exc:
            out.unknown.append(str(exc))
    return out

