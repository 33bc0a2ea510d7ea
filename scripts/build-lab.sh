#!/bin/sh
# Build the nested lab's L1 root image (debootstrap, about 5 min the first time) and the default guest.
# Rebuilt only when their inputs change.  See docs/lab.md.
#   scripts/build-lab.sh [--force]
set -eu
REPO=$(CDPATH= cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
exec python3 -m vmmshim.lab build "$@"
