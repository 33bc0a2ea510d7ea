"""The NVMM state categories of a soft vCPU (``getstate``/``setstate``) kept in its unicorn engine.

Follows libnvmm(3)'s comm-page contract as the KVM provider keeps it: ``getstate`` converts the wanted categories
from the engine once per exit (cached afterwards), ``setstate`` only marks them and ``run`` commits them
(:meth:`VcpuState._commit_state`, through ``ucstate.py``). CR8 is the provider's (the TPR, ``sysinsn.py``);
XCR0 is the engine's, written as NVMM's kernel writes it (the offered bits, x87 always set).

Not supported: the categories of ``NVMM_X64_STATE_*`` beyond GPRS, SEGS, CRS, DRS, MSRS, INTR and FPU.
"""

from unicorn import x86_const as X

from .. import constants as C
from ..state import INTR_EVT_PENDING, INTR_INT_SHADOW, INTR_INT_WINDOW_EXITING
from . import ucstate as U
from .cpuid import XCR0_SUPPORTED

_GPRS, _SEGS, _CRS, _DRS, _MSRS, _INTR, _FPU = (C.NVMM_X64_STATE_GPRS, C.NVMM_X64_STATE_SEGS,
                                                C.NVMM_X64_STATE_CRS, C.NVMM_X64_STATE_DRS,
                                                C.NVMM_X64_STATE_MSRS, C.NVMM_X64_STATE_INTR,
                                                C.NVMM_X64_STATE_FPU)
CR8_MASK = 0xF
XCR0_X87 = 1


class VcpuState:
    """The state half of :class:`ops.nvmm.soft.vcpu.SoftVcpu` (``uc``, ``img``, ``state`` and the flags are
    the vCPU's)."""

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
            U.get_crs(uc, st.crs, self._cr8, self.img.load().xcr0)
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

    def queued_event(self):
        """The event ``inject`` queued that no run delivered yet (a run delivers it before it looks at a stop)."""
        return self._event

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
                self._cr8 = crs[C.NVMM_X64_CR_CR8] & CR8_MASK
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
            if flags & _CRS:       # as NVMM's kernel: the bits the CPU offers, x87 always
                img.xcr0 = st.crs[C.NVMM_X64_CR_XCR0] & XCR0_SUPPORTED | XCR0_X87
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
