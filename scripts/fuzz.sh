#!/usr/bin/env bash
# Runs every fuzz target (or those in FUZZ_TARGETS) for FUZZ_SECONDS of wall
# time each (default 60) from the committed seed corpus, and prints one
# summary line per target: executions, CPU seconds, result. Needs the
# nightly toolchain; installs cargo-fuzz if missing.
#
# Targets build optimized *with* debug assertions and overflow checks
# (`cargo fuzz run -O -a`): a decoded length that wraps is a crash, not a
# silently wrong number. FUZZ_FLAGS=-O runs without them.
#
#   FUZZ_SECONDS=600 FUZZ_TARGETS="chunk_record block_map" scripts/fuzz.sh
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${FUZZ_SECONDS:-60}
read -r -a flags <<<"${FUZZ_FLAGS:--O -a}"
if ! rustup toolchain list | grep -q nightly; then
  echo "coffre: cargo fuzz needs the nightly toolchain (rustup toolchain install nightly)" >&2
  exit 1
fi
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
cd fuzz
targets=${FUZZ_TARGETS:-$(cargo +nightly fuzz list)}
summary=()
status=0
for target in $targets; do
  echo "== fuzzing $target for ${secs}s"
  # Work on a copy so the committed seed corpus stays small.
  work=$(mktemp -d)
  cp "corpus/$target"/* "$work/"
  log=$(mktemp)
  start=$(awk '{print $14 + $15 + $16 + $17}' /proc/$$/stat)
  set +e
  cargo +nightly fuzz run "${flags[@]}" "$target" "$work" -- -max_total_time="$secs" -max_len=65536 \
    -timeout=10 -rss_limit_mb=2048 2>&1 | tee "$log" | grep -E '^(#[0-9]+ +DONE|Done|==[0-9]+==ERROR|SUMMARY)' || true
  rc=${PIPESTATUS[0]}
  set -e
  end=$(awk '{print $14 + $15 + $16 + $17}' /proc/$$/stat)
  cpu=$(( (end - start) / $(getconf CLK_TCK) ))
  # A run that crashed or failed to build has no 'Done' line.
  runs=$(grep -oE '^Done [0-9]+ runs' "$log" | awk '{print $2}' | tail -n 1 || true)
  if [ "$rc" -eq 0 ]; then result=ok; else result="FAILED (exit $rc; see fuzz/artifacts/$target)"; status=1; fi
  summary+=("$target: ${runs:-?} executions, ${cpu} CPU-s, $result")
  rm -rf "$work" "$log"
done
echo "== summary (${secs}s each, cargo fuzz run ${flags[*]})"
printf '%s\n' "${summary[@]}"
exit "$status"
