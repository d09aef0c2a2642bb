"""The part of DicomEdit 6 (XNAT's anonymization language; the DicomEdit 6 language reference,
wiki.xnat.org/xnat-tools/dicomedit) the test server runs: the statements of XNAT's default
site-wide script (``META-INF/xnat/defaults/id.das`` in ``NrgXnat/xnat``) and what the tests'
project scripts use. Read by the server as XNAT's MizerService reads a script; nothing here comes
from the client (``dicom_assets/core/xnat``).

One statement per line; ``//`` starts a comment. Modelled:

* ``version "6.x"`` (a DicomEdit 6.1+ script starts with it);
* ``<tag> := <value>``: a value is a string in double quotes, a variable (``project``,
  ``subject``, ``session``: what the anonymizer is given, ``AnonymizerA.anonymize``), a tag's
  value, or ``hashUID[<tag>]`` (a UID replaced by one under ``2.25.``, the same for the same UID);
* ``- <tag>``: the element removed;
* ``reject``: the object is not kept (MizerService answers ``AnonymizationResultReject``;
  GradualDicomImporter deletes the file, MergeUtils.deleteRejectedFiles removes it from the
  session being archived);
* ``<condition> ? <action> [: <action>]`` (DicomEdit 6.0's conditional), a condition being
  ``<operand> <op> <operand>`` with ``=`` (equal), ``!=``, ``~`` (the value matches the regular
  expression, whole: Java's ``String.matches``) or ``!~``.

Tags are written ``(gggg,eeee)``. Anything else is a script XNAT may run but this server does
not: :class:`ScriptError`, which the server treats as a failed anonymization
(``AnonymizationResultError``), as XNAT treats a script it cannot evaluate."""

from __future__ import annotations

import hashlib
import re
import uuid
from dataclasses import dataclass

_TAG = r"\(([0-9A-Fa-f]{4}),([0-9A-Fa-f]{4})\)"
_STRING = r'"((?:[^"\\]|\\.)*)"'
VARIABLES = ("project", "subject", "session")
REJECTED = "rejected"


class ScriptError(ValueError):
    """A statement the test server does not model, or a script that fails to evaluate."""


def hash_uid(uid: str) -> str:
    """DicomEdit's ``hashUID``: a UID replaced by one under ``2.25.`` derived from a digest of it
    (the same UID gives the same new one; the digest DicomEdit uses is not modelled, only that it
    is deterministic)."""
    return "2.25." + str(uuid.UUID(bytes=hashlib.md5(uid.encode()).digest()).int)


def _tag(text: str) -> int:
    m = re.fullmatch(_TAG, text.strip())
    if m is None:
        raise ScriptError(f"not a tag: {text!r}")
    return int(m.group(1) + m.group(2), 16)


@dataclass(frozen=True)
class _Context:
    project: str
    subject: str
    session: str


def _element_text(ds, tag: int) -> str:
    elem = ds.get(tag)
    if elem is None:
        return ""
    value = elem.value
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return "" if value is None else str(value)


def _value(text: str, ds, ctx: _Context) -> str:
    text = text.strip()
    m = re.fullmatch(_STRING, text)
    if m:
        return re.sub(r"\\(.)", r"\1", m.group(1))
    if text in VARIABLES:
        return getattr(ctx, text)
    m = re.fullmatch(r"hashUID\[\s*(" + _TAG + r")\s*\]", text)
    if m:
        uid = _element_text(ds, _tag(m.group(1)))
        return hash_uid(uid) if uid else ""
    if re.fullmatch(_TAG, text):
        return _element_text(ds, _tag(text))
    raise ScriptError(f"a value this test server does not model: {text!r}")


def _condition(text: str, ds, ctx: _Context) -> bool:
    m = re.fullmatch(r"(.+?)\s*(!=|!~|=|~)\s*(.+)", text.strip())
    if m is None:
        raise ScriptError(f"a condition this test server does not model: {text!r}")
    left, op, right = _value(m.group(1), ds, ctx), m.group(2), _value(m.group(3), ds, ctx)
    if op in ("=", "!="):
        return (left == right) == (op == "=")
    try:
        hit = re.fullmatch(right, left) is not None
    except re.error as exc:
        raise ScriptError(f"a pattern that does not compile: {right!r} ({exc})") from None
    return hit == (op == "~")


def _split_conditional(line: str) -> tuple[str, str, str | None] | None:
    """``condition ? a : b`` split outside string literals; None when the line has no ``?``."""
    parts, quoted, start = [], False, 0
    for i, ch in enumerate(line):
        if ch == '"' and (i == 0 or line[i - 1] != "\\"):
            quoted = not quoted
        elif not quoted and ch == "?" and not parts:
            parts.append(line[start:i])
            start = i + 1
        elif not quoted and ch == ":" and len(parts) == 1 and line[i:i + 2] != ":=":
            parts.append(line[start:i])
            start = i + 1
    if not parts:
        return None
    parts.append(line[start:])
    return parts[0], parts[1], (parts[2] if len(parts) > 2 else None)


def _action(text: str, ds, ctx: _Context) -> str | None:
    """One action on ``ds``; REJECTED for ``reject``."""
    text = text.strip()
    if text == "reject":
        return REJECTED
    if text.startswith("-"):
        tag = _tag(text[1:])
        if tag in ds:
            del ds[tag]
        return None
    lhs, sep, rhs = text.partition(":=")
    if not sep:
        raise ScriptError(f"a statement this test server does not model: {text!r}")
    tag = _tag(lhs)
    value = _value(rhs, ds, ctx)
    if tag in ds:
        ds[tag].value = value
    else:
        from pydicom.datadict import dictionary_VR

        ds.add_new(tag, dictionary_VR(tag), value)
    return None


def _statements(script: str) -> list[str]:
    out = []
    for raw in script.splitlines():
        line = _strip_comment(raw).strip()
        if line and not re.fullmatch(r"version\s+" + _STRING, line):
            out.append(line)
    return out


# a string literal (kept whole, escapes included) or a ``//`` comment to the end of the line
_STRING_OR_COMMENT = re.compile(r'("(?:\\.|[^"\\])*")|//.*')


def _strip_comment(line: str) -> str:
    """The statement without its ``//`` comment; ``//`` inside a string literal is text."""
    return _STRING_OR_COMMENT.sub(lambda m: m.group(1) or "", line)


def run_script(script: str, ds, project: str, subject: str, session: str) -> str | None:
    """Run ``script`` on the data set ``ds`` (changed in place), statement by statement;
    REJECTED as soon as a ``reject`` runs (MizerService's AnonymizationResultReject), else None.
    Raises :class:`ScriptError` (AnonymizationResultError) for what it cannot run."""
    ctx = _Context(project or "", subject or "", session or "")
    for line in _statements(script):
        cond = _split_conditional(line)
        if cond is None:
            outcome = _action(line, ds, ctx)
        else:
            test, then, otherwise = cond
            chosen = then if _condition(test, ds, ctx) else otherwise
            outcome = _action(chosen, ds, ctx) if chosen is not None else None
        if outcome == REJECTED:
            return REJECTED
    return None


#: XNAT's default site-wide script (``META-INF/xnat/defaults/id.das``), statement by statement
DEFAULT_SITE_SCRIPT = ('version "6.1"\nproject != "Unassigned" ? (0008,1030) := project\n'
                       "(0010,0010) := subject\n(0010,0020) := session\n")
#: a project script that rewrites the study, series and instance UIDs (hashUID)
HASH_UIDS_SCRIPT = ('version "6.1"\n(0020,000D) := hashUID[(0020,000D)]\n(0020,000E) := hashUID[(0020,000E)]\n'
                    "(0008,0018) := hashUID[(0008,0018)]\n")
