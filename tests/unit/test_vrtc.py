"""The MC146818 RTC driven as Linux's mc146818 helpers and rtc-cmos drive it."""

import calendar
import time

from hypothesis import given, settings, strategies as st

from bhyve_devices.base import ManualTimers, RecordingLine
from bhyve_devices.vrtc import REG_A, REG_B, REG_C, RTC

NS = 1_000_000_000
BASE = calendar.timegm((2024, 2, 29, 23, 59, 50, 0, 0, 0)) + 0.25  # a Thursday


class Driver:
    def __init__(self, base=BASE, **kw):
        self.t = ManualTimers()
        self.irq = RecordingLine()
        self.rtc = RTC(self.t, self.irq, clock=lambda: base + self.t.now_ns() / NS, **kw)

    def read(self, reg):
        self.rtc.write(0, 1, reg)
        return self.rtc.read(1, 1)

    def write(self, reg, v):
        self.rtc.write(0, 1, reg)
        self.rtc.write(1, 1, v)


def bcd(v):
    return (v // 10) << 4 | v % 10


def test_layouts_round_trip():
    for layout in (REG_A, REG_B, REG_C):
        for v in range(256):
            assert layout.build(layout.parse(bytes([v]))) == bytes([v])
    assert REG_B.parse(b"\x02").hour24


def test_bcd_24h_time_and_rollover():
    d = Driver()
    assert [d.read(r) for r in (0, 2, 4, 6, 7, 8, 9, 0x32)] == [0x50, 0x59, 0x23, 0x05, 0x29, 0x02, 0x24, 0x20]
    d.t.advance(10 * NS)
    assert [d.read(r) for r in (0, 2, 4, 6, 7, 8, 9)] == [0x00, 0x00, 0x00, 0x06, 0x01, 0x03, 0x24]
    assert d.read(0x0D) == 0x80


def test_binary_and_12_hour_modes():
    d = Driver()
    d.write(0x0B, 0x04)  # binary, 12 h
    assert d.read(4) == 0x80 | 11 and d.read(0) == 50 and d.read(9) == 24
    d.write(0x0B, 0x00)  # BCD, 12 h
    assert d.read(4) == 0x80 | 0x11


def test_localtime_when_not_utc():
    d = Driver(utc=False)
    off = time.localtime(BASE).tm_gmtoff
    tm = time.gmtime(BASE + off)
    assert d.read(4) == bcd(tm.tm_hour) and d.read(2) == bcd(tm.tm_min)


def test_linux_set_time_with_set_and_divider_reset():
    d = Driver()
    save_control = d.read(0x0B)
    d.write(0x0B, save_control | 0x80)
    save_freq = d.read(0x0A)
    d.write(0x0A, save_freq | 0x70)
    for reg, v in ((9, 0x99), (0x32, 0x19), (8, 0x12), (7, 0x31), (4, 0x23), (2, 0x59), (0, 0x58)):
        d.write(reg, v)
    d.t.advance(5 * NS)  # frozen: nothing moves
    assert d.read(0) == 0x58
    d.write(0x0B, save_control)
    d.write(0x0A, save_freq)
    d.t.advance(2 * NS)
    assert [d.read(r) for r in (0, 2, 4, 7, 8, 9, 0x32)] == [0x00, 0x00, 0x00, 0x01, 0x01, 0x00, 0x20]
    assert abs(d.rtc.offset - (calendar.timegm((1999, 12, 31, 23, 59, 58)) - (BASE + 5))) < 1e-6


def test_write_time_register_while_running():
    d = Driver()
    d.write(2, 0x10)
    assert d.read(2) == 0x10 and d.read(0) == 0x50 and d.read(4) == 0x23


def test_periodic_interrupt_rate_and_reg_c():
    d = Driver()
    d.write(0x0A, 0x26)  # 1024 Hz
    d.write(0x0B, 0x02 | 0x40)
    d.t.advance(NS // 1024)
    assert d.irq.pulses == 1
    d.t.advance(NS // 1024)
    assert d.irq.pulses == 1  # IRQF still set: no new edge until C is read
    c = d.read(0x0C)
    assert c & 0xC0 == 0xC0
    assert d.read(0x0C) & 0x40 == 0
    for _ in range(1023):  # the handler reads C on every interrupt
        d.t.advance(NS // 1024)
        d.read(0x0C)
    assert d.irq.pulses in (1023, 1024, 1025)
    d.write(0x0A, 0x2F)  # RS 15: 2 Hz
    p = d.irq.pulses
    d.t.advance(NS)
    d.read(0x0C)
    d.t.advance(NS)
    assert d.irq.pulses - p == 2  # 2 Hz, but IRQF stays latched until C is read


def test_periodic_rs1_is_256hz():
    d = Driver()
    d.write(0x0A, 0x21)
    d.write(0x0B, 0x42)
    for _ in range(256):
        d.t.advance(NS // 256 + 1)
        d.read(0x0C)
    assert d.irq.pulses == 256


def test_update_ended_interrupt():
    d = Driver()
    d.write(0x0B, 0x12)  # UIE
    d.t.advance(NS * 3 // 4)  # 0.75 s: the boundary
    assert d.irq.pulses == 1
    assert d.read(0x0C) == 0x90
    d.t.advance(NS)
    assert d.irq.pulses == 2


def test_alarm_interrupt():
    d = Driver()
    d.write(1, 0x55)
    d.write(3, 0xC0)  # don't care
    d.write(5, 0xFF)
    d.write(0x0B, 0x22)  # AIE
    d.t.advance(4 * NS)
    assert d.irq.pulses == 0
    d.read(0x0C)
    d.t.advance(2 * NS)
    assert d.irq.pulses == 1
    assert d.read(0x0C) & 0xA0 == 0xA0


def test_uip_window():
    d = Driver(base=BASE - 0.25 + 0.9999)  # 100 us before a boundary
    assert d.read(0x0A) & 0x80
    d.t.advance(200_000)
    assert not d.read(0x0A) & 0x80
    d.write(0x0A, 0xA6)  # UIP is read-only
    assert d.read(0x0A) == 0x26


def test_uie_lazy_flag_and_set_clears_uie():
    d = Driver()
    d.read(0x0C)
    d.t.advance(NS)
    assert d.read(0x0C) == 0x10  # UF without UIE: no IRQF
    d.write(0x0B, 0x92)
    assert d.read(0x0B) == 0x82


def test_index_port_nmi_bit_and_nvram():
    d = Driver()
    d.rtc.write(0, 1, 0x80 | 0x40)
    assert d.rtc.nmi_disabled and d.rtc.index == 0x40
    d.rtc.write(1, 1, 0xAB)
    assert d.read(0x40) == 0xAB and not d.rtc.nmi_disabled
    assert d.rtc.read(0, 1) == 0xFF


def test_memsize_bytes():
    d = Driver(memsize=(2 << 30, 1 << 30))
    r = d.read
    assert r(0x15) | r(0x16) << 8 == 640
    assert r(0x17) | r(0x18) << 8 == 0xFFFF == r(0x30) | r(0x31) << 8
    assert r(0x34) | r(0x35) << 8 == ((2 << 30) - (16 << 20)) // 65536
    assert r(0x5B) | r(0x5C) << 8 | r(0x5D) << 16 == (1 << 30) // 65536
    assert r(0x2E) << 8 | r(0x2F) == sum(r(i) for i in range(0x10, 0x2E))
    d2 = Driver(memsize=32 << 20)
    assert d2.read(0x17) | d2.read(0x18) << 8 == 31 * 1024
    assert d2.read(0x34) | d2.read(0x35) << 8 == 256
    d3 = Driver(memsize=4 << 30)
    assert d3.read(0x5B) | d3.read(0x5C) << 8 == (1 << 30) // 65536


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.integers(-1, 2), st.sampled_from([1, 2, 4]), st.integers(0, 2**32 - 1),
                          st.booleans(), st.integers(0, 3 * 10**9)), max_size=40))
def test_any_access_never_raises(ops):
    d = Driver()
    for off, size, val, is_write, dt in ops:
        if is_write:
            d.rtc.write(off, size, val & ((1 << (8 * size)) - 1))
        else:
            assert 0 <= d.rtc.read(off, size) < 1 << (8 * size)
        d.t.advance(dt)
