"""``XnatTestServer``: the XNAT test server's state and importer behind an HTTP front end
(start, stop, fault injection, a reverse proxy's timeout), and ``serve_forever`` for
``dicom-assets-testing xnat-server``."""

from __future__ import annotations

import base64
import json
import re
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from .importer import Importer, ImportHandlers
from .routes import Routes
from .state import VERSION, XnatState, _HttpError, status_page


class XnatTestServer(Importer, XnatState):
    """The server's state, HTTP front end and fault switches."""

    def __init__(self, schemas_dir: Path, user: str = "admin", password: str = "admin",
                 host: str = "127.0.0.1", port: int = 0, storage: Path | None = None,
                 can_create_projects: bool = True):
        super().__init__(schemas_dir, user, password, storage=storage, can_create_projects=can_create_projects)
        handler = type("Handler", (_Handler,), {"xnat": self})
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.thread: threading.Thread | None = None
        self._workers: list[threading.Thread] = []

    # ---------------------------------------------------------------- lifecycle
    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "XnatTestServer":
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self._rebuilder_stop.set()
        if self._rebuilder is not None:
            self._rebuilder.join(timeout=30)
        self.httpd.shutdown()
        self.httpd.server_close()
        for t in list(self._workers):
            t.join(timeout=30)


class _Handler(ImportHandlers, Routes, BaseHTTPRequestHandler):
    xnat: XnatTestServer
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # quiet
        pass

    # ------------------------------------------------------------------ plumbing
    def _send(self, status: int, body: bytes | str | dict | list = b"", ctype: str | None = None,
              headers: dict | None = None) -> None:
        """Record the answer; _dispatch writes it (or a proxy's 504 if it came too late)."""
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            ctype = ctype or "application/json"
        elif isinstance(body, str):
            body = body.encode()
            ctype = ctype or "text/plain"
        self._answer = (status, body, ctype or "text/plain", headers or {})

    def _write(self, status: int, body: bytes, ctype: str, headers: dict) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(n) if n else b""

    def _user(self) -> str | None:
        cookie = self.headers.get("Cookie", "")
        m = re.search(r"JSESSIONID=([^;\s]+)", cookie)
        if m and m.group(1) in self.xnat.tokens:
            return self.xnat.tokens[m.group(1)]
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            try:
                user, _, pw = base64.b64decode(auth[6:]).decode().partition(":")
            except ValueError:
                return None
            if self.xnat.users.get(user) == pw:
                return user
        return None

    def _dispatch(self) -> None:
        x = self.xnat
        url = urlparse(self.path)
        path = url.path.rstrip("/") or "/"
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        x.requests.append((self.command, path))
        if self.command == "POST" and x._take_fault(path, ("drop_mid_stream",)):
            return self._drop_mid_stream(path, query)
        body = self._body() if self.command in ("PUT", "POST") else b""
        fault = x._take_fault(path, ("drop", "slow", "500", "502", "503", "504"))
        if fault == "drop":
            self.close_connection = True
            self.connection.shutdown(2)
            return
        if fault == "slow":
            time.sleep(x.slow_seconds)
        elif fault in ("500", "502", "503", "504"):
            self._write(int(fault), f"<html><h3>Injected error {fault}</h3></html>".encode(), "text/html", {})
            return
        self._answer = None
        worker = threading.Thread(target=self._run_route, args=(self.command, path, query, body), daemon=True)
        with x.lock:
            x._workers = [t for t in x._workers if t.is_alive()] + [worker]
        worker.start()
        worker.join(x.proxy_timeout)
        if worker.is_alive():  # the reverse proxy gives up; the server carries on
            self.close_connection = True
            self._write(504, b"<html><head><title>504 Gateway Time-out</title></head><body><center><h1>504 "
                             b"Gateway Time-out</h1></center><hr><center>nginx</center></body></html>",
                        "text/html", {})
            return
        self._write(*(self._answer or (500, b"no answer", "text/plain", {})))

    def _run_route(self, method: str, path: str, query: dict, body: bytes) -> None:
        try:
            self._route(method, path, query, body)
        except _HttpError as exc:
            if exc.page:
                self._send(exc.status, status_page(exc.status, exc.message), "text/html")
            else:
                self._send(exc.status, exc.message)
        except Exception as exc:  # a bug here must show as a 500, like a Java stack trace would
            self._send(500, f"Internal server error: {type(exc).__name__}: {exc}")

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _dispatch


def serve_forever(schemas_dir: Path, host: str, port: int, user: str, password: str) -> None:
    server = XnatTestServer(schemas_dir, user, password, host, port)
    print(f"XNAT test server (API of XNAT {VERSION}) on {server.url}  user={user}  storage={server.storage}",
          flush=True)
    try:
        server.httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()
        shutil.rmtree(server.storage, ignore_errors=True)
