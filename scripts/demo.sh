#!/usr/bin/env bash
# The demo: a demo dataset root, the XNAT-compatible test server on loopback (standing in for
# the site's XNAT), the NBIA-compatible test server (standing in for TCIA, with a .tcia manifest
# dropped into downloads/tcia/), a real Orthanc as the DICOM node (a visit pushed to it with
# storescu), and `dagster dev` (webserver + daemon). Ctrl-C stops everything.
set -euo pipefail
# shellcheck source=scripts/demo-servers.sh
. "$(dirname "$0")/demo-servers.sh"
trap 'kill $XNAT_PID $NBIA_PID $ORTHANC_PID 2>/dev/null || true' EXIT
echo "XNAT test server: $XNAT_HOST (user $XNAT_USER)"
echo "TCIA (NBIA) test server: $TCIA_SERVERS"
echo "DICOM node (Orthanc): $ORTHANC_URL; push to AE title DANODE at 127.0.0.1:$ORTHANC_DICOM_PORT"
echo "Dagster UI: http://$HOST:$PORT  (dataset root: $DEMO_ROOT, instance: $DAGSTER_HOME)"
DICOM_ASSETS_ROOT="$DEMO_ROOT" "$VENV/bin/dagster" dev -w workspace.yaml -h "$HOST" -p "$PORT"
