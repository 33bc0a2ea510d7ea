"""The HPET (bhyve's ``vhpet``) at MMIO 0xFED00000, 1 KiB, three 64-bit timers.

Spec: IA-PC HPET (High Precision Event Timers) Specification 1.0a, section 2.3: general capabilities and ID
(0x000), general configuration (0x010: ENABLE_CNF, LEG_RT_CNF), general interrupt status (0x020, write 1 to
clear), main counter (0x0F0), and per timer N at 0x100 + 0x20*N: configuration and capabilities, comparator,
FSB interrupt route. Registers are 64 bits wide and may be read or written as 4 or 8 bytes (any byte lanes
inside one register work too).

The main counter runs at bhyve's HPET_FREQ, 16777216 Hz (period 59604644 fs), computed from the
:class:`TimerService` clock while ENABLE_CNF is set and frozen (and writable) while it is clear. Each timer with
its interrupt enabled arms one deadline for its next comparator match. Periodic timers (all three can) add the
period written to the comparator; writing the comparator with Tn_VAL_SET_CNF sets the accumulator (Linux's
``hpet_set_periodic`` writes twice). 32-bit mode (Tn_32MODE_CNF) compares and wraps the low 32 bits.

Interrupts go through the injected ``irq(pin, level)``: edge-triggered timers call ``irq(pin, True)`` then
``irq(pin, False)``; level-triggered ones set their bit in the status register and hold ``irq(pin, True)`` until
the guest writes 1 to that bit. The pin is the I/O APIC pin in Tn_INT_ROUTE_CNF (allowed: 20-23, as in
bhyve's route capability), or with LEG_RT_CNF timer 0 -> pin 2 (the IRQ0 the PIT would use) and timer 1 ->
pin 8 (RTC IRQ8): the VM's routing function asserts the 8259 input too for those (:data:`LEGACY_PINS`).

Snapshots (``snapshot.py``): the general configuration, the interrupt status, the counter (its base and the
timer-service time it started from, None while halted), and each timer's configuration, comparator, period, FSB
route register, the counter value its armed match waits for and that timer's deadline. Restored, the start time
and the deadlines move by the shift (the counter reads the same at the same guest-relative time) and a level
interrupt still pending in the status register is asserted again on its pin.

Not supported: FSB (MSI) delivery: Tn_FSB_INT_DEL_CAP reads 0, Tn_FSB_EN_CNF cannot be set, the FSB route
register is stored and read back only; matches of a timer whose interrupt is disabled (its periodic comparator
does not advance and no status bit is set); a route outside the capability is stored and used as given.
"""

import threading

from construct import (Array, BitsInteger, BitStruct, ByteSwapped, Flag, Int64ul, Padding, Struct)

from .snapshot import SnapshotError, check, header, save_fields

HPET_BASE = 0xFED00000
HPET_SIZE = 0x400
HPET_FREQ = 16777216
FS_PER_S = 10**15
HPET_PERIOD_FS = FS_PER_S // HPET_FREQ
NUM_TIMERS = 3
VENDOR_ID = 0x8086
NS = 1_000_000_000
LEGACY_PINS = {0: 2, 1: 8}
ROUTE_CAP = 0x00F00000           # I/O APIC pins 20-23

CNF_ENABLE, CNF_LEG_RT = 1, 2
TN_INT_TYPE_LEVEL = 1 << 1
TN_INT_ENB = 1 << 2
TN_TYPE_PERIODIC = 1 << 3
TN_PER_INT_CAP = 1 << 4
TN_SIZE_CAP = 1 << 5
TN_VAL_SET = 1 << 6
TN_32MODE = 1 << 8
TN_ROUTE_SHIFT = 9
TN_ROUTE_MASK = 0x1F << TN_ROUTE_SHIFT
TN_FSB_EN = 1 << 14
TN_WRITABLE = TN_INT_TYPE_LEVEL | TN_INT_ENB | TN_TYPE_PERIODIC | TN_VAL_SET | TN_32MODE | TN_ROUTE_MASK

M64 = (1 << 64) - 1
M32 = (1 << 32) - 1
MAX_ARM_TICKS = 1 << 32          # re-check far deadlines at least every 256 s

CAPABILITIES = ByteSwapped(BitStruct(
    "counter_clk_period" / BitsInteger(32), "vendor_id" / BitsInteger(16), "leg_rt_cap" / Flag,
    "reserved" / Flag, "count_size_cap" / Flag, "num_tim_cap" / BitsInteger(5), "rev_id" / BitsInteger(8)))
TIMER_CONFIG = ByteSwapped(BitStruct(
    "int_route_cap" / BitsInteger(32), "reserved2" / BitsInteger(16), "fsb_int_del_cap" / Flag,
    "fsb_en_cnf" / Flag, "int_route_cnf" / BitsInteger(5), "mode32_cnf" / Flag, "reserved1" / Flag,
    "val_set_cnf" / Flag, "size_cap" / Flag, "per_int_cap" / Flag, "type_cnf" / Flag, "int_enb_cnf" / Flag,
    "int_type_cnf" / Flag, "reserved0" / Flag))
REGISTERS = Struct(
    "capabilities" / Int64ul, Padding(8), "config" / Int64ul, Padding(8), "isr" / Int64ul, Padding(0xC8),
    "main_counter" / Int64ul, Padding(8),
    "timers" / Array(NUM_TIMERS, Struct("config" / Int64ul, "comparator" / Int64ul, "fsb_route" / Int64ul,
                                        Padding(8))),
    Padding(HPET_SIZE - 0x100 - 0x20 * NUM_TIMERS))


def _ticks_to_ns(ticks):
    return -(-ticks * NS // HPET_FREQ)


class _Timer:
    def __init__(self, n):
        self.n = n
        self.config = 0
        self.comparator = M64       # the register
        self.period = 0
        self.target = None          # the unbounded counter value the armed deadline waits for
        self.fsb = 0
        self.handle = None
        self.deadline = None        # when ``handle`` fires
        self.gen = 0                # bumped by every arm: tells a stale callback from the live one
        self.pin = None             # the pin held high for a level interrupt


class HPET:
    """The 1-KiB register block; ``irq(pin, level)`` routes interrupts."""

    def __init__(self, timers, irq):
        self._timers = timers
        self._irq = irq
        self._lock = threading.RLock()
        self.config = 0
        self.isr = 0
        self._counter_base = 0          # counter value when last (re)started or stopped
        self._start_ns = None           # None: halted
        self.timer = [_Timer(n) for n in range(NUM_TIMERS)]

    # -- registers -----------------------------------------------------------------------------------------
    @staticmethod
    def capabilities():
        return (HPET_PERIOD_FS << 32 | VENDOR_ID << 16 | 1 << 15 | 1 << 13 | (NUM_TIMERS - 1) << 8 | 0x01)

    def _counter(self):
        """The main counter as an unbounded integer."""
        if self._start_ns is None:
            return self._counter_base
        return self._counter_base + (self._timers.now_ns() - self._start_ns) * HPET_FREQ // NS

    def _timer_config(self, t):
        return t.config | TN_PER_INT_CAP | TN_SIZE_CAP | ROUTE_CAP << 32

    def _reg_read(self, reg):
        if reg == 0x000:
            return self.capabilities()
        if reg == 0x010:
            return self.config
        if reg == 0x020:
            return self.isr
        if reg == 0x0F0:
            return self._counter() & M64
        if 0x100 <= reg < 0x100 + 0x20 * NUM_TIMERS:
            t, r = self.timer[(reg - 0x100) >> 5], reg & 0x1F
            if r == 0x00:
                return self._timer_config(t)
            if r == 0x08:
                return t.comparator & M32 if t.config & TN_32MODE else t.comparator
            if r == 0x10:
                return t.fsb
        return 0

    def read(self, offset, size):
        if not 0 <= offset < HPET_SIZE or (offset & 7) + size > 8:
            return (1 << (8 * size)) - 1
        with self._lock:
            v = self._reg_read(offset & ~7)
        return (v >> (8 * (offset & 7))) & ((1 << (8 * size)) - 1)

    def write(self, offset, size, value):
        if not 0 <= offset < HPET_SIZE or (offset & 7) + size > 8:
            return
        shift = 8 * (offset & 7)
        mask = ((1 << (8 * size)) - 1) << shift
        value = (value << shift) & mask
        reg = offset & ~7
        with self._lock:
            old = self._reg_read(reg)
            new = (old & ~mask) | value
            if reg == 0x010:
                self._write_config(new)
            elif reg == 0x020:
                self._write_isr(value)
            elif reg == 0x0F0:
                if self._start_ns is None:
                    self._counter_base = new
            elif 0x100 <= reg < 0x100 + 0x20 * NUM_TIMERS:
                t, r = self.timer[(reg - 0x100) >> 5], reg & 0x1F
                if r == 0x00:
                    self._write_timer_config(t, new)
                elif r == 0x08:
                    self._write_comparator(t, new, mask)
                elif r == 0x10:
                    t.fsb = new

    # -- register writes -----------------------------------------------------------------------------------
    def _write_config(self, new):
        new &= CNF_ENABLE | CNF_LEG_RT
        was = self.config
        if (was ^ new) & CNF_ENABLE:
            if new & CNF_ENABLE:
                self._start_ns = self._timers.now_ns()
            else:
                self._counter_base = self._counter()
                self._start_ns = None
        self.config = new
        for t in self.timer:
            self._update_level(t)
            self._arm(t)

    def _write_isr(self, value):
        self.isr &= ~(value & ((1 << NUM_TIMERS) - 1))
        for t in self.timer:
            self._update_level(t)

    def _write_timer_config(self, t, new):
        t.config = new & TN_WRITABLE & ~TN_FSB_EN
        if not t.config & TN_INT_TYPE_LEVEL:
            self.isr &= ~(1 << t.n)
        self._update_level(t)
        self._arm(t)

    def _write_comparator(self, t, new, mask):
        if t.config & TN_32MODE:
            new &= M32
        if t.config & TN_TYPE_PERIODIC:
            t.period = new
            if t.config & TN_VAL_SET:
                t.comparator = new
            t.config &= ~TN_VAL_SET
        else:
            t.comparator, t.period = new, 0
        self._arm(t, fresh=True)

    # -- interrupts ----------------------------------------------------------------------------------------
    def _pin(self, t):
        if self.config & CNF_LEG_RT and t.n in LEGACY_PINS:
            return LEGACY_PINS[t.n]
        return (t.config & TN_ROUTE_MASK) >> TN_ROUTE_SHIFT

    def _update_level(self, t):
        want = None
        if (self.isr >> t.n) & 1 and t.config & TN_INT_ENB and t.config & TN_INT_TYPE_LEVEL \
                and self.config & CNF_ENABLE:
            want = self._pin(t)
        if want != t.pin:
            if t.pin is not None:
                self._irq(t.pin, False)
            t.pin = want
            if want is not None:
                self._irq(want, True)

    def _wrap(self, t):
        return 1 << (32 if t.config & TN_32MODE else 64)

    def _arm(self, t, fresh=False, target=None):
        """Arm ``t`` for its next match; a comparator equal to the counter matches now only when just
        written (``fresh``), otherwise (just fired) on the next wrap. ``target``: the unbounded counter value of
        the next match, when the caller knows it (a periodic timer that just fired: its grid does not depend on
        when this thread gets to run, so a late timer thread never pushes the match past the counter)."""
        t.gen += 1                   # a callback already taken off the heap is stale from now on
        if t.handle is not None:
            self._timers.cancel(t.handle)
            t.handle = None
        if not (self.config & CNF_ENABLE and t.config & TN_INT_ENB):
            return
        count = self._counter()
        if target is None:
            wrap = self._wrap(t)
            dist = (t.comparator - count) % wrap
            if dist == 0 and not fresh:
                dist = wrap
            target = count + dist
        t.target = target
        step = min(target, count + MAX_ARM_TICKS) - self._counter_base
        self._arm_at(t, self._start_ns + _ticks_to_ns(max(step, 0)))

    def _arm_at(self, t, deadline):
        t.deadline = deadline
        t.handle = self._timers.arm(deadline, lambda tm=t, g=t.gen: self._fire(tm, g))

    def _fire(self, t, gen):
        with self._lock:
            if gen != t.gen:
                return
            t.handle = None
            count = self._counter()
            if count < t.target:
                self._arm(t, target=t.target)
                return
            pin = self._pin(t)
            if t.config & TN_INT_TYPE_LEVEL:
                self.isr |= 1 << t.n
                self._update_level(t)
            else:
                self._irq(pin, True)
                self._irq(pin, False)
            if t.config & TN_TYPE_PERIODIC and t.period:
                k = (count - t.target) // t.period + 1      # missed matches are coalesced into this one
                t.comparator = (t.comparator + k * t.period) & (self._wrap(t) - 1)
                self._arm(t, target=t.target + k * t.period)
            else:
                self._arm(t)

    # -- snapshot (bhyve_devices/snapshot.py) --------------------------------------------------------------
    snapshot_version = 1
    _TIMER_KEYS = ("config", "comparator", "period", "fsb", "target")

    def snapshot(self):
        with self._lock:
            timers = [{**save_fields(t, self._TIMER_KEYS), "deadline": t.deadline if t.handle is not None else None}
                      for t in self.timer]
            return {**header(self), "config": self.config, "isr": self.isr, "counter_base": self._counter_base,
                    "start_ns": self._start_ns, "timers": timers}

    def restore(self, state, shift_ns):
        check(self, state, ("config", "isr", "counter_base", "start_ns", "timers"))
        ts, start = state["timers"], state["start_ns"]

        def u(v, bits=64, opt=False):      # an unsigned field of ``bits`` (a time: any int); None where ``opt``
            return (opt and v is None) or (isinstance(v, int) and not isinstance(v, bool)
                                           and (bits is None or 0 <= v < 1 << bits))
        ok = (u(state["config"], 2) and u(state["isr"], NUM_TIMERS) and u(state["counter_base"], 80)
              and u(start, None, True) and isinstance(ts, list) and len(ts) == NUM_TIMERS
              and all(isinstance(d, dict) and all(k in d for k in self._TIMER_KEYS + ("deadline",))
                      and u(d["config"], 16) and not d["config"] & ~(TN_WRITABLE & ~TN_FSB_EN)
                      and u(d["comparator"]) and u(d["period"]) and u(d["fsb"]) and u(d["target"], 80, True)
                      and u(d["deadline"], None, True) and (d["deadline"] is None or d["target"] is not None)
                      for d in ts))
        if not ok:
            raise SnapshotError("HPET: a field is missing, of the wrong type or out of range")
        with self._lock:
            self.config, self.isr, self._counter_base = state["config"], state["isr"], state["counter_base"]
            self._start_ns = None if start is None else start + shift_ns
            for t, d in zip(self.timer, ts):
                t.gen += 1
                if t.handle is not None:
                    self._timers.cancel(t.handle)
                    t.handle = None
                t.config, t.comparator, t.period, t.fsb, t.target = (d[k] for k in self._TIMER_KEYS)
                if d["deadline"] is not None:
                    self._arm_at(t, d["deadline"] + shift_ns)
                self._update_level(t)
