"""The calls a VM makes of the ops layer (xhyve's ``vmm_api.c``, bhyve's ``vmmapi.h``): :class:`VmmApi` declares
every one that ``vmmshim/`` makes, and :class:`VmmApiCalls` implements those beyond the ``vmm_ops`` table by
handing them to the VM-side engine (``ops/vmm.py``, bhyve's ``vmm.c``), as ``vmm_api.c`` hands ``xh_vm_*`` to
``vm_*``.

A table (``ops/nvmm_ops.py``) is a :class:`VmmApiCalls` that also implements the sixteen members of
:class:`ops.vmm_ops.VmmOps`; ``tests/unit/test_vmm_api.py`` checks that every ``ops.`` call in ``vmmshim/`` is
declared here and that every table implements all of :class:`VmmApi`. The VM is described to ``vm_init`` by a
:class:`VmSpec`, never read back from the VM object.

Conventions are the table's: the ``vmi`` cookie ``vm_init`` returned comes first, a vCPU is named by its id,
errors are ``OSError`` with bhyve's errno. Fast paths (posted writes, answered reads, doorbells) are asked for only
where :meth:`VmmApi.vm_features` lists them (the provider's ``Capability.features``, ``ops/nvmm/api.py``).

Not here: ``vm_get_stats`` in bhyve's form (``vcpu_stats`` returns a dict), snapshot calls, ``vm_rtc_*`` (the RTC
is a device model above this layer), ``vm_set_topology``.
"""

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol

from .vmm_ops import VmExit, VmmOps

# The 8259 pair and the ELCR, at the PC's ports (bhyve's atpic.c IO_ICU1, IO_ICU2, IO_ELCR1).
ATPIC_MASTER, ATPIC_SLAVE, ATPIC_ELCR = 0x20, 0xA0, 0x4D0


@dataclass
class VmSpec:
    """What ``vm_init`` needs to know of the VM: its timer service (``bhyve_devices.base.TimerService``), the
    port and MMIO bus callbacks the assists complete exits with (``io(port, is_in, data)``,
    ``mem(gpa, is_write, data)``: a read fills ``data``), and the CPU features offered."""
    timers: Any
    io: Callable[[int, bool, memoryview], None]
    mem: Callable[[int, bool, memoryview], None]
    x2apic: bool = False            # bhyve's X2APIC_ENABLED: CPUID offers x2APIC and every vlapic starts in it
    kvm_pv: bool = False            # KVM's paravirtual interface (ops/kvm_para.py, ops/pvclock.py)
    pv_eoi: bool = False            # ... with PV EOI
    tsc_deadline: bool = False      # CPUID offers the LAPIC timer's TSC-deadline mode (where the provider tells
                                    # the guest's TSC rate, ``Vcpu.tsc_frequency()``)
    extra: dict = field(default_factory=dict)


@dataclass
class Bpt:
    """``VM_EXITCODE_BPT``'s payload (bhyve's ``vm_exit.u.bpt``): RIP is at the int3."""
    inst_length: int = 1


@dataclass
class DebugTrap:
    """``VM_EXITCODE_DB``'s payload: DR6 (which debug register matched) and the linear PC."""
    dr6: int = 0
    pc: int = 0


class VmmApi(VmmOps, Protocol):
    """Every call ``vmmshim/`` makes of the ops layer: the table's members plus these."""

    # -- running
    def vcpu_runner(self, vmi: Any, vcpu: int) -> Callable[[Optional[int]], VmExit]:
        """``vmrun`` for one vCPU as a closure with its look-ups done once (the VM's vCPU loop calls it)."""

    def vcpu_stats(self, vmi: Any, vcpu: int) -> dict: ...

    def vcpu_failure(self, vmi: Any, vcpu: int, exit_reason: int) -> str:
        """Why the CPU could not run ``vcpu`` (a ``VM_EXITCODE_VMX`` exit), as a sentence naming the state, the
        instruction and the provider limit it ran into (``ops/failure.py``)."""

    def vm_activate_cpu(self, vmi: Any, vcpu: int) -> None: ...

    def vm_suspend(self, vmi: Any, how: int) -> None: ...

    def vm_debug_state(self, vmi: Any) -> list: ...

    # -- a debugger (bhyve's gdb.c calls; the stepping and int3 exits are vmsetcap's VM_CAP_MTRAP_EXIT and
    #    VM_CAP_BPT_EXIT, interrupts kept out while stepping VM_CAP_MASK_HWINTR)
    def vm_suspend_cpu(self, vmi: Any, vcpu: int) -> None:
        """bhyve's ``vm_suspend_cpu``: ``vcpu`` (-1: all) returns ``VM_EXITCODE_DEBUG`` before its next entry."""

    def vm_resume_cpu(self, vmi: Any, vcpu: int) -> None: ...

    # -- checkpoints (bhyve's vm_snapshot_req; ops/vmm_snapshot.py)
    def vm_snapshot(self, vmi: Any) -> dict:
        """The kernel side of a checkpoint as JSON values, with every started vCPU held (``vm_suspend_cpu``)."""

    def vm_restore(self, vmi: Any, state: dict, shift_ns: int) -> None:
        """Puts :meth:`vm_snapshot`'s state into a VM of the same configuration that has not run."""

    def vm_gla2gpa(self, vmi: Any, vcpu: int, gla: int) -> int:
        """bhyve's ``vm_gla2gpa_nofault``: a linear address through ``vcpu``'s page tables (``EFAULT``)."""

    def vm_debug_hw(self, vmi: Any, vcpu: int, slots: tuple) -> None:
        """Debug-register breakpoints ``(addr, type, len)`` (type 0 exec, 1 write, 3 access; at most four),
        each a ``VM_EXITCODE_DB``; ``ENOENT`` where the provider has none."""

    # -- memory
    def vm_mem_alloc(self, vmi: Any, hostmem: Any, offset: int, gpa: int, size: int) -> None: ...

    def vm_gpa_view(self, vmi: Any, gpa: int, size: int) -> memoryview: ...

    # -- events and interrupt sources
    def vm_inject_exception(self, vmi: Any, vcpu: int, vector: int, errcode: int = 0) -> None: ...

    def vm_inject_nmi(self, vmi: Any, vcpu: int) -> None: ...

    def vm_lapic_msi(self, vmi: Any, addr: int, data: int) -> None: ...

    def vm_isa_set_irq(self, vmi: Any, irq: int, level: bool) -> None: ...

    def vm_isa_pulse_irq(self, vmi: Any, irq: int) -> bool:
        """An edge on ISA IRQ ``irq`` (8259 and IOAPIC). False when it merged with an edge still pending where
        the guest takes it (the vlapics' IRR through an unmasked IOAPIC pin, else the 8259's IRR), so the
        guest will see one interrupt for both; True otherwise (a lost or masked edge is not merged)."""

    def vm_atpic_set_irq(self, vmi: Any, irq: int, level: bool) -> None:
        """An 8259 input alone (bhyve's ``vm_isa_assert_irq`` with no IOAPIC pin: a PCI INTx through a PIRQ)."""

    def vm_isa_set_irq_trigger(self, vmi: Any, irq: int, level_triggered: bool) -> None:
        """bhyve's ``vm_isa_set_irq_trigger``: the ELCR bit of an ISA IRQ (a PCI INTx routed to it)."""

    def vm_atpic_ranges(self, vmi: Any) -> list:
        """The 8259 pair's and the ELCR's port ranges: ``(port, size, device, name)`` for the VM's port bus."""

    def vm_ioapic_assert_irq(self, vmi: Any, pin: int) -> None: ...

    def vm_ioapic_deassert_irq(self, vmi: Any, pin: int) -> None: ...

    def vm_ioapic_pulse_irq(self, vmi: Any, pin: int) -> None: ...

    # -- fast paths (vmmshim's extensions; only where vm_features lists them)
    def vm_features(self, vmi: Any) -> frozenset: ...

    def vm_post_io(self, vmi: Any, port: int, size: int, cb: Callable[[int, bytes], None]) -> bool: ...

    def vm_drain_posted(self, vmi: Any) -> None: ...

    def vm_answer_io(self, vmi: Any, port: int, value: Optional[int]) -> bool: ...

    def vm_answer_mmio(self, vmi: Any, gpa: int, value: Optional[int]) -> bool: ...

    def vm_doorbell(self, vmi: Any, addr: int, size: int, pio: bool, datamatch: Optional[int], fd: int) -> bool: ...

    def vm_remove_doorbell(self, vmi: Any, addr: int, size: int, pio: bool, datamatch: Optional[int],
                           fd: int) -> None: ...

    def vm_idle_hook(self, vmi: Any, fn: Optional[Callable[[], None]], fd: Optional[int] = None) -> None:
        """``fn()`` runs on a vCPU's thread before it sleeps in HLT (None: no hook). ``fd``: readable while ``fn``
        has work; a vCPU whose provider sleeps in the run loop (``Machine.wake_timer``) sleeps there without
        calling ``fn`` unless ``fd`` is readable."""

    def vm_wake_hook(self, vmi: Any, fn: Optional[Callable[[], None]]) -> None:
        """``fn()`` runs on a vCPU's thread whenever its sleep in HLT ends (None: no hook); a sleep in the
        provider's run loop starts :meth:`vm_wake_timer`'s timer instead."""

    def vm_all_asleep(self, vmi: Any) -> bool:
        """Whether every started vCPU sleeps in HLT: none runs guest code until a wake (``vm_wake_hook``)."""

    def vm_wake_timer(self, vmi: Any, period_ns: int) -> Any:
        """The provider's ``Machine.wake_timer``: a timer (``fd``, ``arm()``, ``off()``) started whenever a vCPU
        leaves a HLT slept in the run loop; None where vCPUs sleep in Python."""


#: The calls of :class:`VmmApi` beyond the table (for the completeness checks).
VMM_API_CALLS = tuple(n for n in VmmApi.__dict__ if not n.startswith("_"))


class VmmApiCalls:
    """The :class:`VmmApi` calls beyond the table, each handed to the engine's VM (``vmi``, ``ops/vmm.py``)."""

    def vcpu_stats(self, vmi, vcpu):
        return vmi.vcpu_stats(vcpu)

    def vcpu_failure(self, vmi, vcpu, exit_reason):
        from .failure import describe_failure
        return describe_failure(lambda r: self.vmgetreg(vmi, vcpu, r), lambda r: self.vmgetdesc(vmi, vcpu, r),
                                lambda gpa, n: bytes(vmi.machine.gpa_view(gpa, n)), self.provider.name,
                                self.provider.capability().limits, vcpu, exit_reason)

    def vm_activate_cpu(self, vmi, vcpu):
        vmi.activate_cpu(vcpu)

    def vm_suspend(self, vmi, how):
        vmi.suspend(how)

    def vm_debug_state(self, vmi):
        return vmi.debug_state()

    def vm_suspend_cpu(self, vmi, vcpu):
        vmi.debug_hold(vcpu, True)

    def vm_resume_cpu(self, vmi, vcpu):
        vmi.debug_hold(vcpu, False)

    def vm_snapshot(self, vmi):
        from .vmm_snapshot import snapshot_vm
        return snapshot_vm(vmi)

    def vm_restore(self, vmi, state, shift_ns):
        from .vmm_snapshot import restore_vm
        restore_vm(vmi, state, shift_ns)

    def vm_gla2gpa(self, vmi, vcpu, gla):
        return vmi.gla2gpa(vcpu, gla)

    def vm_mem_alloc(self, vmi, hostmem, offset, gpa, size):
        vmi.mem_alloc(hostmem, offset, gpa, size)

    def vm_gpa_view(self, vmi, gpa, size):
        return vmi.machine.gpa_view(gpa, size)

    def vm_inject_exception(self, vmi, vcpu, vector, errcode=0):
        vmi.inject_exception(vcpu, vector, errcode)

    def vm_inject_nmi(self, vmi, vcpu):
        vmi.inject_nmi(vcpu)

    def vm_lapic_msi(self, vmi, addr, data):
        vmi.lapic_msi(addr, data)

    def vm_isa_set_irq(self, vmi, irq, level):
        vmi.isa_set_irq(irq, level)

    def vm_isa_pulse_irq(self, vmi, irq):
        return vmi.isa_pulse_irq(irq)

    def vm_atpic_set_irq(self, vmi, irq, level):
        vmi.vatpic.set_irq_level(irq, level)

    def vm_isa_set_irq_trigger(self, vmi, irq, level_triggered):
        vmi.vatpic.set_irq_trigger(irq, level_triggered)

    def vm_atpic_ranges(self, vmi):
        a = vmi.vatpic
        return [(ATPIC_MASTER, 2, a.master, "atpic-master"), (ATPIC_SLAVE, 2, a.slave, "atpic-slave"),
                (ATPIC_ELCR, 2, a.elcr, "elcr")]

    def vm_ioapic_assert_irq(self, vmi, pin):
        vmi.vioapic.set_pin_level(pin, True)

    def vm_ioapic_deassert_irq(self, vmi, pin):
        vmi.vioapic.set_pin_level(pin, False)

    def vm_ioapic_pulse_irq(self, vmi, pin):
        vmi.vioapic.pulse_pin(pin)

    def vm_features(self, vmi):
        return vmi.features

    def vm_post_io(self, vmi, port, size, cb):
        return vmi.machine.post_io(port, size, cb)

    def vm_drain_posted(self, vmi):
        vmi.machine.drain_posted()

    def vm_answer_io(self, vmi, port, value):
        return vmi.machine.answer_io(port, value)

    def vm_answer_mmio(self, vmi, gpa, value):
        return vmi.machine.answer_mmio(gpa, value)

    def vm_doorbell(self, vmi, addr, size, pio, datamatch, fd):
        return vmi.machine.doorbell(addr, size, pio, datamatch, fd)

    def vm_remove_doorbell(self, vmi, addr, size, pio, datamatch, fd):
        vmi.machine.remove_doorbell(addr, size, pio, datamatch, fd)

    def vm_idle_hook(self, vmi, fn, fd=None):
        vmi.idle_hook, vmi.idle_fd = fn, fd

    def vm_wake_hook(self, vmi, fn):
        vmi.wake_hook = fn

    def vm_all_asleep(self, vmi):
        return vmi.all_asleep()

    def vm_wake_timer(self, vmi, period_ns):
        return vmi.machine.wake_timer(period_ns)
