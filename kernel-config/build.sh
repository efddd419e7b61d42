#!/usr/bin/env bash
# Build cairn's kernel from Debian's linux-source-6.1 with our fragment.
# The result is cached outside the clone, keyed by the exact Debian package
# version plus a hash of the fragment and this script; a hit costs nothing.
# Prints the path of the bzImage on stdout (last line).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
series=$(cat "$here/KERNEL_SERIES")
pkg="linux-source-$series"
tarball="/usr/src/$pkg.tar.xz"
cache_root="${CAIRN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cairn}/kernel"

[ -f "$tarball" ] || { echo "error: $tarball missing: run 'make deps' (Debian package $pkg)" >&2; exit 1; }
pkgver=$(dpkg-query -W -f='${Version}' "$pkg")
cfghash=$(cat "$here/cairn.config" "$here/build.sh" | sha256sum | cut -c1-16)
key="$pkgver-$cfghash"
out="$cache_root/$key"

if [ -f "$out/bzImage" ]; then
  echo "kernel: cache hit $out" >&2
  echo "$out/bzImage"
  exit 0
fi

echo "kernel: building $pkg $pkgver config $cfghash (cache miss) ..." >&2
work="$cache_root/build-$key"
rm -rf "$work"
mkdir -p "$work"
tar -C "$work" -xf "$tarball"
src="$work/$pkg"
export KBUILD_BUILD_TIMESTAMP="@${SOURCE_DATE_EPOCH:-1700000000}"
export KBUILD_BUILD_USER=cairn KBUILD_BUILD_HOST=cairn
(
  cd "$src"
  make -s tinyconfig >&2
  KCONFIG_CONFIG=.config scripts/kconfig/merge_config.sh -m .config \
    kernel/configs/kvm_guest.config "$here/cairn.config" >&2
  make -s olddefconfig >&2
  # Every =y in our fragment must survive olddefconfig: a silently dropped
  # option is how a later feature "mysteriously" fails at run time.
  missing=0
  while IFS= read -r line; do
    case "$line" in CONFIG_*=y) grep -qx "$line" .config || { echo "kernel: fragment option not set: $line" >&2; missing=1; } ;; esac
  done < "$here/cairn.config"
  [ "$missing" = 0 ] || echo "kernel: warning: some fragment options were dropped (dependencies); see above" >&2
  make -s -j"$(nproc)" bzImage >&2
)
mkdir -p "$out.tmp"
cp "$src/arch/x86/boot/bzImage" "$out.tmp/bzImage"
cp "$src/.config" "$out.tmp/config"
echo "$pkg $pkgver" > "$out.tmp/VERSION"
make -s -C "$src" kernelrelease > "$out.tmp/RELEASE"
rm -rf "$out"
mv "$out.tmp" "$out"
rm -rf "$work"
echo "kernel: built $(du -h "$out/bzImage" | cut -f1) $out/bzImage" >&2
echo "$out/bzImage"
