"""virtio-net (VIRTIO 1.1 section 5.1; bhyve ``pci_virtio_net.c``) over a
:class:`bhyve_devices.backends.NetBackend` (the host ends, bhyve's ``net_backends.c``, are ``vmmshim/backends/net.py``:
a Linux or NetBSD tap, a socket pair).

``-s N,virtio-net,tapN[,mac=xx:xx:xx:xx:xx:xx]`` and ``-s N,virtio-tap,tapN``: :func:`parse_options`; the VM opens
the backend (``vmmshim.backends.open_device_backends``) and builds :class:`VirtioNet` over it.

MAC: ``mac=`` or, as bhyve's ``net_genmac``, the NetApp OUI 00:a0:98 followed by the first three bytes of the MD5
of ``"<slot>-<func>-<vmname>"`` (:func:`genmac`; pass the ``-U`` UUID as ``vmname`` for a UUID-stable address).

Queues: 0 receiveq, 1 transmitq (no control queue, one pair). The header (:data:`VIRTIO_NET_HDR`) is 12 bytes when
VIRTIO_F_VERSION_1 or VIRTIO_NET_F_MRG_RXBUF is negotiated, else the legacy 10 bytes. With MRG_RXBUF a frame may
span several receive chains and ``num_buffers`` says how many; without it a frame must fit one chain. A backend
with ``vnet_hdr`` carries the header with each frame (``set_vnet_hdr_len`` follows the negotiated length); for
one without, the device adds and strips it.

Compiled batches: a backend with ``accel`` (the Linux tap: ``vmmshim/backends/netfast.py``) serves transmit and
receive batches in C before the Python path below looks at the queue; a chain it leaves goes through Python, and
the interrupt stays here (``notify_used`` after the batch).

Receive (:mod:`.net_rx`): the backend's thread moves waiting frames into posted buffers while the guest has posted
some; a mergeable frame for which too few are posted yet is held, not dropped, until the driver posts more.
Transmit runs on the notifying thread: each chain is one ``backend.send``.

Snapshot: the negotiated features (restore applies them again: header length, MRG_RXBUF, and the tap's header
length and offloads), the MAC the guest read, the header length and MRG_RXBUF (checked against the features) and
the offered features (an offload set that changed refuses the restore). Receive keeps nothing between frames but
the receive queue's indices (the transport's) and a held frame, which a checkpoint loses (as a frame on the wire);
a frame is delivered whole or not at all; the link status is always up.

Features: MAC, STATUS (link up), MRG_RXBUF; with a backend that carries the virtio-net header and takes offloads
(``offloads``: the Linux tap) also the offloads QEMU's tap networking has: CSUM and HOST_TSO4/TSO6/ECN (the guest
may send partially checksummed and GSO frames: the header goes to the backend as it is) and GUEST_CSUM and
GUEST_TSO4/TSO6/ECN (``backend.set_offload`` is given the features the driver accepted, so the backend hands over
such frames; none after a reset). A guest sending 64 KiB TCP segments instead of 1.5 KiB frames makes 40 times
fewer exits. Not supported: UFO/USO, the control queue (promiscuous mode, VLAN filters, MAC tables, announce,
guest offload changes), multiqueue, MTU.
"""

import contextlib
import hashlib
import threading

from construct import Array, Int8ul, Int16ul, Struct

from bhyve_devices import snapshot as S

from .device import VIRTIO_F_VERSION_1, VIRTIO_ID_NET, VirtioDevice, bit
from .net_rx import NetRxMixin
from .virtqueue import split_segments

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
VIRTIO_NET_HDR_LEN = VIRTIO_NET_HDR.sizeof()   # 12: with num_buffers
VIRTIO_NET_CONFIG = Struct("mac" / Array(6, Int8ul), "status" / Int16ul)

RXQ, TXQ = 0, 1
MAX_FRAME = 65536 + 14 + 4      # a 64 KiB packet plus the Ethernet and VLAN headers

#: Offload features offered over a backend with ``offloads`` (the virtio-net header passes through it).
OFFLOAD_FEATURES = (1 << VIRTIO_NET_F_CSUM | 1 << VIRTIO_NET_F_GUEST_CSUM | 1 << VIRTIO_NET_F_GUEST_TSO4
                    | 1 << VIRTIO_NET_F_GUEST_TSO6 | 1 << VIRTIO_NET_F_GUEST_ECN | 1 << VIRTIO_NET_F_HOST_TSO4
                    | 1 << VIRTIO_NET_F_HOST_TSO6 | 1 << VIRTIO_NET_F_HOST_ECN)


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


# ---- the device -------------------------------------------------------------------------------------------------------
class VirtioNet(NetRxMixin, VirtioDevice):
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
        if offloads and backend is not None and backend.vnet_hdr and backend.offloads:
            self.features |= OFFLOAD_FEATURES
        self.hdr_len = VIRTIO_NET_HDR_LEGACY_LEN
        self.mrg = False
        self.stats = dict(rx_frames=0, rx_bytes=0, rx_dropped=0, tx_frames=0, tx_bytes=0, tx_dropped=0)
        self._spill = bytearray(MAX_FRAME + VIRTIO_NET_HDR_LEN)
        self._rx_lock = threading.Lock()
        self._tx_lock = threading.Lock()
        self._stop_backend = False      # the backend's peer is gone: not asked for frames again
        self._held = 0                  # a frame held in the spill for more receive buffers: its length
        self._accel = getattr(backend, "accel", None) if backend is not None and backend.vnet_hdr else None
        self.link_up = True
        if start and backend is not None:
            backend.start_rx(self._rx_ready, self.receive_pending)

    def config_bytes(self):
        return VIRTIO_NET_CONFIG.build(dict(mac=list(self.mac), status=VIRTIO_NET_S_LINK_UP if self.link_up else 0))

    def set_link(self, up):
        """The link status the guest reads (VIRTIO_NET_S_LINK_UP), with a configuration-change interrupt: a
        restored VM takes the link down and up again, since its host connection did not survive."""
        self.link_up = bool(up)
        self.config_changed()

    def apply_features(self, features):
        super().apply_features(features)
        self.mrg = bool(features >> VIRTIO_NET_F_MRG_RXBUF & 1)
        self.hdr_len = (VIRTIO_NET_HDR_LEN if self.mrg or features >> VIRTIO_F_VERSION_1 & 1
                        else VIRTIO_NET_HDR_LEGACY_LEN)
        if self.backend is not None and self.backend.vnet_hdr:
            try:
                self.backend.set_vnet_hdr_len(self.hdr_len)
                if self.features & OFFLOAD_FEATURES:
                    self.backend.set_offload(features & self.features)
            except OSError as exc:
                self.fail(f"virtio-net: cannot set the tap header length or offloads: {exc}")

    def reset(self):
        with self._rx_lock, self._tx_lock:
            super().reset()
            self.hdr_len = VIRTIO_NET_HDR_LEGACY_LEN
            self.mrg = False
            self._held = 0
            if self.features & OFFLOAD_FEATURES:
                try:
                    self.backend.set_offload(0)     # no GSO frames for the next driver until it asks
                except OSError:
                    pass

    def quiesced(self):
        """No frame is received or sent inside (a checkpoint reads the queues and guest memory)."""
        stack = contextlib.ExitStack()
        stack.enter_context(self._rx_lock)
        stack.enter_context(self._tx_lock)
        return stack

    def snapshot_state(self):
        s = super().snapshot_state()
        s.update(mac=S.b2s(self.mac), hdr_len=self.hdr_len, mrg=self.mrg, features=self.features)
        return s

    def restore_state(self, state):
        if not isinstance(state, dict) or state.get("features") != self.features:
            raise S.SnapshotError("virtio-net: the offered features changed (another backend?)")
        mac = S.s2b(state.get("mac"), 6)
        with self._rx_lock, self._tx_lock:
            super().restore_state(state)
            if (state.get("hdr_len"), state.get("mrg")) != (self.hdr_len, self.mrg):
                raise S.SnapshotError(f"virtio-net: header length {state.get('hdr_len')!r} / mergeable "
                                      f"{state.get('mrg')!r} do not follow from the features")
            self.mac = mac

    def queue_notify(self, qidx, queue):
        if qidx == RXQ:
            if self.backend is not None:
                self.backend.rx_kick()
        elif qidx == TXQ:
            self.transmit(queue)

    # ---- transmit -----------------------------------------------------------------------------------------------------
    def _ram(self, queue):
        return getattr(queue.mem, "ram", None) if self._accel is not None and queue.usable else None

    def transmit(self, queue):
        with self._tx_lock:
            served = 0
            ram = self._ram(queue)
            res = self._accel.tx(ram, queue, self.hdr_len, queue.size) if ram is not None else None
            if res is not None:
                served = res.chains
                self.stats["tx_frames"] += res.frames
                self.stats["tx_bytes"] += res.bytes
                self.stats["tx_dropped"] += res.dropped
            while res is None or not res.empty:        # the chains the compiled batch left, if any
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

    def close(self):
        if self.backend is not None:
            self.backend.close()
