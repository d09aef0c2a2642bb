"""XNAT's anonymization scripts, read to explain files a session lacks: a ``reject`` statement
drops a file (the site-wide script as it arrives, GradualDicomImporter; a project's as the session
is archived, MergePrearcToArchiveSession.anonymizeSession and MergeUtils.deleteRejectedFiles), and
XNAT still answers the import with the session's URI."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .files import UploadFile
from .filters import enabled_configs

_TAG = re.compile(r"\(([0-9A-Fa-f]{4}),([0-9A-Fa-f]{4})\)")
_STRING = re.compile(r'"((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class RejectRule:
    """One ``reject`` of a script: unconditional, or under a condition the client evaluates
    (``(gggg,eeee) <op> "value"``, op ``=``, ``!=``, ``~``, ``!~``), or one it cannot (``tag`` None)."""

    scope: str  # "site-wide" | "project <id>"
    statement: str
    tag: int | None = None
    op: str = ""
    value: str = ""
    always: bool = False

    @property
    def evaluable(self) -> bool:
        return self.always or self.tag is not None

    def rejects(self, ds) -> bool:
        """Whether the statement rejects a file of header ``ds`` (only for an evaluable one)."""
        if self.always:
            return True
        elem = ds.get(self.tag)
        text = "" if elem is None else _text(elem.value)
        if self.op in ("=", "!="):
            return (text == self.value) == (self.op == "=")
        try:  # DicomEdit's ~ is Java's String.matches: the whole value
            return (re.fullmatch(self.value, text) is not None) == (self.op == "~")
        except re.error:
            return False


@dataclass
class AnonScripts:
    """The ``reject`` statements of the anonymization scripts XNAT runs for a project."""

    rules: list[RejectRule] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)  # scripts the client could not read

    def explain(self, files: list[UploadFile]) -> tuple[dict[RejectRule, set[str]], dict[RejectRule, set[str]]]:
        """(rejected, maybe): per statement, the names of ``files`` it rejects, and those a
        statement the client cannot evaluate may reject."""
        import pydicom

        rejected: dict[RejectRule, set[str]] = {}
        maybe: dict[RejectRule, set[str]] = {}
        for f in files:
            try:
                ds = pydicom.dcmread(f.path, stop_before_pixels=True, force=True)
            except Exception:  # unreadable here: explained by nothing
                continue
            rule = next((r for r in self.rules if r.evaluable and r.rejects(ds)), None)
            if rule is not None:
                rejected.setdefault(rule, set()).add(f.arcname)
                continue
            rule = next((r for r in self.rules if not r.evaluable), None)
            if rule is not None:
                maybe.setdefault(rule, set()).add(f.arcname)
        return rejected, maybe


def _text(value) -> str:
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return "" if value is None else str(value)


def _strip_comment(line: str) -> str:
    quoted = False
    for i, ch in enumerate(line):
        if ch == '"' and (i == 0 or line[i - 1] != "\\"):
            quoted = not quoted
        elif not quoted and line.startswith("//", i):
            return line[:i]
    return line


def _reject_rule(scope: str, line: str, assigned: set[int]) -> RejectRule | None:
    """The rule of a statement holding ``reject`` (None for any other statement). Evaluated only
    in the simple forms: ``reject`` alone, or ``<tag> <op> "<value>" ? reject``, the tag not
    assigned by an earlier statement (then the file's own header decides)."""
    if not re.search(r"(^|[?:\s])reject\s*$|(^|[?:\s])reject\s*:", line):
        return None
    if line == "reject":
        return RejectRule(scope, line, always=True)
    m = re.fullmatch(r"(\([0-9A-Fa-f]{4},[0-9A-Fa-f]{4}\))\s*(!=|!~|=|~)\s*" + _STRING.pattern + r"\s*\?\s*reject",
                     line)
    if m is None:
        return RejectRule(scope, line)
    t = _TAG.fullmatch(m.group(1))
    tag = int(t.group(1) + t.group(2), 16)
    if tag in assigned:
        return RejectRule(scope, line)
    return RejectRule(scope, line, tag, m.group(2), re.sub(r"\\(.)", r"\1", m.group(3)))


def parse_rejects(scope: str, script: str, assigned: set[int] | None = None) -> list[RejectRule]:
    """The ``reject`` statements of a DicomEdit script (one statement per line, ``//``
    comments). ``assigned``: tags an earlier script (the site-wide one, for a project's) sets;
    the tags this script assigns are added to it."""
    assigned = set() if assigned is None else assigned
    out = []
    for raw in script.splitlines():
        line = _strip_comment(raw).strip()
        if not line:
            continue
        rule = _reject_rule(scope, line, assigned)
        if rule is not None:
            out.append(rule)
        m = re.search(r"(\([0-9A-Fa-f]{4},[0-9A-Fa-f]{4}\))\s*:=", line)
        if m:
            t = _TAG.fullmatch(m.group(1))
            assigned.add(int(t.group(1) + t.group(2), 16))
    return out


def read_anon_scripts(session, project: str) -> AnonScripts:
    """The site-wide and the project's anonymization scripts, as XNAT's configuration service
    holds them (tool ``anon``; DicomEdit.buildScriptPath: path ``script`` site-wide, readable by
    any user; ``/projects/<id>``, served by ConfigResource at ``projects/<id>`` under the project
    to those who read its data). Only an ``enabled`` one runs (DefaultAnonUtils: the site-wide
    one at import, GradualDicomImporter; the project's at archive, ProjectAnonymizer)."""
    out = AnonScripts()
    assigned: set[int] = set()
    for scope, contents in enabled_configs(session, project, "anon/script", "anonymization script", out.unknown,
                                           project_path=f"anon/projects/{project}"):
        out.rules.extend(parse_rejects(scope, contents, assigned))
    return out


def describe_rejects(rejected: dict[RejectRule, set[str]], maybe: dict[RejectRule, set[str]], summary) -> str:
    """``the project P anonymization script's `...` rejects series 9 (...): 5 of 5 files; ...``;
    ``summary(names)`` names the series."""
    parts = [f"the {r.scope} anonymization script's statement `{r.statement}` rejects {summary(n)}"
             for r, n in rejected.items()]
    parts += [f"the {r.scope} anonymization script's statement `{r.statement}`, which the client cannot evaluate, "
              f"may reject {summary(n)}" for r, n in maybe.items()]
    return "; ".join(parts)


WHERE = ("XNAT deletes a file its site-wide script rejects as the file arrives (GradualDicomImporter) and the files "
         "a project's script rejects as it archives the session (MergeUtils.deleteRejectedFiles), and answers the "
         "import as archived all the same")
