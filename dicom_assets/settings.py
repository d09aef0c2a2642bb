"""Every environment variable dicom-assets reads, in one typed object.

:class:`Settings` holds each variable with its type, default and description
(docs/settings.md is generated from it: ``python scripts/gen_docs.py --write``). It is read
when something needs it (:func:`current`: a run's step, a sensor tick, a command), never at
import, so a code location loaded before ``XNAT_HOST`` is set still uploads once it is set, and
a test's ``monkeypatch.setenv`` is seen. The domain core (``core/``) reads no environment: the
Dagster layer and the CLI pass it the values.

A bad value fails with the variable's name and what it accepts (:class:`SettingsError`),
never with a bare ``int()`` traceback. Secrets (``XNAT_PASSWORD``) are ``SecretStr``: they print
as ``**********`` and reach no log or metadata.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .core.downloads_state import SensorLimits
from .core.errors import DicomAssetsError

_OFF = ("off", "0", "false", "no", "stopped")
_ON = ("on", "1", "true", "yes", "running")


class SettingsError(DicomAssetsError):
    """An environment variable holds a value dicom-assets cannot use."""


class Settings(BaseSettings):
    """The platform's environment variables (see the module docstring)."""

    model_config = SettingsConfigDict(case_sensitive=True, extra="ignore", frozen=True, env_ignore_empty=True,
                                      populate_by_name=True)

    # --- where the data is ------------------------------------------------------------------
    dataset_root: str | None = Field(
        None, alias="DICOM_ASSETS_ROOT",
        description="the dataset root the code location serves (default: `.demo/dataset` of a source checkout, "
                    "else `./dicom-assets-demo`)")
    cache: str | None = Field(
        None, alias="DICOM_ASSETS_CACHE",
        description="cache folder of the real DICOM samples fetched from PyPI (default: `$XDG_CACHE_HOME/dicom-assets`; "
                    "`make` sets the checkout's `.cache`)")

    # --- XNAT ----------------------------------------------------------------------------------
    xnat_host: str | None = Field(
        None, alias="XNAT_HOST",
        description="the site's XNAT base URL; unset: `xnat_session` has nothing to do (the sensor's runs "
                    "leave it out, a run that selects it records no upload)")
    xnat_user: str | None = Field(None, alias="XNAT_USER", description="XNAT user")
    xnat_password: SecretStr | None = Field(None, alias="XNAT_PASSWORD",
                                            description="XNAT password (secret: never logged)")
    xnat_verify: bool = Field(True, alias="XNAT_VERIFY", description="verify XNAT's TLS certificate (`false` to "
                                                                     "turn off, for a test server only)")

    # --- TCIA ----------------------------------------------------------------------------------
    tcia_servers: Annotated[list[str], NoDecode] = Field(
        default_factory=list, alias="TCIA_SERVERS",
        description="comma-separated NBIA servers manifests may name; the first is the default "
                    "(default: TCIA's public servers)")
    tcia_api_version: Literal["v4", "v1"] = Field("v4", alias="TCIA_API_VERSION",
                                                  description="NBIA REST API version: `v4` (tcia_utils') or `v1` "
                                                              "(the Data Retriever's)")
    tcia_retry_window: float = Field(
        600, ge=0, alias="TCIA_RETRY_WINDOW",
        description="seconds a request keeps being retried while the NBIA server is away (429, 502-504, no "
                    "connection), honouring `Retry-After`, before the run fails")
    tcia_retry_failed_every: float = Field(
        900, ge=0, alias="TCIA_RETRY_FAILED_EVERY",
        description="seconds after a failed manifest run (an outage, a series that failed) before the "
                    "`tcia_sensor` requests it again")
    tcia_retry_failed_times: int = Field(
        24, ge=0, alias="TCIA_RETRY_FAILED_TIMES",
        description="how many times the `tcia_sensor` requests a failed manifest again (0: never)")

    # --- the DICOM node (Orthanc) --------------------------------------------------------------
    orthanc_url: str | None = Field(
        None, alias="ORTHANC_URL",
        description="the DICOM node's REST API (Orthanc), e.g. `http://127.0.0.1:8042`; unset: the "
                    "`dicom_node_sensor` has nothing to follow")
    orthanc_user: str | None = Field(None, alias="ORTHANC_USER", description="Orthanc user")
    orthanc_password: SecretStr | None = Field(None, alias="ORTHANC_PASSWORD",
                                               description="Orthanc password (secret: never logged)")
    orthanc_changes_per_tick: int = Field(
        20000, ge=1, alias="DICOM_ASSETS_NODE_CHANGES_PER_TICK",
        description="changes of Orthanc's `/changes` log the `dicom_node_sensor` reads at most per tick "
                    "(the rest at the next)")

    # --- the de-identified copy (deid in global_config.json) -------------------------------------
    deid_key: SecretStr | None = Field(
        None, alias="DICOM_ASSETS_DEID_KEY",
        description="the site's de-identification key (secret, at least 16 characters: never logged): pseudonyms, "
                    "new UIDs and date shifts of `deidentified_dicoms` derive from it; only its fingerprint is shown")
    deid_map: str | None = Field(
        None, alias="DICOM_ASSETS_DEID_MAP",
        description="where `deidentified_dicoms` records participant -> pseudonym (a TSV, outside `share/`); unset: "
                    "no map is written (the key gives the same pseudonyms again)")

    # --- how the code location runs ------------------------------------------------------------
    executor: Literal["in_process", "multiprocess", "celery"] = Field(
        "in_process", alias="DICOM_ASSETS_EXECUTOR",
        description="`in_process`: every step of a run in the run's process; `multiprocess`: each step in its "
                    "own process; `celery`: each step a task on the Celery workers of the cluster profile "
                    "(docs/deploy.md; read when the code location loads)")
    sensors: Literal["on", "off"] = Field(
        "on", alias="DICOM_ASSETS_SENSORS",
        description="`off` (or `0`, `false`, `stopped`): the sensors start stopped, e.g. to backfill by hand "
                    "(read when the code location loads)")
    organize_workers: int | None = Field(
        None, ge=1, alias="DICOM_ASSETS_ORGANIZE_WORKERS",
        description="processes reading DICOM headers for a large visit (default: min(2, CPUs))")
    datalad_writer: Literal["direct", "batch"] = Field(
        "direct", alias="DICOM_ASSETS_DATALAD_WRITER",
        description="`direct`: git-annex's records written with one `git fast-import`; `batch`: the reference "
                    "path through DataLad and git-annex's batch commands")

    # --- the cluster profile (DICOM_ASSETS_EXECUTOR=celery, docs/deploy.md) ------------------------
    celery_broker: SecretStr | None = Field(
        None, alias="DICOM_ASSETS_CELERY_BROKER",
        description="the Celery broker (Redis) of the cluster profile, e.g. `redis://:PASSWORD@host:6379/0`; "
                    "read by the run workers and the Celery workers (secret: it may carry a password)")
    celery_backend: SecretStr | None = Field(
        None, alias="DICOM_ASSETS_CELERY_BACKEND",
        description="the Celery result backend (default: the broker)")
    celery_visibility_timeout: float = Field(
        3600.0, gt=0, alias="DICOM_ASSETS_CELERY_VISIBILITY_TIMEOUT",
        description="seconds after which Redis gives a step whose worker vanished (no acknowledgement) to "
                    "another worker; keep it longer than the longest step, which would otherwise run twice")

    # --- the downloads sensor --------------------------------------------------------------------
    sensor_batch: int = Field(SensorLimits.batch, ge=1, alias="DICOM_ASSETS_SENSOR_BATCH",
                              description="run requests (and partition adds) per tick; the rest wait in order")
    sensor_audit: int = Field(SensorLimits.audit, ge=0, alias="DICOM_ASSETS_SENSOR_AUDIT",
                              description="taken dumps signed again per tick (round-robin)")
    sensor_audit_seconds: float = Field(SensorLimits.audit_seconds, ge=0, alias="DICOM_ASSETS_SENSOR_AUDIT_SECONDS",
                                        description="time a tick spends at most on that audit")
    sensor_max_new: int = Field(SensorLimits.max_new, ge=1, alias="DICOM_ASSETS_SENSOR_MAX_NEW",
                                description="new names examined per tick")
    sensor_settle_window: float = Field(SensorLimits.settle_window, ge=0, alias="DICOM_ASSETS_SENSOR_SETTLE_WINDOW",
                                        description="seconds: a session folder changed this recently is listed "
                                                    "again next tick")
    sensor_relist_every: int = Field(SensorLimits.relist_every, ge=1, alias="DICOM_ASSETS_SENSOR_RELIST_EVERY",
                                     description="every session folder is listed at least every N ticks")

    @field_validator("tcia_servers", mode="before")
    @classmethod
    def _comma_separated(cls, value):
        if isinstance(value, str):
            return [s.strip() for s in value.split(",") if s.strip()]
        return value

    @field_validator("sensors", mode="before")
    @classmethod
    def _on_off(cls, value):
        if isinstance(value, str):
            low = value.strip().lower()
            if low in _OFF:
                return "off"
            if low in _ON:
                return "on"
        return value

    # --- what the values mean ------------------------------------------------------------------
    @property
    def xnat_configured(self) -> bool:
        """An XNAT to upload to: ``XNAT_HOST`` is set."""
        return bool(self.xnat_host)

    @property
    def dicom_node_configured(self) -> bool:
        """A DICOM node to follow: ``ORTHANC_URL`` is set."""
        return bool(self.orthanc_url)

    @property
    def celery_urls(self) -> tuple[str, str]:
        """(broker, result backend) of the cluster profile; a named error when the broker is unset."""
        if self.celery_broker is None:
            raise SettingsError("DICOM_ASSETS_CELERY_BROKER is not set: the Celery workers and the run workers "
                                "need the broker's URL (e.g. redis://host:6379/0)")
        broker = self.celery_broker.get_secret_value()
        return broker, (self.celery_backend.get_secret_value() if self.celery_backend is not None else broker)

    def downloads_sensor(self, **overrides) -> SensorLimits:
        """The downloads sensor's limits (``overrides`` that are not None win)."""
        values = {name: getattr(self, f"sensor_{name}") for name in SensorLimits.__dataclass_fields__}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return SensorLimits(**values)


def current() -> Settings:
    """The settings as the environment holds them now (read on every call: cheap, and never stale)."""
    try:
        return Settings()
    except ValidationError as exc:
        raise SettingsError("; ".join(_describe(err) for err in exc.errors())) from None


def _describe(err: dict) -> str:
    name = err["loc"][0] if err.get("loc") else "?"
    field = next((f for f in Settings.model_fields.values() if f.alias == name), None)
    shown = "(hidden)" if field is not None and field.annotation == SecretStr | None else repr(err.get("input"))
    return f"{name}={shown}: {err['msg']}" + (f" ({field.description})" if field is not None and field.description
                                              else "")


def variables() -> list[tuple[str, str, str, str]]:
    """(variable, type, default, description) of every setting, in order (for docs/settings.md)."""
    out = []
    for field in Settings.model_fields.values():
        ann = field.annotation
        kind = {str | None: "text", SecretStr | None: "secret", bool: "true/false", int: "integer",
                int | None: "integer", float: "number"}.get(ann)
        if kind is None:
            args = getattr(ann, "__args__", ())
            kind = " / ".join(f"`{a}`" for a in args) if all(isinstance(a, str) for a in args) and args \
                else "comma-separated list"
        default = field.get_default(call_default_factory=True)
        shown = "" if default in (None, []) else f"`{str(default).lower() if isinstance(default, bool) else default}`"
        out.append((field.alias, kind, shown, field.description or ""))
    return out
