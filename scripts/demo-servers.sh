# Sourced by scripts/demo.sh and scripts/demo-cluster.sh: the demo dataset root, the instance's
# dagster.yaml (DAGSTER_YAML), and the servers both demos run: the XNAT-compatible test server
# (standing in for the site's XNAT), the NBIA-compatible test server (standing in for TCIA, with a
# .tcia manifest dropped into downloads/tcia/) and a real Orthanc as the DICOM node (a visit pushed
# to it with storescu). Sets XNAT_PID, NBIA_PID and ORTHANC_PID; the caller traps them.
VENV=${VENV:?}; DEMO_ROOT=${DEMO_ROOT:?}; HOST=${HOST:-127.0.0.1}; PORT=${PORT:-3000}; XNAT_PORT=${XNAT_PORT:-8088}; NBIA_PORT=${NBIA_PORT:-8089}
ORTHANC_HTTP_PORT=${ORTHANC_HTTP_PORT:-8042}; ORTHANC_DICOM_PORT=${ORTHANC_DICOM_PORT:-4242}
"$VENV/bin/dicom-assets" demo-data "$DEMO_ROOT"
mkdir -p "$DAGSTER_HOME" && cp "${DAGSTER_YAML:-dagster.yaml}" "$DAGSTER_HOME/dagster.yaml"
# the demo shares each visit de-identified (deid is on in its global_config.json): a DEMO key, the same on
# every run so the demo's pseudonyms stay put, and never for real data (a site sets its own secret, and
# keeps it out of the repo); the pseudonym map beside the demo root, outside share/
export DICOM_ASSETS_DEID_KEY="${DICOM_ASSETS_DEID_KEY:-dicom-assets-DEMO-key-never-for-real-data}"
export DICOM_ASSETS_DEID_MAP="${DICOM_ASSETS_DEID_MAP:-$(dirname "$DEMO_ROOT")/pseudonyms.tsv}"
export XNAT_HOST="http://127.0.0.1:$XNAT_PORT" XNAT_USER=demo XNAT_VERIFY=true
# a demo password, kept in the environment only; set XNAT_PASSWORD yourself to choose it
export XNAT_PASSWORD="${XNAT_PASSWORD:-demo-$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')}"
"$VENV/bin/dicom-assets-testing" xnat-server --port "$XNAT_PORT" --user "$XNAT_USER" &
XNAT_PID=$!
# the demo manifest names this server (downloadServerUrl); TCIA_SERVERS allows it instead of TCIA's public ones
export TCIA_SERVERS="http://127.0.0.1:$NBIA_PORT"
"$VENV/bin/dicom-assets-testing" nbia-server --port "$NBIA_PORT" --manifest-out "$DEMO_ROOT/downloads/tcia/demo-basket.tcia" &
NBIA_PID=$!
# the DICOM node: a real Orthanc (AE title DANODE); the demo's "scanner" pushes QPN_004 ses-01 to it with storescu
export ORTHANC_URL="http://127.0.0.1:$ORTHANC_HTTP_PORT" ORTHANC_USER=demo
export ORTHANC_PASSWORD="${ORTHANC_PASSWORD:-demo-$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')}"
"$VENV/bin/dicom-assets-testing" orthanc-node --workdir "$(dirname "$DEMO_ROOT")/orthanc" --http-port "$ORTHANC_HTTP_PORT" \
  --dicom-port "$ORTHANC_DICOM_PORT" --user "$ORTHANC_USER" --push QPN_004/ses-01 &
ORTHANC_PID=$!
