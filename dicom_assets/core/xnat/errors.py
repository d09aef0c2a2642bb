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


_PAGE = re.compile(r"<html\b.*?(?:</html>|$)", re.S | re.I)


def status_text(page: str) -> str:
    """The readable status of an HTML error page: XNAT's restlet resources answer errors with
    Restlet's status page, the description in ``<h3>`` (``getResponse().setStatus(status,
    message)`` without an entity: com.noelios.restlet StatusFilter); a proxy's page has it in
    ``<h1>`` or ``<title>``. "" when the page holds none."""
    import html

    for tag in ("h3", "h1", "title"):
        m = re.search(rf"<{tag}\b[^>]*>(.*?)</{tag}>", page, re.S | re.I)
        text = " ".join(html.unescape(re.sub(r"<[^>]+>", "", m.group(1))).split()) if m else ""
        if text and text != "Status page":
            return text
    return ""


def readable(text: str) -> str:
    """``text`` with every HTML page in it replaced by its status text (never a raw HTML dump)."""
    return _PAGE.sub(lambda m: status_text(m.group(0)) or "(an HTML page without a status text)", text)


def response_text(exc: Exception) -> str:
    """The text XNAT answered (xnatpy's XNATResponseError keeps it as ``text``); of an HTML page,
    its status text."""
    text = getattr(exc, "text", None) or getattr(getattr(exc, "response", None), "text", "") or ""
    return " ".join(readable(text).split())[:200]


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
    text = " ".join(readable(str(exc)).split())[:300]
    return XnatError(f"XNAT at {server} answered an error: {text}")

