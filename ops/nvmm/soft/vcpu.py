"""An NVMM vCPU on a unicorn engine: the comm-page contract, ``run`` and its exits, events, and the assists.

Follows libnvmm(3) and ``shared/reference/anchors.md`` (b) and (c), with the KVM provider
(``ops/nvmm/kvm/vcpu.py``) as the reference for the semantics. Unicorn holds the CPU between runs; ``getstate``
converts the wanted categories into ``state`` once per exit (cached afterwards), ``setstate`` only marks them and
``run`` commits them (``ucstate.py``). ``run`` executes the guest with ``uc.emu_start`` until a hook asks for an
exit: the code hook stops *before* IN/OUT/INS/OUTS, HLT, RDMSR/WRMSR of MSRs outside NVMM's state, CPUID of
leaves configured to exit, MONITOR/MWAIT, and before the first instruction of an open interrupt window
(``int_window_exiting`` with IF=1 and no STI/MOV SS shadow); unmapped (MMIO) and write-protected accesses stop
before the access; ``stop()`` (any thread) asks the code hook to stop before the next instruction. Exceptions
the guest raises, and events from ``inject()``, are delivered through its IVT/IDT by ``delivery.py``; a fault
delivering #DF is a SHUTDOWN exit.

``assist_io`` is libnvmm's (including REP INS/OUTS in batches of 32 bytes with DF=0, one element with DF=1).
``assist_mem`` completes the instruction in the engine itself: the page of the exit is mapped for one
instruction (one REP iteration) as unicorn MMIO whose reads and writes call the ``mem`` callback (pages of RAM
mapped read-only read RAM and send their writes to the callback); so every instruction unicorn emulates works,
a superset of libnvmm's decoder.

Not supported (``capability().limits``): NMI_READY and TPR_CHANGED exits, NMI blocking, task gates; instruction
fetches from MMIO (a MEMORY exit with prot EXEC whose ``assist_mem`` fails with ENODEV); host writes into guest
code are seen at the next ``run``.
"""

import errno
import threading

from unicorn import (UcError, Uc, UC_ARCH_X86, UC_MODE_64, UC_HOOK_CODE, UC_HOOK_INTR, UC_HOOK_INSN_INVALID,
                     UC_HOOK_MEM_UNMAPPED, UC_HOOK_MEM_WRITE_PROT, UC_HOOK_MEM_FETCH_PROT, UC_MEM_WRITE_UNMAPPED,
                     UC_MEM_FETCH_UNMAPPED, UC_MEM_FETCH_PROT, UC_MEM_WRITE_PROT)
from unicorn import x86_const as X

from .. import api
from .. import constants as C
from ..state import (EXIT_MEM_FMT, EXITSTATE_FMT, OFF_EXITSTATE, INTR_EVT_PENDING, INTR_INT_SHADOW,
                     INTR_INT_WINDOW_EXITING)
from ..x86 import mmu
from . import hooks as H
from . import ucstate as U
from .ucstate import uc_prot
from .delivery import DeliveryFault, deliver
from .assist import assist_io, assist_mem

UNTIL = 0xFFFFFFFFFFFFFFFF
KERNEL_MSRS = H.KERNEL_MSRS
_GPRS, _SEGS, _CRS, _DRS, _MSRS, _INTR, _FPU = (C.NVMM_X64_STATE_GPRS, C.NVMM_X64_STATE_SEGS,
                                                C.NVMM_X64_STATE_CRS, C.NVMM_X64_STATE_DRS,
                                                C.NVMM_X64_STATE_MSRS, C.NVMM_X64_STATE_INTR,
                                                C.NVMM_X64_STATE_FPU)


class SoftVcpu(api.Vcpu):
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
        self._cr8, self._xcr0 = 0, 1
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
        self._hf_cache, self._shadow = 0, False
        self._mem_access = None
        self.stats = {"exits": 0}
        self._reset_state()
        self._install_hooks()

    # -- memory -----------------------------------------------------------------------------------------------
    def map_area(self, gpa, size, prot, hva):
        self.uc.mem_map_ptr(gpa, size, uc_prot(prot), hva)

    def unmap_area(self, gpa, size):
        self.uc.mem_unmap(gpa, size)

    # -- state ------------------------------------------------------------------------------------------------
    def _reset_state(self):
        U.reset_state(self.state)
        self.setstate(C.NVMM_X64_STATE_ALL)

    def getstate(self, flags):
        need = flags & ~self._cached
        if not need:
            return
        uc, st = self.uc, self.state
        if need & _GPRS:
            U.get_gprs(uc, st.gprs)
        if need & (_SEGS | _INTR):
            self.img.load()
            if need & _SEGS:
                U.get_segs(self.img, st)
            if need & _INTR:
                st.intr = self._intr_bits()
        if need & _CRS:
            U.get_crs(uc, st.crs, self._cr8, self._xcr0)
        if need & _DRS:
            U.get_drs(uc, st.drs)
        if need & _MSRS:
            U.get_msrs(uc, st.msrs)
        if need & _FPU:
            U.get_fpu(uc, st.fpu)
        self._cached |= need

    def setstate(self, flags):
        self._commit |= flags
        self._cached |= flags

    def _intr_bits(self, hflags=None):
        hf = self.img.hflags if hflags is None else hflags
        bits = INTR_INT_SHADOW if hf & U.HF_INHIBIT_IRQ else 0
        if self._win:
            bits |= INTR_INT_WINDOW_EXITING
        if self._event is not None:
            bits |= INTR_EVT_PENDING
        return bits

    def _commit_state(self):
        flags, self._commit = self._commit, 0
        uc, st = self.uc, self.state
        if flags & (_CRS | _MSRS):
            crs = st.crs if flags & _CRS else None
            cr0, cr2, cr3, cr4 = (crs[0], crs[1], crs[2], crs[3]) if crs is not None else \
                (uc.reg_read(X.UC_X86_REG_CR0), uc.reg_read(X.UC_X86_REG_CR2), uc.reg_read(X.UC_X86_REG_CR3),
                 uc.reg_read(X.UC_X86_REG_CR4))
            efer = st.msrs[C.NVMM_X64_MSR_EFER] if flags & _MSRS else U.rdmsr(uc, U.MSR_EFER)
            U.set_control(uc, cr0, cr2, cr3, cr4, efer)
            if crs is not None:
                self._cr8, self._xcr0 = crs[C.NVMM_X64_CR_CR8], crs[C.NVMM_X64_CR_XCR0]
            if flags & _MSRS:
                U.set_msrs(uc, st.msrs)
        if flags & _DRS:
            U.set_drs(uc, st.drs)
        if flags & _FPU:
            U.set_fpu(uc, st.fpu)
        if flags & _GPRS:
            U.set_gprs(uc, st.gprs)
        if flags & (_SEGS | _CRS | _MSRS | _INTR):
            img = self.img.load()
            if flags & _SEGS:
                U.set_segs(img, st)
            cr0, cr4 = uc.reg_read(X.UC_X86_REG_CR0), uc.reg_read(X.UC_X86_REG_CR4)
            efer = img.efer & ~C.EFER_LMA
            if efer & C.EFER_LME and cr0 & C.CR0_PG and cr4 & C.CR4_PAE:
                efer |= C.EFER_LMA
            img.efer = efer
            if flags & _INTR:
                bits = st.intr
                self._win = bool(bits & INTR_INT_WINDOW_EXITING)
                img.hflags = (img.hflags & ~U.HF_INHIBIT_IRQ) | (U.HF_INHIBIT_IRQ if bits & INTR_INT_SHADOW else 0)
            img.recompute_hflags(cr0, efer, uc.reg_read(X.UC_X86_REG_RFLAGS))
            img.store()

    def paging_regs(self):
        uc = self.uc
        if self._commit:
            self._commit_state()
        return (uc.reg_read(X.UC_X86_REG_CR0), uc.reg_read(X.UC_X86_REG_CR3), uc.reg_read(X.UC_X86_REG_CR4),
                U.rdmsr(uc, U.MSR_EFER))

    # -- configuration and events -----------------------------------------------------------------------------
    def _configure(self, op, conf):
        if op == C.NVMM_VCPU_CONF_CPUID:
            if not isinstance(conf, api.ConfCpuid):
                raise api.nvmm_error(errno.EINVAL, "NVMM_VCPU_CONF_CPUID takes a ConfCpuid")
            self._cpuid_masks[conf.leaf] = conf
            return
        if op == C.NVMM_VCPU_CONF_TPR:
            raise api.nvmm_error(errno.ENOTSUP, f"the soft provider has no TPR exits ({api.LIMIT_TPR_EXIT!r})")
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
        if self._stop_req:
            self._why = ("stopped",)
            uc.emu_stop()
            return
        first = self._code_bytes(addr, 1)
        if not self._win and (not first or first[0] not in H.INTERESTING):
            return
        hf = self._hf_cache
        insn = H.decode(self._code_bytes(addr, min(size, 15)), bool(hf & U.HF_CS64), bool(hf & U.HF_CS32))
        if self._win:
            if not self._shadow and uc.reg_read(X.UC_X86_REG_EFLAGS) & C.RFLAGS_IF:
                self._why = ("window",)
                uc.emu_stop()
                return
            self._shadow = insn is not None and insn.kind == H.SHADOW
        if insn is None or insn.kind == H.SHADOW:
            return
        if insn.kind in (H.RDMSR, H.WRMSR):
            msr = uc.reg_read(X.UC_X86_REG_ECX)
            if msr in KERNEL_MSRS:
                return
        self._why = ("insn", insn, addr)
        uc.emu_stop()

    def _intr_hook(self, uc, intno, _):
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
        if self._event is not None:
            _, vector, error = self._event
            self._event = None
            if not self._deliver(vector, error):
                return C.NVMM_VCPU_EXIT_SHUTDOWN
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
            reason = self._insn_exit(why[1], why[2])
            if reason is not None:
                return reason

    def _insn_exit(self, insn, rip):
        return H.insn_exit(self, insn, rip)

    def step(self):
        """Executes one instruction (one REP iteration) with no exit checks; unicorn's own ``count`` is not
        used, it runs past MMIO accesses."""
        self._step = False
        try:
            self.uc.emu_start(self.uc.reg_read(X.UC_X86_REG_RIP), UNTIL)
        finally:
            self._step = None

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
