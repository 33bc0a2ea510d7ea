"""``vmm_ops_nvmm``: bhyve's ``vmm_ops`` table on the NVMM primitives (DESIGN.md section 3).

``vmrun`` handles in its own loop what bhyve's kernel module handles: the vlapic page and the APIC MSRs
(APIC_BASE, x2APIC, TSC_DEADLINE), KVM's paravirtual clock and PV EOI MSRs (``kvm_para.py``, ``pvclock.py``;
vmmshim's extension, as QEMU offers them), the vioapic page, interrupt injection from the vlapic when the guest can
take it (else the interrupt window), NMIs, HLT sleeping until an interrupt or a kick, INIT/SIPI (returned as
``VM_EXITCODE_SPINUP_AP``), triple fault (``VM_EXITCODE_SUSPENDED``), MONITOR/MWAIT (#UD). Everything else goes
up as a ``vm_exit``: ``INOUT`` and ``INST_EMUL`` (completed by the VM calling :meth:`VmmOpsNvmm.assist`, which
runs the provider's assist and so the VM's port or MMIO callback), ``RDMSR``/``WRMSR``, ``HLT`` (with
``VM_CAP_HALT_EXIT``), ``VMX`` for an NVMM INVALID exit, ``BOGUS`` for a STOPPED exit (a kick).

Besides the table's members this class has the ``vm_*`` calls of bhyve's ``vmm.c``/``vmmapi`` that a VM needs
and that only the ops layer can do: memory (``vm_mem_alloc``, ``vm_gpa_view``), interrupt sources
(``vm_ioapic_assert_irq`` ..., ``vm_lapic_msi``, ``vm_inject_nmi``, ``vm_inject_exception``), ``vm_suspend``.

Not supported: ``VM_CAP_MTRAP_EXIT`` (NVMM has no monitor trap; ``ENOENT``), the RENDEZVOUS protocol (not
needed without a kernel), ``VM_EXITCODE_IPI`` (IPIs are delivered here, as with ``VM_CAP_IPI_EXIT`` off).
"""

import errno
import threading
import time

from bhyve_devices.vlapic import ApicGP, Vlapic

from . import kvm_para
from . import nvmm_regs as regs
from . import pvclock
from .nvmm import api
from .nvmm import constants as C
from .nvmm.api import nvmm_error
from .nvmm_vm import INOUT_CODE, NvmmVmi, VcpuCtx
from .vmm_ops import (LAZY, Hlt, InstEmul, Msr, SpinupAp, Suspended, VmCapType, VmExitCode, VmSuspendHow,
                      Vmx)

LAPIC_BASE, LAPIC_SIZE = 0xFEE00000, 0x1000
IOAPIC_BASE, IOAPIC_SIZE = 0xFEC00000, 0x1000
INTR_WINDOW = 0x2      # nvmm_x64_state_intr.int_window_exiting
E = VmExitCode
_IO, _MEM = C.NVMM_VCPU_EXIT_IO, C.NVMM_VCPU_EXIT_MEMORY
_INOUT = INOUT_CODE


def _injectable(es):
    """Whether an exit state lets an external interrupt in: IF set, no interrupt shadow, no event pending."""
    return es.rflags & C.RFLAGS_IF and not es.int_shadow and not es.evt_pending


class VmmOpsNvmm:
    """The table. One instance per provider; ``vm_init`` makes a VM on it."""

    def __init__(self, provider):
        self.provider = provider
        self._handlers = self._exit_table()

    # -- module and VM lifetime -------------------------------------------------------------------------------
    def init(self):
        cap = self.provider.capability()
        if cap.version < C.NVMM_KERN_VERSION or cap.state_size != C_STATE_SIZE:
            raise nvmm_error(errno.EPROTO, f"NVMM version {cap.version}/state size {cap.state_size} unsupported")
        return 0

    def cleanup(self):
        return 0

    def vm_init(self, vm):
        """``vm`` gives ``timers`` (a TimerService), ``io(port, is_in, data)`` and ``mem(gpa, is_write, data)``
        callbacks for the VM's buses, and optionally ``x2apic``."""
        return NvmmVmi(self.provider, vm)

    def vm_cleanup(self, vmi):
        vmi.machine.drain_posted()          # the last posted writes (a guest's final console bytes)
        for vcpuid in list(vmi.vcpus):
            self.vcpu_cleanup(vmi, vcpuid)
        vmi.machine.destroy()

    def vcpu_init(self, vmi, vcpu):
        nv = vmi.machine.vcpu_create(vcpu)
        ctx = VcpuCtx(vmi, vcpu, nv)
        mem_cb = self._make_mem_cb(vmi, ctx)
        nv.configure(C.NVMM_VCPU_CONF_CALLBACKS, api.AssistCallbacks(io=vmi.vm.io, mem=mem_cb))
        hz = nv.tsc_frequency() if vmi.kvm_pv and not vmi.kernel_clock else None
        if hz:
            ctx.pvclock = pvclock.Pvclock(vmi.machine.gpa_view, lambda: self._guest_tsc(nv), hz,
                                          vmi.clock_epoch_ns)
        self._kvm_para_cpuid(vmi, ctx)
        vmi.vcpus[vcpu] = ctx
        return 0

    @staticmethod
    def _kvm_para_cpuid(vmi, ctx):
        """KVM's signature and the features this vCPU has (``ops/kvm_para.py``), with ``kvm_pv`` on."""
        if not vmi.kvm_pv:
            return
        features = kvm_para.KVM_FEATURE_NOP_IO_DELAY
        if vmi.kernel_clock:
            features |= kvm_para.KVM_FEATURE_CLOCKSOURCE2 | kvm_para.KVM_FEATURE_CLOCKSOURCE_STABLE_BIT
        elif ctx.pvclock is not None:
            features |= kvm_para.KVM_FEATURE_CLOCKSOURCE2
        features |= kvm_para.KVM_FEATURE_PV_EOI if ctx.pv_eoi is not None else 0
        for leaf, bits in kvm_para.cpuid_leaves(features).items():
            # exact values whatever the kernel answers above its last hypervisor leaf (NVMM on Intel repeats
            # the last basic leaf there): delete every bit that is not set
            ctx.nv.configure(C.NVMM_VCPU_CONF_CPUID, api.ConfCpuid(leaf=leaf, mask=True, set=bits,
                                                                   del_=tuple(~b & 0xFFFFFFFF for b in bits)))

    @staticmethod
    def _guest_tsc(nv):
        nv.getstate(C.NVMM_X64_STATE_MSRS)
        return nv.state.msrs[C.NVMM_X64_MSR_TSC]

    def vcpu_cleanup(self, vmi, vcpu):
        ctx = vmi.vcpus.pop(vcpu, None)
        if ctx is not None:
            ctx.nv.destroy()

    def vlapic_init(self, vmi, vcpu):
        ctx = vmi.vcpus[vcpu]
        vl = Vlapic(vcpu, vmi.timers, vmi.apicbus, x2apic_allowed=vmi.x2apic, eoi_level=vmi.vioapic.eoi)
        vmi.apicbus.add(vl)
        ctx.vlapic = vl
        if vmi.kvm_pv and vmi.pv_eoi:
            ctx.pv_eoi = kvm_para.PvEoi(vmi.machine.gpa_view, vl.eoi)
            self._kvm_para_cpuid(vmi, ctx)
        if vmi.x2apic:      # CPUID tells the guest the truth about the vlapic it has
            ctx.nv.configure(C.NVMM_VCPU_CONF_CPUID,
                             api.ConfCpuid(leaf=1, mask=True, set=(0, 0, C.CPUID_1_ECX_X2APIC, 0)))
        return vl

    def vlapic_cleanup(self, vmi, vlapic):
        for ctx in vmi.vcpus.values():
            if ctx.vlapic is vlapic:
                ctx.vlapic = None

    def vcpu_interrupt(self, vmi, vcpu):
        vmi.vcpus[vcpu].kick()

    # -- registers, descriptors, capabilities ------------------------------------------------------------------
    def vmgetreg(self, vmi, vcpu, num):
        ctx = vmi.vcpus[vcpu]
        return regs.getreg(ctx.nv, num, ctx.extra)

    def vmsetreg(self, vmi, vcpu, num, val):
        ctx = vmi.vcpus[vcpu]
        regs.setreg(ctx.nv, num, val, ctx.extra)

    def vmgetdesc(self, vmi, vcpu, num):
        return regs.getdesc(vmi.vcpus[vcpu].nv, num)

    def vmsetdesc(self, vmi, vcpu, num, desc):
        regs.setdesc(vmi.vcpus[vcpu].nv, num, desc)

    def vmgetcap(self, vmi, vcpu, num):
        ctx = vmi.vcpus[vcpu]
        if num in ctx.caps:
            return ctx.caps[num]
        if num == VmCapType.VM_CAP_UNRESTRICTED_GUEST:
            return 1
        raise nvmm_error(errno.ENOENT, f"capability {num} is not supported")

    def vmsetcap(self, vmi, vcpu, num, val):
        ctx = vmi.vcpus[vcpu]
        if num in ctx.caps:
            ctx.caps[num] = 1 if val else 0
            return
        if num == VmCapType.VM_CAP_UNRESTRICTED_GUEST and val:
            return
        raise nvmm_error(errno.ENOENT, f"capability {num} is not supported")

    # -- the run loop ------------------------------------------------------------------------------------------
    def vmrun(self, vmi, vcpu, rip=None, rendezvous_cookie=None, suspend_cookie=None):
        """Runs vCPU ``vcpu`` (at ``rip`` if given, else where it stopped) until an exit userland handles."""
        return self.runner(vmi, vcpu)(rip)

    def runner(self, vmi, vcpu, inout_assist=False):
        """``vmrun`` for one vCPU as a closure with its look-ups done once (vmmshim's extension: the VM's
        vCPU loop calls it per exit; ``bench/exit_bench.py`` measures the path). With ``inout_assist`` the VM
        says its INOUT handler does nothing but the I/O assist (its port bus): the runner then assists port
        exits itself and runs on, as bhyve's kernel handles its own devices' ports, instead of returning each one
        (counted in ``inout_assisted``). A console byte in the nested lab cost about 400 us of Python per exit."""
        ctx = vmi.vcpus[vcpu]
        if ctx.runner is not None and ctx.runner[0] == inout_assist:
            return ctx.runner[1]
        nv, vmexit, before_entry, handle_exit = ctx.nv, ctx.vmexit, self._before_entry, self._exit
        run, io, inout, setreg, rip_reg = nv.run, _IO, _INOUT, regs.setreg, regs.R.VM_REG_GUEST_RIP
        get_ident = threading.get_ident

        def run_vcpu(rip=None):
            ctx.started = True
            ctx.thread = get_ident()
            if rip is not None:
                setreg(nv, rip_reg, rip, ctx.extra)
            while True:
                if ctx.pending:
                    r = before_entry(vmi, ctx)
                    if r is not None:
                        return r
                ex = run()
                if ex.reason == io:
                    if inout_assist:
                        ctx.inout_assisted += 1
                        nv.assist_io()
                        continue
                    vmexit.exitcode = inout
                    vmexit._u = LAZY
                    vmexit._rip = None
                    return vmexit
                r = handle_exit(vmi, ctx, ex, ex.reason)
                if r is not None:
                    return r
        ctx.runner = (inout_assist, run_vcpu)
        return run_vcpu

    def inout_assisted(self, vmi, vcpu):
        """Port exits the runner assisted itself (``runner(..., inout_assist=True)``) and port reads the provider
        answered without an exit (``vm_answer_io``); vmmshim's extension."""
        ctx = vmi.vcpus[vcpu]
        return ctx.inout_assisted + ctx.nv.answered_io()

    def assist_fn(self, vmi, vcpu):
        """The provider's I/O assist for one vCPU (vmmshim's extension, for the VM's INOUT handler)."""
        return vmi.vcpus[vcpu].nv.assist_io

    def _before_entry(self, vmi, ctx):
        # Everything a kick so far asked for (suspension, a SIPI, an NMI, an interrupt) is looked at below, so its
        # stop is withdrawn first (no STOPPED exit for it); a kick from here on stops the run.
        ctx.pending = False
        nv = ctx.nv
        nv.clear_stop()
        if vmi.suspended is not None:
            ctx.pending = True
            return self._suspended_exit(vmi, ctx)
        if ctx.spinup is not None:
            target, rip = ctx.spinup
            ctx.spinup = None
            ctx.pending = True
            return self._vmexit(ctx, E.VM_EXITCODE_SPINUP_AP, SpinupAp(target, rip))
        # NVMM has one event slot per entry: an exception or NMI queued for this entry keeps an interrupt for the
        # window after it (the exit state, read before the queueing, cannot say so)
        queued, ctx.event_queued = ctx.event_queued, False
        if ctx.nmi:
            ctx.nmi = False
            nv.event.set(C.NVMM_VCPU_EVENT_INTR, C.X86_EXC_NMI)
            nv.inject()
            queued = True
        vl = ctx.vlapic
        if vl is None:
            return None
        pv_eoi = ctx.pv_eoi
        if pv_eoi is not None:
            pv_eoi.sync()                        # the guest may have ended the interrupt in memory
        vec = vl.pending_intr()
        extint = vec is None and vl.lint0_pending() and vmi.vatpic.pending() is not None
        if vec is None and not extint:
            return None
        # Completing the exiting instruction (one more KVM_RUN) only when no event is queued and the exit state
        # allows an injection: completion cannot set IF, and while a guest with IF=0 has an interrupt pending
        # every exit comes here (36,000 times in a Linux boot, whose console writes run with interrupts off).
        es = nv.exit.exitstate
        injectable = not queued and _injectable(es)
        if injectable:
            nv.complete_exit()                   # events its completion queues (a #GP) come first
            es = nv.exit.exitstate
            injectable = _injectable(es)
        if injectable:
            if extint:
                vec = vmi.vatpic.intr_accepted()     # the INTA cycle
                vl.extint_accepted()
            else:
                vl.intr_accepted(vec)
            nv.event.set(C.NVMM_VCPU_EVENT_INTR, vec)
            nv.inject()
            ctx.injected += 1
            # PV EOI (kvm_para.py). Unlike KVM, also with a request that waits for this vector's EOI (a timer
            # tick on top of a device's interrupt): the window exit at the handler's IRET then finds the EOI
            # made in memory (every exit syncs it) instead of the guest's EOI exiting; a guest that opens the
            # window before its EOI finds PV EOI disarmed there, and its EOI exits as without it.
            behind = None
            if pv_eoi is not None and not extint and pv_eoi.word is not None:
                behind = vl.edge_in_service_before()
                if behind is not None:
                    pv_eoi.arm()
            ctx.pending = vl.pending_intr() is not None or vl.lint0_pending()   # more: re-check next entry
            if ctx.pending or behind:
                self._request_window(nv)
        else:
            self._request_window(nv)
            ctx.pending = True
        if ctx.itrace is not None:
            ctx.itrace.append(("inj" if ctx.injected != ctx.itrace_n else "win", vec, hex(ctx.current_rip()),
                               hex(es.rflags), int(es.int_shadow), int(es.evt_pending), nv.exit.reason))
            ctx.itrace_n = ctx.injected
        return None

    @staticmethod
    def _request_window(nv):
        nv.getstate(C.NVMM_X64_STATE_INTR)
        if not nv.state.intr & INTR_WINDOW:
            nv.state.intr = nv.state.intr | INTR_WINDOW
            nv.setstate(C.NVMM_X64_STATE_INTR)

    def _exit(self, vmi, ctx, ex, reason):
        """The exits bhyve's kernel handles; returns a VmExit for userland or None to re-enter. A table by NVMM
        exit reason (:meth:`_exit_table`), as bhyve's ``vmexit.c``; a reason not in it goes up as ``VMX``."""
        ctx.exits[reason & 0xFFFF] += 1
        vmi.tls.ctx = ctx            # an IPI sent while handling this exit knows its sender
        handler = self._handlers.get(reason)
        if handler is None:
            hw = ex.inv.hwcode if reason == C.NVMM_VCPU_EXIT_INVALID else reason
            return self._vmexit(ctx, E.VM_EXITCODE_VMX, Vmx(status=0, exit_reason=hw))
        return handler(vmi, ctx, ex, reason)

    def _exit_table(self):
        pend = self._exit_pending
        return {
            _MEM: self._exit_mem,
            C.NVMM_VCPU_EXIT_RDMSR: self._msr, C.NVMM_VCPU_EXIT_WRMSR: self._msr,
            C.NVMM_VCPU_EXIT_HALTED: self._halt,
            C.NVMM_VCPU_EXIT_INT_READY: pend, C.NVMM_VCPU_EXIT_NMI_READY: pend, C.NVMM_VCPU_EXIT_NONE: pend,
            C.NVMM_VCPU_EXIT_STOPPED: pend,          # a kick: re-evaluate interrupts and suspension before entry
            C.NVMM_VCPU_EXIT_SHUTDOWN: self._exit_shutdown,
            C.NVMM_VCPU_EXIT_MONITOR: self._exit_ud, C.NVMM_VCPU_EXIT_MWAIT: self._exit_ud,
            C.NVMM_VCPU_EXIT_TPR_CHANGED: self._exit_tpr,
        }

    def _exit_mem(self, vmi, ctx, ex, reason):
        gpa = ex.mem_gpa
        if LAPIC_BASE <= gpa < LAPIC_BASE + LAPIC_SIZE or IOAPIC_BASE <= gpa < IOAPIC_BASE + IOAPIC_SIZE:
            if ctx.pv_eoi is not None:
                ctx.pv_eoi.sync()            # an EOI the guest made in memory shows in ISR/PPR before it reads them
            ctx.nv.assist_mem()
            return None
        return self._vmexit(ctx, E.VM_EXITCODE_INST_EMUL, InstEmul(gpa))

    @staticmethod
    def _exit_pending(vmi, ctx, ex, reason):
        ctx.pending = True
        return None

    def _exit_shutdown(self, vmi, ctx, ex, reason):
        self.vm_suspend(vmi, VmSuspendHow.VM_SUSPEND_TRIPLEFAULT)
        return self._suspended_exit(vmi, ctx)

    def _exit_ud(self, vmi, ctx, ex, reason):
        self.vm_inject_exception(vmi, ctx.id, C.X86_EXC_UD)
        return None

    @staticmethod
    def _exit_tpr(vmi, ctx, ex, reason):
        if ctx.vlapic is not None:
            ctx.vlapic.set_cr8(ex.exitstate.cr8)
        ctx.pending = True
        return None

    def _vmexit(self, ctx, code, payload, rip=None, inst_length=0):
        vmexit = ctx.vmexit
        vmexit.exitcode, vmexit.u, vmexit.inst_length = code, payload, inst_length
        vmexit.rip = rip if rip is not None else regs.getreg(ctx.nv, regs.R.VM_REG_GUEST_RIP, ctx.extra)
        return vmexit

    def _suspended_exit(self, vmi, ctx):
        return self._vmexit(ctx, E.VM_EXITCODE_SUSPENDED, Suspended(vmi.suspended))

    def _msr(self, vmi, ctx, ex, reason):
        nv, vl = ctx.nv, ctx.vlapic
        rd = reason == C.NVMM_VCPU_EXIT_RDMSR
        msr, npc = (ex.rdmsr if rd else ex.wrmsr[0::2])
        rip = npc - 2
        dev = next((d for d in (vl, ctx.pvclock, ctx.pv_eoi) if d is not None and d.handles_msr(msr)), None)
        if dev is not None:
            if dev is vl and ctx.pv_eoi is not None:
                ctx.pv_eoi.sync()            # as for the APIC page: the x2APIC registers see a PV EOI first
            try:
                if rd:
                    value = dev.rdmsr(msr)
                    nv.getstate(C.NVMM_X64_STATE_GPRS)
                    nv.state.gprs[C.NVMM_X64_GPR_RAX] = value & 0xFFFFFFFF
                    nv.state.gprs[C.NVMM_X64_GPR_RDX] = value >> 32
                else:
                    dev.wrmsr(msr, ex.wrmsr.val)
                    nv.getstate(C.NVMM_X64_STATE_GPRS)
                nv.state.gprs[C.NVMM_X64_GPR_RIP] = npc
                nv.setstate(C.NVMM_X64_STATE_GPRS)
            except (ApicGP, kvm_para.PvEoiGP):
                self.vm_inject_exception(vmi, ctx.id, C.X86_EXC_GP, 0)
            ctx.pending = True
            return None
        payload = Msr(msr) if rd else Msr(msr, ex.wrmsr.val)
        return self._vmexit(ctx, E.VM_EXITCODE_RDMSR if rd else E.VM_EXITCODE_WRMSR, payload, rip, 2)

    def _halt(self, vmi, ctx, ex, reason):
        rflags = ex.exitstate.rflags
        if ctx.pvclock is not None:
            ctx.pvclock.maybe_refresh(time.monotonic_ns())
        if ctx.pv_eoi is not None:
            ctx.pv_eoi.sync()                    # before the wait looks at what is in service
        if ctx.caps[VmCapType.VM_CAP_HALT_EXIT]:
            return self._vmexit(ctx, E.VM_EXITCODE_HLT, Hlt(rflags))
        if not rflags & C.RFLAGS_IF and not ctx.nmi:
            ctx.halted_if_clear = True
            if all(c.halted_if_clear for c in vmi.vcpus.values() if c.started):
                self.vm_suspend(vmi, VmSuspendHow.VM_SUSPEND_HALT)
                return self._suspended_exit(vmi, ctx)
        hook = vmi.idle_hook
        if hook is not None and rflags & C.RFLAGS_IF and not ctx.nmi and vmi.suspended is None:
            vl = ctx.vlapic
            if vl is None or vl.pending_intr() is None:
                hook()
        with ctx.cond:
            ctx.sleeping = True
            try:
                while (vmi.suspended is None and not ctx.nmi and
                       not (rflags & C.RFLAGS_IF and ctx.vlapic is not None and
                            ctx.vlapic.pending_intr() is not None)):
                    ctx.cond.wait(0.5)
            finally:
                ctx.sleeping = False
        ctx.halted_if_clear = False
        ctx.pending = True
        return None

    def vcpu_stats(self, vmi, vcpu):
        """Counters and interrupt state of one vCPU, for ``--stats``/debug dumps (vmmshim's extension)."""
        ctx = vmi.vcpus[vcpu]
        names = {k & 0xFFFF: v for k, v in C.EXIT_NAMES.items()}
        out = {"exits": {names.get(i, hex(i)): n for i, n in enumerate(ctx.exits) if n},
               "injected": ctx.injected, "kicks": ctx.kicks, "pending": ctx.pending, "started": ctx.started,
               "answered_io": ctx.nv.answered_io()}
        vl = ctx.vlapic
        if vl is not None:
            out["irr"] = [hex(vl.read(0x200 + 0x10 * i, 4)) for i in range(8) if vl.read(0x200 + 0x10 * i, 4)]
            out["isr"] = [hex(vl.read(0x100 + 0x10 * i, 4)) for i in range(8) if vl.read(0x100 + 0x10 * i, 4)]
            out["tpr"] = vl.read(0x80, 4)
        if ctx.itrace is not None:
            out["itrace"] = list(ctx.itrace)
        return out

    # -- completing exits and the vmm.c calls the VM needs ----------------------------------------------------
    def assist(self, vmi, vcpu):
        """Completes an INOUT or INST_EMUL exit: the provider's assist calls the VM's port or MMIO callback."""
        nv = vmi.vcpus[vcpu].nv
        if nv.exit.reason == _IO:
            nv.assist_io()
        else:
            nv.assist_mem()

    def _make_mem_cb(self, vmi, ctx):
        vm_mem = vmi.vm.mem

        def mem(gpa, is_write, data):
            if LAPIC_BASE <= gpa < LAPIC_BASE + LAPIC_SIZE:
                dev, off = ctx.vlapic, gpa - LAPIC_BASE
            elif IOAPIC_BASE <= gpa < IOAPIC_BASE + IOAPIC_SIZE:
                dev, off = vmi.vioapic, gpa - IOAPIC_BASE
            else:
                return vm_mem(gpa, is_write, data)
            if dev is None:
                if not is_write:
                    data[:] = b"\xff" * len(data)
                return None
            if is_write:
                dev.write(off, len(data), int.from_bytes(data, "little"))
            else:
                data[:] = (dev.read(off, len(data)) & ((1 << (8 * len(data))) - 1)).to_bytes(len(data), "little")
            return None
        return mem

    def vm_mem_alloc(self, vmi, hostmem, offset, gpa, size, prot=C.NVMM_PROT_ALL):
        """Maps ``size`` bytes of ``hostmem`` (``addr``, ``size``) from ``offset`` at ``gpa`` (xhyve's
        ``vmm_mem_alloc``); the host range is registered with ``hva_map`` on first use."""
        if hostmem.addr not in vmi.hva_mapped:
            vmi.machine.hva_map(hostmem.addr, hostmem.size)
            vmi.hva_mapped.add(hostmem.addr)
        vmi.machine.gpa_map(hostmem.addr + offset, gpa, size, prot)

    def vm_gpa_view(self, vmi, gpa, size):
        return vmi.machine.gpa_view(gpa, size)

    def vm_post_io(self, vmi, port, size, cb):
        """vmmshim's extension: OUTs to ``[port, port+size)`` may be posted (``Machine.post_io``); returns
        whether the provider does it. ``cb(port, data)`` gets them before the next exit is handled."""
        return vmi.machine.post_io(port, size, cb)

    def vm_answer_io(self, vmi, port, value):
        """vmmshim's extension: one-byte reads of ``port`` read ``value`` (None: they exit again) without an exit
        where the provider can (``Machine.answer_io``); returns whether it can."""
        return vmi.machine.answer_io(port, value)

    def vm_doorbell(self, vmi, addr, size, pio, datamatch, fd):
        """vmmshim's extension: guest writes to ``addr`` signal the eventfd ``fd`` instead of exiting
        (``Machine.doorbell``); returns whether the provider does it."""
        return vmi.machine.doorbell(addr, size, pio, datamatch, fd)

    def vm_remove_doorbell(self, vmi, addr, size, pio, datamatch, fd):
        vmi.machine.remove_doorbell(addr, size, pio, datamatch, fd)

    def vm_drain_posted(self, vmi):
        """vmmshim's extension: hands the posted writes buffered so far to their callbacks (any thread)."""
        vmi.machine.drain_posted()

    def vm_idle_hook(self, vmi, fn):
        """vmmshim's extension: a vCPU that halts with interrupts enabled and nothing to take calls ``fn()``
        (None: nothing) once before it sleeps, then looks again: device work that rang without an exit (a
        doorbell) done there raises its interrupt before the vCPU would sleep (``vmmshim/doorbells.py``)."""
        vmi.idle_hook = fn

    def vm_activate_cpu(self, vmi, vcpu):
        """Marks ``vcpu`` active before its thread first runs it (bhyve's ``vm_activate_cpu``, which
        ``spinup_ap`` calls): from here on the VM halts only when this vCPU halts too, so an AP whose thread has
        not started yet cannot be missed by a BSP that halts right after its SIPI."""
        vmi.vcpus[vcpu].started = True

    def vm_suspend(self, vmi, how):
        if vmi.suspended is None:
            vmi.suspended = how
        for ctx in vmi.vcpus.values():
            ctx.kick()

    def vm_inject_exception(self, vmi, vcpu, vector, errcode=0):
        ctx = vmi.vcpus[vcpu]
        nv = ctx.nv
        nv.event.set(C.NVMM_VCPU_EVENT_EXCP, vector, errcode)
        nv.inject()
        ctx.event_queued = True           # no interrupt replaces it at this entry (_before_entry)
        ctx.pending = True

    def vm_inject_nmi(self, vmi, vcpu):
        vmi._on_nmi(vcpu)

    def vm_lapic_msi(self, vmi, addr, data):
        """An MSI write (Intel SDM vol. 3, 10.11): address selects the destination, data the vector/mode."""
        dest = (addr >> 12) & 0xFF
        logical = bool(addr & 0x4)
        vector, delmode, level = data & 0xFF, (data >> 8) & 0x7, bool(data & 0x8000)
        vmi.apicbus.deliver_intr(dest, not logical, delmode, vector, level)

    def vm_isa_set_irq(self, vmi, irq, level):
        """An ISA interrupt line (bhyve ``vm_isa_assert_irq``): the 8259 input and the IOAPIC pin (IRQ0 is
        wired to pin 2, as the MADT's interrupt source override says)."""
        if level:
            vmi.irq_events[irq] = vmi.irq_events.get(irq, 0) + 1
        vmi.vatpic.set_irq_level(irq, level)
        vmi.vioapic.set_pin_level(2 if irq == 0 else irq, level)

    def vm_isa_pulse_irq(self, vmi, irq):
        vmi.irq_events[irq] = vmi.irq_events.get(irq, 0) + 1
        vmi.vatpic.pulse_irq(irq)
        vmi.vioapic.pulse_pin(2 if irq == 0 else irq)

    def vm_ioapic_assert_irq(self, vmi, pin):
        vmi.vioapic.set_pin_level(pin, True)

    def vm_ioapic_deassert_irq(self, vmi, pin):
        vmi.vioapic.set_pin_level(pin, False)

    def vm_ioapic_pulse_irq(self, vmi, pin):
        vmi.vioapic.pulse_pin(pin)


from .nvmm.state import STATE_SIZE as C_STATE_SIZE  # noqa: E402
