"""A KVM vCPU's IA32_TSC_DEADLINE kept by the compiled run loop (``fastrun.c``'s ``struct vmmshim_tscdl``).

Linux with the TSC-deadline timer writes IA32_TSC_DEADLINE (Intel SDM vol. 3A 10.5.4.1) at every idle entry and
exit and every tick: in the nested lab a quarter to a third of a disk or network transfer's exits to user space,
each about a millisecond of Python there (``docs/lab.md``, "TSC-deadline writes in the run loop"). While the LAPIC
timer is in TSC-deadline mode (:attr:`TscDeadline.enabled`, set by the vlapic's timer), the run loop serves the
write itself: it reads the guest TSC (``KVM_GET_MSRS``), sets this vCPU's CLOCK_MONOTONIC timerfd to when the
deadline falls due, completes the WRMSR and runs the guest again. The VM's timer thread watches the timerfd
(``TimerThread.watch``); when it is readable, :meth:`TscDeadline.expire` takes the deadline (it then reads 0, as the
SDM says) and the vlapic fires its timer LVT. A write whose deadline has passed goes to Python, which fires at once.

The vlapic's timer (``bhyve_devices/vlapic_timer.py``) calls the same :meth:`arm`/:meth:`cancel`/:meth:`value` for
the writes that do reach Python and for its own state (mode changes, snapshots: :meth:`due_ns`, :meth:`set`), so
there is one deadline. Its clock is CLOCK_MONOTONIC, which is ``time.monotonic_ns`` and the timer thread's.

Built with the loop by ``ops/native.py``; ``VMMSHIM_TSCDL=0`` (or ``VMMSHIM_FASTRUN=0``) keeps every write in
Python. Not supported: a deadline further than 2**62 ns away (armed at that distance).
"""

import os

from . import fastrun
from . import ioctls as K
from . import layouts as L

ENV_OFF = "VMMSHIM_TSCDL"


class TscDeadline:
    """One vCPU's deadline: :meth:`arm`, :meth:`cancel`, :meth:`value` and :attr:`enabled` for the vlapic's timer,
    :attr:`fd` and :meth:`expire` for the timer thread, :attr:`struct` for the run loop."""

    def __init__(self, ffi, lib, vcpu_fd, tsc_hz):
        fd = lib.vmmshim_tscdl_open()
        if fd < 0:
            raise OSError(-fd, f"timerfd_create: {os.strerror(-fd)}")
        self.fd = fd
        self._lib, self._vcpu_fd = lib, vcpu_fd
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
        """On the timer thread, the timerfd readable: True if the deadline fell due and is taken now."""
        return self._lib.vmmshim_tscdl_expire(self.struct) == 1

    def close(self):
        if self.fd >= 0:
            self.struct.enabled = 0
            os.close(self.fd)
            self.fd = -1


def make(vcpu_fd, tsc_hz):
    """A :class:`TscDeadline`, or None where the compiled loop cannot be had or ``VMMSHIM_TSCDL=0``."""
    if os.environ.get(ENV_OFF, "1") == "0" or not tsc_hz:
        return None
    loaded = fastrun.load()
    if loaded is None:
        return None
    return TscDeadline(*loaded, vcpu_fd, tsc_hz)
