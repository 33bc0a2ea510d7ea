"""NVMM's state categories on a unicorn x86-64 CPU: conversion both ways, and unicorn's hidden CPU state.

Unicorn (QEMU's TCG) keeps the hidden parts of the segment registers (base, limit, attributes) and the
translation flags (``hflags``: CPL, CS32/SS32/CS64, ADDSEG, LMA, the STI/MOV SS interrupt shadow) in its
``CPUX86State``; its register API can only set a selector (in 64-bit mode) or load one from the GDT. NVMM state
names every hidden part, so this module reads and writes them in the CPU context image that
``uc_context_save``/``uc_context_restore`` copy: the offsets of ``segs``, ``ldt``, ``tr``, ``gdt``, ``idt`` and
``hflags`` follow QEMU 5's ``CPUX86State`` (``target/i386/cpu.h``) and are checked against this libunicorn when
the provider opens (:func:`probe_layout`, which also finds ``error_code`` by raising a #GP). No shadow GDT is
needed: the caches are written directly, then ``hflags`` is recomputed as QEMU's ``cpu_x86_load_seg_cache`` does.

Control registers and EFER go through the register API in an order that makes QEMU compute EFER.LMA itself
(CR0.PG cleared, EFER, CR4, CR3, then CR0). Index orders are NVMM's (``constants.NVMM_X64_*``). Guest memory
protections too: :func:`uc_prot` turns ``NVMM_PROT_*`` into ``UC_PROT_*`` for the provider, the vCPU and the
assists, which all map guest pages.

XCR0 is unicorn's ``env.xcr0`` (found by executing XSETBV when the provider opens); CR8 is the provider's
(unicorn keeps no TPR behind it).

Not supported: the XSAVE area beyond FXSAVE, a guest's own MSR_TSC offsetting.
"""

import ctypes
import struct

from unicorn import (UcError, Uc, UC_ARCH_X86, UC_MODE_64, UC_PROT_ALL, UC_PROT_EXEC, UC_PROT_READ, UC_PROT_WRITE,
                     UC_HOOK_INTR)
from unicorn import x86_const as X

from .. import constants as C

# CPUX86State offsets (from regs[0]); QEMU 5 / unicorn 2 layout, verified by probe_layout().
ENV_EIP, ENV_EFLAGS, ENV_HFLAGS, ENV_SEGS = 128, 136, 176, 184
ENV_LDT, ENV_TR, ENV_GDT, ENV_IDT = 328, 352, 376, 400
SEGCACHE = struct.Struct("<I4xQII")       # selector, base, limit, flags
HF_CPL_MASK, HF_INHIBIT_IRQ = 0x3, 1 << 3
HF_CS32, HF_SS32, HF_ADDSEG, HF_PE, HF_LMA, HF_CS64 = 1 << 4, 1 << 5, 1 << 6, 1 << 7, 1 << 14, 1 << 15
DESC_B, DESC_L = 1 << 22, 1 << 21

#: NVMM segment index -> unicorn selector register (ES CS SS DS FS GS) and QEMU's R_* index.
SEG_QEMU = {C.NVMM_X64_SEG_ES: 0, C.NVMM_X64_SEG_CS: 1, C.NVMM_X64_SEG_SS: 2, C.NVMM_X64_SEG_DS: 3,
            C.NVMM_X64_SEG_FS: 4, C.NVMM_X64_SEG_GS: 5}
GPR_REGS = (X.UC_X86_REG_RAX, X.UC_X86_REG_RCX, X.UC_X86_REG_RDX, X.UC_X86_REG_RBX, X.UC_X86_REG_RSP,
            X.UC_X86_REG_RBP, X.UC_X86_REG_RSI, X.UC_X86_REG_RDI, X.UC_X86_REG_R8, X.UC_X86_REG_R9,
            X.UC_X86_REG_R10, X.UC_X86_REG_R11, X.UC_X86_REG_R12, X.UC_X86_REG_R13, X.UC_X86_REG_R14,
            X.UC_X86_REG_R15, X.UC_X86_REG_RIP, X.UC_X86_REG_RFLAGS)
DR_REGS = (X.UC_X86_REG_DR0, X.UC_X86_REG_DR1, X.UC_X86_REG_DR2, X.UC_X86_REG_DR3, X.UC_X86_REG_DR6,
           X.UC_X86_REG_DR7)
MSR_EFER = 0xC0000080
#: NVMM msrs[] index -> MSR number (EFER is handled apart).
MSR_NUMBERS = (MSR_EFER, 0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084, 0xC0000102, 0x174, 0x175, 0x176,
               0x277, 0x10)


CR4_OSXSAVE = 1 << 18
XCR0_X87, XCR0_SSE = 1, 2
XSETBV_HLT = bytes.fromhex("0f01d1f4")


class Layout:
    """Where the context image keeps what the register API cannot reach (found by :func:`probe_layout`)."""
    base = None          # offset of env.regs[0] inside the uc_context blob
    error_code = None    # offset of env.error_code inside the blob
    efer = None          # offset of env.efer inside the blob
    xcr0 = None          # offset of env.xcr0 inside the blob


def uc_prot(prot):
    """``NVMM_PROT_*`` bits as unicorn's ``UC_PROT_*``."""
    out = 0
    if prot & C.NVMM_PROT_READ:
        out |= UC_PROT_READ
    if prot & C.NVMM_PROT_WRITE:
        out |= UC_PROT_WRITE
    if prot & C.NVMM_PROT_EXEC:
        out |= UC_PROT_EXEC
    return out


def probe_layout():
    """Checks the ``CPUX86State`` offsets against this libunicorn; returns ``None`` or why they do not fit."""
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.reg_write(X.UC_X86_REG_RAX, 0x5AFE5AFE12345678)
    uc.reg_write(X.UC_X86_REG_LDTR, (0x1238, 0x1122334455667788, 0xABCDE, 0x00C0F300))
    raw = bytes(uc.context_save())
    base = raw.find(struct.pack("<Q", 0x5AFE5AFE12345678))
    if base < 0 or SEGCACHE.unpack_from(raw, base + ENV_LDT) != (0x1238, 0x1122334455667788, 0xABCDE, 0x00C0F300):
        return "libunicorn's CPUX86State layout is not QEMU 5's (segment caches not where expected)"
    # error_code: load DS with selector 0x1238 past a tiny GDT limit -> #GP(0x1238)
    uc.mem_map(0, 0x2000, UC_PROT_ALL)
    uc.mem_write(0x1000, bytes.fromhex("8ed8f4"))          # mov %eax,%ds ; hlt
    uc.reg_write(X.UC_X86_REG_RAX, 0x1238)
    uc.reg_write(X.UC_X86_REG_GDTR, (0, 0x800, 0x17, 0))
    found = []

    def hook(uc, intno, _):
        blob = bytes(uc.context_save())
        found.extend(i for i in range(base + ENV_IDT, len(blob) - 16, 4)
                     if intno == 13 and struct.unpack_from("<I", blob, i)[0] == 0x1238)
        uc.emu_stop()
    uc.hook_add(UC_HOOK_INTR, hook)
    try:
        uc.emu_start(0x1000, 0x1003)
    except UcError:
        pass
    if not found:
        return "cannot locate error_code in libunicorn's CPUX86State"
    cands = None
    for value in (C.EFER_SCE | C.EFER_LME, C.EFER_LME):
        wrmsr(uc, MSR_EFER, value)
        blob, efer = bytes(uc.context_save()), rdmsr(uc, MSR_EFER)
        here = {i for i in range(base + ENV_IDT + 24, len(blob) - 8, 8) if struct.unpack_from("<Q", blob, i)[0] == efer}
        cands = here if cands is None else cands & here
    if len(cands or ()) != 1:
        return "cannot locate efer in libunicorn's CPUX86State"
    Layout.base, Layout.error_code, Layout.efer = base, found[0], cands.pop()
    Layout.xcr0 = _probe_xcr0()
    if Layout.xcr0 is None:
        return "cannot locate xcr0 in libunicorn's CPUX86State"
    return None


def _probe_xcr0():
    """The offset of ``env.xcr0``: the one 8-byte field past the registers that follows XSETBVs of x87|SSE,
    x87, x87|SSE (on a fresh engine, whose CR4 has OSXSAVE)."""
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0, 0x2000, UC_PROT_ALL)
    uc.reg_write(X.UC_X86_REG_CR4, uc.reg_read(X.UC_X86_REG_CR4) | CR4_OSXSAVE)
    uc.mem_write(0x1000, XSETBV_HLT)
    cands = None
    for value in (XCR0_X87 | XCR0_SSE, XCR0_X87, XCR0_X87 | XCR0_SSE):
        uc.reg_write_batch([(X.UC_X86_REG_RAX, value), (X.UC_X86_REG_RCX, 0), (X.UC_X86_REG_RDX, 0)])
        try:
            uc.emu_start(0x1000, 0x1000 + len(XSETBV_HLT) - 1)
        except UcError:
            return None
        blob = bytes(uc.context_save())
        here = {i for i in range(Layout.base + ENV_IDT + 24, len(blob) - 8, 8)
                if struct.unpack_from("<Q", blob, i)[0] == value}
        cands = here if cands is None else cands & here
    return cands.pop() if len(cands) == 1 else None


def attrib_to_flags(attrib):
    """NVMM ``attrib`` (type, S, DPL, P, AVL, L, DEF, G from bit 0) -> QEMU descriptor flags (e2 layout)."""
    return ((attrib & 0xFF) << 8) | (((attrib >> 8) & 0xF) << 20)


def flags_to_attrib(flags):
    return ((flags >> 8) & 0xFF) | (((flags >> 20) & 0xF) << 8)


class CpuImage:
    """A reusable ``uc_context`` of one vCPU whose hidden fields are read and patched in place."""

    def __init__(self, uc):
        self.uc = uc
        self.ctx = uc.context_save()
        ptr = self.ctx.context
        self.buf = (ctypes.c_char * self.ctx.size).from_address(getattr(ptr, "value", ptr))
        self.mv = memoryview(self.buf).cast("B")
        self.b = Layout.base

    def load(self):
        self.uc.context_update(self.ctx)
        return self

    def store(self):
        self.uc.context_restore(self.ctx)

    def seg(self, off):
        return SEGCACHE.unpack_from(self.mv, self.b + off)

    def set_seg(self, off, sel, base, limit, flags):
        SEGCACHE.pack_into(self.mv, self.b + off, sel & 0xFFFF, base & 0xFFFFFFFFFFFFFFFF, limit & 0xFFFFFFFF,
                           flags & 0xFFFFFFFF)

    @property
    def hflags(self):
        return struct.unpack_from("<I", self.mv, self.b + ENV_HFLAGS)[0]

    @hflags.setter
    def hflags(self, value):
        struct.pack_into("<I", self.mv, self.b + ENV_HFLAGS, value & 0xFFFFFFFF)

    @property
    def efer(self):
        return struct.unpack_from("<Q", self.mv, Layout.efer)[0]

    @efer.setter
    def efer(self, value):
        struct.pack_into("<Q", self.mv, Layout.efer, value)

    @property
    def xcr0(self):
        return struct.unpack_from("<Q", self.mv, Layout.xcr0)[0]

    @xcr0.setter
    def xcr0(self, value):
        struct.pack_into("<Q", self.mv, Layout.xcr0, value)

    def exception(self):
        """``(error_code, is_int, next_eip)`` of the exception unicorn is raising."""
        return struct.unpack_from("<iiQ", self.mv, Layout.error_code)

    def recompute_hflags(self, cr0, efer, eflags):
        """CPL, CS32, SS32, CS64, ADDSEG, PE and LMA from the caches, as ``cpu_x86_load_seg_cache``."""
        cs_flags = self.seg(ENV_SEGS + 24)[3]
        ss_flags = self.seg(ENV_SEGS + 48)[3]
        hf = self.hflags & ~(HF_CPL_MASK | HF_CS32 | HF_SS32 | HF_CS64 | HF_ADDSEG | HF_PE | HF_LMA)
        if cr0 & C.CR0_PE:
            hf |= HF_PE | ((ss_flags >> 13) & 3)
        if efer & C.EFER_LMA:
            hf |= HF_LMA
        if hf & HF_LMA and cs_flags & DESC_L:
            hf |= HF_CS32 | HF_SS32 | HF_CS64
        else:
            hf |= HF_CS32 if cs_flags & DESC_B else 0
            hf |= HF_SS32 if ss_flags & DESC_B else 0
            if not cr0 & C.CR0_PE or eflags & (1 << 17) or not hf & HF_CS32:
                hf |= HF_ADDSEG
            elif any(self.seg(ENV_SEGS + 24 * r)[1] for r in (0, 2, 3)):
                hf |= HF_ADDSEG
        self.hflags = hf


# -- categories ------------------------------------------------------------------------------------------------
def get_gprs(uc, gprs):
    gprs[0:18] = memoryview(struct.pack("<18Q", *uc.reg_read_batch(GPR_REGS))).cast("Q")


def set_gprs(uc, gprs):
    uc.reg_write_batch(list(zip(GPR_REGS, gprs.tolist())))


def get_segs(img, st):
    for i, r in SEG_QEMU.items():
        sel, base, limit, flags = img.seg(ENV_SEGS + 24 * r)
        st.segs[i].set(sel, flags_to_attrib(flags), limit, base)
    for i, off in ((C.NVMM_X64_SEG_GDT, ENV_GDT), (C.NVMM_X64_SEG_IDT, ENV_IDT), (C.NVMM_X64_SEG_LDT, ENV_LDT),
                   (C.NVMM_X64_SEG_TR, ENV_TR)):
        sel, base, limit, flags = img.seg(off)
        st.segs[i].set(sel, flags_to_attrib(flags), limit, base)


def set_segs(img, st):
    for i, r in SEG_QEMU.items():
        sel, attrib, limit, base = st.segs[i].get()
        img.set_seg(ENV_SEGS + 24 * r, sel, base, limit, attrib_to_flags(attrib))
    for i, off in ((C.NVMM_X64_SEG_GDT, ENV_GDT), (C.NVMM_X64_SEG_IDT, ENV_IDT), (C.NVMM_X64_SEG_LDT, ENV_LDT),
                   (C.NVMM_X64_SEG_TR, ENV_TR)):
        sel, attrib, limit, base = st.segs[i].get()
        img.set_seg(off, sel, base, limit, attrib_to_flags(attrib))


def rdmsr(uc, msr):
    return uc.reg_read(X.UC_X86_REG_MSR, msr)


def wrmsr(uc, msr, value):
    uc.reg_write(X.UC_X86_REG_MSR, (msr, value & 0xFFFFFFFFFFFFFFFF))


def get_crs(uc, crs, cr8, xcr0):
    crs[C.NVMM_X64_CR_CR0] = uc.reg_read(X.UC_X86_REG_CR0)
    crs[C.NVMM_X64_CR_CR2] = uc.reg_read(X.UC_X86_REG_CR2)
    crs[C.NVMM_X64_CR_CR3] = uc.reg_read(X.UC_X86_REG_CR3)
    crs[C.NVMM_X64_CR_CR4] = uc.reg_read(X.UC_X86_REG_CR4)
    crs[C.NVMM_X64_CR_CR8] = cr8
    crs[C.NVMM_X64_CR_XCR0] = xcr0


def set_control(uc, cr0, cr2, cr3, cr4, efer):
    """CR0/CR2/CR3/CR4 and EFER in the order that lets QEMU derive EFER.LMA (and flush its TLB)."""
    uc.reg_write(X.UC_X86_REG_CR0, cr0 & ~C.CR0_PG & 0xFFFFFFFF)
    wrmsr(uc, MSR_EFER, efer & ~C.EFER_LMA)
    uc.reg_write(X.UC_X86_REG_CR4, cr4)
    uc.reg_write(X.UC_X86_REG_CR3, cr3)
    uc.reg_write(X.UC_X86_REG_CR2, cr2)
    uc.reg_write(X.UC_X86_REG_CR0, cr0)


def get_drs(uc, drs):
    for i, r in enumerate(DR_REGS):
        drs[i] = uc.reg_read(r)


def set_drs(uc, drs):
    for i, r in enumerate(DR_REGS):
        uc.reg_write(r, drs[i])


def get_msrs(uc, msrs):
    for i, m in enumerate(MSR_NUMBERS):
        msrs[i] = rdmsr(uc, m)


def set_msrs(uc, msrs):
    """All but EFER (written with the control registers)."""
    for i, m in enumerate(MSR_NUMBERS[1:], 1):
        wrmsr(uc, m, msrs[i])


# -- FPU: the FXSAVE image (SDM vol. 1, table 10-2) --------------------------------------------------------------
def _abridged(ftw):
    return sum(1 << i for i in range(8) if (ftw >> (2 * i)) & 3 != 3)


def get_fpu(uc, fx):
    fcw = uc.reg_read(X.UC_X86_REG_FPCW)
    fsw = uc.reg_read(X.UC_X86_REG_FPSW)
    ftw = _abridged(uc.reg_read(X.UC_X86_REG_FPTAG))
    out = bytearray(512)
    struct.pack_into("<HHBxHQQII", out, 0, fcw, fsw, ftw, uc.reg_read(X.UC_X86_REG_FOP) & 0x7FF,
                     uc.reg_read(X.UC_X86_REG_FIP), uc.reg_read(X.UC_X86_REG_FDP),
                     uc.reg_read(X.UC_X86_REG_MXCSR), 0xFFBF)
    top = (fsw >> 11) & 7
    for i in range(8):        # ST(i) is physical register (TOP + i) mod 8
        mant, exp = uc.reg_read(X.UC_X86_REG_FP0 + ((top + i) & 7))
        out[32 + 16 * i:42 + 16 * i] = struct.pack("<QH", mant, exp)
    for i in range(16):
        out[160 + 16 * i:176 + 16 * i] = uc.reg_read(X.UC_X86_REG_XMM0 + i).to_bytes(16, "little")
    fx[:] = out


def set_fpu(uc, fx):
    fcw, fsw, ftw, fop, fip, fdp, mxcsr, _ = struct.unpack_from("<HHBxHQQII", fx, 0)
    uc.reg_write(X.UC_X86_REG_FPCW, fcw)
    uc.reg_write(X.UC_X86_REG_FPSW, fsw)
    uc.reg_write(X.UC_X86_REG_FPTAG, sum((0 if ftw & (1 << i) else 3) << (2 * i) for i in range(8)))
    uc.reg_write(X.UC_X86_REG_FOP, fop)
    uc.reg_write(X.UC_X86_REG_FIP, fip)
    uc.reg_write(X.UC_X86_REG_FDP, fdp)
    uc.reg_write(X.UC_X86_REG_MXCSR, mxcsr)
    top = (fsw >> 11) & 7
    for i in range(8):
        mant, exp = struct.unpack_from("<QH", fx, 32 + 16 * i)
        uc.reg_write(X.UC_X86_REG_FP0 + ((top + i) & 7), (mant, exp))
    for i in range(16):
        uc.reg_write(X.UC_X86_REG_XMM0 + i, int.from_bytes(bytes(fx[160 + 16 * i:176 + 16 * i]), "little"))


_ATTR_CODE16, _ATTR_DATA16 = 0x9B, 0x93


def reset_state(st):
    """``nvmm_x86_reset_state``: the x86 RESET state in NVMM's layout (real mode at F000:FFF0)."""
    st.buf[:] = bytes(len(st.buf))
    for i in range(6):
        st.segs[i].set(0, _ATTR_DATA16, 0xFFFF, 0)
    st.segs[C.NVMM_X64_SEG_CS].set(0xF000, _ATTR_CODE16, 0xFFFF, 0xFFFF0000)
    st.segs[C.NVMM_X64_SEG_GDT].set(0, 0, 0xFFFF, 0)
    st.segs[C.NVMM_X64_SEG_IDT].set(0, 0, 0xFFFF, 0)
    st.segs[C.NVMM_X64_SEG_LDT].set(0, 0x82, 0xFFFF, 0)
    st.segs[C.NVMM_X64_SEG_TR].set(0, 0x8B, 0xFFFF, 0)
    st.gprs[C.NVMM_X64_GPR_RIP] = 0xFFF0
    st.gprs[C.NVMM_X64_GPR_RFLAGS] = C.RFLAGS_RESERVED1
    st.gprs[C.NVMM_X64_GPR_RDX] = 0x600
    st.crs[C.NVMM_X64_CR_CR0] = C.CR0_CD | C.CR0_NW | C.CR0_ET
    st.crs[C.NVMM_X64_CR_XCR0] = 1
    st.drs[C.NVMM_X64_DR_DR6] = 0xFFFF0FF0
    st.drs[C.NVMM_X64_DR_DR7] = 0x400
    st.msrs[C.NVMM_X64_MSR_PAT] = 0x0007040600070406
    st.fpu[0:2] = (0x40).to_bytes(2, "little")
    st.fpu[24:28] = (0x1F80).to_bytes(4, "little")
    st.fpu[28:32] = (0xFFBF).to_bytes(4, "little")
