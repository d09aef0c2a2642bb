"""The thin Dagster layer: one module per stage, each a shell over ``dicom_assets.core``."""
