"""One settings object: every environment variable the platform reads is a typed field of
``dicom_assets.settings.Settings``, read when needed (never at import), with named errors, a
hidden secret, and docs generated from it."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
from dagster import materialize

from dicom_assets.core.layout import DatasetLayout
from dicom_assets.settings import Settings, SettingsError, current

from .helpers import run_chain

REPO = Path(__file__).resolve().parents[1]
READS = re.compile(r"os\.environ\.get\(|os\.getenv\(|os\.environ\[|environ\.setdefault\(")


def test_no_module_but_settings_reads_the_environment():
    """Copying the environment for a subprocess (``dict(os.environ)``) is not reading a variable."""
    offenders = []
    for path in (REPO / "dicom_assets").rglob("*.py"):
        rel = path.relative_to(REPO).as_posix()
        if rel == "dicom_assets/settings.py" or "/testing/" in rel:
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if READS.search(line):
                offenders.append(f"{rel}:{n}: {line.strip()}")
    assert not offenders, "read the variable through dicom_assets.settings instead: " + "; ".join(offenders)


def test_values_are_typed_and_read_when_asked(monkeypatch):
    monkeypatch.setenv("TCIA_SERVERS", " https://a.example/nbia-api , https://b.example ,")
    monkeypatch.setenv("DICOM_ASSETS_SENSORS", "Stopped")
    monkeypatch.setenv("DICOM_ASSETS_ORGANIZE_WORKERS", "3")
    monkeypatch.setenv("DICOM_ASSETS_SENSOR_SETTLE_WINDOW", "0.5")
    monkeypatch.setenv("XNAT_VERIFY", "false")
    monkeypatch.setenv("DICOM_ASSETS_EXECUTOR", "")  # empty: unset, the default
    s = current()
    assert s.tcia_servers == ["https://a.example/nbia-api", "https://b.example"]
    assert s.sensors == "off" and s.organize_workers == 3 and s.xnat_verify is False
    assert s.executor == "in_process"
    assert s.downloads_sensor().settle_window == 0.5 and s.downloads_sensor(batch=7).batch == 7
    monkeypatch.setenv("DICOM_ASSETS_SENSORS", "on")
    assert current().sensors == "on"  # read again on each call


@pytest.mark.parametrize("name,value,says", [
    ("DICOM_ASSETS_ORGANIZE_WORKERS", "two", "valid integer"),
    ("DICOM_ASSETS_ORGANIZE_WORKERS", "0", "greater than or equal to 1"),
    ("DICOM_ASSETS_EXECUTOR", "kubernetes", "in_process"),
    ("DICOM_ASSETS_SENSORS", "sometimes", "'on' or 'off'"),
    ("XNAT_VERIFY", "maybe", "valid boolean"),
    ("DICOM_ASSETS_SENSOR_BATCH", "-1", "greater than or equal to 1"),
])
def test_a_bad_value_names_the_variable_and_what_it_accepts(monkeypatch, name, value, says):
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as err:
        current()
    assert f"{name}={value!r}" in str(err.value) and says in str(err.value)


def test_the_secret_never_shows(monkeypatch):
    monkeypatch.setenv("XNAT_PASSWORD", "s3cr3t-pw")
    s = current()
    assert "s3cr3t-pw" not in repr(s) and "s3cr3t-pw" not in str(s.model_dump())
    assert s.xnat_password.get_secret_value() == "s3cr3t-pw"


def test_docs_settings_md_is_generated():
    spec = importlib.util.spec_from_file_location("gen_docs", REPO / "scripts" / "gen_docs.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    text = gen.SETTINGS_MD.read_text(encoding="utf-8")
    assert gen.markdown_block(text, gen.SETTINGS_BEGIN) == gen.render_settings(), \
        f"docs/settings.md is not Settings' table; regenerate with: {gen.REGENERATE}"
    for field in Settings.model_fields.values():
        assert field.alias and field.description, f"{field}: every setting has its variable and a description"


def test_xnat_is_decided_when_the_sensor_ticks_not_when_the_code_loads(monkeypatch, tmp_path):
    """The code location is loaded with no XNAT; XNAT_HOST set afterwards is seen by the next tick."""
    from dicom_assets.defs import sensors

    monkeypatch.delenv("XNAT_HOST", raising=False)
    lay = DatasetLayout(tmp_path)
    assert "xnat_session" not in {k.to_user_string() for k in sensors.run_selection(lay)}
    monkeypatch.setenv("XNAT_HOST", "http://127.0.0.1:9")
    assert "xnat_session" in {k.to_user_string() for k in sensors.run_selection(lay)}


def test_xnat_session_without_an_xnat_records_nothing_and_says_why(instance, demo_root, monkeypatch):
    from dicom_assets.defs.publish import xnat_session
    from dicom_assets.defs.resources import DatasetResource, XnatResource

    monkeypatch.delenv("XNAT_HOST", raising=False)
    visit = "QPN001_ses-01"
    assert run_chain(instance, demo_root, visit).success
    result = materialize([xnat_session], partition_key=visit, instance=instance,
                         resources={"dataset": DatasetResource(root=str(demo_root)), "xnat": XnatResource()})
    assert result.success
    assert not result.get_asset_materialization_events()
    (check,) = [e.event_specific_data for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"]
    assert check.check_name == "scans_match_series"
    assert check.description == "not applicable: no XNAT configured (XNAT_HOST is not set): nothing uploaded"
    assert not DatasetLayout(demo_root).xnat_marker_path(visit).exists()
