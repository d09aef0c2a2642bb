"""``dicom-assets-testing``: the servers that stand in for a site's XNAT and for TCIA on
loopback (the demo's and the tests'). Kept apart from the ``dicom-assets`` command, which a
site runs in production.

  dicom-assets-testing xnat-server     the XNAT-compatible test server (password from $XNAT_PASSWORD)
  dicom-assets-testing nbia-server     the NBIA-compatible (TCIA) test server
  dicom-assets-testing orthanc-node    a real Orthanc as the DICOM node, and a visit pushed to it
                                       with storescu, as a scanner console does
  dicom-assets-testing cluster         Redis, PostgreSQL and Celery workers on loopback (the cluster
                                       profile, `make demo-cluster`)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .nbia_server import RELEASES
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

    collection = build_collection(_samples(args), {"TCIA-A": 1, "TCIA-B": 3}, annotated=True)
    with NbiaTestServer(series=collection, host=args.host, port=args.port, release=args.release) as server:
        print(f"NBIA test server: {server.server_url} (API {server.api('v4')}, NBIA of {args.release}, "
              f"{len(collection)} series)",
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


def cmd_orthanc_node(args) -> int:
    import signal

    from .demo import visit_spec, write_node_push
    from .orthanc import OrthancNode, missing_tools, storescu

    missing = missing_tools()
    if missing:
        print(f"no DICOM node: not installed: {', '.join(missing)} (scripts/system-deps.sh installs them)",
              file=sys.stderr)
        return 3
    password = os.environ.get(args.password_env)
    if not password:
        print(f"error: set the password in ${args.password_env}", file=sys.stderr)
        return 2
    node = OrthancNode(Path(args.workdir), aet=args.aet, user=args.user, password=password,
                       http_port=args.http_port, dicom_port=args.dicom_port, stable_age=args.stable_age).start()
    signal.signal(signal.SIGTERM, lambda *_: (node.stop(), sys.exit(0)))
    print(f"DICOM node (Orthanc): {node.url}, AE title {node.aet} on port {node.dicom_port}", file=sys.stderr,
          flush=True)
    try:
        for visit in args.push:
            participant, session = visit.split("/", 1)
            folder = Path(args.workdir) / "push" / f"{participant}_{session}"
            if not folder.is_dir():
                write_node_push(folder, _samples(args), visit_spec(participant, session, 0))
            storescu(node.dicom_port, node.aet, folder, calling_aet="DEMO_SCANNER")
            print(f"pushed {participant} {session} with storescu ({len(list(folder.iterdir()))} files)",
                  file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)
    finally:
        node.stop()


#: what the workers of `cluster` get from this process's environment (the steps they run need them)
WORKER_PASS = ("XNAT_HOST", "XNAT_USER", "XNAT_PASSWORD", "XNAT_VERIFY", "TCIA_SERVERS", "TCIA_API_VERSION",
               "ORTHANC_URL", "ORTHANC_USER", "ORTHANC_PASSWORD", "DICOM_ASSETS_DEID_KEY", "DICOM_ASSETS_DEID_MAP")


def cmd_cluster(args) -> int:
    import signal

    from .cluster import Cluster, WorkerSpec, missing

    why = missing()
    if why:
        print(f"no cluster: {why}", file=sys.stderr)
        return 3
    passed = {k: os.environ[k] for k in WORKER_PASS if os.environ.get(k)}
    specs = [WorkerSpec(f"worker{i + 1}", tuple(args.queues.split(",")), concurrency=args.concurrency)
             for i in range(args.workers)]
    cluster = Cluster(Path(args.workdir), Path(args.root), workers=specs, extra_env=passed)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        cluster.start()
        out = Path(args.env_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        # the daemon's host needs these (passwords included): a file only its owner reads
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            for k, v in cluster.env().items():
                fh.write(f"export {k}='{v}'\n")
        for w in cluster.workers.values():
            print(f"Celery worker {w.hostname} (pid {w.pid}, queues {','.join(w.spec.queues)}): {w.log}",
                  file=sys.stderr, flush=True)
        print(f"Redis on 127.0.0.1:{cluster.redis.port}, PostgreSQL on 127.0.0.1:{cluster.postgres.port}; "
              f"environment for the daemon: {out}", file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)
    finally:
        cluster.stop()


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
    n.add_argument("--release", default="2025-11", choices=sorted(RELEASES),
                   help="the NBIA deployed: 2025-11 (today's), 2025-04 (no IncludeMD5), 2025-03 (v4 getSeries "
                        "only), 9.0 (the last release tag: no v4)")
    n.add_argument("--manifest-out", help="write a .tcia manifest of the served series here (as TCIA's portal "
                   "writes it, downloadServerUrl naming this server; set TCIA_SERVERS to allow it)")
    n.set_defaults(fn=cmd_nbia_server)
    o = sub.add_parser("orthanc-node", help="run a real Orthanc on loopback as the DICOM node")
    o.add_argument("--workdir", required=True, help="its storage, index, config and log")
    o.add_argument("--aet", default="DANODE", help="its AE title")
    o.add_argument("--http-port", type=int, default=8042)
    o.add_argument("--dicom-port", type=int, default=4242)
    o.add_argument("--stable-age", type=int, default=5, help="seconds without a new instance before a study is stable")
    o.add_argument("--user", default="demo")
    o.add_argument("--password-env", default="ORTHANC_PASSWORD",
                   help="environment variable holding the password (never a command-line argument)")
    o.add_argument("--push", action="append", default=[], metavar="PARTICIPANT/SESSION",
                   help="push this demo visit with storescu once the node is up (repeatable)")
    o.set_defaults(fn=cmd_orthanc_node)
    c = sub.add_parser("cluster", help="Redis, PostgreSQL and Celery workers on loopback (the cluster profile)")
    c.add_argument("--root", required=True, help="the dataset root (the shared path every worker sees)")
    c.add_argument("--workdir", required=True, help="Redis's folder, each worker's folder and HOME")
    c.add_argument("--workers", type=int, default=2)
    c.add_argument("--queues", default="dagster,cpu,xnat", help="the queues every worker takes")
    c.add_argument("--concurrency", type=int, default=1, help="pool processes per worker")
    c.add_argument("--env-out", required=True,
                   help="write the daemon's environment here (export lines, mode 0600: it holds passwords)")
    c.set_defaults(fn=cmd_cluster)
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
