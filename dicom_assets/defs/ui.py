"""Helpers turning core results into Dagster UI metadata (tables, paths, markdown)."""

from __future__ import annotations

import base64
from pathlib import Path

from dagster import MetadataValue, TableColumn, TableRecord, TableSchema


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> MetadataValue:
    """columns: (name, type, description); type in string/int/float/bool."""
    schema = TableSchema(columns=[TableColumn(n, t, description=d) for n, t, d in columns])
    records = [TableRecord({n: _cell(r.get(n), t) for n, t, _ in columns}) for r in rows]
    return MetadataValue.table(records=records, schema=schema)


def _cell(value, kind: str):
    if value is None:
        return "" if kind == "string" else None
    if kind == "int":
        return int(value)
    if kind == "bool":
        return bool(value)
    return str(value)


def path(p: Path | str) -> MetadataValue:
    return MetadataValue.path(str(p))


SERIES_COLUMNS = [
    ("series_number", "int", "SeriesNumber"),
    ("series_description", "string", "SeriesDescription"),
    ("protocol_name", "string", "ProtocolName"),
    ("modality", "string", "Modality"),
    ("files", "int", "DICOMs kept"),
    ("excluded", "int", "files of this series excluded"),
]


def qc_markdown(montage, title: str) -> MetadataValue:
    """The QC montage inlined as a PNG data URI in markdown, so the UI shows the picture."""
    if montage.path is None:
        return MetadataValue.md(f"**QC montage of {title}**: {'; '.join(montage.notes) or 'nothing to show'}")
    data = base64.b64encode(Path(montage.path).read_bytes()).decode()
    lines = [f"**QC montage of {title}**: middle image of each kept series ({montage.tiles})", "",
             f"![QC montage of {title}](data:image/png;base64,{data})"]
    lines += [f"- {n}" for n in montage.notes]
    return MetadataValue.md("\n".join(lines))
