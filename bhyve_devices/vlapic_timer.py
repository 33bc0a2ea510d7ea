"""The local APIC timer: one-shot, periodic and TSC-deadline counting over a :class:`TimerService` clock.

Intel SDM vol. 3A section 10.5.4 "APIC Timer" and 10.5.4.1 "TSC-Deadline Mode". The counter runs at bhyve's bus
clock of 128 MiHz (134217728 Hz) divided by the DCR value; nothing counts in software: the current count is
computed from the time left to the armed deadline (``ccr = ceil(remaining_ns * rate / 1e9)``, never above the
initial count), the way bhyve computes it from the callout's bintime.

The owner (:class:`bhyve_devices.vlapic.Vlapic`) serialises every call under its lock; the armed callback calls
the owner's ``on_expire(generation)``, which calls :meth:`ApicTimer.expired` and fires the LVT if it returns True.
A callback whose generation is stale (the timer was re-armed or stopped meanwhile) is ignored, so a timer thread
that fires late never injects a cancelled tick.

Periodic mode fires every period (issue 24 item 5): period k ends at start + k periods (no drift), and a period
that ended while the timer thread ran late is *owed*; owed ticks go out one by one after the late one, spaced as
``vatpit`` sends its late IRQ0 edges (``catchup.py``). Why: Linux without a TSC-deadline timer verifies its
calibrated LAPIC timer by counting jiffies over HZ/10 periodic LAPIC ticks (``calibrate_APIC_clock``, "verification
failure" when they disagree by more than 2); the PIT catches up on its late ticks, so the LAPIC timer must too, or
a slow timer thread makes the two disagree. A tick whose vector is still pending in the IRR merges there, as on
hardware (one IRR bit). Ticks owed for more than one second (a stopped VM, a host asleep) are dropped (counted in
``dropped``).

TSC-deadline mode may keep its deadline outside Python (``deadline``: an object with ``arm(value) -> passed``,
``set(value, due_ns)``, ``cancel()``, ``value()``, ``due_ns()`` and ``enabled``; the KVM provider's compiled run loop,
``ops/nvmm/kvm/tscdeadline.py``, which serves the guest's writes itself while ``enabled``). Its expiry comes to the
owner, which calls :meth:`ApicTimer.deadline_expired`; ``tsc_deadline`` and ``running`` are then read from it.

Not supported: a periodic period shorter than :data:`MIN_PERIOD_NS` (100 us) is stretched to it, as KVM does, so a
guest cannot flood the timer thread; the TSC-deadline clock is the TimerService clock scaled by ``tsc_hz`` (no TSC
offset or scaling from the VM unless ``tsc_now`` is given); a masked LVT's periods are neither fired nor owed.
"""

from . import vlapic_regs as R
from .catchup import backlog_limit, catchup_delay
from .snapshot import SnapshotError, load_fields, save_fields, shifted

NS_PER_S = 1_000_000_000
MIN_PERIOD_NS = 100_000


class ApicTimer:
    def __init__(self, timers, on_expire, tsc_hz=None, tsc_now=None, deadline=None):
        self._timers = timers
        self._deadline = deadline if tsc_hz else None
        self._on_expire = on_expire
        self.tsc_hz = tsc_hz
        if tsc_now is None and tsc_hz:
            tsc_now = lambda: timers.now_ns() * tsc_hz // NS_PER_S  # noqa: E731
        self._tsc_now = tsc_now
        self.mode = R.TIMER_ONESHOT
        self.icr = 0
        self.dcr = 0
        self.divisor = 2
        self.running = False
        self.deadline_ns = 0
        self.period_ns = 0
        self.tsc_deadline = 0
        self.generation = 0
        self.fires = 0          # statistics: expirations so far (catch-up ticks included)
        self.owed = 0           # periodic ticks due (the timer thread ran late) and not fired yet
        self.dropped = 0        # statistics: owed ticks given up (over catchup.BACKLOG_LIMIT_NS late)
        self._handle = None
        self._armed_ns = None   # when the armed callback is due (deadline_ns, or sooner for owed ticks)

    # -- helpers --------------------------------------------------------------------------------------------
    def _ns_for(self, count):
        return max(1, -(-count * self.divisor * NS_PER_S // R.BUS_HZ))

    def _arm(self, deadline_ns):
        self.deadline_ns = deadline_ns
        self.running = True
        self._arm_callback(deadline_ns)

    def _arm_callback(self, when_ns):
        """Arms the callback at ``when_ns`` without moving the period's end (``deadline_ns``, what CCR counts to)."""
        self.generation += 1
        gen = self.generation
        self._armed_ns = when_ns
        self._handle = self._timers.arm(when_ns, lambda: self._on_expire(gen))

    def stop(self):
        if self._handle is not None:
            self._timers.cancel(self._handle)
            self._handle = None
        if self._deadline is not None and self._deadline.value():
            self._deadline.cancel()
        self.generation += 1
        self.running = False
        self.owed = 0

    def _start_count(self, count):
        now = self._timers.now_ns()
        self.period_ns = self._ns_for(self.icr)
        if self.mode == R.TIMER_PERIODIC:
            self.period_ns = max(self.period_ns, MIN_PERIOD_NS)
        self._arm(now + self._ns_for(count))

    # -- register interface ---------------------------------------------------------------------------------
    def write_icr(self, value):
        """Initial-count write: (re)starts counting from ``value``; 0 stops the timer. Ignored in TSC-deadline."""
        if self.mode == R.TIMER_TSC_DEADLINE:
            return
        self.stop()
        self.icr = value & 0xFFFFFFFF
        if self.icr:
            self._start_count(self.icr)

    def write_dcr(self, value):
        """Divide-configuration write; a running count keeps its current value and goes on at the new rate."""
        value &= R.DCR_WRITABLE
        if self.running and self.mode != R.TIMER_TSC_DEADLINE:
            count = self.ccr()
            self.stop()
            self.dcr, self.divisor = value, R.dcr_divisor(value)
            if count:
                self._start_count(count)
        else:
            self.dcr, self.divisor = value, R.dcr_divisor(value)

    def ccr(self):
        """Current count: 0 when stopped, after a one-shot expiry and always in TSC-deadline mode."""
        if not self.running or self.mode == R.TIMER_TSC_DEADLINE:
            return 0
        remaining = self.deadline_ns - self._timers.now_ns()
        if remaining <= 0 and self.mode == R.TIMER_PERIODIC and self.icr:
            # the periods go on while the callback is late
            remaining = self.period_ns - (-remaining) % self.period_ns
        if remaining <= 0:
            return 0
        count = -(-remaining * R.BUS_HZ // (self.divisor * NS_PER_S))
        return min(count, self.icr)

    def set_mode(self, mode):
        """LVT timer mode change; a transition into or out of TSC-deadline mode disarms the timer (10.5.4.1)."""
        if mode == self.mode:
            return
        tsc_change = R.TIMER_TSC_DEADLINE in (mode, self.mode)
        self.mode = mode
        if self._deadline is not None:
            self._deadline.enabled = mode == R.TIMER_TSC_DEADLINE
        if tsc_change:
            self.stop()
            self.icr = 0
            self.tsc_deadline = 0

    def restart_periodic(self):
        """After an SVR re-enable bhyve restarts a periodic timer from its initial count."""
        if self.mode == R.TIMER_PERIODIC and self.icr and not self.running:
            self._start_count(self.icr)

    def expired(self, generation):
        """Called (under the owner's lock) from the armed callback; True if the LVT should fire now."""
        if generation != self.generation or not self.running:
            return False
        self._handle = None
        if self.mode == R.TIMER_PERIODIC and self.icr:
            return self._periodic_tick()
        self.fires += 1
        self.running = False
        if self.mode == R.TIMER_TSC_DEADLINE:
            self.tsc_deadline = 0
        return True

    def _periodic_tick(self):
        """A periodic callback: counts the periods that ended (owed), fires one if any is owed, and arms the next
        callback at the period's end or sooner for the ticks still owed."""
        now = self._timers.now_ns()
        if self.deadline_ns <= now:
            ended = (now - self.deadline_ns) // self.period_ns + 1
            self.deadline_ns += ended * self.period_ns
            self.owed += ended
        limit = backlog_limit(self.period_ns)
        if self.owed > limit:
            self.dropped += self.owed - limit
            self.owed = limit
        fire = self.owed > 0
        if fire:
            self.owed -= 1
            self.fires += 1
        self._arm_next(now)
        return fire

    def _arm_next(self, now):
        if not self.owed:
            self._arm_callback(self.deadline_ns)
            return
        self._arm_callback(now + catchup_delay(self.period_ns, self.owed))

    # -- IA32_TSC_DEADLINE ----------------------------------------------------------------------------------
    def tsc_now(self):
        return self._tsc_now() if self._tsc_now else 0

    def write_tsc_deadline(self, value):
        """Returns True if the deadline is already past (the owner fires the LVT at once)."""
        if self.mode != R.TIMER_TSC_DEADLINE or not self.tsc_hz:
            return False
        self.stop()
        self.tsc_deadline = value & 0xFFFFFFFFFFFFFFFF
        if not self.tsc_deadline:
            return False
        if self._deadline is not None:
            if not self._deadline.arm(self.tsc_deadline):
                return False
            self.tsc_deadline = 0           # passed already: it fires now
            self.fires += 1
            return True
        delta = self.tsc_deadline - self.tsc_now()
        if delta <= 0:
            self.running = True
            return self.expired(self.generation)
        now = self._timers.now_ns()
        self._arm(now + max(1, -(-delta * NS_PER_S // self.tsc_hz)))
        return False

    def read_tsc_deadline(self):
        if self.mode != R.TIMER_TSC_DEADLINE:
            return 0
        return self._deadline.value() if self._deadline is not None else self.tsc_deadline

    def deadline_expired(self):
        """The ``deadline`` object's deadline fell due (it reads 0 now); True if the LVT should fire."""
        if self.mode != R.TIMER_TSC_DEADLINE:
            return False
        self.fires += 1
        self.tsc_deadline = 0
        return True

    def _sync_deadline(self):
        """``tsc_deadline``/``running`` from the ``deadline`` object, which the run loop writes."""
        if self._deadline is not None and self.mode == R.TIMER_TSC_DEADLINE:
            self.tsc_deadline = self._deadline.value()
            self.running = bool(self.tsc_deadline)

    # -- snapshot (issue 23; the owner's Vlapic.snapshot / restore) -----------------------------------------
    _STATE = ("mode", "icr", "dcr", "running", "deadline_ns", "period_ns", "tsc_deadline", "owed", "fires",
              "dropped")

    def save_state(self):
        """The counting state: times absolute (``deadline_ns``, the period's end CCR counts to; ``armed_ns``, when
        the armed callback is due, None when none is armed); ``tsc_deadline`` is a guest TSC value, kept as is."""
        self._sync_deadline()
        d = save_fields(self, self._STATE)
        d["armed_ns"] = self._armed_ns if self._handle is not None else None
        if self._deadline is not None and self.mode == R.TIMER_TSC_DEADLINE:
            d["armed_ns"] = self._deadline.due_ns()
        return d

    def load_state(self, d, shift_ns):
        """Takes :meth:`save_state`'s dict with its times moved by ``shift_ns`` and re-arms the callback; a value
        out of range raises SnapshotError before anything changes."""
        t = {k: d[k] for k in (*self._STATE, "armed_ns") if k in d}
        armed = t.get("armed_ns", "missing")
        if not all(isinstance(t.get(k), int) for k in self._STATE) or not isinstance(armed, (int, type(None))):
            raise SnapshotError("Vlapic timer: a saved value is missing or not a number")
        periodic = t["mode"] == R.TIMER_PERIODIC and t["icr"] and t["running"]
        if t["mode"] == R.TIMER_TSC_DEADLINE and not self.tsc_hz:
            raise SnapshotError("Vlapic timer: the guest runs it in TSC-deadline mode, which this VM does not offer "
                                "(x86.tsc_deadline=false, or a provider that does not know the TSC rate: tsc-rate)")
        if (t["mode"] not in (R.TIMER_ONESHOT, R.TIMER_PERIODIC, R.TIMER_TSC_DEADLINE)
                or not 0 <= t["icr"] <= 0xFFFFFFFF or t["dcr"] & ~R.DCR_WRITABLE or t["dcr"] < 0
                or not 0 <= t["tsc_deadline"] < 1 << 64 or t["owed"] < 0 or t["period_ns"] < (1 if periodic else 0)):
            raise SnapshotError("Vlapic timer: a saved value is out of range")
        self.stop()
        load_fields(self, t, self._STATE, (int,))
        self.running = bool(self.running)
        self.divisor = R.dcr_divisor(self.dcr)
        self.deadline_ns = shifted(self.deadline_ns, shift_ns)
        if self._deadline is not None:
            self._deadline.enabled = self.mode == R.TIMER_TSC_DEADLINE
            if self.mode == R.TIMER_TSC_DEADLINE:
                if armed is not None and self.tsc_deadline:
                    self._deadline.set(self.tsc_deadline, shifted(armed, shift_ns))
                return
        if armed is not None:
            self._arm_callback(shifted(armed, shift_ns))
