"""What can fail talking to XNAT, named: our errors, and XNAT's answers mapped to them."""

from __future__ import annotations

import re

from ..errors import DicomAssetsError


class XnatError(DicomAssetsError):
    """XNAT refused or failed the upload; the message says what to do."""


class XnatAuthError(XnatError):
    """401/403: wrong credentials or missing rights (never retried)."""


class XnatTransientError(XnatError):
    """Connection reset, timeout, 502/503/504: worth retrying."""


class XnatBusyError(XnatTransientError):
    """XNAT refused to merge into the session while a workflow is open on it (a pipeline or a
    container run on archive; PrearcSessionArchiver.preventConcurrentArchiving): worth waiting for."""


def http_status(exc: Exception) -> int | None:
    resp = getattr(exc, "response", None)
    status = getattr(resp, "status_code", None) or getattr(exc, "status_code", None)
    if status is None:  # xnatpy's upload errors carry the status only in their text
        m = re.search(r"(?:Status code|status|response for uploading was) \(?(\d{3})\)?", str(exc))
        status = int(m.group(1)) if m else None
    return status


def in_doubt(exc: Exception) -> bool:
    """The request may have reached XNAT and may still be running there."""
    import requests

    return http_status(exc) in (500, 502, 503, 504) or isinstance(
        exc, (requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError))


def response_text(exc: Exception) -> str:
    """The text XNAT answered (xnatpy's XNATResponseError keeps it as ``text``), unless a page."""
    text = getattr(exc, "text", None) or getattr(getattr(exc, "response", None), "text", "") or ""
    return " ".join(text.split())[:200] if text.lstrip()[:1] != "<" else ""


def classify_error(exc: Exception, server: str) -> XnatError:
    """Map xnatpy/requests errors to ours, with a message that says what to do (no secrets)."""
    import xnat.exceptions as xe

    status = http_status(exc)
    if isinstance(exc, xe.XNATLoginFailedError) or status == 401:
        return XnatAuthError(f"XNAT at {server} refused the credentials (401): check XNAT_USER/XNAT_PASSWORD")
    if status == 403:
        return XnatAuthError(f"XNAT at {server} refused the request (403): the user lacks the right for it")
    if in_doubt(exc):
        return XnatTransientError(f"XNAT at {server} is unavailable or failed ({status or type(exc).__name__}); "
                                  "transient: retried with backoff (3 attempts)")
    text = str(exc).replace("\n", " ")[:300]
    return XnatError(f"XNAT at {server} answered an error: {text}")

