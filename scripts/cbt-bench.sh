#!/usr/bin/env bash
# Day-two backups with each changed-block source, on a base image and its day
# two, timed like a user would run them (process start to exit, fsyncs
# included). The changes between the two images come from a mutations file
# (JSON: {"extents": [{"offset", "length"}], "append": {"offset", "length"}},
# as ../shared/bench/make-images.sh writes), so every source is built from the
# same truth:
#   list     --changed-blocks with coffre's own list of the mutated extents
#   bitmap   a qcow2 of the base with a persistent dirty bitmap, the mutations
#            written with qemu-io, exported by qemu-nbd -B (needs qemu-utils)
#   reflink  the base on a loop-mounted XFS (reflink=1), the mutations written
#            in place (needs root and xfsprogs)
#   none     the same day two without a source (a full read), for comparison
# Every restored day two is compared with DAY2 byte for byte.
#
#   scripts/cbt-bench.sh BASE.img DAY2.img MUTATIONS.json [WORKDIR]
set -euo pipefail
base=$(realpath "$1") day2=$(realpath "$2") muts=$(realpath "$3")
work=${4:-$(mktemp -d /tmp/coffre-cbt.XXXXXX)}
mkdir -p "$work"
bin=${COFFRE:-coffre}
export COFFRE_REGISTRY=off COFFRE_LOG=warn
size=$(stat -c %s "$base")
rows=()

# The mutated extents as coffre's list, and as "offset length" lines.
python3 - "$muts" "$size" "$work/day2.list.json" "$work/extents.txt" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
ex = [(e["offset"], e["length"]) for e in m["extents"]]
if m.get("append"):
    ex.append((m["append"]["offset"], m["append"]["length"]))
json.dump({"format": "coffre-changed-blocks", "version": 1, "image_size": int(sys.argv[2]),
           "extents": [{"offset": o, "length": l} for o, l in ex]}, open(sys.argv[3], "w"))
with open(sys.argv[4], "w") as f:
    for o, l in ex:
        f.write(f"{o} {l}\n")
PY

# timed NAME CMD...: runs CMD, keeps its JSON output in $work/NAME.json and
# its wall time in $wall.
timed() {
  local name=$1; shift
  local t0 t1
  t0=$(date +%s.%N)
  "$@" > "$work/$name.json"
  t1=$(date +%s.%N)
  wall=$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.3f", b-a}')
}

report() {   # report SOURCE JSON RESTORED
  local source=$1 json=$2 restored=$3 verdict
  if cmp -s "$restored" "$day2"; then verdict=identical; else verdict=DIFFERENT; fi
  rows+=("$(python3 - "$json" "$source" "$wall" "$size" "$verdict" <<'PY'
import json, sys
b = json.load(open(sys.argv[1])); source, wall, size, verdict = sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
c = b["job"]["stats"].get("cbt") or {}
read = b["stats"]["bytes_read"]; dirty = c.get("dirty_bytes") or 0
ratio = f"{read / dirty:.2f}" if dirty else "-"
print(f"| {source} | {wall:.3f} | {size / 2**20 / wall:.0f} | {read / 2**20:.1f} | {dirty / 2**20:.1f} | {ratio} | "
      f"{c.get('used', '-')} | {c.get('sampled', '-')} | {c.get('mismatches', '-')} | {b['stats']['stored_bytes'] / 2**20:.1f} | {verdict} |")
PY
)")
}

# Apply the mutations onto FILE in place (bytes from DAY2).
mutate_in_place() {
  while read -r off len; do
    dd if="$day2" of="$1" bs=64K iflag=skip_bytes,count_bytes oflag=seek_bytes conv=notrunc \
      skip="$off" seek="$off" count="$len" status=none
  done < "$work/extents.txt"
  sync "$1"
}

# ---- none and list: raw images on this filesystem (the fallback capture)
for source in none list; do
  v=$work/vault-$source; rm -rf "$v" "$work/disk-$source.img"
  "$bin" vault create --vault "$v" --name "cbt-$source" --snapshot-area "$work/area-$source" >/dev/null
  cp --sparse=always "$base" "$work/disk-$source.img"
  "$bin" backup --vault "$v" --item disk "$work/disk-$source.img" >/dev/null 2>&1
  mutate_in_place "$work/disk-$source.img"
  cat "$work/disk-$source.img" >/dev/null
  extra=(); [[ $source == list ]] && extra=(--changed-blocks "$work/day2.list.json")
  timed "$source" "$bin" --output json backup --vault "$v" --item disk "${extra[@]}" "$work/disk-$source.img"
  rm -f "$work/r.img"; "$bin" restore --vault "$v" --item disk --to "$work/r.img" >/dev/null
  report "$source" "$work/$source.json" "$work/r.img"
done

# ---- bitmap: qcow2 over qemu-nbd
if command -v qemu-nbd >/dev/null && command -v qemu-io >/dev/null; then
  v=$work/vault-bitmap; rm -rf "$v"; q=$work/disk.qcow2; sock=$work/nbd.sock
  "$bin" vault create --vault "$v" --name cbt-bitmap --snapshot-area "$work/area-bitmap" >/dev/null
  qemu-img convert -O qcow2 "$base" "$q"
  qemu-img bitmap --add --enable "$q" coffre
  export_start() { rm -f "$sock"; qemu-nbd -r -f qcow2 -B coffre -x disk -k "$sock" -t "$q" & nbd_pid=$!; while [[ ! -S $sock ]]; do sleep 0.05; done; }
  uri="nbd+unix:///disk?socket=$sock"
  export_start; "$bin" backup --vault "$v" --bitmap coffre "$uri" >/dev/null 2>&1; kill $nbd_pid; wait $nbd_pid 2>/dev/null || true
  # One qemu-io run writes every mutated extent (its bytes taken from DAY2).
  mkdir -p "$work/ext"; cmds=()
  i=0
  while read -r off len; do
    dd if="$day2" of="$work/ext/$i" bs=64K iflag=skip_bytes,count_bytes skip="$off" count="$len" status=none
    cmds+=(-c "write -q -s $work/ext/$i $off $len"); i=$((i + 1))
  done < "$work/extents.txt"
  qemu-io -f qcow2 "${cmds[@]}" "$q"
  rm -rf "$work/ext"
  export_start
  timed bitmap "$bin" --output json backup --vault "$v" --bitmap coffre "$uri"
  kill $nbd_pid; wait $nbd_pid 2>/dev/null || true
  rm -f "$work/r.img"; "$bin" restore --vault "$v" --item disk --to "$work/r.img" >/dev/null
  report bitmap "$work/bitmap.json" "$work/r.img"
else
  rows+=("| bitmap | skipped: qemu-utils not installed | | | | | | | | | |")
fi

# ---- reflink: XFS loop mount
if [[ $(id -u) == 0 ]] && command -v mkfs.xfs >/dev/null; then
  x=$work/xfs.img mnt=$work/mnt; v=$work/vault-reflink; rm -rf "$v"
  truncate -s $((size * 3)) "$x"; mkfs.xfs -q -f -m reflink=1 "$x"; mkdir -p "$mnt"
  mount -o loop "$x" "$mnt"
  trap 'umount "$mnt" 2>/dev/null || true' EXIT
  "$bin" vault create --vault "$v" --name cbt-reflink >/dev/null
  cp --sparse=always "$base" "$mnt/disk.img"
  COFFRE_SNAPSHOT_ROOT= "$bin" backup --vault "$v" --item disk "$mnt/disk.img" >/dev/null 2>&1
  mutate_in_place "$mnt/disk.img"
  cat "$mnt/disk.img" >/dev/null
  timed reflink "$bin" --output json backup --vault "$v" --item disk "$mnt/disk.img"
  rm -f "$work/r.img"; "$bin" restore --vault "$v" --item disk --from vault --to "$work/r.img" >/dev/null
  report reflink "$work/reflink.json" "$work/r.img"
  "$bin" vault show --vault "$v" >/dev/null
  rm -rf "$mnt/.coffre-snapshots"; umount "$mnt"; trap - EXIT; rm -f "$x"
else
  rows+=("| reflink | skipped: needs root and xfsprogs | | | | | | | | | |")
fi

echo "| source | wall s | MiB/s (image/wall) | read MiB | dirty MiB (source) | read/dirty | used | sampled | mismatches | stored MiB | restore |"
echo "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---|"
printf '%s\n' "${rows[@]}"
echo "(work files in $work)"
