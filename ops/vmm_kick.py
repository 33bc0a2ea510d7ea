"""A vCPU's kick (part of bhyve's ``vcpu_notify_event``): how another thread gets a vCPU to look at what it
asked for, a vlapic request or anything else ``before_entry`` delivers (``ops/vmm.py``).

- :meth:`KickMixin.kick`: the vCPU asleep in HLT's wait is woken; one in the guest is stopped
  (``nvmm_vcpu_stop``: a STOPPED exit); on its own thread nothing more is needed.
- :meth:`KickMixin.kick_intr`, an interrupt request: where the provider's run loop injects by itself
  (``ops/nvmm/kvm/intwin.py``), the vlapic's next vector is posted to it and the kick's EINTR stays in the loop
  (``ops/vmm_lapic.py``, ``post_kick``), or the loop's injection is accepted here and the next posted
  (``post_kick_taken``; where nothing can be posted and the guest's end of what is in service exits, no kick);
  a request below the vector the loop holds posted needs no kick, the loop being told to come back once it
  injected that one (``post_behind``); otherwise a kick, that stops nothing where the vCPU will look anyway
  (``merge``).

Not supported: a kick that names what it asks for (the vCPU looks at everything).
"""

import os
import threading

from . import vmm_lapic

#: ``VMMSHIM_KICK_SPARE``: which of the ways to spare a stop are on, a comma-separated list of ``behind``
#: (``post_behind``), ``merge``, ``taken`` (``post_kick_taken``'s ``SPARED``) and ``pending`` (posting while
#: ``pending`` is set, no stop under way); ``0`` for none, as before they were added (an A/B switch for the lab)
SPARE = frozenset(x for x in os.environ.get("VMMSHIM_KICK_SPARE", "behind,merge,taken,pending").split(",")
                  if x in ("behind", "merge", "taken", "pending"))


class KickMixin:
    """The kick of :class:`ops.vmm.Vcpu` (its ``pending``, ``cond``, ``sleeping``, ``nv``, ``intwin`` ...)."""

    def kick(self, merge=False):
        """Something to deliver: wake the vCPU if it sleeps in HLT, knock it out of the guest if it runs. On the
        vCPU's own thread (an exit it handles, device work in its HLT) it is out of the guest and looks at
        ``pending`` before it enters: a stop would only cost a STOPPED exit right after the entry.

        ``merge`` (an interrupt request, :meth:`kick_intr`): no stop where ``pending`` was set and the provider's
        run loop holds no injection (posted or taken: it may inject at the window and run on) or a stop is under
        way. The vCPU has not looked yet (its look clears ``pending`` first), or it runs with the window requested
        (``inject_interrupt`` leaves ``pending`` set only so), which brings it back to look; the vlapic's request,
        made before this kick, is seen there."""
        was = self.pending
        self.pending = True
        self.kicks += 1
        if self.thread == threading.get_ident():
            return
        if self.tsc_deadline is not None:
            self.tsc_deadline.hold()    # the ticker leaves ticks to Python until the next entry looks
        with self.cond:
            self.cond.notify_all()
            if self.sleeping:       # in HLT's wait, not in the guest: it re-checks ``pending`` before entering,
                return              # so a stop would only cost a STOPPED exit on the next run
        win = self.intwin
        if merge and was and (win is None or win.held() is None or win.stopping()):     # after the ticker's hold
            self.kicks_merged += 1
            return
        self.nv.stop()

    def kick_intr(self):
        """The vlapic's kick (a request, an EOI with more requested): where the provider's run loop injects by
        itself (``intwin``), a post, a take-over or a re-post while the vCPU runs, or no kick at all (the module
        docstring says when); otherwise, or with anything else to look at, :meth:`kick`."""
        win = self.intwin
        if win is not None and not self.nmi and self.thread != threading.get_ident():
            if not self.pending or ("pending" in SPARE and not win.stopping()):    # a stop brings it to Python
                posted = win.can_kick() and vmm_lapic.post_kick(self)
                if not posted and win.can_take_over():
                    posted = vmm_lapic.post_kick_taken(self, spare="taken" in SPARE)
                    if posted:
                        self.took_over += 1
                    if posted is vmm_lapic.SPARED:
                        self.kicks_spared += 1
                        return
                if posted:
                    self.kicks += 1
                    self.nv.kick_posted()
                    return
            if "behind" in SPARE and vmm_lapic.post_behind(self):
                self.kicks_spared += 1
                return
        self.kick(merge="merge" in SPARE)
