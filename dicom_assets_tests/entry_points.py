"""Every public entry point that reads user or network input, fed generated hostile input in a
process of its own under an address-space limit (``resource.setrlimit``), for the invariant test
(test_entry_points.py): each input ends in a result or a named error (a ``DicomAssetsError``),
never a traceback of another type, never a change to the input, never unbounded memory.

Run as ``python -m dicom_assets_tests.entry_points <work folder> <seed> <count> <limit MiB>``;
prints a JSON object: {"tried": {entry: n}, "failures": [...]}.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import resource
import sys
import tarfile
import traceback
import zipfile
from pathlib import Path

VALID = {
    "config": json.dumps({"dataset_name": "demo", "study_id": "QPN", "sessions": ["ses-01", "ses-02"],
                          "xnat_project": "QPN_X", "exclude_series": {"Exclude": ["Localizers"]},
                          "session_label_pattern": "{participant}_{session}", "organize_mode": "symlink"}).encode(),
    "manifest": b"participant_id,visit_id,session_id,datatype\nQPN_001,BL,ses-01,\"['anat']\"\n"
                b"QPN_002,BL,ses-01,\"['anat']\"\n",
    "dir_map": b"participant_id\tsession_id\tdownload\nQPN_001\t01\tQPN_001_MR.zip\n",
    "tcia": b"downloadServerUrl=https://nbia.cancerimagingarchive.net/nbia-api/services/o/\nincludeAnnotation=true\n"
            b"noOfrRetry=4\ndatabasketId=manifest-1.tcia\nmanifestVersion=3.0\nListOfSeriesToDownload=\n"
            b"1.3.6.1.4.1.14519.5.2.1.7695.1700.1234\n1.3.6.1.4.1.14519.5.2.1.7695.1700.5678\n",
    "dcm2bids": json.dumps({"descriptions": [{"datatype": "anat", "suffix": "T1w",
                                              "criteria": {"SeriesDescription": "*T1*"}}]}).encode(),
    "exclusions": json.dumps({"Exclude": ["Localizers", "AAHEAD"]}).encode(),
}


def _zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("a/IM1.dcm", b"\0" * 128 + b"DICM" + b"x" * 64)
        zf.writestr("b/IM2.dcm", b"y" * 200)
    return buf.getvalue()


def _tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in (("a/IM1.dcm", b"z" * 300), ("b/IM2.dcm", b"w" * 100)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


VALID["zip"], VALID["tar.gz"] = _zip(), _tar()


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One hostile variant of a valid input: cut, flipped, spliced with what breaks parsers."""
    kind = rng.choice(["cut", "flip", "insert", "nest", "huge", "encoding", "repeat"])
    if kind == "cut":
        return data[:rng.randrange(len(data) + 1)]
    if kind == "flip":
        out = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            if out:
                out[rng.randrange(len(out))] = rng.randrange(256)
        return bytes(out)
    at = rng.randrange(len(data) + 1)
    if kind == "insert":
        junk = rng.choice([b"\0", b"\xff\xfe", b"\r", b"\t\t\t", b'"', b"=cmd|'/C calc'!A0", b"{participant.__class__}",
                           b"../../etc/passwd", b"\xed\xa0\x80", bytes(rng.randrange(256) for _ in range(16))])
        return data[:at] + junk + data[at:]
    if kind == "nest":  # deep nesting: json's recursion, or a parser's
        return data[:at] + b"[" * rng.choice([100, 5000, 200000]) + data[at:]
    if kind == "huge":
        return data[:at] + rng.choice([b"9" * 5000, b"{participant:>999999999}", b"1e999999"]) + data[at:]
    if kind == "encoding":
        try:
            return data.decode("utf-8").encode(rng.choice(["utf-16", "utf-32", "latin-1", "cp1252"]), "replace")
        except UnicodeDecodeError:
            return data[::-1]
    return data * rng.randint(2, 50)


def entry_points(work: Path):
    """name -> (valid seed key, file name, call(path))."""
    from dicom_assets.core.bids import load_dcm2bids_config
    from dicom_assets.core.config import load_config
    from dicom_assets.core.downloads import DownloadItem, read_dicom_dir_map
    from dicom_assets.core.extract import extract_visit
    from dicom_assets.core.manifest import read_manifest
    from dicom_assets.core.tcia import parse_manifest
    from dicom_assets.core.xnat import read_exclusions

    def extract(kind):
        def call(path):
            target = work / "out" / f"P_{kind}"
            return extract_visit([DownloadItem(path, "ses-01", kind)], target)
        return call

    return {
        "config": ("config", "global_config.json", load_config),
        "manifest": ("manifest", "mr_proc_manifest.csv", lambda p: read_manifest(p, sessions=("ses-01", "ses-02"))),
        "dicom_dir_map": ("dir_map", "dicom_dir_map.tsv", read_dicom_dir_map),
        "tcia_manifest": ("tcia", "basket.tcia", parse_manifest),
        "dcm2bids_config": ("dcm2bids", "dcm2bids_config.json", load_dcm2bids_config),
        "xnat_exclusions": ("exclusions", "exclusions.json", read_exclusions),
        "extract_zip": ("zip", "P_MR.zip", extract("zip")),
        "extract_tar_gz": ("tar.gz", "P_MR.tar.gz", extract("tar.gz")),
    }


def main(argv: list[str]) -> int:
    work, seed, count, limit_mib = Path(argv[0]), int(argv[1]), int(argv[2]), int(argv[3])
    from dicom_assets.core.errors import DicomAssetsError

    points = entry_points(work)
    # bounded memory: every allocation past the limit fails (MemoryError), and is reported below
    limit = limit_mib << 20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    rng = random.Random(seed)
    tried: dict[str, int] = {}
    failures: list[dict] = []
    for i in range(count):
        name, (key, fname, call) = rng.choice(sorted(points.items()))
        data = mutate(VALID[key], rng) if i % 10 else VALID[key]
        path = work / f"{i}-{fname}"
        path.write_bytes(data)
        before = hashlib.sha256(data).hexdigest()
        try:
            call(path)
        except DicomAssetsError:
            pass  # a named refusal
        except BaseException as exc:  # anything else is the failure this test is about
            failures.append({"entry": name, "input": data[:300].hex(), "size": len(data), "error": type(exc).__name__,
                             "message": str(exc)[:300], "where": traceback.format_exc(limit=-3)[-800:]})
        if hashlib.sha256(path.read_bytes()).hexdigest() != before:
            failures.append({"entry": name, "error": "input changed", "size": len(data)})
        path.unlink()
        tried[name] = tried.get(name, 0) + 1
    print(json.dumps({"tried": tried, "failures": failures}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
