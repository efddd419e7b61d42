#!/usr/bin/env bash
# Fetches Debian's modular kernel (the linux-image package that
# linux-image-amd64 points at, from the Debian archive), unpacks it outside
# the clone and runs depmod over its modules. Cached by package version.
# Prints the directory on stdout (last line): vmlinuz, RELEASE and
# lib/modules/RELEASE/ with modules.dep and modules.alias.
set -euo pipefail
cache_root="${CAIRN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cairn}/debian-kernel"
pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
[ -n "$pkg" ] || { echo "error: apt knows no linux-image-amd64 (run apt-get update)" >&2; exit 1; }
ver=$(apt-cache policy "$pkg" | awk '/Candidate:/ {print $2}')
out="$cache_root/$pkg-$ver"
if [ -f "$out/vmlinuz" ]; then
  echo "debian kernel: cache hit $out" >&2
  echo "$out"; exit 0
fi
command -v depmod >/dev/null || { echo "error: depmod missing: run 'make deps' (Debian package kmod)" >&2; exit 1; }
work="$out.tmp"
rm -rf "$work"; mkdir -p "$work/deb"
( cd "$work/deb" && apt-get download "$pkg=$ver" >&2 2>/dev/null || apt-get download "$pkg=$ver" >&2 )
dpkg-deb -x "$work"/deb/*.deb "$work/x"
release=${pkg#linux-image-}
cp "$work/x/boot/vmlinuz-$release" "$work/vmlinuz"
cp "$work/x/boot/config-$release" "$work/config"
mkdir -p "$work/lib/modules"
mv "$work/x/lib/modules/$release" "$work/lib/modules/"
depmod -b "$work" "$release"
echo "$release" > "$work/RELEASE"
rm -rf "$work/x" "$work/deb"
rm -rf "$out"; mv "$work" "$out"
echo "debian kernel: $pkg $ver unpacked, $(find "$out/lib/modules" -name '*.ko' | wc -l) modules" >&2
echo "$out"
