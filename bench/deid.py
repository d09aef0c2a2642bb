"""De-identification against the field's tools (issue 29, "Measure"), one run, one corpus:

    .venv/bin/python bench/deid.py --files 300          (make bench-deid BENCH_ARGS=...)

The corpus: pydicom's real scanner files (CT, MR, a J2K MR, an MR with an overlay, small CT/MR/CR
of its dicomdirtests), copied round-robin up to ``--files`` (one patient, one study per source
file), with a unique, searchable token planted in every attribute of PS3.15 Table E.1-1 (our
copy, ``dicom_assets/deid_profile/``) of a VR that can hold one: ``LK0123Q`` in texts, codes and
person names (both name parts), ``<root>.123.<k>`` UIDs, valid dates (DA: one day each of a
55-day window, so no whole-day shift of 62 days or more lands on another's), DT and TM with a
unique fraction, DS/IS digit strings, bytes in OB/UN. Every sequence of the table gets an item
with table attributes and a second level below it; a sequence outside the table (kept by every
profile) holds table attributes two levels deep; a private block whose creator no safe list
names holds text, bytes, UN and a private sequence; the input file names carry the PatientID
token. US/SS/AS attributes are not planted (2 or 4 bytes: not searchable).

Each tool de-identifies the corpus into its own folder, as its own documentation shows:

* ours       ``dicom_assets.core.deid``: the Basic Profile without options (as Orthanc's default),
             ``deidentify_files`` (read, de-identify, write as ``<new SOPInstanceUID>.dcm``);
             ``ours+check`` is ``share_visit``, the asset's call: the same plus its own leak check;
             ``ours-site`` the site's default options (issue 29: modified dates, patient
             characteristics, device identity, clean descriptors, safe private).
* deid       PyPI ``deid`` (pydicom/deid): ``replace_identifiers`` with its default recipe
             (``deid/data/deid.dicom``) and ``remove_private=True`` (its default is False).
* dicognito  PyPI ``dicognito``: one ``Anonymizer()`` for the corpus, saved as its CLI does
             (``<SOPInstanceUID>.dcm``); it keeps private attributes (it has no option to drop them).
* orthanc    Debian ``orthanc`` on loopback (``dicom_assets.testing.orthanc``): HTTP upload of
             every file, ``POST /studies/{id}/anonymize`` with ``{}`` (its default profile; 1.10.1
             implements the 2021b edition, ``"DicomVersion": "2023b"`` is refused), and the
             anonymized studies downloaded as ZIPs (``/studies/{id}/archive``) and unpacked.

For each: the planted tokens found by a plain byte search of every output file and its path
(case-insensitive; tool-neutral: no parsing), with the attribute each came from; the files on
which ``dciodvfy`` (Debian ``dicom3tools``) reports an error line that it did not report on the
same input file; the wall time per file (setup and start-up excluded: importing, loading a
profile or recipe, starting Orthanc; Orthanc's includes the HTTP upload, anonymize and download).
Goals (issue 29): zero leaks where any of them leaks; time per file <= the fastest of them.

Not a test: wall-clock figures on a shared machine vary with the load.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
# this file's name would otherwise stand for PyPI's ``deid`` package in this process
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() != HERE]

import pydicom  # noqa: E402
from pydicom.datadict import dictionary_VR, keyword_for_tag  # noqa: E402
from pydicom.dataset import Dataset  # noqa: E402
from pydicom.sequence import Sequence  # noqa: E402

from dicom_assets.core import deid as ours  # noqa: E402

ROOT = "1.2.826.0.1.3680043.10.977"  # the planted UIDs: <ROOT>.<token number>.<k>
BASES = ("CT_small.dcm", "MR_small.dcm", "MR_small_jp2klossless.dcm", "examples_overlay.dcm",
         "dicomdirtests/98892003/MR700/4648", "dicomdirtests/77654033/CT2/17136", "dicomdirtests/77654033/CR1/6154")
PRIVATE_GROUP, PRIVATE_CREATOR = 0x0033, "ACME LEAKY HEADER"
NESTED_PRIVATE_GROUP, NESTED_PRIVATE_CREATOR = 0x0035, "ACME NESTED"
KEY = b"bench-deid-site-secret-key-0001"
PARTICIPANT = "BENCH001"
TOOLS = ("ours", "ours+check", "ours-site", "deid", "dicognito", "orthanc")
UNSEARCHABLE = {"US", "SS", "UL", "SL", "FL", "FD", "AS", "AT", "OW", "OF", "OD", "OL", "OV", "SV", "UV"}


# --------------------------------------------------------------------------- the corpus
@dataclass
class Plan:
    """The planted tokens: token (as bytes, compared case-insensitively) -> where it was put."""

    where: dict[bytes, str] = field(default_factory=dict)
    tags: dict[bytes, int] = field(default_factory=dict)  # token -> the table's tag it is in (for "by option")
    n: int = 0
    date_days: int = 0
    skipped: Counter = field(default_factory=Counter)

    def _next(self, where: str, tag: int | None) -> int:
        self.n += 1
        self._where, self._tag = where, tag
        return self.n

    def _add(self, token: str) -> None:
        self.where[token.encode()] = self._where
        if self._tag is not None:
            self.tags[token.encode()] = self._tag

    def value(self, vr: str, where: str, tag: int | None = None, k: int = 1):
        """A new token's value of ``vr`` (None: the VR cannot hold a searchable one); ``k`` tells
        UIDs of one attribute apart (a file's SOP Instance UID)."""
        c = self._next(where, tag)
        t = f"LK{c:04d}Q"
        if vr in ("LO", "SH", "ST", "LT", "UT", "UC", "CS", "AE"):
            self._add(t)
            return t
        if vr == "PN":
            self._add(t)
            return f"{t}FAM^{t}GIV"
        if vr == "UR":
            self._add(t)
            return f"http://leak.example.org/{t}"
        if vr == "UI":
            self._add(f"{ROOT}.{c}.")
            return f"{ROOT}.{c}.{k}"
        if vr == "DA":  # one day of a 55-day window each: a shift by 62 days or more lands outside it
            day = dt.date(2023, 1, 1) + dt.timedelta(days=self.date_days)
            self.date_days += 1
            assert self.date_days <= 61, "more DA attributes than days in the window"
            self._add(day.strftime("%Y%m%d"))
            return day.strftime("%Y%m%d")
        if vr == "DT":
            v = f"20190610101010.{c:06d}"
            self._add(v)
            return v
        if vr == "TM":
            v = f"1010{c % 60:02d}.{c:06d}"
            self._add(v)
            return v
        if vr == "DS":
            self._add(f"9{c:04d}.5")
            return f"9{c:04d}.5"
        if vr == "IS":
            self._add(f"9{c:04d}7")
            return f"9{c:04d}7"
        if vr in ("OB", "UN"):
            self._add(t)
            return t.encode() + b"\0"
        self.skipped[vr] += 1
        return None


def _vr(tag: int) -> str:
    return dictionary_VR(tag).split(" ")[0]


def _name(tag: int) -> str:
    return keyword_for_tag(tag) or f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _nested_item(plan: Plan, path: str, depth: int) -> Dataset:
    """An item with table attributes (a name, an institution, a UID) and, above ``depth`` 1, a
    sequence outside the table holding another such item."""
    item = Dataset()
    for tag in (0x00081070, 0x00080080, 0x00081155, 0x00080090):  # OperatorsName, InstitutionName, ...
        item.add_new(tag, _vr(tag), plan.value(_vr(tag), f"{path}.{_name(tag)}", tag))
    if depth > 1:
        inner = _nested_item(plan, f"{path}.PurposeOfReferenceCodeSequence[0]", depth - 1)
        inner.CodeValue, inner.CodingSchemeDesignator, inner.CodeMeaning = "121311", "DCM", "Localizer"
        item.PurposeOfReferenceCodeSequence = Sequence([inner])
    return item


def plan_tokens(profile: ours.Profile) -> tuple[Plan, dict[int, object], list[tuple[int, str, Dataset]]]:
    """The tokens of the corpus: one per attribute of the table (the same in every file, UIDs
    but for their last arc), nested items and the private block."""
    plan = Plan()
    values: dict[int, object] = {}
    for tag in sorted(profile.exact):
        if (tag >> 16) in (0x0000, 0x0002):  # command and file meta groups: not in a data set
            continue
        try:
            vr = _vr(tag)
        except KeyError:
            plan.skipped["not in pydicom's dictionary"] += 1
            continue
        where = f"{_name(tag)} ({tag >> 16:04X},{tag & 0xFFFF:04X})"
        if vr == "SQ":
            plan._next(where, tag)
            values[tag] = _nested_item(plan, f"{_name(tag)}[0]", 2)
            continue
        v = plan.value(vr, where, tag)
        if v is not None:
            values[tag] = v
    values[0x60004000] = plan.value("LT", "OverlayComments (6000,4000)", 0x60004000)
    # a sequence the table does not list (kept by every profile) with table attributes two levels deep
    region = _nested_item(plan, "AnatomicRegionSequence[0]", 2)
    region.CodeValue, region.CodingSchemeDesignator, region.CodeMeaning = "T-A0100", "SRT", "Brain"
    nested_private = region.private_block(NESTED_PRIVATE_GROUP, NESTED_PRIVATE_CREATOR, create=True)
    nested_private.add_new(0x10, "LO", plan.value("LO", "AnatomicRegionSequence[0].(0035,1010) private LO"))
    privates = [(0x10, "LO", plan.value("LO", "(0033,1010) private LO")),
                (0x11, "OB", plan.value("OB", "(0033,1011) private OB")),
                (0x13, "UN", plan.value("UN", "(0033,1013) private UN"))]
    pitem = Dataset()
    pitem.PatientName = plan.value("PN", "(0033,1012)[0].PatientName in a private sequence")
    privates.append((0x12, "SQ", Sequence([pitem])))
    values["region"] = region
    return plan, values, privates


def build_corpus(out: Path, files: int, pydicom_files: Path, profile: ours.Profile) -> tuple[Plan, list[Path]]:
    import copy

    plan, values, privates = plan_tokens(profile)
    structural = {0x00080018, 0x0020000D, 0x0020000E, 0x00200052}  # SOP, study, series, frame of reference
    pid = values[0x00100020]
    out.mkdir(parents=True)
    written = []
    bases = [pydicom.dcmread(pydicom_files / b) for b in BASES]
    for i in range(files):
        b = i % len(bases)
        ds = copy.deepcopy(bases[b])
        for tag, v in values.items():
            if tag == "region":
                ds.AnatomicRegionSequence = Sequence([copy.deepcopy(v)])
            elif isinstance(v, Dataset):
                ds.add_new(tag, "SQ", Sequence([copy.deepcopy(v)]))
            elif tag in structural:  # one study and series per source file, one SOP instance per file
                root = str(v).rsplit(".", 1)[0]
                ds.add_new(tag, "UI", f"{root}.{i + 1 if tag == 0x00080018 else b + 1}")
            else:
                ds.add_new(tag, _vr(tag), v)
        block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
        for elem, vr, v in privates:
            block.add_new(elem, vr, copy.deepcopy(v))
        ds.InstanceNumber = i + 1  # unique over the corpus: how an output file is matched to its input
        ds.SeriesNumber = b + 1
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = out / f"{pid}_{b}_{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        written.append(path)
    return plan, written


# --------------------------------------------------------------------------- the tools
def run_ours(files: list[Path], out: Path, options=()) -> float:
    profile = ours.load_profile(options)
    ctx = ours.Context(key=KEY, participant=PARTICIPANT, profile=profile)
    t = time.perf_counter()
    ids = ours.visit_identifiers(files, profile, {PARTICIPANT: "participant_id"}) if options else {}
    res = ours.deidentify_files(files, out, ctx, ids)
    took = time.perf_counter() - t
    if res.excluded:
        print(f"  ours{'-site' if options else ''}: excluded {res.excluded[:3]}", file=sys.stderr)
    return took


def run_ours_checked(files: list[Path], out: Path) -> tuple[float, str]:
    profile = ours.load_profile(())
    ctx = ours.Context(key=KEY, participant=PARTICIPANT, profile=profile)
    t = time.perf_counter()
    res = ours.share_visit(files, out, ctx, {PARTICIPANT: "participant_id"})
    took = time.perf_counter() - t
    note = f"its own check: {len(res.hits)} hits in {res.scanned} files, {'placed' if res.placed else 'withheld'}"
    return took, note


def run_deid(files: list[Path], out: Path) -> float:
    import logging

    from deid.config import DeidRecipe
    from deid.dicom import replace_identifiers
    from deid.logger import bot

    bot.level = 0  # its per-file warnings (no value for the recipe's var:) are not measured
    logging.getLogger("deid").setLevel(logging.ERROR)
    recipe = DeidRecipe()  # the default: deid/data/deid.dicom
    out.mkdir(parents=True)
    with warnings.catch_warnings():  # pydicom's warnings on the recipe's keywords ("...Time" it does not know)
        warnings.simplefilter("ignore")
        t = time.perf_counter()
        replace_identifiers([str(p) for p in files], deid=recipe, save=True, output_folder=str(out),
                            remove_private=True)
        return time.perf_counter() - t


def run_dicognito(files: list[Path], out: Path) -> float:
    from dicognito.anonymizer import Anonymizer

    anonymizer = Anonymizer()  # unseeded, as documented: its date offset is random on each run
    out.mkdir(parents=True)
    with warnings.catch_warnings():  # pydicom's warnings on keywords it does not know ("TimeOfInstallation")
        warnings.simplefilter("ignore")
        t = time.perf_counter()
        for path in files:
            with pydicom.dcmread(path) as ds:
                anonymizer.anonymize(ds)
                ds.save_as(out / f"{ds.SOPInstanceUID}.dcm")
        return time.perf_counter() - t


def run_orthanc(files: list[Path], out: Path, work: Path) -> tuple[float, str]:
    import requests

    from dicom_assets.testing.orthanc import OrthancNode

    node = OrthancNode(work / "orthanc", stable_age=60).start()
    try:
        s = requests.Session()
        s.auth = (node.user, node.password)
        version = s.get(node.url + "/system").json()["Version"]
        out.mkdir(parents=True)
        t = time.perf_counter()
        studies = []
        for path in files:
            r = s.post(node.url + "/instances", data=path.read_bytes())
            r.raise_for_status()
            studies.append(r.json()["ParentStudy"])
        for study in dict.fromkeys(studies):
            r = s.post(f"{node.url}/studies/{study}/anonymize", json={})
            r.raise_for_status()
            new = r.json()["ID"]
            z = s.get(f"{node.url}/studies/{new}/archive")
            z.raise_for_status()
            with zipfile.ZipFile(io.BytesIO(z.content)) as zf:
                zf.extractall(out / study[:8])
        took = time.perf_counter() - t
    finally:
        node.stop()
    return took, f"Orthanc {version}, default profile (DICOM 2021b)"


# --------------------------------------------------------------------------- measuring
def leaks(folder: Path, root: Path, plan: Plan) -> tuple[dict[bytes, int], dict[bytes, int], int, int]:
    """(token -> files holding it, token -> file paths holding it, files with a leak, files), by a
    case-insensitive byte search of every file under ``folder`` and of its path below ``root``."""
    pattern = re.compile(b"|".join(re.escape(t) for t in sorted(plan.where, key=len, reverse=True)), re.IGNORECASE)
    lookup = {t.lower(): t for t in plan.where}
    in_bytes: Counter = Counter()
    in_names: Counter = Counter()
    leaky = count = 0
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        count += 1
        found = {lookup[m.lower()] for m in pattern.findall(path.read_bytes())}
        named = {lookup[m.lower()] for m in pattern.findall(path.relative_to(root).as_posix().encode())}
        in_bytes.update(found)
        in_names.update(named)
        leaky += bool(found or named)
    return dict(in_bytes), dict(in_names), leaky, count


def dciodvfy_errors(path: Path) -> set[str]:
    done = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, errors="replace")
    return {line.strip() for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error")}


def new_errors(folder: Path, inputs: dict[int, set[str]]) -> tuple[int, int, Counter, int]:
    """(files with an error line their input did not have, such lines, their kinds, files not matched
    to an input by InstanceNumber)."""
    files = lines = unmatched = 0
    kinds: Counter = Counter()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            number = int(pydicom.dcmread(path, stop_before_pixels=True, force=True).get("InstanceNumber", 0) or 0)
        except Exception:
            number = 0
        before = inputs.get(number)
        if before is None:
            unmatched += 1
            before = set()
        extra = dciodvfy_errors(path) - before
        files += bool(extra)
        lines += len(extra)
        kinds.update(re.sub(r"\s+", " ", e.replace("(which may not be present otherwise) ", ""))[:150] for e in extra)
    return files, lines, kinds, unmatched


def by_option(tokens, plan: Plan, options) -> dict[str, set[bytes]]:
    """The tokens whose attribute the options keep (K) or clean (C: a text keeps what is not a
    known identifying value of the visit, a time of day is kept), against the Basic Profile: there
    by the site's decision."""
    profile = ours.load_profile(options)
    out: dict[str, set[bytes]] = {"K": set(), "C": set()}
    for t in tokens:
        action = profile.action(plan.tags[t]) if t in plan.tags else None
        if action in out:
            out[action].add(t)
    return out


# --------------------------------------------------------------------------- the report
def table(rows: dict[str, dict], total: int, files: int) -> list[str]:
    head = ["tool", "tokens leaked", "of which in file names", "files with a leak",
            "files dciodvfy objects to (new)", "new error lines", "ms per file"]
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for name, r in rows.items():
        if "error" in r:
            out.append(f"| {name} | {r['error']} |" + " |" * (len(head) - 2))
            continue
        kept = f" ({r['kept']})" if r.get("kept") else ""
        out.append(f"| {name} | {r['leaked']} of {total}{kept} | {r['named']} | {r['leaky']} of {r['files']} | "
                   f"{r['dv_files']} | {r['dv_lines']} | {r['ms']:.1f} |")
    return out


def goals(rows: dict[str, dict]) -> list[str]:
    ref = rows.get("ours", {})
    others = {k: v for k, v in rows.items() if not k.startswith("ours") and "error" not in v}
    if "error" in ref or not ref or not others:
        return ["  goals: not evaluated (ours or every other tool missing)"]
    leaked_elsewhere = set().union(*(v["tokens"] for v in others.values()))
    ours_there = ref["tokens"] & leaked_elsewhere
    out = [f"  zero leaks where any of them leaks: {'MET' if not ours_there else 'MISSED'} "
           f"(ours leaks {len(ours_there)} of the {len(leaked_elsewhere)} tokens another tool leaks; "
           f"{len(ref['tokens'])} in all)"]
    fastest = min(others, key=lambda k: others[k]["ms"])
    f_ms = others[fastest]["ms"]
    out.append(f"  time per file <= the fastest of them: {'MET' if ref['ms'] <= f_ms else 'MISSED'} "
               f"(ours {ref['ms']:.1f} ms, fastest {fastest} {f_ms:.1f} ms)")
    if "beyond_options" in rows.get("ours-site", {}):
        b = rows["ours-site"]["beyond_options"]
        out.append(f"  ours with the site's options: {len(b & leaked_elsewhere)} of those tokens leak beyond what "
                   f"the options keep or clean ({len(b)} in all)")
    if "ours+check" in rows and "error" not in rows["ours+check"]:
        c = rows["ours+check"]["ms"]
        out.append(f"  with its leak check (share_visit): {'MET' if c <= f_ms else 'MISSED'} ({c:.1f} ms)")
    return out


def leak_lines(rows: dict[str, dict], plan: Plan, limit: int) -> list[str]:
    out = []
    for name, r in rows.items():
        if "error" in r or not r["tokens"]:
            continue
        groups: dict[str, list[str]] = defaultdict(list)
        tokens = r.get("beyond_options", r["tokens"])
        for t in sorted(tokens, key=lambda t: plan.where[t]):
            w = plan.where[t]
            kind = ("private" if "private" in w else "nested" if "[0]" in w else "top level")
            groups[kind].append(w + (" [name]" if t in r["named_tokens"] else ""))
        parts = []
        for kind in ("top level", "nested", "private"):
            if groups[kind]:
                shown = ", ".join(groups[kind][:limit]) + (f", ... {len(groups[kind]) - limit} more"
                                                           if len(groups[kind]) > limit else "")
                parts.append(f"{kind} {len(groups[kind])}: {shown}")
        label = f"{name} (beyond its options' K and C)" if "beyond_options" in r else name
        out.append(f"  {label}: " + ("; ".join(parts) or "none"))
    return out


def measure(name, folder: Path, seconds: float, n: int, plan: Plan, inputs: dict[int, set[str]]) -> dict:
    in_bytes, in_names, leaky, count = leaks(folder, folder, plan)
    dv_files, dv_lines, kinds, unmatched = new_errors(folder, inputs)
    tokens = set(in_bytes) | set(in_names)
    row = {"tokens": tokens, "named_tokens": set(in_names), "leaked": len(tokens), "named": len(in_names),
           "leaky": leaky, "files": count, "dv_files": dv_files, "dv_lines": dv_lines, "kinds": kinds,
           "unmatched": unmatched, "ms": 1000 * seconds / n}
    if name == "ours-site":
        opt = by_option(tokens, plan, ours.DEFAULT_OPTIONS)
        row["kept"] = f"{len(opt['K'])} kept (K), {len(opt['C'])} cleaned (C) by option"
        row["beyond_options"] = tokens - opt["K"] - opt["C"]
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=300, help="files in the corpus (round-robin over the sources)")
    ap.add_argument("--only", choices=TOOLS, action="append", help="run only these tools (repeatable)")
    ap.add_argument("--work", type=Path, default=None, help="folder for the corpus and outputs (default: temporary)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--show", type=int, default=8, help="leaked attributes named per tool and kind")
    args = ap.parse_args(argv)

    from dicom_assets.testing.orthanc import missing_tools
    from dicom_assets.testing.samples import ensure_samples

    if not shutil.which("dciodvfy"):
        print("cannot run: dciodvfy (Debian dicom3tools) is not installed", file=sys.stderr)
        return 3
    samples = ensure_samples(os.environ.get("DICOM_ASSETS_CACHE", str(REPO / ".cache")))
    work = args.work or Path(tempfile.mkdtemp(prefix="dicom-assets-bench-deid-"))
    shutil.rmtree(work / "corpus", ignore_errors=True)
    t = time.monotonic()
    plan, files = build_corpus(work / "corpus", args.files, samples.pydicom_files, ours.load_profile(()))
    in_bytes, in_names, _, _ = leaks(work / "corpus", work / "corpus", plan)
    missing = [plan.where[t] for t in plan.where if t not in in_bytes]
    if missing:
        print(f"planted but not in the corpus's bytes (left out of the search): {missing}", file=sys.stderr)
        for tok in [t for t in plan.where if t not in in_bytes]:
            del plan.where[tok]
    inputs = {}
    for p in files:
        number = int(pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber)
        inputs[number] = dciodvfy_errors(p)
    print(f"corpus: {len(files)} files, {len(plan.where)} tokens planted, built and checked in "
          f"{time.monotonic() - t:.0f} s; not planted: {dict(plan.skipped)}", file=sys.stderr, flush=True)

    wanted = args.only or list(TOOLS)
    why = missing_tools()
    rows: dict[str, dict] = {}
    notes: dict[str, str] = {}
    for name in wanted:
        folder = work / "out" / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            if name == "ours":
                seconds = run_ours(files, folder)
            elif name == "ours-site":
                seconds = run_ours(files, folder, ours.DEFAULT_OPTIONS)
            elif name == "ours+check":
                seconds, notes[name] = run_ours_checked(files, folder)
                if not folder.exists():  # withheld: nothing to scan; its own figures are in the note
                    rows[name] = {"error": f"withheld by its check ({notes[name]})", "ms": 1000 * seconds / len(files)}
                    continue
            elif name == "deid":
                seconds = run_deid(files, folder)
            elif name == "dicognito":
                seconds = run_dicognito(files, folder)
            else:
                if "orthanc" in why:
                    raise RuntimeError("Orthanc is not installed")
                seconds, notes[name] = run_orthanc(files, folder, work)
        except Exception as exc:  # a tool that fails is a row that says so
            rows[name] = {"error": f"failed: {type(exc).__name__}: {str(exc)[:200]}"}
            continue
        rows[name] = measure(name, folder, seconds, len(files), plan, inputs)
        print(f"{name}: {rows[name]['ms']:.1f} ms/file, {rows[name]['leaked']} tokens leaked "
              f"(load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)

    versions = {m: _version(m) for m in ("pydicom", "deid", "dicognito")}
    print(f"\nde-identification of {len(files)} real scanner files (pydicom's, {len(BASES)} sources), "
          f"{len(plan.where)} planted tokens; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f} at the end; "
          + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print("\n".join(table(rows, len(plan.where), len(files))))
    print("\n".join(goals(rows)))
    print("leaked, by the attribute the token was planted in:")
    print("\n".join(leak_lines(rows, plan, args.show)))
    print("new dciodvfy errors, the most frequent kinds:")
    for name, r in rows.items():
        if "error" not in r and r["kinds"]:
            print(f"  {name}: " + "; ".join(f"{k} x{c}" for k, c in r["kinds"].most_common(4))
                  + (f" ({r['unmatched']} files not matched to an input)" if r["unmatched"] else ""))
    for name, note in notes.items():
        print(f"  {name}: {note}")
    if not args.keep and args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _version(module: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return "not installed"


if __name__ == "__main__":
    sys.exit(main())
