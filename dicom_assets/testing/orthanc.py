"""A real Orthanc (the Debian package's ``/usr/sbin/Orthanc``) on loopback, for the tests, the
demo and the bench: its own free HTTP and DICOM ports, its own storage and index folder,
credentials, ``StableAge``, and the peers it knows (a second Orthanc acting as the clinical
PACS for query/retrieve). And dcmtk's ``storescu``, as a scanner console pushes a study.

This starts the real server; nothing of Orthanc is imitated here.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from .dagster_dev import free_port

ORTHANC_CANDIDATES = ("/usr/sbin/Orthanc", "/usr/bin/Orthanc")


def orthanc_binary() -> str | None:
    found = shutil.which("Orthanc")
    return found or next((p for p in ORTHANC_CANDIDATES if os.access(p, os.X_OK)), None)


def dicom_env() -> dict[str, str]:
    """The environment for dcmtk's network code (storescu, and Orthanc's DICOM server, which is
    built on it): ``TCP_NODELAY=1``. Measured here: without it on both ends, every C-STORE waits
    out Nagle's algorithm against the peer's delayed ACK, about 90 ms per instance (2,000 small
    instances: 180 s instead of about 3 s)."""
    return {**os.environ, "TCP_NODELAY": "1"}


def missing_tools() -> list[str]:
    """What of Orthanc and dcmtk is not installed (``scripts/system-deps.sh`` installs both)."""
    out = [] if orthanc_binary() else ["orthanc"]
    if any(not shutil.which(t) for t in ("storescu", "storescp")):
        out.append("dcmtk")
    return out


@dataclass
class OrthancNode:
    """One Orthanc process. ``peers``: name -> (AET, port) of the DICOM modalities it may talk to."""

    workdir: Path
    aet: str = "DANODE"
    user: str = "dicom-assets"
    password: str = "orthanc-test"
    stable_age: int = 2
    peers: dict[str, tuple[str, int]] = field(default_factory=dict)
    http_port: int = 0
    dicom_port: int = 0
    extra: dict = field(default_factory=dict)
    proc: subprocess.Popen | None = None

    def __post_init__(self):
        self.workdir = Path(self.workdir)
        self.http_port = self.http_port or free_port()
        self.dicom_port = self.dicom_port or free_port()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def config_path(self) -> Path:
        return self.workdir / "orthanc.json"

    @property
    def log_path(self) -> Path:
        return self.workdir / "orthanc.log"

    def config(self) -> dict:
        return {
            "Name": f"dicom-assets {self.aet}",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "storage"),
            "HttpPort": self.http_port, "HttpBindAddress": "127.0.0.1",
            "DicomPort": self.dicom_port, "DicomBindAddress": "127.0.0.1", "DicomAet": self.aet,
            "DicomCheckCalledAet": True,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": True,
            "RegisteredUsers": {self.user: self.password},
            "StableAge": self.stable_age,
            "DicomModalities": {name: [aet, "127.0.0.1", port] for name, (aet, port) in self.peers.items()},
            "DicomAlwaysAllowStore": True, "DicomAlwaysAllowFind": True, "DicomAlwaysAllowMove": True,
            "Plugins": [], "HttpCompressionEnabled": False,
            **self.extra,
        }

    def start(self, timeout: float = 30) -> OrthancNode:
        binary = orthanc_binary()
        if binary is None:
            raise RuntimeError("Orthanc is not installed (Debian package orthanc; scripts/system-deps.sh)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config(), indent=2))
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([binary, str(self.config_path)], stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True, env=dicom_env())
        log.close()
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 30) -> None:
        import requests

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited ({self.proc.returncode}): {self.log_tail()}")
            try:
                if requests.get(self.url + "/system", auth=(self.user, self.password), timeout=2).ok:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"Orthanc did not answer on {self.url} within {timeout} s: {self.log_tail()}")

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def client(self, **kw):
        from ..core.dicomnode import OrthancClient

        return OrthancClient(self.url, self.user, self.password, **kw)

    def env(self) -> dict[str, str]:
        """What points dicom-assets at this node."""
        return {"ORTHANC_URL": self.url, "ORTHANC_USER": self.user, "ORTHANC_PASSWORD": self.password}

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def storescu(node_port: int, called_aet: str, paths: list[Path] | Path, *, calling_aet: str = "SCANNER",
             check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    """dcmtk's storescu: push files or folders (recursively) over DICOM C-STORE, as a console does."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    cmd = ["storescu", "-aet", calling_aet, "-aec", called_aet, "+sd", "+r", "-nh", "127.0.0.1", str(node_port),
           *map(str, paths)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=dicom_env())
    if check and done.returncode != 0:
        raise RuntimeError(f"storescu failed ({done.returncode}): {done.stderr[-2000:]}")
    return done
