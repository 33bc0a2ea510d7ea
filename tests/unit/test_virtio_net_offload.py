"""virtio-net checksum/TSO offloads over a backend that carries the virtio-net header (the Linux tap).

The first Linux guests on a tap sent 1.5 KiB frames with software checksums, an exit and an interrupt each, where
QEMU's guest sent 64 KiB TSO segments: 1 MiB took 20 times as long. The device now offers what the tap can do and
tells the tap (``TUNSETOFFLOAD``) which offloaded frames the driver accepts.
"""

import hashlib
import os
import struct

import pytest

from bhyve_devices.base import BytesMemory
from bhyve_devices.virtio import net as N
from bhyve_devices.virtio.testdriver import PciDriver
from bhyve_devices.virtio.transport import VirtioPciDevice
from vmmshim.backends import net as NB

GUEST_TSO = (1 << N.VIRTIO_NET_F_GUEST_TSO4 | 1 << N.VIRTIO_NET_F_GUEST_TSO6 | 1 << N.VIRTIO_NET_F_GUEST_ECN)
ALL_TUN = NB.TUN_F_CSUM | NB.TUN_F_TSO4 | NB.TUN_F_TSO6 | NB.TUN_F_TSO_ECN
GUEST_CSUM = 1 << N.VIRTIO_NET_F_GUEST_CSUM


def nic(vnet_hdr=True, offloads=True, modern=True, want=None):
    mem = BytesMemory(8 << 20)
    be = NB.SocketPairBackend(vnet_hdr=vnet_hdr, offloads=offloads)
    be.peer.settimeout(5)
    dev = N.VirtioNet(be, start=False)
    pci = VirtioPciDevice(dev, mem)
    drv = PciDriver(pci, mem, modern=modern)
    feats = drv.init(want=want, msix=True)
    return be, dev, pci, drv, feats


def test_offered_only_over_a_header_carrying_backend():
    for vnet_hdr, offloads, expect in ((True, True, True), (True, False, False), (False, True, False)):
        be, dev, pci, drv, feats = nic(vnet_hdr, offloads)
        assert bool(dev.features & N.OFFLOAD_FEATURES) == expect
        assert (feats & N.OFFLOAD_FEATURES == N.OFFLOAD_FEATURES) == expect
        assert be.offload_flags == (ALL_TUN if expect else None)
        dev.close()


def test_tap_offloads_follow_the_driver_and_reset():
    be, dev, pci, drv, feats = nic()
    assert be.offload_flags == ALL_TUN
    drv.init(want=feats & ~(1 << N.VIRTIO_NET_F_GUEST_TSO6 | 1 << N.VIRTIO_NET_F_GUEST_ECN), msix=True)
    assert be.offload_flags == NB.TUN_F_CSUM | NB.TUN_F_TSO4
    drv.set_status(0)
    assert be.offload_flags == 0
    be2, dev2, _, _, _ = nic(modern=False)          # the legacy GUESTCAP write applies them too
    assert be2.offload_flags == ALL_TUN
    dev.close()
    dev2.close()


def test_tun_offload_flags_need_guest_csum():
    assert NB.tun_offload_flags(GUEST_TSO) == 0
    assert NB.tun_offload_flags(GUEST_CSUM) == NB.TUN_F_CSUM
    assert NB.tun_offload_flags(GUEST_CSUM | 1 << N.VIRTIO_NET_F_GUEST_ECN) == NB.TUN_F_CSUM
    assert NB.tun_offload_flags(GUEST_CSUM | GUEST_TSO) == ALL_TUN


def test_a_64k_gso_frame_each_way():
    be, dev, pci, drv, feats = nic()
    a = drv.alloc
    rx, tx = drv.queues[0], drv.queues[1]
    body = (hashlib.sha256(b"gso").digest() * 2100)[:65000]
    # transmit: a TSO header and the frame in 17 page-sized pieces pass to the backend unchanged
    hdr = struct.pack("<BBHHHHH", 1, 1, 54, 1448, 34, 16, 0)      # NEEDS_CSUM, GSO_TCPV4
    pieces = [body[i:i + 4096] for i in range(0, len(body), 4096)]
    tx.add(out=[(a.put(hdr), 12)] + [(a.put(p), len(p)) for p in pieces])
    drv.notify(1)
    assert be.peer.recv(1 << 17) == hdr + body
    # receive: a GSO frame spreads over mergeable buffers, num_buffers says how many
    bufs = [a.alloc(4096) for _ in range(20)]
    for b in bufs:
        rx.add(inn=[(b, 4096)])
    drv.notify(0)
    be.peer.send(hdr + body)
    assert dev.receive_pending() == 1
    used = rx.get_used()
    data = b"".join(a.read(bufs[h], n) for h, n in used)
    assert len(used) == 16 and struct.unpack_from("<H", data, 10)[0] == 16
    assert data[:10] == hdr[:10] and data[12:] == body
    dev.close()


def test_linux_tap_takes_offload_settings():
    name = f"vmmo{os.getpid() % 100000}"
    try:
        tap = NB.TapBackend(name)
    except OSError as exc:
        pytest.skip(f"no tap here: {exc}")
    try:
        assert tap.offloads
        for features in (GUEST_CSUM | GUEST_TSO, GUEST_CSUM, 0):        # ALL_TUN, TUN_F_CSUM, nothing
            tap.set_offload(features)
        dev = N.VirtioNet(tap, start=False)
        assert dev.features & N.OFFLOAD_FEATURES == N.OFFLOAD_FEATURES
    finally:
        tap.close()
