"""NVMM primitives: libnvmm's version-2 API (NetBSD 10, ``libnvmm(3)``) rendered in Python.

A provider implements :class:`Provider`, :class:`Machine` and :class:`Vcpu` for one hypervisor; everything above
(``ops/nvmm_ops.py``, the VM, the tests) speaks only this API. Names follow libnvmm:

==========================  ====================================================
libnvmm                     here
==========================  ====================================================
nvmm_init, nvmm_capability  ``ops.nvmm.nvmm_init(name)``, ``Provider.capability()``
nvmm_machine_create         ``Provider.machine_create()``
nvmm_vcpu_create            ``Machine.vcpu_create(cpuid)``
vcpu->state / event / exit  ``Vcpu.state`` (:class:`State`), ``Vcpu.event``, ``Vcpu.exit``
nvmm_vcpu_getstate/setstate ``Vcpu.getstate(flags)`` / ``Vcpu.setstate(flags)``
nvmm_vcpu_inject / run      ``Vcpu.inject()`` / ``Vcpu.run() -> Exit``
nvmm_vcpu_stop              ``Vcpu.stop()`` (callable from any thread, interrupts a running guest)
nvmm_assist_io / _mem       ``Vcpu.assist_io()`` / ``Vcpu.assist_mem()``, calling the CONF_CALLBACKS
nvmm_gva_to_gpa             ``Vcpu.gva_to_gpa(gva) -> (gpa, prot)``
nvmm_hva_map, nvmm_gpa_map  ``Machine.hva_map(hva, size)``, ``Machine.gpa_map(hva, gpa, size, prot)``
nvmm_gpa_to_hva             ``Machine.gpa_to_hva(gpa) -> (hva, prot)``
==========================  ====================================================

The comm-page contract is the performance contract: ``getstate`` of cached state makes no system call;
``setstate`` makes none and is committed by the next ``run``; after an exit the state an assist needs is already
at hand. Errors are :class:`OSError` with NVMM's errno (``EINVAL``, ``ENOENT``, ``EEXIST``, ``EFAULT``,
``ENODEV`` ...). Exits carry no bytes: the assists call the callbacks with a ``memoryview`` of the data
(``io(port, is_in, data)``, ``mem(gpa, is_write, data)``; for an IN or a read the callback fills ``data``).

Extensions beyond libnvmm, marked as such: ``Machine.gpa_view(gpa, size)`` (a bounds-checked view of guest RAM
for device models), ``Capability.limits`` (named things a provider cannot do, so a test can say why it does not
run a case), ``Vcpu.stats`` (counters a benchmark reads), ``Vcpu.tsc_frequency()`` (the rate of the guest's
TSC, for the ops layer's paravirtual clock), ``Machine.kernel_pvclock()`` (the hypervisor's own paravirtual
clock, where it has one) and ``Machine.post_io(port, size, cb)`` (posted port writes: the
provider may buffer a range's OUTs instead of exiting, as KVM's coalesced PIO does, and hands them to ``cb`` in
order before the next exit of any vCPU is returned), ``Machine.doorbell(addr, size, pio, datamatch, fd)`` /
``remove_doorbell`` (a register whose writes signal an eventfd instead of exiting, KVM's ioeventfd),
``Machine.answer_io`` / ``answer_mmio`` (published register values the provider answers reads with; these
Machine extensions are in :mod:`ops.nvmm.api_ext`) and
``Vcpu.clear_stop()`` (withdraws a stop not yet delivered), ``Vcpu.queued_event()`` (the event injected for an
entry that has not happened yet, for a checkpoint), ``Machine.wake_timer(period_ns)`` (a timer the provider's run
loop starts when a vCPU leaves a HLT it slept in the loop), and guest debugging (``Vcpu.set_guest_debug``, the
:data:`NVMM_VCPU_EXIT_DEBUG` exit with ``Vcpu.debug_exit``, ``Capability.features`` ``debug-*``).

Not supported: ``nvmm_ctl``/``nvmm_root_init`` (administration), ``nvmm_vcpu_dump``.
"""

import bisect
import ctypes
import errno
from typing import NamedTuple

from . import constants as C
from .api_ext import MachineExtensions
from .capability import (FEATURE_ANSWERED_IO, FEATURE_ANSWERED_MMIO, FEATURE_DEBUG_BP, FEATURE_DEBUG_HW,  # noqa: F401
                         FEATURE_DEBUG_STEP, FEATURE_DEBUG_WATCH, FEATURE_DOORBELL, FEATURE_KERNEL_PVCLOCK,
                         FEATURE_POSTED_IO, LIMIT_CPUID_EXIT, LIMIT_CPUID_LATE, LIMIT_CPUID_MASK_1_7,
                         LIMIT_GUEST_DEBUG, LIMIT_IRQ_WINDOW_LATE, LIMIT_NMI_WINDOW, LIMIT_PAGING32,
                         LIMIT_SOFT_INT, LIMIT_TPR_EXIT,
                         CapMd, Capability)
from .records import (DEBUG_BP, DEBUG_HW, DEBUG_STEP, NVMM_VCPU_EXIT_DEBUG,  # noqa: F401  (re-exported)
                      AssistCallbacks, ConfCpuid, ConfTpr, ExitDebug, IoCallback, MemCallback, nvmm_error)
from .state import INTR_EVT_PENDING, STATE_SIZE, Event, Exit, State
from .x86 import mmu


class Provider:
    """One hypervisor behind the NVMM primitives (``nvmm_init`` has selected and opened it)."""

    name = "?"

    def capability(self) -> Capability:
        raise NotImplementedError

    def machine_create(self) -> "Machine":
        raise NotImplementedError


class _Area(NamedTuple):
    start: int
    size: int
    hva: int
    prot: int


class Machine(MachineExtensions):
    """``struct nvmm_machine``: guest memory and vCPUs. Subclasses implement the ``_``-prefixed hooks."""

    def __init__(self, provider):
        self.provider = provider
        self._hva = {}          # hva start -> (size, memoryview)
        self._gpa = []          # sorted _Area list, non-overlapping
        self._gpa_starts = []
        self.vcpus = {}
        self.destroyed = False

    # -- memory ------------------------------------------------------------------------------------------------
    def hva_map(self, hva, size):
        """Registers ``[hva, hva+size)`` (page aligned, host memory the caller owns) as guest-mappable."""
        _check_aligned(hva, size)
        for start, (sz, _) in self._hva.items():
            if hva < start + sz and start < hva + size:
                raise nvmm_error(errno.EEXIST, f"hva range {hva:#x}+{size:#x} overlaps an hva-mapped range")
        self._hva_map(hva, size)
        self._hva[hva] = (size, memoryview((ctypes.c_char * size).from_address(hva)).cast("B"))

    def hva_unmap(self, hva, size):
        if self._hva.get(hva, (None,))[0] != size:
            raise nvmm_error(errno.ENOENT, f"hva range {hva:#x}+{size:#x} is not mapped")
        if any(a.hva >= hva and a.hva < hva + size for a in self._gpa):
            raise nvmm_error(errno.EBUSY, f"hva range {hva:#x} is still gpa-mapped")
        self._hva_unmap(hva, size)
        del self._hva[hva]

    def gpa_map(self, hva, gpa, size, prot):
        """Maps ``[gpa, gpa+size)`` onto hva-mapped host memory; ``prot`` is ``PROT_*``/``NVMM_PROT_*``."""
        _check_aligned(hva, size)
        _check_aligned(gpa, size)
        if prot & ~C.NVMM_PROT_ALL or not prot & C.NVMM_PROT_READ:
            raise nvmm_error(errno.EINVAL, f"bad protection {prot:#x}")
        if self._hva_view(hva, size) is None:
            raise nvmm_error(errno.EINVAL, f"hva {hva:#x}+{size:#x} is not inside an hva-mapped range")
        i = bisect.bisect_left(self._gpa_starts, gpa)
        for a in self._gpa[max(i - 1, 0):i + 1]:
            if gpa < a.start + a.size and a.start < gpa + size:
                raise nvmm_error(errno.EINVAL, f"gpa {gpa:#x}+{size:#x} overlaps {a.start:#x}+{a.size:#x}")
        self._gpa_map(hva, gpa, size, prot)
        self._gpa.insert(i, _Area(gpa, size, hva, prot))
        self._gpa_starts.insert(i, gpa)

    def gpa_unmap(self, hva, gpa, size):
        for i, a in enumerate(self._gpa):
            if a.start == gpa and a.size == size and a.hva == hva:
                self._gpa_unmap(a)
                del self._gpa[i], self._gpa_starts[i]
                return
        raise nvmm_error(errno.EINVAL, f"gpa {gpa:#x}+{size:#x} does not match an earlier gpa_map")

    def _area(self, gpa):
        i = bisect.bisect_right(self._gpa_starts, gpa) - 1
        if i >= 0:
            a = self._gpa[i]
            if gpa < a.start + a.size:
                return a
        return None

    def gpa_to_hva(self, gpa):
        """``(hva, prot)`` of guest-physical ``gpa``; ``ENOENT`` when it is not RAM (MMIO)."""
        a = self._area(gpa)
        if a is None:
            raise nvmm_error(errno.ENOENT, f"gpa {gpa:#x} is not mapped")
        return a.hva + (gpa - a.start), a.prot

    def gpa_view(self, gpa, size):
        """A ``memoryview`` of ``size`` bytes of guest RAM at ``gpa`` inside one mapping (vmmshim's extension).

        Raises ``EFAULT`` when any byte is outside guest RAM, so a guest-supplied address can never reach host
        memory outside the guest's."""
        a = self._area(gpa)
        if a is None or size < 0 or gpa + size > a.start + a.size:
            raise nvmm_error(errno.EFAULT, f"gpa {gpa:#x}+{size:#x} is not inside guest RAM")
        hva = a.hva + (gpa - a.start)
        for start, (sz, view) in self._hva.items():
            if start <= hva < start + sz:
                return view[hva - start:hva - start + size]
        raise nvmm_error(errno.EFAULT, f"gpa {gpa:#x}: its hva range vanished")

    def _hva_view(self, hva, size):
        for start, (sz, view) in self._hva.items():
            if start <= hva and hva + size <= start + sz:
                return view[hva - start:hva - start + size]
        return None

    def read_phys(self, gpa, size):
        """Reads guest RAM across mappings page by page (``EFAULT`` outside RAM)."""
        out = bytearray()
        while size:
            a = self._area(gpa)
            if a is None:
                raise nvmm_error(errno.EFAULT, f"gpa {gpa:#x} is not RAM")
            n = min(size, a.start + a.size - gpa)
            out += self.gpa_view(gpa, n)
            gpa, size = gpa + n, size - n
        return bytes(out)

    # -- vCPUs and lifetime ------------------------------------------------------------------------------------
    def vcpu_create(self, cpuid) -> "Vcpu":
        if self.destroyed:
            raise nvmm_error(errno.ENOENT, "machine destroyed")
        if cpuid in self.vcpus:
            raise nvmm_error(errno.EEXIST, f"vCPU {cpuid} already exists")
        cap = self.provider.capability()
        if not 0 <= cpuid < cap.max_vcpus:
            raise nvmm_error(errno.EINVAL, f"vCPU id {cpuid} outside 0..{cap.max_vcpus - 1}")
        vcpu = self._vcpu_create(cpuid)
        self.vcpus[cpuid] = vcpu
        return vcpu

    def configure(self, op, conf):
        """``nvmm_machine_configure``: x86 defines no machine-level op in version 2."""
        raise nvmm_error(errno.EINVAL, f"machine configuration op {op} is not defined")

    def destroy(self):
        if self.destroyed:
            return
        for vcpu in list(self.vcpus.values()):
            vcpu.destroy()
        for a in list(self._gpa):
            self.gpa_unmap(a.hva, a.start, a.size)
        self._destroy()
        self._hva.clear()
        self.destroyed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.destroy()

    # -- provider hooks ----------------------------------------------------------------------------------------
    def _hva_map(self, hva, size):
        pass

    def _hva_unmap(self, hva, size):
        pass

    def _gpa_map(self, hva, gpa, size, prot):
        raise NotImplementedError

    def _gpa_unmap(self, area):
        raise NotImplementedError

    def _vcpu_create(self, cpuid):
        raise NotImplementedError

    def _destroy(self):
        pass


class Vcpu:
    """``struct nvmm_vcpu``: ``state``, ``event`` and ``exit`` plus the calls on them."""

    def __init__(self, machine, cpuid, state_buf=None, event_buf=None, exit_obj=None):
        self.machine = machine
        self.cpuid = cpuid
        self.state = State(state_buf)
        self.event = Event(event_buf)
        self.exit = exit_obj if exit_obj is not None else Exit()
        self.cbs = AssistCallbacks()
        self.destroyed = False
        self.debug_exit = None            # ExitDebug of the last NVMM_VCPU_EXIT_DEBUG (vmmshim's extension)

    # -- libnvmm calls a provider implements -------------------------------------------------------------------
    def getstate(self, flags):
        raise NotImplementedError

    def setstate(self, flags):
        raise NotImplementedError

    def inject(self):
        raise NotImplementedError

    def queued_event(self):
        """vmmshim's extension, for a checkpoint: the event injected for the next entry and not delivered yet (a
        run stopped before its entry), ``(NVMM_VCPU_EVENT_*, vector, error or None)``, or None; ENOTSUP where the
        provider cannot name it (NVMM keeps it in the VMCB). Call after ``getstate`` of ``NVMM_X64_STATE_INTR``."""
        if self.state.intr & INTR_EVT_PENDING:
            raise nvmm_error(errno.ENOTSUP, "an event is queued for the next entry and this provider cannot say which")
        return None

    def complete_exit(self):
        """vmmshim's extension, called after the exit was handled (assists done, state set) and before the
        interrupt state is read to decide an injection: a provider whose kernel finishes the exiting instruction
        only at the next run (KVM) finishes it now, so the events that completion queues (a #GP) are seen.
        NVMM's kernel needs nothing here. Returns False when nothing was left to finish (the exit state reads as
        before), anything else (None here) when it may have changed."""

    def run(self) -> Exit:
        raise NotImplementedError

    def stop(self):
        raise NotImplementedError

    def clear_stop(self):
        """vmmshim's extension: withdraws a ``stop`` not yet delivered. For a caller about to look at everything
        a stop could have been asked for (the ops layer, before it decides what to inject): a kick that found the
        vCPU outside the guest then costs no STOPPED exit. A stop after the call is kept. Where the provider
        cannot withdraw one (the default) the next run returns STOPPED at once, which is correct, one exit more."""

    def answered_io(self):
        """vmmshim's extension: how many port reads this vCPU's runs answered without an exit
        (``Machine.answer_io``)."""
        return 0

    def answered_mmio(self):
        """vmmshim's extension: how many MMIO reads this vCPU's runs answered without an exit
        (``Machine.answer_mmio``)."""
        return 0

    def assist_io(self):
        raise NotImplementedError

    def set_guest_debug(self, step=False, sw_bp=False, hw=()):
        """vmmshim's extension (KVM's ``KVM_SET_GUEST_DEBUG``): ``step`` ends each run after one instruction,
        ``sw_bp`` makes a guest int3 an exit instead of a #BP, ``hw`` is up to four ``(addr, type, len)``
        debug-register breakpoints (type 0 execute, 1 write, 3 read/write; len 1, 2, 4 or 8); each gives a
        :data:`NVMM_VCPU_EXIT_DEBUG` exit. Only what ``Capability.features`` lists (``debug-*``); else ENOTSUP."""
        if step or sw_bp or hw:
            raise nvmm_error(errno.ENOTSUP, "this provider has no guest debugging")

    def inject_bp(self):
        """vmmshim's extension: give the guest the #BP of the int3 a ``sw_bp`` exit stopped at (the guest's own
        int3, not a debugger's): RIP moves past it and the guest's handler runs at the next entry."""
        raise nvmm_error(errno.ENOTSUP, "this provider cannot re-inject #BP")

    def tsc_frequency(self):
        """vmmshim's extension: the guest TSC's rate in Hz as the hypervisor knows it, or None when unknown."""
        return None

    def complete_msr(self, npc, value=None):
        """vmmshim's extension: the RDMSR/WRMSR that exited is done: RIP moves to ``npc`` and, for a RDMSR,
        EDX:EAX take ``value`` (NVMM's way, through the GPR state; a provider may do it with less)."""
        self.getstate(C.NVMM_X64_STATE_GPRS)
        gprs = self.state.gprs
        if value is not None:
            gprs[C.NVMM_X64_GPR_RAX] = value & 0xFFFFFFFF
            gprs[C.NVMM_X64_GPR_RDX] = value >> 32
        gprs[C.NVMM_X64_GPR_RIP] = npc
        self.setstate(C.NVMM_X64_STATE_GPRS)

    def guest_tsc(self):
        """vmmshim's extension: the guest's TSC now (``msrs[NVMM_X64_MSR_TSC]`` of the MSR state, read afresh)."""
        self.getstate(C.NVMM_X64_STATE_MSRS)
        return self.state.msrs[C.NVMM_X64_MSR_TSC]

    def assist_mem(self):
        raise NotImplementedError

    def configure(self, op, conf):
        if op == C.NVMM_VCPU_CONF_CALLBACKS:
            if not isinstance(conf, AssistCallbacks):
                raise nvmm_error(errno.EINVAL, "NVMM_VCPU_CONF_CALLBACKS takes an AssistCallbacks")
            self.cbs = conf
            self._callbacks_changed()
            return
        self._configure(op, conf)

    def _callbacks_changed(self):
        pass

    def _configure(self, op, conf):
        raise nvmm_error(errno.EINVAL, f"vCPU configuration op {op} is not supported")

    def destroy(self):
        if not self.destroyed:
            self._destroy()
            self.destroyed = True
            self.machine.vcpus.pop(self.cpuid, None)

    def _destroy(self):
        pass

    # -- shared x86 helpers ------------------------------------------------------------------------------------
    def paging_regs(self):
        """``(cr0, cr3, cr4, efer)`` for a page walk (a provider may answer without a full ``getstate``)."""
        self.getstate(C.NVMM_X64_STATE_CRS | C.NVMM_X64_STATE_MSRS)
        crs, msrs = self.state.crs, self.state.msrs
        return crs[C.NVMM_X64_CR_CR0], crs[C.NVMM_X64_CR_CR3], crs[C.NVMM_X64_CR_CR4], \
            msrs[C.NVMM_X64_MSR_EFER]

    def gva_to_gpa(self, gva):
        """``nvmm_gva_to_gpa``: ``(gpa, prot)`` by a software walk of the guest's page tables; ``EFAULT``
        when the walk fails."""
        cr0, cr3, cr4, efer = self.paging_regs()
        return mmu.gva_to_gpa(self.machine.read_phys, cr0, cr3, cr4, efer, gva)


def _check_aligned(addr, size):
    if size <= 0 or addr % mmu.PAGE_SIZE or size % mmu.PAGE_SIZE:
        raise nvmm_error(errno.EINVAL, f"{addr:#x}+{size:#x} is not a non-empty page-aligned range")
