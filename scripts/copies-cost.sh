#!/usr/bin/env bash
# Cost of LRS copies: the wall time of a full backup of IMAGE into a vault
# with 1 copy and into one with 3 (the vault directory and two replicas),
# alternating, ROUNDS times each (default 3), then the day-two backup of
# IMAGE2 if given. Prints every run, the best of each, and the ratio.
# The two replicas go under the directories of COPIES_DIRS (default: both
# beside the vault, so on the same disk); give two directories on other
# disks to measure what a real deployment pays.
#
# Usage: [COPIES_DIRS="/mnt/d2 /mnt/d3"] scripts/copies-cost.sh IMAGE [IMAGE2]
# (needs `coffre` on PATH)
set -euo pipefail
img=${1:?usage: scripts/copies-cost.sh IMAGE [IMAGE2]}
img2=${2:-}
rounds=${ROUNDS:-3}
work=$(mktemp -d "${WORK_DIR:-/tmp}/coffre-copies.XXXXXX")
read -r -a dirs <<<"${COPIES_DIRS:-$work $work}"
replica() { echo "${dirs[$(( ($1 - 2) % ${#dirs[@]} ))]}/coffre-copies-r$1-$$"; }
trap 'rm -rf "$work" "$(replica 2)" "$(replica 3)"' EXIT
ms() { date +%s%3N; }

# Runs one full (and day-two) backup into a fresh vault with $1 copies;
# prints "full_ms day2_ms".
run() {
  local n=$1 v=$work/v extra=()
  rm -rf "$v" "$work/area" "$(replica 2)" "$(replica 3)"
  for i in $(seq 2 "$n"); do extra+=(--replica "$(replica "$i")"); done
  coffre vault create --vault "$v" --snapshot-area "$work/area" "${extra[@]}" >/dev/null
  # The same path both days, as a VM's disk would be.
  cp --sparse=always "$img" "$work/vm.img"
  sync
  local t0 t1 t2=0 t3=0
  t0=$(ms)
  coffre backup --vault "$v" --item vm "$work/vm.img" >/dev/null
  t1=$(ms)
  if [ -n "$img2" ]; then
    cp --sparse=always "$img2" "$work/vm.img"
    sync
    t2=$(ms)
    coffre backup --vault "$v" --item vm "$work/vm.img" >/dev/null
    t3=$(ms)
  fi
  echo "$((t1 - t0)) $((t3 - t2))"
}

best1=999999999 best3=999999999 day1=999999999 day3=999999999
printf '%6s %7s %10s %10s\n' round copies full_ms day2_ms
for r in $(seq 1 "$rounds"); do
  for n in 1 3; do
    read -r full day2 < <(run "$n")
    printf '%6s %7s %10s %10s\n' "$r" "$n" "$full" "$day2"
    if [ "$n" = 1 ]; then
      [ "$full" -lt "$best1" ] && best1=$full
      [ "$day2" -lt "$day1" ] && day1=$day2
    else
      [ "$full" -lt "$best3" ] && best3=$full
      [ "$day2" -lt "$day3" ] && day3=$day2
    fi
  done
done
echo "best full backup: 1 copy ${best1} ms, 3 copies ${best3} ms, ratio $(awk "BEGIN{printf \"%.2f\", $best3/$best1}")"
if [ -n "$img2" ]; then
  echo "best day-two backup: 1 copy ${day1} ms, 3 copies ${day3} ms, ratio $(awk "BEGIN{printf \"%.2f\", $day3/($day1>0?$day1:1)}")"
fi
