"""The Celery app of the cluster profile's workers (``celery -A dicom_assets.celery_app worker``):
dagster-celery's ``execute_plan`` task, configured from the environment (docs/deploy.md)."""

from .defs.cluster import make_worker_app

app = make_worker_app()
