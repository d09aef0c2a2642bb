"""The XNAT client's decision, a pure function of what XNAT holds (``core/xnat/plan.py``),
held to a table: every combination of session state, unfinished-upload record and duplicate
policy the client meets, and what it must do."""

from __future__ import annotations

import pytest

from dicom_assets.core.xnat.plan import FAIL, NOTHING, SEND, Existing, Visit, plan

VISIT = Visit("QPN_DEMO", "QPN001", "QPN001_ses-01", "1.2.3", files=4)
ALL = frozenset({"a.dcm", "b.dcm", "c.dcm", "d.dcm"})


def session(held=ALL, missing=(), foreign=(), subject="QPN001", uid="1.2.3") -> Existing:
    return Existing(subject, uid, frozenset(held), frozenset(missing), frozenset(foreign), scans=2)


PARTIAL = session(held={"a.dcm", "b.dcm"}, missing={"c.dcm", "d.dcm"})
OTHER = session(held=ALL | {"x.dcm"}, foreign={"x.dcm"})
OTHER_PARTIAL = session(held={"a.dcm", "x.dcm"}, missing={"b.dcm", "c.dcm", "d.dcm"}, foreign={"x.dcm"})

# (case, existing session, pending record, policy) -> (kind, status, files sent, overwrite)
TABLE = [
    ("no session", None, frozenset(), "fail", (SEND, "uploaded", None, None)),
    ("no session, stale record", None, ALL, "skip", (SEND, "uploaded", None, None)),
    ("same files", session(), frozenset(), "fail", (NOTHING, "already_archived", None, None)),
    ("same files, own record", session(), ALL, "fail", (NOTHING, "already_archived", None, None)),
    ("case of the subject differs", session(subject="qpn001"), frozenset(), "fail",
     (NOTHING, "already_archived", None, None)),
    ("own partial upload, policy fail", PARTIAL, ALL, "fail", (SEND, "appended", {"c.dcm", "d.dcm"}, "append")),
    ("own partial upload, policy skip", PARTIAL, ALL, "skip", (SEND, "appended", {"c.dcm", "d.dcm"}, "append")),
    ("partial, no record, policy fail", PARTIAL, frozenset(), "fail", (FAIL, "", None, None)),
    ("partial, no record, policy skip", PARTIAL, frozenset(), "skip", (NOTHING, "skipped_existing", None, None)),
    ("partial, no record, policy append", PARTIAL, frozenset(), "append",
     (SEND, "appended", {"c.dcm", "d.dcm"}, "append")),
    ("partial, record of other files", PARTIAL, frozenset({"c.dcm"}), "fail", (FAIL, "", None, None)),
    ("foreign file, policy fail", OTHER, ALL, "fail", (FAIL, "", None, None)),
    ("foreign file, policy skip", OTHER, frozenset(), "skip", (NOTHING, "skipped_existing", None, None)),
    ("foreign file, nothing missing, append", OTHER, frozenset(), "append",
     (NOTHING, "skipped_existing", None, None)),
    ("foreign and missing, own record: not own", OTHER_PARTIAL, ALL, "fail", (FAIL, "", None, None)),
    ("foreign and missing, append", OTHER_PARTIAL, frozenset(), "append",
     (SEND, "appended", {"b.dcm", "c.dcm", "d.dcm"}, "append")),
    ("another subject's label", session(subject="OTHER"), ALL, "append", (FAIL, "", None, None)),
    ("another study under the label", session(uid="9.9.9", held={"x.dcm"}, missing=ALL, foreign={"x.dcm"}), ALL,
     "append", (FAIL, "", None, None)),
    ("another study, empty session", session(uid="9.9.9", held=(), missing=ALL), ALL, "append", (FAIL, "", None, None)),
    ("UIDs rewritten by XNAT (hashUID), same instances", session(uid="2.25.77"), frozenset(), "fail",
     (NOTHING, "already_archived", None, None)),
    ("UIDs rewritten, part arrived, own record", session(uid="2.25.77", held={"a.dcm"}, missing=ALL - {"a.dcm"}),
     ALL, "fail", (SEND, "appended", ALL - {"a.dcm"}, "append")),
    ("XNAT does not say the study", session(uid=""), frozenset(), "fail", (NOTHING, "already_archived", None, None)),
]


@pytest.mark.parametrize("case,existing,pending,policy,want", TABLE, ids=[row[0] for row in TABLE])
def test_plan_table(case, existing, pending, policy, want):
    action = plan(existing, VISIT, pending, policy)
    kind, status, send_only, overwrite = want
    assert (action.kind, action.status, action.overwrite) == (kind, status, overwrite)
    assert action.send_only == (None if send_only is None else frozenset(send_only))
    assert bool(action.reason) == (kind != SEND), "a decision to send nothing or to fail says why"


def test_failures_say_what_to_do():
    assert "already used in XNAT project QPN_DEMO by subject OTHER" in plan(
        session(subject="OTHER"), VISIT, frozenset(), "fail").reason
    assert "holds another study (StudyInstanceUID 9.9.9, this visit's is 1.2.3)" in plan(
        session(uid="9.9.9", held={"x.dcm"}, missing=ALL, foreign={"x.dcm"}), VISIT, frozenset(), "fail").reason
    why = plan(PARTIAL, Visit(**{**VISIT.__dict__, "series": "series 3 (T2w): 2 of 2 files"}), frozenset(), "fail")
    assert why.reason.startswith("session QPN001_ses-01 already exists in XNAT project QPN_DEMO with different content")
    assert "2 of this visit's 4 files missing: series 3 (T2w): 2 of 2 files" in why.reason
    assert "set xnat_duplicate_policy to 'append'" in why.reason


def test_an_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="duplicate policy"):
        plan(None, VISIT, frozenset(), "overwrite")


def test_own_upload_needs_every_held_file_in_the_record():
    """Completing 'its own' upload whatever the policy is safe only if the session holds nothing
    this client did not record sending."""
    for held in ({"a.dcm"}, {"a.dcm", "b.dcm"}, set(ALL) - {"d.dcm"}):
        missing = ALL - held
        for record in (ALL, frozenset(held), frozenset(held) | {"zz.dcm"}):
            action = plan(session(held=held, missing=missing), VISIT, record, "fail")
            assert action.kind == SEND and action.own and action.send_only == missing
        action = plan(session(held=held, missing=missing), VISIT, frozenset(held) - {"a.dcm"}, "fail")
        assert action.kind == FAIL
