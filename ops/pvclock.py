"""The paravirtual clock (``kvmclock``): the KVM clock MSRs, answered in the ops layer on every provider.

Follows the KVM paravirtual interface as Linux documents it (``Documentation/virt/kvm/x86/msr.rst`` and
``cpuid.rst``) and Linux's ``pvclock`` ABI (``struct pvclock_vcpu_time_info``, ``struct pvclock_wall_clock``):

- The guest finds it through KVM's signature and ``KVM_FEATURE_CLOCKSOURCE2`` (``ops/kvm_para.py``).
- ``MSR_KVM_SYSTEM_TIME_NEW`` (0x4b564d01): the guest writes the physical address of its vCPU's time record with
  bit 0 set (0 turns it off); we fill the record: the guest TSC at a moment, nanoseconds since the VM started at
  that moment, and the TSC-to-nanosecond scale ``ns = ((tsc - tsc_timestamp) << shift) * mul >> 32`` (a negative
  shift shifts right). The guest reads the TSC without an exit, so an idle Linux no longer reads the HPET a
  hundred times a second. ``version`` is odd while a record is written (the guest retries).
- ``MSR_KVM_WALL_CLOCK_NEW`` (0x4b564d00): the guest writes an address; we write there the wall-clock time at
  which system time was zero.

Used where the provider has no paravirtual clock of its own (NVMM, the soft CPU). On KVM the ops layer lets KVM's
kvmclock answer these MSRs (``Machine.kernel_pvclock()``): KVM rewrites the record at every entry, which a
user-space clock cannot, and that matters where KVM rewinds the guest TSC on entry because the host's TSC is
unstable (the nested lab's L1: "TSCs unsynchronized"). There this module's records ran ahead of the guest's TSC
now and then; the guest's clock froze and Linux hung in ``poweroff -f`` (3 of 4 MP-table boots).

The record is refreshed at most once a second (:meth:`Pvclock.maybe_refresh`, called on the vCPU's halts and
clock MSR writes) from a new (TSC, host monotonic time) pair, with the TSC rate measured over the life of the
record once it is long enough: so the guest's clock follows the host's even when the provider's TSC frequency
is a little off (a nested KVM's calibration). The provider tells the frequency (``Vcpu.tsc_frequency()``);
without it there is no paravirtual clock (the feature bit is not offered).

Not supported: ``PVCLOCK_TSC_STABLE_BIT`` and ``KVM_FEATURE_CLOCKSOURCE_STABLE_BIT`` (the records of different
vCPUs are refreshed independently, so the guest keeps its own monotonic guard), the old MSRs 0x11/0x12
(``KVM_FEATURE_CLOCKSOURCE``).
"""

import struct
import time

import construct as cs

MSR_KVM_WALL_CLOCK_NEW = 0x4B564D00
MSR_KVM_SYSTEM_TIME_NEW = 0x4B564D01
MSRS = (MSR_KVM_WALL_CLOCK_NEW, MSR_KVM_SYSTEM_TIME_NEW)
SYSTEM_TIME_ENABLE = 1 << 0

NSEC_PER_SEC = 1_000_000_000
REFRESH_NS = NSEC_PER_SEC           # how often a record is rewritten from a new (TSC, time) pair
MEASURE_MIN_NS = 2 * NSEC_PER_SEC   # a measured TSC rate is trusted over at least this long ...
MEASURE_MAX_SKEW = 0.05             # ... and when it is within 5 % of the provider's frequency
#: How far back on the (TSC, time) line a record is anchored. KVM on a host whose TSC it finds unstable (L1 in the
#: lab, now and then) puts the guest's TSC back to its value at the last exit on every vCPU load, so the TSC we
#: read during the exit can be ahead of what the guest reads after re-entry; a TSC below ``tsc_timestamp`` makes
#: Linux's unsigned delta enormous and its clock stops at that reading for good. 10 ms is far beyond that gap.
ANCHOR_BACK_NS = 10_000_000

#: ``struct pvclock_vcpu_time_info`` (32 bytes, Linux ``asm/pvclock-abi.h``).
PVCLOCK_VCPU_TIME_INFO = cs.Struct(
    "version" / cs.Int32ul,
    "pad0" / cs.Int32ul,
    "tsc_timestamp" / cs.Int64ul,
    "system_time" / cs.Int64ul,
    "tsc_to_system_mul" / cs.Int32ul,
    "tsc_shift" / cs.Int8sl,
    "flags" / cs.Int8ul,
    "pad" / cs.Bytes(2),
)
#: ``struct pvclock_wall_clock`` (12 bytes, packed).
PVCLOCK_WALL_CLOCK = cs.Struct(
    "version" / cs.Int32ul,
    "sec" / cs.Int32ul,
    "nsec" / cs.Int32ul,
)
TIME_INFO_SIZE = PVCLOCK_VCPU_TIME_INFO.sizeof()
WALL_CLOCK_SIZE = PVCLOCK_WALL_CLOCK.sizeof()
# the formats the writers use, matching the layouts (the asserts below and the round-trip test check them;
# construct stays off the exit path)
_VERSION = struct.Struct("<I")
_TIME_BODY = struct.Struct("<QQIbB")           # tsc_timestamp .. flags, written between the two versions
_OFF_TIME_BODY = 8
_WALL_BODY = struct.Struct("<II")
assert TIME_INFO_SIZE == 32 and WALL_CLOCK_SIZE == 12
assert _OFF_TIME_BODY + _TIME_BODY.size + 2 == TIME_INFO_SIZE


def time_scale(hz):
    """``(mul, shift)`` such that ``((ticks << shift) * mul) >> 32`` is ``ticks`` nanoseconds at ``hz``, with
    ``mul`` in [2**31, 2**32) for the best precision."""
    if not 1000 <= hz < 1 << 40:
        raise ValueError(f"TSC frequency {hz} Hz is out of range")
    shift = 0
    while hz << max(shift, 0) >> max(-shift, 0) < NSEC_PER_SEC:     # too slow: ticks must grow
        shift += 1
    while hz << max(shift, 0) >> max(-shift, 0) >= 2 * NSEC_PER_SEC:
        shift -= 1
    scaled = hz * (1 << shift) if shift >= 0 else hz / (1 << -shift)
    mul = int(NSEC_PER_SEC * (1 << 32) / scaled)
    return min(mul, 0xFFFFFFFF), shift


def ticks_to_ns(ticks, mul, shift):
    """What the guest computes (Linux ``pvclock_scale_delta``)."""
    ticks = ticks << shift if shift >= 0 else ticks >> -shift
    return (ticks * mul) >> 32


class Pvclock:
    """One vCPU's clock MSRs. ``view(gpa, size)`` gives a bounds-checked view of guest RAM (raising
    ``OSError``/``ValueError`` outside it); ``guest_tsc()`` reads the vCPU's TSC (it is not running);
    ``epoch_ns`` is the VM's zero of system time on ``time.monotonic_ns``."""

    def __init__(self, view, guest_tsc, hz, epoch_ns):
        self.view, self.guest_tsc, self.hz, self.epoch_ns = view, guest_tsc, hz, epoch_ns
        self.mul, self.shift = time_scale(hz)
        self.msr_value = {MSR_KVM_WALL_CLOCK_NEW: 0, MSR_KVM_SYSTEM_TIME_NEW: 0}
        self.record = None          # a view of the time record while enabled
        self.version = 0
        self.base = None            # (tsc, ns) of the first sample of this record: the rate's baseline
        self.last_ns = 0

    @staticmethod
    def handles_msr(msr):
        return msr in MSRS

    def rdmsr(self, msr):
        return self.msr_value[msr]

    def wrmsr(self, msr, value):
        """Any value is taken, as KVM takes it; a record outside guest RAM is not written."""
        value &= (1 << 64) - 1
        self.msr_value[msr] = value
        if msr == MSR_KVM_WALL_CLOCK_NEW:
            view = self._map(value, WALL_CLOCK_SIZE)
            if view is not None:
                self._write_wall_clock(view)
            return
        self.record = None
        if value & SYSTEM_TIME_ENABLE:
            self.record = self._map(value & ~SYSTEM_TIME_ENABLE, TIME_INFO_SIZE)
            self.base = None
            if self.record is not None:
                self.refresh()

    def maybe_refresh(self, now_ns):
        if self.record is not None and now_ns - self.last_ns >= REFRESH_NS:
            self.refresh()

    def refresh(self):
        """Rewrites the record from a new (TSC, time) pair."""
        tsc = self.guest_tsc()
        now = time.monotonic_ns()
        if self.base is None:
            self.base = (tsc, now)
        else:
            self._measure(tsc, now)
        back = min(ANCHOR_BACK_NS, now - self.epoch_ns, tsc * NSEC_PER_SEC // self.hz)
        rec = self.record
        self.version = (self.version + 1) | 1            # odd: being written
        _VERSION.pack_into(rec, 0, self.version & 0xFFFFFFFF)
        _TIME_BODY.pack_into(rec, _OFF_TIME_BODY, tsc - back * self.hz // NSEC_PER_SEC,
                             max(now - back - self.epoch_ns, 0), self.mul, self.shift, 0)
        self.version += 1
        _VERSION.pack_into(rec, 0, self.version & 0xFFFFFFFF)
        self.last_ns = now

    def _measure(self, tsc, now):
        tsc0, t0 = self.base
        if now - t0 < MEASURE_MIN_NS or tsc <= tsc0:
            return
        hz = (tsc - tsc0) * NSEC_PER_SEC / (now - t0)
        if abs(hz - self.hz) <= MEASURE_MAX_SKEW * self.hz:
            self.mul, self.shift = time_scale(int(hz))

    def _write_wall_clock(self, view):
        boot_ns = time.time_ns() - (time.monotonic_ns() - self.epoch_ns)
        version = (_VERSION.unpack_from(view, 0)[0] + 1) | 1
        _VERSION.pack_into(view, 0, version & 0xFFFFFFFF)
        _WALL_BODY.pack_into(view, 4, (boot_ns // NSEC_PER_SEC) & 0xFFFFFFFF, boot_ns % NSEC_PER_SEC)
        _VERSION.pack_into(view, 0, (version + 1) & 0xFFFFFFFF)

    def _map(self, gpa, size):
        """A view of the record, or None where it is not all in guest RAM (KVM then writes nothing and raises
        no fault either)."""
        try:
            return self.view(gpa, size)
        except (OSError, ValueError):
            return None
