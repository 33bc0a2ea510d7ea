"""Snapshot / restore (issue 23) of the interrupt controllers: vlapic (with its timer), vioapic, vatpic, ApicBus.

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
from bhyve_devices.base import LateTimers, ManualTimers
from bhyve_devices.snapshot import SnapshotError, Snapshottable
from bhyve_devices.vatpic import Vatpic
from bhyve_devices.vioapic import Vioapic
from bhyve_devices.vlapic import LVT_LINT0, LVT_LINT1, Vlapic

T0 = 5_000_000_123
SHIFT = 987_654_321_000
TVEC = 0xEC
ICR = 1 << 20                      # with divide-by-2: 2**21 bus clocks = 1/64 s
PERIOD = 1_000_000_000 // 64


def through_json(state):
    return json.loads(json.dumps(state))


# -- vlapic -------------------------------------------------------------------------------------------------

_XAPIC_READABLE = sorted(off for off in R.REG_NAMES if off not in (R.EOI, R.SELF_IPI))


class Lapic:
    """A vlapic on its own bus and clock, recording what leaves it."""

    def __init__(self, timers, vcpu=0, **kw):
        self.t = timers
        self.eois, self.nmis, self.ipis = [], [], []
        self.bus = ApicBus(on_nmi=self.nmis.append)
        self.v = Vlapic(vcpu, timers, self.bus, eoi_level=self.eois.append, **kw)
        real = self.bus.deliver
        self.bus.deliver = lambda *a, **k: (self.ipis.append(a[:5]), real(*a, **k))[1]

    def regs(self):
        v = self.v
        if v.x2apic_mode:
            regs = {}
            for off in _XAPIC_READABLE:
                if off in (R.APR, R.RRD, R.DFR, R.ICR_HI) or off not in R.REG_NAMES:
                    continue
                regs[off] = v.rdmsr(R.MSR_X2APIC_FIRST + (off >> 4))
        else:
            regs = {off: v.read(off, 4) for off in _XAPIC_READABLE}
        regs.update(apicbase=v.rdmsr(R.MSR_APICBASE), pending=v.pending_intr(), lint0=v.lint0_pending(),
                    cr8=v.get_cr8(), ppr=v.get_ppr(), pv_eoi=v.edge_in_service_before(),
                    tsc_deadline=v.read_tsc_deadline(), cpuid=v.cpuid_features(),
                    wait_sipi=self.bus.waiting_for_sipi(v.vcpu_id))
        return regs

    def out(self):
        return self.eois, self.nmis, self.ipis

    def take(self):
        vec = self.v.pending_intr()
        if vec is not None:
            self.v.intr_accepted(vec)
        return vec

    def eoi(self):
        if self.v.x2apic_mode:
            self.v.wrmsr(R.MSR_X2APIC_FIRST + (R.EOI >> 4), 0)
        else:
            self.v.write(R.EOI, 4, 0)


def restored(a, timers_cls=ManualTimers, **kw):
    """A fresh vlapic of ``a``'s configuration on a clock SHIFT later, with ``a``'s state through JSON."""
    state = through_json(a.v.snapshot())
    b = Lapic(timers_cls(start_ns=a.t.now_ns() + SHIFT), a.v.vcpu_id, **kw)
    b.v.restore(state, SHIFT)
    b.bus.restore(through_json(a.bus.snapshot()), SHIFT)
    for out in a.out():
        out.clear()                             # from here on both record the same
    return b, state


def lockstep(a, b, steps):
    """Advances both clocks by each step, then compares registers and what came out, and takes and ends (EOI)
    whatever is pending on both the same way. Returns the times (old clock) where a timer interrupt was taken."""
    fired = []
    for ns in steps:
        a.t.advance(ns)
        b.t.advance(ns)
        assert a.regs() == b.regs()
        assert a.out() == b.out()
        va, vb = a.take(), b.take()
        assert va == vb
        if va == TVEC:
            fired.append(a.t.now_ns())
        if va is not None:
            a.eoi()
            b.eoi()
        assert a.regs() == b.regs() and a.out() == b.out()
    return fired


def xapic_busy(timers=None):
    """A vlapic in xAPIC mode with something in every register: TPR, LDR/DFR, SVR, the ESR and new errors, the
    ICR of a self-IPI, unmasked LVTs, two vectors in service (one level), four requested, LINT0 high in ExtINT
    mode, and a periodic timer part way through a period."""
    a = Lapic(timers or ManualTimers(start_ns=T0))
    v = a.v
    v.write(R.SVR, 4, 0x1FF)
    v.write(R.LDR, 4, 0x05000000)
    v.write(R.DFR, 4, 0x0FFFFFFF)               # cluster model
    v.write(R.LVT_ERROR, 4, 0x2E)
    v.write(R.LVT_LINT0, 4, 0x700)              # ExtINT
    v.write(R.LVT_LINT1, 4, 0x400)              # NMI
    v.write(R.LVT_THERMAL, 4, 0x10000 | 0x33)
    v.write(R.LVT_CMCI, 4, 0x44)
    v.write(R.TIMER_DCR, 4, 0)
    v.write(R.LVT_TIMER, 4, (R.TIMER_PERIODIC << 17) | TVEC)
    v.write(R.TIMER_ICR, 4, ICR)
    v.write(R.ICR_LO, 4, 0x5)                   # fixed IPI with vector 5: send-illegal-vector error
    v.write(R.ESR, 4, 0)                        # ... latched into the ESR
    assert v.read(R.ESR, 4) == R.ESR_SEND_ILLEGAL_VECTOR
    v.set_intr_ready(7)                         # receive-illegal: pending for the next ESR write
    v.set_intr_ready(0x61, level_triggered=True)
    assert a.take() == 0x61                     # above the error LVT's 0x2E (requested twice, merged)
    v.write(R.ICR_HI, 4, 0)
    v.write(R.ICR_LO, 4, (R.SHORTHAND_SELF << R.ICR_SHORTHAND_SHIFT) | 0x51)
    v.set_intr_ready(0x31)
    v.set_intr_ready(0x71)
    assert a.take() == 0x71                     # in service: 0x61 (level), 0x71
    v.set_intr_ready(0x41)
    v.write(R.TPR, 4, 0x20)
    v.set_lint0_level(True)
    a.t.advance(PERIOD + PERIOD // 3)           # one tick requested, a third into the next period
    return a


def test_devices_are_snapshottable():
    t = ManualTimers()
    for dev in (Vlapic(0, t), ApicBus(), Vioapic(lambda *a: None), Vatpic()):
        assert isinstance(dev, Snapshottable)
        assert dev.snapshot()["device"] == type(dev).__name__


def test_vlapic_xapic_registers_and_interrupts_survive():
    a = xapic_busy()
    before = a.regs()
    assert before[R.ISR0 + 0x30] and before[R.TIMER_CCR] and before["lint0"] and before["pending"] == TVEC
    b, state = restored(a)
    assert b.regs() == before                   # same reads SHIFT later, CCR included
    assert b.v.timer.fires == a.v.timer.fires
    for lap in (a, b):
        lap.v.write(R.ESR, 4, 0)                # the receive-illegal error collected before the snapshot
        assert lap.v.read(R.ESR, 4) == R.ESR_RECV_ILLEGAL_VECTOR
    # the in-service vectors end in the same order, the level one through eoi_level; then the requests go
    for _ in range(2):
        a.eoi()
        b.eoi()
        assert a.regs() == b.regs() and a.out() == b.out()
    assert a.eois == [0x61]
    fired = lockstep(a, b, [PERIOD // 7] * 40)
    assert len(fired) == 7                      # the tick requested at the snapshot, then one every period
    assert b.v.timer.deadline_ns == a.v.timer.deadline_ns + SHIFT
    assert a.regs() == b.regs()


def test_vlapic_periodic_fires_at_shifted_deadlines():
    a = xapic_busy()
    deadline = a.v.timer.deadline_ns
    b, state = restored(a)
    assert b.v.timer.deadline_ns == deadline + SHIFT and b.v.timer.period_ns == a.v.timer.period_ns
    assert b.t.pending() == 1
    ticks = []
    for lap in (a, b):
        lap.v.write(R.TPR, 4, 0)
        while lap.take() is not None:
            lap.eoi()
        times = []
        for _ in range(3):
            lap.t.set_time(lap.t.now_ns() + PERIOD)
            times.append(lap.t.now_ns())
            assert lap.take() == TVEC
            lap.eoi()
        ticks.append(times)
    assert [x + SHIFT for x in ticks[0]] == ticks[1]


def test_vlapic_one_shot_ccr_and_expiry():
    a = Lapic(ManualTimers(start_ns=T0))
    a.v.write(R.SVR, 4, 0x1FF)
    a.v.write(R.TIMER_DCR, 4, 0x3)                                 # divide by 16
    a.v.write(R.LVT_TIMER, 4, TVEC)
    a.v.write(R.TIMER_ICR, 4, 1_000_000)
    a.t.advance(12_345_678)
    ccr = a.v.read(R.TIMER_CCR, 4)
    assert 0 < ccr < 1_000_000
    b, _ = restored(a)
    assert b.v.read(R.TIMER_CCR, 4) == ccr and b.v.read(R.TIMER_DCR, 4) == 0x3
    deadline = a.v.timer.deadline_ns
    for lap, when in ((a, deadline), (b, deadline + SHIFT)):
        lap.t.set_time(when - 1)
        assert lap.v.pending_intr() is None and lap.v.read(R.TIMER_CCR, 4) == 1
        lap.t.set_time(when)
        assert lap.v.pending_intr() == TVEC and lap.v.read(R.TIMER_CCR, 4) == 0
        lap.t.advance(10 * deadline)
        assert lap.v.timer.fires == 1 and not lap.v.timer.running


def test_vlapic_expired_and_stopped_timers_stay_quiet():
    a = Lapic(ManualTimers(start_ns=T0))
    a.v.write(R.SVR, 4, 0x1FF)
    a.v.write(R.LVT_TIMER, 4, TVEC)
    a.v.write(R.TIMER_ICR, 4, 1000)
    a.t.advance(PERIOD)                                           # expired: requested, no longer armed
    b, state = restored(a)
    assert state["timer"]["armed_ns"] is None and b.t.pending() == 0
    assert b.regs() == a.regs() and b.v.read(R.TIMER_ICR, 4) == 1000
    assert lockstep(a, b, [PERIOD] * 3) == [a.t.now_ns() - 2 * PERIOD]


def test_vlapic_x2apic_tsc_deadline():
    hz = 2_500_000_000

    def tsc(timers, offset_ns):                 # the guest TSC stands still across the snapshot
        return lambda: (timers.now_ns() - offset_ns) * hz // 1_000_000_000

    ta = ManualTimers(start_ns=T0)
    a = Lapic(ta, vcpu=2, x2apic_allowed=True, tsc_hz=hz, tsc_now=tsc(ta, 0), apic_id=0x123)
    v = a.v
    v.set_apicbase(v.get_apicbase() | R.APICBASE_X2APIC)
    x2 = R.MSR_X2APIC_FIRST
    v.wrmsr(x2 + (R.SVR >> 4), 0x1FF)
    v.wrmsr(x2 + (R.TPR >> 4), 0x10)
    v.wrmsr(x2 + (R.LVT_TIMER >> 4), (R.TIMER_TSC_DEADLINE << 17) | TVEC)
    v.wrmsr(x2 + (R.LVT_LINT1 >> 4), 0x400)
    v.wrmsr(x2 + (R.SELF_IPI >> 4), 0x55)
    v.wrmsr(x2 + (R.ICR_LO >> 4), (7 << 32) | 0x66)           # an IPI to APIC ID 7 (nobody): the ICR keeps it
    v.wrmsr(R.MSR_TSC_DEADLINE, v.timer.tsc_now() + hz // 100)   # 10 ms
    ta.advance(3_000_000)
    state = through_json(v.snapshot())
    assert a.ipis == [(2, 7, False, 0, 0x66)]
    a.ipis.clear()
    tb = ManualTimers(start_ns=ta.now_ns() + SHIFT)
    b = Lapic(tb, vcpu=2, x2apic_allowed=True, tsc_hz=hz, tsc_now=tsc(tb, SHIFT), apic_id=0x123)
    b.v.restore(state, SHIFT)
    assert b.v.x2apic_mode and b.regs() == a.regs()
    assert b.v.rdmsr(x2 + (R.ICR_LO >> 4)) == (7 << 32) | 0x66 and b.v.rdmsr(x2 + (R.ID >> 4)) == 0x123
    assert b.v.rdmsr(R.MSR_TSC_DEADLINE) == a.v.rdmsr(R.MSR_TSC_DEADLINE) != 0
    assert a.take() == b.take() == 0x55
    a.eoi()
    b.eoi()
    fired = lockstep(a, b, [1_000_000] * 10)
    assert fired == [T0 + 10_000_000] and a.v.rdmsr(R.MSR_TSC_DEADLINE) == 0
    b.v.trigger_lvt(LVT_LINT1)
    a.v.trigger_lvt(LVT_LINT1)
    assert a.nmis == b.nmis == [2]


def test_vlapic_owed_periodic_ticks_survive():
    a = Lapic(LateTimers(start_ns=T0))
    a.v.write(R.SVR, 4, 0x1FF)
    a.v.write(R.LVT_TIMER, 4, (R.TIMER_PERIODIC << 17) | TVEC)
    a.v.write(R.TIMER_ICR, 4, ICR)
    a.t.wake_at(T0 + int(4.5 * PERIOD))                         # the timer thread slept through four periods
    assert a.take() == TVEC and a.v.timer.owed == 3
    a.eoi()
    b, state = restored(a, LateTimers)
    assert state["timer"]["armed_ns"] != state["timer"]["deadline_ns"]   # a catch-up tick before the period's end
    assert b.v.timer.owed == 3 and b.regs() == a.regs()
    times = []
    for lap, shift in ((a, 0), (b, SHIFT)):
        got = []
        lap.t.run_on_time_until(lap.t.now_ns())
        while (d := lap.t.next_deadline()) is not None and d <= T0 + shift + 10 * PERIOD:
            lap.t.wake_at(d)
            if lap.take() == TVEC:
                got.append(d - shift)
                lap.eoi()
        times.append(got)
    assert times[0] == times[1] and len(times[0]) == 3 + 6


def test_vlapic_disabled_and_software_disabled():
    a = Lapic(ManualTimers(start_ns=T0), vcpu=1)
    a.v.set_apicbase(a.v.get_apicbase() & ~R.APICBASE_ENABLED)    # hardware-disabled: LINT0 is the INTR pin
    a.v.trigger_lvt(LVT_LINT0)                                     # an ExtINT waits for its INTA
    b, _ = restored(a)
    assert not b.v.hw_enabled and b.regs() == a.regs() and b.v.lint0_pending()
    assert not b.v.lint0_level
    assert b.v.read(R.SVR, 4) == 0xFFFFFFFF                        # the page is gone
    b.v.set_apicbase(b.v.get_apicbase() | R.APICBASE_ENABLED)
    a.v.set_apicbase(a.v.get_apicbase() | R.APICBASE_ENABLED)
    assert b.regs() == a.regs() and b.v.read(R.SVR, 4) == 0xFF
    assert b.bus.waiting_for_sipi(1)


def test_vlapic_bad_states():
    a = xapic_busy()
    good = through_json(a.v.snapshot())

    def fresh(**kw):
        return Vlapic(0, ManualTimers(), **kw)

    def bad(change, **kw):
        s = through_json(good)
        change(s)
        with pytest.raises(SnapshotError):
            fresh(**kw).restore(s, SHIFT)

    fresh().restore(through_json(good), SHIFT)
    bad(lambda s: s.update(version=2))
    bad(lambda s: s.update(device="Vioapic"))
    bad(lambda s: s.pop("isr"))
    bad(lambda s: s["timer"].pop("armed_ns"))
    bad(lambda s: s["timer"].pop("deadline_ns"))
    bad(lambda s: s["lvt"].pop("lvt_pmc"))
    bad(lambda s: s.update(tpr=0x100))
    bad(lambda s: s.update(irr=-1))
    bad(lambda s: s.update(irr="0x10"))
    bad(lambda s: s.update(vcpu_id=1))
    bad(lambda s: s.update(apicbase=s["apicbase"] | R.APICBASE_X2APIC))     # x2APIC not offered
    bad(lambda s: s.update(apicbase=s["apicbase"] ^ 0x100000))             # relocated
    bad(lambda s: s["timer"].update(mode=R.TIMER_TSC_DEADLINE))            # not the LVT's mode
    bad(lambda s: (s["timer"].update(mode=R.TIMER_TSC_DEADLINE),
                   s["lvt"].update(lvt_timer=(R.TIMER_TSC_DEADLINE << 17) | TVEC)))   # no tsc_hz
    bad(lambda s: s["timer"].update(period_ns=0))
    bad(lambda s: s["timer"].update(dcr=0x10))
    bad(lambda s: s.update(lint0_level="yes"))
    bad(lambda s: s.update(timer=None))
    with pytest.raises(SnapshotError):
        fresh().restore([], 0)
    # a refused state changes nothing
    v = fresh()
    before = v.snapshot()
    s = through_json(good)
    s["timer"]["period_ns"] = 0
    with pytest.raises(SnapshotError):
        v.restore(s, SHIFT)
    assert v.snapshot() == before


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
