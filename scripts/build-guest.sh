#!/bin/sh
# Build the default Linux guest into ${VMMSHIM_CACHE:-~/.cache/vmmshim}/guest/: vmlinuz (Debian's stock
# kernel, from the linux-image .deb) and initramfs.gz (busybox-static, virtio modules, /init).
# Rebuilt only when its inputs change (this builder's source, the kernel and busybox package versions).
#   scripts/build-guest.sh [--force]
# The /init protocol (markers, vmmshim.run=<base64>, vmmshim.exit=reboot) is documented in docs/lab.md.
set -eu
REPO=$(CDPATH= cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
exec python3 -m vmmshim.lab guest "$@"
