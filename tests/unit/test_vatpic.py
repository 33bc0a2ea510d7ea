"""vatpic: Linux's i8259 init sequence, IRQ0 as vector 0x20, cascade, EOIs, ELCR level, AEOI, rotation, poll,
special mask, special fully nested, spurious IR7, construct command words."""

from hypothesis import given, settings, strategies as st

from bhyve_devices import vatpic as P
from bhyve_devices.vatpic import Vatpic


def outb(dev, off, val):
    dev.write(off, 1, val)


def inb(dev, off):
    return dev.read(off, 1)


def linux_init(auto_eoi=False):
    """What arch/x86/kernel/i8259.c does: probe, init_8259A(), then restore the cached masks."""
    line = []
    pic = Vatpic(line.append)
    m, s = pic.master, pic.slave
    outb(s, 1, 0xFF)                     # probe_8259A
    outb(m, 1, 0xFB)
    assert inb(m, 1) == 0xFB
    outb(m, 1, 0xFF)                     # init_8259A: mask all
    outb(s, 1, 0xFF)
    outb(m, 0, 0x11)                     # ICW1: edge, cascade, ICW4
    outb(m, 1, 0x20)                     # ICW2: vectors 0x20-0x27
    outb(m, 1, 1 << 2)                   # ICW3: slave on IR2
    outb(m, 1, 0x03 if auto_eoi else 0x01)   # ICW4: 8086 mode (AEOI)
    outb(s, 0, 0x11)
    outb(s, 1, 0x28)
    outb(s, 1, 2)
    outb(s, 1, 0x01)
    outb(m, 1, 0xFB)                     # cached masks: everything but the cascade
    outb(s, 1, 0xFF)
    return pic, line


def unmask(pic, irq):
    dev = pic.master if irq < 8 else pic.slave
    outb(dev, 1, inb(dev, 1) & ~(1 << (irq & 7)))


def linux_ack(pic, irq):
    """mask_and_ack_8259A: specific EOI (to the slave first for IRQ 8-15)."""
    if irq >= 8:
        outb(pic.slave, 0, 0x60 + (irq & 7))
        outb(pic.master, 0, 0x62)
    else:
        outb(pic.master, 0, 0x60 + irq)


def read_isr(dev):
    outb(dev, 0, 0x0B)
    v = inb(dev, 0)
    outb(dev, 0, 0x0A)
    return v


def test_linux_init_and_irq0_is_vector_0x20():
    pic, line = linux_init()
    assert pic.master.ready and pic.slave.ready and pic.master.base == 0x20 and pic.slave.base == 0x28
    pic.pulse_irq(0)
    assert line == [] and pic.pending() is None           # still masked
    unmask(pic, 0)
    assert line == [True] and pic.pending() == 0x20        # the latched edge shows once unmasked
    assert pic.intr_accepted() == 0x20
    assert line == [True, False]
    assert read_isr(pic.master) == 1 and inb(pic.master, 0) == 0   # IRR read back after OCW3 0x0A
    linux_ack(pic, 0)
    assert read_isr(pic.master) == 0
    pic.pulse_irq(0)
    assert pic.intr_accepted() == 0x20 and line == [True, False, True, False]


def test_no_output_before_init():
    line = []
    pic = Vatpic(line.append)
    pic.pulse_irq(0)
    assert line == [] and pic.pending() is None
    assert pic.intr_accepted() == 7                        # spurious, base 0


def test_fixed_priority_and_nesting():
    pic, line = linux_init()
    for irq in (1, 3, 0):
        unmask(pic, irq)
    pic.pulse_irq(3)
    assert pic.intr_accepted() == 0x23
    pic.pulse_irq(1)
    assert pic.pending() == 0x21                            # higher priority nests over IRQ3
    pic.pulse_irq(0)
    assert pic.intr_accepted() == 0x20
    assert pic.pending() is None                            # IRQ1 below the in-service IRQ0
    outb(pic.master, 0, 0x20)                               # non-specific EOI: clears IRQ0
    assert read_isr(pic.master) == 0x08
    assert pic.intr_accepted() == 0x21
    outb(pic.master, 0, 0x20)
    outb(pic.master, 0, 0x20)
    assert read_isr(pic.master) == 0


def test_slave_cascade():
    pic, line = linux_init()
    unmask(pic, 12)
    pic.pulse_irq(12)
    assert line == [True] and pic.pending() == 0x2C
    assert pic.intr_accepted() == 0x2C
    assert read_isr(pic.master) == 0x04 and read_isr(pic.slave) == 0x10
    pic.pulse_irq(12)
    assert pic.pending() is None                            # cascade in service on the master
    linux_ack(pic, 12)
    assert pic.intr_accepted() == 0x2C


def test_spurious_irq7():
    pic, line = linux_init()
    unmask(pic, 4)
    outb(pic.elcr, 0, 0x10)                                 # IRQ4 level
    pic.set_irq_level(4, True)
    assert line == [True]
    pic.set_irq_level(4, False)                             # gone before INTA
    assert pic.intr_accepted() == 0x27 and read_isr(pic.master) == 0


def test_elcr_level_and_masks():
    pic, line = linux_init()
    pic.elcr.write(0, 2, 0xFFFF)
    assert pic.elcr.read(0, 2) == 0xDEF8
    pic.elcr.write(0, 1, 0)
    outb(pic.elcr, 1, 0x02)                                 # IRQ9 level
    assert inb(pic.elcr, 1) == 0x02
    unmask(pic, 9)
    pic.set_irq_level(9, True)
    assert pic.intr_accepted() == 0x29
    linux_ack(pic, 9)
    assert pic.pending() == 0x29                            # still asserted
    assert pic.intr_accepted() == 0x29
    pic.set_irq_level(9, False)
    linux_ack(pic, 9)
    assert pic.pending() is None


def test_edge_needs_a_new_rising_edge():
    pic, line = linux_init()
    unmask(pic, 1)
    pic.set_irq_level(1, True)
    assert pic.intr_accepted() == 0x21
    linux_ack(pic, 1)
    pic.set_irq_level(1, True)
    assert pic.pending() is None
    pic.set_irq_level(1, False)
    pic.set_irq_level(1, True)
    assert pic.pending() == 0x21


def test_auto_eoi_and_rotate_in_aeoi():
    pic, line = linux_init(auto_eoi=True)
    unmask(pic, 0)
    unmask(pic, 5)
    pic.pulse_irq(0)
    assert pic.intr_accepted() == 0x20 and read_isr(pic.master) == 0
    outb(pic.master, 0, 0x80)                               # rotate in AEOI mode
    pic.pulse_irq(0)
    assert pic.intr_accepted() == 0x20                      # IRQ0 now lowest priority
    pic.pulse_irq(0)
    pic.pulse_irq(5)
    assert pic.intr_accepted() == 0x25


def test_rotate_on_eoi_and_set_priority():
    pic, line = linux_init()
    outb(pic.master, 1, 0x00)
    pic.pulse_irq(0)
    assert pic.intr_accepted() == 0x20
    outb(pic.master, 0, 0xA0)                               # rotate on non-specific EOI
    pic.pulse_irq(0)
    pic.pulse_irq(5)
    assert pic.intr_accepted() == 0x25
    outb(pic.master, 0, 0xE5)                               # rotate on specific EOI 5: IRQ6 highest
    pic.pulse_irq(6)
    assert pic.intr_accepted() == 0x26
    outb(pic.master, 0, 0x66)
    outb(pic.master, 0, 0xC3)                               # set priority: IRQ3 lowest, IRQ4 highest
    pic.pulse_irq(4)
    assert pic.intr_accepted() == 0x24                      # above the pending IRQ0


def test_poll_mode():
    pic, line = linux_init()
    unmask(pic, 3)
    pic.pulse_irq(3)
    outb(pic.master, 0, 0x0C)
    assert inb(pic.master, 0) == 0x83
    assert read_isr(pic.master) == 0x08
    outb(pic.master, 0, 0x0C)
    assert inb(pic.master, 0) == 0x00


def test_special_mask_mode():
    pic, line = linux_init()
    outb(pic.master, 1, 0x00)
    pic.pulse_irq(3)
    assert pic.intr_accepted() == 0x23
    pic.pulse_irq(5)
    assert pic.pending() is None
    outb(pic.master, 0, 0x68)                               # set special mask
    outb(pic.master, 1, 0x08)                               # mask the in-service IRQ3
    assert pic.pending() == 0x25
    outb(pic.master, 0, 0x48)                               # reset special mask
    assert pic.pending() is None


def test_special_fully_nested():
    pic, line = linux_init()
    outb(pic.master, 0, 0x11)
    outb(pic.master, 1, 0x20)
    outb(pic.master, 1, 0x04)
    outb(pic.master, 1, 0x11)                               # SFNM
    outb(pic.master, 1, 0xFB)
    outb(pic.slave, 1, 0x00)
    pic.pulse_irq(13)
    assert pic.intr_accepted() == 0x2D
    pic.pulse_irq(9)                                        # higher priority on the slave
    assert pic.pending() == 0x29


def test_icw1_resets_masks_and_state():
    pic, line = linux_init()
    outb(pic.master, 0, 0x11)
    assert inb(pic.master, 1) == 0 and not pic.master.ready
    outb(pic.master, 1, 0x08)
    outb(pic.master, 1, 0x04)
    outb(pic.master, 1, 0x01)
    assert pic.master.ready and pic.master.base == 0x08


def test_command_word_layouts():
    assert P.ICW1.build(dict(a7_5=0, ltim=False, adi=False, single=False, icw4=True)) == b"\x11"
    assert P.ICW4.parse(b"\x01").upm and not P.ICW4.parse(b"\x01").aeoi
    assert P.OCW2.build(dict(rotate=False, specific=True, eoi=True, level=2)) == b"\x62"
    c = P.OCW3.parse(b"\x0b")
    assert c.rr and c.ris and not c.poll
    assert P.OCW3.build(c) == b"\x0b"
    pic, line = linux_init()
    outb(pic.master, 1, 0)
    pic.pulse_irq(2 + 1)
    pic.intr_accepted()
    outb(pic.master, 0, P.OCW3.build(dict(esmm=False, smm=False, poll=False, rr=True, ris=True))[0])
    assert inb(pic.master, 0) == 0x08


def test_irq2_and_out_of_range_ignored():
    pic, line = linux_init()
    outb(pic.master, 1, 0)
    for irq in (2, -1, 16):
        pic.pulse_irq(irq)
    assert pic.pending() is None


@settings(max_examples=300, deadline=None)
@given(ops=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3), st.sampled_from([1, 2, 4, 8]),
                              st.integers(0, 2**64 - 1), st.integers(-1, 16)), max_size=60))
def test_never_raises(ops):
    pic, line = linux_init()
    devs = (pic.master, pic.slave, pic.elcr)
    for kind, off, size, val, irq in ops:
        val &= (1 << (8 * size)) - 1
        if kind < 3:
            if val & 1:
                devs[kind].write(off, size, val)
            else:
                assert 0 <= devs[kind].read(off, size) < 1 << (8 * size)
        else:
            pic.set_irq_level(irq, val & 1)
            if pic.pending() is not None:
                assert 0 <= pic.intr_accepted() < 256
    assert line == [] or all(a != b for a, b in zip(line, line[1:]))   # only changes are signalled


def test_irq0_through_lint0_extint():
    from bhyve_devices import vlapic_regs as R
    from bhyve_devices.base import ManualTimers
    from bhyve_devices.vlapic import Vlapic

    v = Vlapic(0, ManualTimers())
    v.write(R.SVR, 4, 0x1FF)
    v.write(R.LVT_LINT0, 4, R.DELMODE_EXTINT << 8)          # Linux's virtual-wire setup on the BSP
    pic, _ = linux_init()
    pic._intr_line = v.set_lint0_level
    unmask(pic, 0)
    pic.pulse_irq(0)
    assert v.lint0_pending() and v.pending_intr() is None
    assert pic.intr_accepted() == 0x20
    v.extint_accepted()
    assert not v.lint0_pending()


def test_irq0_through_lint0_of_an_apic_left_in_its_reset_state():
    """``nolapic`` and kexec guests: the vlapic stays software-disabled (LVTs masked), and LINT0 is then the
    8259's INTR pin (bhyve's vlapic_trigger_lvt)."""
    from bhyve_devices.base import ManualTimers
    from bhyve_devices.vlapic import Vlapic

    v = Vlapic(0, ManualTimers())
    pic, _ = linux_init()
    pic._intr_line = v.set_lint0_level
    unmask(pic, 0)
    pic.pulse_irq(0)
    assert v.lint0_pending() and v.pending_intr() is None
    assert pic.intr_accepted() == 0x20
    assert not v.lint0_pending()


def test_pulse_irq_reports_an_edge_merged_in_the_irr():
    pic, line = linux_init()
    unmask(pic, 0)
    assert pic.pulse_irq(0) is False                        # newly requested
    assert pic.pulse_irq(0) is True                         # IRR bit still set: one request for both
    assert pic.intr_accepted() == 0x20                      # INTA: IRR -> ISR
    assert pic.pulse_irq(0) is False                        # a new request (waits for the EOI)
    assert pic.pulse_irq(0) is True
    linux_ack(pic, 0)
    assert pic.intr_accepted() == 0x20 and pic.pulse_irq(0) is False
    unmask(pic, 12)
    unmask(pic, 2)
    assert pic.pulse_irq(12) is False and pic.pulse_irq(12) is True     # the slave's IRR alike
    assert pic.pulse_irq(2) is False and pic.pulse_irq(16) is False


def test_pulse_irq_not_merged_where_it_cannot_reach_int():
    pic, line = linux_init()
    pic.pulse_irq(1)                                        # masked in the IMR: latched, held back
    assert pic.pulse_irq(1) is False
    unmask(pic, 1)
    assert pic.pulse_irq(1) is True                         # now that request is on its way
    pic.pulse_irq(9)                                        # slave IRQ, masked
    unmask(pic, 9)                                          # and the cascade is masked on the master
    outb(pic.master, 1, inb(pic.master, 1) | 4)
    assert pic.pulse_irq(9) is False
    cold = Vatpic()                                         # never initialized: no output at all
    cold.pulse_irq(0)
    assert cold.pulse_irq(0) is False


def test_pulse_irq_on_a_level_irq_is_never_merged():
    pic, line = linux_init()
    unmask(pic, 5)
    outb(pic.elcr, 0, 1 << 5)
    assert pic.pulse_irq(5) is False and pic.pulse_irq(5) is False
