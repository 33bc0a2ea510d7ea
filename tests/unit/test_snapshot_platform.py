"""Snapshot and restore of the platform timer devices (issue 23; ``bhyve_devices/snapshot.py``): the 8254 PIT and
port 0x61, the RTC, the HPET and the PM timer, plus the bad states of every platform device. The register devices
(UART, PM, POST, 8042, debug exit) are in ``test_snapshot_registers.py``, which shares this file's helpers.

Each test drives a device as a guest would, snapshots it, sends the state through JSON, restores it into a fresh
device whose timer service reads another time (``shift_ns`` = new now - old now), and then runs the original and
the copy side by side: the same reads at the same guest-relative times give the same values, and interrupts come
at the same relative times.
"""

import calendar
import json

import pytest

from bhyve_devices.atkbdc import KeyboardController
from bhyve_devices.base import ManualTimers, RecordingLine
from bhyve_devices.debugexit import DebugExit
from bhyve_devices.pm import PowerManagement
from bhyve_devices.post import PostPort
from bhyve_devices.snapshot import SnapshotError, Snapshottable
from bhyve_devices.uart16550 import UART16550
from bhyve_devices.vatpit import NMISC, PIT_HZ, PIT8254
from tests.unit.test_vatpit import Driver
from bhyve_devices.vhpet import HPET, HPET_FREQ
from bhyve_devices.vpmtmr import PMTimer
from bhyve_devices.vrtc import RTC

NS = 1_000_000_000
T0 = 10**12                     # the first VM's timer service starts here
SHIFT = 7_777_777_777_777       # the second one reads this much later when it restores


def roundtrip(state):
    return json.loads(json.dumps(state))


class TimedLine:
    """An IrqLine recording the time (relative to ``origin``) of every pulse and level change."""

    def __init__(self, timers):
        self.t, self.origin, self.events, self.level = timers, 0, [], False

    def pulse(self):
        self.events.append(("pulse", self.t.now_ns() - self.origin))

    def set_level(self, level):
        self.level = bool(level)
        self.events.append((self.level, self.t.now_ns() - self.origin))


class Twin:
    """The original device (``a`` on ``ta``) and its restored copy (``b`` on ``tb``, ``SHIFT`` later)."""

    def __init__(self, make, drive):
        self.ta = ManualTimers(start_ns=T0)
        self.la = TimedLine(self.ta)
        self.a = make(self.ta, self.la)
        drive(self)
        self.snap_at = self.ta.now_ns()
        self.state = roundtrip(self.a.snapshot())
        self.tb = ManualTimers(start_ns=self.snap_at + SHIFT)
        self.lb = TimedLine(self.tb)
        self.b = make(self.tb, self.lb)
        self.la.origin, self.lb.origin = self.snap_at, self.snap_at + SHIFT
        self.la.events.clear()
        self.b.restore(self.state, SHIFT)
        self.restore_events = list(self.lb.events)     # levels the restore drove again
        self.lb.events.clear()

    def advance(self, ns):
        self.ta.advance(ns)
        self.tb.advance(ns)

    def both(self, fn):
        """``fn(device)`` on both; asserts the results are equal and returns one."""
        ra, rb = fn(self.a), fn(self.b)
        assert ra == rb
        return ra


def ticks_ns(ticks, hz):
    return -(-ticks * NS // hz)


# -- 8254 and port 0x61 ---------------------------------------------------------------------------------------

class PitPair(Driver):
    def __init__(self, timers, line):
        super().__init__(timers, line)

    def snapshot(self):
        return {"pit": self.pit.snapshot(), "nmisc": self.nmisc.snapshot()}

    def restore(self, state, shift):
        self.pit.restore(state["pit"], shift)
        self.nmisc.restore(state["nmisc"], shift)


LATCH = PIT_HZ // 100           # Linux's LATCH at HZ=100


def drive_pit(tw):
    d, t = tw.a, tw.ta
    d.outb(0x43, 0x34)                      # channel 0: LSB+MSB, mode 2 (rate generator)
    d.outb(0x40, LATCH & 0xFF)
    d.outb(0x40, LATCH >> 8)
    d.outb(0x61, 0x03)                      # gate 2 high, speaker data on
    d.outb(0x43, 0xB0)                      # channel 2: mode 0 (one-shot), 50000 ticks
    d.outb(0x42, 50000 & 0xFF)
    d.outb(0x42, 50000 >> 8)
    d.outb(0x43, 0x54)                      # channel 1: LSB only, mode 2
    d.outb(0x41, 18)
    t.advance(ticks_ns(LATCH * 3, PIT_HZ) + 123_456)
    d.outb(0x43, 0x80)                      # latch channel 2's count, not read yet
    d.inb(0x40)                             # channel 0: LSB read, the MSB is next (read flip-flop)
    d.outb(0x43, 0xE4)                      # read-back: latch channel 1's status


def test_pit_counts_latches_and_irq0_go_on_at_the_shifted_time():
    tw = Twin(lambda t, line: PitPair(t, line), drive_pit)
    assert isinstance(tw.a.pit, Snapshottable) and isinstance(tw.a.nmisc, Snapshottable)
    assert tw.a.pit.pulses == 3 and tw.b.pit.pulses == 3
    tw.advance(5_000)
    tw.both(lambda d: d.inb(0x40))                              # the MSB that goes with the LSB read
    tw.both(lambda d: d.inb(0x41))                              # the latched status byte
    latched = tw.both(lambda d: d.inb(0x42) | d.inb(0x42) << 8)  # the latched count
    assert 0 < latched < 50000
    tw.advance(1_000_000)
    for port in (0x40, 0x41, 0x42):
        tw.both(lambda d, p=port: [d.inb(p) for _ in range(2)])
    assert tw.both(lambda d: d.inb(0x61) & ~0x10) == 0x03      # gate, speaker; OUT2 still low
    assert tw.a.pit.speaker and tw.b.pit.speaker
    tw.advance(ticks_ns(LATCH * 10, PIT_HZ))
    assert tw.la.events == tw.lb.events and len(tw.la.events) == 10
    first = tw.lb.events[0][1]
    edge4 = ticks_ns(LATCH * 4, PIT_HZ) - (tw.snap_at - T0)     # edge 4 of the load, relative to the snapshot
    assert abs(first - edge4) <= 1
    assert [b[1] - a[1] for a, b in zip(tw.lb.events, tw.lb.events[1:])] == \
        [ticks_ns(LATCH * k, PIT_HZ) - ticks_ns(LATCH * (k - 1), PIT_HZ) for k in range(5, 14)]
    tw.advance(ticks_ns(50000, PIT_HZ))                         # channel 2's one-shot ends in both
    assert tw.both(lambda d: d.inb(0x61) & 0x20) == 0x20


def test_pit_mode0_oneshot_pending_on_channel0_fires_once_at_the_shifted_time():
    def drive(tw):
        tw.a.outb(0x43, 0x30)                   # channel 0, mode 0, 30000 ticks
        tw.a.outb(0x40, 30000 & 0xFF)
        tw.a.outb(0x40, 30000 >> 8)
        tw.ta.advance(ticks_ns(10000, PIT_HZ))
    tw = Twin(lambda t, line: PitPair(t, line), drive)
    tw.advance(1)
    assert tw.both(lambda d: (d.outb(0x43, 0), d.inb(0x40) | d.inb(0x40) << 8)[1]) in (19999, 20000)
    tw.advance(NS)
    assert tw.la.events == tw.lb.events == [("pulse", ticks_ns(30000, PIT_HZ) - ticks_ns(10000, PIT_HZ))]


def test_pit_gate_stopped_mode0_and_half_written_count():
    def drive(tw):
        d = tw.a
        d.outb(0x61, 0x01)
        d.outb(0x43, 0xB0)                       # channel 2, mode 0
        d.outb(0x42, 0x00)
        d.outb(0x42, 0x40)                       # 0x4000 ticks
        tw.ta.advance(ticks_ns(1000, PIT_HZ))
        d.outb(0x61, 0x00)                       # gate low: the count stops (frozen ticks)
        d.outb(0x43, 0x70)                       # channel 1, mode 0, then only the LSB written
        d.outb(0x41, 0x34)
    tw = Twin(lambda t, line: PitPair(t, line), drive)
    tw.advance(NS)
    frozen = tw.both(lambda d: d.inb(0x42) | d.inb(0x42) << 8)
    assert frozen in (0x4000 - 1000, 0x4000 - 1001)
    tw.both(lambda d: d.outb(0x41, 0x12))       # the MSB completes the count written before the snapshot
    tw.advance(ticks_ns(10, PIT_HZ))
    assert tw.both(lambda d: d.inb(0x41) | d.inb(0x41) << 8) in range(0x1234 - 11, 0x1234 - 8)
    tw.both(lambda d: d.outb(0x61, 0x01))
    tw.advance(ticks_ns(100, PIT_HZ))
    tw.both(lambda d: d.inb(0x42) | d.inb(0x42) << 8)


# -- RTC ------------------------------------------------------------------------------------------------------

BASE = calendar.timegm((2024, 2, 29, 23, 59, 50, 0, 0, 0)) + 0.25


def make_rtc(host_base):
    def make(t, line):
        start = t.now_ns()
        return RTC(t, line, clock=lambda: host_base + (t.now_ns() - start) / NS, memsize=2 << 30)
    return make


def rtc_read(rtc, reg):
    rtc.write(0, 1, reg)
    return rtc.read(1, 1)


def rtc_write(rtc, reg, v):
    rtc.write(0, 1, reg)
    rtc.write(1, 1, v)


def rtc_drive(tw):
    r = tw.a
    rtc_write(r, 0x0B, 0x02 | 0x04)         # binary, 24 h
    rtc_write(r, 0x40, 0x5A)                # NVRAM
    rtc_write(r, 0x01, 0xFF)                # alarm: any second ...
    rtc_write(r, 0x03, 0xFF)
    rtc_write(r, 0x05, 0xFF)
    rtc_write(r, 0x0A, 0x2A)                # 64 Hz periodic (RS 10)
    rtc_write(r, 0x0B, 0x02 | 0x04 | 0x40 | 0x10)    # PIE, UIE
    tw.ta.advance(NS * 3 + NS // 3)
    rtc_read(r, 0x0C)
    tw.ta.advance(NS // 200)
    r.write(0, 1, 0x80 | 0x40)              # leave the index at 0x40 with NMIs disabled


def check_rtc_twin(tw):
    assert tw.b.nmi_disabled and tw.b.index == 0x40
    assert tw.both(lambda r: r.read(1, 1)) == 0x5A
    times = [tw.both(lambda r: [rtc_read(r, i) for i in (0, 2, 4, 6, 7, 8, 9, 0x32, 0x0A, 0x0B)])]
    assert abs(tw.b.guest_time() - tw.a.guest_time()) < 1e-5
    for _ in range(150):                    # the guest's handler reads C on every interrupt
        tw.advance(NS // 64)
        tw.both(lambda r: rtc_read(r, 0x0C))
    times.append(tw.both(lambda r: [rtc_read(r, i) for i in (0, 2, 4, 7, 8, 9)]))
    assert tw.la.events == tw.lb.events and len(tw.la.events) > 140
    return times


def test_rtc_time_periodic_and_update_interrupts_go_on_shifted():
    tw = Twin(make_rtc(BASE), rtc_drive)        # the new host's clock reads BASE at the restore: 3.3 s behind
    times = check_rtc_twin(tw)
    assert times[0][:8] == [53, 59, 23, 5, 29, 2, 24, 20]      # binary: Thursday 2024-02-29 23:59:53
    assert times[1][0] == 55
    # the periodic interrupts stay on the 64 Hz grid that started when PIE was set, shifted
    assert all((t + tw.snap_at - T0) % (NS // 64) == 0 for k, t in tw.lb.events)


def test_rtc_restore_into_a_host_clock_that_differs():
    def make(t, line):
        start = t.now_ns()
        base = BASE if start == T0 else BASE + 3600 * 5 + 0.6   # another host, another hour and phase
        return RTC(t, line, clock=lambda: base + (t.now_ns() - start) / NS)
    tw = Twin(make, rtc_drive)
    check_rtc_twin(tw)


def test_rtc_update_and_alarm_interrupts_alone_are_armed_again():
    def drive(tw):
        rtc_write(tw.a, 0x01, 0x55)             # alarm at hh:mm:55 (BCD), any minute and hour
        rtc_write(tw.a, 0x03, 0xC0)
        rtc_write(tw.a, 0x05, 0xC0)
        rtc_write(tw.a, 0x0B, 0x02 | 0x10 | 0x20)   # UIE, AIE
        tw.ta.advance(NS * 2)
        rtc_read(tw.a, 0x0C)
    def make(t, line):                          # the new host's clock has another phase within the second
        start = t.now_ns()
        base = BASE if start == T0 else BASE + 0.6
        return RTC(t, line, clock=lambda: base + (t.now_ns() - start) / NS)
    tw = Twin(make, drive)
    flags = []
    for _ in range(6):
        tw.advance(NS // 2)
        flags.append(tw.both(lambda r: rtc_read(r, 0x0C)))
    assert tw.la.events == tw.lb.events == [("pulse", (k * NS) - NS // 4) for k in (1, 2, 3)]
    assert flags == [0, 0x90, 0, 0x90, 0, 0x90 | 0x20]     # :53, :54, :55 and the alarm (the snapshot at :52.25)


def test_rtc_frozen_while_set_keeps_the_written_time():
    def drive(tw):
        rtc_write(tw.a, 0x0B, 0x82)             # SET
        rtc_write(tw.a, 0x02, 0x30)             # minutes 30, not applied yet
        tw.ta.advance(NS)
    tw = Twin(make_rtc(BASE), drive)
    tw.advance(5 * NS)
    assert tw.both(lambda r: rtc_read(r, 2)) == 0x30
    tw.both(lambda r: rtc_write(r, 0x0B, 0x02))  # release: the written time becomes the clock
    tw.advance(2 * NS)
    assert tw.both(lambda r: [rtc_read(r, i) for i in (0, 2, 4)]) == [0x52, 0x30, 0x23]


# -- HPET -----------------------------------------------------------------------------------------------------

class HpetLines:
    def __init__(self, line):
        self.line, self.levels = line, {}

    def __call__(self, pin, level):
        if level:
            self.line.events.append((pin, self.line.t.now_ns() - self.line.origin))
        self.levels[pin] = level


def make_hpet(t, line):
    h = HPET(t, HpetLines(line))
    h.irqs = h._irq
    return h


def hpet_drive(tw):
    h = tw.a
    h.write(0x10, 4, 1 | 2)                         # enable, legacy route
    delta = HPET_FREQ // 250
    h.write(0x100, 4, h.read(0x100, 4) | 0x4 | 0x8 | 0x40 | 0x100)    # timer 0: periodic 32-bit
    cnt = h.read(0xF0, 4)
    h.write(0x108, 4, cnt + delta)
    h.write(0x108, 4, delta)
    h.write(0x140, 4, 0x2 | 0x4 | (21 << 9))        # timer 2: level one-shot on pin 21
    h.write(0x148, 8, cnt + 500)
    h.write(0x150, 8, 0xFEE00000_00004041)          # FSB route: stored only
    h.write(0x120, 4, 0x4 | (20 << 9))              # timer 1: one-shot far ahead (legacy route: pin 8)
    h.write(0x128, 8, cnt + 10 * HPET_FREQ)
    tw.ta.advance(NS // 3 + 777)


def test_hpet_counter_periodic_and_level_interrupts_go_on_shifted():
    tw = Twin(make_hpet, hpet_drive)
    assert tw.b.irqs.levels == {21: True}           # the pending level interrupt is asserted again
    assert tw.restore_events == [(21, 0)]
    assert tw.both(lambda h: [h.read(o, 8) for o in (0x10, 0x20, 0xF0, 0x100, 0x108, 0x120, 0x128, 0x140, 0x150)])
    tw.advance(NS)
    tw.both(lambda h: [h.read(o, 8) for o in (0x20, 0xF0, 0x108)])
    assert tw.la.events == tw.lb.events
    edges = [t for p, t in tw.lb.events if p == 2]
    assert len(edges) in (249, 250, 251)
    assert all(b - a in (ticks_ns(HPET_FREQ // 250, HPET_FREQ) - 1, ticks_ns(HPET_FREQ // 250, HPET_FREQ),
                         ticks_ns(HPET_FREQ // 250, HPET_FREQ) + 1) for a, b in zip(edges, edges[1:]))
    tw.both(lambda h: h.write(0x20, 4, 0x4))        # the guest acknowledges the level interrupt
    assert tw.b.irqs.levels[21] is False
    tw.advance(10 * NS)
    assert tw.la.events == tw.lb.events
    assert [t for p, t in tw.lb.events if p == 8] == [ticks_ns(10 * HPET_FREQ, HPET_FREQ) - (tw.snap_at - T0)]


def test_hpet_halted_counter_stays_put():
    def drive(tw):
        tw.a.write(0x10, 4, 1)
        tw.ta.advance(NS)
        tw.a.write(0x10, 4, 0)
    tw = Twin(make_hpet, drive)
    tw.advance(NS)
    assert tw.both(lambda h: h.read(0xF0, 8)) in range(HPET_FREQ - 1, HPET_FREQ + 2)
    assert tw.tb.pending() == 0


# -- PM timer -------------------------------------------------------------------------------------------------

def test_pmtimer_counter_goes_on_from_the_same_value():
    def drive(tw):
        tw.ta.advance(123_456_789)
    tw = Twin(lambda t, line: PMTimer(t), drive)
    for step in (0, 1000, NS):
        tw.advance(step)
        assert tw.both(lambda p: p.read(0, 4)) == tw.a.counter()
    assert tw.b.read(0, 4) != PMTimer(tw.tb).read(0, 4)


# -- bad states -----------------------------------------------------------------------------------------------

def fresh_devices():
    t = ManualTimers(start_ns=T0)
    pit = PIT8254(t, RecordingLine())
    return [pit, NMISC(pit), RTC(t, RecordingLine(), clock=lambda: BASE), HPET(t, lambda p, lv: None), PMTimer(t),
            UART16550(RecordingLine()), PowerManagement(RecordingLine()), PostPort(), KeyboardController(),
            DebugExit(lambda s: None)]


@pytest.mark.parametrize("index", range(10))
def test_bad_states_raise_snapshot_error(index):
    dev = fresh_devices()[index]
    assert isinstance(dev, Snapshottable)
    good = roundtrip(dev.snapshot())
    fresh = fresh_devices()[index]
    fresh.restore(roundtrip(good), 0)
    assert roundtrip(fresh.snapshot()) == good or isinstance(fresh, RTC)
    bad = [dict(good, version=good["version"] + 1), dict(good, device="Other"), "not a dict"]
    bad += [{k: v for k, v in good.items() if k != key} for key in good if key not in ("device", "version")]
    for state in bad:
        with pytest.raises(SnapshotError):
            fresh_devices()[index].restore(state, 0)


@pytest.mark.parametrize("patch", [
    lambda s: s["pit"]["channels"][0].update(mode=9),
    lambda s: s["pit"]["channels"][1].update(latch=[1, 2, 3]),
    lambda s: s["pit"]["channels"][2].pop("load_ns"),
    lambda s: s["pit"].update(channels=s["pit"]["channels"][:2]),
    lambda s: s["pit"]["channels"][0].update(initial="12"),
    lambda s: s["rtc"].update(cmos="00" * 127),
    lambda s: s["rtc"].update(cmos="zz"),
    lambda s: s["rtc"].update(periodic={"start_ns": 0, "period_ns": 0, "n": 1}),
    lambda s: s["hpet"]["timers"][1].update(comparator=-1),
    lambda s: s["hpet"]["timers"].pop(),
    lambda s: s["uart"].update(rx="00" * 17),
    lambda s: s["uart"].update(ier=256),
    lambda s: s["kbc"].update(out=[1, 2]),
    lambda s: s["pm"].update(pm1_enable=1 << 15),
    lambda s: s["post"].update(value=256),
    lambda s: s["nmisc"].update(value=4),
])
def test_out_of_range_fields_raise_snapshot_error(patch):
    t = ManualTimers(start_ns=T0)
    devs = {"pit": PIT8254(t, RecordingLine()), "rtc": RTC(t, RecordingLine()), "hpet": HPET(t, lambda p, lv: None),
            "uart": UART16550(RecordingLine()), "kbc": KeyboardController(), "pm": PowerManagement(RecordingLine()),
            "post": PostPort()}
    devs["nmisc"] = NMISC(devs["pit"])
    states = {k: roundtrip(d.snapshot()) for k, d in devs.items()}
    patch(states)
    t2 = ManualTimers(start_ns=T0)
    pit2 = PIT8254(t2, RecordingLine())
    fresh = {"pit": pit2, "rtc": RTC(t2, RecordingLine()), "hpet": HPET(t2, lambda p, lv: None),
             "uart": UART16550(RecordingLine()), "kbc": KeyboardController(), "pm": PowerManagement(RecordingLine()),
             "post": PostPort(), "nmisc": NMISC(pit2)}
    failed = []
    for k, d in fresh.items():
        try:
            d.restore(states[k], 0)
        except SnapshotError:
            failed.append(k)
    assert len(failed) == 1
