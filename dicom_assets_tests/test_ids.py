import pytest

from dicom_assets.core.errors import VisitKeyError
from dicom_assets.core.ids import (
    Visit,
    normalize_participant_id,
    normalize_session_id,
    parse_visit_key,
    visit_key,
)


@pytest.mark.parametrize("raw,norm", [("QPN_001", "QPN001"), ("sub-QPN_001", "QPN001"), (" MNI-0042 ", "MNI0042"),
                                      (1234, "1234")])
def test_participant_normalization(raw, norm):
    assert normalize_participant_id(raw) == norm


@pytest.mark.parametrize("raw,norm", [("01", "ses-01"), ("ses-01", "ses-01"), ("ses_BL", "ses-BL"), (2, "ses-2")])
def test_session_normalization(raw, norm):
    assert normalize_session_id(raw) == norm


@pytest.mark.parametrize("raw", ["", "___", "sub-"])
def test_participant_without_alnum_is_rejected(raw):
    with pytest.raises(VisitKeyError):
        normalize_participant_id(raw)


@pytest.mark.parametrize("participant,session", [("QPN001", "ses-01"), ("A", "ses-B2"), ("0042", "ses-baseline")])
def test_visit_key_round_trip(participant, session):
    key = visit_key(participant, session)
    assert key == f"{participant}_{session}"
    assert parse_visit_key(key) == Visit(participant, session)
    assert parse_visit_key(key).key == key


@pytest.mark.parametrize("key", ["", "QPN001", "QPN001_ses-01/..", "../QPN001_ses-01", "QPN/001_ses-01",
                                 "QPN001_ses-..", "QPN001_01", "QPN_001_ses-01", "QPN001_ses-0 1",
                                 "QPN001_ses-01\\x", "QPN001_ses-"])
def test_bad_visit_keys_are_rejected(key):
    with pytest.raises(VisitKeyError):
        parse_visit_key(key)


def test_visit_key_refuses_unnormalized_parts():
    with pytest.raises(VisitKeyError):
        visit_key("QPN_001", "ses-01")
    with pytest.raises(VisitKeyError):
        visit_key("QPN001", "01")
