#!/usr/bin/env bash
# Installs a built coffre binary without its debug info, and that debug
# info beside the system's others, where backtraces and gdb find it.
#
#   scripts/install-binary.sh BINARY PREFIX [DESTDIR]
#
# BINARY (target/release/coffre, ~55 MB: our crates keep line tables for
# backtraces) is split in two with objcopy:
# - DESTDIR/PREFIX/bin/coffre: no debug info and no symbol table (~26 MB),
#   with a .gnu_debuglink naming coffre.debug and its CRC;
# - DESTDIR/usr/lib/debug/PREFIX/bin/coffre.debug: the line tables and
#   symbols, zlib-compressed. A panic's backtrace (Rust's std follows the
#   debug link) and gdb read it from there; without it a backtrace has
#   addresses only, and nothing else changes.
set -euo pipefail
bin=${1:?usage: scripts/install-binary.sh BINARY PREFIX [DESTDIR]}
prefix=${2:?usage: scripts/install-binary.sh BINARY PREFIX [DESTDIR]}
destdir=${3:-}
case "$prefix" in /*) ;; *) echo "coffre: PREFIX must be an absolute path, not $prefix" >&2; exit 2 ;; esac
[ -f "$bin" ] || { echo "coffre: $bin does not exist (make build first)" >&2; exit 1; }
command -v objcopy >/dev/null || { echo "coffre: objcopy is missing (apt-get install binutils)" >&2; exit 1; }
bindir="$destdir$prefix/bin"
debugdir="$destdir/usr/lib/debug$prefix/bin"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The link records the debug file's base name, so it is made under it.
objcopy --only-keep-debug --compress-debug-sections=zlib "$bin" "$work/coffre.debug"
objcopy --strip-all --add-gnu-debuglink="$work/coffre.debug" "$bin" "$work/coffre"
install -d "$bindir" "$debugdir"
install -m 0755 "$work/coffre" "$bindir/coffre"
install -m 0644 "$work/coffre.debug" "$debugdir/coffre.debug"
size() { stat -c %s "$1" | awk '{ printf "%.1f MB", $1 / 1e6 }'; }
echo "coffre: installed $bindir/coffre ($(size "$bindir/coffre")) and its debug info $debugdir/coffre.debug ($(size "$debugdir/coffre.debug"))"
