"""The dataset layout is described once (``@layout_path`` on the members of DatasetLayout):
the tree of core/layout.py's docstring and the table of docs/layout.md are that description
rendered (by the repo's scripts/gen_docs.py), every path-building member is described, and
each pattern is the path its member builds (so a description cannot lie)."""

from __future__ import annotations

import importlib.util
import inspect
import re
from pathlib import Path

import pytest

from dicom_assets.core import layout as layout_mod
from dicom_assets.core.ids import Visit
from dicom_assets.core.layout import PLACEHOLDERS, DatasetLayout, layout_entries

REPO = Path(__file__).resolve().parents[1]


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_docs", REPO / "scripts" / "gen_docs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


docs_mod = _load_generator()
FIX = f"regenerate with: {docs_mod.REGENERATE}"

VISIT = Visit("QPN001", "ses-01")
STUDY, TCIA_NAME, SERIES_UID = "QPN", "manifest-basket_2", "1.3.6.1.4.1.14519.5.2.1.7695.1700.1234"
ITEM, STATE_ID, PART, TAG = "QPN_001_MR.zip", "0a1b2c3d4e5f6a7b", "refs", "9f8e7d6c"
NODE_STUDY = "27f7126f-4f66fb14-03f4081b-f9341db2-53925988"

# what each <placeholder> becomes for the sample arguments below
PSEUDONYM, NEW_UID = "S0A1B2C3D4E5F", "2.25.1234567890123456789"
VALUES = {"session": VISIT.session, "participant": VISIT.participant, "visit": VISIT.key, "study": STUDY,
          "item": ITEM, "name": TCIA_NAME, "uid": SERIES_UID, "id": STATE_ID, "part": PART, "tag": TAG,
          "study_id": NODE_STUDY, "pseudonym": PSEUDONYM, "newuid": NEW_UID}


def sample_args(lay: DatasetLayout) -> dict:
    """The argument of each parameter name a member of DatasetLayout takes."""
    return {"visit": VISIT, "visit_key": VISIT.key, "participant": VISIT.participant, "session": VISIT.session,
            "study": STUDY, "item": ITEM, "name": TCIA_NAME, "series_uid": SERIES_UID, "state_id": STATE_ID,
            "part": PART, "tag": TAG, "study_id": NODE_STUDY, "pseudonym": PSEUDONYM, "new_uid": NEW_UID,
            "store_dir": lay.store_dir(STUDY),
            "series_dir": lay.tcia_series_dir(TCIA_NAME), "visit_dir": lay.dicom_node_dir(VISIT.key), "superdataset": lay.datalad_study_dir(STUDY)}


def expand(pattern: str) -> list[str]:
    """``a/{x,y}`` -> ``[a/x, a/y]``; a pattern without braces is itself."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    return [pattern[:m.start()] + alt + pattern[m.end():] for alt in m.group(1).split(",")]


def substitute(pattern: str) -> str:
    unknown = set(re.findall(r"<([a-z_]+)>", pattern)) - set(VALUES)
    assert not unknown, f"{pattern}: no sample value for <{'>, <'.join(sorted(unknown))}> in this test"
    return re.sub(r"<([a-z_]+)>", lambda m: VALUES[m.group(1)], pattern)


def test_docstring_tree_is_generated():
    doc_tree = docs_mod.docstring_tree(layout_mod.__doc__ or "")
    assert doc_tree is not None, f"core/layout.py's docstring lost its '<root>/' tree block; {FIX}"
    assert doc_tree == docs_mod.render_tree(), f"core/layout.py's docstring tree is not DatasetLayout's; {FIX}"


def test_docs_layout_md_table_is_generated():
    text = docs_mod.LAYOUT_MD.read_text(encoding="utf-8")
    block = docs_mod.markdown_block(text)
    assert block is not None, (f"docs/layout.md lost its markers {docs_mod.MD_BEGIN!r} ... {docs_mod.MD_END!r}; "
                               "put them back where the table goes, then " + FIX)
    assert block == docs_mod.render_markdown(), f"docs/layout.md's table is not DatasetLayout's; {FIX}"


def test_readme_tree_is_generated():
    block = docs_mod.markdown_block(docs_mod.README.read_text(encoding="utf-8"))
    assert block is not None, f"README.md lost its layout tree markers {docs_mod.MD_BEGIN!r}; {FIX}"
    assert block == docs_mod.render_readme_tree(), f"README.md's layout tree is not DatasetLayout's; {FIX}"


def test_write_check_command_agrees(capsys):
    assert docs_mod.main(["--check"]) == 0, capsys.readouterr().err


def _members() -> list[str]:
    """Every public member defined in DatasetLayout's body: all of them build paths."""
    return [name for name, attr in vars(DatasetLayout).items() if not name.startswith("_")
            and (isinstance(attr, (property, staticmethod, classmethod)) or inspect.isfunction(attr))]


def test_every_path_member_is_described():
    described = {e.member for e in layout_entries()}
    missing = sorted(set(_members()) - described)
    assert not missing, (f"DatasetLayout.{', '.join(missing)}: no @layout_path(pattern, description); "
                         f"describe each path it builds, then {FIX}")


def test_placeholders_are_all_explained_and_used():
    used = {p for e in layout_entries() for p in re.findall(r"<([a-z_]+)>", e.pattern)}
    assert used - set(PLACEHOLDERS) == set(), f"placeholders not in layout.PLACEHOLDERS: {used - set(PLACEHOLDERS)}"
    assert set(PLACEHOLDERS) - used == set(), f"layout.PLACEHOLDERS explains unused {set(PLACEHOLDERS) - used}"
    assert set(VALUES) == set(PLACEHOLDERS), "this test's VALUES and layout.PLACEHOLDERS name different placeholders"


@pytest.mark.parametrize("entry", layout_entries(), ids=lambda e: e.member)
def test_pattern_is_the_path_built(entry, tmp_path):
    lay = DatasetLayout(tmp_path / "root")
    args = sample_args(lay)
    attr = getattr(lay, entry.member)
    if callable(attr):
        params = list(inspect.signature(attr).parameters)
        unknown = [p for p in params if p not in args]
        assert not unknown, f"DatasetLayout.{entry.member}: no sample argument for {unknown} in this test"
        built = attr(*(args[p] for p in params))
    else:
        built = attr
    got = list(built) if isinstance(built, tuple) else [built]
    want = expand(entry.pattern)
    folder = entry.pattern.endswith("/")
    assert len(got) == len(want), f"{entry.member} builds {len(got)} path(s), its pattern {entry.pattern!r} {len(want)}"
    for path, pat in zip(got, want):
        assert isinstance(path, Path), f"{entry.member} returns {type(path).__name__}, not a Path"
        rel = path.relative_to(lay.root).as_posix() + ("/" if folder else "")
        assert rel == substitute(pat), (f"DatasetLayout.{entry.member} builds {rel!r}, its description says "
                                        f"{entry.pattern!r}; fix one, then {FIX}")
    if entry.member.endswith(("_dir", "_root")):
        assert folder, f"{entry.member}: a folder's pattern ends with '/' ({entry.pattern!r})"


def test_sample_values_are_distinct():
    """A placeholder put where another belongs would go unnoticed if two samples were equal."""
    assert len(set(VALUES.values())) == len(VALUES)


def test_tree_lists_each_path_once():
    """A path listed twice (two members building the same folder) reads as two places."""
    patterns = [e.pattern for e in layout_entries()]
    assert len(patterns) == len(set(patterns)), sorted(p for p in patterns if patterns.count(p) > 1)


def test_generator_is_outside_the_package():
    """The generator rewrites the repo's README and docs: installed, the package has neither."""
    assert not hasattr(layout_mod, "main") and not hasattr(layout_mod, "README")
