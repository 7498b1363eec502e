#!/usr/bin/env bash
# The demo behind `make demo-cloud`: starts Azurite (Microsoft's Azure
# Storage emulator) on a free port, creates a vault in it from "host A",
# attaches "host B", backs up two days of a disk image from each host (the
# same golden image, so B's first day adds almost nothing), runs GC twice
# while nothing is deleted, then restores every point from a fresh cache
# directory ("host C") and compares them byte for byte, and scans what
# Azurite stores for blocks of the images. Stops Azurite.
# The vault is encrypted (the default in object storage): every host opens
# it with the key file the demo generates, as an unattended host (the
# daemon, the scheduler) would.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${COFFRE_BIN:-${CARGO_TARGET_DIR:-target}/release/coffre}
WORK=${DEMO_DIR:-${TMPDIR:-/tmp}/coffre-demo-cloud}
SIZE_MB=${DEMO_SIZE_MB:-256}
[ -x "$BIN" ] || { echo "demo-cloud: $BIN not built (run make build)" >&2; exit 1; }
rm -rf "$WORK"; mkdir -p "$WORK/azurite"
say() { printf '\n== %s\n' "$*"; }

say "1. Azurite on loopback, blobs kept in $WORK/azurite"
# shellcheck source=scripts/azurite-lib.sh
. scripts/azurite-lib.sh
start_azurite "$WORK/azurite.log" --location "$WORK/azurite" --silent
echo "Azurite listens on 127.0.0.1:$AZURITE_PORT"
# start_azurite exported what every host sets for Azurite; a real account
# sets AZURE_STORAGE_ACCOUNT_KEY (or another credential) instead.
export COFFRE_REGISTRY="$WORK/registry"
URL=azure://devstoreaccount1/vaults/fleet
# Every coffre command's stderr is shown and kept: the demo fails at its
# end if coffre warned (a warning is a problem the demo must not hide).
C() {
    local rc=0
    "$BIN" "$@" 2> "$WORK/last.err" || rc=$?
    cat "$WORK/last.err" >&2
    cat "$WORK/last.err" >> "$WORK/coffre.err"
    return $rc
}

say "2. images: a ${SIZE_MB} MiB golden disk for both hosts' VMs"
python3 - "$WORK/golden.img" "$SIZE_MB" <<'EOF'
import random, sys
path, mb = sys.argv[1], int(sys.argv[2])
r = random.Random(42)
words = [bytes(r.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(r.randint(2, 9))) for _ in range(4000)]
with open(path, "wb") as f:
    f.truncate(mb << 20)
    at = 0
    while at < (mb << 20):
        n = r.randint(16, 256) << 10
        kind = r.randrange(4)
        if kind == 0:
            f.seek(at); f.write((b" ".join(r.choice(words) for _ in range(n // 5)))[:n])
        elif kind == 1:
            f.seek(at); f.write(r.randbytes(n))
        at += n
EOF
cp --sparse=always "$WORK/golden.img" "$WORK/vm-a.img"
cp --sparse=always "$WORK/golden.img" "$WORK/vm-b.img"
churn() { # IMAGE SEED: a day's writes, 40 extents of 256 KiB
  python3 - "$1" "$2" <<'EOF'
import random, sys, os
path, seed = sys.argv[1], int(sys.argv[2])
r = random.Random(seed)
size = os.path.getsize(path)
with open(path, "r+b") as f:
    for _ in range(40):
        f.seek(r.randrange(0, size - (256 << 10)) & ~4095); f.write(r.randbytes(256 << 10))
EOF
}

say "3. a key file for the hosts (32 random bytes, mode 0600): what unattended hosts open the vault with"
(umask 077; head -c 32 /dev/urandom > "$WORK/fleet.key")
stat -c '%a %s bytes %n' "$WORK/fleet.key"
# Every command reads it from COFFRE_KEY_FILE (or --key-file FILE); keep
# it off the disks this vault backs up, and its recovery text on paper.
export COFFRE_KEY_FILE="$WORK/fleet.key"

say "4. host A creates the vault in the store (encrypted: aes-256-gcm by default there); host B attaches"
C vault create --store "$URL" --vault "$WORK/host-a" --name fleet --snapshot-area "$WORK/snaps-a"
C vault attach --store "$URL" --vault "$WORK/host-b"
C key list --vault "$WORK/host-a"

say "5. day one: both hosts at once (B's VM is the same golden image)"
C backup --vault "$WORK/host-a" --item vm-a "$WORK/vm-a.img" &
A=$!
C backup --vault "$WORK/host-b" --item vm-b "$WORK/vm-b.img"
wait $A
cp --sparse=always "$WORK/vm-a.img" "$WORK/vm-a.day1"; cp --sparse=always "$WORK/vm-b.img" "$WORK/vm-b.day1"

say "6. day two: each VM wrote 10 MiB; both hosts back up again"
churn "$WORK/vm-a.img" 1; churn "$WORK/vm-b.img" 2
C backup --vault "$WORK/host-a" --item vm-a "$WORK/vm-a.img" &
A=$!
C backup --vault "$WORK/host-b" --item vm-b "$WORK/vm-b.img"
wait $A

say "7. GC from host B, twice: nothing is dead, so nothing goes (the golden image both hosts
uploaded at the same moment is stored twice, and GC keeps every copy of a live chunk)"
C gc --vault "$WORK/host-b"
C gc --vault "$WORK/host-b"

say "8. host C: a fresh, empty cache directory and the URL"
C vault attach --store "$URL" --vault "$WORK/host-c"
C vault show --vault "$WORK/host-c" | sed -n '1,16p'
for vm in vm-a vm-b; do
  ids=$(C --output json points --vault "$WORK/host-c" --item "$vm" | python3 -c 'import json,sys; print(" ".join(p["id"] for p in json.load(sys.stdin)))')
  set -- $ids
  C restore --vault "$WORK/host-c" --item "$vm" --point "$1" --from vault --to "$WORK/$vm.r1"
  C restore --vault "$WORK/host-c" --item "$vm" --point "$2" --from vault --to "$WORK/$vm.r2"
  cmp "$WORK/$vm.day1" "$WORK/$vm.r1"
  cmp "$WORK/$vm.img" "$WORK/$vm.r2"
  echo "$vm: both days restored byte-identical from the store"
  rm -f "$WORK/$vm.r1" "$WORK/$vm.r2"
done
C verify --vault "$WORK/host-c" --read-data

say "9. what a bucket reader sees: no block of either image in anything Azurite stores"
python3 - "$WORK/azurite" "$WORK/vm-a.img" "$WORK/vm-b.img" <<'EOF'
import os, sys
root, images = sys.argv[1], sys.argv[2:]
blocks = set()
for img in images:
    with open(img, "rb") as f:
        while (b := f.read(4096)):
            if b.strip(b"\0"):
                blocks.add(b)
found = files = 0
for d, _, names in os.walk(root):
    for n in names:
        with open(os.path.join(d, n), "rb") as f:
            data = f.read()
        files += 1
        found += sum(1 for i in range(0, max(len(data) - 4095, 0), 512) if data[i:i + 4096] in blocks)
print(f"{files} files of Azurite's storage scanned (512-byte steps): {found} blocks of the images found")
sys.exit(1 if found else 0)
EOF

say "10. summary"
C --output json vault show --vault "$WORK/host-c" | python3 -c '
import json, sys
s = json.load(sys.stdin)
name, store, points = s["name"], s["store"], s["points"]
logical, stored = s["logical_bytes"] / 2**20, s["stored_bytes"] / 2**20
print(f"vault {name} in {store}: {points} points, {logical:.0f} MiB of images, {stored:.1f} MiB stored")
'
if grep -q " WARN " "$WORK/coffre.err"; then
    echo "demo-cloud: FAILED: coffre warned (see $WORK/coffre.err):" >&2
    grep " WARN " "$WORK/coffre.err" | head -5 >&2
    exit 1
fi
echo "demo-cloud: OK (Azurite stopped; work files in $WORK)"
