#!/bin/sh
# Install everything vmmshim needs on a Debian 12 host; safe to run again (only what is missing is installed).
#   scripts/install-deps.sh        Debian packages, the guest kernel's .deb (downloaded, never installed),
#                                  and the Python dependencies (pip install -e '.[test]' when pyproject.toml exists)
# Environment: VMMSHIM_CACHE (default ~/.cache/vmmshim) holds the downloaded .debs and their extracted trees.
set -eu

REPO=$(CDPATH= cd "$(dirname "$0")/.." && pwd)
PACKAGES="binutils gcc libc6-dev strace qemu-system-x86 qemu-utils debootstrap busybox-static e2fsprogs cpio gzip
          kmod ca-certificates dmidecode libslirp0 passt xorriso acpica-tools"
LOG=$(mktemp /tmp/vmmshim-install-deps.XXXXXX.log)

step() { printf '[install-deps] %s\n' "$*"; }
fail() { printf '[install-deps] FAILED: %s (log: %s)\n' "$*" "$LOG" >&2; tail -n 20 "$LOG" >&2; exit 1; }

if [ "$(id -u)" != 0 ]; then
    SUDO=sudo
    command -v sudo >/dev/null 2>&1 || { echo "[install-deps] FAILED: not root and no sudo" >&2; exit 1; }
else
    SUDO=
fi

missing=
for p in $PACKAGES; do
    dpkg-query -W -f '${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing="$missing $p"
done
if [ -n "$missing" ]; then
    step "apt-get install$missing"
    $SUDO apt-get update -qq >>"$LOG" 2>&1 || fail "apt-get update"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing \
        >>"$LOG" 2>&1 || fail "apt-get install$missing"
else
    step "Debian packages: all present ($(echo $PACKAGES | wc -w))"
fi

# The guest kernel (linux-image-6.1.0-*-amd64, what linux-image-amd64 depends on) and busybox-static are
# taken from their .deb files: apt-get download, then dpkg-deb -x into the cache.
step "guest kernel and busybox .debs into ${VMMSHIM_CACHE:-$HOME/.cache/vmmshim}"
(cd "$REPO" && python3 -m vmmshim.lab fetch) >>"$LOG" 2>&1 || fail "fetching the guest kernel package"

if [ -f "$REPO/pyproject.toml" ]; then
    step "python3 -m pip install -e '.[test]'"
    # A Debian python3 refuses pip installs outside a venv (PEP 668): then install beside the system packages.
    (cd "$REPO" && python3 -m pip install -q -e '.[test]') >>"$LOG" 2>&1 ||
        (cd "$REPO" && python3 -m pip install -q --break-system-packages -e '.[test]') >>"$LOG" 2>&1 ||
        fail "pip install -e '.[test]'"
else
    step "no pyproject.toml yet: Python dependencies skipped"
fi

# The nested lab (an L1 Debian image and the default guest), cached and rebuilt only when its inputs change:
# the Linux-guest tests and benchmarks run there. VMMSHIM_NO_LAB=1 skips it (about 2 minutes the first time).
if [ -z "${VMMSHIM_NO_LAB:-}" ]; then
    step "nested lab image and default guest (python3 -m vmmshim.lab build)"
    (cd "$REPO" && python3 -m vmmshim.lab build) >>"$LOG" 2>&1 || fail "building the nested lab"
fi
rm -f "$LOG"
step "done"
