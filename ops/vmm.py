"""The VM-side engine of the ops layer (bhyve's ``vmm.c``): the VM and vCPU state a kernel module would keep, on an
NVMM machine.

- :class:`Vm` (bhyve's ``struct vm``): the machine, the interrupt controllers bhyve keeps in its kernel (vlapics on
  an APIC bus, the vioapic, the vatpic pair), suspension, the idle hook, and the ``vm_*`` calls
  (``ops/vmm_api.py`` hands them here): ISA and IOAPIC interrupt lines, MSI, NMIs and exceptions, memory.
- :class:`Vcpu` (``struct vcpu``): the pending-interrupt flag, the NMI, the SIPI hand-off, the HLT sleep and the
  kick that ends it (``ops/vmm_kick.py``), and the exit counters.
- Event injection before an entry (:meth:`Vm.before_entry`: NMI, the vlapic's or the 8259's interrupt, else the
  interrupt window, with NVMM's one event slot per entry: ``ops/vmm_lapic.py``), HLT (``ops/vmm_halt.py``),
  INIT/SIPI (as ``VM_EXITCODE_SPINUP_AP`` to the sender, one exit per AP a broadcast SIPI started), suspension
  (``VM_EXITCODE_SUSPENDED``), and the accesses the kernel devices take (the LAPIC and IOAPIC pages, the APIC,
  kvmclock and PV EOI MSRs). CR8 and the vlapic's TPR are kept one value (``ops/vmm_lapic.py``).
- A debugger's hold (bhyve's ``vm_suspend_cpu``/``vm_resume_cpu``): a held vCPU returns ``VM_EXITCODE_DEBUG``
  before its next entry (out of HLT's sleep too, but, as on hardware and in KVM's in-kernel HLT, the stop does not
  end the halt: once released it halts again, unless the debugger moved its RIP; a step of it ends at once, still
  halted); ``VM_CAP_MASK_HWINTR`` keeps interrupts out while it steps.

The table (``ops/nvmm_ops.py``) runs the vCPU and dispatches NVMM exits; it calls in here for all of the above.

Not supported: rendezvous, snapshot state, ``VM_EXITCODE_IPI`` (IPIs are delivered here, as with
``VM_CAP_IPI_EXIT`` off).
"""

import collections
import os
import threading
import time

from bhyve_devices.apicbus import ApicBus
from bhyve_devices.vatpic import Vatpic
from bhyve_devices.vioapic import VIOAPIC_BASE, VIOAPIC_SIZE, Vioapic
from bhyve_devices.vlapic import APIC_SIZE, DEFAULT_APIC_BASE
from bhyve_devices.vlapic_regs import PPR, TPR

from . import nvmm_regs as regs
from .edge_merge import EdgeJudge, thread_cpu_ns
from .vmm_halt import HaltMixin
from .vmm_kick import KickMixin
from . import vmm_lapic
from .nvmm import api
from .nvmm import constants as C
from .vmm_ops import Msr, SpinupAp, Suspended, VmCapType, VmExit, VmExitCode as E

tpr_from_guest, tpr_to_guest = vmm_lapic.tpr_from_guest, vmm_lapic.tpr_to_guest
interrupt_waiting, inject_interrupt = vmm_lapic.interrupt_waiting, vmm_lapic.inject_interrupt
request_window = vmm_lapic.request_window        # noqa: F401 (part of this module's API)
TPR_SLOTS = (TPR, PPR)             # the APIC page's registers CR8 shows through
APIC_SLOT = 0xFF0                  # a register's 16-byte slot in the APIC page
_RIP = regs.R.VM_REG_GUEST_RIP


def is_kernel_mmio(gpa):
    """Whether ``gpa`` is on a page the kernel devices take (the LAPIC or the IOAPIC)."""
    return DEFAULT_APIC_BASE <= gpa < DEFAULT_APIC_BASE + APIC_SIZE or VIOAPIC_BASE <= gpa < VIOAPIC_BASE + VIOAPIC_SIZE


class Vcpu(KickMixin):
    """The engine's per-vCPU state (bhyve's ``struct vcpu``)."""

    def __init__(self, vm, vcpuid, nvcpu):
        self.vm, self.id, self.nv = vm, vcpuid, nvcpu
        self.vlapic = None
        self.vmexit = VmExit()
        self.runner = None           # the vmrun closure the table made (VmmOpsNvmm.vcpu_runner)
        self.pending = True          # maybe an interrupt or NMI to inject: checked before the next entry
        self.nmi = False
        self.event_queued = False     # an exception or NMI injected for the next entry: NVMM's one event slot
        self.spinups = collections.deque()   # (target, rip) for each AP a SIPI of this vCPU started
        self.cr8 = 0                 # the TPR class the guest's CR8 and the vlapic last agreed on
        self.cond = threading.Condition()
        self.caps = {VmCapType.VM_CAP_HALT_EXIT: 0, VmCapType.VM_CAP_PAUSE_EXIT: 0,
                     VmCapType.VM_CAP_MASK_HWINTR: 0}
        self.debug_hold = False       # vm_suspend_cpu: VM_EXITCODE_DEBUG before the next entry
        self.hlt_held = None          # (RFLAGS, RIP) of a HLT only a debug hold ended: it halts again after the hold
        self.debug = {}               # the debug capabilities (VM_CAP_MTRAP_EXIT ...) the table set (nvmm_ops.py)
        self.extra = {}
        self.exits = [0] * 0x10000      # NVMM exits, by reason (low 16 bits)
        self.bus_mmio = 0             # MEMORY exits completed on the VM's MMIO bus (not the kernel devices')
        self.injected = 0
        self.kicks = 0
        self.took_over = 0          # kicks that accepted the run loop's injection themselves (post_kick_taken)
        self.kicks_merged = 0       # interrupt kicks that found ``pending`` set and stopped nothing (kick)
        self.kicks_spared = 0       # interrupt requests that needed no kick (post_behind, post_kick_taken's SPARED)
        self.itrace_n = 0
        # VMMSHIM_TRACE_INTR=1: the last injection decisions, for debug dumps (off the per-exit path otherwise)
        self.itrace = collections.deque(maxlen=48) if os.environ.get("VMMSHIM_TRACE_INTR") else None
        self.halted_if_clear = False
        self.started = False          # has run: an AP waiting for its SIPI does not keep the VM from halting
        self.sleeping = False         # waiting in HLT (under ``cond``): a kick needs no nvmm_vcpu_stop
        self.thread = None            # the thread that runs it (its runner sets it)
        self.tid = None               # ... and that thread's kernel id (its CPU time: ops/edge_merge.py)
        self.pvclock = None           # the kvmclock MSRs (ops/pvclock.py) when the guest is offered them
        self.pv_eoi = None            # the PV EOI MSR and word (ops/kvm_para.py)
        self.tsc_deadline = None      # IA32_TSC_DEADLINE kept by the KVM run loop (ops/nvmm/kvm/tscdeadline.py)
        self.intwin = None            # the interrupt the KVM run loop injects at the window (ops/nvmm/kvm/intwin.py)
        self.masked = False           # an interrupt waits for the guest to open its window (IF), until INT_READY
        self.halt_rflags = None       # RFLAGS of a HLT whose sleep goes to the provider's run loop (vmm_halt.py)
        self.halt_rflags_last = 0     # ... of the last one, for a sleep there that ended for Python

    def current_rip(self):
        return regs.getreg(self.nv, _RIP, self.extra)

    def loop_asleep(self):
        """Whether it sleeps in HLT in the provider's run loop (``ops/nvmm/kvm/fasthalt.c``; any thread)."""
        win = self.intwin
        return win is not None and win.sleeping

    def exit_to(self, code, payload, rip=None, inst_length=0):
        """This vCPU's ``vm_exit`` (one object, reused), filled for userland."""
        vmexit = self.vmexit
        vmexit.exitcode, vmexit.u, vmexit.inst_length = code, payload, inst_length
        vmexit.rip = rip if rip is not None else self.current_rip()
        return vmexit


class Vm(HaltMixin):
    """The VM cookie ``vm_init`` returns: the NVMM machine, the kernel devices and the VM's run state."""

    def __init__(self, provider, spec):
        self.spec = spec
        self.machine = provider.machine_create()
        cap = provider.capability()
        self.features = cap.features
        # NVMM's TPR_CHANGED exit where the provider offers it (as QEMU's NVMM accelerator asks): a CR8 the guest
        # lowered lets a held-back vector in at once (KVM exits on a lowered CR8 without being asked)
        self.tpr_exits = bool(cap.arch.vcpu_conf_support & C.NVMM_CAP_ARCH_VCPU_CONF_TPR)
        self.vcpus = {}
        self.hva_mapped = set()
        self.suspended = None
        self.idle_hook = None           # called by a vCPU about to sleep in HLT (vm_idle_hook)
        self.idle_fd = None             # readable while the idle hook has work (vm_idle_hook)
        self.wake_hook = None           # called by a vCPU whose HLT sleep ended (vm_wake_hook)
        self.timers = spec.timers
        self.x2apic, self.kvm_pv, self.pv_eoi = spec.x2apic, spec.kvm_pv, spec.pv_eoi
        self.tsc_deadline = spec.tsc_deadline
        self.clock_epoch_ns = time.monotonic_ns()       # the paravirtual clock's zero of system time
        # KVM's paravirtual clock: the hypervisor's own where it has one, else ops/pvclock.py per vCPU
        self.kernel_clock = self.kvm_pv and api.FEATURE_KERNEL_PVCLOCK in self.features and \
            self.machine.kernel_pvclock()
        self.apicbus = ApicBus(on_init=self._on_init, on_sipi=self._on_sipi, on_nmi=self.inject_nmi,
                               kick=self._kick)
        self.vioapic = Vioapic(self.apicbus.deliver_intr)
        self.vatpic = Vatpic(intr_line=self._atpic_intr)
        self.irq_events = {}             # ISA IRQ -> assertions and pulses (a debugging counter)
        # a merged ISA edge: declined by the guest or held up by the host
        self.edges = EdgeJudge(self._bsp_cpu_ns, self._bsp_masked)

    # -- memory -----------------------------------------------------------------------------------------------
    def mem_alloc(self, hostmem, offset, gpa, size, prot=C.NVMM_PROT_ALL):
        """Maps ``size`` bytes of ``hostmem`` (``addr``, ``size``) from ``offset`` at ``gpa`` (xhyve's
        ``vmm_mem_alloc``); the host range is registered with ``hva_map`` on first use."""
        if hostmem.addr not in self.hva_mapped:
            self.machine.hva_map(hostmem.addr, hostmem.size)
            self.hva_mapped.add(hostmem.addr)
        self.machine.gpa_map(hostmem.addr + offset, gpa, size, prot)

    def mem_callback(self, ctx):
        """The memory assist's callback for vCPU ``ctx``: the LAPIC and IOAPIC pages here, the rest to the VM's
        MMIO bus (``VmSpec.mem``)."""
        vm_mem, vioapic = self.spec.mem, self.vioapic

        def mem(gpa, is_write, data):
            tpr = False
            if DEFAULT_APIC_BASE <= gpa < DEFAULT_APIC_BASE + APIC_SIZE:
                dev, off = ctx.vlapic, gpa - DEFAULT_APIC_BASE
                tpr = dev is not None and (off & APIC_SLOT) in TPR_SLOTS
                if tpr:
                    tpr_from_guest(ctx)      # the TPR and PPR the page shows are what the guest's CR8 says
            elif VIOAPIC_BASE <= gpa < VIOAPIC_BASE + VIOAPIC_SIZE:
                dev, off = vioapic, gpa - VIOAPIC_BASE
            else:
                return vm_mem(gpa, is_write, data)
            if ctx.pv_eoi is not None:
                ctx.pv_eoi.sync()            # an EOI the guest made in memory shows in ISR/PPR before it reads them
            if dev is None:
                if not is_write:
                    data[:] = b"\xff" * len(data)
                return None
            if is_write:
                dev.write(off, len(data), int.from_bytes(data, "little"))
                if tpr:
                    ctx.pending = True       # CR8 follows a TPR write at the next entry; a lower TPR lets a vector in
            else:
                data[:] = (dev.read(off, len(data)) & ((1 << (8 * len(data))) - 1)).to_bytes(len(data), "little")
            return None
        return mem

    # -- before an entry: suspension, SIPI, NMI, interrupts ----------------------------------------------------
    def before_entry(self, ctx):
        """Everything a kick so far asked for; returns a ``vm_exit`` for userland or None to enter the guest."""
        win = ctx.intwin
        if win is None:
            return self._before_entry(ctx)
        dl, vl = ctx.tsc_deadline, ctx.vlapic
        ticker = dl is not None and dl.tick is not None and vl is not None
        if ticker:
            vmm_lapic.take_folds(ctx, win, vl)      # ticks the loop recorded at a HLT, before anything new
        if win.take_slept_out():                 # the run loop's HLT sleep ended for Python: still halted
            ctx.hlt_held = (ctx.halt_rflags_last, ctx.current_rip())
        injected = ctx.injected
        r = self._before_entry(ctx)
        halt = ctx.halt_rflags
        pv_eoi = ctx.pv_eoi
        win.halt_policy(self.halt_in_loop(ctx), self.idle_fd, ctx.cr8, len(self.vcpus) == 1,
                        pv_eoi.word if pv_eoi is not None else None, pv_eoi is not None and pv_eoi.armed)
        if ticker and vl.changed:
            vl.changed = False          # set again by any change from here on
            vmm_lapic.plan_tick(ctx, vl)    # what the ticker may post for the TSC-deadline timer while it runs
        if halt is not None:
            ctx.halt_rflags = None
            if r is None and ctx.injected == injected and not ctx.pending and not ctx.nmi and not win.struct.state:
                ctx.halt_rflags_last = halt
                win.halt_now()                   # vmm_halt.py found nothing to wake it: it sleeps in the loop
            elif self.wake_hook is not None:
                self.wake_hook()                 # it runs (or goes to userland) without that sleep
        return r

    def _before_entry(self, ctx):
        # Its stop is withdrawn first (no STOPPED exit for what is looked at here); a kick from here on stops the run.
        ctx.pending = False
        nv = ctx.nv
        nv.clear_stop()
        if self.suspended is not None:
            ctx.pending = True
            return self.suspended_exit(ctx)
        if ctx.debug_hold:
            ctx.pending = True
            return ctx.exit_to(E.VM_EXITCODE_DEBUG, None)
        if ctx.hlt_held is not None:
            return self._rehalt(ctx)         # the rest of this entry's look is done there (or not wanted)
        if ctx.spinups:                      # one exit per AP; the next entry comes back here for the rest
            target, rip = ctx.spinups.popleft()
            ctx.pending = True
            return ctx.exit_to(E.VM_EXITCODE_SPINUP_AP, SpinupAp(target, rip))
        # NVMM has one event slot per entry: an exception or NMI queued for this entry keeps an interrupt for the
        # window after it (the exit state, read before the queueing, cannot say so)
        queued, ctx.event_queued = ctx.event_queued, False
        if ctx.nmi:
            ctx.nmi = False
            nv.event.set(C.NVMM_VCPU_EVENT_INTR, C.X86_EXC_NMI)
            nv.inject()
            queued = True
        vl = ctx.vlapic
        if vl is None or ctx.caps[VmCapType.VM_CAP_MASK_HWINTR]:
            return None
        tpr_from_guest(ctx)
        inject_interrupt(self, ctx, vl, queued)
        tpr_to_guest(ctx)
        return None

    # -- MSRs the kernel devices take ----------------------------------------------------------------------------
    def kernel_msr(self, ctx, msr, value=None):
        """A RDMSR (``value`` None) or WRMSR done here: the vlapic's, kvmclock's or PV EOI's MSRs, then the
        architectural MSRs of ``ops/arch_msrs.py`` (the MSR policy the guest's CPUID gives, IA32_TSC_ADJUST).
        Returns ``(True, value read)``, or ``(False, None)`` when it is userland's (a ``vm_exit``). Raises
        ``ApicGP`` (``arch_msrs.MsrGP`` is one) or ``PvEoiGP`` for a #GP."""
        vl = ctx.vlapic
        dev = next((d for d in (vl, ctx.pvclock, ctx.pv_eoi) if d is not None and d.handles_msr(msr)), None)
        if dev is None:
            arch = getattr(ctx, "arch_msrs", None)
            if arch is None:                 # first non-device MSR exit of this vCPU
                from .arch_msrs import ArchMsrs
                arch = ctx.arch_msrs = ArchMsrs(ctx.nv)
            return arch.access(msr, value)
        if dev is vl and ctx.pv_eoi is not None:
            ctx.pv_eoi.sync()            # as for the APIC page: the x2APIC registers see a PV EOI first
        if value is None:
            return True, dev.rdmsr(msr)
        dev.wrmsr(msr, value)
        return True, None

    @staticmethod
    def msr_exit(ctx, rd, msr, value, rip):
        return ctx.exit_to(E.VM_EXITCODE_RDMSR if rd else E.VM_EXITCODE_WRMSR,
                           Msr(msr) if rd else Msr(msr, value), rip, 2)

    # -- suspension and events --------------------------------------------------------------------------------------
    def suspended_exit(self, ctx):
        return ctx.exit_to(E.VM_EXITCODE_SUSPENDED, Suspended(self.suspended))

    def suspend(self, how):
        if self.suspended is None:
            self.suspended = how
        for ctx in self.vcpus.values():
            ctx.kick()

    def all_asleep(self):
        """Whether every vCPU that has started sleeps in HLT (none is in the guest or about to enter it)."""
        return all(c.sleeping or c.loop_asleep() for c in self.vcpus.values() if c.started)

    def activate_cpu(self, vcpu):
        """bhyve's ``vm_activate_cpu``: from here on the VM halts only when this vCPU halts too, so an AP whose
        thread has not started yet cannot be missed by a BSP that halts right after its SIPI."""
        self.vcpus[vcpu].started = True

    def debug_hold(self, vcpu, hold):
        """bhyve's ``vm_suspend_cpu`` (``hold``) / ``vm_resume_cpu``; ``vcpu`` -1 is every vCPU."""
        for ctx in (self.vcpus.values() if vcpu == -1 else [self.vcpus[vcpu]]):
            ctx.debug_hold = hold
            if hold:
                ctx.kick()

    def gla2gpa(self, vcpu, gla):
        """bhyve's ``vm_gla2gpa_nofault``: the guest-physical address of linear ``gla`` through the vCPU's
        page tables (``EFAULT`` when not mapped)."""
        return self.vcpus[vcpu].nv.gva_to_gpa(gla)[0]

    def inject_exception(self, vcpu, vector, errcode=0):
        ctx = self.vcpus[vcpu]
        nv = ctx.nv
        if vector == C.X86_EXC_BP:        # the #BP of the int3 a BPT exit stopped at (the guest's own)
            nv.inject_bp()
            ctx.pending = True
            return
        nv.event.set(C.NVMM_VCPU_EVENT_EXCP, vector, errcode)
        nv.inject()
        ctx.event_queued = True           # no interrupt replaces it at this entry (before_entry)
        ctx.pending = True

    def inject_nmi(self, vcpu):
        ctx = self.vcpus.get(vcpu)
        if ctx is not None:
            ctx.nmi = True
            ctx.kick()

    def lapic_msi(self, addr, data):
        """An MSI write (Intel SDM vol. 3, 10.11): address selects the destination, data the vector/mode."""
        dest = (addr >> 12) & 0xFF
        logical = bool(addr & 0x4)
        vector, delmode, level = data & 0xFF, (data >> 8) & 0x7, bool(data & 0x8000)
        self.apicbus.deliver_intr(dest, not logical, delmode, vector, level)

    def isa_set_irq(self, irq, level):
        """An ISA interrupt line (bhyve ``vm_isa_assert_irq``): the 8259 input and the IOAPIC pin (IRQ0 is
        wired to pin 2, as the MADT's interrupt source override says)."""
        if level:
            self.irq_events[irq] = self.irq_events.get(irq, 0) + 1
        self.vatpic.set_irq_level(irq, level)
        self.vioapic.set_pin_level(2 if irq == 0 else irq, level)

    def isa_pulse_irq(self, irq):
        """An edge on ISA IRQ ``irq``, to the 8259 pair and the IOAPIC (IRQ0 on pin 2). Returns False when the
        edge merged with one still pending where the guest takes it and the host, not the guest, kept it waiting
        (``ops/edge_merge.py``: its source may send it again), else True. Merged: the IOAPIC's answer (the
        destination vlapics all had the vector in their IRR) while its pin is unmasked, as the IOAPIC route is
        then the one in use; with the pin masked, the 8259's (the IRQ's IRR bit was still set)."""
        self.irq_events[irq] = self.irq_events.get(irq, 0) + 1
        pic_merged = self.vatpic.pulse_irq(irq)
        io_merged = self.vioapic.pulse_pin(2 if irq == 0 else irq)
        if not (pic_merged if io_merged is None else io_merged):
            self.edges.raised(irq)
            return True
        return self.edges.merged(irq)

    def _bsp_cpu_ns(self):
        bsp = self.vcpus.get(0)
        return thread_cpu_ns(bsp.tid) if bsp is not None else None

    def _bsp_masked(self):
        bsp = self.vcpus.get(0)
        if bsp is None:
            return False
        win = bsp.intwin
        if win is None:
            return bsp.masked
        # the run loop's own: a kick's vector waiting there for IF is masked too; one it injected, not any more
        return (bsp.masked or win.masked()) and not win.pending_accept()

    def _atpic_intr(self, level):
        """The 8259 pair's INTR wire goes to the BSP's LINT0 (ExtINT, or the INTR pin while its APIC is not
        enabled), as on a PC."""
        bsp = self.vcpus.get(0)
        if bsp is not None and bsp.vlapic is not None:
            bsp.vlapic.set_lint0_level(level)
            if level:
                bsp.kick()

    def _kick(self, vcpuid):
        ctx = self.vcpus.get(vcpuid)
        if ctx is not None:
            ctx.kick_intr()

    def _on_init(self, vcpuid):
        pass    # the target waits for SIPI; its vlapic was reset by the bus

    def _on_sipi(self, vcpuid, vector, src):
        """A START-UP message reached AP ``vcpuid``: the sender (on its own thread, handling the ICR write)
        returns ``VM_EXITCODE_SPINUP_AP`` for it before it re-enters the guest, one exit per AP a broadcast
        reached."""
        sender = self.vcpus.get(src)
        if sender is not None:
            sender.spinups.append((vcpuid, vector << 12))
            sender.pending = True

    # -- debugging --------------------------------------------------------------------------------------------------
    def vcpu_stats(self, vcpu):
        """Counters and interrupt state of one vCPU, for ``--stats``/debug dumps."""
        ctx = self.vcpus[vcpu]
        names = {k & 0xFFFF: v for k, v in C.EXIT_NAMES.items()}
        out = {"exits": {names.get(i, hex(i)): n for i, n in enumerate(ctx.exits) if n},
               "bus_mmio": ctx.bus_mmio, "injected": ctx.injected, "kicks": ctx.kicks, "took_over": ctx.took_over,
               "kicks_merged": ctx.kicks_merged, "kicks_spared": ctx.kicks_spared, "pending": ctx.pending,
               "started": ctx.started, "answered_io": ctx.nv.answered_io(),
               "answered_mmio": ctx.nv.answered_mmio()}
        if ctx.tsc_deadline is not None:
            out["ticks_posted"], out["ticks_handed"] = ctx.tsc_deadline.ticks_posted, ctx.tsc_deadline.ticks_handed
        vl = ctx.vlapic
        if vl is not None:
            out["irr"] = [hex(vl.read(0x200 + 0x10 * i, 4)) for i in range(8) if vl.read(0x200 + 0x10 * i, 4)]
            out["isr"] = [hex(vl.read(0x100 + 0x10 * i, 4)) for i in range(8) if vl.read(0x100 + 0x10 * i, 4)]
            out["tpr"] = vl.read(0x80, 4)
        if ctx.itrace is not None:
            out["itrace"] = list(ctx.itrace)
        return out

    def debug_state(self):
        """The IOAPIC's first redirection entries and the ISA IRQ counters, one line."""
        vio = self.vioapic
        return ["ioapic " + " ".join(f"{p}:{vio.read_reg(0x10 + 2 * p):#x}" for p in range(4)) +
                f" isa-irqs {dict(sorted(self.irq_events.items()))}"]
