"""The 8254 programmable interval timer (bhyve's ``vatpit``) at ports 0x40-0x43, and port 0x61 (NMISC).

Spec: Intel 8254 Programmable Interval Timer datasheet (order 231164): three 16-bit down counters at 1.193182
MHz, control word at 0x43 (SC1 SC0 RW1 RW0 M2 M1 M0 BCD), counter-latch command (RW = 00), read-back command
(SC = 11: bit 5 COUNT#, bit 4 STATUS#, bits 3-1 counters), status byte (OUT, NULL COUNT, RW, M, BCD).

Nothing ticks: a counter remembers when it was loaded (in :class:`TimerService` nanoseconds) and its count and
OUT are computed from the elapsed time on every read, so what the guest reads follows wall time however late the
timer thread runs. Channel 0 arms one timer for its next rising OUT edge and pulses the IRQ0 line there.

Late ticks (modes 2 and 3): every periodic edge gets its own IRQ0 pulse. Edge k is due at load + k periods (never
"now + a period": no drift). When the timer thread ran late, the edges that passed go out one by one (catch-up,
``catchup.py``), period / (backlog + 1) apart as QEMU's RTC slew spaces its reinjections (2 to 8 a period), but at
least 1 ms apart (half a period at most) so each can reach the guest through a controller that holds one pending
edge per pin. A line whose ``pulse()`` returns False (merged with an edge still pending, QEMU's
``apic_get_irq_delivered``) gets that edge again, as KVM's PIT reinjects an unacknowledged tick; None counts as
delivered. The VM's IRQ0 line reports merged only the edges the host held up (a vCPU that did not run); one the
guest kept waiting while it ran with interrupts off is lost there, as on a PC (``ops/edge_merge.py``). Why: Linux
without ACPI calibrates its LAPIC timer by counting IRQ0s over HZ/10 jiffies and then checks it against jiffies
(``calibrate_APIC_clock``); a lost tick skews both. bhyve also re-arms from the scheduled time but restarts from now
once a period late (the missed edges are lost); QEMU's i8254 fires them back to back (the 8259 merges them). Edges
over a second late (a stopped VM, a host asleep) are dropped.

:class:`NMISC` is port 0x61 as Linux's ``pit_calibrate_tsc``/``quick_pit_calibrate`` use it: bit 0 gates
channel 2, bit 1 is speaker data, bit 4 the refresh toggle (flips every 15.085 us), bit 5 OUT2.

Snapshots (``snapshot.py``): every channel's programming, count, latches and flip-flops, its load time and
channel 0's armed IRQ0 deadline, moved by the restore's shift (``vatpit_state.py``); NMISC saves its two bits.
The refresh toggle of port 0x61 follows the new clock's phase.

Not supported: gates of channels 0 and 1 (always high); in modes 2 and 3 a new count takes effect at once
instead of at the end of the current period; mode 3 with an odd count is modelled as the even count below it
for the count value (OUT still uses the 8254 high/low split); no speaker sound; the one-clock load delay;
channel 0 periods below 60 ticks (50 us) pulse IRQ0 only every 50 us (the edges in between are coalesced, as an
edge-triggered PIC input would coalesce them when the guest is slow); no guest acknowledgement is seen (KVM's ack
notifier): where the line does not report merged edges, one that meets a still-pending edge merges there.
"""

import threading

from construct import BitStruct, BitsInteger, Enum, Flag

from .catchup import backlog_limit, catchup_delay
from . import vatpit_state
from .snapshot import SnapshotError, check, header

PIT_HZ = 1193182
NS = 1_000_000_000
MIN_PERIOD_TICKS = 60           # channel 0 pulses IRQ0 at most every 50 us (about 20 kHz)

# The control word (port 0x43), for documentation and tests; the access path uses ints.
CONTROL_WORD = BitStruct(
    "sc" / BitsInteger(2),
    "rw" / Enum(BitsInteger(2), latch=0, lsb=1, msb=2, both=3),
    "mode" / BitsInteger(3),
    "bcd" / Flag,
)
# The status byte returned by a read-back command.
STATUS_BYTE = BitStruct(
    "out" / Flag,
    "null_count" / Flag,
    "rw" / BitsInteger(2),
    "mode" / BitsInteger(3),
    "bcd" / Flag,
)

RW_LATCH, RW_LSB, RW_MSB, RW_BOTH = 0, 1, 2, 3


def _ticks_to_ns(ticks):
    return -(-ticks * NS // PIT_HZ)


def _bcd_to_bin(v):
    d = [(v >> s) & 0xF for s in (0, 4, 8, 12)]
    return sum(min(x, 9) * m for x, m in zip(d, (1, 10, 100, 1000)))


def _bin_to_bcd(v):
    v %= 10000
    return (v % 10) | (v // 10 % 10) << 4 | (v // 100 % 10) << 8 | (v // 1000) << 12


class _Channel:
    def __init__(self, index):
        self.index = index
        self.mode = 0
        self.rw = RW_BOTH
        self.bcd = False
        self.gate = index != 2          # channel 2's gate is port 0x61 bit 0, low at reset
        self.initial = 0                # the count loaded (1..65536 binary, 1..10000 BCD); 0: none loaded
        self.load_ns = None             # when counting (re)started; None: not counting
        self.frozen_ticks = 0           # ticks counted before the gate went low (modes 0 and 4)
        self.triggered = False          # modes 1 and 5: a gate rising edge has happened
        self.null_count = True
        self.wlow = None                # first byte of a two-byte write
        self.rflip = False              # the next read (RW both, no latch) returns the MSB
        self.rlatched_msb = None        # MSB snapshot taken when the LSB was read unlatched
        self.latch = None               # latched count: list of bytes still to read
        self.status = None              # latched status byte
        self.timer = None
        self.deadline = None            # when ``timer`` fires (kept for snapshots)
        self.timer_seq = 0              # which arm the pending callback belongs to
        self.step = 0                   # modes 2 and 3 on channel 0: ticks between two IRQ0 pulses
        self.next_edge = 0              # the periodic edge (1, 2, ... since the load) to pulse next

    def ticks(self, now):
        if self.load_ns is None:
            return self.frozen_ticks
        return self.frozen_ticks + (now - self.load_ns) * PIT_HZ // NS

    def modulus(self):
        return 10000 if self.bcd else 65536

    def count(self, now):
        """The counting element's value in binary (0..65535)."""
        n = self.initial
        if n == 0:
            return 0
        t = self.ticks(now)
        if self.load_ns is None and self.frozen_ticks == 0 and self.mode in (1, 5) and not self.triggered:
            return n % self.modulus()
        if self.mode in (2,):
            return n - t % n if n > 1 else n
        if self.mode == 3:
            half = max(n // 2, 1)
            return n - 2 * (t % half) if n > 1 else n
        return (n - t) % self.modulus()

    def out(self, now):
        if self.initial == 0:
            return self.mode != 0
        n, t = self.initial, self.ticks(now)
        if self.mode == 0:
            return t >= n
        if self.mode == 1:
            return not self.triggered or t >= n
        if self.mode == 2:
            return n <= 1 or t % n != n - 1
        if self.mode == 3:
            return t % n < (n + 1) // 2
        if self.mode == 4:
            return t != n
        if self.mode == 5:
            return not self.triggered or t != n
        return True


class PIT8254:
    """The 8254 at 0x40-0x43 (offsets 0-2: counters, 3: control). ``irq0`` gets a ``pulse()`` on every rising
    edge of channel 0's OUT."""

    def __init__(self, timers, irq0):
        self._timers = timers
        self._irq0 = irq0
        self._lock = threading.RLock()
        self.channels = [_Channel(i) for i in range(3)]
        self.speaker = False
        self._seq = 0                   # numbers every arm, so a stale callback knows it is stale
        self.pulses = 0                 # IRQ0 pulses delivered (debugging and tests)
        self.merged = 0                 # pulses the line reported merged with a pending one (sent again)
        self.dropped = 0                # periodic edges dropped past catchup.BACKLOG_LIMIT_NS of lateness

    # -- bus interface -------------------------------------------------------------------------------------
    def read(self, offset, size):
        val = 0
        for i in range(size):
            val |= self._read8(offset + i) << (8 * i)
        return val

    def write(self, offset, size, value):
        for i in range(size):
            self._write8(offset + i, (value >> (8 * i)) & 0xFF)

    # -- helpers used by NMISC -----------------------------------------------------------------------------
    def set_gate(self, index, level):
        with self._lock:
            c = self.channels[index]
            level = bool(level)
            if level == c.gate:
                return
            now = self._timers.now_ns()
            c.gate = level
            if c.initial == 0:
                return
            if not level:
                if c.mode in (0, 4, 1, 5) and c.load_ns is not None:
                    c.frozen_ticks = c.ticks(now)
                    c.load_ns = None
                elif c.mode in (2, 3):
                    c.load_ns, c.frozen_ticks = None, 0
            else:
                if c.mode in (1, 5, 2, 3):
                    c.frozen_ticks, c.load_ns, c.triggered = 0, now, True
                elif c.load_ns is None:
                    c.load_ns = now
            self._arm(c)

    def out(self, index):
        with self._lock:
            c = self.channels[index]
            if c.mode in (2, 3) and not c.gate and c.initial:
                return True
            return c.out(self._timers.now_ns())

    # -- byte accesses -------------------------------------------------------------------------------------
    def _read8(self, off):
        if off > 2:
            return 0xFF                 # the control register is write-only
        with self._lock:
            c = self.channels[off]
            if c.status is not None:
                v, c.status = c.status, None
                return v
            if c.latch:
                v = c.latch.pop(0)
                if not c.latch:
                    c.latch = None
                return v
            now = self._timers.now_ns()
            cnt = self._encode(c, c.count(now))
            if c.rw == RW_LSB:
                return cnt & 0xFF
            if c.rw == RW_MSB:
                return cnt >> 8
            if c.rflip:
                c.rflip = False
                msb, c.rlatched_msb = c.rlatched_msb, None
                return msb if msb is not None else cnt >> 8
            c.rflip = True
            c.rlatched_msb = cnt >> 8   # keep LSB and MSB consistent, as bhyve does
            return cnt & 0xFF

    def _encode(self, c, cnt):
        return _bin_to_bcd(cnt) if c.bcd else cnt & 0xFFFF

    def _latch_bytes(self, c, now):
        cnt = self._encode(c, c.count(now))
        if c.rw == RW_LSB:
            return [cnt & 0xFF]
        if c.rw == RW_MSB:
            return [cnt >> 8]
        if c.rflip:                     # latching mid-read continues with the MSB
            return [cnt >> 8]
        return [cnt & 0xFF, cnt >> 8]

    def _write8(self, off, val):
        with self._lock:
            now = self._timers.now_ns()
            if off == 3:
                self._control(val, now)
            elif off < 3:
                self._write_count(self.channels[off], val, now)

    def _control(self, val, now):
        sc = val >> 6
        if sc == 3:                     # read-back
            for i in range(3):
                if not val & (2 << i):
                    continue
                c = self.channels[i]
                if not val & 0x20 and c.latch is None:
                    c.latch = self._latch_bytes(c, now)
                if not val & 0x10 and c.status is None:
                    c.status = (int(self.out(i)) << 7 | int(c.null_count) << 6 | c.rw << 4 | c.mode << 1
                                | int(c.bcd))
            return
        c = self.channels[sc]
        rw = (val >> 4) & 3
        if rw == RW_LATCH:
            if c.latch is None:
                c.latch = self._latch_bytes(c, now)
            return
        mode = (val >> 1) & 7
        if mode > 5:
            mode -= 4                   # 6 and 7 are 2 and 3
        self._cancel(c)
        c.rw, c.mode, c.bcd = rw, mode, bool(val & 1)
        c.initial, c.load_ns, c.frozen_ticks, c.triggered = 0, None, 0, False
        c.null_count, c.wlow, c.rflip, c.rlatched_msb, c.latch, c.status = True, None, False, None, None, None

    def _write_count(self, c, val, now):
        if c.rw == RW_LSB:
            raw = val
        elif c.rw == RW_MSB:
            raw = val << 8
        elif c.wlow is None:
            c.wlow = val
            if c.mode == 0:             # writing the first byte stops a mode-0 count
                self._cancel(c)
                c.initial, c.load_ns, c.frozen_ticks = 0, None, 0
            return
        else:
            raw, c.wlow = c.wlow | val << 8, None
        n = _bcd_to_bin(raw) if c.bcd else raw
        if n == 0:
            n = c.modulus()
        if c.mode in (2, 3) and n == 1:
            n = 2 if c.mode == 3 else 1
        self._cancel(c)
        c.initial, c.null_count, c.frozen_ticks = n, False, 0
        if c.mode in (1, 5):
            c.triggered, c.load_ns = False, None
        else:
            c.load_ns = now if c.gate else None
        self._arm(c)

    # -- channel 0 interrupt -------------------------------------------------------------------------------
    def _cancel(self, c):
        if c.timer is not None:
            self._timers.cancel(c.timer)
            c.timer = None

    def _set_timer(self, c, deadline):
        self._seq += 1
        c.timer_seq, c.deadline = self._seq, deadline
        c.timer = self._timers.arm(deadline, lambda ch=c, h=self._seq: self._fire(ch, h))

    def _edge_ns(self, c, k):
        """When periodic edge ``k`` (1, 2, ...) of the current load rises: from the load time, never from the
        time a callback ran, so the schedule does not drift."""
        return c.load_ns + _ticks_to_ns(k * c.step - c.frozen_ticks)

    def _arm(self, c):
        self._cancel(c)
        if c.index != 0 or c.initial == 0 or c.load_ns is None:
            return
        n, t = c.initial, c.ticks(self._timers.now_ns())
        if c.mode in (2, 3):            # OUT rises at the end of every period
            c.step = n if n >= MIN_PERIOD_TICKS else -(-MIN_PERIOD_TICKS // n) * n
            c.next_edge = t // c.step + 1
            self._set_timer(c, self._edge_ns(c, c.next_edge))
            return
        if c.mode in (0, 1):            # one edge per load, at n: armed even when this call comes after it
            edge = n                    # (it then fires at once; a slow VMM must not lose a short one-shot)
        else:                           # modes 4 and 5: OUT goes low at n and rises one clock later
            edge = n + 1
        self._set_timer(c, c.load_ns + _ticks_to_ns(edge - c.frozen_ticks))

    def _fire(self, c, seq):
        with self._lock:
            if c.timer is None or seq != c.timer_seq:
                return                  # stale: cancelled or re-armed after the timer thread took it
            c.timer = None
            if c.initial == 0 or c.load_ns is None:
                return
            delivered = self._irq0.pulse() is not False
            if c.mode not in (2, 3):
                self.pulses += 1
                return
            if delivered:
                self.pulses += 1
                c.next_edge += 1
            else:                       # merged with an earlier edge still pending: this edge goes out again
                self.merged += 1
            self._rearm_periodic(c, delivered)

    def _rearm_periodic(self, c, delivered=True):
        """Arms the pulse for edge ``next_edge``: at its own time when that is still ahead; when the callbacks
        ran late and it has passed, soon after this pulse (catch-up), one pulse per edge. An edge that merged
        is sent again half a period later: sooner would not help a guest that has not taken the last one."""
        now = self._timers.now_ns()
        backlog = c.ticks(now) // c.step - c.next_edge + 1     # edges that rose and are not delivered yet
        if backlog <= 0:
            self._set_timer(c, self._edge_ns(c, c.next_edge))
            return
        period_ns = _ticks_to_ns(c.step)
        limit = backlog_limit(period_ns)
        if backlog > limit:             # a VM stopped or a host asleep: keep the newest second of edges
            self.dropped += backlog - limit
            c.next_edge += backlog - limit
            backlog = limit
        self._set_timer(c, now + catchup_delay(period_ns, backlog, merged=not delivered))

    # -- snapshot (bhyve_devices/snapshot.py; the state code is in vatpit_state.py) ----------------------
    snapshot_version = 1

    def snapshot(self):
        with self._lock:
            return vatpit_state.snapshot(self)

    def restore(self, state, shift_ns):
        with self._lock:
            vatpit_state.restore(self, state, shift_ns)


class NMISC:
    """Port 0x61 (System Control Port B): bit 0 gate of channel 2, bit 1 speaker data (both read/write),
    bit 4 refresh toggle, bit 5 OUT2 (read-only). Other bits read as 0 and are ignored on write."""

    REFRESH_NS = 15085

    def __init__(self, pit, timers=None):
        self._pit = pit
        self._timers = timers if timers is not None else pit._timers
        self._value = 0

    def read(self, offset, size):
        if offset != 0:
            return (1 << (8 * size)) - 1
        v = self._value & 0x03
        if (self._timers.now_ns() // self.REFRESH_NS) & 1:
            v |= 0x10
        if self._pit.out(2):
            v |= 0x20
        return v | ((1 << (8 * size)) - 1) & ~0xFF

    def write(self, offset, size, value):
        if offset != 0:
            return
        self._value = value & 0x03
        self._pit.speaker = bool(value & 2)
        self._pit.set_gate(2, value & 1)

    # -- snapshot: the two writable bits (the PIT keeps the gate and the speaker bit itself) ----------------
    snapshot_version = 1

    def snapshot(self):
        return {**header(self), "value": self._value}

    def restore(self, state, shift_ns):
        check(self, state, ("value",))
        v = state["value"]
        if not isinstance(v, int) or not 0 <= v <= 3:
            raise SnapshotError(f"NMISC: value {v!r} is not 0-3")
        self._value = v
