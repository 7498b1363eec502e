#!/usr/bin/env bash
# A full backup and a restore of IMAGE into a local vault and into a vault
# in Azurite (loopback), in one run, with the requests Azurite served.
#
#   scripts/cloud-bench.sh IMAGE [WORKDIR]
#
# COFFRE (default: coffre on PATH) is the binary. Azurite must be installed
# (`make azurite`). AZURITE_MODE=disk (default: Azurite keeps blobs in
# files, as a real service keeps them on its disks, but here on the same two
# cores) or memory (`--inMemoryPersistence`: closer to a remote service,
# whose disk work is not done on this machine). Prints one line per step and a summary; the restores are
# compared with IMAGE.
set -euo pipefail

IMAGE=${1:?usage: cloud-bench.sh IMAGE [WORKDIR]}
WORK=${2:-$(mktemp -d /tmp/coffre-cloud-bench.XXXXXX)}
COFFRE=${COFFRE:-coffre}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$WORK"
rm -rf "$WORK/local" "$WORK/cache" "$WORK/cache2" "$WORK/azurite" "$WORK"/*.restored
mkdir -p "$WORK/azurite"

MODE=${AZURITE_MODE:-disk}
case $MODE in
  disk) PERSIST=(--location "$WORK/azurite") ;;
  memory) PERSIST=(--inMemoryPersistence) ;;
  *) echo "AZURITE_MODE must be disk or memory" >&2; exit 2 ;;
esac
# shellcheck source=scripts/azurite-lib.sh
. "$HERE/azurite-lib.sh"
AZURITE_CONTAINERS=bench start_azurite "$WORK/azurite.log" "${PERSIST[@]}"
export COFFRE_REGISTRY=off

secs() { python3 -c "import time; print(time.monotonic())"; }
step() { # NAME COMMAND...: runs and prints the wall time
  local name=$1; shift
  local t0 t1
  sync
  t0=$(secs)
  "$@" > "$WORK/$name.out" 2>&1 || { cat "$WORK/$name.out"; exit 1; }
  t1=$(secs)
  python3 -c "print(f'{\"$name\":<16} {($t1-$t0):7.2f} s')"
  echo "$t0 $t1" > "$WORK/$name.time"
}
requests() { grep -cE '"(GET|PUT|HEAD|DELETE|POST) ' "$WORK/azurite.log" || true; }

SIZE=$(stat -c %s "$IMAGE")
"$COFFRE" vault create --vault "$WORK/local" --name local --snapshot-area "$WORK/area-local" > /dev/null
# Plain, like the local vault it is compared with (object storage is
# encrypted by default).
"$COFFRE" vault create --store "azure://devstoreaccount1/bench/v" --vault "$WORK/cache" --name cloud \
  --encryption none --snapshot-area "$WORK/area-cloud" > /dev/null
R0=$(requests)
step local-backup "$COFFRE" backup --vault "$WORK/local" --item disk "$IMAGE"
step azure-backup "$COFFRE" backup --vault "$WORK/cache" --item disk "$IMAGE"
R1=$(requests)
step local-restore "$COFFRE" restore --vault "$WORK/local" --item disk --point latest --from vault --to "$WORK/local.restored"
cmp "$IMAGE" "$WORK/local.restored"
rm -f "$WORK/local.restored"
# A fresh host: attach (builds its cache from the store), then restore.
step azure-attach "$COFFRE" vault attach --store "azure://devstoreaccount1/bench/v" --vault "$WORK/cache2"
R2=$(requests)
step azure-restore "$COFFRE" restore --vault "$WORK/cache2" --item disk --point latest --from vault --to "$WORK/azure.restored"
R3=$(requests)
cmp "$IMAGE" "$WORK/azure.restored"
rm -f "$WORK/azure.restored"
STORED=$("$COFFRE" --output json vault show --vault "$WORK/cache" | python3 -c 'import json,sys; print(json.load(sys.stdin)["stored_bytes"])')

python3 - "$WORK" "$SIZE" "$STORED" "$R0" "$R1" "$R2" "$R3" <<'EOF'
import sys
work, size, stored, r0, r1, r2, r3 = sys.argv[1], *map(int, sys.argv[2:])
def t(name):
    a, b = map(float, open(f"{work}/{name}.time").read().split())
    return b - a
mib = size / 2**20
gib_stored = stored / 2**30
print()
import os
print(f"image {mib:.0f} MiB, {stored / 2**20:.1f} MiB stored, Azurite {os.environ.get('AZURITE_MODE', 'disk')}")
for op in ("backup", "restore"):
    loc, az = t(f"local-{op}"), t(f"azure-{op}")
    print(f"{op:8} local {mib / loc:7.0f} MiB/s   azure {mib / az:7.0f} MiB/s   azure/local {loc / az:5.2f}")
print(f"attach (fresh host, cache from the store) {t('azure-attach'):.2f} s")
print(f"requests: backup {r1 - r0} ({(r1 - r0) / gib_stored:.0f} per GiB stored), restore {r3 - r2} ({(r3 - r2) / gib_stored:.0f} per GiB stored)")
EOF
