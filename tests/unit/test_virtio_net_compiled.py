"""virtio-net's compiled data path (``vmmshim/backends/netfast.py``, ``netfast.c``, carried by the tap backend)
against the device's Python path. The accelerator works on any fd that moves one frame per read or write, so the
tests give a socket pair with the virtio-net header (what a tap with IFF_VNET_HDR is) one, and a twin device none.

Transmit is differential: the same hostile chains (bad addresses, lengths, flags, next indexes, indirect tables,
writable buffers) go to both devices, and everything the guest or the host could see must be the same: the frames
the peer gets, the used ring, avail_event, guest memory, the queue's error state and the counters. Receive is
differential over well-formed buffers of any size and count (mergeable or not). Over hostile rings the C code
alone must never touch a byte past guest RAM.
"""

import hashlib
import socket
import struct
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from bhyve_devices.base import BytesMemory
from bhyve_devices.virtio import net as N
from bhyve_devices.virtio.device import STATUS_DEVICE_NEEDS_RESET
from bhyve_devices.virtio.testdriver import PciDriver
from bhyve_devices.virtio.transport import VirtioPciDevice
from bhyve_devices.virtio.virtqueue import (DESC_SIZE, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT,
                                            VIRTQ_DESC_F_WRITE)
from vmmshim.backends import net as NB
from vmmshim.backends import netfast
from tests.conftest import require_compiled

MEM = 1 << 20
HDR = struct.pack("<BBHHHHH", 1, 1, 54, 1448, 34, 16, 0)      # NEEDS_CSUM, GSO_TCPV4, 12 bytes


@pytest.fixture(autouse=True)
def compiled():
    require_compiled(netfast, "compiled data path", lambda: netfast.accelerator(lambda: -1))


def nic(accel, mem_size=MEM, mergeable=True, event_idx=True):
    mem = BytesMemory(mem_size)
    be = NB.SocketPairBackend(vnet_hdr=True, offloads=True)
    be.peer.setblocking(False)
    if accel:
        be.accel = netfast.accelerator(be.fileno)
    dev = N.VirtioNet(be, start=False, mergeable=mergeable)
    drv = PciDriver(VirtioPciDevice(dev, mem), mem, modern=True)
    drv.init(msix=True, event_idx=event_idx)
    return be, dev, drv, mem


def frames_at(peer):
    out = []
    while True:
        try:
            out.append(peer.recv(1 << 17))
        except BlockingIOError:
            return out


def seen(be, dev, drv, mem):
    """Everything a guest or the host could compare."""
    return dict(mem=hashlib.sha256(bytes(mem.buf)).hexdigest(), stats=dict(dev.stats),
                error=dev.queues[N.TXQ].error is not None, broken=dev.queues[N.RXQ].broken or dev.queues[N.TXQ].broken,
                status=drv.status() & STATUS_DEVICE_NEEDS_RESET, used=[q.get_used() for q in drv.queues.values()],
                avail_event=[q.avail_event() for q in drv.queues.values()])


def test_gso_frames_each_way_in_c():
    be, dev, drv, mem = nic(True)
    a = drv.alloc
    rx, tx = drv.queues[0], drv.queues[1]
    body = (hashlib.sha256(b"gso").digest() * 2100)[:65000]
    pieces = [body[i:i + 4096] for i in range(0, len(body), 4096)]
    for _ in range(3):
        tx.add(out=[(a.put(HDR), 12)] + [(a.put(p), len(p)) for p in pieces])
    drv.notify(1)
    assert frames_at(be.peer) == [HDR + body] * 3
    assert be.accel.batches >= 1 and dev.stats["tx_frames"] == 3 and len(tx.get_used()) == 3
    bufs = [a.alloc(4096) for _ in range(40)]
    for b in bufs:
        rx.add(inn=[(b, 4096)])
    be.peer.send(HDR + body)
    be.peer.send(HDR + b"small")
    batches = be.accel.batches
    assert dev.receive_pending() == 2 and be.accel.batches == batches + 1
    used = rx.get_used()
    first = b"".join(a.read(bufs[h], n) for h, n in used[:16])
    assert struct.unpack_from("<H", first, 10)[0] == 16 and first[12:] == body and first[:10] == HDR[:10]
    assert used[16][1] == 17 and a.read(bufs[used[16][0]], 17)[12:] == b"small"
    assert dev.stats["rx_frames"] == 2 and dev.stats["rx_bytes"] == 65005
    dev.close()


def test_a_frame_waits_for_enough_buffers():
    """A mergeable frame larger than the buffers posted is held, not dropped: the chains go back, avail_event asks
    for the driver's next chain, and the frame goes first once there is room; frames behind it wait their turn.
    Without mergeable buffers a frame larger than a buffer is dropped, as on a NIC."""
    body = bytes(range(256)) * 20
    for accel in (False, True):
        be, dev, drv, mem = nic(accel)
        rx, a = drv.queues[0], drv.alloc
        bufs = [a.alloc(2048) for _ in range(4)]
        rx.add(inn=[(bufs[0], 2048)])
        be.peer.send(HDR + body)
        be.peer.send(HDR + b"after")
        assert dev.receive_pending() == 0 and dev._held == 12 + len(body), accel
        assert rx.get_used() == [] and rx.avail_event() == 1 and dev.stats["rx_dropped"] == 0
        assert not dev._rx_ready()          # no more frames are read while one waits
        for b in bufs[1:]:
            rx.add(inn=[(b, 2048)])
        assert dev.receive_pending() == 2 and dev._held == 0
        used = rx.get_used()
        data = b"".join(a.read(bufs[h], n) for h, n in used[:3])
        assert [n for _, n in used] == [2048, 2048, 1036, 17] and data[12:] == body
        assert struct.unpack_from("<H", data, 10)[0] == 3 and a.read(bufs[used[3][0]], 17)[12:] == b"after"
        dev.close()
    be, dev, drv, mem = nic(False, mergeable=False)
    rx = drv.queues[0]
    rx.add(inn=[(drv.alloc.alloc(2048), 2048)])
    be.peer.send(HDR + body)
    be.peer.send(HDR + b"fits")
    assert dev.receive_pending() == 1 and rx.get_used() == [(0, 16)] and dev.stats["rx_dropped"] == 1
    dev.close()


def test_a_closed_tap_is_not_written():
    be, dev, drv, mem = nic(True)
    be._close_fd()
    be.sock = type("Closed", (), {"fileno": staticmethod(lambda: -1), "close": lambda self=None: None})()
    tx = drv.queues[1]
    tx.add(out=[(drv.alloc.put(HDR + b"x"), 13)])
    assert be.accel.tx(mem.ram, dev.queues[N.TXQ], 12, 8) is None


# ---- hostile transmit chains, both devices -------------------------------------------------------------------
_addr = st.one_of(st.integers(0x8000, MEM - 64), st.integers(MEM - 64, MEM + 64), st.integers(0, 1 << 64 - 1))
_len = st.one_of(st.integers(0, 64), st.integers(0, 1 << 32 - 1))
_flags = st.sampled_from([0, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE,
                          VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, 0xFFFF])
_desc = st.tuples(_addr, _len, _flags, st.integers(0, 300))
_chain = st.one_of(
    st.tuples(st.just("good"), st.lists(st.integers(0, 3000), min_size=1, max_size=4), st.booleans()),
    st.tuples(st.just("raw"), st.lists(_desc, min_size=1, max_size=4), st.booleans()))


def _post_tx(drv, spec, seed):
    q, a = drv.queues[1], drv.alloc
    kind, parts, indirect = spec
    if kind == "good":
        bufs = [(a.put(HDR[:12] + bytes([seed & 0xFF]) * n if i == 0 else bytes([i]) * n), (12 + n) if i == 0 else n)
                for i, n in enumerate(parts)]
        return q.add(out=bufs, indirect_at=a.alloc(DESC_SIZE * len(bufs)) if indirect else None)
    table = a.alloc(DESC_SIZE * len(parts)) if indirect else q.desc
    ids = list(range(len(parts))) if indirect else [q.free.pop(0) for _ in parts]
    for i, (addr, length, flags, nxt) in zip(ids, parts):
        q.write_desc(table, i, addr, length & 0xFFFFFFFF, flags, nxt)
    if indirect:
        head = q.free.pop(0)
        q.write_desc(q.desc, head, table, DESC_SIZE * len(parts), VIRTQ_DESC_F_INDIRECT, 0)
    else:
        head = ids[0]
    q.publish(head)
    return head


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(_chain, min_size=1, max_size=5), min_size=1, max_size=4))
def test_transmit_compiled_matches_python(batches):
    results = []
    for accel in (False, True):
        be, dev, drv, mem = nic(accel)
        sent = []
        for n, batch in enumerate(batches):
            for k, spec in enumerate(batch):
                if len(drv.queues[1].free) >= 6:
                    _post_tx(drv, spec, n * 8 + k)
            drv.notify(1)
            sent.append(frames_at(be.peer))
        results.append((sent, seen(be, dev, drv, mem)))
        dev.close()
    assert results[0] == results[1]


# ---- receive -------------------------------------------------------------------------------------------------
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(st.integers(1, 5000), min_size=1, max_size=3), min_size=1, max_size=12),
       st.lists(st.integers(0, 20000), min_size=1, max_size=8), st.booleans(), st.booleans())
def test_receive_compiled_matches_python(chains, frames, mergeable, indirect):
    results = []
    for accel in (False, True):
        be, dev, drv, mem = nic(accel, mergeable=mergeable)
        q, a = drv.queues[0], drv.alloc
        for parts in chains:
            bufs = [(a.alloc(n), n) for n in parts]
            q.add(inn=bufs, indirect_at=a.alloc(DESC_SIZE * len(bufs)) if indirect else None)
        for i, n in enumerate(frames):
            be.peer.send(HDR + bytes([i + 1]) * n)
        got = dev.receive_pending()
        assert not accel or be.accel.batches == 1
        results.append((got, seen(be, dev, drv, mem)))
        dev.close()
    assert results[0] == results[1]


class _Ring:
    """A queue as the accelerator reads it (a Virtqueue's fields), over rings at fixed addresses."""
    desc_addr, avail_addr, used_addr, size = 0x1000, 0x2000, 0x3000, 8
    event_idx = indirect = True
    last_avail = used_idx = chains = 0


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_desc, min_size=8, max_size=8), st.lists(st.integers(0, 8), min_size=1, max_size=8),
       st.integers(0, 0xFFFF), st.lists(st.integers(0, 9000), min_size=1, max_size=6), st.booleans())
def test_hostile_rings_stay_inside_ram(descs, heads, avail_idx, frames, mergeable):
    """The C code alone, over guest RAM that is the first MEM bytes of a larger buffer: whatever the descriptor
    table, the avail ring and the frames, nothing past RAM changes, and the indices stay in step."""
    canary = b"\xa5" * 8192
    buf = bytearray(MEM) + bytearray(canary)
    ram = memoryview(buf)[:MEM]
    for i, (addr, length, flags, nxt) in enumerate(descs):
        struct.pack_into("<QIHH", buf, _Ring.desc_addr + DESC_SIZE * i, addr & (1 << 64) - 1, length & 0xFFFFFFFF,
                         flags, nxt & 0xFFFF)
    for i, h in enumerate(heads):
        struct.pack_into("<H", buf, _Ring.avail_addr + 4 + 2 * i, h)
    struct.pack_into("<H", buf, _Ring.avail_addr + 2, avail_idx)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    a.setblocking(False)
    try:
        acc = netfast.accelerator(a.fileno)
        for n in frames:
            b.send(HDR + b"\xee" * n)
        q = _Ring()
        spill, held = bytearray(N.MAX_FRAME + 12), 0
        for _ in range(3):
            res = acc.rx(ram, q, 12, mergeable, spill, held, 16)
            held = res.held if res is not None else held
            assert 0 <= held <= len(spill)
            acc.tx(ram, q, 12, 16)
            assert 0 <= q.last_avail <= 0xFFFF and 0 <= q.used_idx <= 0xFFFF
        assert bytes(buf[MEM:]) == canary
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("addr,length", [(MEM - 16, 32), (MEM, 1), (MEM - 8, 1 << 32 - 1), ((1 << 64) - 8, 64)])
def test_a_buffer_past_ram_is_left_to_python(addr, length):
    """A receive buffer that leaves RAM: the batch stops before it (Python then breaks the queue), the frame stays
    in the tap, nothing past RAM is written."""
    canary = b"\xa5" * 8192
    buf = bytearray(MEM) + bytearray(canary)
    ram = memoryview(buf)[:MEM]
    struct.pack_into("<QIHH", buf, _Ring.desc_addr, 0x8000, 64, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1)
    struct.pack_into("<QIHH", buf, _Ring.desc_addr + DESC_SIZE, addr, length, VIRTQ_DESC_F_WRITE, 0)
    struct.pack_into("<H", buf, _Ring.avail_addr + 2, 1)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    a.setblocking(False)
    try:
        b.send(HDR + b"\xee" * 200)
        q = _Ring()
        res = netfast.accelerator(a.fileno).rx(ram, q, 12, True, bytearray(N.MAX_FRAME + 12), 0, 16)
        assert res.more and (q.last_avail, q.used_idx, res.frames) == (0, 0, 0)
        assert bytes(buf[MEM:]) == canary and a.recv(1024) == HDR + b"\xee" * 200
    finally:
        a.close()
        b.close()


class _TxRing(_Ring):
    desc_addr, avail_addr, used_addr, size = 0x10000, 0x11000, 0x12000, 256


class _RxRing(_Ring):
    desc_addr, avail_addr, used_addr, size = 0x20000, 0x21000, 0x22000, 256


def test_transmit_and_receive_at_once():
    """The doorbell thread transmits while the tap's thread receives: each direction keeps its own queue state
    through the C call (which runs without the GIL). One chain per call, to interleave as much as possible."""
    n = 200
    buf = bytearray(MEM)
    ram = memoryview(buf)
    for q, flags, base, stride in ((_TxRing, 0, 0x40000, 1024), (_RxRing, VIRTQ_DESC_F_WRITE, 0x80000, 2048)):
        for i in range(n):          # transmit buffers below 0x72000, receive buffers from 0x80000: apart
            addr = base + stride * i
            if not flags:
                buf[addr:addr + 12 + 64] = HDR + struct.pack("<I", i) * 16
            struct.pack_into("<QIHH", buf, q.desc_addr + DESC_SIZE * i, addr, 12 + 64 if not flags else 2048, flags, 0)
            struct.pack_into("<H", buf, q.avail_addr + 4 + 2 * i, i)
        struct.pack_into("<H", buf, q.avail_addr + 2, n)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    a.setblocking(False)
    b.settimeout(5)
    acc = netfast.accelerator(a.fileno)
    tx, rx = _TxRing(), _RxRing()
    spill = bytearray(N.MAX_FRAME + 12)
    deadline = time.monotonic() + 20

    def loop(fn, q):
        while q.used_idx != n and time.monotonic() < deadline:
            fn()

    def send():
        for i in range(n):
            b.send(HDR + struct.pack("<I", 1000 + i) * 100)

    threads = [threading.Thread(target=loop, args=(lambda: acc.tx(ram, tx, 12, 1), tx)),
               threading.Thread(target=loop, args=(lambda: acc.rx(ram, rx, 12, True, spill, 0, 1), rx)),
               threading.Thread(target=send)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert (tx.last_avail, tx.used_idx, rx.last_avail, rx.used_idx) == (n, n, n, n)
        for i in range(n):
            assert b.recv(4096) == HDR + struct.pack("<I", i) * 16
            head, length = struct.unpack_from("<II", buf, _RxRing.used_addr + 4 + 8 * i)
            assert (head, length) == (i, 412)
            assert bytes(buf[0x80000 + 2048 * i + 12:0x80000 + 2048 * i + 412]) == struct.pack("<I", 1000 + i) * 100
    finally:
        a.close()
        b.close()
