"""A dataset root opened: its layout, validated ``global_config.json`` and participant
manifest, each read once. Kept apart from ``core/layout.py``, which only builds paths (the
config and the manifest read files, and the manifest reads the downloads' layout)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from .config import GlobalConfig, load_config
from .layout import DatasetLayout
from .manifest import Manifest, read_manifest


@dataclass(frozen=True)
class Dataset:
    """A dataset root with its validated config and manifest, loaded once."""

    layout: DatasetLayout

    @classmethod
    def open(cls, root: Path | str) -> "Dataset":
        ds = cls(DatasetLayout(Path(root)))
        ds.config  # noqa: B018 - validate eagerly so errors surface at once
        ds.manifest  # noqa: B018
        return ds

    @cached_property
    def config(self) -> GlobalConfig:
        return load_config(self.layout.config_path)

    @cached_property
    def manifest(self) -> Manifest:
        return read_manifest(self.layout.manifest_path, sessions=self.config.sessions)

    @property
    def study(self) -> str:
        return self.config.study_id
