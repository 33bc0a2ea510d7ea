"""PciHost: mechanism 1 vs ECAM, absent functions, registry, BAR placement, INTx routing and PIRQ registers."""

import pytest

from bhyve_devices.pci import config as C
from bhyve_devices.pci import registry
from bhyve_devices.pci.device import IO, MEM32, MEM64, PciDevice
from bhyve_devices.pci.host import ECAM_BASE, PciHost
from bhyve_devices.pci.hostbridge import Hostbridge
from bhyve_devices.pci.lpc import Lpc


def conf1_read(host, bus, slot, func, off, size):
    host.conf1.write(0, 4, 0x80000000 | bus << 16 | slot << 11 | func << 8 | (off & 0xFC))
    return host.conf1.read(4 + (off & 3), size)


def ecam_read(host, bus, slot, func, off, size):
    return host.ecam.read(bus << 20 | slot << 15 | func << 12 | off, size)


class Nic(PciDevice):
    def __init__(self, opts=None):
        super().__init__("nic", 0x1AF4, 0x1000, 2, 0)
        self.lintr_request()
        self.alloc_bar(0, IO, 0x20)
        self.add_msix_cap(2, 1)


def platform(**kw):
    ev, lines = [], []
    host = PciHost(bar_changed=lambda dev, *a: ev.append((dev.name,) + a),
                   ioapic_irq=lambda p, lv: lines.append(("ioapic", p, lv)),
                   isa_irq=lambda i, lv: lines.append(("isa", i, lv)),
                   isa_level_trigger=lambda i: lines.append(("elcr", i)), **kw)
    host.add(0, 0, registry.create("hostbridge"))
    lpc = host.add(31, 0, registry.create("lpc"))
    nic = host.add(2, 0, Nic())
    return host, lpc, nic, ev, lines


def test_mechanism1_and_ecam_give_the_same_bytes():
    host, *_ = platform()
    for slot, func in ((0, 0), (2, 0), (31, 0), (5, 0), (2, 3)):
        for off in range(0, 256, 4):
            for size, sub in ((4, (0,)), (2, (0, 2)), (1, (0, 1, 2, 3))):
                for s in sub:
                    assert conf1_read(host, 0, slot, func, off + s, size) == \
                        ecam_read(host, 0, slot, func, off + s, size), (slot, func, off + s, size)


def test_absent_functions_and_disabled_mechanism_read_ones():
    host, *_ = platform()
    assert conf1_read(host, 0, 7, 0, 0, 4) == 0xFFFFFFFF
    assert conf1_read(host, 1, 0, 0, 0, 4) == 0xFFFFFFFF
    assert conf1_read(host, 0, 0, 1, 0, 2) == 0xFFFF
    assert ecam_read(host, 0, 9, 2, 0x100, 1) == 0xFF
    host.conf1.write(0, 4, 0 << 11)                    # enable bit clear
    assert host.conf1.read(4, 4) == 0xFFFFFFFF
    host.conf1.write(4, 4, 0x12345678)                 # dropped
    assert conf1_read(host, 0, 0, 0, 0, 4) == 0x12751275
    assert host.conf1.read(0, 2) == 0xFFFF             # CONFIG_ADDRESS wants dwords
    host.conf1.write(0, 4, 0xFFFFFFFF)
    assert host.conf1.read(0, 4) == 0x80FFFFFC
    assert ecam_read(host, 0, 0, 0, 0, 8) == 0x0000000012751275 | (ecam_read(host, 0, 0, 0, 4, 4) << 32)


def test_writes_through_both_mechanisms():
    host, lpc, nic, ev, _ = platform()
    host.conf1.write(0, 4, 0x80000000 | 2 << 11 | 0x3C)
    host.conf1.write(4, 1, 0x0A)
    assert nic.cfgread(0x3C, 1) == 0x0A
    host.ecam.write(2 << 15 | 0x3C, 1, 0x0B)
    assert nic.cfgread(0x3C, 1) == 0x0B
    host.ecam.write(31 << 15 | 0x60, 1, 0x0B)
    assert conf1_read(host, 0, 31, 0, 0x60, 1) == 0x0B


def test_conf1_ranges_leave_0xcf9_free():
    host = PciHost()
    ports = [(p, n) for p, n, _ in host.conf1_ranges()]
    assert ports == [(0xCF8, 1), (0xCFC, 4)]
    assert host.ecam_range()[:2] == (ECAM_BASE, 1 << 20)


def test_duplicate_and_bad_slots_refused():
    host = PciHost()
    host.add(0, 0, Hostbridge())
    with pytest.raises(ValueError):
        host.add(0, 0, Lpc())
    with pytest.raises(ValueError):
        host.add(32, 0, Lpc())
    with pytest.raises(ValueError):
        host.add(1, 8, Lpc())


def test_multifunction_bit():
    host = PciHost()
    host.add(3, 0, Hostbridge())
    assert conf1_read(host, 0, 3, 0, 0x0E, 1) == 0
    host.add(3, 1, Hostbridge())
    assert conf1_read(host, 0, 3, 0, 0x0E, 1) == 0x80 and conf1_read(host, 0, 3, 1, 0x0E, 1) == 0x80


def test_bar_placement_windows_and_decode():
    host, lpc, nic, ev, _ = platform(mem32_base=0x40000000)
    assert nic.bars[0].addr == 0x2000 and nic.bars[1].addr == 0x40000000
    assert nic.cfgread(4, 2) & (C.CMD_IO | C.CMD_MEM) == C.CMD_IO | C.CMD_MEM
    assert ("nic", 0, IO, 0x2000, 0x2000, 0x20, True) in ev and ("nic", 1, MEM32, 0x40000000, 0x40000000,
                                                                  0x2000, True) in ev

    class Gpu(PciDevice):
        def __init__(self):
            super().__init__("gpu", 1, 2, 3, 0)
            self.alloc_bar(0, MEM64, 64 << 20)          # large: the 64-bit window, prefetchable (bhyve)
            self.alloc_bar(2, MEM64, 0x1000)            # small: below 4 GiB
            self.alloc_bar(4, IO, 0x100)

    g = host.add(4, 0, Gpu())
    assert g.bars[0].addr == 0xD000000000 and g.bars[0].prefetch and g.cfgread(0x10, 4) & 0xF == 0xC
    assert g.bars[2].addr == 0x40002000 and g.cfgread(0x18, 4) == 0x40002004
    assert g.bars[4].addr == 0x2100 and g.bars[4].addr % 0x100 == 0
    late = g.alloc_bar(5, MEM32, 0x10)                  # after add: placed at once
    assert late == 0x10 and g.bars[5].addr == 0x40003000
    info = host.info()
    assert info.mem32_window == (0x40000000, 0xDFFFFFFF) and info.io_window == (0x2000, 0xFFFF)
    assert info.mem64_window == (0xD000000000, 0xFCFFFFFFFF) and info.slots == [(0, 0), (2, 0), (4, 0), (31, 0)]


def test_window_full():
    host = PciHost(mem32_base=0xDFFFF000)

    class Big(PciDevice):
        def __init__(self):
            super().__init__("big", 1, 2, 3, 0)
            self.alloc_bar(0, MEM32, 0x2000)

    with pytest.raises(ValueError):
        host.add(1, 0, Big())
    assert host.function(1, 0) is None


def test_intx_routing_swizzle_and_pirq_registers():
    host, lpc, nic, ev, lines = platform()
    r = host.route(nic)
    assert r == (2, 18, 5)                               # slot 2 INTA -> PIRQ C -> pin 18, first free ISA IRQ 5
    assert ("elcr", 5) in lines and nic.cfgread(0x3C, 1) == 5
    assert lpc.cfgread(0x62, 1) == 5 and lpc.cfgread(0x60, 1) == 0x80
    assert host.route(lpc) is None
    lines.clear()
    nic.lintr_assert()
    assert lines == [("ioapic", 18, True), ("isa", 5, True)]
    lines.clear()
    lpc.cfgwrite(0x62, 1, 0x0A)                          # guest re-routes an asserted PIRQ
    assert lines == [("isa", 5, False), ("isa", 10, True)] and host.route(nic) == (2, 18, 10)
    lines.clear()
    lpc.cfgwrite(0x62, 1, 0x80)
    assert lines == [("isa", 10, False)] and host.route(nic)[2] is None
    lines.clear()
    nic.lintr_deassert()
    assert lines == [("ioapic", 18, False)]


def test_shared_lines_are_wire_ored():
    host, lpc, nic, ev, lines = platform()

    class Blk(PciDevice):
        def __init__(self, pin):
            super().__init__("blk", 1, 2, 1, 0)
            self.lintr_request(pin)

    a = host.add(10, 0, Blk(1))                          # (10 + 0) % 8 = 2: PIRQ C like the nic
    b = host.add(9, 0, Blk(2))                           # (9 + 1) % 8 = 2 as well
    assert host.route(a)[:2] == host.route(b)[:2] == (2, 18)
    routes = host.all_routes()
    assert [(r.slot, r.pin, r.ioapic_pin) for r in routes] == [(2, 1, 18), (9, 2, 18), (10, 1, 18)]
    lines.clear()
    a.lintr_assert()
    nic.lintr_assert()
    a.lintr_deassert()
    assert lines == [("ioapic", 18, True), ("isa", 5, True)]
    nic.lintr_deassert()
    assert lines[-2:] == [("ioapic", 18, False), ("isa", 5, False)]
    c = host.add(3, 0, Blk(1))                           # PIRQ D: the next least-used ISA IRQ
    assert host.route(c) == (3, 19, 6)


def test_msix_through_host_msi_callback():
    sent = []
    host = PciHost(msi=lambda a, d: sent.append((a, d)))
    nic = host.add(2, 0, Nic())
    win = nic.bar_device(1)
    win.write(0, 4, 0xFEE00000)
    win.write(8, 4, 0x41)
    win.write(12, 4, 0)
    host.ecam.write(2 << 15 | nic._msix_off + 2, 2, C.MSIX_CTRL_ENABLE)
    nic.msi_notify(0)
    assert sent == [(0xFEE00000, 0x41)]


def test_registry():
    assert {"hostbridge", "amd_hostbridge", "lpc"} <= set(registry.names())
    assert registry.lookup("lpc") is Lpc
    assert registry.create("amd_hostbridge").cfgread(0, 4) == 0x74321022
    with pytest.raises(KeyError):
        registry.lookup("nonesuch")

    @registry.register("test-dummy")
    class Dummy(PciDevice):
        def __init__(self, opts=None):
            super().__init__("dummy", 1, 2, 0xFF, 0)
    assert registry.lookup("test-dummy") is Dummy and Dummy.emul_name == "test-dummy"
    with pytest.raises(ValueError):
        registry.register("test-dummy")(Lpc)


def test_lpc_legacy_devices():
    names = [d.name for d in Lpc().legacy_devices()]
    assert names == ["COM1", "COM2", "PIC", "TIMR", "RTC", "HPET"]
    com = Lpc({"uarts": ["com1"]}).legacy_devices()[0]
    assert (com.hid, com.io, com.irqs) == ("PNP0501", ((0x3F8, 8),), (4,))
