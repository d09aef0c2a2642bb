"""The fuzz layer's shared parts: Hypothesis profiles and the tally of inputs tried per invariant.

Profiles: ``ci`` (default, bounded so the whole fuzz layer takes a few minutes on 2 cores) and
``long`` (``DICOM_ASSETS_FUZZ=long``: many more examples per property, for a night run).
Each property calls :func:`tried` once per generated input with the name of the invariant it
asserted; ``pytest_terminal_summary`` in conftest prints the counts.
"""

from __future__ import annotations

import os
from collections import Counter

from hypothesis import HealthCheck, settings

TALLY: Counter[str] = Counter()

settings.register_profile(
    "ci", max_examples=40, deadline=None, derandomize=False, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)
settings.register_profile(
    "long", max_examples=1500, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)
settings.load_profile("long" if os.environ.get("DICOM_ASSETS_FUZZ") == "long" else "ci")


def tried(invariant: str, n: int = 1) -> None:
    """Count one (or n) generated inputs checked against ``invariant``."""
    TALLY[invariant] += n
