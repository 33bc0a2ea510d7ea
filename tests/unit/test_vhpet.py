"""The HPET as Linux's hpet.c drives it (legacy clockevent, periodic and one-shot) plus level/edge routing."""

from hypothesis import given, settings, strategies as st

from bhyve_devices.base import ManualTimers
from bhyve_devices.vhpet import CAPABILITIES, HPET, HPET_FREQ, HPET_PERIOD_FS, REGISTERS, TIMER_CONFIG

NS = 1_000_000_000


class Driver:
    def __init__(self):
        self.t = ManualTimers(start_ns=5 * NS)
        self.events = []
        self.levels = {}
        self.hpet = HPET(self.t, self._irq)

    def _irq(self, pin, level):
        self.events.append((pin, level))
        self.levels[pin] = level

    def edges(self, pin):
        return sum(1 for p, lv in self.events if p == pin and lv)

    def rd(self, off, size=4):
        return self.hpet.read(off, size)

    def wr(self, off, v, size=4):
        self.hpet.write(off, size, v)

    def ticks_ns(self, ticks):
        return -(-ticks * NS // HPET_FREQ)


def test_layouts_round_trip_and_capabilities():
    d = Driver()
    cap = d.rd(0, 8)
    assert cap == d.rd(0) | d.rd(4) << 32
    c = CAPABILITIES.parse(cap.to_bytes(8, "little"))
    assert (c.counter_clk_period, c.vendor_id, c.leg_rt_cap, c.count_size_cap, c.num_tim_cap, c.rev_id) == \
        (HPET_PERIOD_FS, 0x8086, True, True, 2, 1)
    assert HPET_PERIOD_FS == 59604644
    assert CAPABILITIES.build(c) == cap.to_bytes(8, "little")
    tc = TIMER_CONFIG.parse(d.rd(0x100, 8).to_bytes(8, "little"))
    assert tc.per_int_cap and tc.size_cap and not tc.fsb_int_del_cap and tc.int_route_cap == 0x00F00000
    raw = bytes(range(256)) * 4
    assert REGISTERS.parse(raw).timers[1].comparator == int.from_bytes(raw[0x128:0x130], "little")
    blob = REGISTERS.build(REGISTERS.parse(raw))
    assert len(blob) == 0x400 and blob[0x100:0x118] == raw[0x100:0x118]


def test_main_counter_runs_only_when_enabled():
    d = Driver()
    d.t.advance(NS)
    assert d.rd(0xF0, 8) == 0
    d.wr(0xF0, 0)
    d.wr(0xF4, 0)
    d.wr(0x10, 1)
    d.t.advance(NS)
    assert d.rd(0xF0) == HPET_FREQ
    d.t.advance(NS // 1000)
    assert abs(d.rd(0xF0) - HPET_FREQ * 1001 // 1000) <= 1
    d.wr(0x10, 0)
    v = d.rd(0xF0, 8)
    d.t.advance(NS)
    assert d.rd(0xF0, 8) == v
    d.wr(0xF0, 0xFFFFFFF0, 8)  # writable while halted
    d.wr(0x10, 1)
    d.t.advance(NS // HPET_FREQ * 32)
    assert d.rd(0xF4) == 1  # carried into the high half


def test_linux_legacy_periodic_clockevent():
    d = Driver()
    d.wr(0x10, 1 | 2)  # enable, legacy route
    delta = HPET_FREQ // 250  # HZ=250
    cfg = d.rd(0x100)
    d.wr(0x100, cfg | 0x4 | 0x8 | 0x40 | 0x100)
    cnt = d.rd(0xF0)
    d.wr(0x108, cnt + delta)
    d.wr(0x108, delta)
    assert d.rd(0x100) & 0x40 == 0  # VAL_SET cleared
    d.t.advance(NS)
    assert d.edges(2) in (249, 250)
    assert d.edges(8) == 0
    d.t.advance(NS)
    assert d.edges(2) in (499, 500)


def test_linux_oneshot_and_timer1_legacy_rtc_pin():
    d = Driver()
    d.wr(0x10, 3)
    for n, pin in ((0, 2), (1, 8)):
        base = 0x100 + 0x20 * n
        d.wr(base, (d.rd(base) & ~0x8) | 0x4 | 0x100)
        cnt = d.rd(0xF0)
        d.wr(base + 8, (cnt + 1000) & 0xFFFFFFFF)
        d.t.advance(d.ticks_ns(999))
        assert d.edges(pin) == 0
        d.t.advance(d.ticks_ns(2))
        assert d.edges(pin) == 1
        d.t.advance(NS)
        assert d.edges(pin) == 1


def test_routed_level_interrupt_and_isr():
    d = Driver()
    d.wr(0x10, 1)
    d.wr(0x140, 0x2 | 0x4 | (21 << 9))  # timer 2: level, enabled, pin 21
    assert d.rd(0x140) >> 9 & 0x1F == 21
    d.wr(0x148, 500, 8)
    d.t.advance(d.ticks_ns(500))
    assert d.levels[21] is True and d.rd(0x20) == 0x4
    d.t.advance(NS)
    assert d.events.count((21, True)) == 1
    d.wr(0x20, 0x4)
    assert d.levels[21] is False and d.rd(0x20) == 0


def test_periodic_64bit_comparator_advances_and_disable_stops():
    d = Driver()
    d.wr(0x10, 1)
    d.wr(0x120, 0x4 | 0x8 | 0x40 | (20 << 9))
    d.wr(0x128, 1000, 8)
    d.wr(0x128, 1000, 8)
    d.t.advance(d.ticks_ns(10_500))
    assert d.edges(20) == 10
    assert d.rd(0x128, 8) == 11_000
    d.wr(0x10, 0)
    d.t.advance(NS)
    assert d.edges(20) == 10
    assert d.t.pending() == 0


def test_counter_in_past_does_not_fire_until_wrap_and_fsb_not_supported():
    d = Driver()
    d.wr(0x10, 1)
    d.t.advance(NS)
    d.wr(0x100, 0x4 | (20 << 9) | 0x4000)
    assert d.rd(0x100) & 0x4000 == 0
    d.wr(0x108, 5, 8)  # long past in 64-bit mode
    d.t.advance(10 * NS)
    assert d.edges(20) == 0
    d.wr(0x110, 0xFEE00000_00000041, 8)
    assert d.rd(0x110, 8) == 0xFEE00000_00000041


def test_32bit_oneshot_matches_again_after_wrap():
    d = Driver()
    d.wr(0x10, 1)
    d.wr(0x100, 0x4 | 0x100 | (20 << 9))
    d.wr(0x108, 100)
    d.t.advance(d.ticks_ns(101))
    assert d.edges(20) == 1
    d.t.advance(d.ticks_ns(1 << 32))
    assert d.edges(20) == 2


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.integers(-8, 0x408), st.sampled_from([1, 2, 4, 8]), st.integers(0, 2**64 - 1),
                          st.booleans(), st.integers(0, 10**9)), max_size=40))
def test_any_access_never_raises(ops):
    d = Driver()
    d.wr(0x10, 1)
    for off, size, val, is_write, dt in ops:
        if is_write:
            d.hpet.write(off, size, val & ((1 << (8 * size)) - 1))
        else:
            assert 0 <= d.hpet.read(off, size) < 1 << (8 * size)
        d.t.advance(dt)


def test_periodic_timer_survives_a_late_timer_thread():
    """The lab bug: the timer thread lost the GIL between reading the counter and re-arming, so the advanced
    comparator was already behind the counter and the next match waited for the 32-bit wrap (256 s)."""
    d = Driver()
    late = {"n": 0}

    def slow_irq(pin, level):
        d._irq(pin, level)
        if level and late["n"] < 3:          # the first three deliveries take longer than two periods
            late["n"] += 1
            d.t._now += 3 * d.ticks_ns(delta)
    d.hpet._irq = slow_irq
    d.wr(0x10, 1 | 2)
    delta = HPET_FREQ // 250
    d.wr(0x100, d.rd(0x100) | 0x4 | 0x8 | 0x40 | 0x100)
    d.wr(0x108, d.rd(0xF0) + delta)
    d.wr(0x108, delta)
    d.t.advance(NS)
    assert d.edges(2) >= 240                  # still ticking at 250 Hz after the late ones (coalesced)
    assert d.t.pending() == 1


def test_stale_callback_after_rearm_does_not_double_fire():
    d = Driver()
    d.wr(0x10, 1 | 2)
    d.wr(0x100, d.rd(0x100) | 0x4 | 0x100)      # one-shot, 32-bit
    d.wr(0x108, d.rd(0xF0) + 1000)
    stale = [fn for _, _, fn in d.t._heap]
    d.wr(0x108, d.rd(0xF0) + 100000)             # re-armed before the first callback ran
    stale[0]()                                   # the timer thread had already taken it off the heap
    assert d.edges(2) == 0
    d.t.advance(d.ticks_ns(100000))
    assert d.edges(2) == 1
