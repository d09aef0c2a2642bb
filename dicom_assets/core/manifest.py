"""The participant manifest (nipoppy's ``manifest.csv`` convention), read strictly.

Required columns: ``participant_id`` and ``session_id``; others (``visit_id``,
``datatype``, ...) are kept. Participant ids are normalized to alphanumerics; two raw ids
that normalize to the same value are an error, since their data would mix.

Parsing is strict, every error naming the line: UTF-8 (a BOM is fine), each row exactly as
many fields as the header (a row with one field too many would otherwise shift every
column), quotes well formed, no NUL, no column named twice. Blank lines are skipped.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pandas as pd

from .downloads import participant_index
from .errors import ManifestError
from .ids import Visit, normalize_participant_id, normalize_session_id

REQUIRED_COLUMNS = ("participant_id", "session_id")


@dataclass(frozen=True)
class Manifest:
    table: pd.DataFrame  # one row per participant-session, with normalized columns added
    source: str

    @cached_property
    def participants(self) -> dict[str, str]:
        """normalized id -> raw id as written in the manifest (built once: ``raw_participant_id``
        and every caller's ``set(...)`` used to rebuild it from the table, per call)."""
        t = self.table
        return dict(zip(t["participant"].tolist(), t["participant_id"].tolist()))

    @property
    def visits(self) -> list[Visit]:
        return [Visit(p, s) for p, s in zip(self.table["participant"].tolist(), self.table["session"].tolist())]

    @cached_property
    def _visit_pairs(self) -> frozenset[tuple[str, str]]:
        t = self.table
        return frozenset(zip(t["participant"].tolist(), t["session"].tolist()))

    def has_visit(self, visit: Visit) -> bool:
        """One set look-up (the table does not change once read), not a comparison of the table."""
        return (visit.participant, visit.session) in self._visit_pairs

    @cached_property
    def participant_index(self) -> dict[str, list[str]]:
        """:func:`~.downloads.participant_index` of the participants, built once per manifest read
        (a visit's dumps are matched against it)."""
        return participant_index(set(self.participants))

    def raw_participant_id(self, participant: str) -> str:
        return self.participants[participant]


def _read_rows(path: Path) -> tuple[list[str], list[int], list[list[str]]]:
    """Header, the line each row starts on, and the rows; a ManifestError naming the line
    for anything but a rectangular, well-quoted UTF-8 CSV."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ManifestError(f"{path}: participant manifest cannot be read ({exc.strerror or exc})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ManifestError(f"{path}: line {line}: not UTF-8 text ({exc.reason} at byte {exc.start}); "
                            "save the manifest as UTF-8 CSV") from None
    if "\x00" in text:
        raise ManifestError(f"{path}: line {text[: text.index(chr(0))].count(chr(10)) + 1}: a NUL byte; "
                            "is this a CSV text file?")
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header: list[str] | None = None
    lines: list[int] = []
    rows: list[list[str]] = []
    start = 1
    try:
        for fields in reader:
            line, start = start, reader.line_num + 1
            if not fields:  # a blank line
                continue
            if header is None:
                header = fields
                seen: set[str] = set()
                for name in header:
                    if name in seen:
                        raise ManifestError(f"{path}: line {line}: column {name!r} appears twice in the header")
                    seen.add(name)
                continue
            if len(fields) != len(header):
                raise ManifestError(
                    f"{path}: line {line}: {len(fields)} field(s) where the header has {len(header)} "
                    f"({', '.join(header)}); a value holding a comma needs double quotes")
            lines.append(line)
            rows.append(fields)
    except csv.Error as exc:
        raise ManifestError(f"{path}: line {start}: not a well-formed CSV row ({exc})") from None
    if header is None:
        raise ManifestError(f"{path}: the participant manifest is empty (expected a header line with "
                            f"{', '.join(REQUIRED_COLUMNS)})")
    return header, lines, rows


def read_manifest(path: Path | str, sessions: tuple[str, ...] | None = None) -> Manifest:
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: participant manifest not found")
    header, lines, rows = _read_rows(path)
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise ManifestError(
            f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(header)}"
        )
    table = pd.DataFrame(rows, columns=header, dtype=str)
    parts, sess = [], []
    raw_ids, raw_sessions = table["participant_id"].tolist(), table["session_id"].tolist()
    for line, raw_p, raw_s in zip(lines, raw_ids, raw_sessions):
        try:
            parts.append(normalize_participant_id(raw_p))
        except ValueError as exc:
            raise ManifestError(f"{path}: line {line}: column 'participant_id': {exc}") from None
        try:
            s = normalize_session_id(raw_s)
        except ValueError as exc:
            raise ManifestError(f"{path}: line {line}: column 'session_id': {exc}") from None
        if sessions is not None and s not in sessions:
            raise ManifestError(
                f"{path}: line {line}: column 'session_id': session {raw_s!r} is not one of "
                f"the sessions of the global config ({', '.join(sessions)})"
            )
        sess.append(s)
    table = table.assign(participant=parts, session=sess)
    # two different raw ids normalizing to one participant would mix two people's data
    # (plain dicts: a pandas groupby().unique() took 5 s at 100,000 rows, on every dataset open)
    raw_by_norm: dict[str, list[str]] = {}
    for norm, raw in zip(parts, raw_ids):
        seen = raw_by_norm.setdefault(norm, [])
        if raw not in seen:
            seen.append(raw)
    clashes = {k: v for k, v in raw_by_norm.items() if len(v) > 1}
    if clashes:
        k, v = next(iter(sorted(clashes.items())))
        raise ManifestError(
            f"{path}: column 'participant_id': ids {', '.join(repr(x) for x in v)} all normalize "
            f"to {k!r}; rename one of them"
        )
    first_line: dict[tuple[str, str], int] = {}
    for line, key, raw_p, raw_s in zip(lines, zip(parts, sess), raw_ids, raw_sessions):
        if key in first_line:
            raise ManifestError(
                f"{path}: line {line}: participant {raw_p!r} session {raw_s!r} is listed more than once "
                f"(first on line {first_line[key]})"
            )
        first_line[key] = line
    return Manifest(table=table.reset_index(drop=True), source=str(path))
