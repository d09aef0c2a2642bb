"""Participant, session and visit identifiers.

* participant ids are normalized to ASCII alphanumerics (``QPN_001`` -> ``QPN001``), as
  nipoppy's manifest convention asks;
* session ids are canonical BIDS-like labels ``ses-<alnum>`` (``01`` and ``ses-01`` both
  become ``ses-01``);
* a visit key, the Dagster partition key, is ``<participant>_<session>``, e.g.
  ``QPN001_ses-01``. The participant part holds no ``_`` so the key splits unambiguously.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import VisitKeyError

_NON_ALNUM = re.compile(r"[^A-Za-z0-9]")
_PARTICIPANT = re.compile(r"^[A-Za-z0-9]+$")
_SESSION_LABEL = re.compile(r"^[A-Za-z0-9]+$")


def normalize_participant_id(raw: object) -> str:
    """``QPN_001`` -> ``QPN001``; ``sub-QPN_001`` -> ``QPN001``. Empty results are errors."""
    text = str(raw).strip()
    if text.lower().startswith("sub-"):
        text = text[4:]
    norm = _NON_ALNUM.sub("", text)
    if not norm:
        raise VisitKeyError(f"participant id {raw!r} has no letters or digits")
    return norm


def normalize_session_id(raw: object) -> str:
    """``01`` -> ``ses-01``; ``ses-01`` -> ``ses-01``; ``ses_01`` -> ``ses-01``."""
    text = str(raw).strip()
    if text.lower().startswith("ses-") or text.lower().startswith("ses_"):
        text = text[4:]
    label = _NON_ALNUM.sub("", text)
    if not label:
        raise VisitKeyError(f"session id {raw!r} has no letters or digits")
    return f"ses-{label}"


def bids_participant(participant: str) -> str:
    return f"sub-{participant}"


@dataclass(frozen=True, order=True)
class Visit:
    """One participant-session: the unit of work (one Dagster partition)."""

    participant: str
    session: str

    def __post_init__(self) -> None:
        if not _PARTICIPANT.match(self.participant or ""):
            raise VisitKeyError(
                f"participant {self.participant!r} must be ASCII letters and digits only"
            )
        session = self.session or ""
        if not session.startswith("ses-") or not _SESSION_LABEL.match(session[4:]):
            raise VisitKeyError(f"session {self.session!r} must look like 'ses-<letters/digits>'")

    @property
    def key(self) -> str:
        return f"{self.participant}_{self.session}"

    def __str__(self) -> str:
        return self.key


def visit_key(participant: str, session: str) -> str:
    """Build the partition key of a visit; the only place that knows the format."""
    return Visit(participant, session).key


def parse_visit_key(key: str) -> Visit:
    """Parse ``QPN001_ses-01`` into a :class:`Visit`; reject anything that could escape."""
    if not isinstance(key, str) or not key:
        raise VisitKeyError("visit key is empty")
    if "/" in key or "\\" in key or ".." in key or "\x00" in key:
        raise VisitKeyError(f"visit key {key!r} contains a path separator or '..'")
    participant, sep, session = key.partition("_")
    if not sep:
        raise VisitKeyError(f"visit key {key!r} is not of the form '<participant>_ses-<label>'")
    return Visit(participant, session)
