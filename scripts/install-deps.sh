#!/usr/bin/env bash
# Installs what building and testing coffre needs, if it is missing:
# libclang (RocksDB's bindgen), a C++ compiler, e2fsprogs (test images).
set -euo pipefail

missing=()
have_libclang() {
  ldconfig -p 2>/dev/null | grep -q 'libclang\(-[0-9.]*\)\?\.so' && return 0
  compgen -G '/usr/lib/llvm-*/lib/libclang*.so*' >/dev/null && return 0
  compgen -G '/usr/lib/*/libclang*.so*' >/dev/null && return 0
  return 1
}
have_libclang || missing+=(libclang-dev)
command -v c++ >/dev/null || missing+=(g++)
command -v mke2fs >/dev/null || [ -x /usr/sbin/mke2fs ] || [ -x /sbin/mke2fs ] || missing+=(e2fsprogs)
command -v make >/dev/null || missing+=(make)

if ! command -v cargo >/dev/null; then
  echo "coffre: cargo is not installed. Install Rust (https://rustup.rs) first." >&2
  exit 1
fi

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
  echo "coffre: installing ${missing[*]} ..." >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
else
  echo "coffre: missing system packages: ${missing[*]}" >&2
  echo "  RocksDB's build needs libclang. As root run:" >&2
  echo "    apt-get install -y ${missing[*]}" >&2
  exit 1
fi
