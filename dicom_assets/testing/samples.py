"""Real scanner DICOM files, fetched from packages on PyPI and cached.

No test and no demo invents DICOM headers from nothing: they start from the real files
that ship inside these distributions (pinned, so the demo builder gives the same bytes on
every machine):

* ``pydicom`` wheel: ``pydicom/data/test_files/`` (dicomdirtests tree, MR_small*, ...)
* ``heudiconv`` wheel: ``heudiconv/tests/data/`` (Siemens mosaics, scouts, Phoenix report)
* ``nibabel`` wheel: ``nibabel/nicom/tests/data/`` (gzip DICOMs, Philips enhanced, ...)
* ``xnat`` 0.8.1 sdist: ``xnat/tests/resources/Case001/`` (10-series GE MR session) and
  the XNAT data-model schemas ``xnat/tests/{xnat,xdat}.xml``.

The fetch uses ``pip download --no-deps`` and fails loudly; it never skips.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import SampleFetchError


@dataclass(frozen=True)
class SampleSource:
    name: str
    version: str
    sdist: bool
    prefixes: tuple[str, ...]  # paths inside the distribution to keep (after the top folder)


SOURCES: tuple[SampleSource, ...] = (
    SampleSource("pydicom", "3.0.2", False, ("pydicom/data/test_files/",)),
    SampleSource("heudiconv", "1.5.1", False, ("heudiconv/tests/data/",)),
    SampleSource("nibabel", "5.4.2", False, ("nibabel/nicom/tests/data/",)),
    SampleSource(
        "xnat",
        "0.8.1",
        True,
        ("xnat/tests/resources/Case001/", "xnat/tests/xnat.xml", "xnat/tests/xdat.xml"),
    ),
)


def default_cache_dir() -> Path:
    from ..settings import current

    env = current().cache
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dicom-assets"


@dataclass(frozen=True)
class Samples:
    root: Path

    def source_dir(self, name: str) -> Path:
        src = next(s for s in SOURCES if s.name == name)
        return self.root / f"{src.name}-{src.version}"

    @property
    def pydicom_files(self) -> Path:
        return self.source_dir("pydicom") / "pydicom" / "data" / "test_files"

    @property
    def heudiconv_data(self) -> Path:
        return self.source_dir("heudiconv") / "heudiconv" / "tests" / "data"

    @property
    def nibabel_data(self) -> Path:
        return self.source_dir("nibabel") / "nibabel" / "nicom" / "tests" / "data"

    @property
    def xnat_case001(self) -> Path:
        return self.source_dir("xnat") / "xnat" / "tests" / "resources" / "Case001"

    @property
    def xnat_schemas(self) -> Path:
        return self.source_dir("xnat") / "xnat" / "tests"


def _download(src: SampleSource, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-q", "-d", str(dest)]
    cmd += ["--no-binary", ":all:"] if src.sdist else ["--only-binary", ":all:"]
    cmd.append(f"{src.name}=={src.version}")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    files = sorted(dest.iterdir()) if dest.exists() else []
    if proc.returncode != 0 or not files:
        raise SampleFetchError(
            f"could not download the real DICOM samples of {src.name}=={src.version} from PyPI "
            f"(pip exited {proc.returncode}): {proc.stderr.strip()[-2000:]}"
        )
    return files[0]


def _extract(src: SampleSource, archive: Path, target: Path) -> int:
    count = 0

    def keep(rel: str) -> bool:
        return any(rel.startswith(p) or rel == p.rstrip("/") for p in src.prefixes)

    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if info.is_dir() or not keep(info.filename):
                    continue
                out = target / info.filename
                out.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as fi, open(out, "wb") as fo:
                    shutil.copyfileobj(fi, fo)
                count += 1
    else:
        with tarfile.open(archive) as tf:
            for member in tf:
                if not member.isfile():
                    continue
                rel = member.name.split("/", 1)[1] if "/" in member.name else member.name
                if not keep(rel) or ".." in rel.split("/"):
                    continue
                out = target / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                with tf.extractfile(member) as fi, open(out, "wb") as fo:
                    shutil.copyfileobj(fi, fo)
                count += 1
    return count


def ensure_samples(cache_dir: Path | str | None = None, log=print) -> Samples:
    """Fetch (once) and return the cached real DICOM samples."""
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    root = root / "samples"
    root.mkdir(parents=True, exist_ok=True)
    samples = Samples(root)
    for src in SOURCES:
        target = samples.source_dir(src.name)
        if (target / ".complete").exists():
            continue
        log(f"fetching real DICOM samples from {src.name}=={src.version} (PyPI) ...")
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            tmp = Path(tmp)
            archive = _download(src, tmp / "dl")
            staging = tmp / "out"
            n = _extract(src, archive, staging)
            if n == 0:
                raise SampleFetchError(f"{archive.name} holds none of {src.prefixes}")
            (staging / ".complete").write_text(f"{src.name}=={src.version} {n} files\n")
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging, target)
    return samples
