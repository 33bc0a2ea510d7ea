"""A small guest-side NVMe driver for tests, as Linux's ``drivers/nvme/host/pci.c`` drives a controller: queues
and data buffers in a ``BytesMemory``, the registers and doorbells written through the PCI function's BAR 0, MSI-X
programmed through configuration space and BAR 4, PRP lists and SGLs built like ``nvme_pci_setup_prps`` /
``nvme_pci_setup_sgls``, and (after :meth:`NvmeDriver.doorbell_buffer`) shadow doorbells with the EventIdx rule
of ``nvme_dbbuf_update_and_check_event``. Not used by the VMM.

Not supported: interrupts (MSI-X messages and the INTx line are only recorded), more than one command in flight
per :meth:`NvmeDriver.command`, queues in PRP lists, metadata.
"""

import collections
import struct
import time

from bhyve_devices.base import RecordingLine
from bhyve_devices.pci import config as PC

from . import regs as R
from .layouts import SGL_DATA_BLOCK, SGL_DESC, SGL_LAST_SEGMENT
from .queues import need_event

PAGE = R.PAGE_SIZE
Completion = collections.namedtuple("Completion", "dw0 sqhd sqid cid status phase")
MSI_ADDR = 0xFEE00000


class Allocator:
    """A bump allocator over the test's guest memory."""

    def __init__(self, mem, start=0x10000):
        self.mem, self.next = mem, mem.base + start

    def alloc(self, size, align=PAGE):
        a = (self.next + align - 1) & ~(align - 1)
        if a + size > self.mem.base + len(self.mem.buf):
            raise MemoryError("test guest memory exhausted")
        self.next = a + size
        self.mem.buf[a - self.mem.base:a - self.mem.base + size] = bytes(size)
        return a

    def write(self, gpa, data):
        self.mem.buf[gpa - self.mem.base:gpa - self.mem.base + len(data)] = data

    def read(self, gpa, n):
        return bytes(self.mem.buf[gpa - self.mem.base:gpa - self.mem.base + n])


class _Queue:
    def __init__(self, qid, base, entries, cqid=None):
        self.qid, self.base, self.entries, self.cqid = qid, base, entries, cqid
        self.tail = self.head = 0
        self.phase = 1


class NvmeDriver:
    def __init__(self, pci, mem):
        self.pci, self.mem = pci, mem
        self.a = Allocator(mem)
        self.msis = []
        pci.msi = lambda addr, data: self.msis.append(data)
        pci.intx_line = self.intx = RecordingLine()
        self.sqs, self.cqs = {}, {}
        self.next_cid = 0
        self.shadow = None              # (db page, ei page) once Doorbell Buffer Config succeeded
        self.mmio_doorbells = 0
        self.stray = []                 # completions that came with the last command's but were not its own
        self.wait_s = 0                 # how long a command may take to complete (a doorbell thread serves)

    # -- registers --------------------------------------------------------------------------------------------
    def r(self, off, size=4):
        return self.pci.bar_access_read(0, off, size)

    def w(self, off, value, size=4):
        self.pci.bar_access_write(0, off, size, value)

    def csts(self):
        return self.r(R.REG_CSTS)

    def enable(self, entries=16):
        """Resets the controller and enables it with admin queues of ``entries`` entries."""
        self.w(R.REG_CC, 0)
        self.sqs, self.cqs, self.shadow = {}, {}, None
        asq, acq = self.a.alloc(entries * R.SQE_SIZE), self.a.alloc(entries * R.CQE_SIZE)
        self.w(R.REG_AQA, (entries - 1) | ((entries - 1) << 16))
        self.w(R.REG_ASQ, asq, 8)
        self.w(R.REG_ACQ, acq, 8)
        self.w(R.REG_CC, R.CC_EN | (R.SQES_LOG2 << R.CC_IOSQES_SHIFT) | (R.CQES_LOG2 << R.CC_IOCQES_SHIFT))
        self.sqs[0], self.cqs[0] = _Queue(0, asq, entries, 0), _Queue(0, acq, entries)
        return self.csts()

    def enable_msix(self):
        """MSI-X on, vector ``v`` sending data ``v``."""
        cap = self.pci.cfgread(PC.CAP_PTR, 1)
        while cap and self.pci.cfgread(cap, 1) != PC.CAP_ID_MSIX:
            cap = self.pci.cfgread(cap + 1, 1)
        nvec = (self.pci.cfgread(cap + 2, 2) & 0x7FF) + 1
        for v in range(nvec):
            self.pci.bar_access_write(4, 16 * v, 8, MSI_ADDR)
            self.pci.bar_access_write(4, 16 * v + 8, 4, v)
            self.pci.bar_access_write(4, 16 * v + 12, 4, 0)
        self.pci.cfgwrite(cap + 2, 2, PC.MSIX_CTRL_ENABLE)

    # -- submission and completion ------------------------------------------------------------------------------
    def submit(self, qid, opcode, nsid=0, prp1=0, prp2=0, cdw10=0, cdw11=0, cdw12=0, cdw13=0, cdw14=0, cdw15=0,
               flags=0, cid=None, ring=True):
        sq = self.sqs[qid]
        if cid is None:
            cid, self.next_cid = self.next_cid, (self.next_cid + 1) & 0xFFFF
        self.a.write(sq.base + sq.tail * R.SQE_SIZE, R.SQE.pack(opcode, flags, cid, nsid, 0, 0, 0, prp1, prp2,
                                                                 cdw10, cdw11, cdw12, cdw13, cdw14, cdw15))
        sq.tail = (sq.tail + 1) % sq.entries
        if ring:
            self.ring(qid)
        return cid

    def _doorbell(self, qid, cq, value, old):
        if self.shadow is not None and qid:
            db, ei = self.shadow
            off = (2 * qid + cq) * R.DOORBELL_STRIDE
            self.a.write(db + off, struct.pack("<I", value))
            event = struct.unpack("<I", self.a.read(ei + off, 4))[0]
            if not need_event(event, value, old):
                return
        self.mmio_doorbells += 1
        self.w(R.DOORBELL_BASE + (2 * qid + cq) * R.DOORBELL_STRIDE, value)

    def ring(self, qid, value=None):
        sq = self.sqs[qid]
        old, sq.head = sq.head, sq.tail     # the driver's idea of what it last rang
        self._doorbell(qid, 0, sq.tail if value is None else value, old)

    def reap(self, cqid, ring=True):
        """The completions posted to ``cqid`` since the last call (phase tag), then its head doorbell."""
        cq, out = self.cqs[cqid], []
        while True:
            dw0, _, sqhd, sqid, cid, st = R.CQE.unpack(self.a.read(cq.base + cq.head * R.CQE_SIZE, R.CQE_SIZE))
            if st & 1 != cq.phase:
                break
            out.append(Completion(dw0, sqhd, sqid, cid, st >> 1, st & 1))
            cq.head += 1
            if cq.head == cq.entries:
                cq.head, cq.phase = 0, cq.phase ^ 1
        if out and ring:
            self._doorbell(cqid, 1, cq.head, (cq.head - len(out)) % cq.entries)
        return out

    def admin(self, opcode, **kw):
        return self.command(0, opcode, **kw)

    def command(self, qid, opcode, **kw):
        """Submits one command and returns its completion; others that came with it go to ``stray``. Where
        another thread serves the queue (``wait_s``), waits that long for it."""
        cid = self.submit(qid, opcode, **kw)
        done, deadline = [], time.monotonic() + self.wait_s
        while True:
            done += self.reap(self.sqs[qid].cqid)
            mine = [c for c in done if c.cid == cid]
            if mine or time.monotonic() > deadline:
                break
            time.sleep(0.001)
        assert len(mine) == 1, (done, cid)
        self.stray = [c for c in done if c.cid != cid]
        return mine[0]

    # -- admin helpers ------------------------------------------------------------------------------------------
    def identify(self, cns, nsid=0):
        buf = self.a.alloc(R.IDENTIFY_SIZE)
        c = self.admin(R.ADM_IDENTIFY, nsid=nsid, prp1=buf, cdw10=cns)
        return c.status, self.a.read(buf, R.IDENTIFY_SIZE)

    def get_log(self, lid, length, offset=0, nsid=R.NSID_ALL, rae=False):
        buf = self.a.alloc(max(length, PAGE))
        prp1, prp2 = self.prps(buf, length)
        numd = length // 4 - 1
        c = self.admin(R.ADM_GET_LOG_PAGE, nsid=nsid, prp1=prp1, prp2=prp2,
                       cdw10=lid | (R.LOG_RAE if rae else 0) | ((numd & 0xFFFF) << 16), cdw11=numd >> 16,
                       cdw12=offset & 0xFFFFFFFF, cdw13=offset >> 32)
        return c.status, self.a.read(buf, length)

    def create_cq(self, qid, entries, vector=None, ien=True):
        base = self.a.alloc(entries * R.CQE_SIZE)
        c = self.admin(R.ADM_CREATE_CQ, prp1=base, cdw10=qid | ((entries - 1) << 16),
                       cdw11=1 | (2 if ien else 0) | ((qid if vector is None else vector) << 16))
        if c.status == 0:
            self.cqs[qid] = _Queue(qid, base, entries)
        return c.status

    def create_sq(self, qid, entries, cqid=None):
        base = self.a.alloc(entries * R.SQE_SIZE)
        cqid = qid if cqid is None else cqid
        c = self.admin(R.ADM_CREATE_SQ, prp1=base, cdw10=qid | ((entries - 1) << 16), cdw11=1 | (cqid << 16))
        if c.status == 0:
            self.sqs[qid] = _Queue(qid, base, entries, cqid)
        return c.status

    def create_io_queues(self, count=1, entries=32):
        for q in range(1, count + 1):
            assert self.create_cq(q, entries) == 0 and self.create_sq(q, entries) == 0

    def doorbell_buffer(self):
        db, ei = self.a.alloc(PAGE), self.a.alloc(PAGE)
        c = self.admin(R.ADM_DOORBELL_BUFFER, prp1=db, prp2=ei)
        if c.status == 0:
            self.shadow = (db, ei)
        return c.status

    # -- data pointers ----------------------------------------------------------------------------------------
    def prps(self, gpa, length, pages=None):
        """PRP1/PRP2 for ``length`` bytes at ``gpa`` (contiguous), or over the page addresses ``pages`` (the first
        may start inside its page); a list is built, chained across list pages, where needed."""
        if pages is None:
            first = gpa & ~(PAGE - 1)
            pages = [gpa] + [first + PAGE * i for i in range(1, (gpa - first + length + PAGE - 1) // PAGE)]
        if len(pages) == 1:
            return pages[0], 0
        if len(pages) == 2:
            return pages[0], pages[1]
        entries, lists = list(pages[1:]), []
        while entries:
            page = self.a.alloc(PAGE)
            lists.append(page)
            take = entries if len(entries) <= PAGE // 8 else entries[:PAGE // 8 - 1]
            entries = entries[len(take):]
            self.a.write(page, struct.pack(f"<{len(take)}Q", *take))
        for prev, nxt in zip(lists, lists[1:]):
            self.a.write(prev + PAGE - 8, struct.pack("<Q", nxt))
        return pages[0], lists[0]

    def sgl(self, extents):
        """The DPTR (``prp1``, ``prp2``) of an SGL over ``extents`` ((gpa, length) pairs)."""
        if len(extents) == 1:
            (gpa, n), = extents
            return gpa, n | (SGL_DATA_BLOCK << 60)
        seg = self.a.alloc(SGL_DESC.size * len(extents))
        self.a.write(seg, b"".join(SGL_DESC.pack(g, n, SGL_DATA_BLOCK << 4) for g, n in extents))
        return seg, (SGL_DESC.size * len(extents)) | (SGL_LAST_SEGMENT << 60)

    # -- I/O helpers ------------------------------------------------------------------------------------------
    def read(self, lba, nlb, qid=1, sgl=False, sectsz=512):
        n = nlb * sectsz
        buf = self.a.alloc(n)
        prp1, prp2 = self.sgl([(buf, n)]) if sgl else self.prps(buf, n)
        c = self.command(qid, R.NVM_READ, nsid=1, prp1=prp1, prp2=prp2, cdw10=lba & 0xFFFFFFFF, cdw11=lba >> 32,
                         cdw12=nlb - 1, flags=(R.PSDT_SGL << R.FLAGS_PSDT_SHIFT) if sgl else 0)
        return c.status, self.a.read(buf, n)

    def write(self, lba, data, qid=1, sgl=False, sectsz=512, fua=False):
        buf = self.a.alloc(len(data))
        self.a.write(buf, data)
        prp1, prp2 = self.sgl([(buf, len(data))]) if sgl else self.prps(buf, len(data))
        c = self.command(qid, R.NVM_WRITE, nsid=1, prp1=prp1, prp2=prp2, cdw10=lba & 0xFFFFFFFF,
                         cdw11=lba >> 32, cdw12=(len(data) // sectsz - 1) | (R.RW_FUA if fua else 0),
                         flags=(R.PSDT_SGL << R.FLAGS_PSDT_SHIFT) if sgl else 0)
        return c.status
