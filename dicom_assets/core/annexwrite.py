"""git-annex records and git objects written directly, without starting git-annex.

A visit's index is a few thousand small records; git-annex's own commands spend most of
their time starting processes (``datalad create``, two Python special remotes started by
``initremote``, a ``datalad-annex::`` push). Here the same records are composed in Python and
handed to one ``git fast-import`` process, which writes every blob, tree and commit of both
branches (the dataset's and ``git-annex``) into one pack.

Formats, as git-annex documents them (doc/internals.mdwn and doc/internals/hashing.mdwn in
the git-annex source, https://git-annex.branchable.com/internals/ and
https://git-annex.branchable.com/internals/hashing/; key names in doc/key_format.mdwn):

- ``uuid.log``: ``<uuid> <description> timestamp=<t>s``, one line per repository, sorted by uuid;
- ``remote.log``: ``<uuid> <k>=<v> ... timestamp=<t>s``, the settings sorted by name;
- ``<aaa>/<bbb>/<key>.log`` (location log): ``<t>s <1|0|X> <uuid>``; ``.log.web`` (URL log):
  ``<t>s 1 <url>``, where a URL claimed by a special remote other than ``web`` carries a ``:``
  prefix; lines of a presence log sorted by their last field, newest line per value kept;
- ``<aaa>/<bbb>/<key>.log.met`` (metadata log): ``<t>s <field> +<value> ... -<value>``,
  fields in case-insensitive order, a value with a space, CR, LF or a leading ``!`` written
  as ``!<base64>``;
- ``<aaa>/<bbb>``: "hashdirlower", the first 3 + next 3 hex digits of the md5 of the key (used in
  the git-annex branch); annexed files are symlinks into ``.git/annex/objects/<xx>/<yy>/<key>/<key>``
  with "hashdirmixed" (the md5's first 32-bit word, little-endian, in a 32-letter alphabet).

The deposit in the store follows datalad-next's ``datalad-annex::`` Git remote helper
(``datalad_next/gitremotes/datalad_annex.py``): ``<prefix>XDLRA--refs`` is the refs list
(``<sha> <ref>`` lines, then ``@<HEAD ref> HEAD``) and ``<prefix>XDLRA--repo-export`` a ZIP of a
bare repository holding those refs (``HEAD``, ``config``, ``packed-refs``, ``objects/pack/``).

No Dagster, no git-annex: only git (``init``, ``fast-import``, ``read-tree``, ``pack-objects``).
"""

from __future__ import annotations

import base64
import hashlib
import re
import subprocess
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

_MIXED = "0123456789zqjxkmvwgpfZQJXKMVWGPF"
_TS = re.compile(rb"^(\d+(?:\.\d+)?)s ")


# --- key hashing --------------------------------------------------------------------------

def hashdir_lower(key: str) -> str:
    """``aaa/bbb``: where the git-annex branch keeps a key's logs."""
    h = hashlib.md5(key.encode()).hexdigest()
    return f"{h[:3]}/{h[3:6]}"


def hashdir_mixed(key: str) -> str:
    """``Xx/Yy``: the object directory of a key in a non-bare repository (annex symlinks)."""
    word = int.from_bytes(hashlib.md5(key.encode()).digest()[:4], "little")
    letters = [_MIXED[(word >> (6 * i)) & 31] for i in range(8)]
    swapped = "".join(letters[i + 1] + letters[i] for i in range(0, 8, 2))[:6]
    return f"{swapped[:2]}/{swapped[2:4]}"


def annex_link(key: str, path: str) -> str:
    """The symlink target of an annexed file at ``path`` (relative to the work tree)."""
    up = "../" * path.count("/")
    return f"{up}.git/annex/objects/{hashdir_mixed(key)}/{key}/{key}"


# --- log lines ----------------------------------------------------------------------------

def ts(t: int | float) -> str:
    return f"{int(t)}s" if float(t).is_integer() else f"{t:.6f}s".rstrip("0")


def uuid_log(entries: dict[str, str], t: int) -> str:
    """``uuid.log`` from {uuid: description}."""
    return "".join(f"{u} {d} timestamp={ts(t)}\n" for u, d in sorted(entries.items()))


def remote_log(remotes: dict[str, dict[str, str]], t: int) -> str:
    """``remote.log`` from {uuid: {setting: value}}."""
    return "".join(f"{u} {' '.join(f'{k}={v}' for k, v in sorted(cfg.items()))} timestamp={ts(t)}\n"
                   for u, cfg in sorted(remotes.items()))


def _after(old: str, t: int) -> int:
    """``t``, or one second past the newest line of ``old`` if that is not older: a new line
    must sort after the lines it supersedes (git-annex advances its clock the same way)."""
    newest = max((float(m.group(1)) for m in (_TS.match(x.encode()) for x in old.splitlines()) if m), default=0)
    return t if t > newest else int(newest) + 1


def _parse_presence(text: str) -> dict[str, tuple[str, str]]:
    """{value: (timestamp, status)} keeping the newest line per value."""
    out: dict[str, tuple[str, str]] = {}
    for line in text.splitlines():
        parts = line.split(" ", 2)
        if len(parts) != 3 or not parts[0].endswith("s"):
            continue
        t, status, value = parts
        if value not in out or float(out[value][0][:-1]) <= float(t[:-1]):
            out[value] = (t, status)
    return out


def presence_log(old: str, value: str, t: int, status: str = "1") -> str | None:
    """A location or URL log with ``value`` present (None: already so, nothing to write)."""
    cur = _parse_presence(old)
    if cur.get(value, ("", ""))[1] == status:
        return None
    cur[value] = (ts(_after(old, t)), status)
    return "".join(f"{tt} {st} {v}\n" for v, (tt, st) in sorted(cur.items(), key=lambda kv: kv[0].encode()))


def url_info(url: str, web: bool = False) -> str:
    """A URL as the URL log records it: ``:<url>`` when a special remote other than web claims it."""
    return url if web else ":" + url


def _meta_value(v: str) -> str:
    if any(c in v for c in " \r\n") or v.startswith("!"):
        return "!" + base64.b64encode(v.encode()).decode()
    return v


def _meta_unvalue(v: str) -> str:
    return base64.b64decode(v[1:]).decode() if v.startswith("!") else v


def _field_order(name: str) -> str:
    return name.casefold()


def _parse_metadata(old: str) -> list[tuple[float, list[tuple[str, list[tuple[str, str]]]]]]:
    """Lines of a metadata log: [(time, [(field, [(+|-, value)])])] in file order."""
    out = []
    for line in old.splitlines():
        m = _TS.match(line.encode())
        if not m:
            continue
        fields: list[tuple[str, list[tuple[str, str]]]] = []
        for w in line.split(" ")[1:]:
            if w[:1] in "+-" and fields:
                fields[-1][1].append((w[0], _meta_unvalue(w[1:])))
            elif w:
                fields.append((w, []))
        out.append((float(m.group(1)), fields))
    return out


def _metadata_line(t: float, fields) -> str:
    words = []
    for f, vals in fields:
        words.append(f)
        words += [flag + _meta_value(v) for flag, v in vals]
    return f"{ts(t)} {' '.join(words)}\n"


def current_metadata(old: str) -> dict[str, set[str]]:
    """The metadata a log sets now ({field (case-folded): values}), lines applied oldest first."""
    cur: dict[str, set[str]] = {}
    for _, fields in sorted(_parse_metadata(old), key=lambda e: e[0]):
        for f, vals in fields:
            have = cur.setdefault(f.casefold(), set())
            for flag, v in vals:
                (have.add if flag == "+" else have.discard)(v)
    return {k: v for k, v in cur.items() if v}


def metadata_log(old: str, fields: dict[str, list[str]], t: int) -> str | None:
    """A metadata log after setting each field to exactly ``fields[f]`` (None: nothing changes).

    As git-annex's ``metadata --batch`` does: one new line naming every field given, its values
    set (``+``) and the ones it drops (``-``), values in byte order whatever their sign; then
    the log simplified (doc/internals.mdwn: removed values are kept so an older line merged
    later cannot bring them back): an older line keeps only the values no newer line names,
    and the simplified log is used when it has fewer lines.
    """
    cur = current_metadata(old)
    if all(set(fields[f]) == cur.get(f.casefold(), set()) for f in fields):
        return None
    line = []
    for f in sorted(fields, key=_field_order):
        want, have = set(fields[f]), cur.get(f.casefold(), set())
        vals = [("+", v) for v in want] + [("-", v) for v in have - want]
        line.append((f, sorted(vals, key=lambda x: x[1].encode())))
    entries = _parse_metadata(old) + [(float(_after(old, t)), line)]
    simple, named = [], set()
    for when, flds in sorted(entries, key=lambda e: -e[0]):
        unique = [(f, [x for x in vals if (f.casefold(), x[1]) not in named]) for f, vals in flds]
        unique = [(f, vals) for f, vals in unique if vals]
        if unique:
            simple.append((when, unique))
        named |= {(f.casefold(), v) for f, vals in flds for _, v in vals}
    if len(simple) < len(entries):
        return "".join(_metadata_line(w, f) for w, f in sorted(simple, key=lambda e: e[0]))
    return old + _metadata_line(*entries[-1])


# --- fast-import --------------------------------------------------------------------------

@dataclass
class Commit:
    ref: str
    message: str
    files: dict[str, tuple[str, bytes | None]]  # path -> (mode, content); None: deleted
    parent: str | None = None             # sha or ref; None: a root commit
    replace: bool = False                 # the tree is exactly ``files`` (else: changes on the parent)


def _data(b: bytes) -> bytes:
    return b"data %d\n" % len(b) + b + b"\n"


def fast_import_stream(commits: list[Commit], ident: str, when: int) -> bytes:
    """A fast-import stream; ``ident`` is ``Name <email>``."""
    out = []
    for i, c in enumerate(commits, 1):
        out.append(f"commit {c.ref}\nmark :{i}\n".encode())
        out.append(f"author {ident} {when} +0000\ncommitter {ident} {when} +0000\n".encode())
        out.append(_data(c.message.encode()))
        if c.parent:
            out.append(f"from {c.parent}\n".encode())
        if c.replace:
            out.append(b"deleteall\n")
        for path in sorted(c.files):
            mode, content = c.files[path]
            if path.startswith('"') or "\n" in path:
                raise ValueError(f"{path!r}: not a path fast-import takes unquoted")
            if content is None:
                out.append(f"D {path}\n".encode())
            elif mode == "160000":  # a gitlink: the content is the commit's sha
                out.append(f"M 160000 {content.decode()} {path}\n".encode())
            else:
                out.append(f"M {mode} inline {path}\n".encode())
                out.append(_data(content))
    out.append(b"done\n")
    return b"".join(out)


def run_git(cwd: Path, env: dict, *args: str, input: bytes | None = None) -> bytes:
    out = subprocess.run(["git", *args], cwd=cwd, env=env, input=input, capture_output=True)
    if out.returncode != 0:
        raise RuntimeError(f"`git {' '.join(args[:3])}` failed in {cwd} (exit {out.returncode}): "
                           f"{(out.stderr or out.stdout).decode(errors='replace').strip()[-2000:]}")
    return out.stdout


def fast_import(cwd: Path, env: dict, stream: bytes) -> dict[int, str]:
    """Run one ``git fast-import`` (all objects in one pack); returns {mark: commit sha}."""
    marks = Path(cwd).absolute() / ".git" / "dicom-assets-marks"
    try:
        run_git(cwd, env, "-c", "fastimport.unpackLimit=0", "fast-import", "--quiet", "--done",
                f"--export-marks={marks}", input=stream)
        out = {}
        for line in marks.read_text().splitlines():
            m, sha = line.split()
            out[int(m[1:])] = sha
        return out
    finally:
        marks.unlink(missing_ok=True)


def cat_files(cwd: Path, env: dict, specs: list[str]) -> dict[str, str]:
    """Contents of ``<rev>:<path>`` objects (missing ones left out), one ``cat-file`` process."""
    if not specs:
        return {}
    raw = run_git(cwd, env, "cat-file", "--batch", input="".join(s + "\n" for s in specs).encode())
    out, pos = {}, 0
    for spec in specs:
        nl = raw.index(b"\n", pos)
        head = raw[pos:nl].decode()
        pos = nl + 1
        if head.endswith(" missing"):
            continue
        size = int(head.split()[2])
        out[spec] = raw[pos:pos + size].decode()
        pos += size + 1
    return out


# --- the datalad-annex deposit ------------------------------------------------------------

def format_refs(refs: dict[str, str], head_ref: str) -> str:
    """The refs list of a deposit: ``<sha> <ref>`` sorted by ref, then ``@<head ref> HEAD``."""
    return "".join(f"{sha} {ref}\n" for ref, sha in sorted(refs.items())) + f"@{head_ref} HEAD\n"


def write_repo_zip(dest: Path | BinaryIO, refs: dict[str, str], head_ref: str, pack: bytes, idx: bytes, pack_name: str) -> None:
    """The ZIP of a bare repository holding ``refs`` (objects: one pack), as datalad-annex's
    helper extracts it (top-level ``HEAD``, ``config``, ``objects/``, ``refs/``, ...)."""
    small = zipfile.ZIP_LZMA
    packed = "# pack-refs with: peeled fully-peeled sorted \n" + "".join(
        f"{sha} {ref}\n" for ref, sha in sorted(refs.items()))
    with zipfile.ZipFile(dest, "w") as z:
        for d in ("branches/", "info/", "objects/", "objects/info/", "objects/pack/", "refs/", "refs/heads/",
                  "refs/tags/"):
            z.writestr(zipfile.ZipInfo(d, (1980, 1, 1, 0, 0, 0)), b"")
        for name, text in (("HEAD", f"ref: {head_ref}\n"),
                           ("config", "[core]\n\trepositoryformatversion = 0\n\tfilemode = true\n\tbare = true\n"),
                           ("description", "Unnamed repository; edit this file 'description' to name the "
                                           "repository.\n"),
                           ("packed-refs", packed),
                           ("info/refs", "".join(f"{sha}\t{ref}\n" for ref, sha in sorted(refs.items()))),
                           ("objects/info/packs", f"P {pack_name}.pack\n\n")):
            z.writestr(_info(name), text.encode(), compress_type=small)
        # the pack is zlib-compressed already: stored as is (the helper reads any ZIP method)
        z.writestr(_info(f"objects/pack/{pack_name}.idx", 0o444), idx, compress_type=zipfile.ZIP_STORED)
        z.writestr(_info(f"objects/pack/{pack_name}.pack", 0o444), pack, compress_type=zipfile.ZIP_STORED)


def _info(name: str, mode: int = 0o644) -> zipfile.ZipInfo:
    zi = zipfile.ZipInfo(name, (1980, 1, 1, 0, 0, 0))
    zi.external_attr = (0o100000 | mode) << 16
    return zi
