"""Every resource: the dataset root, the site's XNAT, the NBIA servers of TCIA."""

from contextlib import contextmanager
from pathlib import Path

from dagster import ConfigurableResource
from pydantic import Field

from ..core.dataset import Dataset
from ..core.tcia import DEFAULT_API_VERSION, PUBLIC_SERVERS, NbiaClient, TciaManifest, manifest_servers
from ..core.xnat import XnatAuthError, XnatError, classify_error
from ..settings import current


def default_dataset_root() -> str:
    """``$DICOM_ASSETS_ROOT``, else the demo root of a source checkout (``.demo/dataset``)."""
    env = current().dataset_root
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
        """The dataset, or a Failure naming the root and the machine and process that cannot see
        it (on a cluster: a worker whose shared filesystem is not mounted at that path)."""
        if not Path(self.root).is_dir():
            from dagster import Failure

            from .cluster import worker_identity

            raise Failure(f"dataset root {self.root} does not exist on worker {worker_identity()} (host:pid): "
                          "mount the shared dataset root there at the same path (DICOM_ASSETS_ROOT), then "
                          "re-execute the run from failure")
        return Dataset.open(self.root)


class XnatResource(ConfigurableResource):
    """The site's XNAT. A field left unset is read from the environment when a step connects
    (``XNAT_HOST``, ``XNAT_USER``, ``XNAT_PASSWORD``, ``XNAT_VERIFY``; ``dicom_assets.settings``),
    so the code location holds no secret in its resource config and needs no XNAT to load;
    ``configured`` tells a step whether there is an XNAT to upload to."""

    server: str | None = Field(default=None, description="XNAT base URL, e.g. https://xnat.example.org "
                                                         "(default: XNAT_HOST)")
    user: str | None = Field(default=None, description="XNAT user (default: XNAT_USER)")
    password: str | None = Field(default=None, description="XNAT password (default: XNAT_PASSWORD)")
    verify: bool | None = Field(default=None, description="verify TLS certificates (default: XNAT_VERIFY, true)")
    timeout: int = Field(default=600, description="seconds before an upload request times out")

    @property
    def url(self) -> str | None:
        """The XNAT base URL, None when none is configured."""
        return self.server or current().xnat_host

    @property
    def configured(self) -> bool:
        return bool(self.url)

    @contextmanager
    def connect(self):
        session = self.login()
        try:
            yield session
        finally:
            try:
                session.disconnect()
            except Exception:  # the step's own outcome is what counts; closing is best effort
                pass

    def login(self):
        """A new xnatpy session (the caller disconnects it); raises XnatError subclasses."""
        import xnat

        settings = current()
        server = self.url
        if not server:
            raise XnatError("no XNAT configured: set XNAT_HOST (and XNAT_USER, XNAT_PASSWORD)")
        user = self.user or settings.xnat_user
        password = self.password
        if password is None and settings.xnat_password is not None:
            password = settings.xnat_password.get_secret_value()
        if not (user and password):
            raise XnatAuthError(f"{server}: no XNAT credentials: set XNAT_USER and XNAT_PASSWORD")
        verify = settings.xnat_verify if self.verify is None else self.verify
        try:
            return xnat.connect(server, user=user, password=password, verify=verify, loglevel="ERROR",
                                default_timeout=self.timeout)
        except Exception as exc:  # xnatpy's and requests' errors, named for the user
            raise classify_error(exc, server) from None


class TciaResource(ConfigurableResource):
    """The NBIA servers that serve TCIA's series, and how to use their REST API.

    A ``.tcia`` manifest names its server (``downloadServerUrl``): its series are asked there,
    if it is one of ``servers`` (one of TCIA's retired hosts: at TCIA's public servers); a CSV
    export names none and goes to each of ``servers`` in turn. Fields left unset are read from
    the environment when a step uses them (``TCIA_SERVERS``, ``TCIA_API_VERSION``,
    ``TCIA_RETRY_WINDOW``)."""

    servers: list[str] | None = Field(default=None,
                                      description="NBIA servers manifests may name; the first is the default "
                                                  "(default: TCIA_SERVERS, comma-separated, else TCIA's public ones)")
    api_version: str | None = Field(default=None,
                                    description="NBIA REST API version: v4 (tcia_utils') or v1 (the Data "
                                                f"Retriever's) (default: TCIA_API_VERSION, else {DEFAULT_API_VERSION})")
    workers: int = Field(default=2, description="series downloaded in parallel")
    retries: int = Field(default=4, description="retries of a series that fails (a 500, a cut-off stream, a zip "
                                                "that does not verify), with exponential backoff")
    backoff: float = Field(default=1.0, description="seconds before the first retry")
    retry_window: float | None = Field(default=None,
                                       description="seconds a request is retried while the server is away "
                                                   "(default: TCIA_RETRY_WINDOW)")
    public_servers: list[str] | None = Field(default=None,
                                             description="where a manifest naming one of TCIA's retired hosts "
                                                         "(public., services.) is asked (default: TCIA's public "
                                                         "servers; a mirror's)")
    max_backoff: float = Field(default=60.0, description="the longest wait between two attempts (unless the "
                                                         "server's Retry-After asks for more)")

    def allowed_servers(self) -> list[str]:
        return list(self.servers or current().tcia_servers or PUBLIC_SERVERS)

    def clients(self, manifest: TciaManifest) -> list[NbiaClient]:
        """One client per server the manifest's series are asked at, in order."""
        settings = current()
        version = self.api_version or settings.tcia_api_version
        if version not in ("v4", "v1"):
            raise ValueError(f"TciaResource.api_version must be v4 or v1, not {version!r}")
        window = settings.tcia_retry_window if self.retry_window is None else self.retry_window
        return [NbiaClient(s, version, retries=self.retries, backoff=self.backoff, retry_window=window,
                           max_backoff=self.max_backoff) for s in manifest_servers(manifest, self.allowed_servers(),
                                                                   self.public_servers or PUBLIC_SERVERS)]
