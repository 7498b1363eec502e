#!/usr/bin/env bash
# Runs every fuzz target (or those in FUZZ_TARGETS) for FUZZ_SECONDS of CPU
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
  echo "== fuzzing $target for ${secs} CPU-s"
  # Work on a copy so the committed seed corpus stays small.
  work=$(mktemp -d)
  cp "corpus/$target"/* "$work/"
  log=$(mktemp)
  # libFuzzer's limit is wall time: on a busy machine a round gets less
  # CPU than it ran, so rounds go on (on the grown corpus) until the
  # target had `secs` CPU seconds.
  ticks=0 cpu=0 runs=0 rc=0 rounds=0
  tck=$(getconf CLK_TCK)
  # At most 20 rounds: a machine so busy that it never gives the target its
  # CPU time stops the campaign rather than looping on.
  while [ "$rc" -eq 0 ] && [ "$cpu" -lt "$secs" ] && [ "$rounds" -lt 20 ]; do
    left=$((secs - cpu))
    [ "$left" -lt 30 ] && left=30
    start=$(awk '{print $14 + $15 + $16 + $17}' /proc/$$/stat)
    set +e
    cargo +nightly fuzz run "${flags[@]}" "$target" "$work" -- -max_total_time="$left" -max_len=65536 \
      -timeout=10 -rss_limit_mb=2048 >"$log" 2>&1
    rc=$?
    set -e
    grep -E '^(#[0-9]+ +DONE|Done|==[0-9]+==ERROR|SUMMARY)' "$log" || true
    end=$(awk '{print $14 + $15 + $16 + $17}' /proc/$$/stat)
    ticks=$((ticks + end - start))
    cpu=$((ticks / tck))
    # A run that crashed or failed to build has no 'Done' line.
    n=$(grep -oE '^Done [0-9]+ runs' "$log" | awk '{print $2}' | tail -n 1 || true)
    runs=$((runs + ${n:-0}))
    rounds=$((rounds + 1))
    if [ "$rc" -ne 0 ]; then cp "$log" "artifacts/$target.log" 2>/dev/null || true; fi
  done
  if [ "$rc" -eq 0 ] && [ "$cpu" -lt "$secs" ]; then
    result="SHORT (only ${cpu} of ${secs} CPU-s in $rounds rounds)"; status=1
  elif [ "$rc" -eq 0 ]; then result=ok; else result="FAILED (exit $rc; see fuzz/artifacts/$target)"; status=1; fi
  line="$target: $runs executions, ${cpu} CPU-s in $rounds round(s), $result"
  echo "== $line"
  summary+=("$line")
  rm -rf "$work" "$log"
done
echo "== summary (${secs} CPU-s each, cargo fuzz run ${flags[*]})"
printf '%s\n' "${summary[@]}"
exit "$status"
