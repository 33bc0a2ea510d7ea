"""MP table: floating pointer and configuration table parsed back, checksums, entries per vCPU and PCI INTx."""

import pytest

from bhyve_devices.pci import registry
from bhyve_devices.pci.device import PciDevice
from bhyve_devices.pci.host import PciHost
from bhyve_devices.tables import mptable as M


class Blk(PciDevice):
    def __init__(self, pin=1):
        super().__init__("blk", 0x1AF4, 0x1001, 1, 0)
        self.lintr_request(pin)


def routes():
    host = PciHost()
    host.add(0, 0, registry.create("hostbridge"))
    host.add(31, 0, registry.create("lpc"))
    host.add(2, 0, Blk())
    host.add(4, 0, Blk())
    host.add(4, 1, Blk())          # shares slot 4 INTA#: one entry
    host.add(5, 0, Blk(2))
    return host.all_routes()


@pytest.mark.parametrize("ncpu", [1, 2, 4, 16])
def test_mptable_parses_back(ncpu):
    r = routes()
    (fpa, fp), (cta, ct) = M.build_mptable(ncpu, r)
    assert fpa == 0xF0000 and cta == 0xF0010 and fpa % 16 == 0
    assert len(fp) == 16 and sum(fp) % 256 == 0 and sum(ct) % 256 == 0
    f, h, ents = M.parse_mptable(fp, ct)
    assert f.config_table == cta and f.length == 1 and f.spec_rev == 4 and f.feature1 == 0
    assert h.base_length == len(ct) and h.spec_rev == 4 and h.lapic_address == 0xFEE00000
    assert h.entry_count == len(ents) and h.ext_length == 0
    types = [t for t, _ in ents]
    assert types == sorted(types)                     # processors, buses, IOAPIC, I/O ints, local ints
    procs = [e for t, e in ents if t == 0]
    assert [(p.apic_id, p.cpu_flags) for p in procs] == [(0, 3)] + [(i, 1) for i in range(1, ncpu)]
    buses = {e.bus_id: e.bus_type for t, e in ents if t == 1}
    assert buses == {0: b"PCI   ", 1: b"ISA   "}
    (io,) = [e for t, e in ents if t == 2]
    assert (io.apic_id, io.flags, io.address) == (ncpu, 1, 0xFEC00000)
    ioints = [e for t, e in ents if t == 3]
    isa = {e.dst_pin: e for e in ioints if e.src_bus == 1}
    assert sorted(isa) == list(range(16))
    assert isa[0].int_type == M.INT_TYPE_EXTINT and isa[2].src_irq == 0 and isa[2].int_type == 0
    assert all(isa[p].src_irq == p for p in range(3, 16)) and isa[9].flags == M.POL_HIGH | M.TRIG_LEVEL
    assert all(e.dst_apic == ncpu for e in ioints)
    pci = sorted((e.src_irq, e.dst_pin, e.flags) for e in ioints if e.src_bus == 0)
    assert pci == [(2 << 2 | 0, 18, 0xF), (4 << 2 | 0, 20, 0xF), (5 << 2 | 1, 22, 0xF)]
    lints = [(e.int_type, e.dst_apic, e.dst_lint) for t, e in ents if t == 4]
    assert lints == [(M.INT_TYPE_EXTINT, 0xFF, 0), (M.INT_TYPE_NMI, 0xFF, 1)]
    assert cta + len(ct) <= 0xF2400


def test_round_trip_and_limits():
    (_, fp), (_, ct) = M.build_mptable(2, [], ioapic_id=0)
    f, h, ents = M.parse_mptable(fp, ct)
    assert M.FLOATING_POINTER.build(f) == fp
    assert M.CONFIG_HEADER.build(h) == ct[:44]
    assert [e for t, e in ents if t == 2][0].apic_id == 0
    with pytest.raises(ValueError):
        M.build_mptable(0, [])
    with pytest.raises(ValueError):
        M.build_mptable(255, [])
