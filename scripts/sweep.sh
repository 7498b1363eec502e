#!/usr/bin/env bash
# Measures block sizes and compression levels on two images (day one, day
# two): bytes stored by each point and backup/restore throughput.
# Usage: scripts/sweep.sh DAY1.img DAY2.img ["64K 256K 1M 4M"] ["1 3"]
set -euo pipefail
BIN=${COFFRE_BIN:-${CARGO_TARGET_DIR:-target}/release/coffre}
d1=$1 d2=$2
sizes=${3:-"64K 128K 256K 512K 1M 2M 4M"}
levels=${4:-"1"}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
printf '| block | zstd | day-1 stored MiB | day-1 MiB/s | day-2 stored MiB | day-2 MiB/s | restore MiB/s |\n|---|---:|---:|---:|---:|---:|---:|\n'
for lvl in $levels; do
  for bs in $sizes; do
    v=$work/v-$bs-$lvl
    "$BIN" vault create --vault "$v" --block-size "$bs" --compression-level "$lvl" >/dev/null
    cp --reflink=auto --sparse=always "$d1" "$work/disk.img"
    a=$("$BIN" --output json backup --vault "$v" --item disk "$work/disk.img")
    cp --reflink=auto --sparse=always "$d2" "$work/disk.img"
    b=$("$BIN" --output json backup --vault "$v" --item disk "$work/disk.img")
    r=$("$BIN" --output json restore --vault "$v" --item disk --to "$work/out.img")
    rm -f "$work/out.img" "$work/disk.img"
    python3 - "$bs" "$lvl" "$a" "$b" "$r" <<'PY'
import json, sys
bs, lvl, a, b, r = sys.argv[1], sys.argv[2], *(json.loads(x) for x in sys.argv[3:])
M = 1048576
print(f"| {bs} | {lvl} | {a['stored_bytes']/M:.1f} | {a['mib_per_s']:.0f} | {b['stored_bytes']/M:.1f} | {b['mib_per_s']:.0f} | {r['mib_per_s']:.0f} |")
PY
    rm -rf "$v"
  done
done
