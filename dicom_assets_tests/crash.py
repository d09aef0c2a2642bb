"""A real crash in the middle of a folder swap (``fsutil.swap_dir``), for the crash tests.

Run as ``python -m dicom_assets_tests.crash '<json>'``: the process patches one primitive of
``fsutil``'s swap so that right after its N-th call inside ``swap_dir`` the process dies with
``os._exit(CRASHED)`` (no ``finally``, no ``except`` cleanup: what a power cut or ``kill -9``
leaves), then runs one step of the chain through its core function (``STEPS``: the same call the
asset makes, without Dagster). ``mode`` ``fallback`` makes the system look as if it had no
``renameat2(RENAME_EXCHANGE)``, so the two-rename path is crashed too.
"""

from __future__ import annotations

import json
import os
import sys

from dicom_assets.core import fsutil

CRASHED = 70

#: where a swap can be cut, by mode: the primitive and which of its calls inside swap_dir
POINTS = {
    "exchange": {"before": ("recover_dir", 1), "after_exchange": ("_exchange", 1), "after_remove": ("_remove", 1)},
    "fallback": {"before": ("recover_dir", 1), "after_aside": ("_rename", 1), "after_in": ("_rename", 2),
                 "after_remove": ("_remove", 1)},
}


def _arm(mode: str, point: str) -> None:
    name, nth = POINTS[mode][point]
    real = getattr(fsutil, name)
    calls = [0]

    def wrapped(*args, **kw):
        # recover_dir is cut before it runs (the staged folder is complete, nothing swapped yet)
        if name == "recover_dir":
            if kw.get("keep") is not None:
                os._exit(CRASHED)
            return real(*args, **kw)
        out = real(*args, **kw)
        calls[0] += 1
        if calls[0] == nth:
            os._exit(CRASHED)
        return out

    setattr(fsutil, name, wrapped)
    if mode == "fallback":
        fsutil._exchange = lambda a, b: False


def _swap(staged: str, target: str) -> None:
    fsutil.swap_dir(staged, target)


def _extract(root: str, visit: str) -> None:
    from dicom_assets.core.dataset import Dataset
    from dicom_assets.core.extract import extract_visit
    from dicom_assets.core.ids import parse_visit_key
    from dicom_assets.core.sources import visit_source

    ds, v = Dataset.open(root), parse_visit_key(visit)
    extract_visit(visit_source(ds, v).dumps(ds), ds.layout.raw_dir(v), ds.config.limits)


def _organize(root: str, visit: str) -> None:
    from dicom_assets.core.dataset import Dataset
    from dicom_assets.core.dicomscan import Rules
    from dicom_assets.core.ids import parse_visit_key
    from dicom_assets.core.organize import organize_visit

    ds, v = Dataset.open(root), parse_visit_key(visit)
    cfg, lay = ds.config, ds.layout
    organize_visit(v.key, lay.raw_dir(v), lay.dicom_dir(v), Rules(cfg.exclude_series, cfg.exclude_derived,
                   cfg.derived_series_markers), cfg.organize_mode, report_path=lay.organize_report_path(v))


def _bids(root: str, visit: str) -> None:
    from dicom_assets.core.bids import convert_visit, load_dcm2bids_config
    from dicom_assets.core.dataset import Dataset
    from dicom_assets.core.ids import parse_visit_key

    ds, v = Dataset.open(root), parse_visit_key(visit)
    lay = ds.layout
    convert_visit(visit=v, layout=lay, dicom_dir=lay.dicom_dir(v), config=load_dcm2bids_config(lay.dcm2bids_config_path),
                  dataset_name=ds.config.dataset_name)


def _datalad(root: str, visit: str) -> None:
    from dicom_assets.core.datalad_index import index_visit
    from dicom_assets.core.dataset import Dataset
    from dicom_assets.core.ids import parse_visit_key

    ds, v = Dataset.open(root), parse_visit_key(visit)
    lay = ds.layout
    index_visit(lay.datalad_dir(ds.study, v), visit=v.key, study=ds.study,
                tarball_meta=json.loads(lay.metadata_tarball_path(ds.study, v).read_text()),
                dicoms_meta=json.loads(lay.metadata_dicoms_path(ds.study, v).read_text()),
                store_dir=lay.store_dir(ds.study), store_base_url=ds.config.datalad_store_url,
                superdataset=ds.config.datalad_superdataset)


STEPS = {"swap": _swap, "extract": _extract, "organize": _organize, "bids": _bids, "datalad": _datalad}


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    if spec.get("point"):
        _arm(spec["mode"], spec["point"])
    elif spec.get("mode") == "fallback":
        fsutil._exchange = lambda a, b: False
    STEPS[spec["step"]](*spec["args"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
