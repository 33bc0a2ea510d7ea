"""An NVMM vCPU on a unicorn engine: the comm-page contract, ``run`` and its exits, events, and the assists.

Follows libnvmm(3) and ``shared/reference/anchors.md`` (b) and (c), with the KVM provider
(``ops/nvmm/kvm/vcpu.py``) as the reference for the semantics. Unicorn holds the CPU between runs; the state
categories are ``vstate.py``'s. ``run`` executes the guest with ``uc.emu_start`` until a hook asks for an exit:
the code hook stops *before* IN/OUT/INS/OUTS, HLT, RDMSR/WRMSR of MSRs outside NVMM's state, CPUID of leaves
configured to exit, MONITOR/MWAIT, a write of CR8 with ``NVMM_VCPU_CONF_TPR`` (TPR_CHANGED, after it), and before
the first instruction of an open interrupt window (``int_window_exiting`` with IF=1 and no STI/MOV SS shadow);
it decodes with the mode of the run's start and reads the instruction's mode and CPL from the engine before it
acts on one (a far jump may have changed them within the run; a byte that is REX or VEX only in 64-bit mode is
decoded again too), and completes SYSCALL, SYSENTER, XSETBV, MOV CR8, VEX #UD and the canonical check of
LGDT/LIDT/LLDT/LTR itself (``sysinsn.py``).
Unmapped (MMIO) and write-protected accesses stop before the access; ``stop()`` (any thread) asks the code hook
to stop before the next instruction. Exceptions the guest raises, and events from ``inject()``, are delivered
through its IVT/IDT by ``delivery.py``; a fault delivering #DF is a SHUTDOWN exit. With RFLAGS.TF set, an
instruction the provider completes or exits on is followed by the single-step #DB trap (Intel SDM vol. 3B
17.3.1.4, DR6.BS), after the VMM completed it: at the next ``run`` when RIP is the exit's ``npc``.

``assist_io`` is libnvmm's (including REP INS/OUTS in batches of 32 bytes with DF=0, one element with DF=1).
``assist_mem`` completes the instruction in the engine itself: the page of the exit is mapped for one
instruction (one REP iteration) as unicorn MMIO whose reads and writes call the ``mem`` callback (pages of RAM
mapped read-only read RAM and send their writes to the callback); so every instruction unicorn emulates works,
a superset of libnvmm's decoder.

Not supported (``capability().limits``): NMI_READY exits, NMI blocking, task gates; instruction fetches from
MMIO (a MEMORY exit with prot EXEC whose ``assist_mem`` fails with ENODEV); host writes into guest code are seen
at the next ``run``; a single-step trap after each batch of a REP INS/OUTS (one after the last).
"""

import errno
import threading

from unicorn import (UcError, Uc, UC_ARCH_X86, UC_MODE_64, UC_HOOK_CODE, UC_HOOK_INTR, UC_HOOK_INSN_INVALID,
                     UC_HOOK_MEM_UNMAPPED, UC_HOOK_MEM_WRITE_PROT, UC_HOOK_MEM_FETCH_PROT, UC_MEM_WRITE_UNMAPPED,
                     UC_MEM_FETCH_UNMAPPED, UC_MEM_FETCH_PROT, UC_MEM_WRITE_PROT)
from unicorn import x86_const as X

from .. import api
from .. import constants as C
from ..state import EXIT_MEM_FMT, EXITSTATE_FMT, OFF_EXITSTATE
from ..x86 import mmu
from . import debug as D
from . import hooks as H
from . import sysinsn as S
from . import ucstate as U
from .ucstate import uc_prot
from .delivery import DeliveryFault, deliver
from .assist import assist_io, assist_mem
from .vstate import VcpuState

UNTIL = 0xFFFFFFFFFFFFFFFF
KERNEL_MSRS = H.KERNEL_MSRS
DR6_BS = 1 << 14


class SoftVcpu(VcpuState, api.Vcpu):
    def __init__(self, machine, cpuid):
        super().__init__(machine, cpuid)
        self.uc = Uc(UC_ARCH_X86, UC_MODE_64)
        # With an "until" address unicorn walks the guest's page tables for it before each start, and a failed
        # walk writes CR2; an empty exit list avoids that (the run ends through hooks only).
        self.uc.ctl_exits_enabled(True)
        self.uc.ctl_set_exits([])
        self.img = U.CpuImage(self.uc)
        self.answered = 0               # published port reads the instruction hook answered (hooks.insn_exit)
        self._cached = 0
        self._commit = 0
        self._cr8 = 0                   # the TPR's class (CR8 is the provider's: sysinsn.mov_cr8)
        self._tpr_exit = False          # NVMM_VCPU_CONF_TPR exit_changed
        self._trap_at = None            # npc of an exit taken with TF set: the #DB trap comes when RIP is there
        self._win = False               # int_window_exiting
        self._event = None              # (type, vector, error) queued by inject()
        self._cpuid_masks = {}
        self._stop_req = False
        self._lock = threading.Lock()
        self._why = None                # what stopped the engine: a tuple set by a hook
        self._step = None               # single-stepping (see step()): False before the first instruction
        self._assisting = None          # {page: (area, view)} mapped over scratch pages while assist_mem steps
        self._scratch = None
        self._pages = {}                # linear page -> memoryview of host memory, for the code hook
        self._paging = (0, 0, 0, 0)
        self._hf_cache, self._shadow = 0, False     # the translation flags the code hook decodes with
        self._mem_access = None
        self.dbg = D.DebugState()       # set_guest_debug (debug.py)
        self.stats = {"exits": 0}
        self._reset_state()
        self._install_hooks()

    # -- memory -----------------------------------------------------------------------------------------------
    def map_area(self, gpa, size, prot, hva):
        self.uc.mem_map_ptr(gpa, size, uc_prot(prot), hva)

    def unmap_area(self, gpa, size):
        self.uc.mem_unmap(gpa, size)

    # -- configuration and events -----------------------------------------------------------------------------
    def guest_cpuid(self, leaf, index=0):
        """vmmshim's extension: what the guest's CPUID answers for ``leaf``/``index`` (as the code hook does)."""
        return tuple(H.filter_cpuid(leaf, H.model_cpuid(leaf, index), self.cpuid, self._cpuid_masks, index))

    def _configure(self, op, conf):
        if op == C.NVMM_VCPU_CONF_CPUID:
            if not isinstance(conf, api.ConfCpuid):
                raise api.nvmm_error(errno.EINVAL, "NVMM_VCPU_CONF_CPUID takes a ConfCpuid")
            self._cpuid_masks[conf.leaf] = conf
            return
        if op == C.NVMM_VCPU_CONF_TPR:
            if not isinstance(conf, api.ConfTpr):
                raise api.nvmm_error(errno.EINVAL, "NVMM_VCPU_CONF_TPR takes a ConfTpr")
            self._tpr_exit = bool(conf.exit_changed)
            return
        raise api.nvmm_error(errno.EINVAL, f"vCPU configuration op {op} is not supported")

    def inject(self):
        type_, vector, error = self.event.get()
        if type_ == C.NVMM_VCPU_EVENT_INTR:
            self._event = (type_, vector, None)
            return
        if type_ != C.NVMM_VCPU_EVENT_EXCP:
            raise api.nvmm_error(errno.EINVAL, f"unknown event type {type_}")
        if vector >= 32 or vector in C.NVMM_EXCP_REFUSED:
            raise api.nvmm_error(errno.EINVAL, f"exception vector {vector} cannot be injected")
        self._event = (type_, vector, error & 0xFFFFFFFF if vector in C.X86_EXC_HAS_ERROR else None)

    def _deliver(self, vector, error=None, soft=False):
        """Delivers an event; returns False after a triple fault."""
        try:
            deliver(self, vector, error, soft)
            return True
        except DeliveryFault:
            pass
        try:
            deliver(self, C.X86_EXC_DF, 0)
            return True
        except DeliveryFault:
            return False

    # -- hooks ------------------------------------------------------------------------------------------------
    def _install_hooks(self):
        uc = self.uc
        uc.hook_add(UC_HOOK_CODE, self._code_hook)
        uc.hook_add(UC_HOOK_INTR, self._intr_hook)
        uc.hook_add(UC_HOOK_INSN_INVALID, self._invalid_hook)
        uc.hook_add(UC_HOOK_MEM_UNMAPPED, self._mem_hook)
        uc.hook_add(UC_HOOK_MEM_WRITE_PROT | UC_HOOK_MEM_FETCH_PROT, self._mem_hook)

    def _code_bytes(self, addr, size):
        out = b""
        while size > 0:
            page = addr >> 12
            view = self._pages.get(page)
            if view is None:
                try:
                    cr0, cr3, cr4, efer = self._paging
                    gpa = mmu.gva_to_gpa(self.machine.read_phys, cr0, cr3, cr4, efer, page << 12)[0]
                    view = self.machine.gpa_view(gpa, 4096)
                except OSError:
                    return out
                self._pages[page] = view
            off = addr & 0xFFF
            k = min(size, 4096 - off)
            out += bytes(view[off:off + k])
            addr, size = addr + k, size - k
        return out

    def _code_hook(self, uc, addr, size, _):
        if self._step is not None:          # single step: run the first instruction, stop before the next
            if self._step:
                uc.emu_stop()
            self._step = True
            return
        if self.dbg.hooked and D.code_hook(self, uc, addr):
            return
        if self._stop_req:
            self._why = ("stopped",)
            uc.emu_stop()
            return
        first = self._code_bytes(addr, 1)
        if not self._win and (not first or first[0] not in H.INTERESTING):
            return
        code = self._code_bytes(addr, min(size, 15))
        hf = self._hf_cache
        insn = H.decode(code, bool(hf & U.HF_CS64), bool(hf & U.HF_CS32), bool(hf & U.HF_PE))
        if insn is not None or (not hf & U.HF_CS64 and first and first[0] in H.MODE_SENSITIVE):
            # the mode and CPL this instruction runs in: a far transfer may have changed them since the cache
            hf = self._hf_cache = self.img.load().hflags
            insn = H.decode(code, bool(hf & U.HF_CS64), bool(hf & U.HF_CS32), bool(hf & U.HF_PE))
        if self._win:
            if not self._shadow and uc.reg_read(X.UC_X86_REG_EFLAGS) & C.RFLAGS_IF:
                self._why = ("window",)
                uc.emu_stop()
                return
            self._shadow = insn is not None and insn.kind == H.SHADOW
        if insn is None or insn.kind == H.SHADOW:
            return
        rip = uc.reg_read(X.UC_X86_REG_RIP)     # the instruction pointer (addr is CS.base + it)
        if insn.kind in (H.RDMSR, H.WRMSR):
            msr = uc.reg_read(X.UC_X86_REG_ECX)
            if msr in KERNEL_MSRS:
                if insn.kind == H.WRMSR and H.kept_wrmsr_refused(self, msr, rip):
                    uc.emu_stop()           # before it: the #GP the policy asks for
                return
        self._why = ("insn", insn, rip, hf)
        uc.emu_stop()

    def _intr_hook(self, uc, intno, _):
        if D.intr_hook(self, uc, intno):
            return
        error, is_int, _ = self.img.load().exception()
        self._why = ("exc", intno, error & 0xFFFFFFFF, bool(is_int), uc.reg_read(X.UC_X86_REG_RIP))
        uc.emu_stop()

    def _invalid_hook(self, uc, _):
        self._why = ("exc", C.X86_EXC_UD, 0, False, uc.reg_read(X.UC_X86_REG_RIP))
        return False

    def _mem_hook(self, uc, access, address, size, value, _):
        if self._assisting is not None and access != UC_MEM_FETCH_UNMAPPED:
            return self._assist_map(address)
        prot = {UC_MEM_WRITE_UNMAPPED: C.NVMM_PROT_WRITE, UC_MEM_WRITE_PROT: C.NVMM_PROT_WRITE,
                UC_MEM_FETCH_UNMAPPED: C.NVMM_PROT_EXEC, UC_MEM_FETCH_PROT: C.NVMM_PROT_EXEC}.get(access,
                                                                                             C.NVMM_PROT_READ)
        self._why = ("mem", address, prot, size)
        return False

    # -- guest debugging (debug.py) ----------------------------------------------------------------------------
    def set_guest_debug(self, step=False, sw_bp=False, hw=()):
        self.dbg.configure(step, sw_bp, hw)

    def inject_bp(self):
        self.dbg.inject_bp = True

    # -- run --------------------------------------------------------------------------------------------------
    def stop(self):
        # Only the request: the code hook, called before every instruction on the vCPU's own thread, sees it and
        # stops there. An emu_stop() from the kicking thread would land inside a translation block at no instruction
        # boundary unicorn promises: under load one re-ran an instruction whose memory write had already
        # happened (a guest's "addq $2, (%rsp)" twice, and a triple fault).
        with self._lock:
            self._stop_req = True

    def clear_stop(self):
        with self._lock:
            self._stop_req = False

    def answered_io(self):
        return self.answered

    def run(self):
        if self.destroyed:
            raise api.nvmm_error(errno.ENOENT, "vCPU destroyed")
        if self._commit:
            self._commit_state()
        self._cached = 0
        self.uc.ctl_flush_tb()
        self._pages.clear()
        ex = self.exit
        reason = self._run_loop()
        ex.reason = reason
        ex.buf[0:8] = reason.to_bytes(8, "little")
        self.img.load()
        EXITSTATE_FMT.pack_into(ex.buf, OFF_EXITSTATE, self.uc.reg_read(X.UC_X86_REG_RFLAGS), self._cr8,
                                self._intr_bits())
        self.stats["exits"] += 1
        return ex

    def _run_loop(self):
        uc, ex = self.uc, self.exit
        trap, self._trap_at = self._trap_at, None
        if trap is not None and uc.reg_read(X.UC_X86_REG_RIP) == trap and not self._single_step_trap():
            return C.NVMM_VCPU_EXIT_SHUTDOWN
        if self._event is not None:
            _, vector, error = self._event
            self._event = None
            if not self._deliver(vector, error):
                return C.NVMM_VCPU_EXIT_SHUTDOWN
        dbg = D.before_run(self, uc)
        if dbg is not None:
            self.debug_exit = dbg
            return api.NVMM_VCPU_EXIT_DEBUG
        while True:
            with self._lock:
                if self._stop_req:
                    self._stop_req = False
                    return C.NVMM_VCPU_EXIT_STOPPED
            self._hf_cache = self.img.load().hflags
            self._shadow = bool(self._hf_cache & U.HF_INHIBIT_IRQ)
            if self._win and not self._shadow and uc.reg_read(X.UC_X86_REG_EFLAGS) & C.RFLAGS_IF:
                self._win = False
                return C.NVMM_VCPU_EXIT_INT_READY
            self._paging = self.paging_regs()
            self._why = None
            err = None
            try:
                uc.emu_start(uc.reg_read(X.UC_X86_REG_RIP), UNTIL)
            except UcError as exc:
                err = exc
            why = self._why
            if why is None:
                if err is None:
                    continue            # a stop() that raced with the hook, or unicorn's own HLT: look again
                ex.buf[8:16] = err.errno.to_bytes(8, "little")
                return C.NVMM_VCPU_EXIT_INVALID
            kind = why[0]
            if kind == "stopped":
                self._stop_req = False
                return C.NVMM_VCPU_EXIT_STOPPED
            if kind == "window":
                self._win = False
                return C.NVMM_VCPU_EXIT_INT_READY
            if kind == "debug":
                self.debug_exit = api.ExitDebug(*why[1:])
                return api.NVMM_VCPU_EXIT_DEBUG
            if kind == "mem":
                EXIT_MEM_FMT.pack_into(ex.buf, 8, why[2], why[1], 0, bytes(15))
                self._mem_access = why
                return C.NVMM_VCPU_EXIT_MEMORY
            if kind == "exc":
                _, vector, error, soft, rip = why
                uc.reg_write(X.UC_X86_REG_RIP, rip)
                if not self._deliver(vector, error if vector in C.X86_EXC_HAS_ERROR and not soft else None, soft):
                    return C.NVMM_VCPU_EXIT_SHUTDOWN
                continue
            reason = self._insn_exit(*why[1:])
            if reason is not None:
                return reason

    def _insn_exit(self, insn, rip, hf):
        """The exit for the instruction the code hook stopped at, or None after the provider completed it (or
        delivered the fault it raises); with TF set, the single-step trap after it, or its place for the next
        run."""
        uc = self.uc
        tf = uc.reg_read(X.UC_X86_REG_EFLAGS) & C.RFLAGS_TF
        if insn.kind in H.EMULATED:
            out = S.EMULATE[insn.kind](self, insn, rip, hf)
        else:
            out = H.insn_exit(self, insn, rip, hf)
        if isinstance(out, H.Fault):
            uc.reg_write(X.UC_X86_REG_RIP, rip)
            return None if self._deliver(out.vector, out.error) else C.NVMM_VCPU_EXIT_SHUTDOWN
        if out is not None and self.dbg.step:
            self.dbg.done_at = H.next_ip(rip, insn.length, hf)
        if tf:
            if out is None:
                return None if self._single_step_trap() else C.NVMM_VCPU_EXIT_SHUTDOWN
            self._trap_at = H.next_ip(rip, insn.length, hf)
        return out

    def _single_step_trap(self):
        """#DB for RFLAGS.TF after an instruction the provider completed; False after a triple fault."""
        uc = self.uc
        uc.reg_write(X.UC_X86_REG_DR6, uc.reg_read(X.UC_X86_REG_DR6) | DR6_BS)
        return self._deliver(C.X86_EXC_DB)

    def step(self):
        """Executes one instruction (one REP iteration) with no exit checks; unicorn's own ``count`` is not
        used, it runs past MMIO accesses."""
        self._step = False
        try:
            self.uc.emu_start(self.uc.reg_read(X.UC_X86_REG_RIP), UNTIL)
        finally:
            self._step = None

    def step_insn(self):
        """:meth:`step` for an instruction the provider lets unicorn complete: the :class:`hooks.Fault` it
        raised, or None (a single-step trap is the caller's)."""
        self._why = None
        self.step()
        why, self._why = self._why, None
        if why is None or why[0] != "exc" or why[1] == C.X86_EXC_DB:
            return None
        _, vector, error, soft, _ = why
        return H.Fault(vector, error if vector in C.X86_EXC_HAS_ERROR and not soft else None)

    # -- assists ----------------------------------------------------------------------------------------------
    def assist_io(self):
        assist_io(self)

    def assist_mem(self):
        assist_mem(self)

    def _assist_map(self, gpa):
        from .assist import map_mmio_page
        return map_mmio_page(self, gpa)

    def _destroy(self):
        self.run = _destroyed


def _destroyed(*_):
    raise api.nvmm_error(errno.ENOENT, "vCPU destroyed")
