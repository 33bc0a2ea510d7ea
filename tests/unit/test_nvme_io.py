"""NVMe I/O queues over a temporary raw image (``vmmshim/backends/block.py``): reads and writes through PRPs
(chained lists as Linux builds them) and SGLs, flush, write zeroes, dataset management, every refusal with its
status and the image untouched, interrupts per queue (MSI-X, MSI, INTx), the shadow doorbells, a full completion
queue, and serving on the doorbell thread."""

import os
import struct
import threading

import pytest

from bhyve_devices.backends import MemoryBlockBackend
from bhyve_devices.base import BytesMemory
from bhyve_devices.nvme import layouts as L
from bhyve_devices.nvme import regs as R
from bhyve_devices.nvme.pci import NvmePci
from bhyve_devices.nvme.testdriver import PAGE, NvmeDriver
from bhyve_devices.pci import config as PC
from vmmshim.backends.block import FileBlockBackend

MiB = 1 << 20
RAM = 32 * MiB
IMAGE = 4 * MiB
SGL = R.PSDT_SGL << R.FLAGS_PSDT_SHIFT


CONTENT = os.urandom(IMAGE)


@pytest.fixture
def image(tmp_path):
    p = tmp_path / "disk.img"
    p.write_bytes(CONTENT)
    return str(p)


def original(path, off, n):
    with open(path, "rb") as f:
        f.seek(off)
        return f.read(n)


def disk(path, readonly=False, queues=2, entries=32, **opts):
    mem = BytesMemory(RAM)
    pci = NvmePci(dict(backend=FileBlockBackend(path, readonly=readonly), guest_memory=mem, **opts))
    drv = NvmeDriver(pci, mem)
    assert drv.enable() == R.CSTS_RDY
    drv.create_io_queues(queues, entries)
    return pci, drv


def io(drv, op, qid=1, **kw):
    return drv.command(qid, op, nsid=kw.pop("nsid", 1), **kw).status


@pytest.mark.parametrize("sectsz", [512, 4096])
@pytest.mark.parametrize("sgl", [False, True])
def test_write_read_round_trip(image, sectsz, sgl):
    pci, drv = disk(image, sectsz=str(sectsz))
    data = os.urandom(8 * sectsz)
    assert drv.write(3, data, sgl=sgl, sectsz=sectsz) == 0
    assert original(image, 3 * sectsz, len(data)) == data
    assert drv.read(3, 8, qid=2, sgl=sgl, sectsz=sectsz) == (0, data)
    assert drv.read(0, 1, sectsz=sectsz) == (0, original(image, 0, sectsz))
    assert pci.ctrl.errors == [] and pci.errors == []


def test_fua_and_flush_reach_the_backend(image):
    pci, drv = disk(image)
    flushes = []
    pci.ctrl.backend.flush = lambda: flushes.append(1)
    assert drv.write(0, bytes(512), fua=True) == 0 and len(flushes) == 1
    assert io(drv, R.NVM_FLUSH) == 0 and io(drv, R.NVM_FLUSH, nsid=R.NSID_ALL) == 0 and len(flushes) == 3
    assert io(drv, R.NVM_FLUSH, nsid=2) == R.INVALID_NAMESPACE


def _scattered_pages(drv, n):
    """``n`` pages, none next to another (so each is its own buffer)."""
    pages = [drv.a.alloc(2 * PAGE) for _ in range(n)]
    return pages


def test_a_2_mib_transfer_through_a_prp_list(image):
    """An unaligned 2 MiB - 512 B transfer (MDTS) touches 513 pages: PRP1 and a full list page of 512 entries."""
    pci, drv = disk(image)
    n = 2 * MiB - 512
    data = os.urandom(n)
    pages = _scattered_pages(drv, 513)
    first = pages[0] + 512
    off = 0
    for i, p in enumerate(pages):
        start = first if i == 0 else p
        k = min(PAGE - (start & (PAGE - 1)), n - off)
        drv.a.write(start, data[off:off + k])
        off += k
    prp1, prp2 = drv.prps(None, n, pages=[first] + pages[1:])
    assert struct.unpack("<Q", drv.a.read(prp2 + PAGE - 8, 8))[0] == pages[-1]     # the last slot is data
    assert io(drv, R.NVM_WRITE, prp1=prp1, prp2=prp2, cdw10=1, cdw12=n // 512 - 1) == 0
    assert original(image, 512, n) == data
    back = drv.a.alloc(n + PAGE)
    p1, p2 = drv.prps(back, n)
    assert io(drv, R.NVM_READ, prp1=p1, prp2=p2, cdw10=1, cdw12=n // 512 - 1) == 0
    assert drv.a.read(back, n) == data


def test_a_prp_list_chained_from_the_middle_of_a_page(image):
    """A list that starts 64 bytes before its page ends holds 7 entries and a pointer to the next list page."""
    pci, drv = disk(image)
    pages = _scattered_pages(drv, 20)
    data = os.urandom(20 * PAGE)
    for i, p in enumerate(pages):
        drv.a.write(p, data[i * PAGE:(i + 1) * PAGE])
    first, second = drv.a.alloc(PAGE), drv.a.alloc(PAGE)
    drv.a.write(first + PAGE - 64, struct.pack("<8Q", *pages[1:8], second))
    drv.a.write(second, struct.pack("<12Q", *pages[8:]))
    assert io(drv, R.NVM_WRITE, prp1=pages[0], prp2=first + PAGE - 64, cdw12=20 * 8 - 1) == 0
    assert original(image, 0, len(data)) == data


def test_an_sgl_with_segments(image):
    """A Segment whose last descriptor is a Last Segment, data blocks of odd sizes and zero-length ones."""
    pci, drv = disk(image)
    data = os.urandom(3 * 512)
    bufs = [(drv.a.alloc(700), 700), (drv.a.alloc(16), 0), (drv.a.alloc(400), 400), (drv.a.alloc(436), 436)]
    off = 0
    for g, n in bufs:
        drv.a.write(g, data[off:off + n])
        off += n
    last = drv.a.alloc(32)
    drv.a.write(last, b"".join(L.SGL_DESC.pack(g, n, 0) for g, n in bufs[2:]))
    seg = drv.a.alloc(48)
    drv.a.write(seg, L.SGL_DESC.pack(*bufs[0], 0) + L.SGL_DESC.pack(*bufs[1], 0) +
                L.SGL_DESC.pack(last, 32, L.SGL_LAST_SEGMENT << 4))
    assert io(drv, R.NVM_WRITE, prp1=seg, prp2=48 | (L.SGL_SEGMENT << 60), cdw10=9, cdw12=2, flags=SGL) == 0
    assert original(image, 9 * 512, len(data)) == data


@pytest.mark.parametrize("what,dptr,flags,want", [
    ("prp1 not dword aligned", lambda d, b: (b + 2, 0), 0, R.PRP_OFFSET_INVALID),
    ("prp2 with an offset", lambda d, b: (b + 512, b + 0x2100), 0, R.PRP_OFFSET_INVALID),
    ("prp1 outside RAM", lambda d, b: (RAM + PAGE, 0), 0, R.DATA_TRANSFER_ERROR),
    ("prp2 outside RAM", lambda d, b: (b + 512, 1 << 40), 0, R.DATA_TRANSFER_ERROR),
    ("prp1 at the very top", lambda d, b: (2**64 - 4, 0), 0, R.DATA_TRANSFER_ERROR),
    ("sgl of a bit bucket", lambda d, b: (b, 4096 | (L.SGL_BIT_BUCKET << 60)), SGL, R.status(R.SC_SGL_TYPE_INVALID)),
    ("sgl offset subtype", lambda d, b: (b, 4096 | (1 << 56)), SGL, R.status(R.SC_SGL_TYPE_INVALID)),
    ("sgl too short", lambda d, b: (b, 4095), SGL, R.status(R.SC_DATA_SGL_LENGTH)),
    ("sgl too long", lambda d, b: (b, 4097), SGL, R.status(R.SC_DATA_SGL_LENGTH)),
    ("sgl segment outside RAM", lambda d, b: (RAM, 16 | (L.SGL_LAST_SEGMENT << 60)), SGL, R.DATA_TRANSFER_ERROR),
    ("sgl segment of 15 bytes", lambda d, b: (b, 15 | (L.SGL_LAST_SEGMENT << 60)), SGL,
     R.status(R.SC_INVALID_SGL_COUNT)),
    ("metadata sgl", lambda d, b: (b, 4096), R.PSDT_SGL_META << R.FLAGS_PSDT_SHIFT, R.INVALID_FIELD),
    ("fused", lambda d, b: (b, 0), 1, R.INVALID_FIELD),
])
def test_bad_data_pointers_change_nothing(image, what, dptr, flags, want):
    pci, drv = disk(image)
    buf = drv.a.alloc(4 * PAGE)
    drv.a.write(buf, b"\xAB" * 4 * PAGE)
    prp1, prp2 = dptr(drv, buf)
    before = original(image, 0, IMAGE)
    assert io(drv, R.NVM_WRITE, prp1=prp1, prp2=prp2, cdw12=7, flags=flags) == want, what
    assert original(image, 0, IMAGE) == before
    assert io(drv, R.NVM_READ, prp1=prp1, prp2=prp2, cdw12=7, flags=flags) == want, what
    assert pci.ctrl.errors == []


def test_sgl_segments_must_end_and_nest_right(image):
    pci, drv = disk(image)
    buf = drv.a.alloc(PAGE)
    inner = drv.a.alloc(16)
    drv.a.write(inner, L.SGL_DESC.pack(buf, 512, 0))
    bad_last = drv.a.alloc(32)                      # a Last Segment holding a segment descriptor
    drv.a.write(bad_last, L.SGL_DESC.pack(buf, 256, 0) + L.SGL_DESC.pack(inner, 16, L.SGL_SEGMENT << 4))
    assert io(drv, R.NVM_READ, prp1=bad_last, prp2=32 | (L.SGL_LAST_SEGMENT << 60), flags=SGL) == \
        R.status(R.SC_INVALID_SGL_SEGMENT)
    bad_mid = drv.a.alloc(32)                       # a Segment descriptor that is not the last one
    drv.a.write(bad_mid, L.SGL_DESC.pack(inner, 16, L.SGL_SEGMENT << 4) + L.SGL_DESC.pack(buf, 256, 0))
    assert io(drv, R.NVM_READ, prp1=bad_mid, prp2=32 | (L.SGL_SEGMENT << 60), flags=SGL) == \
        R.status(R.SC_INVALID_SGL_SEGMENT)
    loop = drv.a.alloc(16)                          # a segment that points at itself
    drv.a.write(loop, L.SGL_DESC.pack(loop, 16, L.SGL_SEGMENT << 4))
    assert io(drv, R.NVM_READ, prp1=loop, prp2=16 | (L.SGL_SEGMENT << 60), flags=SGL) == \
        R.status(R.SC_INVALID_SGL_COUNT)


def test_a_prp_list_that_loops_or_has_offsets(image):
    pci, drv = disk(image)
    lst = drv.a.alloc(PAGE)
    drv.a.write(lst + PAGE - 8, struct.pack("<Q", lst + PAGE - 8))     # its only slot points at itself
    assert io(drv, R.NVM_READ, prp1=drv.a.alloc(PAGE), prp2=lst + PAGE - 8, cdw12=23) == R.DATA_TRANSFER_ERROR
    drv.a.write(lst, struct.pack("<QQ", drv.a.alloc(PAGE) + 8, 0))
    assert io(drv, R.NVM_READ, prp1=drv.a.alloc(PAGE), prp2=lst, cdw12=23) == R.PRP_OFFSET_INVALID
    assert io(drv, R.NVM_READ, prp1=drv.a.alloc(PAGE), prp2=lst + 4, cdw12=23) == R.PRP_OFFSET_INVALID


@pytest.mark.parametrize("what,kw,want", [
    ("past the end", dict(cdw10=IMAGE // 512 - 1, cdw12=1), R.LBA_OUT_OF_RANGE),
    ("slba wraps", dict(cdw10=0xFFFFFFFF, cdw11=0xFFFFFFFF, cdw12=1), R.LBA_OUT_OF_RANGE),
    ("past MDTS", dict(cdw12=4096), R.INVALID_FIELD),
    ("protection info", dict(cdw12=1 << 26), R.INVALID_FIELD),
    ("namespace 2", dict(nsid=2), R.INVALID_NAMESPACE),
    ("namespace 0", dict(nsid=0), R.INVALID_NAMESPACE),
])
def test_refused_ranges(image, what, kw, want):
    pci, drv = disk(image)
    buf = drv.a.alloc(PAGE)
    for op in (R.NVM_READ, R.NVM_WRITE):
        assert io(drv, op, prp1=buf, **dict(kw)) == want, (what, op)
    for op in (0x05, 0x04, 0x0C, 0x0D, 0x7F):      # compare, write uncorrectable, verify, reservations
        assert io(drv, op) == R.INVALID_OPCODE


def test_write_zeroes_and_deallocate(image):
    pci, drv = disk(image)
    assert io(drv, R.NVM_WRITE_ZEROES, cdw10=4, cdw12=3) == 0
    assert io(drv, R.NVM_WRITE_ZEROES, cdw10=16, cdw12=7 | R.WZ_DEAC) == 0
    assert original(image, 4 * 512, 4 * 512) == bytes(2048) and original(image, 16 * 512, 4096) == bytes(4096)
    assert original(image, 8 * 512, 512) != bytes(512)
    ranges = drv.a.alloc(PAGE)
    drv.a.write(ranges, struct.pack("<IIQ", 0, 8, 64) + struct.pack("<IIQ", 0, 0, 2**60) +
                struct.pack("<IIQ", 0, 16, 128))
    assert io(drv, R.NVM_DSM, prp1=ranges, cdw10=2, cdw11=R.DSM_DEALLOCATE) == 0
    assert original(image, 64 * 512, 4096) == bytes(4096) and original(image, 128 * 512, 8192) == bytes(8192)
    drv.a.write(ranges, struct.pack("<IIQ", 0, 8, IMAGE // 512 - 4))
    assert io(drv, R.NVM_DSM, prp1=ranges, cdw10=0, cdw11=R.DSM_DEALLOCATE) == R.LBA_OUT_OF_RANGE
    assert io(drv, R.NVM_DSM, prp1=RAM, cdw10=0, cdw11=R.DSM_DEALLOCATE) == R.DATA_TRANSFER_ERROR
    assert io(drv, R.NVM_WRITE_ZEROES, cdw10=IMAGE // 512, cdw12=0) == R.LBA_OUT_OF_RANGE


def test_write_zeroes_without_deallocation_and_dsm_disabled():
    mem = BytesMemory(RAM)
    data = bytearray(b"\x55" * MiB)
    backend = MemoryBlockBackend(data)
    backend.candelete = False
    pci = NvmePci(dict(backend=backend, guest_memory=mem, dsm="disable"))
    drv = NvmeDriver(pci, mem)
    drv.enable()
    drv.create_io_queues(1, 8)
    assert io(drv, R.NVM_WRITE_ZEROES, cdw10=1, cdw12=1) == 0 and data[512:1536] == bytes(1024)
    assert data[:512] == b"\x55" * 512 and io(drv, R.NVM_DSM, cdw11=R.DSM_DEALLOCATE) == R.INVALID_OPCODE


def test_a_read_only_image_is_write_protected(image):
    pci, drv = disk(image, readonly=True)
    st, data = drv.identify(R.CNS_NAMESPACE, nsid=1)
    assert L.IDENTIFY_NAMESPACE.parse(data).nsattr == 1
    before = original(image, 0, IMAGE)
    protected = R.status(R.SC_NS_WRITE_PROTECTED)
    assert drv.write(0, b"w" * 512) == protected
    assert io(drv, R.NVM_WRITE_ZEROES, cdw12=3) == protected
    assert io(drv, R.NVM_FLUSH) == 0 and drv.read(0, 1) == (0, before[:512])
    assert original(image, 0, IMAGE) == before


def test_msix_vector_per_queue():
    mem = BytesMemory(RAM)
    pci = NvmePci(dict(backend=MemoryBlockBackend(bytearray(MiB)), guest_memory=mem, maxq="3"))
    drv = NvmeDriver(pci, mem)
    drv.enable()
    drv.enable_msix()
    drv.create_io_queues(3, 8)
    assert drv.msis == [0] * 6                         # the admin queue's vector
    del drv.msis[:]
    for q in (3, 1, 2):
        assert drv.read(0, 1, qid=q)[0] == 0
    assert drv.msis == [3, 1, 2]
    pci.bar_access_write(4, 16 * 2 + 12, 4, 1)          # vector 2 masked: pending, then sent on unmask
    assert drv.read(0, 1, qid=2)[0] == 0 and len(drv.msis) == 3 and pci.msix_pending(2)
    pci.bar_access_write(4, 16 * 2 + 12, 4, 0)
    assert drv.msis[-1] == 2 and not pci.msix_pending(2)
    assert drv.create_cq(4, 8) == R.INVALID_QID          # maxq 3


def test_intx_follows_the_completion_queue_heads():
    mem = BytesMemory(RAM)
    pci = NvmePci(dict(backend=MemoryBlockBackend(bytearray(MiB)), guest_memory=mem))
    drv = NvmeDriver(pci, mem)
    drv.enable()
    drv.create_io_queues(1, 8)
    assert not drv.intx.level
    drv.submit(1, R.NVM_READ, nsid=1, prp1=drv.a.alloc(PAGE))
    assert drv.intx.level                               # an entry the host has not consumed
    assert drv.reap(1) and not drv.intx.level           # the head doorbell consumed it
    drv.w(R.REG_INTMS, 1)
    drv.submit(1, R.NVM_READ, nsid=1, prp1=drv.a.alloc(PAGE))
    assert not drv.intx.level
    drv.w(R.REG_INTMC, 1)
    assert drv.intx.level and drv.r(R.REG_INTMS) == 0
    drv.reap(1)
    assert not drv.intx.level


def test_msi_with_the_interrupt_mask():
    mem = BytesMemory(RAM)
    pci = NvmePci(dict(backend=MemoryBlockBackend(bytearray(MiB)), guest_memory=mem))
    drv = NvmeDriver(pci, mem)
    cap = pci.cfgread(PC.CAP_PTR, 1)
    while pci.cfgread(cap, 1) != PC.CAP_ID_MSI:
        cap = pci.cfgread(cap + 1, 1)
    pci.cfgwrite(cap + PC.MSI_ADDR_LO, 4, 0xFEE00000)
    pci.cfgwrite(cap + PC.MSI_DATA, 2, 0x41)
    pci.cfgwrite(cap + PC.MSI_CTRL, 2, PC.MSI_CTRL_ENABLE)
    drv.enable()
    drv.create_io_queues(1, 8)
    del drv.msis[:]
    drv.w(R.REG_INTMS, 1)
    assert drv.read(0, 1)[0] == 0 and drv.msis == []
    drv.w(R.REG_INTMC, 1)
    assert drv.msis == [0x41]


def test_shadow_doorbells_as_linux_uses_them(image):
    """After Doorbell Buffer Config the I/O queues' tails come from the shadow page; the EventIdx makes the host
    write the register once per batch it submits after the controller caught up, and (with MSI-X) almost never
    for the completion queue heads."""
    pci, drv = disk(image, queues=1, entries=16)
    drv.enable_msix()
    assert drv.doorbell_buffer() == 0
    before = drv.mmio_doorbells
    for i in range(40):
        data = os.urandom(512)
        assert drv.write(i, data) == 0 and drv.read(i, 1) == (0, data)
    assert drv.mmio_doorbells - before <= 80 + 80 // 16 + 1
    # a batch: five commands written to the shadow page, one register write
    cids = [drv.submit(1, R.NVM_READ, nsid=1, prp1=drv.a.alloc(PAGE), ring=False) for _ in range(5)]
    n = drv.mmio_doorbells
    drv.ring(1)
    assert drv.mmio_doorbells == n + 1 and [c.cid for c in drv.reap(1)] == cids
    # a register write without a shadow update is only a hint: nothing new is fetched
    drv.w(R.DOORBELL_BASE + 8, 3)
    assert drv.reap(1) == [] and pci.ctrl.errors == []


def test_an_invalid_shadow_tail_is_an_event(image):
    pci, drv = disk(image, queues=1, entries=16)
    assert drv.doorbell_buffer() == 0
    drv.submit(0, R.ADM_ASYNC_EVENT)
    db, _ = drv.shadow
    drv.a.write(db + 8, struct.pack("<I", 40))          # SQ 1's shadow tail past its 16 entries
    drv.w(R.DOORBELL_BASE + 8, 40)
    (c,) = drv.reap(0)
    assert (c.dw0 >> 8) & 0xFF == R.AE_INFO_INVALID_DB_VALUE and pci.ctrl.sqs[1].head == 0


def test_a_full_completion_queue_holds_the_submission_queue(image):
    """A 2-entry completion queue holds one completion: the next commands wait in their queue until the host
    consumes it, then are served (the head doorbell rings the device)."""
    pci, drv = disk(image, queues=0)
    assert drv.create_cq(1, 2) == 0 and drv.create_sq(1, 8) == 0
    cids = [drv.submit(1, R.NVM_READ, nsid=1, prp1=drv.a.alloc(PAGE)) for _ in range(3)]
    got = [c.cid for c in drv.reap(1, ring=False)]
    assert got == cids[:1] and pci.ctrl.cqs[1].stalled
    seen = list(got)
    while len(seen) < 3:
        drv.w(R.DOORBELL_BASE + 3 * 4, drv.cqs[1].head)     # consume, ring the head doorbell
        seen += [c.cid for c in drv.reap(1, ring=False)]
    assert seen == cids and pci.ctrl.sqs[1].head == 3


def test_a_ring_is_served_on_the_ringing_thread(image):
    """With a VM ring (``ring_with``) the doorbell write only rings; the doorbell's function, called on another
    thread (the device's doorbell thread), serves the queue."""
    pci, drv = disk(image)
    served, rings = [], []
    real = pci.ctrl._io

    def spy(e):
        served.append(threading.current_thread().name)
        return real(e)
    pci.ctrl._io = spy
    pci.ring_with(lambda bar, i: rings.append((bar, i)))
    cid = drv.submit(2, R.NVM_READ, nsid=1, prp1=drv.a.alloc(PAGE))
    assert rings == [(0, 2)] and served == [] and drv.reap(2) == []
    t = threading.Thread(target=pci.doorbells(0)[2][3], name="doorbell-test")
    t.start()
    t.join(5)
    assert served == ["doorbell-test"] and [c.cid for c in drv.reap(2)] == [cid]
