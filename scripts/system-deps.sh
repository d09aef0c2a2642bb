#!/usr/bin/env bash
# System packages the project needs beyond PyPI, installed when missing (Debian/Ubuntu, as
# root; CI runs as root). Without root or apt, it says what is missing and goes on: the
# tests that need a missing program skip with that reason.
#   git       DataLad / git-annex
#   chromium  the end-to-end browser test of the Dagster UI
#   postgresql  the scale-out storage test (a throwaway cluster in a temporary folder)
#   redis-server  the Celery broker and result backend of the cluster profile (tests, demo-cluster, bench)
#   orthanc   the DICOM node (a real Orthanc: the tests', the demo's and the bench's)
#   dcmtk     DICOM network tools (storescu pushes as a scanner console; storescp for the bench)
#   p7zip-full  7z, which DataLad's legacy archive remote (datalad-archives) needs; the
#               archivist remote used by default reads tarballs natively
#   dicom3tools  dciodvfy, the IOD checker the de-identified copy is held to: no error in a copy
#               that its source did not have (dicom_assets_tests/test_deid_tools.py)
set -uo pipefail
need=()
command -v git >/dev/null 2>&1 || need+=(git)
[ -x /usr/bin/chromium ] || command -v chromium >/dev/null 2>&1 || need+=(chromium)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v 7z >/dev/null 2>&1 || need+=(p7zip-full)
[ -x /usr/sbin/Orthanc ] || command -v Orthanc >/dev/null 2>&1 || need+=(orthanc)
command -v storescu >/dev/null 2>&1 || need+=(dcmtk)
command -v dciodvfy >/dev/null 2>&1 || need+=(dicom3tools)
((${#need[@]})) || exit 0
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "installing system packages: ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null \
    || { echo "apt-get could not install: ${need[*]}" >&2; exit 1; }
else
  echo "missing system packages: ${need[*]} (install them with your package manager; tests needing them skip)" >&2
fi
