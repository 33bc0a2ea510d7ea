"""A small guest-side virtio driver for tests: split rings written into a ``BytesMemory`` and the PCI transport
driven through its BARs and configuration space, legacy or modern, as Linux's ``virtio_pci_legacy`` /
``virtio_pci_modern`` and ``virtio_ring`` do. Not used by the VMM.
"""

import struct

from bhyve_devices.base import RecordingLine
from bhyve_devices.pci import config as PC

from . import transport as T
from .device import STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK
from .virtqueue import (DESC_SIZE, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, avail_size,
                        legacy_layout, used_size)

_DESC = struct.Struct("<QIHH")


class Allocator:
    """A bump allocator over guest memory (page-aligned on request)."""

    def __init__(self, mem, start=0x1000):
        self.mem = mem
        self.next = mem.base + start

    def alloc(self, size, align=16):
        self.next = (self.next + align - 1) & ~(align - 1)
        a = self.next
        self.next += size
        if self.next > self.mem.base + len(self.mem.buf):
            raise MemoryError("test guest memory exhausted")
        return a

    def put(self, data, align=16):
        a = self.alloc(len(data), align)
        self.write(a, data)
        return a

    def write(self, gpa, data):
        off = gpa - self.mem.base
        self.mem.buf[off:off + len(data)] = data

    def read(self, gpa, n):
        off = gpa - self.mem.base
        return bytes(self.mem.buf[off:off + n])


class DriverQueue:
    """The driver's side of one split ring."""

    def __init__(self, mem, size, desc, avail, used, event_idx=False):
        self.mem, self.size = mem, size
        self.desc, self.avail, self.used = desc, avail, used
        self.event_idx = event_idx
        self.free = list(range(size))
        self.avail_idx = 0
        self.last_used = 0
        self.pending = {}

    def _w(self, gpa, fmt, *v):
        struct.pack_into(fmt, self.mem.buf, gpa - self.mem.base, *v)

    def _r(self, gpa, fmt):
        return struct.unpack_from(fmt, self.mem.buf, gpa - self.mem.base)

    def write_desc(self, table, i, addr, length, flags, nxt):
        _DESC.pack_into(self.mem.buf, table - self.mem.base + DESC_SIZE * i, addr, length, flags, nxt)

    def add(self, out=(), inn=(), indirect_at=None):
        """Posts a chain of device-readable ``out`` then device-writable ``inn`` buffers ((gpa, len) pairs);
        ``indirect_at`` places them in an indirect table at that address. Returns the head."""
        bufs = [(a, n, 0) for a, n in out] + [(a, n, VIRTQ_DESC_F_WRITE) for a, n in inn]
        if indirect_at is not None:
            for k, (a, n, f) in enumerate(bufs):
                nxt = k + 1 if k + 1 < len(bufs) else 0
                self.write_desc(indirect_at, k, a, n, f | (VIRTQ_DESC_F_NEXT if k + 1 < len(bufs) else 0), nxt)
            head = self.free.pop(0)
            self.write_desc(self.desc, head, indirect_at, DESC_SIZE * len(bufs), VIRTQ_DESC_F_INDIRECT, 0)
            self.pending[head] = [head]
        else:
            ids = [self.free.pop(0) for _ in bufs]
            for k, (a, n, f) in enumerate(bufs):
                more = k + 1 < len(bufs)
                self.write_desc(self.desc, ids[k], a, n, f | (VIRTQ_DESC_F_NEXT if more else 0),
                                ids[k + 1] if more else 0)
            head = ids[0]
            self.pending[head] = ids
        self.publish(head)
        return head

    def publish(self, head):
        self._w(self.avail + 4 + 2 * (self.avail_idx % self.size), "<H", head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self._w(self.avail + 2, "<H", self.avail_idx)

    def set_avail_flags(self, flags):
        self._w(self.avail, "<H", flags)

    def set_used_event(self, v):
        self._w(self.avail + 4 + 2 * self.size, "<H", v)

    def avail_event(self):
        return self._r(self.used + 4 + 8 * self.size, "<H")[0]

    def used_flags(self):
        return self._r(self.used, "<H")[0]

    def get_used(self):
        """[(head, len)] returned since the last call; their descriptors are freed."""
        out = []
        idx = self._r(self.used + 2, "<H")[0]
        while self.last_used != idx:
            head, length = self._r(self.used + 4 + 8 * (self.last_used % self.size), "<II")
            out.append((head, length))
            self.free.extend(self.pending.pop(head, []))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out


class PciDriver:
    """Drives a :class:`~bhyve_devices.virtio.transport.VirtioPciDevice` through its BARs."""

    def __init__(self, dev, mem, modern=False, alloc=None):
        self.dev, self.mem, self.modern = dev, mem, modern
        self.alloc = alloc or Allocator(mem)
        self.msis = []
        self.intx = RecordingLine()
        dev.msi = lambda addr, data: self.msis.append((addr, data))
        dev.intx_line = self.intx
        self.queues = {}

    # -- register access --------------------------------------------------------------------------------------
    def lread(self, off, size):
        return self.dev.bar_access_read(T.LEGACY_BAR, off, size)

    def lwrite(self, off, size, v):
        self.dev.bar_access_write(T.LEGACY_BAR, off, size, v)

    def cread(self, name):
        off, size = T._COMMON_FIELDS[name]
        if size == 8:
            return (self.dev.bar_access_read(T.MODERN_BAR, off, 4)
                    | self.dev.bar_access_read(T.MODERN_BAR, off + 4, 4) << 32)
        return self.dev.bar_access_read(T.MODERN_BAR, T.COMMON_OFF + off, size)

    def cwrite(self, name, v):
        off, size = T._COMMON_FIELDS[name]
        if size == 8:   # two 32-bit halves, as Linux's vp_iowrite64_twopart
            self.dev.bar_access_write(T.MODERN_BAR, off, 4, v & 0xFFFFFFFF)
            self.dev.bar_access_write(T.MODERN_BAR, off + 4, 4, v >> 32)
        else:
            self.dev.bar_access_write(T.MODERN_BAR, T.COMMON_OFF + off, size, v)

    def status(self):
        return self.cread("device_status") if self.modern else self.lread(T.VIRTIO_PCI_STATUS, 1)

    def set_status(self, v):
        if self.modern:
            self.cwrite("device_status", v)
        else:
            self.lwrite(T.VIRTIO_PCI_STATUS, 1, v)

    def isr(self):
        if self.modern:
            return self.dev.bar_access_read(T.MODERN_BAR, T.ISR_OFF, 1)
        return self.lread(T.VIRTIO_PCI_ISR, 1)

    def config_read(self, off, size):
        if self.modern:
            return self.dev.bar_access_read(T.MODERN_BAR, T.DEVICE_OFF + off, size)
        return self.lread(T.legacy_config_offset(self.dev.msix_enabled) + off, size)

    def config_bytes(self, n):
        return bytes(self.config_read(i, 1) for i in range(n))

    def config_write(self, off, size, v):
        if self.modern:
            self.dev.bar_access_write(T.MODERN_BAR, T.DEVICE_OFF + off, size, v)
        else:
            self.lwrite(T.legacy_config_offset(self.dev.msix_enabled) + off, size, v)

    def device_features(self):
        if self.modern:
            self.cwrite("device_feature_select", 0)
            lo = self.cread("device_feature")
            self.cwrite("device_feature_select", 1)
            return lo | self.cread("device_feature") << 32
        return self.lread(T.VIRTIO_PCI_HOST_FEATURES, 4)

    def notify(self, qidx):
        if self.modern:
            self.dev.bar_access_write(T.MODERN_BAR, T.NOTIFY_OFF + T.NOTIFY_MULTIPLIER * qidx, 2, qidx)
        else:
            self.lwrite(T.VIRTIO_PCI_QUEUE_NOTIFY, 2, qidx)

    # -- MSI-X ----------------------------------------------------------------------------------------------------
    def enable_msix(self):
        read8 = lambda o: self.dev.cfgread(o, 1)  # noqa: E731
        cap = PC.find_capability(read8, PC.CAP_ID_MSIX)
        assert cap is not None
        nvec = (self.dev.cfgread(cap + 2, 2) & PC.MSIX_CTRL_TABLE_SIZE) + 1
        for v in range(nvec):
            base = 16 * v
            self.dev.bar_access_write(T.MSIX_BAR, base, 4, 0xFEE00000)
            self.dev.bar_access_write(T.MSIX_BAR, base + 4, 4, 0)
            self.dev.bar_access_write(T.MSIX_BAR, base + 8, 4, 0x40 + v)
            self.dev.bar_access_write(T.MSIX_BAR, base + 12, 4, 0)
        self.dev.cfgwrite(cap + 2, 2, PC.MSIX_CTRL_ENABLE)
        return nvec

    def enable_msi(self):
        cap = PC.find_capability(lambda o: self.dev.cfgread(o, 1), PC.CAP_ID_MSI)
        self.dev.cfgwrite(cap + PC.MSI_ADDR_LO, 4, 0xFEE00000)
        self.dev.cfgwrite(cap + PC.MSI_DATA, 2, 0x30)
        self.dev.cfgwrite(cap + PC.MSI_CTRL, 2, PC.MSI_CTRL_ENABLE)

    # -- initialisation (3.1.1) --------------------------------------------------------------------------------
    def init(self, want=None, queues=None, msix=False, event_idx=False, queue_size=None):
        """Resets, negotiates ``want`` (default: everything offered), sets up the queues, DRIVER_OK. Returns the
        negotiated features, or None if FEATURES_OK did not stick."""
        self.set_status(0)
        self.set_status(STATUS_ACKNOWLEDGE)
        self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER)
        offered = self.device_features()
        feats = offered if want is None else want
        if not event_idx:
            feats &= ~(1 << 29)
        if msix:
            self.enable_msix()
        if self.modern:
            self.cwrite("driver_feature_select", 0)
            self.cwrite("driver_feature", feats & 0xFFFFFFFF)
            self.cwrite("driver_feature_select", 1)
            self.cwrite("driver_feature", feats >> 32)
            self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
            if not self.status() & STATUS_FEATURES_OK:
                return None
        else:
            self.lwrite(T.VIRTIO_PCI_GUEST_FEATURES, 4, feats & 0xFFFFFFFF)
        self.features = feats
        ev = bool(feats >> 29 & 1)
        n = len(self.dev.queues) if queues is None else queues
        for q in range(n):
            self.setup_queue(q, ev, msix, queue_size)
        self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK
                        | (STATUS_FEATURES_OK if self.modern else 0))
        if msix:
            if self.modern:
                self.cwrite("msix_config", 0)
            else:
                self.lwrite(T.VIRTIO_MSI_CONFIG_VECTOR, 2, 0)
        return feats

    def setup_queue(self, q, event_idx=False, msix=False, queue_size=None):
        if self.modern:
            self.cwrite("queue_select", q)
            size = self.cread("queue_size")
            if queue_size:
                size = queue_size
                self.cwrite("queue_size", size)
            desc = self.alloc.alloc(DESC_SIZE * size, 16)
            avail = self.alloc.alloc(avail_size(size), 2)
            used = self.alloc.alloc(used_size(size), 4)
            self.cwrite("queue_desc", desc)
            self.cwrite("queue_driver", avail)
            self.cwrite("queue_device", used)
            if msix:
                self.cwrite("queue_msix_vector", q + 1)
            self.cwrite("queue_enable", 1)
        else:
            self.lwrite(T.VIRTIO_PCI_QUEUE_SEL, 2, q)
            size = self.lread(T.VIRTIO_PCI_QUEUE_NUM, 2)
            _, _, used0 = legacy_layout(0, size)
            base = self.alloc.alloc(used0 + used_size(size), 4096)
            desc, avail, used = legacy_layout(base >> 12, size)
            if msix:
                self.lwrite(T.VIRTIO_MSI_QUEUE_VECTOR, 2, q + 1)
            self.lwrite(T.VIRTIO_PCI_QUEUE_PFN, 4, base >> 12)
        dq = DriverQueue(self.mem, size, desc, avail, used, event_idx)
        self.queues[q] = dq
        return dq

    def msix_vectors(self):
        """The vectors of the MSI-X messages seen so far (data - 0x40)."""
        return [d - 0x40 for _, d in self.msis]
