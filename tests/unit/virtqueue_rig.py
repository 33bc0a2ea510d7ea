"""The driver side of the virtqueue tests (VIRTIO 1.1 section 2.6, the split ring as the driver writes it): guest
memories that check what the queue maps, a raw ring writer and the queue set up over it (``make``). Shared by
``test_virtqueue.py`` and ``test_virtqueue_errors.py``.

Not here: the packed ring, a driver's own handling of the used ring beyond reading its index and entries.
"""

import struct

from bhyve_devices.base import BytesMemory
from bhyve_devices.virtio.virtqueue import DESC_SIZE, Virtqueue

BASE = 0x10000
RAM = 0x10000
F_INDIRECT = 1 << 28
F_EVENT_IDX = 1 << 29


class RecordingMemory(BytesMemory):
    """BytesMemory that records every view asked for and checks that each one it grants is inside RAM."""

    def __init__(self, size=RAM, base=BASE):
        super().__init__(size, base)
        self.granted = []
        self.refused = 0

    def view(self, gpa, size):
        try:
            mv = super().view(gpa, size)
        except OSError:
            self.refused += 1
            raise
        assert self.base <= gpa and gpa + size <= self.base + len(self.buf), (gpa, size)
        assert len(mv) == size
        self.granted.append((gpa, size))
        return mv


class RamMemory(BytesMemory):
    """Guest RAM from 0 with a ``ram`` view (as the VM's): the queue slices it itself for in-RAM buffers."""

    def __init__(self):
        super().__init__(BASE + RAM, 0)
        assert self.ram is not None
        self.views = 0

    def view(self, gpa, size):
        self.views += 1
        return super().view(gpa, size)


class Ring:
    """Raw ring writer (the test is the driver)."""

    def __init__(self, mem, size=8, desc=BASE, avail=BASE + 0x1000, used=BASE + 0x2000):
        self.mem, self.size, self.desc, self.avail, self.used = mem, size, desc, avail, used

    def w(self, gpa, fmt, *v):
        struct.pack_into(fmt, self.mem.buf, gpa - self.mem.base, *v)

    def r(self, gpa, fmt):
        return struct.unpack_from(fmt, self.mem.buf, gpa - self.mem.base)

    def d(self, i, addr, length, flags=0, nxt=0, table=None):
        self.w((self.desc if table is None else table) + DESC_SIZE * i, "<QIHH", addr, length, flags, nxt)

    def post(self, *heads, idx=None):
        cur = self.r(self.avail + 2, "<H")[0]
        for k, h in enumerate(heads):
            self.w(self.avail + 4 + 2 * ((cur + k) % self.size), "<H", h)
        self.w(self.avail + 2, "<H", (cur + len(heads)) & 0xFFFF if idx is None else idx)

    def used_idx(self):
        return self.r(self.used + 2, "<H")[0]

    def used_elem(self, k):
        return self.r(self.used + 4 + 8 * (k % self.size), "<II")


def make(size=8, features=F_INDIRECT, mem=None):
    mem = mem or RecordingMemory()
    errors = []
    q = Virtqueue(mem, 0, size, on_error=errors.append)
    ring = Ring(mem, size)
    q.desc_addr, q.avail_addr, q.used_addr = ring.desc, ring.avail, ring.used
    q.set_features(features)
    assert q.enable()
    return mem, q, ring, errors
