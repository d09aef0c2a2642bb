"""The participant manifest (nipoppy's ``manifest.csv`` convention), read with pandas.

Required columns: ``participant_id`` and ``session_id``; others (``visit_id``,
``datatype``, ...) are kept. Participant ids are normalized to alphanumerics; two raw ids
that normalize to the same value are an error, since their data would mix.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .errors import ManifestError
from .ids import Visit, normalize_participant_id, normalize_session_id

REQUIRED_COLUMNS = ("participant_id", "session_id")


@dataclass(frozen=True)
class Manifest:
    table: pd.DataFrame  # one row per participant-session, with normalized columns added
    source: str

    @property
    def participants(self) -> dict[str, str]:
        """normalized id -> raw id as written in the manifest."""
        t = self.table
        return dict(zip(t["participant"], t["participant_id"]))

    @property
    def visits(self) -> list[Visit]:
        return [Visit(p, s) for p, s in zip(self.table["participant"], self.table["session"])]

    def has_visit(self, visit: Visit) -> bool:
        t = self.table
        return bool(((t["participant"] == visit.participant) & (t["session"] == visit.session)).any())

    def raw_participant_id(self, participant: str) -> str:
        return self.participants[participant]


def read_manifest(path: Path | str, sessions: tuple[str, ...] | None = None) -> Manifest:
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: participant manifest not found")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: not a readable CSV file ({exc})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise ManifestError(
            f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(map(str, table.columns))}"
        )
    parts, sess = [], []
    for i, (raw_p, raw_s) in enumerate(zip(table["participant_id"], table["session_id"])):
        line = i + 2  # header is line 1
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
    raw_by_norm = table.groupby("participant")["participant_id"].unique()
    clashes = {k: list(v) for k, v in raw_by_norm.items() if len(v) > 1}
    if clashes:
        k, v = next(iter(sorted(clashes.items())))
        raise ManifestError(
            f"{path}: column 'participant_id': ids {', '.join(repr(x) for x in v)} all normalize "
            f"to {k!r}; rename one of them"
        )
    dup = table.duplicated(["participant", "session"], keep=False)
    if dup.any():
        row = table[dup].iloc[0]
        raise ManifestError(
            f"{path}: participant {row['participant_id']!r} session {row['session_id']!r} "
            "is listed more than once"
        )
    return Manifest(table=table.reset_index(drop=True), source=str(path))
