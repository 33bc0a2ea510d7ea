"""The interrupt a KVM vCPU's compiled run loop injects when the guest opens its interrupt window
(``fastrun.c``'s ``struct vmmshim_intwin``).

Without an in-kernel LAPIC, an interrupt that arrives while the guest runs with IF clear, or one that waits for the
end of the interrupt in service, is injected at ``KVM_EXIT_IRQ_WINDOW_OPEN`` (KVM API, ``request_interrupt_window``
and ``KVM_INTERRUPT``). In the nested lab those window exits were about half of a network or disk transfer's exits
to user space, each about a millisecond of Python there (``docs/lab.md``, "The interrupt window in the run loop").

The ops layer, when it asks for the window, posts the vector its vlapic would inject there (:meth:`IntWindow.post`)
with what the injection needs: whether the guest must first have ended the one interrupt in service through its PV
EOI word (``Documentation/virt/kvm/x86/msr.rst``, ``MSR_KVM_PV_EOI_EN``), whether the word is armed for the new
vector, and whether the window is wanted again after it. At the window exit the loop checks the guest's IF, KVM's
``ready_for_interrupt_injection``, CR8 against the vector's priority class and that word, injects, and runs the
guest again; any check that fails gives Python the exit as before. A post lives for one run: what the loop did not
inject is withdrawn when the run returns.

An injected vector is :attr:`IntWindow.taken` until the ops layer has accepted it in its vlapic (IRR -> ISR) at the
run's return (:attr:`IntWindow.on_taken`); meanwhile another thread that requests the same vector learns from
:meth:`IntWindow.taken` that the CPU took the earlier one, so its request is a new one, not merged.
``VMMSHIM_INTWIN=0`` (or ``VMMSHIM_FASTRUN=0``) keeps every window exit in Python.

Not supported: ExtINT (the 8259's INTA cycle) and NMIs at the window, more than one vector per run.
"""

import os

from . import fastrun
from . import ioctls as K
from . import layouts as L

ENV_OFF = "VMMSHIM_INTWIN"
POSTED = 0x100
TAKEN = 0x200
VECTOR = 0xFF
AFTER_EOI = 1       # only once the guest cleared its PV EOI bit (it ended the one interrupt in service)
ARM = 2             # set the PV EOI bit once injected
AGAIN = 4           # ask for the window again once injected
RES_EOI = 1         # result: the guest had ended the one in service (its PV EOI bit was clear)
RES_ARMED = 2       # result: the word was armed for the injected vector


class IntWindow:
    """One vCPU's window slot: :meth:`post` before a run, :meth:`settle` after it (the provider), :meth:`taken` from
    any thread, :attr:`on_taken` ``(vector, ended_first, armed)`` set by the ops layer, which calls :meth:`clear`
    once its vlapic has accepted the vector (``ended_first``: the guest had ended the one in service through its
    PV EOI word; ``armed``: the word is armed for ``vector``)."""

    def __init__(self, ffi):
        self._ffi = ffi
        self.struct = ffi.new("struct vmmshim_intwin *", dict(
            kvm_interrupt=K.KVM_INTERRUPT, exit_window=K.KVM_EXIT_IRQ_WINDOW_OPEN,
            window_off=L.RUN_REQUEST_IRQ_WINDOW, ready_off=L.RUN_READY_FOR_INTR, cr8_off=L.RUN_CR8))
        assert L.RUN_IF_FLAG == L.RUN_READY_FOR_INTR + 1        # the loop reads if_flag right after it
        self.on_taken = None
        self._word = None           # (the view posted last, its cffi buffer): the address stays valid with it

    @property
    def served(self):
        """Interrupts the loop injected."""
        return self.struct.served

    def post(self, vector, after_eoi=False, arm=False, again=False, word=None):
        """For the next run: inject ``vector`` at the window; ``after_eoi``: only once the guest has ended the one
        interrupt in service through its PV EOI word (bit 0 clear); ``arm``: set that bit once injected;
        ``again``: ask for the window again once injected. ``word``: the PV EOI word (a writable 4-byte view of
        guest RAM), needed with ``after_eoi`` or ``arm``."""
        if (after_eoi or arm) and word is None:
            raise ValueError("a PV EOI condition without the PV EOI word")
        s = self.struct
        if word is None:
            s.pv_eoi = 0
        else:
            cached = self._word
            if cached is None or cached[0] is not word:
                cached = self._word = (word, self._ffi.from_buffer(word))
            s.pv_eoi = int(self._ffi.cast("uintptr_t", cached[1]))
        s.flags = (AFTER_EOI if after_eoi else 0) | (ARM if arm else 0) | (AGAIN if again else 0)
        s.result = 0
        s.state = POSTED | (vector & VECTOR)

    def settle(self):
        """After a run whose slot is not empty: withdraws a post the loop did not take, or hands the injected vector
        to :attr:`on_taken` (which calls :meth:`clear`)."""
        s = self.struct
        state = s.state
        if state & TAKEN:
            cb = self.on_taken
            if cb is not None:
                res = s.result
                cb(state & VECTOR, bool(res & RES_EOI), bool(res & RES_ARMED))
                return
        s.state = 0

    def taken(self, vector):
        """Whether the loop injected ``vector`` and the ops layer has not accepted it yet (any thread)."""
        return self.struct.state == TAKEN | (vector & VECTOR)

    def pending_accept(self):
        """Whether some injected vector waits to be accepted."""
        return bool(self.struct.state & TAKEN)

    def clear(self):
        self.struct.state = 0


def make():
    """An :class:`IntWindow`, or None where the compiled loop cannot be had or ``VMMSHIM_INTWIN=0``."""
    if os.environ.get(ENV_OFF, "1") == "0":
        return None
    loaded = fastrun.load()
    if loaded is None:
        return None
    return IntWindow(loaded[0])
