"""Labels as XNAT files them, and the IDs and lengths it accepts."""

from __future__ import annotations

import re

# BaseXnatExperimentdata.cleanValue: XNAT replaces each of these characters by "_" in subject
# and session labels (PrearcSessionArchiver.fixSessionLabel / fixSubject)
XNAT_CLEANED_CHARS = " `~@#$%^&*()+=[]{}|\\/?:;\"',.<>"
_CLEAN = str.maketrans({c: "_" for c in XNAT_CLEANED_CHARS})

# XftStringUtils.REGEX_VALID_ID (Patterns.ALPHANUMERIC_AND_DASHES): ProjectResource.handlePut
# answers 417 "Invalid character in project ID." to a new project ID outside it
PROJECT_ID = re.compile(r"^[A-Za-z0-9_-]+$")
# XFTValidator: an xs:string without a declared size holds at most GenericWrapperField's
# DEFAULT_STRING_SIZE characters; xnat.xsd declares none for subject and experiment labels
MAX_LABEL = 255


def clean_label(value: str) -> str:
    """The label XNAT files a subject or session under."""
    return value.translate(_CLEAN)

