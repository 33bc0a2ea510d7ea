"""A KVM vCPU's IA32_TSC_DEADLINE kept by the compiled run loop (``fastrun.c``'s ``struct vmmshim_tscdl``).

Linux with the TSC-deadline timer writes IA32_TSC_DEADLINE (Intel SDM vol. 3A 10.5.4.1) at every idle entry and
exit and every tick: in the nested lab a quarter to a third of a disk or network transfer's exits to user space,
each about a millisecond of Python there (``docs/lab.md``, "TSC-deadline writes in the run loop"). While the LAPIC
timer is in TSC-deadline mode (:attr:`TscDeadline.enabled`, set by the vlapic's timer), the run loop serves the
write itself: it reads the guest TSC (``KVM_GET_MSRS``), sets this vCPU's CLOCK_MONOTONIC timerfd to when the
deadline falls due, completes the WRMSR and runs the guest again. A write whose deadline has passed goes to Python,
which fires at once.

When it falls due, the deadline is taken (it then reads 0, as the SDM says) by the process's ticker thread
(``fasttick.c``, once :meth:`TscDeadline.attach_ticker` has handed it the vCPU's interrupt slot): it posts the
tick to the run loop as a kick where the ops layer's :meth:`TscDeadline.plan` allows (``ops/vmm_lapic.py``,
``plan_tick``), recording an injection the guest ended in memory that it took the slot from
(:meth:`TscDeadline.take_folds`), and otherwise leaves it to Python: the VM's timer thread watches :attr:`fd` (the
ticker's eventfd; without the ticker, the timerfd itself: ``TimerThread.watch``), :meth:`TscDeadline.expire`
says a tick is due and the vlapic fires its timer LVT. The ticker is opt-in, ``VMMSHIM_TICKER=1``: in the nested
lab it made the network's transfers slower (docs/lab.md, "The ticker's two lost ends"); without it every tick is
Python's.

The vlapic's timer (``bhyve_devices/vlapic_timer.py``) calls the same :meth:`arm`/:meth:`cancel`/:meth:`value` for
the writes that do reach Python and for its own state (mode changes, snapshots: :meth:`due_ns`, :meth:`set`), so
there is one deadline. Its clock is CLOCK_MONOTONIC, which is ``time.monotonic_ns`` and the timer thread's.

Built with the loop by ``ops/native.py``; ``VMMSHIM_TSCDL=0`` (or ``VMMSHIM_FASTRUN=0``) keeps every write in
Python. Not supported: a deadline further than 2**62 ns away (armed at that distance).
"""

import contextlib
import os
import threading

from . import fastrun
from . import intwin
from . import ioctls as K
from . import layouts as L

ENV_OFF = "VMMSHIM_TSCDL"
ENV_TICKER = "VMMSHIM_TICKER"


class TscDeadline:
    """One vCPU's deadline: :meth:`arm`, :meth:`cancel`, :meth:`value` and :attr:`enabled` for the vlapic's timer,
    :attr:`fd` and :meth:`expire` for the timer thread, :attr:`struct` for the run loop."""

    def __init__(self, ffi, lib, vcpu_fd, tsc_hz):
        fd = lib.vmmshim_tscdl_open()
        if fd < 0:
            raise OSError(-fd, f"timerfd_create: {os.strerror(-fd)}")
        self.fd = self.timerfd = fd     # fd: what the timer thread watches (the ticker's eventfd once attached)
        self._ffi, self._lib, self._vcpu_fd = ffi, lib, vcpu_fd
        self.tick = None                # struct vmmshim_tick once the ticker serves the expiry
        self.struct = ffi.new("struct vmmshim_tscdl *", dict(
            msr_off=L.RUN_U, exit_wrmsr=K.KVM_EXIT_X86_WRMSR, timerfd=fd, get_msrs=K.KVM_GET_MSRS, tsc_hz=tsc_hz))

    @property
    def enabled(self):
        return bool(self.struct.enabled)

    @enabled.setter
    def enabled(self, on):
        self.struct.enabled = 1 if on else 0

    @property
    def served(self):
        """IA32_TSC_DEADLINE writes the run loop served."""
        return self.struct.served

    def arm(self, value):
        """Arms the deadline ``value`` (guest TSC; 0 disarms); True if it has passed already (nothing is armed:
        the caller fires now). Reads the guest TSC through the vCPU: not while it runs."""
        r = self._lib.vmmshim_tscdl_arm(self._vcpu_fd, self.struct, value & 0xFFFFFFFFFFFFFFFF)
        if r < 0:
            raise OSError(-r, f"IA32_TSC_DEADLINE: {os.strerror(-r)}")
        return r == 1

    def cancel(self):
        self.arm(0)

    def set(self, value, due_ns):
        """Sets the deadline ``value`` due at ``due_ns`` (CLOCK_MONOTONIC) without reading the guest TSC: a
        restored checkpoint's, where the vCPU's TSC may not be restored yet."""
        r = self._lib.vmmshim_tscdl_set(self.struct, value & 0xFFFFFFFFFFFFFFFF, max(0, due_ns))
        if r < 0:
            raise OSError(-r, f"IA32_TSC_DEADLINE: {os.strerror(-r)}")

    def value(self):
        """The deadline armed, 0 when none (it has fired, or none was written)."""
        return self.struct.value

    def due_ns(self):
        """When the deadline armed falls due (CLOCK_MONOTONIC), None when none is."""
        return self.struct.due_ns if self.struct.value else None

    def expire(self):
        """On the timer thread, :attr:`fd` readable: True if the deadline fell due and is taken now (with the
        ticker: one it left to Python)."""
        if self.tick is not None:
            try:
                os.eventfd_read(self.fd)
            except BlockingIOError:
                pass
            return self._lib.vmmshim_tick_take_fired(self.tick) == 1
        return self._lib.vmmshim_tscdl_expire(self.struct) == 1

    # -- the ticker (fasttick.c) ------------------------------------------------------------------------------------
    def attach_ticker(self, win, run, sig):
        """Hands the deadline's expiry to the process's ticker thread, which posts the tick to the loop's slot
        ``win`` (an ``IntWindow``) as a kick (``run``: the address of the vCPU's kvm_run mapping; ``sig``: the
        kick's signal) while :meth:`plan` allows it; :attr:`fd` becomes the eventfd it writes for a tick left to
        Python. True when attached; False (nothing changed) unless ``VMMSHIM_TICKER=1``."""
        if self.tick is not None or os.environ.get(ENV_TICKER, "0") != "1":
            return self.tick is not None
        ffi, lib = self._ffi, self._lib
        efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        tick = ffi.new("struct vmmshim_tick *", dict(
            sig=sig, notify_fd=efd, run=run, dl=int(ffi.cast("uintptr_t", self.struct)),
            win=int(ffi.cast("uintptr_t", win.struct))))
        if lib.vmmshim_ticker_add(tick) < 0:
            os.close(efd)
            return False
        self.tick, self.fd, self._win = tick, efd, win.struct
        win.struct.tick = int(ffi.cast("uintptr_t", tick))     # a HLT after an ended tick records it too
        return True

    def plan(self, vector, after_eoi=False, arm=False):
        """Under the vlapic's lock: the ticker may post ``vector`` when the deadline falls due (``after_eoi``: once
        the guest ended the one in service through its PV EOI word; ``arm``: that word is armed for the tick), or
        with None must leave the tick to Python."""
        tick = self.tick
        if vector is None:
            tick.plan = 0
            return
        tick.plan = (vector & intwin.VECTOR) | (intwin.AFTER_EOI if after_eoi else 0) | (intwin.ARM if arm else 0)

    def bind(self):
        """On the vCPU's thread, before it runs: the thread the ticker's kick signals."""
        tick = self.tick
        if tick is not None:
            tick.tid = threading.get_native_id()

    def hold(self):
        """Any thread, before a request reaches the vlapic's vCPU: the ticker leaves ticks to Python until the
        next :meth:`plan`."""
        tick = self.tick
        if tick is not None:
            tick.plan = 0

    def take_folds(self):
        """While the slot is the caller's (the run returned, or a take-over holds it): the injections the ticker
        found ended in the guest since the last call, ``(first, count)``, or None. ``first``: the first one's
        ``(vector, ended_first, armed, tick)`` as ``IntWindow.take_over`` tells them; the ``count - 1`` others
        were ticks it posted after that one."""
        tick = self.tick
        if tick is None or not tick.folds:
            return None
        s, res, count = tick.fold_state, tick.fold_result, tick.folds
        tick.fold_state = tick.fold_result = tick.folds = 0
        first = None
        if s & intwin.TAKEN:
            first = (s & intwin.VECTOR, bool(res & intwin.RES_EOI), bool(res & intwin.RES_ARMED),
                     bool(s & intwin.TICK))
        return first, count

    @contextlib.contextmanager
    def paused(self):
        """The ticker takes no deadline and posts no tick meanwhile (a checkpoint reads the deadlines and the
        vlapics: a tick it took and left to Python shows in :meth:`expire`)."""
        if self.tick is None:
            yield
            return
        self._lib.vmmshim_ticker_pause(1)
        try:
            yield
        finally:
            self._lib.vmmshim_ticker_pause(0)

    def folded(self, vector):
        """Whether the first injection the ticker found ended (:meth:`take_folds`) was of ``vector`` (any thread,
        after ``IntWindow.taken`` said no: the ticker records it before it lets go of the slot)."""
        tick = self.tick
        return bool(tick.folds) and tick.fold_state & (intwin.TAKEN | intwin.VECTOR) == intwin.TAKEN | vector

    @property
    def ticks_posted(self):
        """Ticks the ticker posted to the loop (and left to Python: :attr:`ticks_handed`)."""
        return self.tick.posted if self.tick is not None else 0

    @property
    def ticks_handed(self):
        return self.tick.handed if self.tick is not None else 0

    def close(self):
        tick, self.tick = self.tick, None
        if tick is not None:
            self._lib.vmmshim_ticker_remove(tick)   # the ticker touches neither again
            self._win.tick = 0
            os.close(tick.notify_fd)
        if self.timerfd >= 0:
            self.struct.enabled = 0
            os.close(self.timerfd)
            self.timerfd = self.fd = -1


def make(vcpu_fd, tsc_hz):
    """A :class:`TscDeadline`, or None where the compiled loop cannot be had or ``VMMSHIM_TSCDL=0``."""
    if os.environ.get(ENV_OFF, "1") == "0" or not tsc_hz:
        return None
    loaded = fastrun.load()
    if loaded is None:
        return None
    return TscDeadline(*loaded, vcpu_fd, tsc_hz)
