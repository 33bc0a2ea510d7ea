"""Build the L1 root image: Debian 12 from debootstrap, as an ext4 file, cached by a hash of its inputs.

Layout of ``$VMMSHIM_CACHE/lab/<key>/``: ``rootfs.ext4`` (read-only base, every run boots it with
``snapshot=on``), ``vmlinuz`` and ``initrd.img`` (L1's kernel and initramfs-tools initrd, copied out of
the root), ``manifest.json`` (inputs, package versions, timings).  ``<key>`` hashes everything below that
changes the image, so an edit to the package list or to the stub ``/lab-init`` builds a new one and an
edit elsewhere (run.py, the per-run ``lab-init.sh`` on the work disk) does not.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

from vmmshim.lab.paths import apt_mirror, cache_dir, digest

SUITE = "bookworm"
#: Bump when the build steps change in a way the other inputs do not show.
IMAGE_VERSION = "1"

#: Debian packages in the L1 image (debootstrap --variant=minbase --include=...).
PACKAGES = (
    "linux-image-amd64",
    "python3",
    "python3-cffi",
    "python3-ply",  # debootstrap does not resolve virtual packages: python3-pycparser needs python3-ply-lex-3.10
    "python3-pytest",
    "kmod",
    "busybox",
    "udev",
    "procps",
    "iproute2",
    "e2fsprogs",
    "qemu-system-x86",  # the peer VMM inside L1
    "strace",
    "gdb",  # the real client of vmmshim's gdb stub (tests/lab/test_vmmshim_gdb.py)
    "libboost-regex1.74.0",  # provides libboost-regex1.74.0-icu72, which gdb's libsource-highlight4v5 needs
    "binutils",  # GNU as for the guest programs that tests assemble
    "gcc",
    "libc6-dev",  # the C baseline of bench/
)

#: PyPI packages installed into the image's /usr/local/lib/python3.11/dist-packages.
PIP_PACKAGES = ("construct",)

#: Root image size; mkfs.ext4 writes a sparse file.
IMAGE_SIZE = "4G"

#: The stub baked into the image.  Everything else L1 does lives in lab-init.sh on the per-run work disk,
#: so changing it needs no new image.
LAB_INIT_STUB = r"""#!/bin/sh
# vmmshim lab stub (baked into the L1 image): mount the per-run work disk and hand over to its lab-init.sh.
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH
mount -t proc proc /proc 2>/dev/null
mount -t sysfs sysfs /sys 2>/dev/null
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /lab
i=0
while [ ! -b /dev/vdb ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
if mount -t ext4 /dev/vdb /lab && [ -f /lab/lab-init.sh ]; then
    exec /bin/sh /lab/lab-init.sh
fi
echo "VMMSHIM-LAB-ERROR: no work disk at /dev/vdb"
echo o > /proc/sysrq-trigger
sleep 60
"""


def image_key() -> str:
    return digest(IMAGE_VERSION, SUITE, apt_mirror(SUITE), " ".join(PACKAGES), " ".join(PIP_PACKAGES),
                  IMAGE_SIZE, LAB_INIT_STUB)


def image_dir() -> pathlib.Path:
    return cache_dir() / "lab" / image_key()


def image_ready() -> bool:
    d = image_dir()
    return all((d / name).is_file() for name in ("rootfs.ext4", "vmlinuz", "initrd.img", "manifest.json"))


class BuildError(RuntimeError):
    pass


def _step(msg: str) -> None:
    print(f"[lab] {msg}", flush=True)


def _run(cmd, log, **kw):
    with open(log, "ab") as f:
        f.write(("\n$ " + " ".join(map(str, cmd)) + "\n").encode())
        f.flush()
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, **kw)
    if r.returncode != 0:
        tail = pathlib.Path(log).read_text(errors="replace")[-3000:]
        raise BuildError(f"{cmd[0]} failed with status {r.returncode}; log {log}; last lines:\n{tail}")


def _need(*tools):
    missing = [t for t in tools if shutil.which(t) is None and not os.path.exists(f"/usr/sbin/{t}")]
    if missing:
        raise BuildError("missing host tools: " + ", ".join(missing) + " (run scripts/install-deps.sh)")


def build_image(force: bool = False) -> pathlib.Path:
    """Build the L1 image unless one for the same inputs is cached; return its directory."""
    final = image_dir()
    if image_ready() and not force:
        _step(f"L1 image up to date: {final}")
        return final
    if os.geteuid() != 0:
        raise BuildError("debootstrap needs root")
    _need("debootstrap", "mkfs.ext4")
    os.environ["PATH"] = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    lab = final.parent
    lab.mkdir(parents=True, exist_ok=True)
    # a failed build whose debootstrap finished is resumed after it; other leftovers go
    work = None
    for old in sorted(lab.glob("*.tmp-*")):
        if work is None and not force and old.name.startswith(final.name + ".tmp-") and \
                (old / "root" / ".vmmshim-debootstrap-done").exists():
            work = old
        else:
            shutil.rmtree(old, ignore_errors=True)
    resumed = work is not None
    if work is None:
        work = pathlib.Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=lab))
    log = work / "build.log"
    root = work / "root"
    mirror = apt_mirror(SUITE)
    timings = {}
    try:
        if resumed:
            _step(f"resuming {work} after its debootstrap")
            timings = json.loads((root / ".vmmshim-debootstrap-done").read_text())
        else:
            t0 = time.monotonic()
            _step(f"debootstrap {SUITE} from {mirror} (log {log})")
            debs = cache_dir() / "debootstrap-debs"  # downloaded once, reused by later builds
            debs.mkdir(parents=True, exist_ok=True)
            # a clean environment: the host's PYTHON*/PIP_* settings must not reach the maintainer scripts
            env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
                   "HOME": "/root", "DEBIAN_FRONTEND": "noninteractive"}
            _run(["debootstrap", "--variant=minbase", "--include=" + ",".join(PACKAGES), f"--cache-dir={debs}",
                  SUITE, str(root), mirror], log, env=env)
            timings["debootstrap_s"] = round(time.monotonic() - t0, 1)
            (root / ".vmmshim-debootstrap-done").write_text(json.dumps(timings))
            _step(f"debootstrap done in {timings['debootstrap_s']} s")

        t0 = time.monotonic()
        _step("pip wheels: " + " ".join(PIP_PACKAGES))
        wheels = work / "wheels"
        _run([sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--no-deps",
              "-d", str(wheels), *PIP_PACKAGES], log)
        pyver = sorted(p.name for p in (root / "usr/lib").glob("python3.*") if p.name[8:].isdigit())[-1]
        target = root / "usr/local/lib" / pyver / "dist-packages"
        _run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
              "--upgrade",
              "--find-links", str(wheels), "--target", str(target), *PIP_PACKAGES], log)
        timings["pip_s"] = round(time.monotonic() - t0, 1)

        _step("configure the root: /lab-init, hostname, fstab")
        stub = root / "lab-init"
        stub.write_text(LAB_INIT_STUB)
        stub.chmod(0o755)
        (root / "lab").mkdir(exist_ok=True)
        (root / "etc/hostname").write_text("vmmshim-lab\n")
        (root / "etc/fstab").write_text("/dev/vda / ext4 rw,relatime 0 1\n")
        # apt's cache is the largest dead weight in the image
        for deb in (root / "var/cache/apt/archives").glob("*.deb"):
            deb.unlink()

        boot = root / "boot"
        kernels = sorted(boot.glob("vmlinuz-*"))
        initrds = sorted(boot.glob("initrd.img-*"))
        if not kernels or not initrds:
            raise BuildError(f"no kernel or initrd in {boot}: {sorted(p.name for p in boot.iterdir())}")
        shutil.copy2(kernels[-1], work / "vmlinuz")
        shutil.copy2(initrds[-1], work / "initrd.img")
        versions = subprocess.run(["chroot", str(root), "dpkg-query", "-W", "-f", "${Package} ${Version}\n"],
                                  capture_output=True, text=True).stdout.split("\n")

        (root / ".vmmshim-debootstrap-done").unlink()
        t0 = time.monotonic()
        _step(f"mkfs.ext4 -d root rootfs.ext4 {IMAGE_SIZE}")
        _run(["mkfs.ext4", "-q", "-F", "-L", "vmmshim-lab", "-d", str(root), str(work / "rootfs.ext4"), IMAGE_SIZE],
             log)
        timings["mkfs_s"] = round(time.monotonic() - t0, 1)
        _step(f"mkfs done in {timings['mkfs_s']} s")

        manifest = {
            "key": final.name, "suite": SUITE, "mirror": mirror, "packages": PACKAGES, "pip": PIP_PACKAGES,
            "kernel": kernels[-1].name, "initrd": initrds[-1].name, "timings": timings,
            "versions": [v for v in versions if v], "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (work / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        shutil.rmtree(root)
        if final.exists():
            shutil.rmtree(final)
        work.rename(final)
        _step(f"L1 image ready: {final}")
        return final
    except BaseException:
        # keep the log and the half-built root for a look (debootstrap/debootstrap.log); the next build starts anew
        print(f"[lab] build failed; kept {work}", file=sys.stderr, flush=True)
        raise


def manifest() -> dict:
    return json.loads((image_dir() / "manifest.json").read_text())
