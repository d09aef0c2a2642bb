"""The shape of the code, as a newcomer relies on it: the domain core has no import circle and
no Dagster, and every third-party package the platform imports is declared in pyproject.toml."""

from __future__ import annotations

import ast
import sys
import tomllib
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "dicom_assets"
CORE = PACKAGE / "core"


def _imports(path: Path) -> list[ast.Import | ast.ImportFrom]:
    """Every import of a module, the ones inside functions too (a late import hides a circle)."""
    return [n for n in ast.walk(ast.parse(path.read_text(encoding="utf-8"))) if isinstance(n, (ast.Import, ast.ImportFrom))]


def core_graph() -> dict[str, set[str]]:
    mods = {p.stem for p in CORE.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for name in mods:
        deps: set[str] = set()
        for node in _imports(CORE / f"{name}.py"):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                deps.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dicom_assets.core."):
                deps.add(node.module.split(".")[2])
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(u):
        state[u] = "open"
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == "open":
                found.append(stack[stack.index(v):] + [v])
            elif v not in state:
                visit(v)
        stack.pop()
        state[u] = "done"

    for u in sorted(graph):
        if u not in state:
            visit(u)
    return found


def test_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_core_import_graph_has_no_circle():
    found = cycles(core_graph())
    assert not found, "core/ imports in a circle: " + "; ".join(" -> ".join(c) for c in found)


def test_core_imports_no_dagster_and_nothing_above_it():
    offenders = []
    for path in CORE.glob("*.py"):
        for node in _imports(path):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if isinstance(node, ast.ImportFrom) and node.level > 1:
                offenders.append(f"{path.name}: from {'.' * node.level}{node.module or ''} (outside core/)")
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "dagster"
                          or n.startswith(("dicom_assets.defs", "dicom_assets.testing"))]
    assert not offenders, offenders


def _declared() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    out = set()
    for r in reqs:
        name = r.split(";")[0].split("[")[0]
        for sep in "<>=!~ ":
            name = name.split(sep)[0]
        out.add(name.strip().lower().replace("_", "-"))
    return out


def test_every_third_party_import_is_a_declared_dependency():
    """A package imported only because another dependency happens to pull it in breaks the day
    that one stops: what the installed package (not its tests, not the test servers) imports
    must be in ``[project] dependencies``."""
    stdlib = set(sys.stdlib_module_names)
    dists = metadata.packages_distributions()
    declared = _declared()
    missing = {}
    for path in PACKAGE.rglob("*.py"):
        if "testing" in path.relative_to(PACKAGE).parts:
            continue
        for node in _imports(path):
            if isinstance(node, ast.ImportFrom) and node.level:
                continue
            tops = [a.name.split(".")[0] for a in node.names] if isinstance(node, ast.Import) \
                else [(node.module or "").split(".")[0]]
            for top in tops:
                if top in stdlib or top == "dicom_assets":
                    continue
                names = {d.lower().replace("_", "-") for d in dists.get(top, [top])}
                if not names & declared:
                    missing.setdefault(top, set()).add(str(path.relative_to(REPO)))
    assert not missing, "imported but not declared in pyproject.toml: " + "; ".join(
        f"{m} ({', '.join(sorted(f))})" for m, f in sorted(missing.items()))


def test_the_xnat_test_server_never_imports_the_client():
    """The test server follows XNAT's code, not the client's: nothing under
    dicom_assets/testing/xnat/ imports dicom_assets.core.xnat (nor anything else of core), so a
    bug the client and the server share cannot hide."""
    offenders = []
    for path in (PACKAGE / "testing" / "xnat").glob("*.py"):
        for node in _imports(path):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if isinstance(node, ast.ImportFrom) and node.level > 1:
                offenders.append(f"{path.name}: from {'.' * node.level}{node.module or ''}")
            offenders += [f"{path.name}: {n}" for n in names if n.startswith("dicom_assets.core")]
    assert (PACKAGE / "testing" / "xnat" / "server.py").exists() and not offenders, offenders
