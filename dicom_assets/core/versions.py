"""Data versions of the chain's products: short strings that change exactly when the product
changes, computed from what each step writes (no Dagster import: ``defs/`` turns them into
``DataVersion``; docs/decisions.md, "Lineage", says what each one is and why).

- a visit's dump(s) in ``downloads/``: :func:`dump_version` of each item's path and signature
  (size, mtime, file count), the value the downloads sensor observes and ``raw_dicoms`` extracted;
- ``organized_dicoms``: :func:`kept_version`, the kept (SOPInstanceUID, size) list;
- ``visit_tarball``: the tarball's sha256; ``visit_metadata``: the md5 of the dicoms JSON;
- ``datalad_dataset``: its commit; ``xnat_session``: :func:`xnat_version` (session + scan counts);
- ``bids_session``: :func:`digests_version` of the session folder's file digests, the ones
  ``core.bids.convert_visit`` computed (and records in ``logs/bids/<visit>.json``), so the
  session is hashed once per run; :func:`tree_version` is the same value read from disk.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

from .fsutil import tree_digests


def _sha256_lines(lines: Iterable[str]) -> str:
    h = hashlib.sha256()
    for line in lines:
        h.update(line.encode("utf-8", "surrogateescape"))
        h.update(b"\n")
    return h.hexdigest()


def dump_version(items: Iterable[tuple[str, str]]) -> str:
    """A visit's dump(s): ``(path under downloads/, signature token)`` pairs, in any order.
    Same dumps, untouched: same version; a dump re-delivered, grown, renamed or added: another."""
    return "dump-" + _sha256_lines(f"{rel}\t{token}" for rel, token in sorted(items))[:32]


def kept_version(kept: Iterable[tuple[str, int]]) -> str:
    """The kept DICOMs of a visit: ``(SOPInstanceUID, size in bytes)`` pairs, in any order.

    A re-extracted identical dump gives the same version, so nothing after ``organized_dicoms``
    needs to run; a file added, dropped, excluded or of another size gives another. (md5 is not
    read here: organize reads headers only, and hashing every byte again would double its reads;
    the tarball's sha256, the next version, covers the content.)"""
    return "kept-" + _sha256_lines(f"{uid}\t{size}" for uid, size in sorted(kept))[:32]


def xnat_version(session: str, scans: dict[str, int]) -> str:
    """An XNAT session: its id (URI) and the file count of each scan, as XNAT reports them."""
    counts = json.dumps({str(k): int(v) for k, v in scans.items()}, sort_keys=True, separators=(",", ":"))
    return f"{session.rstrip('/').rsplit('/', 1)[-1]}:" + hashlib.sha256(counts.encode()).hexdigest()[:16]


def digests_version(digests: dict[str, str]) -> str:
    """A folder's files given as ``{relative POSIX path: sha256 of the content}`` (what
    ``fsutil.tree_digests`` returns): same names and bytes, same version."""
    return "files-" + _sha256_lines(sorted(f"{rel}\t{digest}" for rel, digest in digests.items()))[:32]


def tree_version(root: Path) -> str:
    """Every file under ``root``: relative path and sha256 of its content (links followed);
    :func:`digests_version` of ``root`` read now."""
    return digests_version(tree_digests(root))
