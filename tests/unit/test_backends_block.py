"""The block backend (``vmmshim/backends/block.py``, bhyve's ``block_if.c``): full transfers over short ones, the
read-only fallback, discard and write-zeroes falling back from one fallocate mode to the next and to zeros; and
virtio-blk over the in-memory backend (``bhyve_devices/backends.py``), no host I/O."""

import errno
import os
import struct

import pytest

from bhyve_devices.backends import BlockBackend, MemoryBlockBackend
from bhyve_devices.base import BytesMemory
from bhyve_devices.virtio import blk as B
from bhyve_devices.virtio.testdriver import PciDriver
from bhyve_devices.virtio.transport import VirtioPciDevice
from vmmshim.backends import block

SIZE = 64 * 512


@pytest.fixture
def image(tmp_path):
    p = tmp_path / "disk.img"
    p.write_bytes(bytes((i * 7 + i // 512) & 0xFF for i in range(SIZE)))
    return str(p)


def test_rw_full_retries_short_transfers():
    """One call when it fits; a short one continues where it stopped; nothing at all is an I/O error."""
    mem = bytearray(4096)
    segs = [memoryview(mem)[i:i + 512] for i in range(0, 4096, 512)]
    calls = []

    def short(fd, group, off):
        calls.append((off, sum(map(len, group))))
        return min(700, sum(map(len, group)))

    assert block._rw_full(short, -1, segs, 1000) == 4096
    assert calls[0] == (1000, 4096) and calls[1] == (1700, 3396) and len(calls) == 6
    assert block._rw_full(lambda fd, g, off: 4096, -1, segs, 0) == 4096
    with pytest.raises(OSError):
        block._rw_full(lambda fd, g, off: 0, -1, segs, 0)
    assert block._rw_full(lambda fd, g, off: 1 / 0, -1, [], 0) == 0          # nothing to move: no call


def test_rw_full_splits_more_than_iov_max_buffers():
    mem = bytearray(block.IOV_MAX + 10)
    segs = [memoryview(mem)[i:i + 1] for i in range(len(mem))]
    groups = []

    def fn(fd, group, off):
        groups.append((off, len(group)))
        return len(group)
    assert block._rw_full(fn, -1, segs, 0) == len(mem)
    assert groups == [(0, block.IOV_MAX), (block.IOV_MAX, 10)]


def test_reads_and_writes_through_the_file(image):
    be = block.FileBlockBackend(image)
    assert isinstance(be, BlockBackend)
    assert be.size == SIZE and not be.readonly and be.candelete and not be.compiled and be.path == image
    buf = bytearray(1024)
    assert be.preadv_full([memoryview(buf)[:512], memoryview(buf)[512:]], 512) == 1024
    assert bytes(buf) == open(image, "rb").read()[512:1536]
    assert be.pwritev_full([memoryview(b"x" * 512)], 0) == 512
    be.flush()
    assert open(image, "rb").read(512) == b"x" * 512
    with pytest.raises(OSError) as exc:
        be.preadv_full([memoryview(bytearray(512))], SIZE)             # past the end: nothing read
    assert exc.value.errno == errno.EIO
    assert be.serve_compiled(memoryview(bytearray(16)), 0, 16) is None
    be.close()
    assert be.fd == -1
    be.close()                                                         # twice is fine


@pytest.mark.parametrize("err", [errno.EACCES, errno.EROFS, errno.EPERM])
def test_read_only_fallback_when_a_read_write_open_is_refused(image, monkeypatch, err):
    real = os.open

    def refuse_rw(path, flags, *a):
        if flags & os.O_RDWR:
            raise OSError(err, os.strerror(err))
        return real(path, flags, *a)
    monkeypatch.setattr(block.os, "open", refuse_rw)
    be = block.FileBlockBackend(image)
    assert be.readonly and not be.candelete
    be.close()


def test_other_open_errors_are_raised(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError):
        block.FileBlockBackend(str(tmp_path / "missing.img"))
    real = os.open

    def busy(path, flags, *a):
        if flags & os.O_RDWR:
            raise OSError(errno.EBUSY, "busy")
        return real(path, flags, *a)
    p = tmp_path / "d.img"
    p.write_bytes(bytes(512))
    monkeypatch.setattr(block.os, "open", busy)
    with pytest.raises(OSError) as exc:
        block.FileBlockBackend(str(p))
    assert exc.value.errno == errno.EBUSY


def test_ro_asked_for_opens_read_only(image):
    be = block.FileBlockBackend(image, readonly=True)
    assert be.readonly and not be.candelete
    with pytest.raises(OSError):
        be.pwritev_full([memoryview(b"y" * 512)], 0)
    be.close()


def _fallocate_recorder(monkeypatch, supported):
    tried = []

    def fake(fd, mode, off, length):
        tried.append(mode)
        if mode not in supported:
            raise OSError(errno.EOPNOTSUPP, "no")
        os.pwrite(fd, bytes(length), off)             # what the mode would read back as
    monkeypatch.setattr(block, "fallocate", fake)
    return tried


PUNCH = block.FALLOC_FL_PUNCH_HOLE | block.FALLOC_FL_KEEP_SIZE
ZERO = block.FALLOC_FL_ZERO_RANGE | block.FALLOC_FL_KEEP_SIZE


@pytest.mark.parametrize("op,supported,want", [
    ("discard", {PUNCH, ZERO}, [PUNCH]),
    ("discard", {ZERO}, [PUNCH, ZERO]),
    ("discard", set(), [PUNCH, ZERO]),
    ("unmap", {PUNCH}, [PUNCH]),
    ("zeroes", {PUNCH, ZERO}, [ZERO]),
    ("zeroes", {PUNCH}, [ZERO, PUNCH]),
    ("zeroes", set(), [ZERO, PUNCH]),
])
def test_discard_and_write_zeroes_fall_back(image, monkeypatch, op, supported, want):
    """Discard: punch a hole, else zero the range, else write zeros; write-zeroes: the same with unmap, else zero
    the range, else punch a hole, else write zeros. The range reads as zeros every way, and nothing else does."""
    tried = _fallocate_recorder(monkeypatch, supported)
    be = block.FileBlockBackend(image)
    if op == "discard":
        be.discard(4 * 512, 3 * 512)
    else:
        be.write_zeroes(4 * 512, 3 * 512, op == "unmap")
    assert tried == want
    data = open(image, "rb").read()
    assert data[4 * 512:7 * 512] == bytes(3 * 512)
    assert data[3 * 512:4 * 512] != bytes(512) and data[7 * 512:8 * 512] != bytes(512) and len(data) == SIZE
    be.close()


def test_a_real_fallocate_error_is_raised(image, monkeypatch):
    def fail(fd, mode, off, length):
        raise OSError(errno.EIO, "I/O error")
    monkeypatch.setattr(block, "fallocate", fail)
    be = block.FileBlockBackend(image)
    with pytest.raises(OSError):
        be.discard(0, 512)
    be.close()


def test_the_compiled_request_gets_the_image(image):
    class Accel:
        def serve(self, ram, table, tsize, fd, capacity, readonly):
            self.args = (table, tsize, fd, capacity, readonly)
            return (1, 0, 0, 0)
    with open(image, "ab") as f:
        f.write(b"partial sector")
    accel = Accel()
    be = block.FileBlockBackend(image, readonly=True, accel=accel)
    assert be.compiled and be.serve_compiled(memoryview(bytearray(64)), 16, 32) == (1, 0, 0, 0)
    assert accel.args == (16, 32, be.fd, SIZE, True)           # capacity in whole sectors
    be.close()


def test_virtio_blk_over_the_memory_backend():
    data = bytearray(bytes(range(256)) * 32)                   # 16 sectors
    be = MemoryBlockBackend(data, path="mem0")
    assert isinstance(be, BlockBackend)
    dev = B.VirtioBlock(be, serial="MEM")
    mem = BytesMemory(1 << 20)
    drv = PciDriver(VirtioPciDevice(dev, mem), mem, modern=True)
    drv.init()
    q, a = drv.queues[0], drv.alloc

    def request(rtype, sector, out=b"", inlen=0):
        hdr = a.put(struct.pack("<IIQ", rtype, 0, sector))
        outs = [(hdr, 16)] + ([(a.put(out), len(out))] if out else [])
        buf = a.alloc(inlen) if inlen else None
        status = a.alloc(1)
        q.add(out=outs, inn=([(buf, inlen)] if inlen else []) + [(status, 1)])
        drv.notify(0)
        q.get_used()
        return mem.buf[status - mem.base], (a.read(buf, inlen) if inlen else b"")

    assert request(B.VIRTIO_BLK_T_IN, 1, inlen=512) == (0, bytes(data[512:1024]))
    assert request(B.VIRTIO_BLK_T_OUT, 2, out=b"z" * 512)[0] == 0 and data[1024:1536] == b"z" * 512
    assert request(B.VIRTIO_BLK_T_FLUSH, 0)[0] == 0 and be.flushes == 1
    assert request(B.VIRTIO_BLK_T_WRITE_ZEROES, 0, out=struct.pack("<QII", 3, 1, 0))[0] == 0
    assert data[1536:2048] == bytes(512)
    assert request(B.VIRTIO_BLK_T_GET_ID, 0, inlen=20)[1] == b"MEM".ljust(20, b"\0")
    assert request(B.VIRTIO_BLK_T_IN, 16, inlen=512)[0] == B.VIRTIO_BLK_S_IOERR
    dev.close()
