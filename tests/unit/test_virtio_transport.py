"""The transitional virtio PCI transport driven as Linux's legacy and modern drivers drive it."""

import pytest

from bhyve_devices.base import BytesMemory
from bhyve_devices.pci import config as PC
from bhyve_devices.virtio import transport as T
from bhyve_devices.virtio.device import (STATUS_DEVICE_NEEDS_RESET, STATUS_FEATURES_OK, VIRTIO_F_VERSION_1,
                                         VirtioDevice, read_le)
from bhyve_devices.virtio.rnd import VirtioRnd
from bhyve_devices.virtio.testdriver import PciDriver


class Echo(VirtioDevice):
    """Two queues: chains on queue 0 are answered by copying their readable bytes into their writable part."""
    name = "echo"
    device_type = 4
    num_queues = 2
    queue_size = 16
    features = 1 << 3
    config_size = 8

    def __init__(self):
        super().__init__()
        self.cfg = bytearray(b"ABCDEFGH")
        self.applied = []
        self.resets = 0
        self.ok = 0

    def config_bytes(self):
        return self.cfg

    def config_write(self, off, size, value):
        self.cfg[off:off + size] = value.to_bytes(size, "little")

    def apply_features(self, f):
        super().apply_features(f)
        self.applied.append(f)

    def reset(self):
        super().reset()
        self.resets += 1

    def driver_ok(self):
        self.ok += 1

    def queue_notify(self, qidx, queue):
        n = 0
        while (c := queue.get_chain()) is not None:
            data = c.read_bytes()
            queue.put_used(c.head, c.write_bytes(data))
            n += 1
        if n:
            self.notify_used(queue)


def make(single_vector=False, dev=None):
    mem = BytesMemory(1 << 20)
    dev = dev or Echo()
    pci = T.VirtioPciDevice(dev, mem, single_vector=single_vector)
    return mem, dev, pci


def test_identity_and_capabilities():
    mem, dev, pci = make(dev=VirtioRnd())
    h = pci.header()
    assert (h.vendor_id, h.device_id, h.revision) == (0x1AF4, 0x1005, 0)
    assert (h.subsys_vendor, h.subsys_id) == (0x1AF4, 4)
    read8 = lambda o: pci.cfgread(o, 1)  # noqa: E731
    caps = PC.walk_capabilities(read8)
    ids = [c for c, _ in caps]
    assert PC.CAP_ID_MSIX in ids and PC.CAP_ID_MSI in ids
    vnd = {}
    for cid, off in caps:
        if cid == T.PCI_CAP_ID_VNDR:
            raw = bytes(pci.cfgread(off + i, 1) for i in range(16))
            c = T.VIRTIO_PCI_CAP.parse(raw)
            vnd[c.cfg_type] = c
            assert T.VIRTIO_PCI_CAP.build(c)[2:] == raw[2:]
    assert set(vnd) == {1, 2, 3, 5}       # no device cfg for rnd
    assert vnd[1].bar == 4 and vnd[1].offset == 0 and vnd[1].length == 56
    notify = [off for cid, off in caps if cid == 9 and pci.cfgread(off + 3, 1) == 2]
    if T.PIO_NOTIFY:        # first: the I/O BAR's QUEUE_NOTIFY, every queue's index written there (multiplier 0)
        pio = T.VIRTIO_PCI_CAP.parse(bytes(pci.cfgread(notify[0] + i, 1) for i in range(16)))
        assert (pio.bar, pio.offset, pio.length) == (T.LEGACY_BAR, T.VIRTIO_PCI_QUEUE_NOTIFY, 2)
        assert pci.cfgread(notify[0] + 16, 4) == 0
        notify = notify[1:]
    assert len(notify) == 1 and pci.cfgread(notify[0] + 16, 4) == T.NOTIFY_MULTIPLIER
    assert pci.bars[0].kind == 1 and pci.bars[1].kind == 2 and pci.bars[4].kind == 2
    for tid, dt in ((0x1000, 1), (0x1001, 2), (0x1003, 3), (0x1005, 4)):
        assert T.TRANSITIONAL_DEVICE_ID[dt] == tid


def test_notifications_through_the_io_bar_only_where_asked():
    """The I/O BAR's notify capability is the first of its type (a driver takes the first it can use); without
    it the memory BAR's area is the only one. Either way a 16-bit write of a queue's index to QUEUE_NOTIFY
    notifies that queue."""
    for pio in (True, False):
        mem, dev, pci = make(dev=VirtioRnd())
        pci = T.VirtioPciDevice(VirtioRnd(), mem, pio_notify=pio)
        caps = PC.walk_capabilities(lambda o: pci.cfgread(o, 1))
        bars = [pci.cfgread(off + 4, 1) for cid, off in caps if cid == 9 and pci.cfgread(off + 3, 1) == 2]
        assert bars == ([T.LEGACY_BAR, T.MODERN_BAR] if pio else [T.MODERN_BAR])
    notified = []
    mem, dev, pci = make()
    pci.vdev.queue_notify = lambda qidx, q: notified.append(qidx)
    for q in pci.queues:
        q.ready = True
    pci.barwrite(T.LEGACY_BAR, T.VIRTIO_PCI_QUEUE_NOTIFY, 2, 1)
    assert notified == [1]


def test_layouts_round_trip():
    raw = bytes(range(56))
    assert T.COMMON_CFG.build(T.COMMON_CFG.parse(raw)) == raw
    assert T.LEGACY_HEADER.sizeof() == 24
    assert T.VIRTIO_PCI_CAP.sizeof() == 16 and T.VIRTIO_PCI_NOTIFY_CAP.sizeof() == 20
    assert [T._COMMON_FIELDS[n][0] for n in ("msix_config", "device_status", "queue_select", "queue_desc",
                                              "queue_device")] == [16, 20, 22, 32, 48]


@pytest.mark.parametrize("modern", [False, True])
@pytest.mark.parametrize("msix", [False, True])
def test_echo_round_trip_and_interrupts(modern, msix):
    mem, dev, pci = make()
    drv = PciDriver(pci, mem, modern=modern)
    feats = drv.init(msix=msix)
    assert feats is not None
    assert dev.applied[-1] & (1 << 3)
    assert bool(dev.applied[-1] >> VIRTIO_F_VERSION_1 & 1) == modern
    assert dev.ok == 1
    q = drv.queues[0]
    src = drv.alloc.put(b"hello virtio")
    dst = drv.alloc.alloc(32)
    head = q.add(out=[(src, 12)], inn=[(dst, 32)])
    drv.notify(0)
    assert q.get_used() == [(head, 12)]
    assert drv.alloc.read(dst, 12) == b"hello virtio"
    if msix:
        assert drv.msix_vectors() == [1]       # queue 0 -> vector 1
        assert drv.isr() == 0 and not drv.intx.level
    else:
        assert drv.intx.level
        assert drv.isr() == 1
        assert not drv.intx.level and drv.isr() == 0
    # config space at 20 / 24 (legacy) or in the BAR (modern)
    assert drv.config_bytes(8) == b"ABCDEFGH"
    drv.config_write(2, 2, 0x7A79)
    assert drv.config_bytes(4) == b"AByz"


def test_msi_single_vector_mode():
    mem, dev, pci = make(single_vector=True)
    read8 = lambda o: pci.cfgread(o, 1)  # noqa: E731
    assert PC.find_capability(read8, PC.CAP_ID_MSIX) is None
    drv = PciDriver(pci, mem)
    drv.init()
    drv.enable_msi()
    q = drv.queues[1]
    q.add(out=[(drv.alloc.put(b"x"), 1)])
    drv.notify(1)
    assert drv.msis == [(0xFEE00000, 0x30)] and not drv.intx.level
    assert drv.isr() == 1


def test_msix_vector_out_of_range_reads_no_vector():
    mem, dev, pci = make()
    drv = PciDriver(pci, mem, modern=True)
    drv.init(msix=True)
    drv.cwrite("queue_select", 0)
    drv.cwrite("queue_msix_vector", 3)            # 3 vectors: 0..2
    assert drv.cread("queue_msix_vector") == T.NO_VECTOR
    drv.cwrite("msix_config", 2)
    assert drv.cread("msix_config") == 2
    q = drv.queues[0]
    q.add(out=[(drv.alloc.put(b"x"), 1)])
    drv.notify(0)                                  # NO_VECTOR: no interrupt at all
    assert drv.msis == [] and q.get_used()


def test_modern_feature_negotiation_refuses_bad_sets():
    mem, dev, pci = make()
    drv = PciDriver(pci, mem, modern=True)
    offered = drv.device_features()
    assert offered >> VIRTIO_F_VERSION_1 & 1 and not offered >> 24 & 1
    assert drv.init(want=offered & ~(1 << VIRTIO_F_VERSION_1)) is None     # no VERSION_1
    assert drv.init(want=offered | 1 << 40) is None                       # not offered
    assert drv.init(want=offered) == offered & ~(1 << 29)
    assert drv.status() & STATUS_FEATURES_OK
    # driver_feature is frozen after FEATURES_OK
    drv.cwrite("driver_feature_select", 0)
    drv.cwrite("driver_feature", 0)
    assert pci.driver_features & 0xFFFFFFFF


def test_legacy_host_features_hide_version_1():
    mem, dev, pci = make()
    drv = PciDriver(pci, mem)
    f = drv.device_features()
    assert f >> 24 & 1 and f >> 28 & 1 and f >> 29 & 1 and f & (1 << 3)
    drv.lwrite(T.VIRTIO_PCI_GUEST_FEATURES, 4, 0xFFFFFFFF)
    assert drv.lread(T.VIRTIO_PCI_GUEST_FEATURES, 4) == f
    assert drv.lread(T.VIRTIO_PCI_HOST_FEATURES, 2) == 0xFFFF      # wrong width: all-ones
    drv.lwrite(T.VIRTIO_PCI_QUEUE_SEL, 2, 7)
    assert drv.lread(T.VIRTIO_PCI_QUEUE_NUM, 2) == 0


def test_reset_clears_everything():
    mem, dev, pci = make()
    drv = PciDriver(pci, mem, modern=True)
    drv.init(msix=True)
    drv.set_status(0)
    assert dev.resets >= 2 and drv.status() == 0 and pci.negotiated == 0
    drv.cwrite("queue_select", 0)
    assert drv.cread("queue_enable") == 0 and drv.cread("queue_msix_vector") == T.NO_VECTOR
    assert drv.cread("queue_size") == 16


def test_modern_queue_size_and_addresses():
    mem, dev, pci = make()
    drv = PciDriver(pci, mem, modern=True)
    drv.init(queue_size=4)
    drv.cwrite("queue_select", 0)
    assert drv.cread("queue_size") == 4 and drv.cread("queue_enable") == 1
    desc = drv.cread("queue_desc")
    drv.cwrite("queue_desc", 0x1234000)            # ignored while enabled
    assert drv.cread("queue_desc") == desc
    q = drv.queues[0]
    for _ in range(3):
        src = drv.alloc.put(b"abc")
        dst = drv.alloc.alloc(3)
        q.add(out=[(src, 3)], inn=[(dst, 3)])
        drv.notify(0)
        assert q.get_used()[0][1] == 3


def test_bad_queue_size_sets_needs_reset_and_config_interrupt():
    mem, dev, pci = make()
    drv = PciDriver(pci, mem, modern=True)
    drv.init(msix=True, queues=1)
    drv.cwrite("queue_select", 1)
    drv.cwrite("queue_size", 3)                    # not a power of two
    drv.cwrite("queue_desc", 0x8000)
    drv.cwrite("queue_enable", 1)
    assert drv.status() & STATUS_DEVICE_NEEDS_RESET
    assert drv.msix_vectors() == [0]               # the config vector
    assert pci.errors
    drv.set_status(0)
    assert not drv.status() & STATUS_DEVICE_NEEDS_RESET


def test_legacy_pfn_outside_ram_needs_reset_with_intx_config_bit():
    mem, dev, pci = make()
    drv = PciDriver(pci, mem)
    drv.init(queues=1)
    drv.lwrite(T.VIRTIO_PCI_QUEUE_SEL, 2, 1)
    drv.lwrite(T.VIRTIO_PCI_QUEUE_PFN, 4, 0xFFFFF)
    assert drv.status() & STATUS_DEVICE_NEEDS_RESET
    assert drv.isr() == 2


def test_notify_of_disabled_or_unknown_queue_is_ignored():
    mem, dev, pci = make()
    drv = PciDriver(pci, mem, modern=True)
    drv.init(queues=1)
    drv.notify(1)
    pci.bar_access_write(T.MODERN_BAR, T.NOTIFY_OFF + 400, 2, 100)
    drv.lwrite(T.VIRTIO_PCI_QUEUE_NOTIFY, 2, 0xFFFF)
    assert not drv.status() & STATUS_DEVICE_NEEDS_RESET


def test_unused_bar_offsets_and_sizes_never_raise():
    mem, dev, pci = make()
    for bar in (0, 4):
        for off in range(0, 0x4100, 7):
            for size in (1, 2, 4, 8):
                pci.bar_access_read(bar, off, size)
                pci.bar_access_write(bar, off, size, 0)


def test_pci_cfg_capability_window():
    mem, dev, pci = make()
    caps = PC.walk_capabilities(lambda o: pci.cfgread(o, 1))
    off = [o for c, o in caps if c == 9 and pci.cfgread(o + 3, 1) == 5][0]
    pci.cfgwrite(off + 4, 1, 4)
    pci.cfgwrite(off + 8, 4, T.COMMON_OFF + 18)    # num_queues
    pci.cfgwrite(off + 12, 4, 2)
    assert pci.cfgread(off + 16, 4) == 2
    pci.cfgwrite(off + 8, 4, T.COMMON_OFF + 22)    # queue_select through the window
    pci.cfgwrite(off + 16, 4, 1)
    assert pci.queue_sel == 1


def test_read_le_past_end():
    assert read_le(b"\x01\x02", 0, 4) == 0xFFFF0201
    assert read_le(b"", -1, 2) == 0xFFFF
