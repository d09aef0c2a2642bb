"""A Celery worker of the cluster profile whose tarball writer pauses after each member, for
the kill test of test_celery.py (fault injection in a real worker, as crash.py does for a
folder swap): ``celery -A dicom_assets_tests.slow_worker worker``. The tarball is written for
real, only slowly, so that a SIGKILL lands in the middle of it."""

import time

from dicom_assets.celery_app import app  # noqa: F401 - the worker's app
from dicom_assets.core import tarball

PAUSE = 0.25
_member = tarball._Writer.member


def _slow_member(self, m, header):
    _member(self, m, header)
    time.sleep(PAUSE)


tarball._Writer.member = _slow_member
