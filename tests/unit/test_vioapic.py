"""vioapic: registers, construct layouts, edge and level pins, remote IRR, EOI, end-to-end with vlapic."""

from hypothesis import given, settings, strategies as st

from bhyve_devices import vioapic as IO
from bhyve_devices import vlapic_regs as R
from bhyve_devices.apicbus import ApicBus
from bhyve_devices.base import ManualTimers
from bhyve_devices.vioapic import Vioapic
from bhyve_devices.vlapic import Vlapic


def make():
    sent = []
    io = Vioapic(lambda *a: sent.append(a))
    return io, sent


def wreg(io, index, value):
    io.write(IO.IOREGSEL, 4, index)
    io.write(IO.IOWIN, 4, value)


def rreg(io, index):
    io.write(IO.IOREGSEL, 4, index)
    return io.read(IO.IOWIN, 4)


def program(io, pin, lo, dest=0):
    wreg(io, 0x11 + 2 * pin, dest << 24)
    wreg(io, 0x10 + 2 * pin, lo)


def test_id_ver_arb_and_regsel():
    io, _ = make()
    assert rreg(io, 1) == 0x00170020
    wreg(io, 0, 0xFFFFFFFF)
    assert rreg(io, 0) == 0x0F000000 and rreg(io, 2) == 0x0F000000
    io.write(IO.IOREGSEL, 4, 0x12)
    assert io.read(IO.IOREGSEL, 4) == 0x12
    assert rreg(io, 0x50) == 0                                    # beyond the table


def test_redirection_reset_and_writable_bits():
    io, _ = make()
    for pin in range(24):
        assert rreg(io, 0x10 + 2 * pin) == IO.RTE_MASKED and rreg(io, 0x11 + 2 * pin) == 0
    wreg(io, 0x10 + 2 * 5, 0xFFFFFFFF)
    assert rreg(io, 0x10 + 2 * 5) == 0x0001AFFF                   # delivery status and remote IRR are RO
    wreg(io, 0x11 + 2 * 5, 0xFFFFFFFF)
    assert rreg(io, 0x11 + 2 * 5) == 0xFF000000


def test_construct_layouts():
    assert IO.IOAPIC_MMIO.sizeof() == 0x50
    raw = IO.IOAPIC_MMIO.build(dict(ioregsel=0x12, iowin=0xAABBCCDD, eoi=0x31))
    assert raw[0] == 0x12 and raw[0x10:0x14] == bytes.fromhex("ddccbbaa") and raw[0x40] == 0x31
    assert IO.IOAPIC_MMIO.build(IO.IOAPIC_MMIO.parse(raw)) == raw
    entry = (0x7 << 56) | IO.RTE_MASKED | IO.RTE_TRIGGER_LEVEL | IO.RTE_REMOTE_IRR | IO.RTE_DESTMODE | (1 << 8) | 0x39
    f = IO.REDIR_ENTRY.parse(entry.to_bytes(8, "little"))
    assert (f.dest, f.masked, f.trigger_level, f.remote_irr, f.active_low, f.delivs, f.logical, f.delmode,
            f.vector) == (7, True, True, True, False, False, True, 1, 0x39)
    assert IO.REDIR_ENTRY.build(f) == entry.to_bytes(8, "little")
    io, _ = make()
    program(io, 3, 0x0000A839, dest=7)
    assert IO.REDIR_ENTRY.parse(io.redir[3].to_bytes(8, "little")).vector == 0x39


def test_edge_pin():
    io, sent = make()
    program(io, 4, 0x34, dest=1)
    io.pulse_pin(4)
    assert sent == [(1, True, 0, 0x34, False)]
    io.set_pin_level(4, True)
    io.set_pin_level(4, True)                                     # no new edge
    assert len(sent) == 2
    io.set_pin_level(4, False)
    program(io, 4, IO.RTE_MASKED | 0x34, dest=1)
    io.pulse_pin(4)                                               # lost while masked
    program(io, 4, 0x34, dest=1)
    assert len(sent) == 2


def test_logical_and_lowest_priority_fields():
    io, sent = make()
    program(io, 2, IO.RTE_DESTMODE | (1 << 8) | 0x44, dest=0x0F)
    io.pulse_pin(2)
    assert sent == [(0x0F, False, 1, 0x44, False)]


def test_level_pin_remote_irr_and_eoi():
    io, sent = make()
    program(io, 9, IO.RTE_TRIGGER_LEVEL | IO.RTE_POLARITY | 0x59, dest=0)
    io.set_pin_level(9, True)
    assert sent == [(0, True, 0, 0x59, True)] and io.remote_irr(9)
    io.set_pin_level(9, True)
    assert len(sent) == 1                                         # remote IRR blocks
    io.eoi(0x58)                                                  # other vector
    assert len(sent) == 1 and io.remote_irr(9)
    io.eoi(0x59)                                                  # still asserted: delivered again
    assert len(sent) == 2 and io.remote_irr(9)
    io.set_pin_level(9, False)
    io.write(IO.IOEOI, 4, 0x59)                                   # EOI register (version 0x20)
    assert len(sent) == 2 and not io.remote_irr(9)
    assert rreg(io, 0x10 + 18) & IO.RTE_POLARITY


def test_unmask_asserted_level_delivers_and_edge_switch_clears_remote_irr():
    io, sent = make()
    program(io, 10, IO.RTE_MASKED | IO.RTE_TRIGGER_LEVEL | 0x60)
    io.set_pin_level(10, True)
    assert sent == []
    program(io, 10, IO.RTE_TRIGGER_LEVEL | 0x60)
    assert len(sent) == 1 and io.remote_irr(10)
    program(io, 10, IO.RTE_MASKED | 0x60)                         # Linux's pre-0x20 remote IRR clear
    assert not io.remote_irr(10)
    program(io, 10, IO.RTE_TRIGGER_LEVEL | 0x60)
    assert len(sent) == 2


def test_pins_out_of_range_ignored():
    io, sent = make()
    io.set_pin_level(24, True)
    io.pulse_pin(-1)
    assert sent == []


def test_end_to_end_with_vlapic():
    bus = ApicBus()
    io = Vioapic(bus.deliver_intr)
    v = Vlapic(0, ManualTimers(), bus, eoi_level=io.eoi)
    v.write(R.SVR, 4, 0x1FF)
    program(io, 11, IO.RTE_TRIGGER_LEVEL | 0x71, dest=0)
    io.set_pin_level(11, True)
    assert v.pending_intr() == 0x71
    assert v.read(R.TMR0 + 0x30, 4) == 1 << 17
    v.intr_accepted(0x71)
    v.write(R.EOI, 4, 0)                                          # still asserted: comes back
    assert io.remote_irr(11) and v.pending_intr() == 0x71
    v.intr_accepted(0x71)
    io.set_pin_level(11, False)                                   # the device was serviced
    v.write(R.EOI, 4, 0)
    assert not io.remote_irr(11) and v.pending_intr() is None


@settings(max_examples=300, deadline=None)
@given(ops=st.lists(st.tuples(st.integers(0, 0xFFF), st.sampled_from([1, 2, 4, 8]), st.integers(0, 2**64 - 1),
                              st.integers(0, 3), st.integers(-2, 30)), max_size=50))
def test_never_raises(ops):
    io, sent = make()
    for off, size, val, kind, pin in ops:
        val &= (1 << (8 * size)) - 1
        if kind == 0:
            io.write(off, size, val)
        elif kind == 1:
            assert 0 <= io.read(off, size) < 1 << (8 * size)
        elif kind == 2:
            io.set_pin_level(pin, val & 1)
        else:
            io.eoi(val)


def _bus_with(n):
    bus = ApicBus()
    io = Vioapic(bus.deliver_intr)
    vs = [Vlapic(i, ManualTimers(), bus, eoi_level=io.eoi) for i in range(n)]
    for v in vs:
        v.write(R.SVR, 4, 0x1FF)
    return bus, io, vs


def test_pulse_pin_reports_an_edge_merged_in_the_destination_irr():
    bus, io, (v,) = _bus_with(1)
    program(io, 2, 0x30, dest=0)                                  # IRQ0's pin: fixed, edge
    assert io.pulse_pin(2) is False                               # newly requested
    assert io.pulse_pin(2) is True                                # 0x30 still in the IRR: merged
    v.intr_accepted(0x30)                                         # the vCPU took it
    assert io.pulse_pin(2) is False
    program(io, 2, IO.RTE_MASKED | 0x30, dest=0)
    assert io.pulse_pin(2) is None                                # masked: lost, goes to no local APIC
    assert io.pulse_pin(24) is None and io.pulse_pin(-1) is None
    program(io, 2, 0x30, dest=5)                                  # no such APIC: reached nobody, not merged
    assert io.pulse_pin(2) is False


def test_pulse_pin_merged_only_when_every_destination_had_it():
    bus, io, (v0, v1) = _bus_with(2)
    program(io, 4, 0x50, dest=0xFF)                               # broadcast, fixed
    assert io.pulse_pin(4) is False
    v1.intr_accepted(0x50)
    assert io.pulse_pin(4) is False                               # vCPU 1 got a new one
    assert io.pulse_pin(4) is True                                # both had it
    bus, io, (v0, v1) = _bus_with(2)
    program(io, 4, (1 << 8) | 0x51, dest=0xFF)                    # lowest priority: the one it picks counts
    assert io.pulse_pin(4) is False                               # one vCPU (round-robin among equals)
    assert io.pulse_pin(4) is False                               # the other: new there
    assert io.pulse_pin(4) is True                                # the first again, which still has it
    assert v0.irr >> 0x51 & 1 and v1.irr >> 0x51 & 1
    assert bus.deliver_intr(0xFF, True, R.DELMODE_NMI, 0, False).merged is False


def test_pulse_pin_with_a_deliver_that_reports_nothing():
    io, sent = make()
    program(io, 4, 0x34, dest=1)
    assert io.pulse_pin(4) is False and len(sent) == 1
