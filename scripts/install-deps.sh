#!/usr/bin/env bash
# Installs what building and testing coffre needs, if it is missing:
# libclang (RocksDB's bindgen), a C++ compiler, e2fsprogs (test images);
# optionally xfsprogs, qemu-utils and libnbd-bin (tests of real components),
# qemu-system-x86 with a qemu-utils of the same release (the QEMU live-backup
# tests), libvirt's daemon, client and QEMU driver (the libvirt domain-backup
# tests),
# Azurite with @azure/storage-blob from npm (the object-store tests and
# `make demo-cloud`) and moto[server] from PyPI (the S3 test);
# scripts/install-deps.sh --azurite installs only those two.
#
#   scripts/install-deps.sh                   check, install what is missing (as root)
#   scripts/install-deps.sh --detect-libclang print the libclang bindgen would load, or exit 1
#
# libclang is looked for exactly where bindgen (clang-sys, runtime loading)
# looks: in $LIBCLANG_PATH alone when it is set; otherwise in
# `llvm-config --prefix`/{bin,lib,lib64}, $LD_LIBRARY_PATH, /usr/lib*,
# /usr/lib*/*, /usr/lib*/*/*, /usr/local/lib* (and two levels below) and
# /usr/local/llvm*/lib*, for files named libclang.so, libclang-*.so,
# libclang.so.* or libclang-*.so.* that are 64-bit ELF files, never
# libclang-cpp (a different library that llvm-*-dev ships).
# COFFRE_LIBCLANG_ROOT prefixes the standard directories (tests only).
set -euo pipefail

root=${COFFRE_LIBCLANG_ROOT:-}

# Prints the directories bindgen searches, one per line, in its order.
libclang_dirs() {
  if [ -n "${LIBCLANG_PATH:-}" ]; then
    if [ -f "$LIBCLANG_PATH" ]; then dirname -- "$LIBCLANG_PATH"; else printf '%s\n' "$LIBCLANG_PATH"; fi
    return 0
  fi
  local prefix=""
  if [ -z "$root" ]; then
    prefix=$("${LLVM_CONFIG_PATH:-llvm-config}" --prefix 2>/dev/null | head -n 1) || prefix=""
  fi
  if [ -n "$prefix" ]; then printf '%s\n' "$prefix/bin" "$prefix/lib" "$prefix/lib64"; fi
  local IFS=:
  for d in ${LD_LIBRARY_PATH:-}; do [ -n "$d" ] && printf '%s\n' "$d"; done
  unset IFS
  local pattern
  for pattern in /usr/lib\* /usr/lib\*/\* /usr/lib\*/\*/\* /usr/local/lib\* /usr/local/lib\*/\* \
    /usr/local/lib\*/\*/\* /usr/local/llvm\*/lib\*; do
    # shellcheck disable=SC2086 # the pattern is meant to glob
    for d in $root$pattern; do [ -d "$d" ] && printf '%s\n' "$d"; done
  done
  return 0
}

# True when $1 is a 64-bit ELF file (what clang-sys validates).
is_elf64() {
  [ "$(head -c 5 -- "$1" 2>/dev/null | od -An -tx1 | tr -d ' \n')" = "7f454c4602" ]
}

# Prints the first libclang bindgen would accept; fails when there is none.
detect_libclang() {
  local dir f name
  while IFS= read -r dir; do
    # LIBCLANG_PATH may name the library file itself.
    if [ -n "${LIBCLANG_PATH:-}" ] && [ -f "$LIBCLANG_PATH" ]; then
      set -- "$LIBCLANG_PATH"
    else
      set -- "$dir"/libclang.so "$dir"/libclang-*.so "$dir"/libclang.so.* "$dir"/libclang-*.so.*
    fi
    for f in "$@"; do
      name=${f##*/}
      case "$name" in *-cpp.*) continue ;; esac
      if [ -e "$f" ] && is_elf64 "$f"; then
        printf '%s\n' "$f"
        return 0
      fi
    done
  done < <(libclang_dirs)
  return 1
}

if [ "${1:-}" = "--detect-libclang" ]; then
  detect_libclang
  exit
fi

missing=()
if ! detect_libclang >/dev/null; then
  if [ -n "${LIBCLANG_PATH:-}" ]; then
    echo "coffre: LIBCLANG_PATH=$LIBCLANG_PATH holds no libclang (libclang.so, libclang-*.so," >&2
    echo "  libclang.so.* or libclang-*.so.*); bindgen searches only there while it is set." >&2
    echo "  Point it at the directory that holds libclang, or unset it." >&2
    exit 1
  fi
  missing+=(libclang-dev)
fi
command -v c++ >/dev/null || missing+=(g++)
command -v mke2fs >/dev/null || [ -x /usr/sbin/mke2fs ] || [ -x /sbin/mke2fs ] || missing+=(e2fsprogs)
command -v debugfs >/dev/null || [ -x /usr/sbin/debugfs ] || [ -x /sbin/debugfs ] || missing+=(e2fsprogs)
command -v make >/dev/null || missing+=(make)
# Optional: the tests of the snapshotter's clone path and of reflink
# changed-block tracking loop-mount an XFS with reflink (as root); the
# qcow2/NBD tests drive qemu-img, qemu-nbd and qemu-io, and read a dirty
# bitmap with nbdinfo. Without them those tests say SKIP.
optional=()
command -v mkfs.xfs >/dev/null || [ -x /usr/sbin/mkfs.xfs ] || [ -x /sbin/mkfs.xfs ] || optional+=(xfsprogs)
command -v qemu-nbd >/dev/null || optional+=(qemu-utils)
command -v nbdinfo >/dev/null || optional+=(libnbd-bin)
# `coffre mount` as a user mounts through the setuid fusermount3 (fuse3) or
# fusermount (fuse, the older package it replaces); root needs neither, only
# /dev/fuse. Installed only when neither is there (the two conflict).
command -v fusermount3 >/dev/null || command -v fusermount >/dev/null \
  || [ -x /usr/bin/fusermount3 ] || [ -x /bin/fusermount ] || optional+=(fuse3)

if ! command -v cargo >/dev/null; then
  echo "coffre: cargo is not installed. Install Rust (https://rustup.rs) first." >&2
  exit 1
fi

if [ ${#optional[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    missing+=("${optional[@]}")
  else
    echo "coffre: optional ${optional[*]} missing: the XFS and qcow2/NBD tests will SKIP," >&2
    echo "  and without fuse3 only root can run \`coffre mount\`" >&2
  fi
fi
# Azurite, Microsoft's Azure Storage emulator, and the SDK that creates its
# containers: npm packages, installed globally when npm can.
install_azurite() {
  local root
  root=$(npm root -g 2>/dev/null) || root=""
  if command -v azurite-blob >/dev/null && [ -n "$root" ] && [ -d "$root/@azure/storage-blob" ]; then
    return 0
  fi
  if ! command -v npm >/dev/null; then
    echo "coffre: npm not found: the object-store (Azurite) tests will SKIP" >&2
    return 0
  fi
  echo "coffre: installing azurite and @azure/storage-blob with npm ..." >&2
  if ! npm install -g --no-fund --no-audit azurite@3 @azure/storage-blob@12 >/dev/null 2>&1; then
    echo "coffre: npm install -g azurite failed (no network or no write access to $(npm prefix -g 2>/dev/null));" >&2
    echo "  the object-store (Azurite) tests will SKIP" >&2
  fi
  return 0
}
# moto's S3 server (PyPI): the S3 test.
install_moto() {
  command -v moto_server >/dev/null && return 0
  if ! command -v pip3 >/dev/null && ! command -v pip >/dev/null; then
    echo "coffre: pip not found: the S3 (moto) test will SKIP" >&2
    return 0
  fi
  echo "coffre: installing moto[server] with pip ..." >&2
  "$(command -v pip3 || command -v pip)" install -q 'moto[server]>=5' >/dev/null 2>&1 \
    || echo "coffre: pip install moto[server] failed: the S3 (moto) test will SKIP" >&2
  hash -r
  return 0
}
# QEMU itself: the live-backup tests start a VM (no guest OS). Its package
# and qemu-utils must come from one release: installing Debian 12's
# qemu-system-x86 (7.2) alone removes a newer, backported qemu-utils, and
# with it qemu-img and qemu-nbd. Both are installed at the same version,
# and all four tools must run afterwards.
install_qemu_system() {
  command -v qemu-system-x86_64 >/dev/null && return 0
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
    echo "coffre: qemu-system-x86_64 missing: the QEMU live-backup tests will SKIP" >&2
    echo "  (as root: apt-get install qemu-system-x86 qemu-utils, both from one release)" >&2
    return 0
  fi
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get update -qq; then
    echo "coffre: apt-get update failed: the QEMU live-backup tests will SKIP" >&2
    return 0
  fi
  local v
  v=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
  if [ -z "$v" ] || [ "$v" = "(none)" ]; then
    echo "coffre: no qemu-system-x86 package: the QEMU live-backup tests will SKIP" >&2
    return 0
  fi
  echo "coffre: installing qemu-system-x86 and qemu-utils $v ..." >&2
  if ! apt-get install -y -qq --no-install-recommends --no-remove --allow-downgrades \
      "qemu-system-x86=$v" "qemu-utils=$v" >/dev/null; then
    echo "coffre: could not install qemu-system-x86 and qemu-utils $v together: the QEMU live-backup tests will SKIP" >&2
    return 0
  fi
  hash -r
  local t
  for t in qemu-img qemu-nbd qemu-io qemu-system-x86_64; do
    if ! "$t" --version >/dev/null 2>&1; then
      echo "coffre: $t does not run after installing QEMU $v" >&2
      exit 1
    fi
  done
}
# libvirt: the domain-backup tests start virtlogd and libvirtd themselves
# (CI has no systemd) and run QEMU domains through them. The QEMU driver
# comes without recommends (no dnsmasq, no firewall tools); nothing is
# removed to install it.
install_libvirt() {
  command -v virsh >/dev/null && command -v libvirtd >/dev/null && command -v virtlogd >/dev/null && return 0
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
    echo "coffre: libvirt missing: the libvirt domain-backup tests will SKIP" >&2
    echo "  (as root: apt-get install --no-install-recommends libvirt-daemon-system libvirt-clients libvirt-daemon-driver-qemu)" >&2
    return 0
  fi
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get update -qq; then
    echo "coffre: apt-get update failed: the libvirt domain-backup tests will SKIP" >&2
    return 0
  fi
  echo "coffre: installing libvirt-daemon-system, libvirt-clients and libvirt-daemon-driver-qemu ..." >&2
  if ! apt-get install -y -qq --no-install-recommends --no-remove \
      libvirt-daemon-system libvirt-clients libvirt-daemon-driver-qemu >/dev/null; then
    echo "coffre: could not install libvirt: the libvirt domain-backup tests will SKIP" >&2
    return 0
  fi
  hash -r
}
if [ "${1:-}" = "--azurite" ]; then
  install_azurite
  install_moto
  exit 0
fi
install_azurite
install_moto
install_qemu_system
install_libvirt

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
# One name once, in order.
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | awk '!seen[$0]++')

if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
  echo "coffre: installing ${missing[*]} ..." >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
  if [[ " ${missing[*]} " == *" libclang-dev "* ]] && ! found=$(detect_libclang); then
    echo "coffre: installed libclang-dev, but still no libclang where bindgen looks." >&2
    echo "  Set LIBCLANG_PATH to the directory that holds libclang.so." >&2
    exit 1
  fi
  [ -n "${found:-}" ] && echo "coffre: libclang at $found" >&2
  exit 0
else
  echo "coffre: missing system packages: ${missing[*]}" >&2
  echo "  RocksDB's build needs libclang (libclang-cpp, from llvm-*-dev, is not it)." >&2
  echo "  Run as root:" >&2
  echo "    apt-get install -y ${missing[*]}" >&2
  echo "  or, if libclang is installed somewhere else, export LIBCLANG_PATH=/its/directory" >&2
  exit 1
fi
