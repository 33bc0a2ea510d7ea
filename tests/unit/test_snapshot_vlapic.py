"""Snapshot / restore (issue 23) of the local APIC: vlapic registers, interrupts and its timer (one-shot, periodic,
TSC-deadline, owed ticks), and the states a restore refuses.

Same method as ``test_snapshot_apic.py`` (whose constants and JSON helper it shares): each test drives a vlapic
through its guest interface, saves it, sends the state through JSON, restores it into a fresh vlapic on a clock
``SHIFT`` ns later and then runs both side by side.
"""

import pytest

from bhyve_devices import vlapic_regs as R
from bhyve_devices.apicbus import ApicBus
from bhyve_devices.base import LateTimers, ManualTimers
from bhyve_devices.snapshot import SnapshotError
from bhyve_devices.vlapic import LVT_LINT0, LVT_LINT1, Vlapic
from tests.unit.test_snapshot_apic import SHIFT, T0, through_json

TVEC = 0xEC
ICR = 1 << 20                      # with divide-by-2: 2**21 bus clocks = 1/64 s
PERIOD = 1_000_000_000 // 64


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
