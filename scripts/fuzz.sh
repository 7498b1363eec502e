#!/usr/bin/env bash
# Runs every fuzz target for FUZZ_SECONDS (default 60) from the committed
# seed corpus. Needs the nightly toolchain; installs cargo-fuzz if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${FUZZ_SECONDS:-60}
if ! rustup toolchain list | grep -q nightly; then
  echo "coffre: cargo fuzz needs the nightly toolchain (rustup toolchain install nightly)" >&2
  exit 1
fi
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
cd fuzz
for target in $(cargo +nightly fuzz list); do
  echo "== fuzzing $target for ${secs}s"
  # Work on a copy so the committed seed corpus stays small.
  work=$(mktemp -d)
  cp "corpus/$target"/* "$work/"
  cargo +nightly fuzz run "$target" "$work" -- -max_total_time="$secs" -max_len=65536
  rm -rf "$work"
done
