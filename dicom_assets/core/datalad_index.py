"""A DataLad dataset per visit that indexes the DICOMs inside the visit tarball.

Nothing is copied: every DICOM is an annexed file whose key is its md5-based key
(``MD5-s<size>--<md5>``, taken from ``<visit>_metadata_dicoms.json``), and whose content
git-annex knows how to obtain:

- the tarball key (``MD5E-s<size>--<md5>.tar``) has the tarball's store location as URL,
  claimed by datalad-next's ``uncurl`` special remote (``file://`` or ``http(s)://``);
- each DICOM key has a ``dl+archive:<tarball key>#path=<member>&size=<n>&atype=tar`` URL,
  claimed by datalad-next's ``archivist`` special remote, which fetches the tarball through
  ``uncurl`` and extracts the member.

Both special remotes are initialized with ``autoenable=true``, so a plain ``datalad clone``
of the dataset (from its folder, or from the deposit in the store) can ``datalad get`` any
DICOM with no further setup. By default every record is written directly in git-annex's own
formats with one ``git fast-import`` (``core/annexwrite.py``; no git-annex or DataLad process);
the reference path records everything with ``datalad create``, ``initremote`` and git-annex's batch
commands (``writer="batch"`` or ``DICOM_ASSETS_DATALAD_WRITER=batch``), and the tests check that
both write the same records.

The dataset is also deposited in the store beside the tarball, in the exported form of
datalad-next's ``datalad-annex::`` Git remote helper (``<visit>_XDLRA--refs`` and
``<visit>_XDLRA--repo-export``), so it can be cloned from the store alone.

Re-indexing the same tarball leaves HEAD as it is; a new tarball gives one new commit.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from . import annexwrite as aw
from .errors import DicomAssetsError
from .fsutil import atomic_write, file_lock, recover_dir, swap_dir, temp_sibling
from .layout import DatasetLayout, dataset_tarball_path, tarball_name

# git-annex metadata fields attached to every DICOM key (from the metadata JSON)
TAG_FIELDS = ("SeriesDescription", "SeriesNumber", "Modality", "ProtocolName")
# a combined field for the series view: `git annex view series=*`
SERIES_FIELD = "series"
SOURCE_FILE = ".dicom_assets/source.json"
REMOTES = ("uncurl", "archivist")
# how the records are written: "direct" (git-annex's branch formats composed here, one
# `git fast-import`; core/annexwrite.py) or "batch" (the reference: `datalad create`,
# `initremote`, git-annex's batch commands, a `datalad-annex::` push)
WRITERS = ("direct", "batch")
WRITER_ENV = "DICOM_ASSETS_DATALAD_WRITER"
# what `datalad create` writes into a new dataset (DataLad 1.x)
DATASET_GITATTRIBUTES = "* annex.backend=MD5E\n**/.git* annex.largefiles=nothing\n"
DATALAD_GITATTRIBUTES = "config annex.largefiles=nothing\n"
# what `git annex init` installs (git-annex 10)
ANNEX_HOOKS = {
    "pre-commit": "git annex pre-commit .",
    "post-receive": "if git annex post-receive --help >/dev/null 2>&1; then git annex post-receive; fi",
    "pre-push": "if git annex pre-push --help >/dev/null 2>&1; then git annex pre-push; fi",
    "post-checkout": "git annex smudge --update",
    "post-merge": "git annex smudge --update",
}
# with these, git checks files out and in without starting git-annex's filter (the files
# written here are symlinks or small files kept in git, which the filter passes through)
NO_FILTER = ("-c", "filter.annex.smudge=", "-c", "filter.annex.clean=", "-c", "filter.annex.process=")
_UNSAFE_MEMBER = re.compile(r"[&#\n\r]")


class DataladError(DicomAssetsError):
    """A git / git-annex / DataLad step failed; the message names the command and its output."""


@dataclass(frozen=True)
class Member:
    path: str
    md5: str
    size: int
    tags: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"MD5-s{self.size}--{self.md5}"


@dataclass(frozen=True)
class IndexResult:
    path: Path
    dataset_id: str
    commit: str
    changed: bool
    files: int
    tarball_key: str
    tarball_url: str
    clone_url: str
    deposit: list[str]
    series: list[dict]
    # seconds per step (create, record, deposit) and the share spent in git-annex processes
    timings: dict = field(default_factory=dict)
    annotations: int = 0  # annotation files indexed beside the DICOMs (a TCIA visit's)


def tool_env() -> dict[str, str]:
    """Environment for git / git-annex / DataLad calls.

    PyPI's git-annex and datalad-next's special remotes live in the interpreter's ``bin/``,
    which is not on PATH in every process (Dagster run workers, cron): prepend it. A
    machine with no Git identity gets one for the commits of the index (an existing one
    is never overridden).
    """
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    if bindir not in env.get("PATH", "").split(os.pathsep):
        env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    if not (env.get("GIT_AUTHOR_EMAIL") or _git_identity(env)):
        env.setdefault("GIT_AUTHOR_NAME", "dicom-assets")
        env.setdefault("GIT_AUTHOR_EMAIL", "dicom-assets@localhost")
        env.setdefault("GIT_COMMITTER_NAME", "dicom-assets")
        env.setdefault("GIT_COMMITTER_EMAIL", "dicom-assets@localhost")
    return env


def _git_identity(env) -> bool:
    try:
        out = subprocess.run(["git", "config", "--get", "user.email"], env=env, capture_output=True, text=True)
    except FileNotFoundError as e:
        raise DataladError("git is not installed: DataLad datasets need git (Debian package git)") from e
    return bool(out.stdout.strip())


def tarball_key(size: int, md5: str) -> str:
    return f"MD5E-s{size}--{md5}.tar"


def archive_locator(tar_key: str, member: Member) -> str:
    return f"dl+archive:{tar_key}#path={member.path}&size={member.size}&atype=tar"


def series_label(number, description) -> str:
    """``004_T2w_PD`` for the series view (path-safe)."""
    desc = re.sub(r"[^A-Za-z0-9._-]+", "_", str(description or "")).strip("_") or "unnamed"
    try:
        num = f"{int(number):03d}"
    except (TypeError, ValueError):
        num = "000"
    return f"{num}_{desc}"


def members_from_metadata(dicoms: list[dict]) -> list[Member]:
    out = []
    for rec in dicoms:
        path = rec["path"]
        if _UNSAFE_MEMBER.search(path) or path.startswith("/") or ".." in path.split("/"):
            raise DataladError(f"{path!r}: a tar member path with '&', '#', a line break, '..' or a leading "
                               "'/' cannot be indexed as a dl+archive: URL")
        tags = {f: str(rec[f]) for f in TAG_FIELDS if rec.get(f) not in (None, "")}
        tags[SERIES_FIELD] = series_label(rec.get("SeriesNumber"), rec.get("SeriesDescription"))
        out.append(Member(path, rec["md5"], int(rec["size"]), tags))
    return out


#: the "series" (git-annex metadata field) of a visit's annotation files
ANNOTATIONS_SERIES = "annotations"


def members_of_annotations(records: list[dict]) -> list[Member]:
    """The tarball's annotation files (``annotations`` of its metadata) as dataset files, under
    the same path as in the tarball and retrievable from it like the DICOMs."""
    return [Member(m.path, m.md5, m.size, {SERIES_FIELD: ANNOTATIONS_SERIES})
            for m in members_from_metadata([{**r, "SeriesNumber": None} for r in records])]


def store_urls(store_base_url: str, study: str, visit: str) -> tuple[str, str]:
    """(tarball URL, ``datalad-annex::`` clone URL of the deposit) under a store base URL."""
    base = store_base_url.rstrip("/")
    tar_url = f"{base}/{study}/{visit}_dicom.tar"
    # `{{annex_key}}`: the doubled braces survive the helper's own URL-placeholder expansion
    clone = (f"datalad-annex::?type=external&externaltype=uncurl"
             f"&url={base}/{study}/{visit}_{{{{annex_key}}}}&encryption=none")
    return tar_url, clone


class _Runner:
    """Runs git / git-annex in one dataset and times the git-annex share."""

    def __init__(self, path: Path, env: dict[str, str], timings: dict):
        self.path, self.env, self.timings = path, env, timings
        self.last_stderr = ""

    def run(self, *args: str, input: str | None = None, check: bool = True) -> str:
        t0 = time.perf_counter()
        try:
            out = subprocess.run(list(args), cwd=self.path, env=self.env, input=input, capture_output=True,
                                 text=True)
        except FileNotFoundError as e:
            raise DataladError(f"{args[0]} is not installed or not on PATH ({e})") from e
        finally:
            if args[:2] == ("git", "annex"):
                self.timings["git_annex"] = self.timings.get("git_annex", 0.0) + time.perf_counter() - t0
        self.last_stderr = out.stderr.strip()
        if check and out.returncode != 0:
            raise DataladError(f"`{' '.join(args[:4])}` failed in {self.path} (exit {out.returncode}): "
                               f"{(out.stderr or out.stdout).strip()[-2000:]}")
        return out.stdout

    def batch(self, *args: str, lines: list[str]) -> list[dict]:
        """One git-annex ``--batch --json`` process for all lines; every line must succeed."""
        if not lines:
            return []
        out = self.run("git", "annex", *args, "--batch", "--json", "--json-error-messages",
                       input="".join(line + "\n" for line in lines), check=False)
        results = []
        for x in out.splitlines():
            try:
                results.append(json.loads(x))
            except ValueError:
                pass  # a non-JSON line (a crash message) leaves the count short, reported below
        failed = [r for r in results if not r.get("success")]
        if failed or len(results) != len(lines):
            first = failed[0] if failed else {}
            raise DataladError(f"git annex {args[0]} in {self.path}: {len(failed)} of {len(lines)} records failed "
                               f"({len(results)} answers); first: {first.get('input')} "
                               f"{' '.join(first.get('error-messages', []))} {self.last_stderr[-1000:]}".strip())
        return results


def create_dataset(path: Path, env: dict[str, str], description: str, timings: dict) -> None:
    """A new DataLad dataset with the uncurl and archivist special remotes (autoenabled)."""
    _Runner(path.parent, env, timings).run(str(Path(sys.executable).parent / "datalad"), "-l", "error", "create",
                                           "--description", description, path.name)
    r = _Runner(path, env, timings)
    for name in REMOTES:
        r.run("git", "annex", "initremote", name, "type=external", f"externaltype={name}",
              "encryption=none", "autoenable=true")
    # a clone reaches the tarball through uncurl; git-annex's own web remote is never asked
    r.run("git", "config", "annex.security.allowed-url-schemes", "http https file")


def _dataset_id(path: Path) -> str:
    """``datalad.dataset.id`` from ``.datalad/config`` (written by `datalad create` or here)."""
    section = None
    try:
        lines = (Path(path) / ".datalad" / "config").read_text().splitlines()
    except OSError as e:
        raise DataladError(f"{path}: not a DataLad dataset ({e})") from e
    for line in lines:
        line = line.strip()
        m = re.fullmatch(r'\[\s*datalad\s+"dataset"\s*\]', line)
        if line.startswith("["):
            section = "dataset" if m else None
        elif section and re.match(r"id\s*=", line):
            return line.split("=", 1)[1].strip()
    raise DataladError(f"{path}: .datalad/config has no datalad.dataset.id")


def _read_source(path: Path) -> dict:
    try:
        return json.loads((path / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return {}


def index_visit(dataset_path: Path, *, visit: str, study: str, tarball_meta: dict, dicoms_meta: list[dict],
                store_dir: Path, store_base_url: str | None = None, deposit: bool = True,
                superdataset: bool = False, writer: str | None = None) -> IndexResult:
    """Create or update the DataLad dataset of one visit from its metadata JSON files.

    ``store_dir`` is the folder holding the tarball (the deposit is written there);
    ``store_base_url`` the URL under which clones reach the store (default: its
    ``file://`` URL). The DICOMs are never read: the metadata JSON is the source. With
    ``superdataset``, the dataset's parent folder (``datalad/<study>/``) is a DataLad dataset of
    all visits, each registered as a subdataset at its current version.

    ``writer`` (default ``direct``; the asset passes ``$DICOM_ASSETS_DATALAD_WRITER``): ``direct`` composes
    git-annex's records and the deposit here and writes them with one ``git fast-import``;
    ``batch`` is the reference path through DataLad and git-annex's batch commands. Both give
    the same records (compared by the tests).
    """
    writer = writer or "direct"
    if writer not in WRITERS:
        raise DataladError(f"writer {writer!r}: expected one of {', '.join(WRITERS)} ({WRITER_ENV})")
    env = tool_env()
    dataset_path = Path(dataset_path)
    dicoms = members_from_metadata(dicoms_meta)
    notes = members_of_annotations(tarball_meta.get("annotations") or [])
    what = f"{len(dicoms)} DICOMs" + (f" and {len(notes)} annotation files" if notes else "")
    members = dicoms + notes
    size, md5 = int(tarball_meta["size"]), tarball_meta["md5"]
    tar_key = tarball_key(size, md5)
    local_base = Path(store_dir).parent.resolve().as_uri()
    tar_url, clone_url = store_urls(store_base_url or local_base, study, visit)
    tar_path = tarball_meta.get("dspath") or dataset_tarball_path(tarball_name(visit))
    source = {"visit": visit, "tarball_key": tar_key, "tarball_path": tar_path, "tarball_url": tar_url, "clone_url": clone_url,
              "files": len(dicoms), "sha256": tarball_meta.get("sha256"), "series": _series(dicoms)}
    if notes:  # only a visit with annotation files says so (the source of every other visit is unchanged)
        source["annotation_files"] = len(notes)

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    message = f"Index {visit}: {what} in {tar_key}"
    recover_dir(dataset_path)  # a swap cut short by a crash: the old dataset back (its history kept)
    if not (dataset_path / ".datalad" / "config").is_file():
        # built aside and renamed: a crash never leaves a half-made dataset in place
        staging = temp_sibling(dataset_path)
        staging.parent.mkdir(parents=True, exist_ok=True)
        try:
            if writer == "direct":
                setup = create_direct(staging, env, f"dicom-assets index of {visit}")
                timings["create"] = time.perf_counter() - t0
                _record_direct(staging, env, members, tar_key, tar_url, source, message=message, setup=setup)
            else:
                create_dataset(staging, env, f"dicom-assets index of {visit}", timings)
                timings["create"] = time.perf_counter() - t0
                _record(_Runner(staging, env, timings), members, tar_key, tar_url, source, message=message)
            swap_dir(staging, dataset_path)  # a dataset without .datalad/config there (a remnant) is replaced whole
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        changed = True
    else:
        runner = _Runner(dataset_path, env, timings)
        message = f"Re-index {visit}: {what} in {tar_key}"
        if writer == "direct":
            # an interrupted update leaves the index behind HEAD: put it back (no filter needed)
            runner.run("git", *NO_FILTER, "read-tree", "--reset", "-u", "HEAD")
            changed = _read_source(dataset_path) != source
            if changed:
                _record_direct(dataset_path, env, members, tar_key, tar_url, source, message=message)
        else:
            runner.run("git", "reset", "-q", "--hard", "HEAD")  # an interrupted update leaves staged changes
            changed = _read_source(dataset_path) != source
            if changed:
                _record(runner, members, tar_key, tar_url, source, message=message, update=True)
    timings["index"] = time.perf_counter() - t0
    runner = _Runner(dataset_path, env, timings)
    t1 = time.perf_counter()
    if not deposit:
        deposited = []
    elif writer == "direct":
        deposited = _deposit_direct(runner, store_dir, visit, force=changed)
    else:
        deposited = _deposit(runner, store_dir, visit, local_base, force=changed)
    timings["deposit"] = time.perf_counter() - t1
    commit = runner.run("git", "rev-parse", "HEAD").strip()
    dataset_id = _dataset_id(dataset_path)
    if superdataset:
        t2 = time.perf_counter()
        if writer == "direct":
            register_direct(dataset_path, env, commit, dataset_id, timings)
        else:
            register_in_superdataset(dataset_path, env, timings)
        timings["superdataset"] = time.perf_counter() - t2
    return IndexResult(
        path=dataset_path, dataset_id=dataset_id, commit=commit, changed=changed, files=len(dicoms),
        tarball_key=tar_key, tarball_url=tar_url, clone_url=clone_url, deposit=deposited,
        series=source["series"], timings=timings, annotations=len(notes),
    )


def _record(r: _Runner, members: list[Member], tar_key: str, tar_url: str, source: dict, *, message: str,
            update: bool = False) -> None:
    # --remote: the claiming remote is known, git-annex need not ask each special remote per URL
    jobs = [("registerurl", "--remote", "uncurl", [f"{tar_key} {tar_url}"]),
            ("registerurl", "--remote", "archivist", [f"{m.key} {archive_locator(tar_key, m)}" for m in members]),
            ("metadata", [json.dumps({"key": m.key, "fields": {k: [v] for k, v in m.tags.items()}})
                          for m in members])]
    if update:
        # the previous tarball's files leave the index and the work tree; fromkey puts back what
        # the new tarball has (unchanged files come back identical: the commit shows only changes)
        ours = [p for p in r.run("git", "ls-files", "-z").split("\0")
                if p and not p.startswith((".datalad/", ".dicom_assets/")) and p != ".gitattributes"]
        for i in range(0, len(ours), 500):
            r.run("git", "rm", "-q", "--", *ours[i:i + 500])
    # the tarball itself is a file of the dataset too (`datalad get` of the whole visit at once)
    jobs.append(("fromkey", "--force", [f"{tar_key} {source['tarball_path']}"] + [f"{m.key} {m.path}"
                                                                                for m in members]))
    # one batch process per kind of record, one after the other: run side by side they take
    # as long, git-annex serializing their journal writes (measured, bench/run.py)
    for *args, lines in jobs:
        r.batch(*args, lines=lines)
    src = r.path / SOURCE_FILE
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_text(json.dumps(source, indent=2, sort_keys=True) + "\n")
    r.run("git", "-c", "annex.largefiles=nothing", "add", SOURCE_FILE)
    r.run("git", "commit", "-q", "-m", message)


# --- the direct writer (core/annexwrite.py: formats and the documents they follow) -------------

def _git(path: Path, env: dict, *args: str, input: bytes | None = None) -> bytes:
    try:
        return aw.run_git(path, env, *args, input=input)
    except RuntimeError as e:
        raise DataladError(str(e)) from None
    except FileNotFoundError as e:
        raise DataladError("git is not installed: DataLad datasets need git (Debian package git)") from e


def _ident(path: Path, env: dict) -> str:
    """``Name <email>`` of the committer git would use here (environment, then git config)."""
    for line in _git(path, env, "var", "GIT_COMMITTER_IDENT").decode().splitlines():
        return line.rsplit(" ", 2)[0]
    raise DataladError(f"{path}: git has no committer identity")


def _head_ref(path: Path) -> str:
    head = (Path(path) / ".git" / "HEAD").read_text().strip()
    if not head.startswith("ref: "):
        raise DataladError(f"{path}: HEAD is detached ({head}); expected a branch")
    return head[5:]


def _init_direct(path: Path, env: dict, description: str, remotes: tuple[str, ...]) -> tuple[dict, dict]:
    """``git init`` plus what ``git annex init`` and ``initremote`` leave in ``.git``: the
    repository's uuid and version, the annex filter, hooks, the special remotes' sections.
    Returns the git-annex branch's ``uuid.log`` and ``remote.log`` entries."""
    _git(path.parent, env, "init", "-q", path.name)
    here = str(uuid.uuid4())
    uuids = {here: description}
    remote_cfg: dict[str, dict] = {}
    cfg = [f"[annex]\n\tuuid = {here}\n\tversion = 10\n",
           '[filter "annex"]\n\tsmudge = git-annex smudge -- %f\n\tclean = git-annex smudge --clean -- %f\n'
           "\tprocess = git-annex filter-process\n"]
    for name in remotes:
        u = str(uuid.uuid4())
        uuids[u] = name
        remote_cfg[u] = {"autoenable": "true", "encryption": "none", "externaltype": name, "name": name,
                         "type": "external"}
        cfg.append(f'[remote "{name}"]\n\tannex-externaltype = {name}\n\tannex-uuid = {u}\n'
                   "\tannex-verified = verified\n\tskipFetchAll = true\n\tannex-cost = 200.0\n")
    if remotes:
        cfg.append('[annex "security"]\n\tallowed-url-schemes = http https file\n')
    with open(path / ".git" / "config", "a") as fh:
        fh.write("".join(cfg))
    for hook, cmd in ANNEX_HOOKS.items():
        h = path / ".git" / "hooks" / hook
        h.parent.mkdir(parents=True, exist_ok=True)
        h.write_text(f"#!/bin/sh\n# automatically configured by git-annex\n{cmd}\n")
        h.chmod(0o755)
    return uuids, remote_cfg


def _new_dataset_files(dataset_id: str) -> dict[str, tuple[str, bytes]]:
    return {".datalad/.gitattributes": ("100644", DATALAD_GITATTRIBUTES.encode()),
            ".datalad/config": ("100644", f'[datalad "dataset"]\n\tid = {dataset_id}\n'.encode()),
            ".gitattributes": ("100644", DATASET_GITATTRIBUTES.encode())}


def _checkout(path: Path, env: dict, old: str | None = None) -> None:
    """Index and work tree to HEAD (from ``old``: only what changed), the annex filter off."""
    args = ["read-tree", "-m", "-u", old, "HEAD"] if old else ["read-tree", "--reset", "-u", "HEAD"]
    if old:
        # a two-tree merge refuses entries whose cached stat is stale ("not uptodate. Cannot
        # merge"), as in a dataset root copied or restored from a backup (new inodes): refresh it
        try:
            _git(path, env, *NO_FILTER, "update-index", "-q", "--refresh")
        except DataladError:  # exit 1: an entry really differs; read-tree then names it
            pass
    _git(path, env, *NO_FILTER, *args)
    attrs = path / ".git" / "info" / "attributes"
    if not attrs.is_file():
        attrs.parent.mkdir(parents=True, exist_ok=True)
        attrs.write_text("\n* filter=annex\n")  # as `git annex init` writes it


def create_direct(path: Path, env: dict[str, str], description: str) -> dict:
    """A new dataset, as ``datalad create`` + the two ``initremote`` leave it, written directly:
    its first commit (``[DATALAD] new dataset``) and the git-annex branch (``uuid.log``,
    ``remote.log``) come with the records, in the one fast-import of :func:`_record_direct`."""
    uuids, remotes = _init_direct(path, env, description, REMOTES)
    return {"uuids": uuids, "remotes": remotes}


def _annex_records(members: list[Member], tar_key: str, tar_url: str, remote_uuids: dict[str, str],
                   old: dict[str, str], t: int) -> dict[str, str]:
    """The git-annex branch files that change: {path: new content}. ``old`` holds the current
    content of each key's logs (absent: none yet)."""
    logs = dict(old)
    changed: dict[str, str] = {}

    def put(name: str, text: str | None) -> None:
        if text is not None:
            logs[name] = changed[name] = text

    def key_logs(key: str, remote: str, url: str) -> str:
        base = f"{aw.hashdir_lower(key)}/{key}.log"
        put(base, aw.presence_log(logs.get(base, ""), remote_uuids[remote], t))
        put(base + ".web", aw.presence_log(logs.get(base + ".web", ""), aw.url_info(url), t))
        return base

    key_logs(tar_key, "uncurl", tar_url)
    for m in members:
        base = key_logs(m.key, "archivist", archive_locator(tar_key, m))
        put(base + ".met", aw.metadata_log(logs.get(base + ".met", ""), {k: [v] for k, v in m.tags.items()}, t))
    return changed


def annex_log_paths(members: list[Member], tar_key: str) -> list[str]:
    out = []
    for key in [tar_key] + [m.key for m in members]:
        base = f"{aw.hashdir_lower(key)}/{key}.log"
        out += [base, base + ".web"] + ([base + ".met"] if key != tar_key else [])
    return out


def _record_direct(path: Path, env: dict, members: list[Member], tar_key: str, tar_url: str, source: dict, *,
                   message: str, setup: dict | None = None) -> None:
    """The index commit and the git-annex records, one ``git fast-import``, then the work tree."""
    t = int(time.time())
    ident = _ident(path, env)
    head = _head_ref(path)
    src = (json.dumps(source, indent=2, sort_keys=True) + "\n").encode()
    tree = {SOURCE_FILE: ("100644", src), source["tarball_path"]: ("120000", aw.annex_link(tar_key, source["tarball_path"]).encode())}
    for m in members:
        tree[m.path] = ("120000", aw.annex_link(m.key, m.path).encode())
    commits = []
    if setup is not None:  # a new dataset (create_direct)
        uuids, remotes = setup["uuids"], setup["remotes"]
        names = {cfg["name"]: u for u, cfg in remotes.items()}
        annex = _annex_records(members, tar_key, tar_url, names, {}, t)
        annex["uuid.log"] = aw.uuid_log(uuids, t)
        annex["remote.log"] = aw.remote_log(remotes, t)
        commits.append(aw.Commit("refs/heads/git-annex", "update",
                                 {k: ("100644", v.encode()) for k, v in annex.items()}))
        commits.append(aw.Commit(head, "[DATALAD] new dataset", _new_dataset_files(str(uuid.uuid4()))))
        commits.append(aw.Commit(head, message, tree))
        old_head = None
    else:
        old_head = _git(path, env, "rev-parse", "HEAD").decode().strip()
        paths = annex_log_paths(members, tar_key)
        got = aw.cat_files(path, env, ["git-annex:remote.log"] + [f"git-annex:{p}" for p in paths])
        names = {}
        for line in got.get("git-annex:remote.log", "").splitlines():
            kv = dict(w.split("=", 1) for w in line.split()[1:] if "=" in w)
            names[kv.get("name")] = line.split()[0]
        missing = [r for r in REMOTES if r not in names]
        if missing:
            raise DataladError(f"{path}: the git-annex branch has no special remote {', '.join(missing)}")
        old = {p: got[f"git-annex:{p}"] for p in paths if f"git-annex:{p}" in got}
        annex = _annex_records(members, tar_key, tar_url, names, old, t)
        if annex:
            commits.append(aw.Commit("refs/heads/git-annex", "update",
                                     {k: ("100644", v.encode()) for k, v in annex.items()},
                                     parent="refs/heads/git-annex^0"))
        # the previous tarball's files leave the tree; unchanged files keep their blobs
        keep = (".datalad/", ".dicom_assets/", ".gitattributes")
        gone = [p for p in _git(path, env, "ls-tree", "-r", "-z", "--name-only", "HEAD").decode().split("\0")
                if p and not p.startswith(keep) and p not in tree]
        tree.update({p: ("", None) for p in gone})
        commits.append(aw.Commit(head, message, tree, parent=f"{head}^0"))
    try:
        aw.fast_import(path, env, aw.fast_import_stream(commits, ident, t))
    except RuntimeError as e:
        raise DataladError(f"writing the index of {path}: {e}") from None
    _checkout(path, env, old_head)


def _deposit_direct(r: _Runner, store_dir: Path, visit: str, force: bool) -> list[str]:
    """The dataset in the store in datalad-annex's form (what its push writes), written here:
    ``<visit>_XDLRA--repo-export`` (ZIP of a bare repository with the two branches, one pack),
    then ``<visit>_XDLRA--refs`` (so the refs never name objects the ZIP lacks)."""
    store_dir = Path(store_dir).absolute()
    refs_file, repo_file = (DatasetLayout.deposit_file(store_dir, visit, p) for p in ("refs", "repo-export"))
    files = [refs_file, repo_file]
    if not force and all(f.is_file() for f in files):
        return [str(f) for f in files]
    head = _head_ref(r.path)
    names = [head, "refs/heads/git-annex"]
    shas = r.run("git", "rev-parse", *names).split()
    refs = dict(zip(names, shas))
    store_dir.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(DatasetLayout.deposit_file(store_dir, visit, "pack"))
    tmp.mkdir()
    try:
        pack = _git(r.path, r.env, "pack-objects", "--revs", "-q", str(tmp / "pack"),
                    input="".join(n + "\n" for n in names).encode()).decode().strip()
        name = f"pack-{pack}"
        with atomic_write(repo_file, "wb") as fh:
            aw.write_repo_zip(fh, refs, head, (tmp / f"{name}.pack").read_bytes(),
                              (tmp / f"{name}.idx").read_bytes(), name)
        with atomic_write(refs_file) as fh:
            fh.write(aw.format_refs(refs, head))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [str(f) for f in files]


def register_direct(dataset_path: Path, env: dict[str, str], commit: str, dataset_id: str, timings: dict) -> None:
    """:func:`register_in_superdataset`, written directly: the gitlink and the ``.gitmodules``
    entry ``datalad save`` records, in one fast-import commit (the superdataset itself made as
    ``datalad create`` makes it, on first use)."""
    sup = dataset_path.parent
    name = dataset_path.name
    with file_lock(DatasetLayout.superdataset_lock_path(sup)):
        if not (sup / ".datalad" / "config").is_file():
            uuids, _ = _init_direct(sup, env, f"dicom-assets: all visits of {sup.name}", ())
            t = int(time.time())
            aw.fast_import(sup, env, aw.fast_import_stream(
                [aw.Commit("refs/heads/git-annex", "update", {"uuid.log": ("100644", aw.uuid_log(uuids, t).encode())}),
                 aw.Commit(_head_ref(sup), "[DATALAD] new dataset", _new_dataset_files(str(uuid.uuid4())))],
                _ident(sup, env), t))
            _checkout(sup, env)
        got = aw.cat_files(sup, env, [f"HEAD:{name}", "HEAD:.gitmodules"])
        recorded = _git(sup, env, "ls-tree", "HEAD", "--", name).decode().split()
        modules = got.get("HEAD:.gitmodules", "")
        entry = (f'[submodule "{name}"]\n\tpath = {name}\n\turl = ./{name}\n\tdatalad-id = {dataset_id}\n')
        if recorded[:1] == ["160000"] and recorded[2] == commit and entry in modules:
            return
        if entry not in modules:
            # drop a previous entry of the same name (another dataset id), keep the others
            blocks = re.split(r"(?m)^(?=\[)", modules)
            modules = "".join(b for b in blocks if not b.startswith(f'[submodule "{name}"]')) + entry
        old = _git(sup, env, "rev-parse", "HEAD").decode().strip()
        t = int(time.time())
        aw.fast_import(sup, env, aw.fast_import_stream(
            [aw.Commit(_head_ref(sup), f"Record {name}",
                       {".gitmodules": ("100644", modules.encode()), name: ("160000", commit.encode())},
                       parent=old)],
            _ident(sup, env), t))
        _checkout(sup, env, old)
        with open(sup / ".git" / "config", "a") as fh:
            if f'[submodule "{name}"]' not in (sup / ".git" / "config").read_text():
                fh.write(f'[submodule "{name}"]\n\tactive = true\n\turl = ./{name}\n')


def register_in_superdataset(dataset_path: Path, env: dict[str, str], timings: dict) -> None:
    """Record the visit dataset's HEAD in the study's superdataset (created on first use).

    Runs of different visits may finish at once: one at a time, under a file lock beside the
    superdataset. A super commit is made only when the subdataset's recorded version changes.
    """
    sup = dataset_path.parent
    datalad_bin = str(Path(sys.executable).parent / "datalad")
    with file_lock(DatasetLayout.superdataset_lock_path(sup)):
        r = _Runner(sup, env, timings)
        if not (sup / ".datalad" / "config").is_file():
            r.run(datalad_bin, "-l", "error", "create", "--force", "--description",
                  f"dicom-assets: all visits of {sup.name}", ".")
        r.run(datalad_bin, "-l", "error", "save", "-d", ".", "-m", f"Record {dataset_path.name}",
              dataset_path.name)


def _deposit(r: _Runner, store_dir: Path, visit: str, local_base: str, force: bool) -> list[str]:
    """Push HEAD and the git-annex branch to the store in datalad-annex's exported form.

    The push always goes to the local store folder (``file://``); clones may use the
    ``store_base_url`` equivalent, which serves the same files.
    """
    store_dir = Path(store_dir)
    files = [DatasetLayout.deposit_file(store_dir, visit, p) for p in ("refs", "repo-export")]
    if not force and all(f.is_file() for f in files):
        return [str(f) for f in files]
    _, local_url = store_urls(local_base, store_dir.name, visit)
    branch = r.run("git", "symbolic-ref", "--short", "HEAD").strip()
    r.run("git", "push", "-q", "--force", local_url, f"{branch}:refs/heads/{branch}", "git-annex:refs/heads/git-annex")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise DataladError(f"the deposit of {visit} did not write {', '.join(missing)}")
    return [str(f) for f in files]


def catalog_entry(dataset_path: Path) -> dict:
    """What the catalog shows of a visit's dataset: its own id and version, and what it indexes."""
    dataset_path = Path(dataset_path)
    source = _read_source(dataset_path)
    if not source:
        raise DataladError(f"{dataset_path}: not a dataset made by dicom-assets (no {SOURCE_FILE})")
    r = _Runner(dataset_path, tool_env(), {})
    version, updated = r.run("git", "log", "-1", "--format=%H %cI").split()
    return {**source, "dataset_id": _dataset_id(dataset_path), "version": version, "updated": updated}


def _series(members: list[Member]) -> list[dict]:
    by: dict[str, dict] = {}
    for m in members:
        s = by.setdefault(m.tags[SERIES_FIELD], {"series": m.tags[SERIES_FIELD], "files": 0,
                                                 **{f: m.tags.get(f, "") for f in TAG_FIELDS}})
        s["files"] += 1
    return sorted(by.values(), key=lambda s: s["series"])
