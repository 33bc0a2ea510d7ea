"""HLT on the VM engine (bhyve's ``vm_handle_hlt``), a mixin of :class:`ops.vmm.Vm`: the vCPU sleeps on its
condition until an interrupt it can take, an NMI, a kick or suspension; every started vCPU halted with interrupts
off suspends the VM (``VM_SUSPEND_HALT``). Around the sleep: the VM's idle hook (the doorbells a halting vCPU
serves, the posted-write flush going off) and wake hook (the flush coming back), with the vCPU counted asleep
(``Vcpu.sleeping``) from before the idle hook until after the sleep. A debugger's hold ends the sleep but not the
halt (``_rehalt``).

Where the provider's run loop sleeps in HLT itself (the KVM provider's ``intwin``, ``fasthalt.c``) and the VM has
one vCPU, the wait goes there (:meth:`HaltMixin.halt_in_loop`): after the idle hook found nothing to wake the vCPU, ``before_entry`` starts
the next run asleep, without the GIL; a kick's posted interrupt ends the sleep in the loop. A sleep there that
ends for Python (a stop: an NMI, a suspension, a debugger) leaves the vCPU halted, as a debug hold does.

Not supported: MWAIT (its exit raises #UD), bhyve's ``halted_cpus`` set and its VM-wide halt rendezvous, the
run loop's sleep for a VM of several vCPUs (an IPI stress test hung with it, rarely; kept in Python).
"""

import time

from .nvmm import constants as C
from .vmm_lapic import interrupt_waiting, tpr_from_guest
from .vmm_ops import Hlt, VmCapType, VmExitCode as E, VmSuspendHow


class HaltMixin:
    """Needs the :class:`ops.vmm.Vm` fields ``vcpus``, ``suspended``, ``idle_hook``, ``wake_hook`` and its
    ``suspend``, ``suspended_exit``, ``before_entry`` and ``_before_entry``."""

    def handle_hlt(self, ctx, rflags):
        """A vCPU halted: a ``VM_EXITCODE_HLT`` with ``VM_CAP_HALT_EXIT``, else sleeps until an interrupt it can
        take, an NMI, a kick or suspension (None: run on), or suspends the VM when every started vCPU halted with
        interrupts off."""
        if ctx.pvclock is not None:
            ctx.pvclock.maybe_refresh(time.monotonic_ns())
        if ctx.pv_eoi is not None:
            ctx.pv_eoi.sync()                    # before the wait looks at what is in service
        vl = ctx.vlapic
        if vl is not None:
            tpr_from_guest(ctx)                  # a CR8 written since the last exit decides what may wake it
        if ctx.caps[VmCapType.VM_CAP_HALT_EXIT]:
            return ctx.exit_to(E.VM_EXITCODE_HLT, Hlt(rflags))
        if not rflags & C.RFLAGS_IF and not ctx.nmi:
            ctx.halted_if_clear = True
            if all(c.halted_if_clear for c in self.vcpus.values() if c.started):
                self.suspend(VmSuspendHow.VM_SUSPEND_HALT)
                return self.suspended_exit(ctx)
        hook = self.idle_hook
        takes = rflags & C.RFLAGS_IF and vl is not None     # an interrupt (the vlapic's or the 8259's) wakes it
        held = in_loop = False
        with ctx.cond:
            ctx.sleeping = True             # out of the guest from here: the idle hook sees it asleep (all_asleep)
        try:
            if hook is not None and rflags & C.RFLAGS_IF and not ctx.nmi and self.suspended is None:
                if not takes or not interrupt_waiting(self, vl):
                    hook()
            with ctx.cond:
                while self.suspended is None and not ctx.nmi and not (takes and interrupt_waiting(self, vl)):
                    if ctx.debug_hold:
                        held = True
                        break
                    if takes and self.halt_in_loop(ctx):
                        in_loop = True      # the provider's run loop sleeps instead (before_entry, fasthalt.c)
                        break
                    ctx.cond.wait(0.5)
        finally:
            with ctx.cond:
                ctx.sleeping = False
        ctx.pending = True
        if in_loop:
            ctx.halt_rflags = rflags        # no wake hook: the loop starts the VM's wake timer when it wakes
            ctx.halted_if_clear = False
            return None
        wake = self.wake_hook
        if wake is not None:
            wake()
        if held:
            # Only the debugger's hold ended the sleep: the vCPU stays halted (``halted_if_clear`` too) and goes
            # back to sleep once released (``_rehalt``) instead of running on past its HLT.
            ctx.hlt_held = (rflags, ctx.current_rip())
            return None                          # before_entry: VM_EXITCODE_DEBUG while held
        ctx.halted_if_clear = False
        return None

    def halt_in_loop(self, ctx):
        """Whether a HLT of ``ctx`` (IF set) may be slept in the provider's run loop: a VM of one vCPU, nothing but
        an interrupt the loop can be posted would end the sleep (no NMI, suspension, debugger or
        ``VM_CAP_HALT_EXIT``), and nothing Python does at a HLT is needed (the ops layer's own paravirtual clock
        refreshes there)."""
        win = ctx.intwin
        # one vCPU only: with several, a token passed by IPIs between four vCPUs under host load hung about once
        # in 25 runs with it (tests/conformance/test_smp_ipi.py), not yet understood; never without it
        return (win is not None and win.halt_loop and len(self.vcpus) == 1 and self.suspended is None
                and ctx.vlapic is not None
                and ctx.pvclock is None and not ctx.nmi
                and not ctx.debug_hold and ctx.hlt_held is None and not ctx.caps[VmCapType.VM_CAP_HALT_EXIT]
                and not ctx.caps[VmCapType.VM_CAP_MASK_HWINTR] and not any(ctx.debug.values()))

    def _rehalt(self, ctx):
        """Before the first entry after a debug hold (or a stop of a sleep in the run loop) that ended a HLT: back
        into the HLT's sleep (RIP stays after the
        HLT, where a wake resumes, as a HLT exit reports it). Returns a ``vm_exit`` for userland, or None to enter
        the guest (a wake, or a RIP the debugger moved), after the rest of ``before_entry``'s look (done here,
        once: a second injection decision for the same entry would disarm the PV EOI word the first one armed). A
        step of the halted vCPU ends at once (``MTRAP``), still halted: it would otherwise wait for an interrupt
        the step masks."""
        held, ctx.hlt_held = ctx.hlt_held, None
        rflags, rip = held
        if ctx.current_rip() != rip:             # the debugger moved it (gdb's jump): it runs from there
            ctx.halted_if_clear = False
            return self._before_entry(ctx)
        if ctx.debug.get(VmCapType.VM_CAP_MTRAP_EXIT):
            ctx.hlt_held = held
            ctx.pending = True
            return ctx.exit_to(E.VM_EXITCODE_MTRAP, None)
        r = self.handle_hlt(ctx, rflags)
        if r is not None:
            ctx.pending = True
            return r
        return self.before_entry(ctx)            # woken (on as after any HLT), or held again (DEBUG)
