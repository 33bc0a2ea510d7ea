"""The rig of ``test_p9_compiled.py``: guest memory with guard bytes, a virtio-9p device over a host share with or
without the compiled Tread/Twrite, the PCI test driver, and requests laid out as Linux's ``net/9p/trans_virtio.c``
sends them (zero-copy pages, one indirect table each); :class:`Pair` runs the same requests on two such guests and
compares what each could see."""

import errno
import os
import struct

from bhyve_devices.base import BytesMemory
from bhyve_devices.virtio import p9 as P
from bhyve_devices.virtio.device import STATUS_DEVICE_NEEDS_RESET
from bhyve_devices.virtio.testdriver import PciDriver
from bhyve_devices.virtio.transport import VirtioPciDevice
from bhyve_devices.virtio.virtqueue import DESC_SIZE, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from tests.unit.test_p9_rig import O_RDONLY, O_RDWR, O_WRONLY, TREAD, TWRITE, P9Client
from vmmshim.backends import p9fast
from vmmshim.backends.p9fs import HostShare

RAM = 8 << 20
GUARD = 1 << 16
GUARD_FILL = b"\xc3"
PAGE = 4096
MSIZE = 512 * 1024
ROOM = 16384
FILE_A = bytes((i * 13 + i // 4096) & 0xFF for i in range(700 * 1024))
FILE_B = bytes(range(256)) * 64
RHDR = 11                   # Rread's header, all of Rwrite
P9_ZC_HDR_SZ = 4096         # the rc buffer of a zero-copy Twrite (net/9p/client.c)
# the fids every session opens (test_p9_rig's flags are 9P's, as Linux sends them)
RW, RO, WO, DIR, WALKED, UNKNOWN = 1, 2, 3, 4, 5, 9
FIDS = (RW, RO, WO, DIR, WALKED, UNKNOWN)


class GuardedMemory(BytesMemory):
    """Guest RAM from 0 (``ram`` set, so chains may reach the compiled path) with guard bytes after it in the same
    host buffer, which nothing may change."""

    def __init__(self, size=RAM):
        super().__init__(size + GUARD, 0)
        self.size = size
        self.buf[size:] = GUARD_FILL * GUARD
        self._mv = memoryview(self.buf)[:size]
        self.ram = self._mv

    def view(self, gpa, size):
        if size < 0 or gpa < 0 or gpa + size > self.size:
            raise OSError(errno.EFAULT, f"gpa {gpa:#x}+{size:#x} is outside guest RAM")
        return self._mv[gpa:gpa + size]

    def guard_intact(self):
        return self.buf[self.size:] == GUARD_FILL * GUARD


def make_share(path, readonly=False):
    path.mkdir()
    (path / "a.bin").write_bytes(FILE_A)
    (path / "b.bin").write_bytes(FILE_B)
    (path / "dir").mkdir()
    return str(path)


def files(share):
    return {n: open(os.path.join(share, n), "rb").read() for n in os.listdir(share) if n != "dir"}


class Guest:
    """The device over a share, the driver, and a client whose setup messages go in direct chains (Python)."""

    def __init__(self, share, accel, readonly=False):
        self.share = share
        self.mem = GuardedMemory()
        self.accel = p9fast.accelerator() if accel else None
        self.dev = P.Virtio9p(HostShare(share, readonly=readonly, accel=self.accel), "share")
        self.pci = VirtioPciDevice(self.dev, self.mem)
        self.drv = PciDriver(self.pci, self.mem, modern=True)
        self.drv.init()
        self.q = self.drv.queues[0]
        self.a = self.drv.alloc
        self.req, self.rep = self.a.alloc(ROOM), self.a.alloc(ROOM)
        self.c = P9Client(self.transport, msize=MSIZE)

    def transport(self, req, room):
        self.a.write(self.req, req)
        self.q.add(out=[(self.req, len(req))], inn=[(self.rep, min(room, ROOM))])
        self.drv.notify(0)
        (_, n), = self.q.get_used()
        out = self.a.read(self.rep, n)
        self.a.write(self.rep, bytes(ROOM))         # qids differ between the two shares: not compared
        return out

    def session(self, readonly=False):
        c = self.c
        c.version(MSIZE)
        c.attach(0)
        for fid, name, flags in ((RW, "a.bin", O_RDWR), (RO, "a.bin", O_RDONLY), (WO, "b.bin", O_WRONLY),
                                 (DIR, None, O_RDONLY), (WALKED, "a.bin", None)):
            if readonly and flags in (O_RDWR, O_WRONLY):
                flags = O_RDONLY
            c.walk(0, fid, *([name] if name else []))
            if flags is not None:
                c.lopen(fid, flags)

    def post(self, descs, table=None):
        """An indirect table of ``descs`` ((addr, len, flags, next)) as one chain, notified; ``table``: where the
        head says the table is (nothing written there)."""
        if table is None:
            table = self.a.alloc(DESC_SIZE * max(len(descs), 1), PAGE)
            for k, (addr, n, flags, nxt) in enumerate(descs):
                self.q.write_desc(table, k, addr % 2**64, n % 2**32, flags & 0xFFFF, nxt & 0xFFFF)
        head = self.q.free.pop(0)
        self.q.write_desc(self.q.desc, head, table, DESC_SIZE * len(descs), VIRTQ_DESC_F_INDIRECT, 0)
        self.q.pending[head] = [head]
        self.q.publish(head)
        self.drv.notify(0)

    def close(self):
        self.pci.close()


def pieces(g, n, in_page=0, data=None):
    """``n`` bytes as Linux's pack_sg_list lays a kernel buffer: from ``in_page`` bytes into a fresh page, one
    piece per page it touches. Returns [(addr, len)]."""
    base = g.a.alloc(in_page + n + PAGE, PAGE) + in_page
    if data is not None:
        g.a.write(base, data)
    out, at = [], base
    while n > 0:
        k = min(n, PAGE - at % PAGE)
        out.append((at, k))
        at, n = at + k, n - k
    return out or [(base, 0)]


def user_pages(g, n, in_page=0, data=None):
    """``n`` bytes of a user buffer as pack_sg_list_p lays them: scattered pages (a gap after each, in reverse
    order), the first from ``in_page``. Returns [(addr, len)]."""
    pages = [g.a.alloc(2 * PAGE, PAGE) for _ in range((in_page + n + PAGE - 1) // PAGE)][::-1]
    out, done = [], 0
    for i, p in enumerate(pages):
        start = in_page if i == 0 else 0
        k = min(PAGE - start, n - done)
        if data is not None:
            g.a.write(p + start, data[done:done + k])
        out.append((p + start, k))
        done += k
    return out


def chain(readable, writable):
    """[(addr, len, flags, next)]: entry i chained to i + 1, readable then writable."""
    bufs = [(a, n, 0) for a, n in readable] + [(a, n, VIRTQ_DESC_F_WRITE) for a, n in writable]
    last = len(bufs) - 1
    return [(a, n, f | (VIRTQ_DESC_F_NEXT if k < last else 0), k + 1 if k < last else 0)
            for k, (a, n, f) in enumerate(bufs)]


def linux_read(g, fid, offset, count, buf=None, hdr_at=0, rhdr_at=0, in_page=0, tag=7, size=23, mtype=TREAD):
    """Tread: the 23-byte message, the 11-byte Rread header, ``buf`` bytes (default ``count``) of user pages."""
    msg = struct.pack("<IBHIQI", size, mtype, tag, fid, offset % 2**64, count % 2**32)
    return chain(pieces(g, len(msg), hdr_at, msg),
                 pieces(g, RHDR, rhdr_at) + user_pages(g, count if buf is None else buf, in_page))


def linux_write(g, fid, offset, data, count=None, hdr_at=0, rc_at=0, in_page=0, tag=8, size=None, mtype=TWRITE):
    """Twrite: the 23-byte header (its size counting the data), ``data`` in user pages, a 4096-byte rc buffer."""
    n = len(data) if count is None else count
    msg = struct.pack("<IBHIQI", 23 + len(data) if size is None else size, mtype, tag, fid, offset % 2**64,
                      n % 2**32)
    return chain(pieces(g, len(msg), hdr_at, msg) + user_pages(g, len(data), in_page, data),
                 pieces(g, P9_ZC_HDR_SZ, rc_at))


class Pair:
    """The same requests to a guest with the compiled path and one without, compared after each."""

    def __init__(self, tmp, readonly=False):
        self.guests = [Guest(make_share(tmp / name, readonly), accel=name == "c", readonly=readonly)
                       for name in ("c", "py")]
        self.c = self.guests[0]
        for g in self.guests:
            g.session(readonly)

    def each(self, calls):
        """``calls(client)`` on both guests (setup messages, served in Python)."""
        for g in self.guests:
            calls(g.c)

    def both(self, build, bend=None, table=None):
        """``build(guest) -> descs`` posted on both (``bend(descs)`` first); returns the used entries, how many
        requests C served, and the compiled guest's descriptors."""
        before = self.c.accel.served
        for g in self.guests:
            descs = build(g)
            descs = bend(descs) if bend else descs
            g.post(descs, table)
            if g is self.c:
                mine = descs
        used = self.check()
        return used, self.c.accel.served - before, mine

    def check(self):
        c, py = self.guests
        used = c.q.get_used()
        assert used == py.q.get_used()
        assert c.mem.buf == py.mem.buf, "guest memory differs"
        assert c.mem.guard_intact() and py.mem.guard_intact()
        assert files(c.share) == files(py.share)
        assert bool(c.drv.status() & STATUS_DEVICE_NEEDS_RESET) == bool(py.drv.status() & STATUS_DEVICE_NEEDS_RESET)
        assert c.dev.server.stats == py.dev.server.stats
        assert c.pci.errors == py.pci.errors and c.dev.server.errors == py.dev.server.errors == []
        return used

    def reply(self, descs):
        """``(size, type, tag, u32)``: the start of the R-message in the compiled guest's writable ``descs``."""
        out = b"".join(self.c.a.read(a, k) for a, k, f, _ in descs if f & VIRTQ_DESC_F_WRITE)
        return struct.unpack_from("<IBHI", out)

    def close(self):
        for g in self.guests:
            g.close()
