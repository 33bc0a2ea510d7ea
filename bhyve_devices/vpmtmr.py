"""The ACPI power-management timer (bhyve's ``vpmtmr``) at port 0x408.

Spec: ACPI 6.x, section 4.8.3.3 "Power Management Timer (PM_TMR)": a free-running counter at 3.579545 MHz read
through the 32-bit PM_TMR_BLK; with TMR_VAL_EXT clear in the FADT the counter is 24 bits wide and bits 24-31 read
as zero. The value is computed from the :class:`TimerService` clock on every read; nothing ticks.

Not supported: TMR_STS/TMR_EN (the PM1 timer-carry SCI when bit 23 flips; ``bhyve_devices.pm`` keeps the bit at
zero, as bhyve does), the 32-bit TMR_VAL_EXT mode (``bits=32`` in the constructor gives it). Writes are ignored.

Snapshots (``snapshot.py``): the counter's time base (``start_ns``, a timer-service time) moved by the shift,
so the counter reads the same at the same guest-relative time. The width is configuration.
"""

from .snapshot import SnapshotError, check, header

PMTMR_HZ = 3579545
NS = 1_000_000_000


class PMTimer:
    """PM_TMR: a read-only counter; offset 0..3 of the 4-byte block, reads of 1, 2 or 4 bytes."""

    def __init__(self, timers, bits=24):
        self._timers = timers
        self._mask = (1 << bits) - 1
        self._start = timers.now_ns()

    def counter(self):
        return (self._timers.now_ns() - self._start) * PMTMR_HZ // NS & self._mask

    def read(self, offset, size):
        if not 0 <= offset < 4:
            return (1 << (8 * size)) - 1
        v = self.counter() >> (8 * offset)
        return v & ((1 << (8 * size)) - 1)

    def write(self, offset, size, value):
        pass

    snapshot_version = 1

    def snapshot(self):
        return {**header(self), "start_ns": self._start}

    def restore(self, state, shift_ns):
        check(self, state, ("start_ns",))
        if not isinstance(state["start_ns"], int) or isinstance(state["start_ns"], bool):
            raise SnapshotError("PMTimer: start_ns is not an int")
        self._start = state["start_ns"] + shift_ns
