"""The domain core: pure functions over paths and DICOM headers.

Nothing in this package imports Dagster; the Dagster layer (``dicom_assets.defs``)
is a thin shell over it.
"""
