"""Build the default Linux guest: Debian's stock kernel and a busybox initramfs.

Output, in ``$VMMSHIM_CACHE/guest/`` (default ``~/.cache/vmmshim/guest/``):

- ``vmlinuz``: the bzImage of Debian's ``linux-image-6.1.0-*-amd64`` (taken from the .deb, never installed);
- ``initramfs.gz``: a gzip'd newc cpio with busybox-static, the modules of the same kernel for
  vmmshim's devices (:data:`MODULES`: virtio pci/blk/net/rng/console, 9p over virtio, ahci with sd and sr,
  isofs, nvme, and what they depend on), Debian's ``dmidecode`` at
  ``/usr/sbin/dmidecode`` with the shared libraries it needs from ``libc6`` (at their Debian paths:
  ``/lib64/ld-linux-x86-64.so.2``, ``/lib/x86_64-linux-gnu/``) and ``/init``;
- ``inputs.json``: what it was built from; the build is skipped when the hash there still matches.

``/init`` mounts proc, sys and devtmpfs, inserts the modules, prints ``VMMSHIM-GUEST-UP`` and
``VMMSHIM-CPUS=<n>`` on the console, runs the command given on the kernel command line, prints
``VMMSHIM-RUN-STATUS=<status>``, then ``VMMSHIM-GUEST-POWEROFF`` and ``poweroff -f``.

Kernel command-line parameters read by /init:

- ``vmmshim.run=<base64>``: a shell command, base64 (RFC 4648, standard alphabet, ``=`` padding kept) of
  its UTF-8 text, run by busybox ``sh -c``.  The x86 command line holds 2048 bytes, so keep the command
  under about 1.4 KB; make it larger by putting a script on a disk.  Build one with :func:`encode_run`.
- ``vmmshim.exit=reboot``: end with ``reboot -f`` instead of ``poweroff -f``.
- ``vmmshim.shell=1``: start an interactive shell on the console (after the command, if any).
"""

import base64
import gzip
import hashlib
import json
import os
import pathlib
import re
import shutil
import stat
import struct
import subprocess
import tempfile

from vmmshim.lab.paths import cache_dir, digest

#: Bump when the layout of the initramfs changes in a way the hash of this file would not show.
GUEST_VERSION = "1"
KERNEL_META = "linux-image-amd64"
BUSYBOX_PKG = "busybox-static"
#: Modules inserted at boot, in this order, each after its dependencies.
MODULES = ("virtio_pci", "virtio_blk", "virtio_net", "virtio-rng", "virtio_console",
           "9pnet_virtio", "9p",                       # mount -t 9p -o trans=virtio (virtio-9p)
           "ahci", "sd_mod", "sr_mod", "isofs",        # ahci-hd as /dev/sda, ahci-cd as /dev/sr0 with an ISO
           "nvme")
#: Dynamically linked Debian programs put in the initramfs at their Debian paths: (package, path in it).
TOOLS = (("dmidecode", "usr/sbin/dmidecode"),)
#: Packages the tools' shared libraries (and PT_INTERP) are taken from, searched in this order.
LIB_PKGS = ("libc6",)
#: Where, in those packages, a DT_NEEDED name is looked for (no RPATH/RUNPATH is honoured: ld.so's defaults).
LIB_DIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib", "usr/lib")

MARKER_UP = "VMMSHIM-GUEST-UP"
MARKER_CPUS = "VMMSHIM-CPUS="
MARKER_STATUS = "VMMSHIM-RUN-STATUS="
MARKER_OFF = "VMMSHIM-GUEST-POWEROFF"

INIT = r"""#!/bin/sh
# vmmshim default guest /init (busybox sh).  See vmmshim/lab/guest.py for the command-line protocol.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /tmp /run
mount -t devpts devpts /dev/pts 2>/dev/null
for m in $(cat /etc/vmmshim-modules); do
    insmod "$m" 2>/dev/null || echo "vmmshim-init: insmod $m failed"
done
echo "VMMSHIM-GUEST-UP"
echo "VMMSHIM-CPUS=$(grep -c ^processor /proc/cpuinfo)"
run=""
exit_mode=poweroff
shell=0
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        vmmshim.run=*) run="${arg#vmmshim.run=}" ;;
        vmmshim.exit=reboot) exit_mode=reboot ;;
        vmmshim.shell=1) shell=1 ;;
    esac
done
if [ -n "$run" ]; then
    echo "$run" | base64 -d > /tmp/vmmshim-run.sh
    sh /tmp/vmmshim-run.sh
    echo "VMMSHIM-RUN-STATUS=$?"
fi
if [ "$shell" = 1 ]; then
    setsid cttyhack sh
fi
sync
echo "VMMSHIM-GUEST-POWEROFF"
if [ "$exit_mode" = reboot ]; then
    reboot -f
else
    poweroff -f
fi
sleep 5
echo o > /proc/sysrq-trigger
"""


class GuestBuildError(RuntimeError):
    pass


def _step(msg: str) -> None:
    print(f"[guest] {msg}", flush=True)


def encode_run(cmd: str) -> str:
    """The ``vmmshim.run=`` kernel parameter for a shell command."""
    return "vmmshim.run=" + base64.b64encode(cmd.encode()).decode()


def guest_dir() -> pathlib.Path:
    return cache_dir() / "guest"


def _apt_show(pkg: str) -> dict:
    r = subprocess.run(["apt-cache", "show", "--no-all-versions", pkg], capture_output=True, text=True)
    if r.returncode != 0 or not r.stdout.strip():
        raise GuestBuildError(f"apt-cache show {pkg} failed ({r.stderr.strip()}); run apt-get update")
    fields = {}
    for line in r.stdout.split("\n\n")[0].splitlines():
        if line and not line[0].isspace() and ":" in line:
            k, _, v = line.partition(":")
            fields[k] = v.strip()
    return fields


def kernel_package() -> tuple[str, str]:
    """(package, version) of the versioned kernel the metapackage points at; ``$VMMSHIM_GUEST_KERNEL_PKG`` wins."""
    pkg = os.environ.get("VMMSHIM_GUEST_KERNEL_PKG")
    if not pkg:
        deps = _apt_show(KERNEL_META).get("Depends", "")
        m = re.search(r"(linux-image-6\.1\.0-\d+-amd64)", deps)
        if not m:
            raise GuestBuildError(f"{KERNEL_META} depends on {deps!r}, no linux-image-6.1.0-*-amd64")
        pkg = m.group(1)
    return pkg, _apt_show(pkg)["Version"]


def _download(pkg: str, version: str) -> pathlib.Path:
    debs = cache_dir() / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    quoted = version.replace(":", "%3a")
    found = list(debs.glob(f"{pkg}_{quoted}_*.deb"))
    if found:
        return found[0]
    _step(f"apt-get download {pkg}={version}")
    r = subprocess.run(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", f"{pkg}={version}"],
                       cwd=debs, capture_output=True, text=True)
    found = list(debs.glob(f"{pkg}_{quoted}_*.deb"))
    if r.returncode != 0 or not found:
        raise GuestBuildError(f"apt-get download {pkg}={version} failed: {r.stderr.strip()[-800:]}")
    return found[0]


def _extract(deb: pathlib.Path) -> pathlib.Path:
    dest = cache_dir() / "pkgs" / deb.stem
    if (dest / ".complete").exists():
        return dest
    _step(f"dpkg-deb -x {deb.name}")
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], check=True)
    (dest / ".complete").touch()
    return dest


def _elf_deps(data: bytes, name: str) -> tuple:
    """(PT_INTERP or None, [DT_NEEDED names]) of an x86-64 ELF file, read from its program headers."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise GuestBuildError(f"{name} is not a little-endian ELF64 file")
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    interp, dynamic, loads = None, None, []
    for i in range(phnum):
        p_type, _flags, off, vaddr, _paddr, filesz, _memsz, _align = struct.unpack_from(
            "<IIQQQQQQ", data, phoff + i * phentsize)
        if p_type == 3:  # PT_INTERP
            interp = data[off:off + filesz].split(b"\0")[0].decode()
        elif p_type == 2:  # PT_DYNAMIC
            dynamic = (off, filesz)
        elif p_type == 1:  # PT_LOAD
            loads.append((vaddr, off, filesz))
    if dynamic is None:
        return interp, []
    strtab, needed = None, []
    for pos in range(dynamic[0], dynamic[0] + dynamic[1], 16):
        tag, val = struct.unpack_from("<qQ", data, pos)
        if tag == 0:  # DT_NULL
            break
        if tag == 1:  # DT_NEEDED
            needed.append(val)
        elif tag == 5:  # DT_STRTAB (an address: map it to the file through the PT_LOAD segments)
            strtab = next((off + val - vaddr for vaddr, off, size in loads if vaddr <= val < vaddr + size), None)
    if needed and strtab is None:
        raise GuestBuildError(f"{name}: DT_STRTAB outside every PT_LOAD segment")
    names = [data[strtab + n:data.index(b"\0", strtab + n)].decode() for n in needed]
    return interp, names


def _tree_entry(trees: dict, rel: str):
    """(package, path) of the first tree holding ``rel`` (a file or a symlink), or None."""
    for pkg, tree in trees.items():
        if os.path.lexists(tree / rel):
            return pkg, tree / rel
    return None


def _tool_files(tool_trees: dict, lib_trees: dict) -> dict:
    """What the initramfs needs for :data:`TOOLS`: ``{path in it: ("file", bytes, perm) | ("symlink", target)}``.

    Each tool's PT_INTERP and DT_NEEDED libraries (and theirs, transitively) are looked up in the trees of
    :data:`LIB_PKGS` only, never on the host; symlinks are kept as the .deb has them, their targets added too.
    """
    files = {}

    def add(rel: str, trees: dict, why: str):
        rel = rel.lstrip("/")
        for _ in range(10):
            if rel in files:
                return None
            hit = _tree_entry(trees, rel)
            if hit is None:
                raise GuestBuildError(f"{why}: no /{rel} in {', '.join(trees)}")
            pkg, path = hit
            if not path.is_symlink():
                data = path.read_bytes()
                files[rel] = ("file", data, stat.S_IMODE(path.lstat().st_mode))
                return data
            target = os.readlink(path)
            files[rel] = ("symlink", target)
            rel = os.path.normpath(target.lstrip("/") if target.startswith("/")
                                   else os.path.join(os.path.dirname(rel), target))
        raise GuestBuildError(f"{why}: too many symlinks at /{rel}")

    pending = []
    for pkg, rel in TOOLS:
        pending.append((rel, {pkg: tool_trees[pkg]}, f"{pkg}"))
    while pending:
        rel, trees, why = pending.pop(0)
        data = add(rel, trees, why)
        if data is None:
            continue
        interp, needed = _elf_deps(data, rel)
        if interp:
            pending.append((interp, lib_trees, f"PT_INTERP of /{rel}"))
        for lib in needed:
            where = next((f"{d}/{lib}" for d in LIB_DIRS if _tree_entry(lib_trees, f"{d}/{lib}")), None)
            if where is None:
                raise GuestBuildError(f"/{rel} needs {lib}, which is in none of {', '.join(lib_trees)}")
            pending.append((where, lib_trees, f"DT_NEEDED {lib} of /{rel}"))
    return files


def _modinfo_depends(data: bytes) -> list[str]:
    """The ``depends=`` field of a module's .modinfo section (null-separated ``key=value`` strings)."""
    m = re.search(rb"(?:^|\0)depends=([^\0]*)\0", data)
    return [d for d in m.group(1).decode().split(",") if d] if m else []


def _module_order(moddir: pathlib.Path, wanted) -> list[str]:
    """Module paths (relative to ``moddir``) for ``wanted`` and their dependencies, each after what it needs.

    The .deb carries no modules.dep (depmod makes it at install time), so the dependencies are read from each
    module's own .modinfo.  A name that is no module file and appears in modules.builtin is built in.
    """
    by_name = {}
    for path in moddir.rglob("*.ko*"):
        name = re.sub(r"\.ko(\.\w+)?$", "", path.name).replace("-", "_")
        by_name[name] = path
    builtin = set()
    bfile = moddir / "modules.builtin"
    if bfile.exists():
        for line in bfile.read_text().splitlines():
            builtin.add(re.sub(r"\.ko$", "", os.path.basename(line)).replace("-", "_"))
    order = []

    def visit(name, chain):
        key = name.replace("-", "_")
        if key in chain:
            raise GuestBuildError(f"module dependency loop: {' -> '.join(chain + [key])}")
        if key not in by_name:
            if key in builtin:
                return
            raise GuestBuildError(f"module {name} is neither a module of this kernel nor built in")
        rel = str(by_name[key].relative_to(moddir))
        if rel in order:
            return
        for dep in _modinfo_depends(by_name[key].read_bytes()):
            visit(dep, chain + [key])
        order.append(rel)

    for name in wanted:
        visit(name, [])
    return order


class _Cpio:
    """A newc archive written by hand: deterministic, owned by root, device nodes without mknod."""

    def __init__(self):
        self.buf = bytearray()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev=(0, 0), nlink=1):
        name_b = name.encode() + b"\0"
        hdr = "070701" + "".join(f"{v:08X}" for v in (
            self.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(name_b), 0))
        self.ino += 1
        self.buf += hdr.encode() + name_b
        self.buf += b"\0" * (-len(self.buf) % 4)
        self.buf += data
        self.buf += b"\0" * (-len(self.buf) % 4)

    def dir(self, name):
        self._entry(name, stat.S_IFDIR | 0o755, nlink=2)

    def file(self, name, data: bytes, perm=0o644):
        self._entry(name, stat.S_IFREG | perm, data)

    def symlink(self, name, target):
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name, major, minor, perm=0o600):
        self._entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return bytes(self.buf)


def _extra_packages() -> dict:
    """``{package: version}`` of the tools' and their libraries' packages (apt's candidate, as for busybox)."""
    return {pkg: _apt_show(pkg)["Version"] for pkg in dict.fromkeys([p for p, _ in TOOLS] + list(LIB_PKGS))}


def fetch_packages() -> dict:
    """Download and extract the guest kernel, busybox-static and tool .debs into the cache; return their trees."""
    kpkg, kver = kernel_package()
    bver = _apt_show(BUSYBOX_PKG)["Version"]
    trees = {kpkg: _extract(_download(kpkg, kver)), BUSYBOX_PKG: _extract(_download(BUSYBOX_PKG, bver))}
    for pkg, ver in _extra_packages().items():
        trees[pkg] = _extract(_download(pkg, ver))
    for pkg, tree in trees.items():
        _step(f"{pkg}: {tree}")
    return trees


def build_guest(force: bool = False) -> pathlib.Path:
    """Build vmlinuz and initramfs.gz unless the cached ones have the same inputs; return their directory."""
    out = guest_dir()
    kpkg, kver = kernel_package()
    bver = _apt_show(BUSYBOX_PKG)["Version"]
    extra = _extra_packages()
    key = digest(GUEST_VERSION, pathlib.Path(__file__).read_bytes(), kpkg, kver, BUSYBOX_PKG, bver, " ".join(MODULES),
                 " ".join(f"{p}={v}" for p, v in extra.items()))
    inputs_file = out / "inputs.json"
    if not force and inputs_file.exists() and (out / "vmlinuz").exists() and (out / "initramfs.gz").exists():
        if json.loads(inputs_file.read_text()).get("key") == key:
            _step(f"default guest up to date: {out}")
            return out
    kroot = _extract(_download(kpkg, kver))
    broot = _extract(_download(BUSYBOX_PKG, bver))
    extra_trees = {pkg: _extract(_download(pkg, ver)) for pkg, ver in extra.items()}
    tools = _tool_files({p: extra_trees[p] for p, _ in TOOLS}, {p: extra_trees[p] for p in LIB_PKGS})
    kernels = sorted((kroot / "boot").glob("vmlinuz-*"))
    if not kernels:
        raise GuestBuildError(f"no boot/vmlinuz-* in {kpkg}")
    kname = kernels[-1].name[len("vmlinuz-"):]
    moddir = kroot / "lib/modules" / kname
    mods = _module_order(moddir, MODULES)

    busybox = (broot / "bin/busybox").read_bytes()
    applets = subprocess.run([str(broot / "bin/busybox"), "--list-full"], capture_output=True, text=True,
                             check=True).stdout.split()

    cpio = _Cpio()
    dirs = ["bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "run", "etc", "root",
            "lib", "lib/modules", f"lib/modules/{kname}", "mnt"]
    for rel in sorted(tools):
        parent = os.path.dirname(rel)
        chain = []
        while parent and parent not in dirs and parent not in chain:
            chain.insert(0, parent)
            parent = os.path.dirname(parent)
        dirs += chain
    for d in dirs:
        cpio.dir(d)
    cpio.chardev("dev/console", 5, 1)
    cpio.chardev("dev/null", 1, 3, 0o666)
    cpio.chardev("dev/ttyS0", 4, 64)
    cpio.file("bin/busybox", busybox, 0o755)
    for applet in applets:
        if applet != "bin/busybox" and applet not in tools:
            depth = applet.count("/")
            cpio.symlink(applet, "../" * depth + "bin/busybox")
    loaded = []
    for mod in mods:
        data = (moddir / mod).read_bytes()
        if mod.endswith(".xz") or mod.endswith(".zst"):
            raise GuestBuildError(f"{mod} is compressed; busybox insmod wants plain .ko")
        path = f"lib/modules/{kname}/{os.path.basename(mod)}"
        cpio.file(path, data)
        loaded.append("/" + path)
    for rel, entry in sorted(tools.items()):
        if entry[0] == "symlink":
            cpio.symlink(rel, entry[1])
        else:
            cpio.file(rel, entry[1], entry[2])
    cpio.file("etc/vmmshim-modules", ("\n".join(loaded) + "\n").encode())
    cpio.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    cpio.file("etc/group", b"root:x:0:\n")
    cpio.file("init", INIT.encode(), 0o755)

    out.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=".build-", dir=out))
    try:
        (tmp / "initramfs.gz").write_bytes(gzip.compress(cpio.finish(), compresslevel=9, mtime=0))
        shutil.copyfile(kernels[-1], tmp / "vmlinuz")
        for name in ("vmlinuz", "initramfs.gz"):
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    info = {
        "key": key, "kernel_package": kpkg, "kernel_version": kver, "kernel_release": kname,
        "busybox": f"{BUSYBOX_PKG} {bver}", "modules": [os.path.basename(m) for m in mods],
        "packages": {pkg: ver for pkg, ver in extra.items()}, "files": ["/" + rel for rel in sorted(tools)],
        "sha256": {n: hashlib.sha256((out / n).read_bytes()).hexdigest() for n in ("vmlinuz", "initramfs.gz")},
    }
    inputs_file.write_text(json.dumps(info, indent=1) + "\n")
    _step(f"default guest ready: {out} (kernel {kname}, modules {', '.join(info['modules'])})")
    return out


def guest_ready() -> bool:
    out = guest_dir()
    return all((out / n).is_file() for n in ("vmlinuz", "initramfs.gz", "inputs.json"))
