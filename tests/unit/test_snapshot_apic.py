"""Snapshot / restore (issue 23) of the interrupt controllers: ApicBus, vioapic, vatpic (the vlapic and its timer:
``test_snapshot_vlapic.py``, which shares this file's ``T0``, ``SHIFT`` and ``through_json``).

Each test drives a device through its guest interface, saves it, sends the state through JSON, restores it into a
fresh device on a clock ``SHIFT`` ns later and then runs both side by side: every register must read the same at
the same guest-relative time and every later interrupt, EOI and timer expiry must happen the same way, the
restored one's ``SHIFT`` ns later.
"""

import json

import pytest

from bhyve_devices import vioapic as IO
from bhyve_devices import vlapic_regs as R
from bhyve_devices.apicbus import ApicBus
from bhyve_devices.base import ManualTimers
from bhyve_devices.snapshot import SnapshotError, Snapshottable
from bhyve_devices.vatpic import Vatpic
from bhyve_devices.vioapic import Vioapic
from bhyve_devices.vlapic import Vlapic

T0 = 5_000_000_123
SHIFT = 987_654_321_000


def through_json(state):
    return json.loads(json.dumps(state))


def test_devices_are_snapshottable():
    t = ManualTimers()
    for dev in (Vlapic(0, t), ApicBus(), Vioapic(lambda *a: None), Vatpic()):
        assert isinstance(dev, Snapshottable)
        assert dev.snapshot()["device"] == type(dev).__name__


# -- ApicBus ------------------------------------------------------------------------------------------------

def test_apicbus_wait_for_sipi_and_round_robin():
    t = ManualTimers(start_ns=T0)
    sipis = []
    bus = ApicBus(on_sipi=lambda *a: sipis.append(a))
    vs = [Vlapic(i, t, bus) for i in range(4)]
    for v in vs:
        v.write(R.SVR, 4, 0x1FF)
    vs[0].write(R.ICR_HI, 4, 1 << 24)
    vs[0].write(R.ICR_LO, 4, 0x4600 | 0x9A)                        # SIPI to APIC 1: it leaves wait-for-SIPI
    bus.deliver_intr(0xFF, True, R.DELMODE_LOWPRI, 0x40, False)     # moves the round-robin pointer
    state = through_json(bus.snapshot())
    assert state["wait_sipi"] == [2, 3]

    sipis2 = []
    bus2 = ApicBus(on_sipi=lambda *a: sipis2.append(a))
    vs2 = [Vlapic(i, ManualTimers(start_ns=T0 + SHIFT), bus2) for i in range(4)]
    for v, w in zip(vs, vs2):
        w.restore(through_json(v.snapshot()), SHIFT)
    bus2.restore(state, SHIFT)
    assert [bus2.waiting_for_sipi(i) for i in range(4)] == [bus.waiting_for_sipi(i) for i in range(4)]
    for b, vl in ((bus, vs), (bus2, vs2)):
        for _ in range(3):
            b.deliver_intr(0xFF, True, R.DELMODE_LOWPRI, 0x41, False)
        vl[0].write(R.ICR_LO, 4, (R.SHORTHAND_ALL_EXCL << R.ICR_SHORTHAND_SHIFT) | 0x4600 | 0x9B)
    assert [v.irr for v in vs] == [w.irr for w in vs2]
    assert sipis2 == sipis[1:]

    for change in (lambda s: s.pop("rr"), lambda s: s.update(wait_sipi=[-1]), lambda s: s.update(version=0),
                   lambda s: s.update(device="Vlapic"), lambda s: s.update(rr="1")):
        s = through_json(state)
        change(s)
        with pytest.raises(SnapshotError):
            ApicBus().restore(s, 0)


# -- vioapic ------------------------------------------------------------------------------------------------

def wreg(io, index, value):
    io.write(IO.IOREGSEL, 4, index)
    io.write(IO.IOWIN, 4, value)


def ioapic_regs(io):
    sel = io.read(IO.IOREGSEL, 4)
    regs = {}
    for index in [0, 1, 2] + list(range(0x10, 0x10 + 2 * io.pins)):
        io.write(IO.IOREGSEL, 4, index)
        regs[index] = io.read(IO.IOWIN, 4)
    io.write(IO.IOREGSEL, 4, sel)
    return sel, regs, [io.remote_irr(p) for p in range(io.pins)], io.levels


def test_vioapic_table_levels_and_remote_irr_survive():
    sent = []
    io = Vioapic(lambda *a: sent.append(a))
    wreg(io, 0, 0x0A000000)
    wreg(io, 0x11 + 2 * 1, 1 << 24)
    wreg(io, 0x10 + 2 * 1, 0x31)                                    # pin 1: edge, to APIC 1
    wreg(io, 0x11 + 2 * 9, 3 << 24)
    wreg(io, 0x10 + 2 * 9, IO.RTE_TRIGGER_LEVEL | IO.RTE_DESTMODE | 0x139)   # pin 9: level, logical, lowest
    wreg(io, 0x10 + 2 * 10, IO.RTE_MASKED | IO.RTE_TRIGGER_LEVEL | IO.RTE_POLARITY | 0x3A)
    io.set_pin_level(9, True)                                       # delivered: remote IRR set
    io.set_pin_level(10, True)                                      # masked: waits
    io.set_pin_level(4, True)                                       # masked edge pin, held high
    io.write(IO.IOREGSEL, 4, 0x23)
    assert io.remote_irr(9) and len(sent) == 1
    state = through_json(io.snapshot())

    sent2 = []
    io2 = Vioapic(lambda *a: sent2.append(a))
    io2.restore(state, SHIFT)
    sent2[:0] = sent
    assert ioapic_regs(io2) == ioapic_regs(io)
    for dev in (io, io2):
        dev.eoi(0x39)                                               # pin 9 still asserted: again
        dev.pulse_pin(1)
        wreg(dev, 0x10 + 2 * 10, IO.RTE_TRIGGER_LEVEL | 0x3A)      # unmasking the asserted level pin delivers
        dev.set_pin_level(9, False)
        dev.write(IO.IOEOI, 4, 0x39)                                # directed EOI: pin 9 is low now
        dev.set_pin_level(9, True)
    assert sent2 == sent and len(sent) == 5
    assert ioapic_regs(io2) == ioapic_regs(io)

    for change in (lambda s: s.pop("levels"), lambda s: s.update(version=9), lambda s: s.update(device="Vatpic"),
                   lambda s: s.update(redir=s["redir"][:8]), lambda s: s.update(regsel=0x100),
                   lambda s: s.update(levels=1 << 24), lambda s: s["redir"].__setitem__(0, 1 << 40),
                   lambda s: s.update(id=0x10000000), lambda s: s.update(levels=True)):
        s = through_json(state)
        change(s)
        with pytest.raises(SnapshotError):
            Vioapic(lambda *a: None).restore(s, 0)


# -- vatpic -------------------------------------------------------------------------------------------------

def outb(dev, off, val):
    dev.write(off, 1, val)


def inb(dev, off):
    return dev.read(off, 1)


def pic_init(pic, slave_icw=4):
    """Linux's init_8259A with AEOI on the slave; the slave's sequence stops after ``slave_icw`` words."""
    m, s = pic.master, pic.slave
    for dev, val in ((m, 0x11), (m, 0x20), (m, 4), (m, 1)):
        outb(dev, 1 if val != 0x11 else 0, val)
    for dev, val in list(((s, 0x11), (s, 0x28), (s, 2), (s, 3)))[:slave_icw]:
        outb(dev, 1 if val != 0x11 else 0, val)


def pic_regs(pic):
    """What the guest can read without side effects: IMRs, the selected IRR/ISR (no poll pending), ELCR, INT."""
    m, s = pic.master, pic.slave
    return ([inb(d, 1) for d in (m, s)], [None if d.poll else inb(d, 0) for d in (m, s)],
            pic.elcr.read(0, 2), pic.intr_level, pic.pending())


def busy_pic():
    line = []
    pic = Vatpic(line.append)
    pic_init(pic)
    m, s = pic.master, pic.slave
    pic.elcr.write(0, 2, 0x0600)                                    # IRQ 9 and 10 level
    outb(m, 1, 0xE0)                                                # IRQ 0-4 unmasked (and the cascade)
    outb(s, 1, 0xF8)                                                # IRQ 8-10 unmasked
    outb(m, 0, 0xC2)                                                # set priority: IRQ2 lowest, IRQ3 highest
    pic.set_irq_level(9, True)
    pic.pulse_irq(3)
    pic.pulse_irq(1)
    assert pic.intr_accepted() == 0x23                              # rotated priority: 3 before 1
    pic.set_irq_level(4, True)                                      # an edge IRQ whose line stays high
    pic.set_irq_level(10, True)
    outb(m, 0, 0x0B)                                                # OCW3: read ISR
    outb(s, 0, 0x68)                                                # OCW3: special mask mode on
    return pic, line


def test_vatpic_state_and_interrupt_order_survive():
    pic, line = busy_pic()
    state = through_json(pic.snapshot())
    line2 = []
    pic2 = Vatpic(line2.append)
    pic2.restore(state, SHIFT)
    assert pic2.snapshot() == state
    assert pic_regs(pic2) == pic_regs(pic)
    line2[:0] = line
    for p in (pic, pic2):
        got = []
        outb(p.master, 0, 0x20)                                     # EOI of the IRQ3 in service
        while p.pending() is not None:
            got.append(p.intr_accepted())
            if got[-1] >= 0x28:                                     # the slave is in AEOI mode
                p.set_irq_level(got[-1] - 0x28 + 8, False)
            outb(p.master, 0, 0x20)
            got.append(pic_regs(p))
        p.set_irq_level(4, True)                                    # still high: no new edge
        p.pulse_irq(0)
        got.append(p.intr_accepted())
        p.slave.write(0, 1, 0x0C)                                   # poll the slave
        got.append(inb(p.slave, 0))
        p.elcr.write(0, 2, 0)
        got.append(pic_regs(p))
        p._got = got
    assert pic2._got == pic._got and line2 == line
    assert pic._got[0:8:2] == [0x24, 0x21, 0x29, 0x2A] and pic._got[8] == 0x20


def test_vatpic_mid_icw_sequence_and_poll_survive():
    pic = Vatpic()
    pic_init(pic, slave_icw=2)                                      # the slave waits for ICW3 and ICW4
    outb(pic.master, 1, 0xFA)                                       # IRQ0 and the cascade unmasked
    outb(pic.master, 0, 0x0C)                                       # poll command pending on the master
    pic.pulse_irq(0)
    pic2 = Vatpic()
    pic2.restore(through_json(pic.snapshot()), SHIFT)
    assert pic2.intr_level is pic.intr_level is True                # INT is up for the polled IRQ0
    for p in (pic, pic2):
        p._got = [inb(p.master, 0), p.slave.ready, p.intr_level]    # the poll read acknowledges IRQ0
        outb(p.master, 0, 0x20)
        outb(p.slave, 1, 2)
        outb(p.slave, 1, 1)
        outb(p.slave, 1, 0xFE)
        p.pulse_irq(8)
        p._got += [p.slave.ready, p.intr_accepted(), pic_regs(p)]
    assert pic2._got == pic._got and pic._got[:5] == [0x80, False, False, True, 0x28]


def test_vatpic_bad_states():
    pic, _ = busy_pic()
    good = through_json(pic.snapshot())
    for change in (lambda s: s.update(version=2), lambda s: s.update(device="Pic8259"), lambda s: s.pop("intr"),
                   lambda s: s["master"].pop("imr"), lambda s: s["slave"].update(irr=0x100),
                   lambda s: s["slave"].update(elcr=0x01), lambda s: s["master"].update(init_state=4),
                   lambda s: s["master"].update(priority_add=8), lambda s: s["master"].update(aeoi=1),
                   lambda s: s["slave"].update(base=0x29), lambda s: s.update(slave=None),
                   lambda s: s.update(intr=0)):
        s = through_json(good)
        change(s)
        p = Vatpic()
        before = p.snapshot()
        with pytest.raises(SnapshotError):
            p.restore(s, 0)
        assert p.snapshot() == before                               # nothing half-restored
