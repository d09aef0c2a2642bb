"""The browsable catalog of the visits' DataLad datasets: one static HTML page.

Each visit writes one entry, ``catalog/visits/<visit>.json``, keyed by the visit and
carrying the DataLad dataset's own id and version (its HEAD commit): a re-run replaces the
entry in place, never adds a second one. ``catalog/index.html`` is then rendered from all
entries under a file lock (runs of different visits may finish at the same time). The page
needs no JavaScript and no server logic: any static HTTP server (or a browser opening the
file) shows it.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from .fsutil import atomic_write, file_lock
from .layout import DatasetLayout


def _write_text(path: Path, text: str) -> None:
    with atomic_write(path, encoding="utf-8") as fh:
        fh.write(text)


def read_entries(layout: DatasetLayout) -> list[dict]:
    out = []
    for p in sorted(layout.catalog_entries_dir.glob("*.json")):
        try:
            out.append(json.loads(p.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue  # a broken entry is skipped; its visit's next run rewrites it
    return out


def update_catalog(layout: DatasetLayout, entry: dict) -> Path:
    """Write (or replace) one visit's entry and re-render the page; returns the page path."""
    with file_lock(layout.catalog_lock_path):
        _write_text(layout.catalog_entry_path(entry["visit"]), json.dumps(entry, indent=2, sort_keys=True) + "\n")
        page = layout.catalog_page_path
        _write_text(page, render(read_entries(layout)))
    return page


def _e(value) -> str:
    return html.escape("" if value is None else str(value))


_STYLE = """
body{font-family:system-ui,sans-serif;margin:2rem;color:#1d2330}
h1{font-size:1.6rem} h2{font-size:1.2rem;margin-top:2rem}
table{border-collapse:collapse;margin:.5rem 0} td,th{border:1px solid #ccd;padding:.25rem .6rem;text-align:left}
th{background:#eef} code{background:#f4f4f8;padding:.1rem .3rem;word-break:break-all}
.muted{color:#667}
"""


def render(entries: list[dict]) -> str:
    studies = sorted({e.get("study", "") for e in entries})
    rows = "".join(
        f"<tr><td><a href='#{_e(e['visit'])}'>{_e(e['visit'])}</a></td><td>{_e(e.get('participant'))}</td>"
        f"<td>{_e(e.get('session'))}</td><td>{_e(e.get('files'))}</td><td>{len(e.get('series', []))}</td>"
        f"<td><code>{_e(str(e.get('version', ''))[:12])}</code></td></tr>"
        for e in entries)
    sections = []
    for e in entries:
        series = "".join(
            f"<tr><td>{_e(s.get('SeriesNumber'))}</td><td>{_e(s.get('SeriesDescription'))}</td>"
            f"<td>{_e(s.get('ProtocolName'))}</td><td>{_e(s.get('Modality'))}</td><td>{_e(s.get('files'))}</td></tr>"
            for s in e.get("series", []))
        notes = (f"<p>Annotation files: {_e(e['annotation_files'])}, in <code>{_e(e['visit'])}/annotations/"
                 "&lt;SeriesInstanceUID&gt;/</code></p>" if e.get("annotation_files") else "")
        sections.append(
            f"<section id='{_e(e['visit'])}'><h2>{_e(e['visit'])}</h2>"
            f"<p class='muted'>DataLad dataset <code>{_e(e.get('dataset_id'))}</code> at version "
            f"<code>{_e(e.get('version'))}</code>, updated {_e(e.get('updated'))}</p>"
            f"<p>Clone: <code>datalad clone '{_e(e.get('clone_url'))}' {_e(e['visit'])}</code></p>"
            f"<p>Tarball: <code>{_e(e.get('tarball_url'))}</code></p>{notes}"
            "<table><tr><th>SeriesNumber</th><th>SeriesDescription</th><th>ProtocolName</th><th>Modality</th>"
            f"<th>DICOMs</th></tr>{series}</table></section>")
    title = f"dicom-assets catalog: {', '.join(s for s in studies if s) or 'no visit yet'}"
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{_e(title)}</title>"
            f"<style>{_STYLE}</style></head><body><h1>{_e(title)}</h1>"
            f"<p>{len(entries)} visit(s), each a DataLad dataset indexing the DICOMs of its tarball.</p>"
            "<table><tr><th>visit</th><th>participant</th><th>session</th><th>DICOMs</th><th>series</th>"
            f"<th>version</th></tr>{rows}</table>{''.join(sections)}</body></html>\n")
