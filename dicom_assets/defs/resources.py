"""Resources: the dataset root (and, later, XNAT and TCIA connections)."""


import os
from pathlib import Path

from dagster import ConfigurableResource
from pydantic import Field

from ..core.layout import Dataset


def default_dataset_root() -> str:
    """``$DICOM_ASSETS_ROOT``, else the demo root of a source checkout (``.demo/dataset``)."""
    env = os.environ.get("DICOM_ASSETS_ROOT")
    if env:
        return env
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "pyproject.toml").is_file():
        return str(checkout / ".demo" / "dataset")
    return str(Path.cwd() / "dicom-assets-demo")


class DatasetResource(ConfigurableResource):
    """The dataset root; every path under it comes from ``core.layout``."""

    root: str = Field(description="Dataset root folder (global_config.json, downloads/, dicom/, store/ ...)")

    def open(self) -> Dataset:
        return Dataset.open(self.root)
