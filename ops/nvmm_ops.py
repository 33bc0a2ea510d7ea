"""``vmm_ops_nvmm``: bhyve's ``vmm_ops`` table on the NVMM primitives (DESIGN.md section 3; xhyve's ``vmm_ops``
instance, bhyve's ``vmx.c`` in its role as the table).

The sixteen members, the run loop and the table of NVMM exits (bhyve ``vmexit.c`` in spirit). The run loop
completes port and MMIO exits where they are decoded, as bhyve's kernel and QEMU's NVMM accelerator do: the
provider's assist calls the VM's port or MMIO callback (``VmSpec.io``/``mem``), or the kernel devices' (LAPIC and
IOAPIC pages, ``ops/vmm.py``). The rest is the engine's (``ops/vmm.py``: injection, HLT, SIPI, suspension; CR8
and the TPR, the APIC's CPUID bit: ``ops/vmm_lapic.py``) or goes up as a ``vm_exit``: ``RDMSR``/``WRMSR`` of MSRs
no kernel device takes, ``HLT`` (with ``VM_CAP_HALT_EXIT``), ``SPINUP_AP``, ``SUSPENDED``, ``VMX`` for an NVMM
INVALID exit or one this table does not know. MONITOR/MWAIT get #UD. KVM's paravirtual clock and PV EOI
(``kvm_para.py``, ``pvclock.py``) are offered here, as QEMU offers them; NVMM's TPR_CHANGED exit is asked for where
the provider has it, as QEMU's NVMM accelerator does.

The calls beyond the table (``vm_*``, ``vcpu_runner``, ``vcpu_stats``) come from ``ops/vmm_api.py``.

Guest debugging (bhyve's ``VM_CAP_MTRAP_EXIT``, ``VM_CAP_BPT_EXIT``, ``VM_CAP_MASK_HWINTR``; vmmshim's
``vm_debug_hw``) is the provider's ``set_guest_debug`` where its ``Capability.features`` list ``debug-*`` (KVM's
``KVM_SET_GUEST_DEBUG``, the soft CPU's hooks; libnvmm has none: ``ENOENT``); its exits go up as
``VM_EXITCODE_MTRAP``, ``VM_EXITCODE_BPT`` (RIP at the int3) and ``VM_EXITCODE_DB`` (a debug register).

Not supported: ``VM_CAP_RFLAGS_TF`` (the provider steps itself), the RENDEZVOUS protocol (not needed
without a kernel), ``VM_EXITCODE_INOUT``/``INST_EMUL`` to userland (completed here).
"""

import errno
import threading

from bhyve_devices.vlapic import ApicGP, Vlapic
from bhyve_devices.vlapic_regs import MSR_APICBASE, MSR_TSC_DEADLINE, MSR_X2APIC_FIRST, PPR, TPR

from . import kvm_para
from . import nvmm_regs as regs
from . import pvclock
from .nvmm import api
from .nvmm import constants as C
from .nvmm.api import nvmm_error
from .nvmm.state import STATE_SIZE as C_STATE_SIZE
from .vmm import Vcpu, Vm, is_kernel_mmio
from .vmm_lapic import leaf1_cpuid, tpr_from_guest, window_taken, window_withdrawn
from .vmm_api import Bpt, DebugTrap, VmmApiCalls
from .vmm_ops import VmCapType, VmExitCode, VmSuspendHow, Vmx

E = VmExitCode
_IO = C.NVMM_VCPU_EXIT_IO
# MSRs whose access reads or replaces the TPR (APIC_BASE resets it): the guest's CR8 goes into the vlapic first
# the debug capabilities and the provider feature each needs
DEBUG_CAPS = {VmCapType.VM_CAP_MTRAP_EXIT: api.FEATURE_DEBUG_STEP, VmCapType.VM_CAP_BPT_EXIT: api.FEATURE_DEBUG_BP}
TPR_MSRS = frozenset((MSR_APICBASE, MSR_X2APIC_FIRST + (TPR >> 4), MSR_X2APIC_FIRST + (PPR >> 4)))
# MSR writes after which nothing needs looking at before the entry: a TSC deadline already past raises its
# vector through the vlapic, whose kick on this thread asks for the look itself (the tickless guest's hot MSR)
QUIET_WRMSRS = frozenset((MSR_TSC_DEADLINE,))


class VmmOpsNvmm(VmmApiCalls):
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

    def vm_init(self, spec):
        """``spec``: a :class:`ops.vmm_api.VmSpec` (timers, the bus callbacks, the CPU features offered)."""
        return Vm(self.provider, spec)

    def vm_cleanup(self, vmi):
        vmi.machine.drain_posted()          # the last posted writes (a guest's final console bytes)
        for vcpuid in list(vmi.vcpus):
            self.vcpu_cleanup(vmi, vcpuid)
        vmi.machine.destroy()

    def vcpu_init(self, vmi, vcpu):
        nv = vmi.machine.vcpu_create(vcpu)
        ctx = Vcpu(vmi, vcpu, nv)
        ctx.debug = dict.fromkeys(DEBUG_CAPS, 0)
        nv.configure(C.NVMM_VCPU_CONF_CALLBACKS, api.AssistCallbacks(io=vmi.spec.io, mem=vmi.mem_callback(ctx)))
        hz = nv.tsc_frequency() if vmi.kvm_pv and not vmi.kernel_clock else None
        if hz:
            ctx.pvclock = pvclock.Pvclock(vmi.machine.gpa_view, nv.guest_tsc, hz,
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

    def vcpu_cleanup(self, vmi, vcpu):
        ctx = vmi.vcpus.pop(vcpu, None)
        if ctx is not None:
            ctx.nv.destroy()

    def vlapic_init(self, vmi, vcpu):
        ctx = vmi.vcpus[vcpu]
        nv = ctx.nv
        # TSC-deadline mode needs the guest TSC's rate and its value now (read at the WRMSR exit that arms it)
        hz = (nv.tsc_frequency() or None) if vmi.tsc_deadline else None
        # the KVM provider's run loop may inject at the interrupt window itself (ops/vmm_lapic.py, post_window)
        win = nv.interrupt_window() if hasattr(nv, "interrupt_window") else None
        # ... and keep IA32_TSC_DEADLINE itself, its expiry posted to that window by the ticker thread, or its
        # timerfd watched by the timer thread
        dl = nv.tsc_deadline(hz) if hz and getattr(vmi.timers, "can_watch", False) and \
            hasattr(nv, "tsc_deadline") else None
        vl = Vlapic(vcpu, vmi.timers, vmi.apicbus, x2apic_enabled=vmi.x2apic,   # bhyve's X2APIC_ENABLED (-x)
                    eoi_level=vmi.vioapic.eoi, tsc_hz=hz, tsc_now=nv.guest_tsc if hz else None, tsc_deadline=dl)
        if dl is not None:
            vmi.timers.watch(dl.fd, lambda: dl.expire() and vl.on_deadline())
            ctx.tsc_deadline = dl
            vl.on_reset = dl.hold
            if dl.tick is not None:
                vl.on_change = dl.hold      # a tick's plan made before a change of the vlapic is void
        vmi.apicbus.add(vl)
        ctx.vlapic = vl
        if vmi.kvm_pv and vmi.pv_eoi:
            ctx.pv_eoi = kvm_para.PvEoi(vmi.machine.gpa_view, vl.eoi)
            self._kvm_para_cpuid(vmi, ctx)
        if win is not None:
            win.on_taken = lambda vector, ended, armed, tick: window_taken(ctx, win, vector, ended, armed, tick=tick)
            win.on_withdrawn = lambda tick: window_withdrawn(ctx, win, tick)    # a kick's: Python looks again
            vl.outside = win.taken
            if dl is not None and dl.tick is not None:      # or an injection the ticker found ended
                vl.outside = lambda vector: win.taken(vector) or dl.folded(vector)
            ctx.intwin = win
        if vmi.tpr_exits:
            ctx.nv.configure(C.NVMM_VCPU_CONF_TPR, api.ConfTpr(exit_changed=True))
        if vmi.x2apic or hz:      # CPUID tells the guest the truth about the vlapic it has
            ctx.nv.configure(C.NVMM_VCPU_CONF_CPUID, leaf1_cpuid(vmi.x2apic, vl.hw_enabled, bool(hz)))
        return vl

    def vlapic_cleanup(self, vmi, vlapic):
        for ctx in vmi.vcpus.values():
            if ctx.vlapic is vlapic:
                ctx.vlapic = None
                ctx.intwin = None
                dl = ctx.tsc_deadline
                if dl is not None:
                    vmi.timers.unwatch(dl.fd)
                    dl.enabled = False

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
        if num in DEBUG_CAPS and DEBUG_CAPS[num] in vmi.features:
            return ctx.debug[num]
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
        if num in DEBUG_CAPS and DEBUG_CAPS[num] in vmi.features:
            ctx.debug[num] = 1 if val else 0
            self._guest_debug(ctx)
            return
        raise nvmm_error(errno.ENOENT, f"capability {num} is not supported")

    def vm_debug_hw(self, vmi, vcpu, slots):
        """Up to four debug-register breakpoints ``(addr, type, len)`` on ``vcpu`` (``ENOENT`` where the
        provider has none): each match is a ``VM_EXITCODE_DB``."""
        if api.FEATURE_DEBUG_HW not in vmi.features:
            raise nvmm_error(errno.ENOENT, "this provider has no debug-register breakpoints")
        if any(t for _, t, _ in slots) and api.FEATURE_DEBUG_WATCH not in vmi.features:
            raise nvmm_error(errno.ENOENT, "this provider has no data breakpoints (watchpoints)")
        ctx = vmi.vcpus[vcpu]
        ctx.debug_hw = tuple(slots)
        self._guest_debug(ctx)

    @staticmethod
    def _guest_debug(ctx):
        d = ctx.debug
        ctx.nv.set_guest_debug(step=bool(d[VmCapType.VM_CAP_MTRAP_EXIT]), sw_bp=bool(d[VmCapType.VM_CAP_BPT_EXIT]),
                               hw=getattr(ctx, "debug_hw", ()))

    # -- the run loop ------------------------------------------------------------------------------------------
    def vmrun(self, vmi, vcpu, rip=None, rendezvous_cookie=None, suspend_cookie=None):
        """Runs vCPU ``vcpu`` (at ``rip`` if given, else where it stopped) until an exit userland handles."""
        return self.vcpu_runner(vmi, vcpu)(rip)

    def vcpu_runner(self, vmi, vcpu):
        """``vmrun`` for one vCPU as a closure with its look-ups done once (the VM's vCPU loop calls it per exit;
        ``bench/exit_bench.py`` measures the path). Port exits, the hottest, are assisted right in the loop."""
        ctx = vmi.vcpus[vcpu]
        if ctx.runner is not None:
            return ctx.runner
        nv, before_entry, handle_exit = ctx.nv, vmi.before_entry, self._exit
        run, assist_io, io, exits = nv.run, nv.assist_io, _IO, ctx.exits
        io_slot = _IO & 0xFFFF
        setreg, rip_reg = regs.setreg, regs.R.VM_REG_GUEST_RIP
        get_ident, get_native_id = threading.get_ident, threading.get_native_id

        def run_vcpu(rip=None):
            ctx.started = True
            ctx.thread, ctx.tid = get_ident(), get_native_id()
            if rip is not None:
                setreg(nv, rip_reg, rip, ctx.extra)
            while True:
                if ctx.pending:
                    r = before_entry(ctx)
                    if r is not None:
                        return r
                ex = run()
                if ex.reason == io:
                    exits[io_slot] += 1
                    assist_io()
                    continue
                r = handle_exit(vmi, ctx, ex, ex.reason)
                if r is not None:
                    return r
        ctx.runner = run_vcpu
        return run_vcpu

    def _exit(self, vmi, ctx, ex, reason):
        """The exits bhyve's kernel handles; returns a VmExit for userland or None to re-enter. A table by NVMM
        exit reason (:meth:`_exit_table`), as bhyve's ``vmexit.c``; a reason not in it goes up as ``VMX``."""
        ctx.exits[reason & 0xFFFF] += 1
        handler = self._handlers.get(reason)
        if handler is None:
            hw = ex.inv.hwcode if reason == C.NVMM_VCPU_EXIT_INVALID else reason
            return ctx.exit_to(E.VM_EXITCODE_VMX, Vmx(status=0, exit_reason=hw))
        return handler(vmi, ctx, ex, reason)

    def _exit_table(self):
        pend = self._exit_pending
        return {
            C.NVMM_VCPU_EXIT_MEMORY: self._exit_mem,
            C.NVMM_VCPU_EXIT_RDMSR: self._msr, C.NVMM_VCPU_EXIT_WRMSR: self._msr,
            C.NVMM_VCPU_EXIT_HALTED: self._halt,
            C.NVMM_VCPU_EXIT_INT_READY: self._exit_int_ready,
            C.NVMM_VCPU_EXIT_NMI_READY: pend, C.NVMM_VCPU_EXIT_NONE: pend,
            C.NVMM_VCPU_EXIT_STOPPED: pend,          # a kick: re-evaluate interrupts and suspension before entry
            C.NVMM_VCPU_EXIT_SHUTDOWN: self._exit_shutdown,
            C.NVMM_VCPU_EXIT_MONITOR: self._exit_ud, C.NVMM_VCPU_EXIT_MWAIT: self._exit_ud,
            C.NVMM_VCPU_EXIT_TPR_CHANGED: self._exit_tpr,
            api.NVMM_VCPU_EXIT_DEBUG: self._exit_debug,
        }

    @staticmethod
    def _exit_debug(vmi, ctx, ex, reason):
        """The provider's guest-debug exit as bhyve's: BPT (RIP at the int3), MTRAP (a step), DB (a debug
        register matched)."""
        dbg = ctx.nv.debug_exit
        if dbg.kind == api.DEBUG_BP:
            return ctx.exit_to(E.VM_EXITCODE_BPT, Bpt(1), inst_length=1)
        if dbg.kind == api.DEBUG_STEP:
            return ctx.exit_to(E.VM_EXITCODE_MTRAP, None)
        return ctx.exit_to(E.VM_EXITCODE_DB, DebugTrap(dbg.dr6, dbg.pc))

    @staticmethod
    def _exit_mem(vmi, ctx, ex, reason):
        """Completed here: the assist calls the kernel devices' page or the VM's MMIO bus (``Vm.mem_callback``)."""
        if not is_kernel_mmio(ex.mem_gpa):
            ctx.bus_mmio += 1
        ctx.nv.assist_mem()
        return None

    @staticmethod
    def _exit_int_ready(vmi, ctx, ex, reason):
        """The guest opened its interrupt window: what waits from here on, the host holds up (ops/edge_merge.py)."""
        ctx.masked = False
        ctx.pending = True
        return None

    @staticmethod
    def _exit_pending(vmi, ctx, ex, reason):
        ctx.pending = True
        return None

    @staticmethod
    def _exit_shutdown(vmi, ctx, ex, reason):
        vmi.suspend(VmSuspendHow.VM_SUSPEND_TRIPLEFAULT)
        return vmi.suspended_exit(ctx)

    @staticmethod
    def _exit_ud(vmi, ctx, ex, reason):
        vmi.inject_exception(ctx.id, C.X86_EXC_UD)
        return None

    @staticmethod
    def _exit_tpr(vmi, ctx, ex, reason):
        """The guest lowered CR8 (KVM's SET_TPR; NVMM's TPR_CHANGED): a vector it held back may be taken now."""
        if ctx.vlapic is not None:
            tpr_from_guest(ctx)
        ctx.pending = True
        return None

    @staticmethod
    def _msr(vmi, ctx, ex, reason):
        nv = ctx.nv
        rd = reason == C.NVMM_VCPU_EXIT_RDMSR
        if rd:
            msr, npc = ex.rdmsr
            wval = None
        else:
            msr, wval, npc = ex.wrmsr
        vl = ctx.vlapic
        apic_on = None
        if vl is not None and msr in TPR_MSRS:
            tpr_from_guest(ctx)
            apic_on = vl.hw_enabled
        try:
            done, value = vmi.kernel_msr(ctx, msr, wval)
        except (ApicGP, kvm_para.PvEoiGP):
            vmi.inject_exception(ctx.id, C.X86_EXC_GP, 0)
            ctx.pending = True
            return None
        if apic_on is not None and vl.hw_enabled != apic_on:       # CPUID.1:EDX.APIC follows APIC_BASE.EN
            nv.configure(C.NVMM_VCPU_CONF_CPUID, leaf1_cpuid(vmi.x2apic, vl.hw_enabled, bool(vl.timer.tsc_hz)))
        if not done:
            return vmi.msr_exit(ctx, rd, msr, wval, npc - 2)
        nv.complete_msr(npc, value if rd else None)
        if rd or msr not in QUIET_WRMSRS:
            ctx.pending = True
        return None

    @staticmethod
    def _halt(vmi, ctx, ex, reason):
        return vmi.handle_hlt(ctx, ex.exitstate.rflags)
