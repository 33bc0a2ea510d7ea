"""The extensions beyond libnvmm of a :class:`ops.nvmm.api.Machine` (a mixin): posted port writes, published port
and MMIO reads, doorbells, the hypervisor's own paravirtual clock, the posted writes' drain and the run loop's
wake timer. Each one has a provider hook (``_post_io`` ...) whose default says "not here" (False or None), so a
provider implements only what its hypervisor has and lists it in ``Capability.features``; the VM asks for one only
where the feature is listed (``vmmshim/fastpaths.py``).

Not supported: anything libnvmm itself offers (the plain API is :mod:`ops.nvmm.api`).
"""

import errno

from .records import nvmm_error


class MachineExtensions:
    """Expects ``destroyed`` (the machine was destroyed: the calls that change something do nothing)."""

    def post_io(self, port, size, cb):
        """Extension: asks that guest OUTs to ports ``[port, port+size)`` be *posted*, buffered without an exit.
        Returns False where the provider cannot (they keep exiting as IO exits). Where it can, every posted write
        is handed to ``cb(port, data)`` in guest order before any vCPU's next exit is returned by ``run`` (and
        by :meth:`drain_posted`), so a device sees them before any access that did exit. For a one-port range
        (``size`` 1) consecutive writes come as one call whose ``data`` holds one byte per write, in order. Only
        for registers whose writes need no answer and whose side effects may wait for the next exit (a UART's
        transmit register)."""
        return self._post_io(port, size, cb)

    def answer_io(self, port, value):
        """Extension: publishes what a one-byte IN from ``port`` reads (``value``, 0..255) until the next call;
        ``None`` withdraws it. Where the provider can, it answers such reads itself, without an exit (and
        without the assist callback), and returns True (it may still let one exit now and then: the read then
        reaches the callback, which returns the same value); it returns False where it cannot (libnvmm): the reads
        keep exiting. Only for registers whose reads have no side effect and whose value the device can keep
        published whenever its state changes (a UART's line status); wider and string reads always exit.
        Each vCPU counts the reads it answered (``Vcpu.answered_io``). Whether the provider can answer at all is
        :data:`FEATURE_ANSWERED_IO` in ``Capability.features``."""
        if not 0 <= port < 0x10000 or (value is not None and not 0 <= value <= 0xFF):
            raise nvmm_error(errno.EINVAL, f"cannot answer port {port:#x} with {value!r}")
        return False if self.destroyed else self._answer_io(port, value)

    def answer_mmio(self, gpa, value):
        """Extension: publishes what a read inside the aligned 32-bit MMIO register at ``gpa`` returns (``value``,
        a 32-bit number; a read of 1 or 2 bytes in it gets its bytes) until the next call; ``None`` withdraws it.
        As :meth:`answer_io`: where the provider can, it answers such reads itself without an exit and returns
        True (one may still exit now and then and reach the callback, which returns the same value); False where
        it cannot, or has no room left for another page of registers: the reads keep exiting. Only for
        registers whose reads have no side effect and whose device publishes every change (an AHCI port's
        interrupt status); reads wider than 4 bytes always exit. Each vCPU counts the reads it answered
        (``Vcpu.answered_mmio``); :data:`FEATURE_ANSWERED_MMIO` in ``Capability.features`` says whether the
        provider can answer at all."""
        if gpa < 0 or gpa & 3 or (value is not None and not 0 <= value <= 0xFFFFFFFF):
            raise nvmm_error(errno.EINVAL, f"cannot answer MMIO {gpa:#x} with {value!r}")
        return False if self.destroyed else self._answer_mmio(gpa, value)

    def kernel_pvclock(self):
        """Extension: lets the hypervisor's own paravirtual clock (KVM's kvmclock) answer the guest's clock MSRs
        (0x4b564d00 and 0x4b564d01) instead of exiting. Returns False where there is none (NVMM, the soft CPU):
        the ops layer then emulates the clock itself."""
        return self._kernel_pvclock()

    def kernel_clock(self, ns=None):
        """Extension, where :meth:`kernel_pvclock` took: the guest's kvmclock time in ns (KVM_GET_CLOCK), or with
        ``ns`` sets it (KVM_SET_CLOCK: a restored guest's clock goes on from there). None where there is none."""
        return self._kernel_clock(ns)

    def doorbell(self, addr, size, pio, datamatch, fd):
        """Extension: asks that guest writes to ``addr`` (a port if ``pio``, else guest-physical; of ``size``
        bytes, 0 meaning any size of an MMIO write; of the value ``datamatch`` only, unless None) signal the
        eventfd ``fd`` instead of exiting: a *doorbell*, for a register whose writes need no answer and whose
        effect may run on another thread (a virtio queue notification). Returns False where the provider cannot
        (NVMM, the soft CPU): the writes keep exiting."""
        return self._doorbell(addr, size, pio, datamatch, fd, assign=True)

    def remove_doorbell(self, addr, size, pio, datamatch, fd):
        """Extension: undoes :meth:`doorbell` (same arguments); the writes exit again."""
        if not self.destroyed:
            self._doorbell(addr, size, pio, datamatch, fd, assign=False)

    def drain_posted(self):
        """Extension: hands the posted writes buffered so far to their callbacks (``run`` does it itself)."""
        if not self.destroyed:
            self._drain_posted()

    def wake_timer(self, period_ns):
        """vmmshim's extension: a one-shot timer the run loop starts (``period_ns`` ahead) when a vCPU leaves a HLT
        it slept in the loop (the posted-write flush): ``fd`` (a timerfd), ``arm()`` (unless set), ``off()``; None
        where vCPUs sleep in Python (the default)."""
        return self._wake_timer(period_ns)

    # -- provider hooks (defaults: the provider has none of them) -------------------------------------------------
    def _post_io(self, port, size, cb):
        return False

    def _kernel_pvclock(self):
        return False

    def _kernel_clock(self, ns):
        return None

    def _answer_io(self, port, value):
        return False

    def _answer_mmio(self, gpa, value):
        return False

    def _doorbell(self, addr, size, pio, datamatch, fd, assign):
        return False

    def _drain_posted(self):
        pass

    def _wake_timer(self, period_ns):
        return None
