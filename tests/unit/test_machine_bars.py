"""BAR (un)mapping on the VM's buses as a guest's PCI code drives it (vmmshim.machine._bar_changed).

Linux sizes every BAR at boot: decoding off (Command), all-ones written to the BAR and read back, the old value
restored, decoding back on. The first Linux boot with a virtio device ended the VM there ("virtio-blk-bar0
overlaps virtio-blk-bar0"): the window was never unmapped because each ``bar_device`` call made a new object.
"""

from bhyve_devices.pci import config as C
from bhyve_devices.pci.device import IO, MEM32, PciDevice
from bhyve_devices.pci.host import PciHost
from vmmshim.bus import Bus
from vmmshim.machine import _bar_changed


class Dev(PciDevice):
    def __init__(self, name):
        super().__init__(name, 0x1AF4, 0x1000, 2, 0)
        self.alloc_bar(0, IO, 0x80)
        self.alloc_bar(1, MEM32, 0x1000)
        self.seen = []

    def barread(self, idx, off, size):
        return 0x40 + idx

    def barwrite(self, idx, off, size, value):
        self.seen.append((idx, off, value))


class FakeVm:
    def __init__(self):
        self.pio, self.mmio, self.logged = Bus("port", is_port_bus=True), Bus("mmio"), []
        self.bar_keys, self.bells = {}, set()     # the doorbells registered: (address, pio, size, match)

    def bar_mapped(self, window, dev, idx, base, pio, name=None):
        keys = [(base + off, pio, size, match) for off, size, match, _ in dev.doorbells(idx)]
        self.bells.update(keys)
        self.bar_keys[window] = keys

    def bar_unmapped(self, window):
        for k in self.bar_keys.pop(window, ()):
            self.bells.remove(k)

    def log(self, msg):
        self.logged.append(msg)


def setup(n=1):
    vm = FakeVm()
    host = PciHost(bar_changed=lambda *a: _bar_changed(vm, *a))
    devs = [host.add(4 + i, 0, Dev(f"d{i}")) for i in range(n)]
    return vm, devs


def io_read(bus, port, size=1):
    data = bytearray(size)
    bus.io(port, True, memoryview(data))
    return int.from_bytes(data, "little")


class BellDev(Dev):
    def doorbells(self, idx):
        return [(0x10, 2, 1, lambda: None)] if idx == 0 else [(0x20, 0, None, lambda: None)]


def test_doorbells_follow_their_bar():
    vm = FakeVm()
    host = PciHost(bar_changed=lambda *a: _bar_changed(vm, *a))
    d = host.add(4, 0, BellDev("bell"))
    io, mem = d.bars[0].addr, d.bars[1].addr
    assert vm.bells == {(io + 0x10, True, 2, 1), (mem + 0x20, False, 0, None)}
    size_bar(d, 0)
    size_bar(d, 1, decode_off=False)                 # moved to all-ones and back: removed, then added again
    assert vm.bells == {(io + 0x10, True, 2, 1), (mem + 0x20, False, 0, None)}
    d.cfgwrite(C.BAR0 + 4, 4, mem + 0x10000)
    assert vm.bells == {(io + 0x10, True, 2, 1), (mem + 0x10020, False, 0, None)}
    d.cfgwrite(C.COMMAND, 2, d.cfgread(C.COMMAND, 2) & ~C.CMD_IO)
    assert vm.bells == {(mem + 0x10020, False, 0, None)}


def size_bar(dev, idx, decode_off=True):
    off = C.BAR0 + 4 * idx
    cmd = dev.cfgread(C.COMMAND, 2)
    if decode_off:
        dev.cfgwrite(C.COMMAND, 2, cmd & ~(C.CMD_IO | C.CMD_MEM))
    orig = dev.cfgread(off, 4)
    dev.cfgwrite(off, 4, 0xFFFFFFFF)
    got = dev.cfgread(off, 4)
    dev.cfgwrite(off, 4, orig)
    dev.cfgwrite(C.COMMAND, 2, cmd)
    return got


def test_linux_bar_sizing_keeps_the_bars_mapped_once():
    vm, (d,) = setup()
    io = d.bars[0].addr
    for _ in range(3):
        assert size_bar(d, 0) & 0xFFFF == 0xFF81
        assert size_bar(d, 1) == 0xFFFFF000
    assert [r for r in vm.pio.ranges() if r[2].startswith("d0")] == [(io, 0x80, "d0-bar0")]
    assert [r for r in vm.mmio.ranges() if r[2].startswith("d0")] == [(d.bars[1].addr, 0x1000, "d0-bar1")]
    assert io_read(vm.pio, io + 3) == 0x40
    assert vm.logged == []


def test_sizing_with_decoding_on_moves_and_returns():
    vm, (d,) = setup()
    io = d.bars[0].addr
    size_bar(d, 0, decode_off=False)
    assert vm.pio.ranges() == [(io, 0x80, "d0-bar0")]


def test_a_bar_moved_onto_another_device_is_left_unmapped_not_fatal():
    vm, (a, b) = setup(2)
    a_io, b_io = a.bars[0].addr, b.bars[0].addr
    b.cfgwrite(C.BAR0, 4, a_io | 1)                   # the guest puts b's BAR on top of a's
    assert vm.logged and "not mapped" in vm.logged[0]
    assert io_read(vm.pio, a_io) == 0x40 and vm.pio.lookup(a_io)[1] is a.bar_device(0)
    b.cfgwrite(C.BAR0, 4, b_io | 1)                   # and back
    assert vm.pio.lookup(b_io)[1] is b.bar_device(0)
    assert vm.pio.lookup(a_io)[1] is a.bar_device(0)


class RamVm:
    """A VM with lowmem [0, 1 MiB) and highmem [4 GiB, 4 GiB + 64 KiB); ``view`` counts calls, EFAULT outside."""

    def __init__(self):
        import errno
        self.errno = errno
        self.lowmem, self.highmem = 1 << 20, 1 << 16
        self.low, self.high = bytearray(self.lowmem), bytearray(self.highmem)
        self.calls = 0

    def view(self, gpa, size):
        self.calls += 1
        for start, buf in ((0, self.low), (4 << 30, self.high)):
            if start <= gpa and size >= 0 and gpa + size <= start + len(buf):
                return memoryview(buf)[gpa - start:gpa - start + size]
        raise OSError(self.errno.EFAULT, "outside guest RAM")


def test_guest_memory_views_slice_the_ram_areas_and_refuse_the_rest():
    import pytest
    from vmmshim.machine import _GuestMemory
    vm = RamVm()
    mem = _GuestMemory(vm)
    setup_calls = vm.calls
    mem.view(0x1000, 4)[:] = b"abcd"
    mem.view((4 << 30) + 16, 2)[:] = b"hi"
    assert bytes(vm.low[0x1000:0x1004]) == b"abcd" and bytes(vm.high[16:18]) == b"hi"
    assert len(mem.view(0, 1 << 20)) == 1 << 20 and vm.calls == setup_calls     # no call per descriptor
    for gpa, size in (((1 << 20) - 2, 4), (-4, 8), (3 << 30, 1), ((4 << 30) + (1 << 16), 1), (0x1000, -1)):
        with pytest.raises(OSError):
            mem.view(gpa, size)
