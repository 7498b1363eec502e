#!/usr/bin/env bash
# Lists the tests that skipped (their markers in DIR, written by
# vault-store/src/skip.rs), one per line with the reason, and the count.
#
#   scripts/skips.sh DIR           list them (always exits 0)
#   scripts/skips.sh --check DIR   list them, and exit 1 when one skipped
#                                  that COFFRE_ALLOW_SKIP does not name
#
# COFFRE_ALLOW_SKIP holds test names separated by spaces or commas; a name
# allows the test of that path and every test below it
# (`nbd_qcow2` allows `nbd_qcow2::qcow2_incremental`); `all` allows any.
set -euo pipefail
check=0
if [ "${1:-}" = "--check" ]; then
  check=1
  shift
fi
dir=${1:?usage: scripts/skips.sh [--check] DIR}
allowed() {
  local test=$1 name allow=${COFFRE_ALLOW_SKIP:-}
  for name in ${allow//,/ }; do
    if [ "$name" = all ] || [ "$name" = "$test" ] || [[ "$test" == "$name::"* ]]; then
      return 0
    fi
  done
  return 1
}
shopt -s nullglob
markers=("$dir"/*)
if [ ${#markers[@]} -eq 0 ]; then
  echo "coffre: no test skipped"
  exit 0
fi
refused=()
echo "coffre: ${#markers[@]} test(s) skipped:"
for m in "${markers[@]}"; do
  test=${m##*/}
  reason=$(head -n 1 -- "$m")
  if allowed "$test"; then
    echo "  SKIPPED $test: $reason (allowed by COFFRE_ALLOW_SKIP)"
  else
    echo "  SKIPPED $test: $reason"
    refused+=("$test")
  fi
done
if [ "$check" -eq 1 ] && [ ${#refused[@]} -gt 0 ]; then
  echo "coffre: ${#refused[@]} skipped test(s) not allowed; install what they need, or name them in" >&2
  echo "  COFFRE_ALLOW_SKIP=\"${refused[*]}\"" >&2
  exit 1
fi
exit 0
