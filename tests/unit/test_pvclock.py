"""``ops/pvclock.py`` as pure logic: the layouts round-trip and agree with the writers' formats, the TSC scale is
exact to a part in 10^9 for any plausible rate, records and wall clock are written as the guest reads them, and
the rate measured over a record's life replaces a slightly wrong provider frequency (the guest's clock then runs
at the host's rate)."""

import struct

import pytest

from ops import pvclock as P


def test_layouts_round_trip_and_match_the_formats():
    rec = dict(version=7, pad0=0, tsc_timestamp=0x1122334455667788, system_time=123456789012,
               tsc_to_system_mul=0x9ABCDEF0, tsc_shift=-2, flags=1, pad=b"\0\0")
    raw = P.PVCLOCK_VCPU_TIME_INFO.build(rec)
    assert len(raw) == P.TIME_INFO_SIZE == 32
    parsed = P.PVCLOCK_VCPU_TIME_INFO.parse(raw)
    assert {k: v for k, v in parsed.items() if not k.startswith("_")} == rec
    assert struct.unpack_from("<I", raw, 0)[0] == 7
    assert P._TIME_BODY.unpack_from(raw, P._OFF_TIME_BODY) == (0x1122334455667788, 123456789012, 0x9ABCDEF0, -2, 1)
    wall = P.PVCLOCK_WALL_CLOCK.build(dict(version=2, sec=1_700_000_000, nsec=999_999_999))
    assert len(wall) == 12 and P._WALL_BODY.unpack_from(wall, 4) == (1_700_000_000, 999_999_999)


@pytest.mark.parametrize("hz", [1_000_000, 100_000_000, 999_999_999, 1_000_000_000, 1_999_999_999,
                                2_599_998_000, 3_000_000_000, 4_294_967_296, 10_000_000_000])
def test_time_scale_converts_a_second_of_ticks_to_a_second(hz):
    mul, shift = P.time_scale(hz)
    assert 1 << 31 <= mul < 1 << 32 and -32 < shift < 32
    for seconds in (1, 10, 3600):
        ns = P.ticks_to_ns(hz * seconds, mul, shift)
        assert abs(ns - seconds * P.NSEC_PER_SEC) <= seconds * P.NSEC_PER_SEC * 2e-9 + 2


def test_time_scale_refuses_nonsense():
    for hz in (0, 999, 1 << 41):
        with pytest.raises(ValueError):
            P.time_scale(hz)


class FakeGuest:
    """Guest RAM as a bytearray and a TSC driven by the test's fake monotonic clock."""

    def __init__(self, hz, size=0x10000):
        self.ram, self.hz, self.now = bytearray(size), hz, 10 * P.NSEC_PER_SEC

    def view(self, gpa, size):
        if gpa < 0 or gpa + size > len(self.ram):
            raise OSError(14, "outside")
        return memoryview(self.ram)[gpa:gpa + size]

    def tsc(self):
        return self.now * self.hz // P.NSEC_PER_SEC

    def read_clock(self, gpa):
        """The guest's reading, as Linux's pvclock_clocksource_read computes it."""
        version, _, ts, system_time, mul, shift, _flags = struct.unpack_from("<IIQQIbB", self.ram, gpa)
        assert version % 2 == 0
        delta = (self.tsc() - ts) & (1 << 64) - 1           # unsigned, as in the guest
        return system_time + (P.ticks_to_ns(delta, mul, shift) & (1 << 64) - 1)


@pytest.fixture
def clock(monkeypatch):
    g = FakeGuest(hz=2_000_000_000)
    monkeypatch.setattr(P.time, "monotonic_ns", lambda: g.now)
    monkeypatch.setattr(P.time, "time_ns", lambda: 1_700_000_000 * P.NSEC_PER_SEC + g.now)
    return g


def test_record_reads_the_time_since_the_epoch_and_follows_refreshes(clock):
    epoch = clock.now - 5 * P.NSEC_PER_SEC
    pv = P.Pvclock(clock.view, clock.tsc, clock.hz, epoch)
    pv.wrmsr(P.MSR_KVM_SYSTEM_TIME_NEW, 0x100 | P.SYSTEM_TIME_ENABLE)
    assert pv.rdmsr(P.MSR_KVM_SYSTEM_TIME_NEW) == 0x101
    assert abs(clock.read_clock(0x100) - 5 * P.NSEC_PER_SEC) <= 2
    clock.now += 250_000_000
    pv.maybe_refresh(clock.now)               # too soon: not rewritten, the TSC carries the time
    assert abs(clock.read_clock(0x100) - 5_250_000_000) <= 1
    clock.now += P.REFRESH_NS
    version = struct.unpack_from("<I", clock.ram, 0x100)[0]
    pv.maybe_refresh(clock.now)
    assert struct.unpack_from("<I", clock.ram, 0x100)[0] == version + 2
    assert abs(clock.read_clock(0x100) - (clock.now - epoch)) <= 2


def test_a_guest_tsc_behind_the_one_read_at_the_exit_reads_sanely(clock):
    """KVM with an unstable host TSC gives the guest back its TSC of the last exit on re-entry, a little behind
    the one read while handling the exit: the record is anchored before it, so the guest's unsigned delta
    stays small instead of wrapping (which froze a lab guest's clock for good)."""
    pv = P.Pvclock(clock.view, clock.tsc, clock.hz, clock.now - P.NSEC_PER_SEC)
    pv.wrmsr(P.MSR_KVM_SYSTEM_TIME_NEW, 0x100 | 1)
    clock.now -= 2_000_000                    # the guest resumes with a TSC 2 ms behind
    reading = clock.read_clock(0x100)
    assert abs(reading - (P.NSEC_PER_SEC - 2_000_000)) <= 2


def test_a_wrong_frequency_is_corrected_by_the_measured_rate(clock):
    epoch = clock.now
    pv = P.Pvclock(clock.view, clock.tsc, int(clock.hz * 1.02), epoch)   # the provider is 2 % off
    pv.wrmsr(P.MSR_KVM_SYSTEM_TIME_NEW, 0x200 | 1)
    for _ in range(3):
        clock.now += P.REFRESH_NS
        pv.maybe_refresh(clock.now)
    start, start_ns = clock.read_clock(0x200), clock.now
    clock.now += 10 * P.NSEC_PER_SEC - 1    # no refresh: the guest extrapolates with the measured rate
    elapsed = clock.read_clock(0x200) - start
    assert abs(elapsed - (clock.now - start_ns)) < (clock.now - start_ns) * 1e-6


def test_wall_clock_is_the_time_of_system_time_zero(clock):
    epoch = clock.now - 3 * P.NSEC_PER_SEC
    pv = P.Pvclock(clock.view, clock.tsc, clock.hz, epoch)
    pv.wrmsr(P.MSR_KVM_WALL_CLOCK_NEW, 0x300)
    version, sec, nsec = struct.unpack_from("<3I", clock.ram, 0x300)
    assert version % 2 == 0 and version
    assert sec * P.NSEC_PER_SEC + nsec == 1_700_000_000 * P.NSEC_PER_SEC + epoch


def test_records_outside_guest_ram_are_taken_and_never_written(clock):
    pv = P.Pvclock(clock.view, clock.tsc, clock.hz, clock.now)
    before = bytes(clock.ram)
    for msr, value in ((P.MSR_KVM_SYSTEM_TIME_NEW, len(clock.ram) - 16 | 1), (P.MSR_KVM_SYSTEM_TIME_NEW, 1 << 63 | 1),
                       (P.MSR_KVM_WALL_CLOCK_NEW, len(clock.ram) - 4), (P.MSR_KVM_WALL_CLOCK_NEW, -8)):
        pv.wrmsr(msr, value)
        assert pv.rdmsr(msr) == value & (1 << 64) - 1
    clock.now += 5 * P.REFRESH_NS
    pv.maybe_refresh(clock.now)
    assert bytes(clock.ram) == before


def test_disabling_stops_the_updates(clock):
    pv = P.Pvclock(clock.view, clock.tsc, clock.hz, clock.now)
    pv.wrmsr(P.MSR_KVM_SYSTEM_TIME_NEW, 0x400 | 1)
    pv.wrmsr(P.MSR_KVM_SYSTEM_TIME_NEW, 0x400)
    snapshot = bytes(clock.ram)
    clock.now += 5 * P.REFRESH_NS
    pv.maybe_refresh(clock.now)
    assert bytes(clock.ram) == snapshot
