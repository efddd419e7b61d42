#!/usr/bin/env bash
# Writes OUT/SHA256SUMS and OUT/SIZES for the boot media in OUT, and prints
# the size report. Sizes are apparent sizes (the raw cloud image is sparse:
# its allocated size is shown too).
set -euo pipefail
out=${1:?usage: media-report.sh OUT}
cd "$out"
files=(bzImage initramfs.cpio.zst cairn-netboot.iso cairn-loader.iso cairn.iso cairn-cloud.raw cairn-cloud.qcow2)
sha256sum "${files[@]}" > SHA256SUMS
{
  printf '%-22s %12s %9s  %s\n' file bytes MiB target
  for f in "${files[@]}"; do
    b=$(stat -c %s "$f")
    t=
    case $f in
      initramfs.cpio.zst|cairn-netboot.iso) t="<= 4 MiB" ;;
      cairn-cloud.raw) t="sparse: $(du -k "$f" | cut -f1) KiB allocated" ;;
    esac
    printf '%-22s %12d %9.2f  %s\n' "$f" "$b" "$(echo "$b/1048576" | bc -l)" "$t"
  done
} > SIZES
cat SIZES
echo "checksums: $out/SHA256SUMS"
