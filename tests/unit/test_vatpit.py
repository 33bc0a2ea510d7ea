"""The 8254 and port 0x61 driven as Linux drives them (time_init, pit clockevent, TSC calibration)."""

from hypothesis import given, settings, strategies as st

from bhyve_devices.base import LateTimers, ManualTimers, RecordingLine
from bhyve_devices.catchup import CATCHUP_MIN_NS
from bhyve_devices.vatpit import CONTROL_WORD, NMISC, PIT_HZ, PIT8254, STATUS_BYTE

NS = 1_000_000_000


class Driver:
    """The PIT and port 0x61 at their ports (``t``, ``irq``: the timer service and IRQ0 line, made here if not
    given)."""

    def __init__(self, t=None, irq=None):
        self.t = ManualTimers(start_ns=10**12) if t is None else t
        self.irq = RecordingLine() if irq is None else irq
        self.pit = PIT8254(self.t, self.irq)
        self.nmisc = NMISC(self.pit)

    def outb(self, port, v):
        if port == 0x61:
            self.nmisc.write(0, 1, v)
        else:
            self.pit.write(port - 0x40, 1, v)

    def inb(self, port):
        if port == 0x61:
            return self.nmisc.read(0, 1)
        return self.pit.read(port - 0x40, 1)

    def ticks_ns(self, ticks):
        return -(-ticks * NS // PIT_HZ)


def test_control_word_layout_round_trip():
    for v in range(256):
        assert CONTROL_WORD.build(CONTROL_WORD.parse(bytes([v]))) == bytes([v])
    cw = CONTROL_WORD.parse(b"\x34")
    assert (cw.sc, cw.rw, cw.mode, cw.bcd) == (0, "both", 2, False)
    assert STATUS_BYTE.build(STATUS_BYTE.parse(b"\xb4")) == b"\xb4"


def test_mode2_periodic_irq0_pulses():
    d = Driver()
    latch = PIT_HZ // 100  # Linux LATCH for HZ=100
    d.outb(0x43, 0x34)
    d.outb(0x40, latch & 0xFF)
    d.outb(0x40, latch >> 8)
    d.t.advance(d.ticks_ns(latch) - 1)
    assert d.irq.pulses == 0
    d.t.advance(1)
    assert d.irq.pulses == 1
    d.t.advance(d.ticks_ns(latch) * 99)
    assert d.irq.pulses in (99, 100)
    d.t.advance(d.ticks_ns(latch) * 2)
    assert d.irq.pulses in (101, 102)
    # the period is drift-free: after exactly 1000 periods, 1000 pulses
    d.t.set_time(10**12 + d.ticks_ns(latch * 1000))
    assert d.irq.pulses == 1000


def test_mode3_square_wave_period_and_count():
    d = Driver()
    d.outb(0x43, 0x36)
    d.outb(0x40, 0x00)
    d.outb(0x40, 0x10)  # 4096
    d.t.advance(d.ticks_ns(4096 * 5))
    assert d.irq.pulses == 5
    d.outb(0x43, 0x00)  # latch channel 0
    lo, hi = d.inb(0x40), d.inb(0x40)
    assert (hi << 8 | lo) in (4096, 4094)


def test_mode0_oneshot_and_latch_counts_down():
    d = Driver()
    d.outb(0x43, 0x30)
    d.outb(0x40, 0xE8)
    d.outb(0x40, 0x03)  # 1000
    d.t.advance(d.ticks_ns(400))
    d.outb(0x43, 0x00)
    d.t.advance(d.ticks_ns(100))  # the latch holds the old value
    lo, hi = d.inb(0x40), d.inb(0x40)
    assert hi << 8 | lo == 600
    d.t.advance(d.ticks_ns(600))
    assert d.irq.pulses == 1
    d.t.advance(NS)
    assert d.irq.pulses == 1


def test_mode4_oneshot_fires_once():
    d = Driver()
    d.outb(0x43, 0x38)
    d.outb(0x40, 100)
    d.outb(0x40, 0)
    d.t.advance(d.ticks_ns(102))
    assert d.irq.pulses == 1
    d.t.advance(NS)
    assert d.irq.pulses == 1


class SlowTimers(ManualTimers):
    """A clock that moves on by ``step`` at every reading, as it does while a slow VMM (Python in the nested
    lab) runs the device code between two readings of one register write."""

    def __init__(self, step, **kw):
        super().__init__(**kw)
        self.step = step

    def now_ns(self):
        self._now += self.step
        return self._now


@given(st.sampled_from([(0x30, 0), (0x38, 4)]), st.integers(1, 40))
def test_a_short_oneshot_is_not_lost_when_the_device_is_slow(mode, count):
    """Linux's PIT clockevent in one-shot mode programs 15 ticks (12.6 us) at the least; in the lab it was
    armed more than 15 ticks after its load, found its edge 'already past', never pulsed IRQ0, and the guest's
    ``poweroff -f`` waited for that timer for ever (MP-table boots with a high-resolution clocksource)."""
    control, _ = mode
    t = SlowTimers(step=50_000, start_ns=10**12)          # 50 us per reading: 60 ticks
    irq = RecordingLine()
    pit = PIT8254(t, irq)
    pit.write(3, 1, control)
    pit.write(0, 1, count)
    pit.write(0, 1, 0)
    t.advance(0)
    t.advance(NS)
    assert irq.pulses == 1


def test_readback_status_and_count():
    d = Driver()
    d.outb(0x43, 0xB0)  # channel 2, both, mode 0
    d.outb(0x61, 0x01)
    d.outb(0x42, 0x10)
    d.outb(0x42, 0x00)  # 16
    d.outb(0x43, 0xC8)  # read back count and status of channel 2
    st_ = STATUS_BYTE.parse(bytes([d.inb(0x42)]))
    assert (st_.out, st_.null_count, st_.rw, st_.mode, st_.bcd) == (False, False, 3, 0, False)
    assert d.inb(0x42) | d.inb(0x42) << 8 == 16
    d.t.advance(d.ticks_ns(20))
    d.outb(0x43, 0xE8)  # status only
    assert d.inb(0x42) & 0x80


def test_lsb_only_and_msb_only_modes():
    d = Driver()
    d.outb(0x43, 0x94)  # channel 2, LSB only, mode 2
    d.outb(0x61, 0x01)
    d.outb(0x42, 200)
    assert d.inb(0x42) == 200
    d.outb(0x43, 0xA4)  # MSB only, mode 2
    d.outb(0x42, 0x02)
    assert d.inb(0x42) == 0x02


def test_bcd_count():
    d = Driver()
    d.outb(0x43, 0xB1)  # channel 2, both, mode 0, BCD
    d.outb(0x61, 0x01)
    d.outb(0x42, 0x00)
    d.outb(0x42, 0x10)  # 1000 in BCD
    d.t.advance(d.ticks_ns(1))
    lo, hi = d.inb(0x42), d.inb(0x42)
    assert hi << 8 | lo == 0x0999


def test_linux_pit_calibrate_tsc():
    """pit_calibrate_tsc: gate high, mode 0 on channel 2 with a 50 ms latch, poll 0x61 bit 5."""
    d = Driver()
    latch = PIT_HZ // (1000 // 50)
    d.outb(0x61, (d.inb(0x61) & ~0x02) | 0x01)
    d.outb(0x43, 0xB0)
    d.outb(0x42, latch & 0xFF)
    d.outb(0x42, latch >> 8)
    start = d.t.now_ns()
    step = 20_000
    while not d.inb(0x61) & 0x20:
        d.t.advance(step)
    assert abs((d.t.now_ns() - start) - 50_000_000) <= step + 1000
    assert d.irq.pulses == 0  # channel 2 never pulses IRQ0


def test_linux_quick_pit_calibrate_msb_walk():
    """quick_pit_calibrate/pit_expect_msb: read LSB then MSB of channel 2 without latching."""
    d = Driver()
    d.outb(0x61, (d.inb(0x61) & ~0x02) | 0x01)
    d.outb(0x43, 0xB0)
    d.outb(0x42, 0xFF)
    d.outb(0x42, 0xFF)
    d.inb(0x42), d.inb(0x42)
    seen = []
    for _ in range(40):
        d.t.advance(d.ticks_ns(128))
        d.inb(0x42)
        seen.append(d.inb(0x42))
    assert seen == sorted(seen, reverse=True)
    assert seen[0] == 0xFF and seen[1] == 0xFE
    assert 0xFF - seen[-1] in (19, 20, 21)


def test_gate_low_freezes_mode0_and_refresh_toggles():
    d = Driver()
    d.outb(0x61, 0x01)
    d.outb(0x43, 0xB0)
    d.outb(0x42, 0x00)
    d.outb(0x42, 0x10)
    d.t.advance(d.ticks_ns(100))
    d.outb(0x61, 0x00)
    d.t.advance(d.ticks_ns(1000))
    d.outb(0x43, 0x80)
    assert d.inb(0x42) | d.inb(0x42) << 8 == 0x1000 - 100
    seen = set()
    for _ in range(8):
        d.t.advance(7000)
        seen.add(d.inb(0x61) & 0x10)
    assert seen == {0, 0x10}
    d.outb(0x61, 0x03)
    assert d.inb(0x61) & 0x03 == 0x03


def test_channel0_reprogram_cancels_old_timer():
    d = Driver()
    d.outb(0x43, 0x34)
    d.outb(0x40, 0x00)
    d.outb(0x40, 0x01)
    d.outb(0x43, 0x30)
    d.outb(0x40, 0)
    d.outb(0x40, 0)  # Linux shutdown: mode 0, count 0 (65536)
    d.t.advance(d.ticks_ns(65536) + 10)
    assert d.irq.pulses == 1
    assert d.t.pending() == 0


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.sampled_from([1, 2, 4]), st.integers(0, 2**32 - 1),
                          st.booleans(), st.integers(0, 10**8)), max_size=30))
def test_any_access_never_raises(ops):
    d = Driver()
    for off, size, val, is_write, dt in ops:
        dev = d.nmisc if off == 4 else d.pit
        o = 0 if off == 4 else off
        if is_write:
            dev.write(o, size, val & ((1 << (8 * size)) - 1))
        else:
            r = dev.read(o, size)
            assert 0 <= r < 1 << (8 * size)
        d.t.advance(dt)


def test_tiny_period_is_coalesced():
    d = Driver()
    d.outb(0x43, 0x34)
    d.outb(0x40, 2)
    d.outb(0x40, 0)
    d.t.advance(NS // 100)
    assert 150 <= d.irq.pulses <= 201


# -- late ticks (issue 24, item 5) ---------------------------------------------------------------------------

LATCH_1KHZ = PIT_HZ // 1000             # Linux's LATCH for HZ=1000 (a 1 ms period)


class TimedLine(RecordingLine):
    def __init__(self, timers):
        super().__init__()
        self.times, self._t = [], timers

    def pulse(self):
        super().pulse()
        self.times.append(self._t.now_ns())


def _periodic(mode=2, count=LATCH_1KHZ, start=10**12):
    t = LateTimers(start_ns=start)
    irq = TimedLine(t)
    pit = PIT8254(t, irq)
    pit.write(3, 1, 0x30 | mode << 1)   # channel 0, LSB then MSB
    pit.write(0, 1, count & 0xFF)
    pit.write(0, 1, count >> 8)
    return t, irq, pit


def _period_ns(count=LATCH_1KHZ):
    return count * NS / PIT_HZ


@given(st.sampled_from([2, 3]), st.sampled_from([PIT_HZ // 1000, PIT_HZ // 250, PIT_HZ // 100]))
def test_a_timer_five_periods_late_delivers_all_five_as_separate_pulses(mode, count):
    t, irq, pit = _periodic(mode, count)
    start, period = t.now_ns(), _period_ns(count)
    t.wake_at(start + int(5.5 * period))    # the thread slept through edges 1-5
    assert irq.pulses == 1                  # one now; the others follow, one pulse each
    t.run_on_time_until(start + int(5.5 * period + 4 * max(CATCHUP_MIN_NS, period / 2)))
    assert irq.pulses >= 5                  # the missed ones within four catch-up spacings
    gaps = [b - a for a, b in zip(irq.times, irq.times[1:])]
    assert min(gaps) >= min(CATCHUP_MIN_NS, period / 2) - 1     # spaced: a controller holds one edge per pin
    t.run_on_time_until(start + int(20.5 * period))
    assert irq.pulses == 20
    assert pit.dropped == 0


@given(st.sampled_from([PIT_HZ // 1000, PIT_HZ // 250, PIT_HZ // 100]), st.integers(0, 2**32))
@settings(max_examples=30, deadline=None)
def test_random_lateness_over_1000_periods_delivers_one_pulse_per_period(count, seed):
    import random
    rnd = random.Random(seed)
    t, irq, pit = _periodic(count=count)
    start, period = t.now_ns(), _period_ns(count)
    end = start + int(1000 * period)
    while (d := t.next_deadline()) is not None and d <= end:
        late = rnd.randrange(int(8 * period)) if rnd.random() < 0.05 else rnd.randrange(int(period // 4))
        t.wake_at(min(d + late, end))
        assert irq.pulses <= (t.now_ns() - start) / period      # never ahead of wall time
    t.wake_at(end)
    t.run_on_time_until(end + int(100 * period))        # the thread keeps time again: the backlog drains
    assert abs(irq.pulses - 1100) <= 1
    assert pit.dropped == 0


def test_the_count_read_back_follows_the_clock_while_the_timer_thread_is_late():
    t, irq, pit = _periodic()
    start = t.now_ns()
    for ticks in (LATCH_1KHZ * 7 + 300, LATCH_1KHZ * 40 + 5, LATCH_1KHZ * 41 + 1000):
        t._now = start + -(-ticks * NS // PIT_HZ)       # the clock moved; no callback has run yet
        pit.write(3, 1, 0x00)                           # latch channel 0
        count = pit.read(0, 1) | pit.read(0, 1) << 8
        assert count == LATCH_1KHZ - ticks % LATCH_1KHZ
        t.wake_at(t.now_ns())                           # a late callback does not move the count
        assert pit.read(0, 1) | pit.read(0, 1) << 8 == LATCH_1KHZ - ticks % LATCH_1KHZ
    t.run_on_time_until(start + int(120.5 * _period_ns()))
    assert irq.pulses == 120


def test_a_pulse_the_line_reports_merged_is_sent_again():
    class MergingLine(TimedLine):
        """Reports the next ``merge`` pulses as merged with one still pending (the guest has not taken it)."""
        merge = 0

        def pulse(self):
            super().pulse()
            if self.merge:
                self.merge -= 1
                return False
            return None

    t = LateTimers(start_ns=10**12)
    irq = MergingLine(t)
    pit = PIT8254(t, irq)
    pit.write(3, 1, 0x34)
    pit.write(0, 1, LATCH_1KHZ & 0xFF)
    pit.write(0, 1, LATCH_1KHZ >> 8)
    start, period = t.now_ns(), _period_ns()
    irq.merge = 3
    t.run_on_time_until(start + int(10.5 * period))
    assert pit.merged == 3 and pit.pulses == 10         # the three merged ones went out again
    t.run_on_time_until(start + int(30.5 * period))
    assert pit.pulses == 30 and irq.pulses == 33


def _platform_irq0(hpet_legacy, cpu_ns=(None,)):
    """IRQ0 as the VM wires it (``_PitLine`` over ``_IsaLine`` over ``vm_isa_pulse_irq``), into the engine's own
    ``isa_pulse_irq`` with a real 8259 pair, IOAPIC and one vlapic (the engine's NVMM machine is left out)."""
    from types import SimpleNamespace

    from bhyve_devices import vlapic_regs as R
    from bhyve_devices.apicbus import ApicBus
    from bhyve_devices.vatpic import Vatpic
    from bhyve_devices.vioapic import Vioapic
    from bhyve_devices.vlapic import Vlapic
    from ops.edge_merge import EdgeJudge
    from ops.vmm import Vm as EngineVm
    from ops.vmm_api import VmmApiCalls
    from vmmshim.platform import _PitLine
    from vmmshim.vm import _IsaLine

    bus = ApicBus()
    engine = SimpleNamespace(vatpic=Vatpic(), vioapic=Vioapic(bus.deliver_intr), irq_events={},
                             edges=EdgeJudge(lambda: cpu_ns[0]))
    engine.isa_pulse_irq = lambda irq: EngineVm.isa_pulse_irq(engine, irq)
    lapic = Vlapic(0, ManualTimers(), bus)
    lapic.write(R.SVR, 4, 0x1FF)
    vm = SimpleNamespace(ops=VmmApiCalls.__new__(VmmApiCalls), vmi=engine)
    line = _PitLine(SimpleNamespace(hpet_legacy=lambda: hpet_legacy[0]), _IsaLine(vm, 0))
    return engine, lapic, line


def test_the_platform_line_reports_a_tick_still_in_the_lapic_irr_and_the_pit_sends_it_again():
    hpet = [False]
    engine, lapic, line = _platform_irq0(hpet)
    engine.vioapic.write_reg(0x14, 0x30)                # pin 2: vector 0x30, fixed, edge, unmasked
    engine.vioapic.write_reg(0x15, 0)
    assert line.pulse() is True and line.pulse() is False      # the second found 0x30 still requested
    lapic.intr_accepted(0x30)

    t = LateTimers(start_ns=10**12)
    pit = PIT8254(t, line)
    pit.write(3, 1, 0x34)
    pit.write(0, 1, LATCH_1KHZ & 0xFF)
    pit.write(0, 1, LATCH_1KHZ >> 8)
    start, period = t.now_ns(), _period_ns()
    t.run_on_time_until(start + int(1.2 * period))
    assert pit.pulses == 1 and lapic.irr >> 0x30 & 1
    t.run_on_time_until(start + int(2.2 * period))     # the vCPU has not taken it: edge 2 merged
    assert pit.pulses == 1 and pit.merged == 1
    lapic.intr_accepted(0x30)
    t.run_on_time_until(start + int(2.7 * period))     # sent again half a period later, and in
    assert pit.pulses == 2 and pit.merged == 1 and lapic.irr >> 0x30 & 1
    lapic.intr_accepted(0x30)
    t.run_on_time_until(start + int(3.2 * period))
    assert pit.pulses == 3

    engine.vioapic.write_reg(0x14, 0x10030)             # pin 2 masked: the 8259's answer (not initialized here,
    assert line.pulse() is True                         # so nothing merges there)
    engine.vioapic.write_reg(0x14, 0x30)
    hpet[0] = True                                      # the HPET has IRQ0: cut off, not merged
    assert line.pulse() is True and line.pulse() is True


def test_with_the_ioapic_pin_masked_the_8259_answers():
    engine, lapic, line = _platform_irq0([False])
    pic = engine.vatpic
    for port, val in ((0, 0x11), (1, 0x20), (1, 4), (1, 1), (1, 0xFA)):     # master initialized, IRQ0 unmasked
        pic.master.write(port, 1, val)
    assert line.pulse() is True and line.pulse() is False
    assert pic.intr_accepted() == 0x20 and line.pulse() is True
    engine.vioapic.write_reg(0x14, 0x30)                # the IOAPIC route in use: its answer counts
    engine.vioapic.write_reg(0x15, 0)
    assert line.pulse() is True and line.pulse() is False       # (the 8259's IRR bit is set all along)
    lapic.intr_accepted(0x30)
    assert line.pulse() is True


def test_a_backlog_over_a_second_is_dropped_and_the_phase_kept():
    count = PIT_HZ // 100                               # 100 Hz
    t, irq, pit = _periodic(count=count)
    start, period = t.now_ns(), _period_ns(count)
    t.wake_at(start + 5 * NS + int(period / 2))         # a VM stopped for 5 s: edge 1 goes out, 499 wait
    assert pit.dropped == 399                           # the newest second of them is kept
    t.run_on_time_until(start + 7 * NS + int(period / 2))
    assert irq.pulses == 301 and irq.pulses + pit.dropped == 700
    for x in irq.times[-20:]:                           # on time again, on the load's own edges
        k = round((x - start) / period)
        assert x - start == -(-k * count * NS // PIT_HZ)
