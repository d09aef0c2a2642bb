#!/usr/bin/env bash
# The demo on the cluster profile: what scripts/demo.sh starts (demo dataset root, XNAT and NBIA
# test servers, Orthanc as the DICOM node), plus Redis, a throwaway PostgreSQL and two Celery
# workers on loopback (`dicom-assets-testing cluster`: each worker its own process group, folder
# and HOME), and `dagster dev` with deploy/dagster.celery.yaml: every step of the demo's visits
# runs on the workers, with no click. Ctrl-C stops everything.
set -euo pipefail
WORKERS=${WORKERS:-2}
DAGSTER_YAML=deploy/dagster.celery.yaml
# shellcheck source=scripts/demo-servers.sh
. "$(dirname "$0")/demo-servers.sh"
CLUSTER_DIR="$(dirname "$DEMO_ROOT")/cluster"
# Redis, PostgreSQL and the workers (they get the XNAT, TCIA and Orthanc variables above); the
# daemon's environment (DAGSTER_PG_*, DICOM_ASSETS_EXECUTOR=celery, the broker URL) comes back in a file
rm -f "$CLUSTER_DIR/daemon.env"
"$VENV/bin/dicom-assets-testing" cluster --root "$DEMO_ROOT" --workdir "$CLUSTER_DIR" --workers "$WORKERS" \
  --env-out "$CLUSTER_DIR/daemon.env" &
CLUSTER_PID=$!
trap 'kill $XNAT_PID $NBIA_PID $ORTHANC_PID $CLUSTER_PID 2>/dev/null || true; wait $CLUSTER_PID 2>/dev/null || true' EXIT
for _ in $(seq 1 240); do [ -s "$CLUSTER_DIR/daemon.env" ] && break; kill -0 $CLUSTER_PID 2>/dev/null || exit 1; sleep 0.5; done
[ -s "$CLUSTER_DIR/daemon.env" ] || { echo "the cluster did not start; see $CLUSTER_DIR" >&2; exit 1; }
# shellcheck disable=SC1091
. "$CLUSTER_DIR/daemon.env"
# the upload pool's row made before the first runs claim it (a Dagster race on a fresh instance)
"$VENV/bin/python" -c 'from dicom_assets.testing.cluster import prime_pools; prime_pools()'
echo "XNAT test server: $XNAT_HOST (user $XNAT_USER)"
echo "TCIA (NBIA) test server: $TCIA_SERVERS"
echo "DICOM node (Orthanc): $ORTHANC_URL; push to AE title DANODE at 127.0.0.1:$ORTHANC_DICOM_PORT"
echo "Celery workers: $WORKERS (logs: $CLUSTER_DIR/workers/*/worker.log)"
echo "Dagster UI: http://$HOST:$PORT  (dataset root: $DEMO_ROOT, instance: PostgreSQL, steps on the workers)"
"$VENV/bin/dagster" dev -w workspace.yaml -h "$HOST" -p "$PORT"
