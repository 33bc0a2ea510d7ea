"""Inside L1: boot the default guest with virtio devices under vmmshim or under QEMU (the peer), and the host-side
helpers the virtio lab tests (:mod:`vmmshim.lab.virtio_check`) and the I/O benchmark (``bench/io_l2.py``) share.

- :func:`tap_up`: a persistent tap (``tap0``, 10.0.2.1/24) for ``-s N,virtio-net,tap0`` / QEMU's ``-netdev tap``;
- :func:`vmmshim_argv` / :func:`qemu_argv`: the same guest and devices on either VMM (disks in slot order, then
  the NICs: the tap's, then user-mode networking's with ``net="slirp"``, i.e. vmmshim's ``slirp`` backend and
  QEMU's ``-netdev user``; then the RNG; the console goes to a file in both);
- :func:`boot`: runs one VMM, watches the console file, kills it when ``VMMSHIM-GUEST-UP`` has not shown within
  ``marker_timeout`` (the open lost-timer-interrupt bug hangs some vmmshim boots early) or the whole run passes
  ``timeout``; :func:`boot_retry` boots again after such a hang;
- :class:`Sink`, :class:`Source`, :class:`Gate`: one-connection-at-a-time TCP servers, on the tap address unless
  told another (a guest's ``nc`` sends to a Sink, reads from a Source, and waits at a Gate while L1 does
  something).

QEMU's disks use ``cache=writeback`` by default: the images live on L1's tmpfs, where ``cache=none`` (O_DIRECT)
cannot open them, and vmmshim's virtio-blk goes through the page cache as well.
"""

import dataclasses
import hashlib
import os
import socket
import subprocess
import sys
import threading
import time

from vmmshim.lab.guest import MARKER_OFF, MARKER_UP

TAP = "tap0"
HOST_IP = "10.0.2.1"
GUEST_IP = "10.0.2.15"
BASE_APPEND = "console=ttyS0 panic=-1 hpet=disable"
#: User-mode networking: the ``net=`` of :func:`vmmshim_argv` / :func:`qemu_argv`.
NET_SLIRP = "slirp"


def guest_dir():
    return os.environ.get("VMMSHIM_GUEST_DIR", "/lab/guest")


def tap_up(name=TAP, addr=HOST_IP + "/24"):
    """Creates the tap (if missing), gives it ``addr`` and brings it up."""
    if not os.path.exists(f"/sys/class/net/{name}"):
        subprocess.run(["ip", "tuntap", "add", name, "mode", "tap"], check=True)
        subprocess.run(["ip", "addr", "add", addr, "dev", name], check=True)
    subprocess.run(["ip", "link", "set", name, "up"], check=True)


#: The guest's name for the first disk of each kind (what a benchmark or test reads and writes).
DISK_NODES = {"virtio-blk": "/dev/vda", "nvme": "/dev/nvme0n1", "ahci-hd": "/dev/sda"}
NVME_SERIAL = "VMMSHIM-NVME"
SHARE_TAG = "share"


@dataclasses.dataclass
class Disk:
    path: str
    ro: bool = False
    kind: str = "virtio-blk"        # or "nvme", "ahci-hd" (bhyve's device names; QEMU's equivalents below)


def _check_net(net):
    if net not in (None, NET_SLIRP):
        raise ValueError(f"net={net!r}: only {NET_SLIRP!r} (user-mode networking) is known")


def vmmshim_argv(append, console, disks=(), tap=None, rnd=False, mem="512M", ncpus=1, opts=(), share=None,
                 net=None):
    """``opts``: more vmmshim flags (``-o virtio_msix=false`` ...). ``share``: a host folder exported with
    virtio-9p under the tag :data:`SHARE_TAG`. ``net="slirp"``: a virtio-net NIC on the ``slirp`` backend (in the
    slot after the tap's NIC, if any)."""
    _check_net(net)
    g = guest_dir()
    argv = [sys.executable, "-m", "vmmshim", *opts, "-A", "-c", str(ncpus), "-m", mem, "-s", "0:0,hostbridge",
            "-s", "31,lpc"]
    slot = 4
    for d in disks:
        argv += ["-s", f"{slot},{d.kind},{d.path}" + (",ro" if d.ro else "")]
        slot += 1
    if share:
        argv += ["-s", f"{slot},virtio-9p,{SHARE_TAG}={share}"]
        slot += 1
    if tap:
        argv += ["-s", f"{slot},virtio-net,{tap}"]
        slot += 1
    if net:
        argv += ["-s", f"{slot},virtio-net,{net}"]
        slot += 1
    if rnd:
        argv += ["-s", f"{slot},virtio-rnd"]
    return argv + ["-l", f"com1,file:{console}", "-f", f"kexec,{g}/vmlinuz,{g}/initramfs.gz,{append}"]


def qemu_argv(append, console, disks=(), tap=None, rnd=False, mem="512M", ncpus=1, cache="writeback", opts=(),
              share=None, net=None):
    """``opts``: vmmshim's ``-o virtio_msix=false`` becomes ``vectors=0`` on QEMU's virtio devices (INTx). Disks of
    kind ``nvme`` become QEMU's ``nvme`` device, ``ahci-hd`` an ``ide-hd`` on an ``ahci`` controller; ``share`` is
    ``-virtfs local`` (``security_model=none``); ``net="slirp"`` is ``-netdev user`` on a ``virtio-net-pci`` (after
    the tap's NIC, if any)."""
    _check_net(net)
    g = guest_dir()
    dopt = ",vectors=0" if "virtio_msix=false" in opts else ""
    argv = ["qemu-system-x86_64", "-accel", "kvm", "-machine", "pc,kernel_irqchip=off", "-smp", str(ncpus),
            "-m", mem.rstrip("M"), "-display", "none", "-monitor", "none", "-no-reboot",
            "-serial", f"file:{console}", "-kernel", f"{g}/vmlinuz", "-initrd", f"{g}/initramfs.gz",
            "-append", append]
    for i, d in enumerate(disks):
        argv += ["-drive", f"file={d.path},if=none,id=d{i},format=raw,cache={cache}" + (",readonly=on" if d.ro else "")]
        if d.kind == "nvme":
            argv += ["-device", f"nvme,drive=d{i},serial={NVME_SERIAL}"]
        elif d.kind == "ahci-hd":
            argv += ["-device", f"ahci,id=ahci{i}", "-device", f"ide-hd,drive=d{i},bus=ahci{i}.0"]
        else:
            argv += ["-device", f"virtio-blk-pci,drive=d{i}{dopt}"]
    if share:
        argv += ["-virtfs", f"local,path={share},mount_tag={SHARE_TAG},security_model=none"]
    if tap:
        argv += ["-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no", "-device",
                 f"virtio-net-pci,netdev=n0{dopt}"]
    if net:
        nid = "n1" if tap else "n0"
        argv += ["-netdev", f"user,id={nid}", "-device", f"virtio-net-pci,netdev={nid}{dopt}"]
    if rnd:
        argv += ["-device", f"virtio-rng-pci{dopt}"]
    return argv


@dataclasses.dataclass
class Boot:
    status: int | None = None       # the VMM's exit status (None: killed by us)
    console: str = ""
    marker_s: float | None = None   # VMM start to VMMSHIM-GUEST-UP
    total_s: float = 0.0
    hung: bool = False              # no marker within marker_timeout: killed, worth another try
    timed_out: bool = False         # marker seen, the whole run passed timeout: killed
    stderr: str = ""

    @property
    def up(self):
        return self.marker_s is not None

    @property
    def powered_off(self):
        return MARKER_OFF in self.console and self.status is not None


def boot(argv, console, timeout=300.0, marker_timeout=100.0, watch=None):
    """Runs ``argv`` (its console written to the file ``console``); ``watch(text)`` sees the console as it grows."""
    if os.path.exists(console):
        os.unlink(console)
    res = Boot()
    t0 = time.monotonic()
    errpath = console + ".err"
    with open(errpath, "wb") as err:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=subprocess.STDOUT)
    try:
        while True:
            rc = proc.poll()
            try:
                with open(console, "rb") as f:
                    res.console = f.read().decode(errors="replace")
            except FileNotFoundError:
                pass
            now = time.monotonic() - t0
            if res.marker_s is None and MARKER_UP in res.console:
                res.marker_s = round(now, 2)
            if watch is not None:
                watch(res.console)
            if rc is not None:
                res.status = rc
                break
            if res.marker_s is None and now > marker_timeout:
                res.hung = True
                break
            if now > timeout:
                res.timed_out = True
                break
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        res.total_s = round(time.monotonic() - t0, 2)
        with open(errpath, "rb") as f:
            res.stderr = f.read().decode(errors="replace")[-3000:]
    return res


def boot_retry(make, console, tries=3, prepare=None, **kw):
    """Boots ``make()`` up to ``tries`` times while boots hang (or triple-fault) before the marker; returns
    ``(last Boot, failed boots)``."""
    hangs = 0
    for _ in range(tries):
        if prepare is not None:
            prepare()
        res = boot(make(), console, **kw)
        if res.up:
            return res, hangs
        if not res.hung and res.status not in (3, None):
            return res, hangs        # an error before the marker (bad flags, a missing file): no retry
        hangs += 1
    return res, hangs


def write_image(path, mib):
    """A raw image of ``mib`` MiB of :func:`pattern` bytes: real pages, not holes (on L1's tmpfs)."""
    chunk = pattern(1 << 20, b"disk")
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(chunk)
    return path


def pattern(n, seed=b"vmmshim"):
    """``n`` deterministic pseudo-random bytes (SHA-256 in counter mode)."""
    out = bytearray()
    i = 0
    while len(out) < n:
        out += hashlib.sha256(seed + i.to_bytes(8, "little")).digest()
        i += 1
    return bytes(out[:n])


class _Server(threading.Thread):
    """Accepts on host:port (HOST_IP by default; ``"0.0.0.0"``: every address of L1), one connection at a time,
    calling ``handle(conn)``; ``results`` collects what it returns."""

    def __init__(self, port, host=HOST_IP):
        super().__init__(daemon=True)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(4)
        self.results = []
        self.start()

    def run(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                try:
                    self.results.append(self.handle(conn))
                except OSError as exc:
                    self.results.append({"error": repr(exc)})

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)    # wakes accept(); close() alone would not
        except OSError:
            pass
        self.sock.close()
        self.join(5)


class Sink(_Server):
    """Reads a connection to its end: ``{bytes, sha256, md5, seconds}`` (from accept to EOF)."""

    def handle(self, conn):
        t0 = time.monotonic()
        sha, md5, n = hashlib.sha256(), hashlib.md5(), 0
        buf = bytearray(1 << 20)
        while True:
            k = conn.recv_into(buf)
            if not k:
                break
            sha.update(buf[:k])
            md5.update(buf[:k])
            n += k
        return {"bytes": n, "sha256": sha.hexdigest(), "md5": md5.hexdigest(), "seconds": time.monotonic() - t0}


class Source(_Server):
    """Sends ``data`` ``repeat`` times, then closes: ``{bytes, seconds}``."""

    def __init__(self, port, data, repeat=1, host=HOST_IP):
        self.data, self.repeat = data, repeat
        super().__init__(port, host)

    def handle(self, conn):
        t0 = time.monotonic()
        for _ in range(self.repeat):
            conn.sendall(self.data)
        conn.shutdown(socket.SHUT_WR)
        return {"bytes": len(self.data) * self.repeat, "seconds": time.monotonic() - t0}


class Gate(_Server):
    """Runs ``fn() -> str`` when the guest connects and answers with that line."""

    def __init__(self, port, fn, host=HOST_IP):
        self.fn = fn
        super().__init__(port, host)

    def handle(self, conn):
        line = self.fn()
        conn.sendall(line.encode() + b"\n")
        return line


def l1_ping(addr=GUEST_IP, count=3):
    """L1 pings the guest (busybox ping: Debian's L1 has no iputils); returns 'rc=N received=M'."""
    r = subprocess.run(["busybox", "ping", "-c", str(count), "-w", "10", addr], capture_output=True, text=True)
    got = 0
    for line in r.stdout.splitlines():
        if "packets received" in line:
            got = int(line.split(",")[1].split()[0])
    return f"rc={r.returncode} received={got}"
