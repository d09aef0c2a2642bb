"""Every resource: the dataset root, the site's XNAT, the NBIA servers of TCIA."""

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from dagster import ConfigurableResource
from pydantic import Field

from ..core.layout import Dataset
from ..core.tcia import DEFAULT_API_VERSION, PUBLIC_SERVERS, NbiaClient, TciaManifest, manifest_server
from ..core.xnat_upload import classify_error


def default_dataset_root() -> str:
    """``$DICOM_ASSETS_ROOT``, else the demo root of a source checkout (``.demo/dataset``)."""
    env = os.environ.get("DICOM_ASSETS_ROOT")
    if env:
        return env
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "pyproject.toml").is_file():
        return str(checkout / ".demo" / "dataset")
    return str(Path.cwd() / "dicom-assets-demo")


class DatasetResource(ConfigurableResource):
    """The dataset root; every path under it comes from ``core.layout``."""

    root: str = Field(description="Dataset root folder (global_config.json, downloads/, dicom/, store/ ...)")

    def open(self) -> Dataset:
        return Dataset.open(self.root)


class XnatResource(ConfigurableResource):
    """The site's XNAT: URL, user and password from environment variables (never logged)."""

    server: str = Field(description="XNAT base URL, e.g. https://xnat.example.org (XNAT_HOST)")
    user: str = Field(description="XNAT user (XNAT_USER)")
    password: str = Field(description="XNAT password (XNAT_PASSWORD)")
    verify: bool = Field(default=True, description="verify TLS certificates")
    timeout: int = Field(default=600, description="seconds before an upload request times out")

    @contextmanager
    def connect(self):
        import xnat

        try:
            session = xnat.connect(self.server, user=self.user, password=self.password, verify=self.verify,
                                   loglevel="ERROR", default_timeout=self.timeout)
        except Exception as exc:
            raise classify_error(exc, self.server) from None
        try:
            yield session
        finally:
            try:
                session.disconnect()
            except Exception:
                pass


def xnat_resource_from_env() -> XnatResource:
    from dagster import EnvVar

    return XnatResource(server=EnvVar("XNAT_HOST"), user=EnvVar("XNAT_USER"), password=EnvVar("XNAT_PASSWORD"),
                        verify=os.environ.get("XNAT_VERIFY", "true").lower() != "false")


class TciaResource(ConfigurableResource):
    """The NBIA servers that serve TCIA's series, and how to use their REST API.

    A ``.tcia`` manifest names its server (``downloadServerUrl``): its series are asked there,
    if it is one of ``servers``; a CSV export names none and goes to the first of ``servers``."""

    servers: list[str] = Field(default=list(PUBLIC_SERVERS),
                               description="NBIA servers manifests may name; the first is the default (TCIA_SERVERS, "
                                           "comma-separated)")
    api_version: Literal["v4", "v1"] = Field(default=DEFAULT_API_VERSION,
                                             description="NBIA REST API version: v4 (default, tcia_utils') or v1 "
                                                         "(the Data Retriever's) (TCIA_API_VERSION)")
    workers: int = Field(default=2, description="series downloaded in parallel")
    retries: int = Field(default=4, description="retries of a failing series, with exponential backoff")
    backoff: float = Field(default=1.0, description="seconds before the first retry")

    def client(self, manifest: TciaManifest) -> NbiaClient:
        return NbiaClient(manifest_server(manifest, self.servers), self.api_version, retries=self.retries,
                          backoff=self.backoff)


def tcia_resource_from_env() -> TciaResource:
    servers = [s.strip() for s in os.environ.get("TCIA_SERVERS", "").split(",") if s.strip()]
    return TciaResource(servers=servers or list(PUBLIC_SERVERS),
                        api_version=os.environ.get("TCIA_API_VERSION", DEFAULT_API_VERSION))
