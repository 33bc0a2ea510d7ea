"""virtio-net over a socketpair backend (``vmmshim/backends/net.py``), driven through the PCI transport by the test
driver."""

import hashlib
import socket
import threading
import os
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from bhyve_devices.base import BytesMemory
from bhyve_devices.virtio import net as N
from bhyve_devices.virtio.device import STATUS_DEVICE_NEEDS_RESET
from bhyve_devices.virtio.testdriver import PciDriver
from bhyve_devices.virtio.transport import VirtioPciDevice
from vmmshim.backends import net as NB


class Nic:
    def __init__(self, modern=True, mrg=True, start=False, vnet_hdr=False, msix=True, event_idx=False):
        self.mem = BytesMemory(4 << 20)
        self.be = NB.SocketPairBackend(vnet_hdr=vnet_hdr)
        self.be.peer.settimeout(5)
        self.dev = N.VirtioNet(self.be, slot=2, func=0, vmname="vm1", mergeable=mrg, start=start)
        self.pci = VirtioPciDevice(self.dev, self.mem)
        self.drv = PciDriver(self.pci, self.mem, modern=modern)
        self.irq = threading.Event()
        real = self.pci.msi

        def spy(addr, data):
            real(addr, data)
            self.irq.set()
        self.pci.msi = spy
        self.feats = self.drv.init(msix=msix, event_idx=event_idx)
        self.rx, self.tx = self.drv.queues[0], self.drv.queues[1]
        self.hl = self.dev.hdr_len

    def post_rx(self, n, size):
        bufs = []
        for _ in range(n):
            b = self.drv.alloc.alloc(size)
            bufs.append(b)
            self.rx.add(inn=[(b, size)])
        self.drv.notify(0)
        return bufs

    def send(self, frame, hdr=None):
        hdr = hdr if hdr is not None else bytes(self.hl)
        a = self.drv.alloc
        self.tx.add(out=[(a.put(hdr), len(hdr)), (a.put(frame), len(frame))])
        self.drv.notify(1)
        return self.tx.get_used()

    def close(self):
        self.dev.close()


def frame(n, seed=b"f"):
    return (hashlib.sha256(seed).digest() * (n // 32 + 1))[:n]


def test_config_features_and_mac():
    nic = Nic()
    want = bytes([0, 0xA0, 0x98]) + hashlib.md5(b"2-0-vm1").digest()[:3]
    assert nic.dev.mac == want == N.genmac(2, 0, "vm1")
    cfg = N.VIRTIO_NET_CONFIG.parse(nic.drv.config_bytes(8))
    assert bytes(cfg.mac) == want and cfg.status == N.VIRTIO_NET_S_LINK_UP
    f = nic.drv.device_features()
    assert f >> N.VIRTIO_NET_F_MAC & 1 and f >> N.VIRTIO_NET_F_MRG_RXBUF & 1 and f >> N.VIRTIO_NET_F_STATUS & 1
    assert nic.hl == 12
    assert N.parse_options("tap0,mac=02:00:00:00:00:01") == dict(backend="tap0", mac=bytes([2, 0, 0, 0, 0, 1]))
    for bad in ("tap0,mac=01:00:00:00:00:01", "tap0,mac=00:00:00:00:00:00", "tap0,mac=zz", "tap0,bogus=1"):
        with pytest.raises(ValueError):
            N.parse_options(bad)
    assert N.VirtioNet(None, mac=bytes([2, 1, 2, 3, 4, 5])).mac == bytes([2, 1, 2, 3, 4, 5])
    nic.close()


@pytest.mark.parametrize("modern,mrg,hl", [(True, True, 12), (True, False, 12), (False, True, 12),
                                           (False, False, 10)])
def test_transmit_strips_header(modern, mrg, hl):
    nic = Nic(modern=modern, mrg=mrg, msix=False)
    assert nic.hl == hl
    f = frame(600)
    used = nic.send(f)
    assert len(used) == 1 and used[0][1] == 0
    assert nic.be.peer.recv(4096) == f
    assert nic.drv.isr() & 1
    assert nic.dev.stats["tx_frames"] == 1 and nic.dev.stats["tx_bytes"] == 600
    nic.send(b"")[:0]            # a header alone is an empty frame: sent as such
    nic.close()


def test_transmit_too_short_for_header_is_dropped():
    nic = Nic()
    a = nic.drv.alloc
    nic.tx.add(out=[(a.put(b"abc"), 3)])
    nic.drv.notify(1)
    assert nic.tx.get_used()[0][1] == 0 and nic.dev.stats["tx_dropped"] == 1
    nic.close()


def test_receive_mergeable_spans_buffers():
    nic = Nic()
    bufs = nic.post_rx(8, 256)
    f = frame(1000, b"rx")
    nic.be.peer.send(f)
    assert nic.dev.receive_pending() == 1
    used = nic.rx.get_used()
    assert [n for _, n in used] == [256, 256, 256, 244]      # 12 + 1000 bytes in 256-byte buffers
    data = b"".join(nic.drv.alloc.read(bufs[h], n) for h, n in used)
    hdr = N.VIRTIO_NET_HDR.parse(data[:12])
    assert hdr.num_buffers == 4 and hdr.flags == 0 and hdr.gso_type == 0
    assert data[12:] == f
    assert nic.drv.msix_vectors() == [1]
    nic.close()


def test_receive_without_mrg_needs_one_big_buffer():
    nic = Nic(mrg=False)
    nic.post_rx(2, 256)
    nic.be.peer.send(frame(1000))
    assert nic.dev.receive_pending() == 0 and nic.dev.stats["rx_dropped"] == 1
    assert nic.rx.get_used() == []
    big = nic.post_rx(1, 2048)[0]
    nic.be.peer.send(frame(100, b"s"))
    nic.be.peer.send(frame(100, b"t"))
    nic.be.peer.send(frame(1000, b"b"))
    assert nic.dev.receive_pending() == 3
    used = nic.rx.get_used()
    assert [n for _, n in used] == [112, 112, 1012]
    assert nic.drv.alloc.read(big, 1012)[12:] == frame(1000, b"b")
    nic.close()


def test_too_little_space_holds_the_frame_until_buffers_come():
    """A mergeable frame larger than what is posted waits (its buffers go back, nothing is dropped); the frame
    behind it waits its turn."""
    nic = Nic()
    nic.post_rx(2, 128)
    nic.be.peer.send(frame(1000))
    assert nic.dev.receive_pending() == 0 and nic.dev.stats["rx_dropped"] == 0 and nic.rx.get_used() == []
    nic.be.peer.send(frame(100))
    assert nic.dev.receive_pending() == 0
    nic.post_rx(8, 128)
    assert nic.dev.receive_pending() == 2
    assert [n for _, n in nic.rx.get_used()] == [128] * 7 + [116, 112]
    nic.close()


def test_vnet_header_passes_through_backend():
    nic = Nic(vnet_hdr=True)
    hdr = bytes([1, 0, 0, 0, 0, 0, 34, 0, 16, 0, 0, 0])
    nic.send(frame(64), hdr=hdr)
    assert nic.be.peer.recv(4096) == hdr + frame(64)
    bufs = nic.post_rx(1, 2048)
    nic.be.peer.send(bytes(12) + frame(70))
    assert nic.dev.receive_pending() == 1
    (h, n), = nic.rx.get_used()
    got = nic.drv.alloc.read(bufs[h], n)
    assert n == 82 and got[10:12] == b"\x01\x00" and got[12:] == frame(70)
    nic.close()


def test_rx_thread_waits_for_buffers_without_spinning():
    nic = Nic(start=True, event_idx=True)
    nic.be.peer.send(frame(300, b"early"))
    t0 = time.process_time()
    time.sleep(0.5)
    assert time.process_time() - t0 < 0.25          # no busy loop while the guest has no buffers
    assert nic.dev.stats["rx_frames"] == 0
    avail_event_before = nic.rx.avail_event()
    bufs = nic.post_rx(4, 2048)
    assert nic.irq.wait(5)
    deadline = time.time() + 5
    while nic.dev.stats["rx_frames"] < 1 and time.time() < deadline:
        time.sleep(0.01)
    (h, n), = nic.rx.get_used()
    assert n == 312 and nic.drv.alloc.read(bufs[h], n)[12:] == frame(300, b"early")
    assert avail_event_before == 0 and nic.rx.avail_event() >= 1
    # both ways at once
    for k in range(3):
        nic.be.peer.send(frame(100 + k, bytes([k])))
    deadline = time.time() + 5
    got = []
    while len(got) < 3 and time.time() < deadline:
        got += nic.rx.get_used()
        time.sleep(0.01)
    assert [n for _, n in got] == [112, 113, 114]
    nic.send(frame(50))
    assert nic.be.peer.recv(4096) == frame(50)
    nic.close()


def test_reset_stops_rx_and_reinit_works():
    nic = Nic(start=True)
    nic.post_rx(2, 2048)
    nic.drv.init(msix=True)
    nic.rx, nic.tx = nic.drv.queues[0], nic.drv.queues[1]
    nic.irq.clear()
    bufs = nic.post_rx(2, 2048)
    nic.be.peer.send(frame(90))
    assert nic.irq.wait(5)
    deadline = time.time() + 5
    used = []
    while not used and time.time() < deadline:
        used = nic.rx.get_used()
        time.sleep(0.01)
    assert used[0][1] == 102
    nic.close()


def _thread_cpu(thread):
    """CPU seconds (user + system) of one thread, from /proc (other threads of the test process don't count)."""
    with open(f"/proc/self/task/{thread.native_id}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_peer_hangup_stops_polling_backend():
    nic = Nic(start=True)
    nic.post_rx(2, 2048)
    nic.be.peer.close()
    time.sleep(0.05)
    rx = nic.be._thread
    t0 = _thread_cpu(rx) if rx is not None and rx.is_alive() else 0.0
    time.sleep(0.4)
    spent = _thread_cpu(rx) - t0 if rx is not None and rx.is_alive() else 0.0
    assert spent < 0.1, f"the rx thread spent {spent:.2f} s of CPU in 0.4 s after the peer hung up"
    nic.dev.close()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(st.tuples(st.sampled_from(["rx", "tx", "frame"]),
                              st.lists(st.tuples(st.integers(-0x1000, 0x410000), st.integers(0, 0x2000),
                                                 st.booleans()), max_size=3),
                              st.integers(0, 3000)), min_size=1, max_size=8),
       modern=st.booleans())
def test_hostile_chains(ops, modern):
    nic = Nic(modern=modern)
    for kind, segs, size in ops:
        if kind == "frame":
            try:
                nic.be.peer.send(frame(size))
            except OSError:
                pass
            nic.dev.receive_pending()
            continue
        q = nic.rx if kind == "rx" else nic.tx
        outs, ins = [], []
        for off, n, w in segs:
            (ins if w or ins else outs).append(((nic.mem.base + off) % 2**64, n))
        if not outs and not ins:
            continue
        try:
            q.add(out=outs, inn=ins)
        except IndexError:
            break
        nic.drv.notify(0 if kind == "rx" else 1)
        nic.dev.receive_pending()
        q.get_used()
    assert not nic.pci.errors or nic.drv.status() & STATUS_DEVICE_NEEDS_RESET
    assert all("internal" not in e and "notify" not in e for e in nic.pci.errors)
    nic.close()


def test_linux_tap_backend_both_ways():
    import fcntl
    import os
    import struct as S
    name = f"vmmt{os.getpid() % 100000}"
    try:
        tap = NB.TapBackend(name)
        ctl = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        ifr = S.pack("16sH22x", name.encode(), 0)
        flags = S.unpack("16sH22x", fcntl.ioctl(ctl, 0x8913, ifr))[1]            # SIOCGIFFLAGS
        fcntl.ioctl(ctl, 0x8914, S.pack("16sH22x", name.encode(), flags | 1))   # SIOCSIFFLAGS IFF_UP
        ctl.close()
        pkt = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88B5))
        pkt.bind((name, 0))
        pkt.settimeout(5)
    except (OSError, AttributeError) as exc:
        pytest.skip(f"no tap here: {exc}")
    mem = BytesMemory(4 << 20)
    dev = N.VirtioNet(tap, mac=bytes([2, 0, 0, 0, 0, 7]), start=True)
    pci = VirtioPciDevice(dev, mem)
    drv = PciDriver(pci, mem, modern=True)
    got_irq = threading.Event()
    pci.msi = lambda a, d: got_irq.set()
    drv.init(msix=True)
    rx, tx = drv.queues[0], drv.queues[1]
    try:
        eth = b"\xff" * 6 + bytes([2, 0, 0, 0, 0, 7]) + b"\x88\xb5" + frame(200, b"to-host")
        a = drv.alloc
        tx.add(out=[(a.put(bytes(12)), 12), (a.put(eth), len(eth))])
        drv.notify(1)
        assert pkt.recv(4096) == eth
        bufs = [a.alloc(2048) for _ in range(4)]
        for b in bufs:
            rx.add(inn=[(b, 2048)])
        drv.notify(0)
        back = b"\xff" * 6 + bytes([2, 0, 0, 0, 0, 8]) + b"\x88\xb5" + frame(300, b"to-guest")
        pkt.send(back)
        assert got_irq.wait(5)
        deadline = time.time() + 5
        used = []
        while time.time() < deadline:
            used += rx.get_used()
            if any(a.read(bufs[h], n)[12:] == back for h, n in used):
                break
            time.sleep(0.01)
        assert any(a.read(bufs[h], n)[12:] == back and a.read(bufs[h], 12)[10:12] == b"\x01\x00"
                   for h, n in used)
    finally:
        pkt.close()
        dev.close()


def test_rx_thread_delivers_a_held_frame_when_the_driver_posts_more():
    """The receive thread with a held frame: the driver here notifies only when avail_event asks it to (EVENT_IDX,
    as Linux's vring_need_event), so a device holding a frame must leave avail_event at the avail index, and the
    thread must place the frame when the notification wakes it."""
    nic = Nic(start=True, event_idx=True)
    a, rx = nic.drv.alloc, nic.rx

    def post(size):
        old = rx.avail_idx
        b = a.alloc(size)
        rx.add(inn=[(b, size)])
        new, event = rx.avail_idx, rx.avail_event()
        if (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF:
            nic.drv.notify(0)
        return b

    bufs = [post(256)]
    nic.be.peer.send(frame(1000, b"big"))
    nic.be.peer.send(frame(40, b"next"))
    deadline = time.time() + 5
    while not nic.dev._held and time.time() < deadline:
        time.sleep(0.01)
    assert nic.dev._held == 1012 and rx.get_used() == [] and nic.dev.stats["rx_dropped"] == 0
    bufs += [post(256) for _ in range(4)]
    got = []
    while len(got) < 2 and time.time() < deadline:
        got += rx.get_used()
        time.sleep(0.01)
    assert [n for _, n in got] == [256, 256, 256, 244, 52]
    data = b"".join(a.read(bufs[h], n) for h, n in got[:4])
    assert data[12:] == frame(1000, b"big") and a.read(bufs[got[4][0]], 52)[12:] == frame(40, b"next")
    nic.close()
