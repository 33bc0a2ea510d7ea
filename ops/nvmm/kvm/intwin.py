"""The interrupt a KVM vCPU's compiled run loop injects by itself, at the guest's interrupt window or at a kick
(``fastrun.c``'s ``struct vmmshim_intwin``).

Without an in-kernel LAPIC, an interrupt is injected by user space with ``KVM_INTERRUPT`` (KVM API): one that
another thread raises while the guest runs takes a kick (a signal: ``KVM_RUN`` returns ``EINTR``), and one that
arrives while the guest has IF clear, or that waits for the end of the interrupt in service, takes an exit at the
window (``request_interrupt_window``, ``KVM_EXIT_IRQ_WINDOW_OPEN``). In the nested lab those two exits were nine in
ten of a network transfer's exits to user space, each about a millisecond of Python there (``docs/lab.md``, "The
interrupt window and kicks in the run loop").

Posts. The ops layer, when it asks for the window, posts the vector its vlapic would take there
(:meth:`IntWindow.post`), with what the injection needs: whether the guest must first have ended the one
interrupt in service through its PV EOI word (``Documentation/virt/kvm/x86/msr.rst``, ``MSR_KVM_PV_EOI_EN``),
whether the word is armed for the new vector, and whether the window is wanted again after it. Another thread
whose request needs a kick posts the same way while the loop runs (:meth:`IntWindow.kick`, under the vlapic's
lock), sets ``immediate_exit`` and signals the vCPU's thread: at that ``EINTR`` the loop injects at once if the guest
takes interrupts, else asks for the window. At the window or the kick the loop checks the guest's IF, KVM's
``ready_for_interrupt_injection``, CR8 against the vector's priority class and the PV EOI word, injects and runs the
guest again; a check that fails gives Python the exit as before. A post lives for one run of the loop: what it
did not inject is withdrawn when the run returns (a kick's, with :attr:`IntWindow.on_withdrawn`, so that the ops
layer looks at its vlapic before the next entry). ``stop()`` marks its ``EINTR`` (:meth:`IntWindow.stop`) for Python.

An injected vector is :meth:`IntWindow.taken` until the ops layer has accepted it in its vlapic (IRR -> ISR) at the
run's return (:attr:`IntWindow.on_taken`); meanwhile another thread that requests the same vector learns from
:meth:`IntWindow.taken` that the CPU took the earlier one, so its request is a new one, not merged. A thread whose
request finds the loop running in that state accepts the injection itself (:meth:`IntWindow.take_over`: the
loop's return waits until :meth:`IntWindow.release`) and posts its own vector, instead of stopping the vCPU
for Python (a CPU-bound guest's timer tick after a tick the loop injected, a network transfer's interrupts;
``VMMSHIM_TAKE_OVER=0`` stops the vCPU instead, as before).
``VMMSHIM_INTWIN=0`` (or ``VMMSHIM_FASTRUN=0``) keeps every window exit and kick in Python.

Ticks. The ticker thread (``fasttick.c``, ``tscdeadline.py``) posts a due TSC-deadline tick the same way, marked
``TICK`` (the vlapic has not fired it: :attr:`IntWindow.on_taken` and :attr:`IntWindow.on_withdrawn` are told), and
may take the slot over from an injection the guest has ended in memory, which it records for Python.

Sleeping in HLT (``fasthalt.c``). A guest's HLT exit is slept in the loop where the ops layer allows it
(:meth:`IntWindow.halt_policy`), and a run the ops layer starts after its own HLT handling found nothing to do
(:meth:`IntWindow.halt_now`) begins asleep: the thread polls the slot's eventfd instead of waiting on Python's
condition, a kick's post ends the sleep with the injection, and a ``stop()`` ends it for Python
(:meth:`IntWindow.take_slept_out` then says the guest is still halted). :meth:`IntWindow.wake` writes the eventfd when
the slot sleeps; :class:`WakeTimer` is the VM's timer the loop starts whenever a sleep ends (the posted-write
flush). ``VMMSHIM_HALT_LOOP=0`` keeps every HLT in Python.

Not supported: ExtINT (the 8259's INTA cycle) and NMIs, more than one vector per run of the loop.
"""

import os

from . import fastrun
from . import ioctls as K
from . import layouts as L

ENV_OFF = "VMMSHIM_INTWIN"
ENV_HALT_OFF = "VMMSHIM_HALT_LOOP"
ENV_TAKE_OVER_OFF = "VMMSHIM_TAKE_OVER"
VECTOR = 0xFF
POSTED = 0x100
TAKEN = 0x200
IN = 0x400          # the loop runs
KICK = 0x800        # posted by another thread
AFTER_EOI = 0x1000  # only once the guest cleared its PV EOI bit (it ended the one interrupt in service)
ARM = 0x2000        # set the PV EOI bit once injected
AGAIN = 0x4000      # ask for the window again once injected
MASKED = 0x8000     # the loop: a kick's vector waits for the guest to set IF
BUSY = 0x10000      # another thread accepts the loop's injection (take_over): the loop's return waits
TICK = 0x20000      # posted by the ticker (fasttick.c): a TSC-deadline tick Python's vlapic has not fired
AGAIN_EDGE = 1      # vmmshim_intwin_again: the new vector is edge-triggered (WIN_ARM may stay)
AGAIN_IN_SERVICE = 2    # ... it is the one in service, requested again: the post must wait for its end
RES_EOI = 1         # result: the guest had ended the one in service (its PV EOI bit was clear)
RES_ARMED = 2       # result: the word was armed for the injected vector
HALT_AT_EXIT = 1    # a HLT exit may be slept in the loop
HALT_NOW = 2        # the next run starts asleep


class IntWindow:
    """One vCPU's slot: :meth:`post` before a run and :meth:`settle` after it (the vCPU's thread), :meth:`kick` and
    :meth:`taken` from any thread. The ops layer sets :attr:`on_taken` ``(vector, ended_first, armed, tick)``, which
    calls :meth:`clear` once its vlapic has accepted the vector (``ended_first``: the guest had ended the one in
    service through its PV EOI word; ``armed``: the word is armed for ``vector``; ``tick``: the ticker posted it, the
    vlapic has not fired it), and :attr:`on_withdrawn` ``(tick)``, called when a kick's post comes back not
    injected."""

    def __init__(self, ffi, lib):
        self._ffi, self._lib = ffi, lib
        self.halt_loop = os.environ.get(ENV_HALT_OFF, "1") != "0"
        self.take_overs = os.environ.get(ENV_TAKE_OVER_OFF, "1") != "0"
        wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) if self.halt_loop else -1
        self.struct = ffi.new("struct vmmshim_intwin *", dict(
            kvm_interrupt=K.KVM_INTERRUPT, exit_window=K.KVM_EXIT_IRQ_WINDOW_OPEN,
            window_off=L.RUN_REQUEST_IRQ_WINDOW, ready_off=L.RUN_READY_FOR_INTR, cr8_off=L.RUN_CR8,
            exit_hlt=K.KVM_EXIT_HLT, wake_fd=wake_fd, idle_fd=-1))
        self._waketimer = None
        # the loop reads the byte after each of these offsets
        assert L.RUN_IF_FLAG == L.RUN_READY_FOR_INTR + 1 and L.RUN_IMMEDIATE_EXIT == L.RUN_REQUEST_IRQ_WINDOW + 1
        self.on_taken = None
        self.on_withdrawn = None
        self._word = None           # (the PV EOI view posted last, its address): valid while guest RAM is mapped

    @property
    def served(self):
        """Interrupts the loop injected at a window."""
        return self.struct.served

    @property
    def served_kicks(self):
        """Interrupts the loop injected at a kick."""
        return self.struct.served_kicks

    def _bits(self, vector, after_eoi, arm, again, word):
        if (after_eoi or arm) and word is None:
            raise ValueError("a PV EOI condition without the PV EOI word")
        return (vector & VECTOR) | (AFTER_EOI if after_eoi else 0) | (ARM if arm else 0) | (AGAIN if again else 0)

    def post(self, vector, after_eoi=False, arm=False, again=False, word=None):
        """On the vCPU's thread, for the next run: inject ``vector`` at the window; ``after_eoi``: only once the
        guest has ended the one interrupt in service through its PV EOI word (bit 0 clear); ``arm``: set that bit
        once injected; ``again``: ask for the window again once injected. ``word``: the PV EOI word (a writable
        4-byte view of guest RAM), needed with ``after_eoi`` or ``arm``."""
        bits = self._bits(vector, after_eoi, arm, again, word)
        s = self.struct
        s.pv_eoi = 0 if word is None else self._address(word)
        s.result = 0
        s.state = POSTED | bits

    def _address(self, word):
        """The address of the PV EOI word (a 4-byte view of guest RAM), cached for the same view."""
        cached = self._word
        if cached is None or cached[0] is not word:
            # the address only: a buffer kept exported would hold the guest RAM's mapping open at teardown
            with self._ffi.from_buffer(word) as buf:
                cached = self._word = (word, int(self._ffi.cast("uintptr_t", buf)))
        return cached[1]

    def kick(self, vector, after_eoi=False, arm=False, again=False, word=None):
        """From another thread, while the loop may run: posts ``vector`` to be injected at once (or at the
        window; with ``after_eoi`` once the guest has ended the one in service through its PV EOI word, as
        :meth:`post`). True when posted: the caller then sets ``immediate_exit`` and signals the vCPU's thread
        (``KvmVcpu.kick_posted``). False when the loop is not running or holds a post already, or ``word`` is not
        the PV EOI word the vCPU's thread posted last (its address is set only there)."""
        if word is not None:
            cached = self._word
            if cached is None or cached[0] is not word:
                return False
        return self._lib.vmmshim_intwin_kick(self.struct, self._bits(vector, after_eoi, arm, again, word)) == 1

    def can_take_over(self):
        """Whether the loop runs holding an injection not yet accepted, with nothing posted (a cheap look, any
        thread): :meth:`take_over` may succeed."""
        return self.take_overs and self.struct.state & ~(VECTOR | TICK) == IN | TAKEN

    def take_over(self):
        """From another thread, under the vlapic's lock: holds the loop's return while the caller accepts the
        loop's injection itself (as :attr:`on_taken` would at the return, without :meth:`clear`); returns its
        ``(vector, ended_first, armed, tick)``, or None when the slot is not in that state. :meth:`release` must
        follow."""
        s = self._lib.vmmshim_intwin_take_over(self.struct)
        if not s:
            return None
        res = self.struct.result
        return s & VECTOR, bool(res & RES_EOI), bool(res & RES_ARMED), bool(s & TICK)

    def release(self, vector=None, after_eoi=False, arm=False, again=False, word=None):
        """Ends :meth:`take_over`: posts ``vector`` as :meth:`kick` does (True: the caller kicks with
        ``KvmVcpu.kick_posted``), or with None leaves the slot empty (False)."""
        if vector is not None and word is not None:
            cached = self._word
            if cached is None or cached[0] is not word:
                vector = None
        post = 0 if vector is None else self._bits(vector, after_eoi, arm, again, word)
        return self._lib.vmmshim_intwin_release(self.struct, post) == 1

    def again(self, vector, first=None, edge=True, in_service=False):
        """From another thread, while the loop holds ``vector`` posted and not injected: that post becomes one of
        ``first`` (default the same; a higher vector the vlapic requests now, ``edge``-triggered or not; with
        ``in_service`` the one in service, requested again, which the post must then wait for the end of), which
        brings the vCPU back to Python once injected (the window asked again after an armed one, the guest's EOI
        exiting after another), so what waits below it needs no kick. True when done; False: kick."""
        first = vector if first is None else first
        flags = (AGAIN_EDGE if edge else 0) | (AGAIN_IN_SERVICE if in_service else 0)
        return self._lib.vmmshim_intwin_again(self.struct, vector & VECTOR, first & VECTOR, flags) == 1

    def can_kick(self):
        """Whether :meth:`kick` may succeed now: the loop runs and holds no post (a cheap look first, any thread)."""
        return self.struct.state == IN

    def settle(self):
        """After a run whose slot is not empty (the vCPU's thread): hands the injected vector to
        :attr:`on_taken` (which calls :meth:`clear`), or withdraws a post the loop did not take."""
        s = self.struct
        state = s.state
        if state & TAKEN:
            cb = self.on_taken
            if cb is not None:
                res = s.result
                cb(state & VECTOR, bool(res & RES_EOI), bool(res & RES_ARMED), bool(state & TICK))
                return
        s.state = 0
        if state & KICK and self.on_withdrawn is not None:
            self.on_withdrawn(bool(state & TICK))

    def taken(self, vector):
        """Whether the loop injected ``vector`` and the ops layer has not accepted it yet (any thread)."""
        return self.struct.state & (TAKEN | VECTOR) == TAKEN | (vector & VECTOR)

    def held(self):
        """The vector the slot holds, posted or injected and not accepted yet, or None (any thread)."""
        state = self.struct.state
        return state & VECTOR if state & (POSTED | TAKEN) else None

    def masked(self):
        """Whether a kick's vector waits in the loop for the guest to set IF (any thread): the guest holds it
        back, as the ops layer's ``masked`` says for the windows it asks for."""
        return bool(self.struct.state & MASKED)

    def pending_accept(self):
        """Whether some injected vector waits to be accepted."""
        return bool(self.struct.state & TAKEN)

    def clear(self):
        self.struct.state = 0

    def stop(self, on):
        """``stop()``'s mark (set before its ``immediate_exit``, cleared with it): its EINTR is Python's."""
        self.struct.hard = 1 if on else 0

    def stopping(self):
        """Whether a ``stop()`` is under way: the vCPU has not cleared it yet (any thread)."""
        return bool(self.struct.hard)

    # -- sleeping in HLT (fasthalt.c) -----------------------------------------------------------------------------
    def configure_halt(self, ring_off=0, waketimer=None):
        """The coalesced ring's header in the vCPU's mapping (0: none; a HLT with posted writes waiting goes to
        Python), and the VM's :class:`WakeTimer` (or None)."""
        s = self.struct
        s.ring_off = ring_off
        self._waketimer = waketimer
        s.waketimer = int(self._ffi.cast("uintptr_t", waketimer.struct)) if waketimer is not None else 0

    def halt_policy(self, at_exit, idle_fd=None, cr8=0, solo=False, eoi_word=None, eoi_armed=False):
        """Before a run (the vCPU's thread): whether a HLT exit may be slept in the loop, the fd whose being
        readable sends it to Python instead (the VM's idle work), the guest's CR8 the vlapic agrees with (a
        HLT after the guest changed it goes to Python), whether it is the VM's only vCPU (its sleep then stops
        the wake timer), and the PV EOI word (its address is what a kick's post may name) with whether
        it is armed for the interrupt in service (a HLT after the guest cleared its bit goes to Python, whose
        vlapic has not seen that EOI)."""
        s = self.struct
        s.solo = 1 if solo else 0
        if eoi_word is None:
            s.eoi_armed = 0
        else:
            s.pv_eoi = self._address(eoi_word)      # the word a kick's post arms, and the loop's HLT looks at
            s.eoi_armed = 1 if eoi_armed else 0
        s.halt = (s.halt & HALT_NOW) | (HALT_AT_EXIT if at_exit and self.halt_loop else 0)
        s.idle_fd = -1 if idle_fd is None else idle_fd
        s.cr8_seen = cr8 & 0xF

    def halt_now(self):
        """The next run starts asleep (the guest stands after a HLT, IF set, and nothing was found to inject)."""
        if self.halt_loop:
            self.struct.halt |= HALT_NOW

    def take_slept_out(self):
        """Whether the last run's sleep ended for Python with the guest still halted (cleared by the call)."""
        s = self.struct
        if s.slept_out:
            s.slept_out = 0
            return True
        return False

    @property
    def sleeping(self):
        """Whether the loop sleeps in a guest's HLT now (any thread)."""
        return self.struct.sleeping != 0

    @property
    def halts(self):
        """HLTs slept in the loop."""
        return self.struct.halts

    @property
    def halt_wakes(self):
        """Sleeps in the loop that ended with an injection there."""
        return self.struct.halt_wakes

    def wake(self):
        """After a kick's post or a ``stop()`` (any thread): ends the loop's sleep if it sleeps."""
        if self.halt_loop:
            self._lib.vmmshim_intwin_wake(self.struct)

    def close(self):
        fd, self.struct.wake_fd = self.struct.wake_fd, -1
        if fd >= 0:
            os.close(fd)


class WakeTimer:
    """A VM-wide one-shot timer (a ``CLOCK_MONOTONIC`` timerfd, :attr:`fd`) that the run loop starts whenever one of
    the VM's vCPUs leaves its sleep in the loop, and Python starts and stops with :meth:`arm` and :meth:`off`.
    The posted-write flush's timer (``vmmshim/fastpaths.py``): it must run whenever a vCPU may run."""

    def __init__(self, ffi, lib, period_ns):
        fd = lib.vmmshim_tscdl_open()
        if fd < 0:
            raise OSError(-fd, os.strerror(-fd))
        self._lib = lib
        self.fd = fd
        self.struct = ffi.new("struct vmmshim_waketimer *", dict(tfd=fd, armed=0, period_ns=period_ns))

    def arm(self):
        """Sets it to fire one period from now, unless it is set."""
        self._lib.vmmshim_waketimer_arm(self.struct)

    def off(self):
        """Stops it (its expiry read too); the caller then looks whether a vCPU may run and arms it if one may."""
        self._lib.vmmshim_waketimer_off(self.struct)

    def close(self):
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


def make_waketimer(period_ns):
    """A :class:`WakeTimer`, or None where the compiled loop cannot be had (or does not sleep in HLT)."""
    if os.environ.get(ENV_OFF, "1") == "0" or os.environ.get(ENV_HALT_OFF, "1") == "0":
        return None
    loaded = fastrun.load()
    return WakeTimer(*loaded, period_ns) if loaded is not None else None


def make():
    """An :class:`IntWindow`, or None where the compiled loop cannot be had or ``VMMSHIM_INTWIN=0``."""
    if os.environ.get(ENV_OFF, "1") == "0":
        return None
    loaded = fastrun.load()
    if loaded is None:
        return None
    return IntWindow(*loaded)
