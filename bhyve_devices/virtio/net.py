"""virtio-net (VIRTIO 1.1 section 5.1; bhyve ``pci_virtio_net.c`` + ``net_backends.c``).

``-s N,virtio-net,tapN[,mac=xx:xx:xx:xx:xx:xx]`` and ``-s N,virtio-tap,tapN``: :func:`parse_options`, then
:class:`VirtioNet` over a backend:

- :class:`TapBackend` (Linux): ``/dev/net/tun`` with ``TUNSETIFF`` (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR) on the
  named interface (an existing, persistent tap is attached; a new one is created if we may), non-blocking, with
  ``TUNSETVNETHDRSZ`` following the negotiated header length (tested against a real tap where the tests may
  create one), so the virtio-net header travels through the tap
  unchanged and frames move between the tap and guest memory with ``readv``/``writev`` (no copy when a frame fits
  the first receive chain).
- :class:`NetBSDTapBackend`: ``/dev/tapN`` (or the cloning ``/dev/tap`` with ``TAPGIFNAME``), plain Ethernet frames
  (the device adds and strips the virtio header). Written from NetBSD's tap(4); not tested here.
- :class:`SocketPairBackend`: an ``AF_UNIX``/``SOCK_SEQPACKET`` pair, one frame per message; ``peer`` is the other
  end (tests, or user-space switches).

MAC: ``mac=`` or, as bhyve's ``net_genmac``, the NetApp OUI 00:a0:98 followed by the first three bytes of the MD5
of ``"<slot>-<func>-<vmname>"`` (:func:`genmac`; pass the ``-U`` UUID as ``vmname`` for a UUID-stable address).

Queues: 0 receiveq, 1 transmitq (no control queue, one pair). The header (:data:`VIRTIO_NET_HDR`) is 12 bytes when
VIRTIO_F_VERSION_1 or VIRTIO_NET_F_MRG_RXBUF is negotiated, else the legacy 10 bytes. With MRG_RXBUF a frame may
span several receive chains and ``num_buffers`` says how many; without it a frame must fit one chain.

Receive: one thread per device blocks in ``poll`` on the backend fd and a wake pipe. It polls the backend only
while the guest has posted receive buffers: with none it waits on the pipe alone until the driver notifies the
receive queue (with EVENT_IDX the queue has published ``avail_event`` so that notification comes), so it never
spins. A frame for which the guest has too little buffer space is dropped (counted in ``stats['rx_dropped']``).
Transmit runs on the notifying vCPU: each chain is written to the backend with one ``writev``.

Features: MAC, STATUS (link up), MRG_RXBUF; with a backend that carries the virtio-net header and takes offload
settings (the Linux tap) also the offloads QEMU's tap networking has: CSUM and HOST_TSO4/TSO6/ECN (the guest may
send partially checksummed and GSO frames: the header goes to the tap as it is) and GUEST_CSUM and
GUEST_TSO4/TSO6/ECN (``TUNSETOFFLOAD`` lets the tap hand over such frames, following the GUEST_* bits the driver
accepted; none after a reset). A guest sending 64 KiB TCP segments instead of 1.5 KiB frames makes 40 times fewer
exits. Not supported: UFO/USO, the control queue (promiscuous mode, VLAN filters, MAC tables, announce, guest
offload changes), multiqueue, MTU, vmnet/vale/netgraph/slirp backends.
"""

import fcntl
import hashlib
import os
import select
import socket
import struct
import threading

from construct import Array, Int8ul, Int16ul, Struct

from .device import VIRTIO_F_VERSION_1, VIRTIO_ID_NET, VirtioDevice, bit
from .virtqueue import scatter, split_segments

VIRTIO_NET_F_CSUM = 0
VIRTIO_NET_F_GUEST_CSUM = 1
VIRTIO_NET_F_GUEST_TSO4 = 7
VIRTIO_NET_F_GUEST_TSO6 = 8
VIRTIO_NET_F_GUEST_ECN = 9
VIRTIO_NET_F_HOST_TSO4 = 11
VIRTIO_NET_F_HOST_TSO6 = 12
VIRTIO_NET_F_HOST_ECN = 13
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_NET_F_STATUS = 16
VIRTIO_NET_S_LINK_UP = 1
VIRTIO_NET_HDR_GSO_NONE = 0

VIRTIO_NET_HDR = Struct("flags" / Int8ul, "gso_type" / Int8ul, "hdr_len" / Int16ul, "gso_size" / Int16ul,
                        "csum_start" / Int16ul, "csum_offset" / Int16ul, "num_buffers" / Int16ul)
VIRTIO_NET_HDR_LEGACY_LEN = 10
VIRTIO_NET_CONFIG = Struct("mac" / Array(6, Int8ul), "status" / Int16ul)

RXQ, TXQ = 0, 1
MAX_FRAME = 65536 + 14 + 4      # a 64 KiB packet plus the Ethernet and VLAN headers
_U16 = struct.Struct("<H")

# Linux <linux/if_tun.h>
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08

#: Offload features offered over a backend with ``offloads`` (the virtio-net header passes through it).
OFFLOAD_FEATURES = (1 << VIRTIO_NET_F_CSUM | 1 << VIRTIO_NET_F_GUEST_CSUM | 1 << VIRTIO_NET_F_GUEST_TSO4
                    | 1 << VIRTIO_NET_F_GUEST_TSO6 | 1 << VIRTIO_NET_F_GUEST_ECN | 1 << VIRTIO_NET_F_HOST_TSO4
                    | 1 << VIRTIO_NET_F_HOST_TSO6 | 1 << VIRTIO_NET_F_HOST_ECN)


def tun_offload_flags(features):
    """The TUNSETOFFLOAD flags for the GUEST_* offloads in ``features`` (what the driver can receive)."""
    if not features >> VIRTIO_NET_F_GUEST_CSUM & 1:
        return 0
    flags = TUN_F_CSUM
    if features >> VIRTIO_NET_F_GUEST_TSO4 & 1:
        flags |= TUN_F_TSO4
    if features >> VIRTIO_NET_F_GUEST_TSO6 & 1:
        flags |= TUN_F_TSO6
    if flags & (TUN_F_TSO4 | TUN_F_TSO6) and features >> VIRTIO_NET_F_GUEST_ECN & 1:
        flags |= TUN_F_TSO_ECN
    return flags
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000


def genmac(slot, func, vmname):
    """bhyve's default MAC: 00:a0:98 + MD5("<slot>-<func>-<vmname>")[0:3]."""
    d = hashlib.md5(f"{slot}-{func}-{vmname}".encode()).digest()
    return bytes([0x00, 0xA0, 0x98]) + d[:3]


def parse_mac(s):
    parts = s.replace("-", ":").split(":")
    if len(parts) != 6:
        raise ValueError(f"invalid MAC {s!r}")
    mac = bytes(int(p, 16) for p in parts)
    if mac[0] & 1 or mac == bytes(6):
        raise ValueError(f"invalid MAC {s!r} (multicast or zero)")
    return mac


def parse_options(opts):
    """``tapN[,mac=..]`` (bhyve's legacy form) -> dict(backend name, mac or None)."""
    parts = opts.split(",") if opts else []
    out = dict(backend=None, mac=None)
    for i, p in enumerate(parts):
        key, eq, val = p.partition("=")
        if key == "mac":
            out["mac"] = parse_mac(val)
        elif key == "backend" and eq:
            out["backend"] = val
        elif i == 0 and not eq:
            out["backend"] = p
        elif p:
            raise ValueError(f"virtio-net: unknown option {p!r}")
    return out


# ---- backends ---------------------------------------------------------------------------------------------------------
class NetBackend:
    """A frame transport: ``fileno()`` for poll, ``recv_into(segs) -> n`` (None when nothing is waiting, 0 when
    the peer is gone), ``send(segs)``. ``vnet_hdr`` says whether frames carry the virtio-net header (then
    :meth:`set_vnet_hdr_len` follows the negotiated length); ``offloads`` whether it takes partially checksummed
    and GSO frames and can be told by :meth:`set_offload` which ones it may hand over."""

    vnet_hdr = False
    offloads = False

    def fileno(self):
        raise NotImplementedError

    def recv_into(self, segs):
        """Bytes read into ``segs``; ``None`` when no frame is waiting; 0 at end of file (the peer is gone)."""
        try:
            return os.readv(self.fileno(), segs)
        except BlockingIOError:
            return None

    def send(self, segs):
        try:
            os.writev(self.fileno(), segs)
        except BlockingIOError:
            pass  # the backend is full: the frame is dropped, as a NIC would

    def set_vnet_hdr_len(self, n):
        pass

    def set_offload(self, tun_flags):
        pass

    def close(self):
        pass


class TapBackend(NetBackend):
    """A Linux tap interface (see the module docstring)."""

    vnet_hdr = True

    def __init__(self, name, vnet_hdr=True, tun_path="/dev/net/tun"):
        self.name = name
        self.fd = os.open(tun_path, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
        flags = IFF_TAP | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0)
        try:
            ifr = struct.pack("16sH22x", name.encode()[:15], flags)
            fcntl.ioctl(self.fd, TUNSETIFF, ifr)
        except OSError:
            os.close(self.fd)
            raise
        self.vnet_hdr = vnet_hdr
        self.offloads = False
        if vnet_hdr:
            try:
                self.set_offload(0)
                self.offloads = True
            except OSError:
                pass

    def fileno(self):
        return self.fd

    def set_vnet_hdr_len(self, n):
        if self.vnet_hdr:
            fcntl.ioctl(self.fd, TUNSETVNETHDRSZ, struct.pack("i", n))

    def set_offload(self, tun_flags):
        fcntl.ioctl(self.fd, TUNSETOFFLOAD, tun_flags)

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class NetBSDTapBackend(NetBackend):
    """NetBSD tap(4): ``/dev/tapN`` read/written one Ethernet frame per call, no virtio header. Untested here."""

    vnet_hdr = False

    def __init__(self, name, dev_dir="/dev"):
        self.name = name
        self.fd = os.open(os.path.join(dev_dir, name), os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)

    def fileno(self):
        return self.fd

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class SocketPairBackend(NetBackend):
    """Frames over an AF_UNIX SOCK_SEQPACKET pair; the test (or a switch) uses ``peer``. With ``offloads`` (and
    ``vnet_hdr``) the peer promises to cope with offloaded frames; ``offload_flags`` records the last setting."""

    def __init__(self, vnet_hdr=False, offloads=False):
        self.sock, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.setblocking(False)
        self.vnet_hdr = vnet_hdr
        self.offloads = offloads and vnet_hdr
        self.offload_flags = None

    def set_offload(self, tun_flags):
        self.offload_flags = tun_flags

    def fileno(self):
        return self.sock.fileno()

    def close(self):
        self.sock.close()
        self.peer.close()


def open_backend(name):
    """``tapN`` -> TapBackend on Linux, NetBSDTapBackend on NetBSD."""
    if name is None:
        return None
    if os.uname().sysname == "NetBSD":
        return NetBSDTapBackend(name)
    return TapBackend(name)


# ---- the device -------------------------------------------------------------------------------------------------------
class VirtioNet(VirtioDevice):
    name = "virtio-net"
    device_type = VIRTIO_ID_NET
    num_queues = 2
    queue_size = 256
    config_size = VIRTIO_NET_CONFIG.sizeof()   # 8

    def __init__(self, backend=None, mac=None, slot=0, func=0, vmname="vm", mergeable=True, start=True,
                 offloads=True):
        super().__init__()
        self.backend = backend
        self.mac = bytes(mac) if mac is not None else genmac(slot, func, vmname)
        self.features = bit(VIRTIO_NET_F_MAC) | bit(VIRTIO_NET_F_STATUS)
        if mergeable:
            self.features |= bit(VIRTIO_NET_F_MRG_RXBUF)
        if offloads and backend is not None and backend.vnet_hdr and getattr(backend, "offloads", False):
            self.features |= OFFLOAD_FEATURES
        self.hdr_len = VIRTIO_NET_HDR_LEGACY_LEN
        self.mrg = False
        self.stats = dict(rx_frames=0, rx_bytes=0, rx_dropped=0, tx_frames=0, tx_bytes=0, tx_dropped=0,
                          rx_waits=0)
        self._spill = bytearray(MAX_FRAME + 12)
        self._rx_lock = threading.Lock()
        self._tx_lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stop = False
        self._stop_backend = False
        self._thread = None
        if start and backend is not None:
            self._thread = threading.Thread(target=self._rx_loop, name="virtio-net rx", daemon=True)
            self._thread.start()

    def config_bytes(self):
        return VIRTIO_NET_CONFIG.build(dict(mac=list(self.mac), status=VIRTIO_NET_S_LINK_UP))

    def apply_features(self, features):
        super().apply_features(features)
        self.mrg = bool(features >> VIRTIO_NET_F_MRG_RXBUF & 1)
        self.hdr_len = 12 if self.mrg or features >> VIRTIO_F_VERSION_1 & 1 else VIRTIO_NET_HDR_LEGACY_LEN
        if self.backend is not None and self.backend.vnet_hdr:
            try:
                self.backend.set_vnet_hdr_len(self.hdr_len)
                if self.features & OFFLOAD_FEATURES:
                    self.backend.set_offload(tun_offload_flags(features & self.features))
            except OSError as exc:
                self.fail(f"virtio-net: cannot set the tap header length or offloads: {exc}")

    def reset(self):
        with self._rx_lock, self._tx_lock:
            super().reset()
            self.hdr_len = VIRTIO_NET_HDR_LEGACY_LEN
            self.mrg = False
            if self.features & OFFLOAD_FEATURES:
                try:
                    self.backend.set_offload(0)     # no GSO frames for the next driver until it asks
                except OSError:
                    pass

    def _wake(self):
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass

    def queue_notify(self, qidx, queue):
        if qidx == RXQ:
            self._wake()
        elif qidx == TXQ:
            self.transmit(queue)

    # ---- transmit -----------------------------------------------------------------------------------------------------
    def transmit(self, queue):
        with self._tx_lock:
            served = 0
            while True:
                chain = queue.get_chain()
                if chain is None:
                    break
                segs = chain.readable
                total = sum(len(m) for m in segs)
                if total < self.hdr_len or self.backend is None:
                    self.stats["tx_dropped"] += 1
                else:
                    if not self.backend.vnet_hdr:
                        segs = split_segments(segs, self.hdr_len)[1]
                    try:
                        self.backend.send([m for m in segs if len(m)])
                        self.stats["tx_frames"] += 1
                        self.stats["tx_bytes"] += total - self.hdr_len
                    except OSError:
                        self.stats["tx_dropped"] += 1
                queue.put_used(chain.head, 0)
                served += 1
            if served:
                self.notify_used(queue, used_all_avail=True)

    # ---- receive ------------------------------------------------------------------------------------------------------
    def _rx_loop(self):
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        fd = self.backend.fileno()
        polling_backend = False
        while not self._stop:
            want = self._rx_ready()
            if want != polling_backend:
                if want:
                    poller.register(fd, select.POLLIN)
                else:
                    poller.unregister(fd)
                    self.stats["rx_waits"] += 1
                polling_backend = want
            try:
                events = poller.poll()
            except InterruptedError:
                continue
            for efd, ev in events:
                if efd == self._wake_r:
                    try:
                        while os.read(self._wake_r, 4096):
                            pass
                    except BlockingIOError:
                        pass
                elif ev & (select.POLLERR | select.POLLNVAL | select.POLLHUP) and not ev & select.POLLIN:
                    if polling_backend:
                        poller.unregister(fd)
                        polling_backend = False
                    self._stop_backend = True
                elif ev & select.POLLIN:
                    self.receive_pending()
        try:
            poller.unregister(fd)
        except (KeyError, ValueError):
            pass

    def _rx_ready(self):
        if self._stop_backend or not self.queues:
            return False
        q = self.queues[RXQ]
        return q.usable and q.has_chain()

    def receive_pending(self, limit=256):
        """Moves up to ``limit`` waiting frames from the backend into the receive queue (rx thread, or tests);
        returns how many were delivered."""
        delivered = 0
        with self._rx_lock:
            if not self.queues:
                return 0
            q = self.queues[RXQ]
            while delivered < limit:
                r = self._receive_one(q)
                if r is None:
                    break
                delivered += r
            if delivered:
                self.notify_used(q)
        return delivered

    def _receive_one(self, q):
        """One frame: returns 1 (delivered), 0 (dropped) or None (no buffer or no frame waiting)."""
        chain = q.get_chain()
        if chain is None:
            return None
        hl = self.hdr_len
        hdr_segs, body = split_segments(chain.writable, hl)
        if sum(len(m) for m in hdr_segs) < hl or chain.readable:
            q.put_used(chain.head, 0)   # not a receive buffer: return it empty
            return 0
        spill = memoryview(self._spill)
        first_room = sum(len(m) for m in body)
        backend = self.backend
        try:
            if backend.vnet_hdr:
                got = backend.recv_into(hdr_segs + body + [spill])
            else:
                got = backend.recv_into(body + [spill])
        except OSError:
            got = 0                      # a backend error ends backend polling, as an end of file does
        if got is None:
            q.unget()
            return None
        if got == 0:
            self._stop_backend = True    # peer gone: stop polling it (no busy loop on POLLHUP)
            self.stats["rx_backend_closed"] = 1
            q.unget()
            return None
        n = got - hl if backend.vnet_hdr else got   # the frame's length
        if n < 0:
            q.unget()
            self.stats["rx_dropped"] += 1
            return 0
        used = [(chain.head, hl + min(n, first_room))]
        extra = n - first_room
        if extra > 0:
            src = spill[:extra]
            if not self.mrg:
                q.unget()  # the chain goes back; the frame is lost
                self.stats["rx_dropped"] += 1
                return 0
            taken = 0
            while extra > 0:
                c = q.get_chain()
                if c is None or c.readable:
                    if c is not None:
                        taken += 1
                    q.unget(taken + 1)
                    self.stats["rx_dropped"] += 1
                    return 0
                taken += 1
                k = scatter(c.writable, src)
                used.append((c.head, k))
                src = src[k:]
                extra -= k
        if not backend.vnet_hdr:
            scatter(hdr_segs, bytes(hl))
        if hl == 12:
            scatter(split_segments(hdr_segs, 10)[1], _U16.pack(len(used)))
        for head, length in used:
            q.put_used(head, length)
        self.stats["rx_frames"] += 1
        self.stats["rx_bytes"] += n
        return 1

    def close(self):
        self._stop = True
        self._wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if self.backend is not None:
            self.backend.close()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
