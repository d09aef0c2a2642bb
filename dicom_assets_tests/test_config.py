import json

import pytest

from dicom_assets.core.config import load_config
from dicom_assets.core.errors import ConfigError

GOOD = {"dataset_name": "demo", "study_id": "QPN", "sessions": ["ses-01", "02"], "xnat_project": "QPN_X",
        "exclude_series": {"Exclude": ["Localizers", "AAHEAD"]}, "organize_mode": "copy"}


def write(tmp_path, data):
    p = tmp_path / "global_config.json"
    p.write_text(data if isinstance(data, str) else json.dumps(data))
    return p


def test_good_config_loads_and_normalizes(tmp_path):
    cfg = load_config(write(tmp_path, GOOD))
    assert cfg.sessions == ("ses-01", "ses-02")
    assert cfg.exclude_series == ("Localizers", "AAHEAD")
    assert cfg.organize_mode == "copy"
    assert cfg.limits.max_members > 0


def test_exclude_as_plain_list(tmp_path):
    cfg = load_config(write(tmp_path, {**GOOD, "exclude_series": ["MoCoSeries"]}))
    assert cfg.exclude_series == ("MoCoSeries",)


@pytest.mark.faults
def test_missing_file_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match="global_config.json: global config file not found"):
        load_config(tmp_path / "global_config.json")


@pytest.mark.faults
def test_malformed_json_names_line(tmp_path):
    p = write(tmp_path, '{"dataset_name": "x",\n "study_id": }')
    with pytest.raises(ConfigError, match=r"global_config.json: not valid JSON \(line 2"):
        load_config(p)


@pytest.mark.parametrize("change,message", [
    ({"colour": "blue"}, "unknown field(s) 'colour'"),
    ({"sessions": ["ses-01", "01"]}, "field 'sessions' lists session 'ses-01' twice"),
    ({"sessions": []}, "field 'sessions' must be a non-empty list"),
    ({"study_id": "a/b"}, "field 'study_id'"),
    ({"organize_mode": "move"}, "field 'organize_mode' must be one of symlink, copy"),
    ({"exclude_series": {"Include": ["x"]}}, "field 'exclude_series' as an object must have exactly the key 'Exclude'"),
    ({"exclude_series": "Localizers"}, "field 'exclude_series' must be a list"),
    ({"limits": {"max_members": -1}}, "field 'limits.max_members' must be a positive integer"),
    ({"limits": {"max_size": 1}}, "unknown field 'limits.max_size'"),
    ({"session_label_pattern": "{subject}"}, "field 'session_label_pattern'"),
    ({"xnat_project": "has space"}, "field 'xnat_project'"),
    # a wrong type: one error naming the field, whatever the field's kind
    ({"exclude_derived": "yes"}, "field 'exclude_derived' must be true or false"),
    ({"limits": 3}, "field 'limits' must be an object"),
    ({"limits": {"max_members": True}}, "field 'limits.max_members' must be a positive integer"),
    ({"limits": {"max_extract_bytes": "1G"}}, "field 'limits.max_extract_bytes' must be a positive integer"),
    ({"sessions": ["ses-01", 1.5]}, "field 'sessions' holds 1.5, not a session id"),
    ({"dataset_name": 5}, "field 'dataset_name' must be a non-empty string"),
    ({"mixed_visit_policy": "ignore"}, "field 'mixed_visit_policy' must be one of fail, warn, not 'ignore'"),
    ({"datalad_store_url": "ftp://x"}, "field 'datalad_store_url' must be an http(s):// or file:// URL"),
    ({"colour": "blue", "limits": {"max_size": 1}}, "unknown field(s) 'colour'"),
])
@pytest.mark.faults
def test_each_bad_field_is_named(tmp_path, change, message):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, {**GOOD, **change}))
    assert message in str(err.value)
    assert "global_config.json" in str(err.value)


@pytest.mark.faults
def test_several_mistakes_give_one_error(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, {**GOOD, "sessions": ["ses-01", "01"], "organize_mode": "move", "extra": 1}))
    assert str(err.value).count("global_config.json") == 1
    assert "unknown field(s) 'extra'" in str(err.value)


def test_limits_are_the_extraction_limits(tmp_path):
    from dicom_assets.core.extract import ExtractLimits

    cfg = load_config(write(tmp_path, {**GOOD, "limits": {"max_members": 10}}))
    assert isinstance(cfg.limits, ExtractLimits)
    assert cfg.limits == ExtractLimits(max_members=10)  # the one set of defaults for the rest
    assert load_config(write(tmp_path, GOOD)).limits == ExtractLimits()


def test_config_round_trips_and_json_schema_is_current(tmp_path):
    from pathlib import Path

    from dicom_assets.core.config import json_schema, write_config

    cfg = load_config(write(tmp_path, GOOD))
    write_config(tmp_path / "again.json", cfg)
    assert load_config(tmp_path / "again.json").to_json() == cfg.to_json()
    schema = Path(__file__).parents[1] / "dicom_assets" / "schemas" / "global_config.schema.json"
    assert json.loads(schema.read_text()) == json_schema(), \
        "regenerate: python -c 'from dicom_assets.core.config import write_json_schema; write_json_schema()'"


@pytest.mark.faults
def test_missing_required_field(tmp_path):
    data = dict(GOOD)
    del data["study_id"]
    with pytest.raises(ConfigError, match="required field 'study_id' is missing"):
        load_config(write(tmp_path, data))


@pytest.mark.faults
def test_top_level_must_be_object(tmp_path):
    with pytest.raises(ConfigError, match="top level must be a JSON object"):
        load_config(write(tmp_path, "[1, 2]"))


@pytest.mark.faults
def test_unknown_fields_are_named_whatever_the_folder_is_called(tmp_path):
    folder = tmp_path / "{unknown}"  # a folder name that looks like a format field
    folder.mkdir()
    with pytest.raises(ConfigError) as err:
        load_config(write(folder, {**GOOD, "colour": "blue", "size": 2}))
    assert str(err.value).startswith(f"{folder / 'global_config.json'}: unknown field(s) 'colour', 'size';")
