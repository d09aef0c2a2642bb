"""``dicom-assets-testing``: the servers that stand in for a site's XNAT and for TCIA on
loopback (the demo's and the tests'). Kept apart from the ``dicom-assets`` command, which a
site runs in production.

  dicom-assets-testing xnat-server     the XNAT-compatible test server (password from $XNAT_PASSWORD)
  dicom-assets-testing nbia-server     the NBIA-compatible (TCIA) test server
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .samples import ensure_samples


def _samples(args):
    return ensure_samples(args.cache, log=lambda m: print(m, file=sys.stderr))


def cmd_xnat_server(args) -> int:
    from .xnat import serve_forever

    password = os.environ.get(args.password_env)
    if not password:
        print(f"error: set the password in ${args.password_env}", file=sys.stderr)
        return 2
    serve_forever(_samples(args).xnat_schemas, args.host, args.port, args.user, password)
    return 0


def cmd_nbia_server(args) -> int:
    from ..core.fsutil import atomic_write
    from .nbia_server import NbiaTestServer, build_collection, manifest_text

    collection = build_collection(_samples(args), {"TCIA-A": 1, "TCIA-B": 3})
    with NbiaTestServer(series=collection, host=args.host, port=args.port) as server:
        print(f"NBIA test server: {server.server_url} (API {server.api('v4')}, {len(collection)} series)",
              file=sys.stderr, flush=True)
        if args.manifest_out:
            out = Path(args.manifest_out)
            text = manifest_text(list(collection), server.server_url, basket_id="manifest-demo-basket.tcia")
            if not out.is_file() or out.read_text() != text:  # unchanged: the sensor sees no new manifest
                with atomic_write(out) as fh:
                    fh.write(text)
            print(f"manifest: {out}", file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dicom-assets-testing", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", help="cache folder for the real DICOM samples ($DICOM_ASSETS_CACHE)")
    sub = p.add_subparsers(dest="cmd", required=True)
    x = sub.add_parser("xnat-server", help="run the XNAT-compatible test server on loopback")
    x.add_argument("--host", default="127.0.0.1")
    x.add_argument("--port", type=int, default=8080)
    x.add_argument("--user", default="demo")
    x.add_argument("--password-env", default="XNAT_PASSWORD",
                   help="environment variable holding the password (never a command-line argument)")
    x.set_defaults(fn=cmd_xnat_server)
    n = sub.add_parser("nbia-server", help="run the NBIA-compatible (TCIA) test server on loopback")
    n.add_argument("--host", default="127.0.0.1")
    n.add_argument("--port", type=int, default=8089)
    n.add_argument("--manifest-out", help="write a .tcia manifest of the served series here (as TCIA's portal "
                   "writes it, downloadServerUrl naming this server; set TCIA_SERVERS to allow it)")
    n.set_defaults(fn=cmd_nbia_server)
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
