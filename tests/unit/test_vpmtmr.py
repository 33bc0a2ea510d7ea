"""The ACPI PM timer: 24 bits at 3.579545 MHz."""

from hypothesis import given, settings, strategies as st

from bhyve_devices.base import ManualTimers
from bhyve_devices.vpmtmr import PMTMR_HZ, PMTimer


def test_counts_at_3_579545_mhz():
    t = ManualTimers(start_ns=123_456_789)
    pm = PMTimer(t)
    assert pm.read(0, 4) == 0
    t.advance(1_000_000)  # 1 ms
    assert abs(pm.read(0, 4) - 3579.545) <= 1
    t.advance(999_000_000)  # 1 s in all
    assert abs(pm.read(0, 4) - PMTMR_HZ) <= 1


def test_24_bit_wrap_and_narrow_reads():
    t = ManualTimers()
    pm = PMTimer(t)
    t.advance(5 * 10**9)  # 17.9M ticks: past 2**24
    v = pm.read(0, 4)
    assert v < 1 << 24
    assert abs(v - (5 * PMTMR_HZ) % (1 << 24)) <= 1
    assert pm.read(0, 2) == v & 0xFFFF
    assert pm.read(2, 1) == (v >> 16) & 0xFF
    assert pm.read(3, 1) == 0
    pm.write(0, 4, 0)
    assert pm.read(0, 4) == v


def test_monotonic_linux_style_delta():
    """Linux's acpi_pm_read: three reads, the delta wraps modulo 2**24."""
    t = ManualTimers()
    pm = PMTimer(t)
    prev = pm.read(0, 4)
    total = 0
    for _ in range(1000):
        t.advance(7_777_777)
        cur = pm.read(0, 4)
        total += (cur - prev) & 0xFFFFFF
        prev = cur
    assert abs(total - 7_777_777_000 * PMTMR_HZ // 10**9) <= 1


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 7), st.sampled_from([1, 2, 4]), st.integers(0, 2**32 - 1))
def test_any_access_never_raises(off, size, val):
    pm = PMTimer(ManualTimers())
    pm.write(off, size, val)
    assert 0 <= pm.read(off, size) < 1 << (8 * size)
