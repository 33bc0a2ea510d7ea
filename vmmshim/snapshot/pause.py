"""Every vCPU at a quiet point (a checkpoint's, ``vmmshim ctl --pause``): each running vCPU is held before its next
entry (bhyve's ``vm_suspend_cpu``: a ``VM_EXITCODE_DEBUG`` exit) and parks on its own thread here until
:meth:`Pauser.resume`. A vCPU sleeping in HLT is held too and halts again once released (``ops/vmm.py``). An AP
still waiting for its SIPI has no thread and nothing to hold.

Not supported: pausing while a gdb client holds the guest (the two would fight over the same hold: refused).
"""

import threading
import time

PAUSE_TIMEOUT_S = 10.0


class PauseError(Exception):
    """The vCPUs could not all be brought to the quiet point."""


class Pauser:
    def __init__(self, vm):
        self.vm = vm
        self.cond = threading.Condition()
        self.holding = False
        self.parked = set()

    def _running(self):
        return {v for v, t in self.vm.threads.items() if t.is_alive()}

    def pause(self, timeout=PAUSE_TIMEOUT_S):
        """Holds every running vCPU and returns once each is parked; PauseError (and nothing held) otherwise."""
        vm = self.vm
        if vm.debugger is not None and vm.debugger.parked:
            raise PauseError("a debugger holds the guest")
        with self.cond:
            if self.holding:
                raise PauseError("already paused")
            self.holding = True
        vm.ops.vm_suspend_cpu(vm.vmi, -1)
        end = time.monotonic() + timeout
        with self.cond:
            while vm.status is None and not self._running() <= self.parked:
                left = end - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(min(left, 0.1))
            done = vm.status is None and self._running() <= self.parked
        if not done:
            self.resume()
            raise PauseError("the VM ended" if vm.status is not None else
                             f"vCPUs {sorted(self._running() - self.parked)} did not stop in {timeout:g} s")

    def park(self, vcpu):
        """On ``vcpu``'s thread, at its DEBUG exit: waits while the VM is paused."""
        with self.cond:
            self.parked.add(vcpu)
            self.cond.notify_all()
            while self.holding and self.vm.status is None:
                self.cond.wait(0.5)
            self.parked.discard(vcpu)

    def resume(self):
        vm = self.vm
        vm.ops.vm_resume_cpu(vm.vmi, -1)     # first: a released vCPU must not meet the hold again
        with self.cond:
            self.holding = False
            self.cond.notify_all()
