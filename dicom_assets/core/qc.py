"""QC montage: the middle image of each kept series, windowed and labelled, as one PNG.

Only one file per series is decoded. Compressed transfer syntaxes that pydicom cannot decode
with the installed handlers get a labelled placeholder tile and a note, never a failure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image, ImageDraw, ImageFont

from .fsutil import atomic_write

TILE = 160
LABEL_H = 18
COLUMNS = 4


@dataclass
class SeriesImage:
    series_number: int | None
    description: str
    path: Path


@dataclass
class MontageResult:
    path: Path | None
    tiles: int
    notes: list[str] = field(default_factory=list)


def window(arr: np.ndarray) -> np.ndarray:
    """A robust display window (1st-99th percentile) to 8 bits."""
    a = arr.astype(np.float32)
    lo, hi = np.percentile(a, [1, 99])
    if hi <= lo:
        hi = lo + 1
    return (np.clip((a - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def middle_frame(ds: pydicom.Dataset) -> np.ndarray:
    arr = ds.pixel_array
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples > 1:  # colour: keep it as grey for a uniform montage
        arr = arr.mean(axis=-1)
        if arr.ndim == 3:
            arr = arr[arr.shape[0] // 2]
    elif arr.ndim == 3:
        arr = arr[arr.shape[0] // 2]
    return arr


def _tile(img: np.ndarray | None, label: str, note: str | None) -> Image.Image:
    tile = Image.new("L", (TILE, TILE + LABEL_H), 0)
    if img is not None:
        im = Image.fromarray(window(img))
        scale = min(TILE / im.width, TILE / im.height)
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BILINEAR)
        tile.paste(im, ((TILE - im.width) // 2, LABEL_H + (TILE - im.height) // 2))
    draw = ImageDraw.Draw(tile)
    font = ImageFont.load_default()
    draw.text((3, 3), label[:26], fill=255, font=font)
    if note:
        draw.text((6, LABEL_H + TILE // 2 - 6), note[:24], fill=160, font=font)
    return tile


def build_montage(series: list[SeriesImage], out: Path) -> MontageResult:
    """Write the montage PNG of the given series' middle images (atomically)."""
    notes: list[str] = []
    tiles: list[Image.Image] = []
    for s in series:
        label = f"{s.series_number if s.series_number is not None else '?'} {s.description}"
        try:
            ds = pydicom.dcmread(s.path)
            img = middle_frame(ds)
            tiles.append(_tile(img, label, None))
        except Exception as exc:  # an encoding without a decoder here, or odd pixel data
            why = type(exc).__name__
            notes.append(f"series {s.series_number} ({s.description}): not rendered ({why}: {str(exc)[:120]})")
            tiles.append(_tile(None, label, "cannot decode"))
    if not tiles:
        return MontageResult(None, 0, ["no kept series to show"])
    cols = min(COLUMNS, len(tiles))
    rows = math.ceil(len(tiles) / cols)
    sheet = Image.new("L", (cols * TILE, rows * (TILE + LABEL_H)), 0)
    for i, t in enumerate(tiles):
        sheet.paste(t, ((i % cols) * TILE, (i // cols) * (TILE + LABEL_H)))
    with atomic_write(out, "wb") as fh:
        sheet.save(fh, format="PNG", optimize=True)
    return MontageResult(out, len(tiles), notes)


def middle_images(records, folder: Path) -> list[SeriesImage]:
    """From kept organize records, the middle file of each series (by InstanceNumber)."""
    by_series: dict[str | None, list] = {}
    for r in records:
        by_series.setdefault(r.series_instance_uid, []).append(r)
    out = []
    for recs in by_series.values():
        recs.sort(key=lambda r: (r.instance_number is None, r.instance_number or 0, r.dest))
        mid = recs[len(recs) // 2]
        out.append(SeriesImage(mid.series_number, mid.series_description or "", folder / mid.dest))
    out.sort(key=lambda s: (s.series_number is None, s.series_number or 0, s.description))
    return out
