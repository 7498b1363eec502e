# Sourced by scripts that need their own Azurite (demo-cloud.sh,
# cloud-bench.sh). start_azurite LOG [AZURITE OPTIONS...] starts
# azurite-blob on a free loopback port, waits for it, creates the
# containers in $AZURITE_CONTAINERS, stops it on exit, and exports
# AZURE_STORAGE_USE_EMULATOR and AZURITE_BLOB_STORAGE_URL (what coffre,
# through object_store, reads). Sets AZURITE_PORT and AZURITE_PID.
AZURITE_KEY='Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=='
start_azurite() {
  local log=$1; shift
  command -v azurite-blob >/dev/null || { echo "azurite-blob not installed (make azurite)" >&2; return 1; }
  AZURITE_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  azurite-blob --blobHost 127.0.0.1 --blobPort "$AZURITE_PORT" "$@" \
    --skipApiVersionCheck --disableTelemetry > "$log" 2>&1 &
  AZURITE_PID=$!
  trap 'kill $AZURITE_PID 2>/dev/null || true' EXIT
  local i
  for i in $(seq 300); do
    (exec 3<>"/dev/tcp/127.0.0.1/$AZURITE_PORT") 2>/dev/null && break
    sleep 0.1
  done
  NODE_PATH=$(npm root -g) node "$(dirname "${BASH_SOURCE[0]}")/azure-container.js" \
    "http://127.0.0.1:$AZURITE_PORT" devstoreaccount1 "$AZURITE_KEY" ${AZURITE_CONTAINERS:-vaults}
  export AZURE_STORAGE_USE_EMULATOR=true AZURITE_BLOB_STORAGE_URL="http://127.0.0.1:$AZURITE_PORT"
}
