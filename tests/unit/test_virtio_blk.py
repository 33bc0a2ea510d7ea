"""virtio-blk against a temporary raw image (``vmmshim/backends/block.py``), driven through the PCI transport by
the test driver. ``from_thread``: the notification arrives on a thread of the test's own, as it would on a
doorbell thread, and the device serves the queue there."""

import hashlib
import os
import struct
import threading

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from bhyve_devices.base import BytesMemory
from bhyve_devices.virtio import blk as B
from bhyve_devices.virtio.device import STATUS_DEVICE_NEEDS_RESET
from bhyve_devices.virtio.testdriver import PciDriver
from bhyve_devices.virtio.transport import VirtioPciDevice
from vmmshim.backends.block import FileBlockBackend

SECTORS = 64


@pytest.fixture
def image(tmp_path):
    p = tmp_path / "disk.img"
    p.write_bytes(bytes((i * 7 + i // 512) & 0xFF for i in range(SECTORS * 512)))
    return str(p)


def blk(path, readonly=False, **kw):
    return B.VirtioBlock(FileBlockBackend(path, readonly=readonly), **kw)


class Disk:
    def __init__(self, path, modern=False, msix=False, from_thread=False, readonly=False, **kw):
        self.mem = BytesMemory(4 << 20)
        self.dev = blk(path, readonly=readonly, **kw)
        self.pci = VirtioPciDevice(self.dev, self.mem)
        self.drv = PciDriver(self.pci, self.mem, modern=modern)
        self.feats = self.drv.init(msix=msix)
        self.q = self.drv.queues[0]
        self.done = threading.Event()
        self.from_thread = from_thread
        if from_thread:
            real = self.pci._queue_interrupt

            def spy(q):
                real(q)
                self.done.set()
            self.dev._interrupt = spy

    def request(self, rtype, sector=0, out=b"", inlen=0, split=False, indirect=False):
        a = self.drv.alloc
        hdr = a.put(struct.pack("<IIQ", rtype, 0, sector))
        outs = [(hdr, 16)]
        if out:
            if split:
                half = len(out) // 2
                outs += [(a.put(out[:half]), half), (a.put(out[half:]), len(out) - half)]
            else:
                outs.append((a.put(out), len(out)))
        data = a.alloc(inlen) if inlen else None
        status = a.alloc(1)
        self.mem.buf[status - self.mem.base] = 0xEE
        ins = ([(data, inlen)] if inlen else []) + [(status, 1)]
        table = a.alloc(16 * (len(outs) + len(ins))) if indirect else None
        self.done.clear()
        head = self.q.add(out=outs, inn=ins, indirect_at=table)
        self.notify()
        used = self.q.get_used()
        assert [h for h, _ in used] == [head]
        st_ = self.mem.buf[status - self.mem.base]
        body = a.read(data, inlen) if inlen else b""
        return st_, used[0][1], body

    def notify(self):
        """The driver's notification: on this thread, or from a thread of the test's own (``from_thread``),
        waiting for the interrupt that ends the batch."""
        if not self.from_thread:
            self.drv.notify(0)
            return
        t = threading.Thread(target=self.drv.notify, args=(0,), name="blk-notify-test")
        t.start()
        assert self.done.wait(5)
        t.join(5)

    def close(self):
        self.dev.close()


def original(image, sector, n):
    with open(image, "rb") as f:
        f.seek(sector * 512)
        return f.read(n)


@pytest.mark.parametrize("modern", [False, True])
def test_config_and_features(image, modern):
    d = Disk(image, modern=modern)
    cfg = B.BLK_CONFIG.parse(d.drv.config_bytes(B.BLK_CONFIG.sizeof()))
    assert cfg.capacity == SECTORS and cfg.blk_size == 512 and cfg.seg_max == B.SEG_MAX_INDIRECT
    assert cfg.max_discard_seg == 1 and cfg.write_zeroes_may_unmap == 1
    f = d.drv.device_features()
    for b in (B.VIRTIO_BLK_F_SEG_MAX, B.VIRTIO_BLK_F_BLK_SIZE, B.VIRTIO_BLK_F_FLUSH, B.VIRTIO_BLK_F_TOPOLOGY,
              B.VIRTIO_BLK_F_DISCARD, B.VIRTIO_BLK_F_WRITE_ZEROES):
        assert f >> b & 1
    assert not f >> B.VIRTIO_BLK_F_RO & 1
    assert B.BLK_CONFIG.build(cfg) == d.dev.config_bytes()
    d.close()


def test_seg_max_follows_indirect_descriptors(image):
    """Without indirect descriptors a chain must fit the ring (queue size - 2 data segments); with them one
    request may carry a whole 1 MiB of scattered pages."""
    d = Disk(image)
    assert d.feats >> B.VIRTIO_F_RING_INDIRECT_DESC & 1
    d.drv.init(want=d.drv.device_features() & ~(1 << B.VIRTIO_F_RING_INDIRECT_DESC))
    assert B.BLK_CONFIG.parse(d.drv.config_bytes(B.BLK_CONFIG.sizeof())).seg_max == 254
    d.drv.set_status(0)
    assert B.BLK_CONFIG.parse(d.dev.config_bytes()).seg_max == 254
    d.close()


def test_a_request_of_256_scattered_pages_is_served_whole(image):
    d = Disk(image, modern=True)
    a = d.drv.alloc
    hdr = a.put(struct.pack("<IIQ", B.VIRTIO_BLK_T_IN, 0, 0))
    pages = [a.alloc(64) for _ in range(256)]          # 256 segments of 64 bytes
    status = a.alloc(1)
    table = a.alloc(16 * 258)
    head = d.q.add(out=[(hdr, 16)], inn=[(p, 64) for p in pages] + [(status, 1)], indirect_at=table)
    d.drv.notify(0)
    assert [h for h, _ in d.q.get_used()] == [head]
    assert d.mem.buf[status - d.mem.base] == B.VIRTIO_BLK_S_OK
    assert b"".join(a.read(p, 64) for p in pages) == original(image, 0, 256 * 64)
    d.close()


def test_sectorsize_option_and_topology(image):
    kw = B.parse_options(f"{image},sectorsize=512/4096,nodelete,ser=SERIAL1")
    assert kw == dict(path=image, sectorsize=512, physical_sectorsize=4096, nodelete=True, serial="SERIAL1")
    d = Disk(kw.pop("path"), **kw)
    cfg = B.BLK_CONFIG.parse(d.dev.config_bytes())
    assert cfg.topology.physical_block_exp == 3 and cfg.topology.min_io_size == 8 and cfg.blk_size == 512
    assert not d.drv.device_features() >> B.VIRTIO_BLK_F_DISCARD & 1
    assert d.request(B.VIRTIO_BLK_T_GET_ID, inlen=20)[2] == b"SERIAL1".ljust(20, b"\0")
    d.close()
    kw = B.parse_options(f"{image},sectorsize=4096")
    assert B.BLK_CONFIG.parse(Disk(kw.pop("path"), **kw).dev.config_bytes()).blk_size == 4096
    with pytest.raises(ValueError):
        B.parse_options(f"{image},bogus")
    with pytest.raises(ValueError):
        blk(image, sectorsize=1000)


@pytest.mark.parametrize("modern,msix,from_thread,split,indirect", [
    (False, False, False, False, False), (True, True, False, True, False), (True, False, True, False, True),
    (False, True, True, True, True)])
def test_read_write_flush_pattern(image, modern, msix, from_thread, split, indirect):
    d = Disk(image, modern=modern, msix=msix, from_thread=from_thread)
    st_, n, body = d.request(B.VIRTIO_BLK_T_IN, sector=3, inlen=2048)
    assert st_ == B.VIRTIO_BLK_S_OK and n == 2049 and body == original(image, 3, 2048)
    pattern = hashlib.sha256(b"p").digest() * 64     # 2 KiB
    assert d.request(B.VIRTIO_BLK_T_OUT, sector=10, out=pattern, split=split, indirect=indirect)[:2] == (0, 1)
    assert d.request(B.VIRTIO_BLK_T_FLUSH)[:2] == (0, 1)
    assert original(image, 10, 2048) == pattern
    assert d.request(B.VIRTIO_BLK_T_IN, sector=10, inlen=2048, indirect=indirect)[2] == pattern
    assert d.dev.stats["flushes"] == 1
    if msix:
        assert d.drv.msix_vectors()
    else:
        assert d.drv.isr() & 1
    d.close()


def test_get_id_from_path_as_bhyve(image):
    d = Disk(image)
    st_, n, body = d.request(B.VIRTIO_BLK_T_GET_ID, inlen=20)
    dig = hashlib.md5(image.encode()).digest()
    want = ("BHYVE-%02X%02X-%02X%02X-%02X%02X" % tuple(dig[:6]))[:19]
    assert st_ == 0 and n == 21 and body == want.encode() + b"\0"
    assert d.request(B.VIRTIO_BLK_T_GET_ID, inlen=8)[2] == want.encode()[:8]
    d.close()


def test_discard_and_write_zeroes(image):
    d = Disk(image)
    seg = lambda s, n, f=0: struct.pack("<QII", s, n, f)  # noqa: E731
    assert d.request(B.VIRTIO_BLK_T_DISCARD, out=seg(8, 8))[0] == 0
    assert original(image, 8, 4096) == bytes(4096)
    assert original(image, 16, 512) != bytes(512)
    assert d.request(B.VIRTIO_BLK_T_WRITE_ZEROES, out=seg(20, 2))[0] == 0
    assert d.request(B.VIRTIO_BLK_T_WRITE_ZEROES, out=seg(30, 1, 1))[0] == 0
    assert original(image, 20, 1024) == bytes(1024) and original(image, 30, 512) == bytes(512)
    assert original(image, 22, 512) != bytes(512) and os.path.getsize(image) == SECTORS * 512
    assert d.request(B.VIRTIO_BLK_T_DISCARD, out=seg(8, 8, 1))[0] == B.VIRTIO_BLK_S_UNSUPP   # unmap on discard
    assert d.request(B.VIRTIO_BLK_T_WRITE_ZEROES, out=seg(8, 8, 2))[0] == B.VIRTIO_BLK_S_UNSUPP
    assert d.request(B.VIRTIO_BLK_T_DISCARD, out=seg(60, 8))[0] == B.VIRTIO_BLK_S_IOERR      # past the end
    assert d.request(B.VIRTIO_BLK_T_DISCARD, out=seg(0, 1) * 2)[0] == B.VIRTIO_BLK_S_IOERR   # 2 segments
    assert d.request(B.VIRTIO_BLK_T_DISCARD, out=b"short")[0] == B.VIRTIO_BLK_S_IOERR
    d.close()


def test_write_zeroes_fallback_without_fallocate(image, monkeypatch):
    import errno
    from vmmshim.backends import block

    def nope(fd, mode, off, length):
        raise OSError(errno.EOPNOTSUPP, "no")
    monkeypatch.setattr(block, "fallocate", nope)
    d = Disk(image)
    assert d.request(B.VIRTIO_BLK_T_WRITE_ZEROES, out=struct.pack("<QII", 4, 4, 0))[0] == 0
    assert original(image, 4, 2048) == bytes(2048) and original(image, 8, 512) != bytes(512)
    d.close()


def test_read_only_refuses_writes(image):
    before = open(image, "rb").read()
    d = Disk(image, readonly=True)
    f = d.drv.device_features()
    assert f >> B.VIRTIO_BLK_F_RO & 1 and not f >> B.VIRTIO_BLK_F_DISCARD & 1
    assert d.request(B.VIRTIO_BLK_T_OUT, sector=0, out=b"x" * 512)[0] == B.VIRTIO_BLK_S_IOERR
    assert d.request(B.VIRTIO_BLK_T_WRITE_ZEROES, out=struct.pack("<QII", 0, 1, 0))[0] == B.VIRTIO_BLK_S_IOERR
    assert d.request(B.VIRTIO_BLK_T_DISCARD, out=struct.pack("<QII", 0, 1, 0))[0] == B.VIRTIO_BLK_S_IOERR
    assert d.request(B.VIRTIO_BLK_T_IN, sector=1, inlen=512)[2] == before[512:1024]
    assert d.request(B.VIRTIO_BLK_T_FLUSH)[0] == 0
    assert open(image, "rb").read() == before
    d.close()


def test_read_only_fallback_when_image_is_not_writable(image):
    os.chmod(image, 0o444)
    if os.access(image, os.W_OK):
        pytest.skip("running as root: the image stays writable")
    d = blk(image)
    assert d.readonly and d.features >> B.VIRTIO_BLK_F_RO & 1
    d.close()


def test_bad_ranges_and_types(image):
    d = Disk(image)
    assert d.request(B.VIRTIO_BLK_T_IN, sector=SECTORS - 1, inlen=1024)[:2] == (B.VIRTIO_BLK_S_IOERR, 1)
    assert d.request(B.VIRTIO_BLK_T_IN, sector=2**63, inlen=512)[0] == B.VIRTIO_BLK_S_IOERR
    assert d.request(B.VIRTIO_BLK_T_OUT, sector=SECTORS, out=b"y" * 512)[0] == B.VIRTIO_BLK_S_IOERR
    assert d.request(B.VIRTIO_BLK_T_IN, sector=0, inlen=100)[0] == B.VIRTIO_BLK_S_IOERR   # not 512-multiple
    assert d.request(99)[0] == B.VIRTIO_BLK_S_UNSUPP
    assert d.request(B.VIRTIO_BLK_T_IN, sector=SECTORS - 1, inlen=512)[0] == 0             # last sector
    assert d.dev.stats["ioerr"] == 4 and d.dev.stats["unsupp"] == 1
    assert not d.drv.status() & STATUS_DEVICE_NEEDS_RESET
    d.close()


def test_short_header_and_missing_status(image):
    d = Disk(image)
    a = d.drv.alloc
    status = a.alloc(1)
    h = d.q.add(out=[(a.put(b"\0" * 8), 8)], inn=[(status, 1)])
    d.drv.notify(0)
    assert d.q.get_used() == [(h, 1)] and d.mem.buf[status - d.mem.base] == B.VIRTIO_BLK_S_IOERR
    h = d.q.add(out=[(a.put(bytes(16)), 16)])                         # nowhere to put a status
    d.drv.notify(0)
    assert d.q.get_used() == [(h, 0)]
    assert d.drv.status() & STATUS_DEVICE_NEEDS_RESET
    d.close()


def test_reset_between_requests_served_on_another_thread(image):
    d = Disk(image, from_thread=True, modern=True, msix=True)
    for _ in range(5):
        assert d.request(B.VIRTIO_BLK_T_IN, sector=1, inlen=512)[0] == 0
        d.drv.init(msix=True)
        d.q = d.drv.queues[0]
    d.close()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(chains=st.lists(st.tuples(st.integers(0, 20), st.integers(0, 2**64 - 1),
                                 st.lists(st.tuples(st.integers(-0x1000, 0x410000), st.integers(0, 0x3000),
                                                    st.booleans()), min_size=0, max_size=4)),
                       min_size=1, max_size=6))
def test_hostile_requests(image, chains):
    d = Disk(image, modern=True)
    a = d.drv.alloc
    for rtype, sector, segs in chains:
        hdr = a.put(struct.pack("<IIQ", rtype, 0, sector))
        outs, ins = [(hdr, 16)], []
        for off, n, w in segs:
            (ins if w or ins else outs).append(((d.mem.base + off) % 2**64, n))
        try:
            d.q.add(out=outs, inn=ins)
        except IndexError:
            break
        d.drv.notify(0)
        d.q.get_used()
    st_ = d.drv.status()
    assert not d.pci.errors or st_ & STATUS_DEVICE_NEEDS_RESET
    assert all("internal" not in e for e in d.pci.errors)
    d.close()


def test_status_byte_at_the_end_of_a_data_descriptor(image):
    """2.6.4.1: any arrangement; the status may share the last writable descriptor with the data."""
    d = Disk(image, modern=True)
    a = d.drv.alloc
    hdr = a.put(struct.pack("<IIQ", B.VIRTIO_BLK_T_IN, 0, 5))
    buf = a.alloc(1024 + 1)
    d.q.add(out=[(hdr, 16)], inn=[(buf, 1024 + 1)])
    d.drv.notify(0)
    (_, n), = d.q.get_used()
    got = a.read(buf, 1025)
    assert n == 1025 and got[:1024] == original(image, 5, 1024) and got[1024] == B.VIRTIO_BLK_S_OK
    d.close()


def test_a_doorbell_ring_is_served_on_the_ringing_thread(image):
    """The transport's doorbells call queue_notify on the ringing thread; virtio-blk serves the queue there."""
    from bhyve_devices.virtio.transport import MODERN_BAR, NOTIFY_OFF
    d = Disk(image, modern=True)
    served_on = []
    real = d.dev._serve

    def spy(queue, chain):
        served_on.append(threading.current_thread().name)
        real(queue, chain)
    d.dev._serve = spy
    (off, size, match, ring), = d.pci.doorbells(MODERN_BAR)
    assert (off, size, match) == (NOTIFY_OFF, 0, None)
    a = d.drv.alloc
    hdr, status = a.put(struct.pack("<IIQ", B.VIRTIO_BLK_T_IN, 0, 1)), a.alloc(1)
    data = a.alloc(512)
    head = d.q.add(out=[(hdr, 16)], inn=[(data, 512), (status, 1)])
    t = threading.Thread(target=ring, name="doorbell-test")
    t.start()
    t.join(5)
    assert served_on == ["doorbell-test"] and [h for h, _ in d.q.get_used()] == [head]
    assert a.read(data, 512) == original(image, 1, 512)
    d.close()
