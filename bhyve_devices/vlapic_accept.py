"""Interrupt acceptance done outside Python, for a :class:`~bhyve_devices.vlapic.Vlapic` (a mixin): what the CPU
would take when its interrupt window opens, and the acceptance (IRR -> ISR) of a vector the hypervisor's run loop
injected there by itself.

Intel SDM vol. 3A 10.8.3.1 "Task and Processor Priorities" and 10.8.4 "Interrupt Acceptance for Fixed
Interrupts": the CPU takes the highest IRR vector whose class is above the PPR's, moving it from IRR to ISR. A
request for a vector already in the IRR merges with it (one bit per vector); one that comes after the CPU took the
vector is a new request, even though the vector is in service, and it is delivered after that vector's EOI.

The owner of the run loop posts :meth:`window_plan`'s vector (from another thread while the vCPU runs:
:meth:`offer_outside`), and calls :meth:`accept_outside` when the loop has injected it. Between the two, the
vlapic still shows the vector requested; the ``outside`` callable (``outside(vector) -> bool``, set by the owner)
tells :meth:`~bhyve_devices.vlapic.Vlapic.set_intr_ready` whether the CPU took it meanwhile, so that a request then
is kept (:attr:`_repeat`, one bit per vector, once: more merge with it) instead of merged. The loop may hold two
vectors Python has not accepted (an injection the ticker recorded and the slot's own), accepted in turn: each
acceptance ends only its own vector's kept request.

A TSC-deadline tick may be delivered outside Python too (the KVM provider's ticker thread): :meth:`tick_plan` says
which vector the timer's LVT would deliver when the deadline falls due and whether the CPU may take it then, which
holds while nothing else is requested and at most one edge-triggered vector is in service (the tick then waits
for that one's end). :attr:`changed` is set by every change made under the lock (so the owner publishes the
plan again), and :attr:`on_change` is called there, so that a plan made from the old state is withdrawn at once
(else the loop, entered again without a look, could post a tick past a vector Python had just put in service);
:meth:`ticked_outside` counts the ticks fired outside, :meth:`ended_outside` is the EOI of a vector the guest
ended in memory.

Not supported: LINT0/ExtINT and NMIs outside Python (the plan is None while LINT0 has a request), more than two
vectors taken outside between two acceptances.
"""


from . import vlapic_regs as R


class VlapicAcceptMixin:
    """Expects Vlapic's ``_lock``, ``_guard``, ``_eoi``, ``_kick``, ``irr``, ``isr``, ``tmr``, ``tpr``, ``hw_enabled``,
    ``sw_enabled``, ``lvt``, ``timer``, ``lint0_pending``."""

    changed = True          # set by every change under the guard; the owner clears it when it looks
    on_change = None        # called under the lock by every change: the owner withdraws what it published

    outside = None          # outside(vector) -> bool: the run loop took vector and it is not accepted here yet
    _repeat = 0             # vectors requested again after the run loop took them (IRR bits, until accepted)

    def window_plan(self, in_service_ends=False):
        """What the CPU takes when its window opens: ``(vector, arm, again)`` or None when the loop should leave
        it to the caller. With ``in_service_ends`` the one edge-triggered vector in service must end first (the
        guest's PV EOI), else nothing may be in service. ``arm``: the vector is edge-triggered and alone in
        service once taken (its end may go through PV EOI). ``again``: a vector waits for that end (the window
        is wanted again after it). None also while LINT0 has a request or nothing is deliverable."""
        with self._lock:
            isr, irr, tpr_class = self.isr, self.irr, self.tpr & 0xF0
            if in_service_ends:
                if isr == 0 or isr & (isr - 1) or self.tmr & isr:
                    return None
                isr = 0
            if isr or not irr or not self.hw_enabled or self.lint0_pending():
                return None
            vector = irr.bit_length() - 1
            if (vector & 0xF0) <= tpr_class:
                return None
            bit = 1 << vector
            arm = not self.tmr & bit
            rest = irr & ~bit
            again = arm and bool(rest) and ((rest.bit_length() - 1) & 0xF0) > tpr_class
            return vector, arm, again

    def under_lock(self):
        """The vlapic's lock as a context, for a caller that makes several of these calls as one (what they post
        runs when it is left)."""
        return self._guard

    def offer_outside(self, post, in_service_ends=False):
        """Another thread's request while the vCPU runs: :meth:`window_plan`'s ``(vector, arm, again)`` (with
        ``in_service_ends`` as there) handed to ``post`` under the lock, so that no acceptance comes between the
        plan and the post. Returns what ``post`` returned (True: the run loop has it), False without a plan."""
        with self._lock:
            plan = self.window_plan(in_service_ends)
            return plan is not None and bool(post(*plan))

    def accept_outside(self, vector, ended_first, done, requested=True):
        """The run loop injected ``vector``: IRR -> ISR, after the EOI of the one in service when
        ``ended_first`` (the guest ended it through PV EOI). ``done()`` runs under the lock, so ``outside`` answers
        False from then on. Returns True if the vector was requested again meanwhile (it stays in the IRR, for
        after its EOI). ``requested=False``: the injection was never in the IRR (a tick fired outside), so a
        request the IRR shows is a new one."""
        with self._guard:
            if ended_first:
                self._eoi()
            bit = 1 << (vector & 0xFF)
            newer = not requested and self.irr & bit
            self.irr &= ~bit
            self.isr |= bit
            done()
            again = bool(self._repeat & bit or newer)
            if again:
                self.irr |= bit
            self._repeat &= ~bit         # only this vector's: a recorded fold and the slot are accepted in turn
            return again

    def _merged_or_repeat(self, vector, bit):
        """In set_intr_ready, for a vector already in the IRR: True if it merges with that request, False when
        the run loop took that one (this request is kept for after its EOI)."""
        if self._repeat & bit:
            return True                 # merges with the request kept since the loop took the vector
        outside = self.outside
        if outside is not None and outside(vector):
            self._repeat |= bit
            return False
        return True

    def tick_plan(self, held=None):
        """``(vector, after_eoi)`` the CPU takes when the TSC-deadline timer falls due, or None when that is
        Python's to decide (another mode, the LVT masked or not fixed-vector-valid, another request waiting, more
        than one vector or a level-triggered one in service, LINT0's request). ``held``: the vector the run loop
        holds (posted or injected, not accepted yet: its request is the loop's, and its end is the loop's to see).
        ``after_eoi``: one edge-triggered vector is in service, and the tick waits for its end."""
        with self._lock:
            if self.timer.mode != R.TIMER_TSC_DEADLINE or not self.hw_enabled or not self.sw_enabled:
                return None
            lvt = self.lvt[R.LVT_TIMER]
            vector = lvt & 0xFF
            if lvt & R.LVT_MASKED or vector < 16:
                return None
            irr = self.irr if held is None else self.irr & ~(1 << held)
            if irr or self._repeat or self.lint0_pending():
                return None
            isr = self.isr
            if not isr:
                return vector, False
            if isr & (isr - 1) or self.tmr & isr:
                return None
            return vector, True

    def offer_tick(self, publish, held=None):
        """:meth:`tick_plan` handed to ``publish`` under the lock (a reader's: nothing changes, so :attr:`changed`
        stays as it is), so that no request comes between the plan and its publication."""
        with self._lock:
            publish(self.tick_plan(held))

    def ticked_outside(self, n):
        """``n`` TSC-deadline ticks fired, were taken and ended outside Python (statistics only)."""
        if n > 0:
            with self._guard:
                self.timer.fires += n

    def ended_outside(self):
        """The guest ended the highest vector in service through memory, seen outside Python: its EOI, without a
        kick (the caller posts what comes next)."""
        with self._guard:
            self._eoi(kick=False)

