#!/usr/bin/env bash
# The end-to-end demo behind `make demo`: builds a realistic ext4 disk image
# from files already on this machine, changes it for a second day, backs up
# both days into a fresh vault with an LRS replica and a GRS secondary,
# restores both and compares them byte for byte with the originals,
# replicates, restores from the secondary with the vault directory moved
# away, backs up a third day through a changed-block list, backs up a
# running QEMU's disk while its guest writes (through QEMU's
# copy-before-write and dirty bitmap), then prints a summary.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${COFFRE_BIN:-${CARGO_TARGET_DIR:-target}/release/coffre}
WORK=${DEMO_DIR:-${TMPDIR:-/tmp}/coffre-demo}
SIZE_MB=${DEMO_SIZE_MB:-1024}
FILL_MB=${DEMO_FILL_MB:-450}
export PATH="$PATH:/usr/sbin:/sbin"

[ -x "$BIN" ] || { echo "demo: $BIN not built (run make build)" >&2; exit 1; }
rm -rf "$WORK"; mkdir -p "$WORK/stage"
# Everything the demo prints on stderr is also kept: the demo fails at its
# end if coffre warned (a warning is a problem the demo must not hide).
exec 2> >(tee -a "$WORK/stderr.log" >&2)
say() { printf '\n== %s\n' "$*"; }

say "1. day-one image: ${SIZE_MB} MiB ext4 holding ~${FILL_MB} MiB of files from /usr"
# A deterministic sample of real files (sorted paths, small files only).
find /usr/share /usr/lib -xdev -type f -size -2M -printf '%s %p\n' 2>/dev/null | LC_ALL=C sort -k2 \
  | awk -v max=$((FILL_MB * 1024 * 1024)) '{ t += $1; if (t <= max) { sub(/^[0-9]+ /, ""); print } }' \
  > "$WORK/files.txt"
[ -s "$WORK/files.txt" ] || { echo "demo: found no files under /usr to build an image from" >&2; exit 1; }
tar -cf - --files-from "$WORK/files.txt" 2>/dev/null | tar -xf - -C "$WORK/stage" 2>/dev/null || true
E2FSPROGS_FAKE_TIME=1700000000 mke2fs -q -F -t ext4 -d "$WORK/stage" "$WORK/day1.img" "${SIZE_MB}M" >/dev/null
rm -rf "$WORK/stage"

say "2. day-two image: new files through the filesystem, plus in-place edits"
cp --sparse=always "$WORK/day1.img" "$WORK/day2.img"
mkdir -p "$WORK/new"
head -c $((24 << 20)) /dev/urandom > "$WORK/new/blob.bin"
find /usr/share/doc -type f -name '*.gz' 2>/dev/null | LC_ALL=C sort > "$WORK/gz.txt"
for i in 1 2 3 4; do sed -n "1,$((i * 40))p" "$WORK/gz.txt" | xargs -r cat > "$WORK/new/logs$i.gz"; done
{
  echo "mkdir /day2"
  for f in "$WORK"/new/*; do echo "write $f /day2/$(basename "$f")"; done
} > "$WORK/debugfs.cmds"
debugfs -w -f "$WORK/debugfs.cmds" "$WORK/day2.img" >/dev/null 2>&1
# In-place rewrites of existing data (like a database updating pages).
for i in $(seq 1 40); do
  dd if=/dev/urandom of="$WORK/day2.img" bs=64K count=2 seek=$((i * 97 + 1000)) conv=notrunc status=none
done
rm -rf "$WORK/new"

V="$WORK/vault"
say "3. vault (an LRS replica, a GRS secondary), two backups"
# The demo keeps its instant-restore snapshots in its work folder (by
# default they go to .coffre-snapshots at the root of the image's
# filesystem). Real replicas and secondaries belong on other disks.
"$BIN" vault create --vault "$V" --name demo-vault --snapshot-area "$WORK/snapshot-area" \
  --replica "$WORK/replica" --secondary "$WORK/secondary"
"$BIN" backup --vault "$V" --item vm "$WORK/day1.img"
"$BIN" backup --vault "$V" --item vm "$WORK/day2.img"
"$BIN" points --vault "$V" --item vm

say "4. restore both points and compare"
"$BIN" --output json points --vault "$V" --item vm > "$WORK/points.json"
ids=$(python3 -c 'import json, sys; print(" ".join(p["id"] for p in json.load(open(sys.argv[1]))))' "$WORK/points.json")
set -- $ids
"$BIN" restore --vault "$V" --item vm --point "$1" --to "$WORK/restored-day1.img"
"$BIN" restore --vault "$V" --item vm --point "$2" --to "$WORK/restored-day2.img"
cmp "$WORK/day1.img" "$WORK/restored-day1.img"
cmp "$WORK/day2.img" "$WORK/restored-day2.img"
echo "both restores (from the instant-restore snapshots) are byte-identical"
"$BIN" restore --vault "$V" --item vm --point "$2" --from vault --to "$WORK/restored-day2-vault.img"
cmp "$WORK/day2.img" "$WORK/restored-day2-vault.img"
echo "the vault restore of day two is byte-identical too"

say "5. verify (every copy), replicate, cross-region restore"
"$BIN" verify --vault "$V" --read-data
"$BIN" replicate --vault "$V"
mv "$V" "$WORK/vault.away"
COFFRE_SECONDARY="$WORK/secondary" "$BIN" restore --vault "$V" --item vm --point "$2" \
  --from secondary --to "$WORK/restored-day2-secondary.img"
cmp "$WORK/day2.img" "$WORK/restored-day2-secondary.img"
echo "with the vault directory gone, the restore from the GRS secondary is byte-identical"
mv "$WORK/vault.away" "$V"

say "6. day three with changed-block tracking: only the listed extents are read"
# The writer knows what it rewrote (here: 24 extents of 192 KiB); coffre
# reads those, re-reads a random 1 % of the rest and compares it with day
# two, and would fall back to a full scan on any mismatch.
cp --sparse=always "$WORK/day2.img" "$WORK/day3.img"
extents=()
for i in $(seq 1 24); do
  off=$(( (i * 131 + 3000) * 65536 ))
  dd if=/dev/urandom of="$WORK/day3.img" bs=64K count=3 seek=$((off / 65536)) conv=notrunc status=none
  extents+=("{\"offset\": $off, \"length\": 196608}")
done
(IFS=,; printf '{"format": "coffre-changed-blocks", "version": 1, "extents": [%s]}\n' "${extents[*]}") > "$WORK/day3.changed.json"
"$BIN" backup --vault "$V" --item vm --changed-blocks "$WORK/day3.changed.json" "$WORK/day3.img"
"$BIN" restore --vault "$V" --item vm --point latest --to "$WORK/restored-day3.img"
cmp "$WORK/day3.img" "$WORK/restored-day3.img"
echo "day three, read through its changed-block list, restores byte-identical"

say "7. policy, protection, a scheduled pass, jobs (fake clock: COFFRE_NOW)"
"$BIN" policy create --vault "$V" --name Nightly --schedule daily --time 01:30 \
  --timezone Europe/Paris --daily-retention 14 --weekly-retention 8 --monthly-retention 12
"$BIN" protect --vault "$V" --item vm --policy Nightly "$WORK/day3.img"
tomorrow=$(date -u -d 'tomorrow 03:00' +%Y-%m-%dT%H:%M:%SZ)
COFFRE_NOW=$tomorrow COFFRE_LOG=warn "$BIN" run-due --vault "$V"
"$BIN" jobs --vault "$V"
COFFRE_NOW=$tomorrow "$BIN" item show --vault "$V" --item vm
COFFRE_NOW=$(date -u -d '+60 days' +%Y-%m-%dT%H:%M:%SZ) "$BIN" prune --vault "$V" --dry-run
"$BIN" gc --vault "$V" --dry-run
"$BIN" verify --vault "$V"

say "8. a running VM: backed up through QEMU while its guest writes (copy-before-write, dirty bitmap)"
if command -v qemu-system-x86_64 >/dev/null && command -v qemu-img >/dev/null; then
  qemu-img convert -f raw -O qcow2 "$WORK/day3.img" "$WORK/vm.qcow2"
  rm -f "$WORK/qmp.sock" "$WORK/guest.sock" "$WORK/writer.stop"
  qemu-system-x86_64 -machine q35,accel=tcg -S -nodefaults -display none \
    -qmp "unix:$WORK/qmp.sock,server=on,wait=off" -qmp "unix:$WORK/guest.sock,server=on,wait=off" \
    -blockdev "driver=file,filename=$WORK/vm.qcow2,node-name=vm-file" \
    -blockdev driver=qcow2,file=vm-file,node-name=vm-disk -device virtio-blk-pci,drive=vm-disk,id=vda \
    >/dev/null 2>&1 &
  QEMU_PID=$!
  # The "guest": 64 KiB writes through the virtio device every 5 ms.
  python3 - "$WORK/guest.sock" "$WORK/writer.stop" "$SIZE_MB" <<'PY' &
import json, os, socket, sys, time
path, stop, size_mb = sys.argv[1], sys.argv[2], int(sys.argv[3])
for _ in range(200):
    try:
        s = socket.socket(socket.AF_UNIX); s.connect(path); break
    except OSError:
        time.sleep(0.05)
f = s.makefile("rw"); f.readline()
def run(cmd, args=None):
    f.write(json.dumps({"execute": cmd, **({"arguments": args} if args else {})}) + "\n"); f.flush()
    while "event" in (r := json.loads(f.readline())): pass
    return r
run("qmp_capabilities")
n = 0
while not os.path.exists(stop):
    at = (n * 7919 % (size_mb * 16)) * 65536
    run("human-monitor-command", {"command-line":
        f'qemu-io -d /machine/peripheral/vda/virtio-backend "write -P {n % 250 + 1} {at} 65536"'})
    n += 1
    time.sleep(0.005)
print(f"the guest wrote {n} times during the backups")
PY
  WRITER_PID=$!
  sleep 1
  "$BIN" backup --vault "$V" --item live-vm --qmp "$WORK/qmp.sock" --drive vda
  sleep 1
  "$BIN" backup --vault "$V" --item live-vm --qmp "$WORK/qmp.sock" --drive vda
  touch "$WORK/writer.stop"; wait "$WRITER_PID"
  # The guest is quiet now: a last point, then QEMU stops and the disk is
  # compared with that point's restore.
  "$BIN" backup --vault "$V" --item live-vm --qmp "$WORK/qmp.sock" --drive vda
  python3 - "$WORK/qmp.sock" <<'PY'
import json, socket, sys, time
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); f = s.makefile("rw"); f.readline()
for c in ("qmp_capabilities", "quit"):
    f.write(json.dumps({"execute": c}) + "\n"); f.flush(); f.readline()
PY
  wait "$QEMU_PID" 2>/dev/null || true
  qemu-img convert -f qcow2 -O raw "$WORK/vm.qcow2" "$WORK/vm-final.raw"
  "$BIN" restore --vault "$V" --item live-vm --to "$WORK/vm-restored.img"
  cmp "$WORK/vm-restored.img" "$WORK/vm-final.raw"
  echo "the running VM's last point restores byte-identical to its disk (qemu-img convert -O raw)"
  "$BIN" points --vault "$V" --item live-vm
else
  echo "skipped: qemu-system-x86_64 or qemu-img is missing (make deps installs them as root)"
fi

say "summary"
python3 - "$WORK/points.json" <<'PY'
import json, sys
pts = json.load(open(sys.argv[1]))
for day, p in enumerate(pts[:2], 1):
    s = p["stats"]
    mib = 1048576
    rate = p["image_size"] / mib / max(s["duration_ms"], 1) * 1000
    print("day %d: point %s  image %.0f MiB  read %.0f MiB  changed blocks %d  stored %.1f MiB  snapshot %.1f MiB  %s  %.0f MiB/s"
          % (day, p["id"], p["image_size"] / mib, s["bytes_read"] / mib, s["blocks_changed"],
             p["stored_bytes"] / mib, p.get("snapshot_bytes", 0) / mib, p["tier"], rate))
PY
"$BIN" vault show --vault "$V"
echo
if grep -q " WARN " "$WORK/stderr.log"; then
    echo "demo: FAILED: coffre warned (see $WORK/stderr.log):" >&2
    grep " WARN " "$WORK/stderr.log" | head -5 >&2
    exit 1
fi
echo "demo: OK (work files in $WORK)"
