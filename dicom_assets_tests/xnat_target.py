"""The XNAT the contract tests upload to: the XNAT-compatible test server on loopback by
default, or a real XNAT when ``XNAT_TEST_URL``, ``XNAT_TEST_USER`` and ``XNAT_TEST_PASSWORD`` are
set (a site checks its own XNAT before going live). The tests see either only through XNAT's REST
API, as xnatpy does; a test that needs what only the test server can do (inject a fault, switch
on an anonymization script, open a workflow) asks for ``target.server`` through
:meth:`XnatTarget.test_server`, which skips on a real XNAT and says why.

On a real XNAT every project is named ``<XNAT_TEST_PROJECT_PREFIX or DATEST>_<random>_<name>``,
created by the test and deleted (with its data) after it; the user needs the right to create
projects. Nothing else on the XNAT is touched.
"""

from __future__ import annotations

import os
import secrets
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest

URL_ENV, USER_ENV, PASSWORD_ENV, PREFIX_ENV = ("XNAT_TEST_URL", "XNAT_TEST_USER", "XNAT_TEST_PASSWORD",
                                               "XNAT_TEST_PROJECT_PREFIX")


@dataclass
class XnatTarget:
    url: str
    user: str
    password: str
    server: object | None = None  # the XnatTestServer, None on a real XNAT
    run_id: str = field(default_factory=lambda: secrets.token_hex(3))
    created: list[str] = field(default_factory=list)

    @property
    def real(self) -> bool:
        return self.server is None

    def project(self, name: str) -> str:
        """A project ID for this test: as given on the test server, unique on a real XNAT."""
        if not self.real:
            return name
        pid = f"{os.environ.get(PREFIX_ENV) or 'DATEST'}_{self.run_id}_{name}"
        self.created.append(pid)
        return pid

    def test_server(self, why: str):
        """The test server, for what only it can do; on a real XNAT the test is skipped."""
        if self.real:
            pytest.skip(f"needs the XNAT test server ({why}); not possible against {self.url}")
        return self.server

    @contextmanager
    def connect(self):
        import xnat

        s = xnat.connect(self.url, user=self.user, password=self.password, loglevel="ERROR")
        try:
            yield s
        finally:
            try:
                s.disconnect()
            except Exception:  # a login XNAT already ended (a test of that) cannot be closed
                pass

    def cleanup(self) -> None:
        if not self.created:
            return
        import requests

        for pid in self.created:
            # 400 or 404 (an HTML status page): never created (a test that refused before sending), or gone already
            requests.delete(f"{self.url}/data/projects/{pid}", params={"removeFiles": "true"},
                            auth=(self.user, self.password), timeout=120)


@pytest.fixture
def xnat_target(samples, tmp_path):
    url = os.environ.get(URL_ENV)
    if url:
        user, password = os.environ.get(USER_ENV), os.environ.get(PASSWORD_ENV)
        if not (user and password):
            pytest.fail(f"{URL_ENV} is set: set {USER_ENV} and {PASSWORD_ENV} too")
        target = XnatTarget(url.rstrip("/"), user, password)
        yield target
        target.cleanup()
        return
    from dicom_assets.testing.xnat import XnatTestServer

    user, password = "site-uploader", "pw-" + secrets.token_hex(8)
    srv = XnatTestServer(samples.xnat_schemas, user, password, storage=tmp_path / "xnat-storage").start()
    yield XnatTarget(srv.url, user, password, server=srv)
    srv.stop()
