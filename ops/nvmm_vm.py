"""The kernel-side state of ``vmm_ops_nvmm`` (bhyve's ``struct vm``/``struct vcpu`` in vmm.ko): the NVMM machine,
the interrupt controllers bhyve keeps in its kernel (vlapics on an APIC bus, the vioapic, the vatpic pair), and
per vCPU the pending-interrupt flag, the HLT sleep, the SIPI hand-off and the exit counters.

Not supported: rendezvous, snapshot state.
"""

import collections
import os
import threading
import time

from bhyve_devices.apicbus import ApicBus
from bhyve_devices.vatpic import Vatpic
from bhyve_devices.vioapic import Vioapic

from . import nvmm_regs as regs
from .vmm_ops import InOut, VmCapType, VmExit, VmExitCode

INOUT_CODE = _INOUT = int(VmExitCode.VM_EXITCODE_INOUT)


class VcpuCtx:
    """The ops layer's per-vCPU state (bhyve's ``struct vcpu`` in the kernel)."""

    def __init__(self, vmi, vcpuid, nvcpu):
        self.vmi, self.id, self.nv = vmi, vcpuid, nvcpu
        self.vlapic = None
        self.vmexit = VmExit(decoder=self)
        self.runner = None           # (inout_assist, the vmrun closure VmmOpsNvmm.runner made)
        self.pending = True          # maybe an interrupt or NMI to inject: checked before the next entry
        self.nmi = False
        self.event_queued = False     # an exception or NMI injected for the next entry: NVMM's one event slot
        self.spinup = None           # (target, rip) after this vCPU sent a SIPI
        self.cond = threading.Condition()
        self.caps = {VmCapType.VM_CAP_HALT_EXIT: 0, VmCapType.VM_CAP_PAUSE_EXIT: 0}
        self.extra = {}
        self.exits = [0] * 0x10000      # NVMM exits handled here, by reason (low 16 bits)
        self.injected = 0
        self.inout_assisted = 0       # port exits the runner assisted itself (VmmOpsNvmm.runner)
        self.kicks = 0
        self.itrace_n = 0
        # VMMSHIM_TRACE_INTR=1: the last injection decisions, for debug dumps (off the per-exit path otherwise)
        self.itrace = collections.deque(maxlen=48) if os.environ.get("VMMSHIM_TRACE_INTR") else None
        self.halted_if_clear = False
        self.started = False          # has run: an AP waiting for its SIPI does not keep the VM from halting
        self.sleeping = False         # waiting in HLT (under ``cond``): a kick needs no nvmm_vcpu_stop
        self.thread = None            # the thread that runs it (its runner sets it)
        self.pvclock = None           # the kvmclock MSRs (ops/pvclock.py) when the guest is offered them
        self.pv_eoi = None            # the PV EOI MSR and word (ops/kvm_para.py)

    def current_rip(self):
        return regs.getreg(self.nv, regs.R.VM_REG_GUEST_RIP, self.extra)

    def decode_u(self, exitcode):
        """The payload of an exit that left it undecoded (INOUT)."""
        if exitcode == _INOUT:
            io = self.nv.exit.io
            self.vmexit.inst_length = io.npc - self.vmexit.rip
            return InOut(io.operand_size, io.in_, io.str_, io.rep, io.port,
                         regs.getreg(self.nv, regs.R.VM_REG_GUEST_RAX, self.extra))
        return None

    def kick(self):
        """Something to deliver: wake the vCPU if it sleeps in HLT, knock it out of the guest if it runs. On the
        vCPU's own thread (an exit it handles, device work in its HLT) it is out of the guest and looks at
        ``pending`` before it enters: a stop would only cost a STOPPED exit right after the entry."""
        self.pending = True
        self.kicks += 1
        if self.thread == threading.get_ident():
            return
        with self.cond:
            self.cond.notify_all()
            if self.sleeping:       # in HLT's wait, not in the guest: it re-checks ``pending`` before entering,
                return              # so a stop would only cost a STOPPED exit on the next run
        self.nv.stop()


class NvmmVmi:
    """The VM cookie ``vm_init`` returns: the NVMM machine and the kernel-side devices (vlapics, vioapic)."""

    def __init__(self, provider, vm):
        self.vm = vm
        self.machine = provider.machine_create()
        self.vcpus = {}
        self.hva_mapped = set()
        self.suspended = None
        self.idle_hook = None           # called by a vCPU about to sleep in HLT (vm_idle_hook)
        self.timers = vm.timers
        self.x2apic = bool(getattr(vm, "x2apic", False))
        self.kvm_pv = bool(getattr(vm, "kvm_pv", False))     # KVM's paravirtual interface (ops/kvm_para.py)
        self.pv_eoi = bool(getattr(vm, "pv_eoi", False))    # ... with PV EOI (see kvm_para.py)
        self.clock_epoch_ns = time.monotonic_ns()       # the paravirtual clock's zero of system time
        # KVM's paravirtual clock: the hypervisor's own where it has one, else ops/pvclock.py per vCPU
        self.kernel_clock = self.kvm_pv and self.machine.kernel_pvclock()
        self.apicbus = ApicBus(on_init=self._on_init, on_sipi=self._on_sipi, on_nmi=self._on_nmi,
                               kick=self._kick)
        self.vioapic = Vioapic(self.apicbus.deliver_intr)
        self.vatpic = Vatpic(intr_line=self._atpic_intr)
        self.tls = threading.local()
        self.irq_events = {}             # ISA IRQ -> assertions and pulses (a debugging counter)

    def _atpic_intr(self, level):
        """The 8259 pair's INTR wire goes to the BSP's LINT0 (ExtINT), as on a PC."""
        bsp = self.vcpus.get(0)
        if bsp is not None and bsp.vlapic is not None:
            bsp.vlapic.set_lint0_level(level)
            if level:
                bsp.kick()

    def _kick(self, vcpuid):
        ctx = self.vcpus.get(vcpuid)
        if ctx is not None:
            ctx.kick()

    def _on_nmi(self, vcpuid):
        ctx = self.vcpus.get(vcpuid)
        if ctx is not None:
            ctx.nmi = True
            ctx.kick()

    def _on_init(self, vcpuid):
        pass    # the target waits for SIPI; its vlapic was reset by the bus

    def _on_sipi(self, vcpuid, vector):
        sender = getattr(self.tls, "ctx", None)
        if sender is not None:          # returned as SPINUP_AP before the sender re-enters the guest
            sender.spinup = (vcpuid, vector << 12)
            sender.pending = True
