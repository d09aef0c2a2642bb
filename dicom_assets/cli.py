"""``dicom-assets``: command-line helpers around the Dagster project.

  dicom-assets fetch-samples            fetch the real scanner DICOM samples (cached)
  dicom-assets demo-data ROOT           build the demo dataset root (3 participants x 2 sessions)
  dicom-assets corpus OUT --files N     build a large visit of real-derived DICOMs (benchmarks)
  dicom-assets check ROOT               validate global_config.json and the manifest
  dicom-assets status ROOT              print tabular/curation_status.tsv, recomputed
  dicom-assets xnat-upload ROOT --project P [--config exclusions.json]
                                        upload a <subject>/<session>/ tree (classic script layout)

The test servers standing in for XNAT and TCIA (the demo's, the tests') are not part of this
command: ``dicom-assets-testing xnat-server`` / ``nbia-server``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from .core.errors import DicomAssetsError


def _samples(args):
    from .testing.samples import ensure_samples

    return ensure_samples(args.cache, log=lambda m: print(m, file=sys.stderr))


def cmd_fetch_samples(args) -> int:
    s = _samples(args)
    print(s.root)
    return 0


def cmd_demo_data(args) -> int:
    from .core.layout import DatasetLayout
    from .testing.demo import build_demo_dataset

    root = Path(args.root)
    if root.exists() and any(root.iterdir()):
        if not args.force:
            if DatasetLayout(root).config_path.exists():
                print(f"{root}: demo dataset already there (use --force to rebuild)", file=sys.stderr)
                return 0
            print(f"{root}: exists and is not empty; refusing to write into it", file=sys.stderr)
            return 2
        shutil.rmtree(root)
    build_demo_dataset(root, _samples(args), seed=args.seed, slices=args.slices, share=not args.no_share)
    print(root)
    return 0


def cmd_corpus(args) -> int:
    from .testing.demo import build_corpus

    out = build_corpus(args.out, _samples(args), n_files=args.files, file_kb=args.kb, seed=args.seed)
    print(out)
    return 0


def cmd_check(args) -> int:
    from .core.dataset import Dataset

    ds = Dataset.open(args.root)
    print(f"{ds.layout.config_path}: ok ({ds.config.dataset_name}, study {ds.study}, "
          f"sessions {', '.join(ds.config.sessions)})")
    print(f"{ds.layout.manifest_path}: ok ({len(ds.manifest.visits)} visits, "
          f"{len(ds.manifest.participants)} participants)")
    return 0


def cmd_status(args) -> int:
    from .core.curation import update_curation_status
    from .core.dataset import Dataset

    ds = Dataset.open(args.root)
    path = update_curation_status(ds)
    sys.stdout.write(path.read_text())
    unmapped = ds.layout.dicom_node_unmapped_path
    rows = unmapped.read_text(encoding="utf-8").splitlines()[1:] if unmapped.is_file() else []
    if rows:  # studies the DICOM node holds that no visit takes yet: never dropped, listed with why
        sys.stdout.write(f"\n# {len(rows)} study(ies) on the DICOM node map to no visit ({unmapped}):\n")
        sys.stdout.write("\n".join(rows) + "\n")
    return 0


def cmd_xnat_upload(args) -> int:
    """Upload a classic <root>/<subject>/<session>/ tree through the same code as the asset."""
    import xnat as xnatpy

    from .core.dicomscan import Rules
    from .core.organize import classify_tree
    from .core.xnat import (
        XnatError,
        classic_tree_sessions,
        classify_error,
        files_from_records,
        read_exclusions,
        upload_visit,
    )
    from .settings import current

    settings = current()
    server = args.server or settings.xnat_host
    user = settings.xnat_user
    password = settings.xnat_password.get_secret_value() if settings.xnat_password else None
    if not (server and user and password):
        print("error: set XNAT_HOST (or --server), XNAT_USER and XNAT_PASSWORD", file=sys.stderr)
        return 2
    exclude = read_exclusions(args.config)
    try:
        session = xnatpy.connect(server, user=user, password=password, loglevel="ERROR",
                                 verify=settings.xnat_verify and not args.no_verify)
    except Exception as exc:
        print(f"error: {classify_error(exc, server)}", file=sys.stderr)
        return 1
    failures = 0
    try:
        for subject, label, folder in classic_tree_sessions(Path(args.root)):
            records = classify_tree(folder, Rules(exclude_series=exclude))
            files = files_from_records(records, folder)
            skipped = [{"path": r.source, "reason": r.reason} for r in records if r.decision != "kept"]
            try:
                res = upload_visit(session, server=server, project=args.project, subject=subject,
                                   session_label=label, files=files, excluded=skipped, metadata_files=[],
                                   policy=args.policy)
                print(f"{subject}/{label}: {res.status}, {res.files_sent} files sent, "
                      f"{len(skipped)} files left out, scans {', '.join(s['scan'] for s in res.scans)}")
                for w in res.warnings:
                    print(f"{subject}/{label}: warning: {w}", file=sys.stderr)
            except XnatError as exc:
                failures += 1
                print(f"{subject}/{label}: FAILED: {exc}", file=sys.stderr)
    finally:
        session.disconnect()
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dicom-assets", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", help="cache folder for the real DICOM samples ($DICOM_ASSETS_CACHE)")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("fetch-samples", help="fetch the real DICOM samples from PyPI").set_defaults(fn=cmd_fetch_samples)
    d = sub.add_parser("demo-data", help="build the demo dataset root")
    d.add_argument("root")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--slices", type=int, default=8, help="slices per volume series")
    d.add_argument("--force", action="store_true", help="rebuild an existing root")
    d.add_argument("--no-share", action="store_true",
                   help="leave the de-identified copy (deid in global_config.json) off; it is on in the demo")
    d.set_defaults(fn=cmd_demo_data)
    c = sub.add_parser("corpus", help="build a large visit for benchmarks")
    c.add_argument("out")
    c.add_argument("--files", type=int, default=2000)
    c.add_argument("--kb", type=int, default=256, help="approximate file size in KiB")
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(fn=cmd_corpus)
    k = sub.add_parser("check", help="validate global_config.json and the manifest")
    k.add_argument("root")
    k.set_defaults(fn=cmd_check)
    s = sub.add_parser("status", help="recompute and print the curation status")
    s.add_argument("root")
    s.set_defaults(fn=cmd_status)
    u = sub.add_parser("xnat-upload", help="upload a <root>/<subject>/<session>/ tree to XNAT")
    u.add_argument("root")
    u.add_argument("--project", required=True)
    u.add_argument("--config", type=Path, help='exclusions file: {"Exclude": ["Localizers", ...]}')
    u.add_argument("--server", help="XNAT URL (default $XNAT_HOST); user and password from $XNAT_USER/$XNAT_PASSWORD")
    u.add_argument("--policy", choices=("skip", "append", "fail"), default="fail",
                   help="when the session exists with other content")
    u.add_argument("--no-verify", action="store_true", help="do not verify TLS certificates")
    u.set_defaults(fn=cmd_xnat_upload)
    args = p.parse_args(argv)
    try:
        return args.fn(args)
    except DicomAssetsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
