#!/usr/bin/env bash
# GC cost versus vault size: in vaults of N points each (a 64 MiB base image
# whose same 4 MiB region is rewritten by every point), expire exactly one
# point and time `coffre gc`. The work GC does is the same in every vault
# (one point's 64 unique chunks), so its time should not grow with N, while
# a full walk (`coffre verify`) does.
# Usage: scripts/gc-cost.sh [N...]   (default: 10 100 400); needs `coffre` on PATH.
set -euo pipefail
sizes=("${@:-10 100 400}")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
ms() { date +%s%3N; }
printf '%6s %10s %12s %12s %8s %10s\n' points vault_MiB gc_wall_ms gc_inside_ms chunks verify_ms
for n in ${sizes[@]}; do
  v=$work/v$n img=$work/img$n
  coffre vault create --vault "$v" >/dev/null
  head -c $((64 << 20)) /dev/urandom >"$img"
  for i in $(seq 1 "$n"); do
    dd if=/dev/urandom of="$img" bs=1M seek=8 count=4 conv=notrunc status=none
    # Point 2 expires on 2027-01-10; every other point is kept for years.
    until=2030-01-01; [ "$i" = 2 ] && until=2027-01-10
    COFFRE_NOW=2027-01-01T00:00:00Z coffre backup --vault "$v" --item vm --retain-until $until "$img" >/dev/null 2>&1
  done
  COFFRE_NOW=2027-02-01T00:00:00Z coffre prune --vault "$v" >/dev/null
  size=$(( $(du -sm "$v/segments" | cut -f1) ))
  t0=$(ms); out=$(coffre --output json gc --vault "$v"); t1=$(ms)
  chunks=$(printf '%s' "$out" | grep -o '"chunks_removed": [0-9]*' | grep -o '[0-9]*$')
  inside=$(printf '%s' "$out" | grep -o '"duration_ms": [0-9]*' | tail -1 | grep -o '[0-9]*$')
  t2=$(ms); coffre verify --vault "$v" >/dev/null; t3=$(ms)
  printf '%6s %10s %12s %12s %8s %10s\n' "$n" "$size" $((t1 - t0)) "$inside" "$chunks" $((t3 - t2))
  rm -rf "$v" "$img"
done
