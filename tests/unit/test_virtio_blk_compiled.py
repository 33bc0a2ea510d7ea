"""virtio-blk's compiled request (``vmmshim/backends/blkfast.py``, ``blkfast.c``, carried by the block backend)
against the device's Python path: the requests it takes are served exactly as Python serves them, and every other
chain falls back untouched. The differential test drives two devices, one whose backend has the compiled request
and one whose backend has none, with the same hostile indirect tables (Linux's shape, then bent: bad addresses and
lengths, flags, next indexes, request types and ranges) and compares everything a guest or the host could see: the
used ring, all of guest memory, the image, the device's error state and its counters."""

import hashlib
import shutil
import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from bhyve_devices.base import BytesMemory
from bhyve_devices.virtio import blk as B
from bhyve_devices.virtio.device import STATUS_DEVICE_NEEDS_RESET
from bhyve_devices.virtio.testdriver import PciDriver
from bhyve_devices.virtio.transport import VirtioPciDevice
from bhyve_devices.virtio.virtqueue import DESC_SIZE, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from vmmshim.backends import blkfast
from vmmshim.backends.block import FileBlockBackend
from tests.conftest import require_compiled

SECTORS = 64
MEM = 1 << 20


@pytest.fixture(autouse=True)
def compiled():
    require_compiled(blkfast, "compiled request")


def _image(path):
    path.write_bytes(bytes((i * 7 + i // 512) & 0xFF for i in range(SECTORS * 512)))
    return str(path)


class Disk:
    def __init__(self, path, accel, readonly=False):
        self.mem = BytesMemory(MEM)
        self.accel = blkfast.accelerator() if accel else None
        self.dev = B.VirtioBlock(FileBlockBackend(path, readonly=readonly, accel=self.accel), serial="vmmshim-test")
        self.pci = VirtioPciDevice(self.dev, self.mem)
        self.drv = PciDriver(self.pci, self.mem, modern=True)
        self.drv.init()
        self.q = self.drv.queues[0]
        self.a = self.drv.alloc

    def post(self, descs):
        """An indirect table of ``descs`` ((addr, len, flags, next)) as one chain; returns the head."""
        table = self.a.alloc(DESC_SIZE * max(len(descs), 1))
        for k, (addr, n, flags, nxt) in enumerate(descs):
            self.q.write_desc(table, k, addr % 2**64, n % 2**32, flags & 0xFFFF, nxt & 0xFFFF)
        head = self.q.free.pop(0)
        self.q.write_desc(self.q.desc, head, table, DESC_SIZE * len(descs), 4, 0)   # VIRTQ_DESC_F_INDIRECT
        self.q.pending[head] = [head]
        self.q.publish(head)
        return head

    def close(self):
        self.dev.close()


def linux_table(d, rtype, sector, lens, data=b""):
    """Linux's layout: header, data buffers (writable for IN), status. Returns (descs, status address)."""
    hdr = d.a.put(struct.pack("<IIQ", rtype, 0, sector))
    write = VIRTQ_DESC_F_WRITE if rtype == B.VIRTIO_BLK_T_IN else 0
    descs = [(hdr, 16, VIRTQ_DESC_F_NEXT, 1)]
    for i, n in enumerate(lens):
        buf = d.a.put(data[:n].ljust(n, b"\xa5")) if n else d.a.alloc(0)
        descs.append((buf, n, VIRTQ_DESC_F_NEXT | write, i + 2))
    status = d.a.alloc(1)
    d.mem.buf[status] = 0xEE
    descs.append((status, 1, VIRTQ_DESC_F_WRITE, 0))
    return descs, status


def test_a_1_mib_read_of_scattered_pages_goes_through_it(tmp_path):
    d = Disk(_image(tmp_path / "a.img"), accel=True)
    descs, status = linux_table(d, B.VIRTIO_BLK_T_IN, 0, [64] * 256)
    head = d.post(descs)
    d.drv.notify(0)
    assert d.q.get_used() == [(head, 256 * 64 + 1)]
    assert d.mem.buf[status] == B.VIRTIO_BLK_S_OK and d.accel.served == 1
    got = b"".join(bytes(d.mem.buf[a:a + n]) for a, n, _, _ in descs[1:-1])
    assert got == open(tmp_path / "a.img", "rb").read()[:256 * 64]
    assert d.dev.stats["bytes_read"] == 256 * 64 and d.dev.stats["requests"] == 1
    d.close()


def test_writes_reach_the_image_and_others_fall_back(tmp_path):
    path = _image(tmp_path / "w.img")
    d = Disk(path, accel=True)
    pattern = hashlib.sha256(b"w").digest() * 32            # 1 KiB
    descs, status = linux_table(d, B.VIRTIO_BLK_T_OUT, 7, [512, 512], pattern)
    head = d.post(descs)
    d.drv.notify(0)
    assert d.q.get_used() == [(head, 1)] and d.mem.buf[status] == 0 and d.accel.served == 1
    assert open(path, "rb").read()[7 * 512:8 * 512 + 512] == pattern
    for rtype, sector, lens in ((B.VIRTIO_BLK_T_FLUSH, 0, []), (B.VIRTIO_BLK_T_IN, SECTORS, [512]),
                                (B.VIRTIO_BLK_T_IN, 0, [100]), (99, 0, [512])):
        descs, status = linux_table(d, rtype, sector, lens)
        d.post(descs)
        d.drv.notify(0)
        d.q.get_used()
    assert d.accel.served == 1, "flush, a range past the end, a partial sector and a bad type are Python's"
    assert d.dev.stats["flushes"] == 1 and d.dev.stats["ioerr"] == 2 and d.dev.stats["unsupp"] == 1
    d.close()


def test_a_read_only_image_refuses_writes_in_python(tmp_path):
    path = _image(tmp_path / "r.img")
    d = Disk(path, accel=True, readonly=True)
    descs, status = linux_table(d, B.VIRTIO_BLK_T_OUT, 0, [512], b"x" * 512)
    d.post(descs)
    d.drv.notify(0)
    d.q.get_used()
    assert d.mem.buf[status] == B.VIRTIO_BLK_S_IOERR and d.accel.served == 0
    assert open(path, "rb").read(512) != b"x" * 512
    d.close()


# ---- differential: the same hostile tables to both paths -------------------------------------------------------
_ADDR = st.one_of(st.just(None), st.sampled_from([0, MEM - 1, MEM, MEM - 16, 2**63, 2**64 - 8]),
                  st.integers(0, MEM + 0x1000))
_BEND = st.tuples(st.integers(0, 40), st.sampled_from(["addr", "len", "flags", "next", "hdrlen", "statuslen"]),
                  _ADDR, st.integers(0, 2**32 - 1))
# mostly what the compiled request takes, so that bent tables are near ones it serves
_REQ = st.tuples(st.sampled_from([B.VIRTIO_BLK_T_IN] * 3 + [B.VIRTIO_BLK_T_OUT] * 3 + [B.VIRTIO_BLK_T_FLUSH, 8, 99]),
                 st.one_of(st.integers(0, SECTORS - 1), st.sampled_from([SECTORS - 1, SECTORS, 2**55, 2**64 - 1])),
                 st.lists(st.sampled_from([512, 512, 1024, 4096, 0, 1, 511]), min_size=0, max_size=5),
                 st.one_of(st.just([]), st.lists(_BEND, max_size=2)))


def _bend(descs, bends):
    descs = [list(x) for x in descs]
    for at, what, addr, value in bends:
        k = at % len(descs)
        if what == "addr" and addr is not None:
            descs[k][0] = addr
        elif what == "len":
            descs[k][1] = value % (MEM + 0x2000)
        elif what == "flags":
            descs[k][2] = value & 0x7
        elif what == "next":
            descs[k][3] = value % (len(descs) + 2)
        elif what == "hdrlen":
            descs[0][1] = value % 40
        elif what == "statuslen":
            descs[-1][1] = value % 3
    return [tuple(x) for x in descs]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(reqs=st.lists(_REQ, min_size=1, max_size=5))
def test_same_answers_with_and_without_it(tmp_path_factory, reqs):
    base = tmp_path_factory.mktemp("diff")
    disks = [Disk(_image(base / f"{name}.img"), accel=name == "c") for name in ("c", "py")]
    try:
        for rtype, sector, lens, bends in reqs:
            for d in disks:
                descs, _ = linux_table(d, rtype, sector, lens, hashlib.sha256(repr(lens).encode()).digest() * 160)
                d.post(_bend(descs, bends))
                d.drv.notify(0)
        c, py = disks
        assert c.q.get_used() == py.q.get_used()
        assert c.mem.buf == py.mem.buf, "guest memory differs"
        assert open(base / "c.img", "rb").read() == open(base / "py.img", "rb").read(), "the images differ"
        assert bool(c.drv.status() & STATUS_DEVICE_NEEDS_RESET) == bool(py.drv.status() & STATUS_DEVICE_NEEDS_RESET)
        assert c.dev.stats == py.dev.stats
        assert c.pci.errors == py.pci.errors
    finally:
        for d in disks:
            d.close()
        shutil.rmtree(base, ignore_errors=True)
