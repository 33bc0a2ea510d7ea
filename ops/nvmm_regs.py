"""bhyve's ``vm_reg_name`` and ``seg_desc`` mapped onto NVMM's state categories (anchors (a), "Mapping
vm_reg_name -> NVMM v2 state").

- GPRs, RSP, RIP, RFLAGS -> ``NVMM_X64_STATE_GPRS``; CR0/2/3/4 and TPR (as CR8) -> ``CRS``; DR0-3/6/7 -> ``DRS``;
  EFER and KGS_BASE -> ``MSRS``; segments, GDTR/IDTR/LDTR/TR and FS/GS base -> ``SEGS``; INTR_SHADOW -> ``INTR``.
- Every write is a read-modify-write after a ``getstate`` of the category, because ``setstate`` commits the
  whole category.
- CR0, CR4 and EFER are kept consistent as the CPU keeps them: EFER.LMA = EFER.LME and CR0.PG (a paging-off
  trampoline such as Linux 4.17+'s clears LMA with PG).
- ``seg_desc.access`` is in VMX access-rights format; NVMM has no "unusable" bit, so a segment is unusable exactly
  when it is not present (the 2019 port had this inverted).
- PDPTE0-3: NVMM has none; they are read from guest memory at CR3 while PAE paging is on (0 otherwise), and
  writing them is refused with ``EINVAL``.
- ENTRY_INST_LENGTH is kept per vCPU by the ops layer (used for software exceptions), not in NVMM state.

Not supported: XCR0 as a ``vm_reg_name`` (illumos only).
"""

import errno
import struct

from .nvmm import constants as C
from .nvmm.api import nvmm_error
from .vmm_ops import (SEG_ACCESS_AVL, SEG_ACCESS_DB, SEG_ACCESS_DPL_SHIFT, SEG_ACCESS_G, SEG_ACCESS_L,
                      SEG_ACCESS_P, SEG_ACCESS_S, SEG_ACCESS_TYPE_MASK, SEG_ACCESS_UNUSABLE, SegDesc, VmRegName)

R = VmRegName
S = C
_GPRS, _SEGS, _CRS, _DRS, _MSRS, _INTR = (C.NVMM_X64_STATE_GPRS, C.NVMM_X64_STATE_SEGS, C.NVMM_X64_STATE_CRS,
                                          C.NVMM_X64_STATE_DRS, C.NVMM_X64_STATE_MSRS, C.NVMM_X64_STATE_INTR)

#: vm_reg_name -> (category, array name, index)
SIMPLE = {
    R.VM_REG_GUEST_RAX: (_GPRS, "gprs", C.NVMM_X64_GPR_RAX), R.VM_REG_GUEST_RBX: (_GPRS, "gprs", C.NVMM_X64_GPR_RBX),
    R.VM_REG_GUEST_RCX: (_GPRS, "gprs", C.NVMM_X64_GPR_RCX), R.VM_REG_GUEST_RDX: (_GPRS, "gprs", C.NVMM_X64_GPR_RDX),
    R.VM_REG_GUEST_RSI: (_GPRS, "gprs", C.NVMM_X64_GPR_RSI), R.VM_REG_GUEST_RDI: (_GPRS, "gprs", C.NVMM_X64_GPR_RDI),
    R.VM_REG_GUEST_RBP: (_GPRS, "gprs", C.NVMM_X64_GPR_RBP), R.VM_REG_GUEST_RSP: (_GPRS, "gprs", C.NVMM_X64_GPR_RSP),
    R.VM_REG_GUEST_R8: (_GPRS, "gprs", C.NVMM_X64_GPR_R8), R.VM_REG_GUEST_R9: (_GPRS, "gprs", C.NVMM_X64_GPR_R9),
    R.VM_REG_GUEST_R10: (_GPRS, "gprs", C.NVMM_X64_GPR_R10), R.VM_REG_GUEST_R11: (_GPRS, "gprs", C.NVMM_X64_GPR_R11),
    R.VM_REG_GUEST_R12: (_GPRS, "gprs", C.NVMM_X64_GPR_R12), R.VM_REG_GUEST_R13: (_GPRS, "gprs", C.NVMM_X64_GPR_R13),
    R.VM_REG_GUEST_R14: (_GPRS, "gprs", C.NVMM_X64_GPR_R14), R.VM_REG_GUEST_R15: (_GPRS, "gprs", C.NVMM_X64_GPR_R15),
    R.VM_REG_GUEST_RIP: (_GPRS, "gprs", C.NVMM_X64_GPR_RIP),
    R.VM_REG_GUEST_RFLAGS: (_GPRS, "gprs", C.NVMM_X64_GPR_RFLAGS),
    R.VM_REG_GUEST_CR2: (_CRS, "crs", C.NVMM_X64_CR_CR2), R.VM_REG_GUEST_CR3: (_CRS, "crs", C.NVMM_X64_CR_CR3),
    R.VM_REG_GUEST_TPR: (_CRS, "crs", C.NVMM_X64_CR_CR8),
    R.VM_REG_GUEST_DR0: (_DRS, "drs", C.NVMM_X64_DR_DR0), R.VM_REG_GUEST_DR1: (_DRS, "drs", C.NVMM_X64_DR_DR1),
    R.VM_REG_GUEST_DR2: (_DRS, "drs", C.NVMM_X64_DR_DR2), R.VM_REG_GUEST_DR3: (_DRS, "drs", C.NVMM_X64_DR_DR3),
    R.VM_REG_GUEST_DR6: (_DRS, "drs", C.NVMM_X64_DR_DR6), R.VM_REG_GUEST_DR7: (_DRS, "drs", C.NVMM_X64_DR_DR7),
    R.VM_REG_GUEST_KGS_BASE: (_MSRS, "msrs", C.NVMM_X64_MSR_KERNELGSBASE),
}

#: segment-like vm_reg_name -> NVMM segment index
SEGMENTS = {
    R.VM_REG_GUEST_ES: C.NVMM_X64_SEG_ES, R.VM_REG_GUEST_CS: C.NVMM_X64_SEG_CS, R.VM_REG_GUEST_SS: C.NVMM_X64_SEG_SS,
    R.VM_REG_GUEST_DS: C.NVMM_X64_SEG_DS, R.VM_REG_GUEST_FS: C.NVMM_X64_SEG_FS, R.VM_REG_GUEST_GS: C.NVMM_X64_SEG_GS,
    R.VM_REG_GUEST_LDTR: C.NVMM_X64_SEG_LDT, R.VM_REG_GUEST_TR: C.NVMM_X64_SEG_TR,
    R.VM_REG_GUEST_GDTR: C.NVMM_X64_SEG_GDT, R.VM_REG_GUEST_IDTR: C.NVMM_X64_SEG_IDT,
}
PDPTES = (R.VM_REG_GUEST_PDPTE0, R.VM_REG_GUEST_PDPTE1, R.VM_REG_GUEST_PDPTE2, R.VM_REG_GUEST_PDPTE3)


def attrib_to_access(attrib):
    """NVMM ``attrib`` word -> VMX access rights (unusable when not present)."""
    p = bool(attrib & 0x80)
    access = ((attrib & 0xF) | (SEG_ACCESS_S if attrib & 0x10 else 0) | (((attrib >> 5) & 3) << SEG_ACCESS_DPL_SHIFT)
              | (SEG_ACCESS_P if p else 0) | (SEG_ACCESS_AVL if attrib & 0x100 else 0)
              | (SEG_ACCESS_L if attrib & 0x200 else 0) | (SEG_ACCESS_DB if attrib & 0x400 else 0)
              | (SEG_ACCESS_G if attrib & 0x800 else 0))
    return access if p else access | SEG_ACCESS_UNUSABLE


def access_to_attrib(access):
    """VMX access rights -> NVMM ``attrib`` word (an unusable segment becomes not present)."""
    p = bool(access & SEG_ACCESS_P) and not access & SEG_ACCESS_UNUSABLE
    return ((access & SEG_ACCESS_TYPE_MASK) | (0x10 if access & SEG_ACCESS_S else 0)
            | (((access >> SEG_ACCESS_DPL_SHIFT) & 3) << 5) | (0x80 if p else 0)
            | (0x100 if access & SEG_ACCESS_AVL else 0) | (0x200 if access & SEG_ACCESS_L else 0)
            | (0x400 if access & SEG_ACCESS_DB else 0) | (0x800 if access & SEG_ACCESS_G else 0))


def _bad(num):
    return nvmm_error(errno.EINVAL, f"vm_reg_name {num} is not a register this table knows")


def getreg(vcpu, num, extra):
    """Value of ``vm_reg_name`` ``num`` of an NVMM vCPU (``extra`` holds ENTRY_INST_LENGTH)."""
    st = vcpu.state
    simple = SIMPLE.get(num)
    if simple is not None:
        cat, arr, idx = simple
        vcpu.getstate(cat)
        return getattr(st, arr)[idx]
    if num == R.VM_REG_GUEST_CR0:
        vcpu.getstate(_CRS)
        return st.crs[C.NVMM_X64_CR_CR0]
    if num == R.VM_REG_GUEST_CR4:
        vcpu.getstate(_CRS)
        return st.crs[C.NVMM_X64_CR_CR4]
    if num == R.VM_REG_GUEST_EFER:
        vcpu.getstate(_MSRS)
        return st.msrs[C.NVMM_X64_MSR_EFER]
    if num in SEGMENTS:
        vcpu.getstate(_SEGS)
        return st.segs[SEGMENTS[num]].selector
    if num in (R.VM_REG_GUEST_FS_BASE, R.VM_REG_GUEST_GS_BASE):
        vcpu.getstate(_SEGS)
        return st.segs[C.NVMM_X64_SEG_FS if num == R.VM_REG_GUEST_FS_BASE else C.NVMM_X64_SEG_GS].base
    if num == R.VM_REG_GUEST_INTR_SHADOW:
        vcpu.getstate(_INTR)
        return st.intr & 1
    if num == R.VM_REG_GUEST_ENTRY_INST_LENGTH:
        return extra.get("entry_inst_length", 0)
    if num in PDPTES:
        return _pdpte(vcpu, PDPTES.index(num))
    raise _bad(num)


def _pdpte(vcpu, i):
    cr0, cr3, cr4, efer = vcpu.paging_regs()
    if not (cr0 & C.CR0_PG and cr4 & C.CR4_PAE and not efer & C.EFER_LMA):
        return 0
    return struct.unpack("<Q", vcpu.machine.read_phys((cr3 & 0xFFFFFFE0) + 8 * i, 8))[0]


def setreg(vcpu, num, val, extra):
    st = vcpu.state
    val &= 0xFFFFFFFFFFFFFFFF
    simple = SIMPLE.get(num)
    if simple is not None:
        cat, arr, idx = simple
        vcpu.getstate(cat)
        getattr(st, arr)[idx] = val
        vcpu.setstate(cat)
        return
    if num in (R.VM_REG_GUEST_CR0, R.VM_REG_GUEST_CR4, R.VM_REG_GUEST_EFER):
        vcpu.getstate(_CRS | _MSRS)
        if num == R.VM_REG_GUEST_CR0:
            st.crs[C.NVMM_X64_CR_CR0] = val | C.CR0_ET
        elif num == R.VM_REG_GUEST_CR4:
            st.crs[C.NVMM_X64_CR_CR4] = val
        else:
            st.msrs[C.NVMM_X64_MSR_EFER] = val
        efer = st.msrs[C.NVMM_X64_MSR_EFER]
        lma = bool(efer & C.EFER_LME) and bool(st.crs[C.NVMM_X64_CR_CR0] & C.CR0_PG)
        st.msrs[C.NVMM_X64_MSR_EFER] = (efer | C.EFER_LMA) if lma else (efer & ~C.EFER_LMA)
        vcpu.setstate(_CRS | _MSRS)
        return
    if num in SEGMENTS:
        vcpu.getstate(_SEGS)
        st.segs[SEGMENTS[num]].selector = val & 0xFFFF
        vcpu.setstate(_SEGS)
        return
    if num in (R.VM_REG_GUEST_FS_BASE, R.VM_REG_GUEST_GS_BASE):
        vcpu.getstate(_SEGS)
        st.segs[C.NVMM_X64_SEG_FS if num == R.VM_REG_GUEST_FS_BASE else C.NVMM_X64_SEG_GS].base = val
        vcpu.setstate(_SEGS)
        return
    if num == R.VM_REG_GUEST_INTR_SHADOW:
        vcpu.getstate(_INTR)
        st.intr = (st.intr & ~1) | (1 if val else 0)
        vcpu.setstate(_INTR)
        return
    if num == R.VM_REG_GUEST_ENTRY_INST_LENGTH:
        extra["entry_inst_length"] = val
        return
    if num in PDPTES:
        raise nvmm_error(errno.EINVAL, "NVMM has no PDPTE registers: the CPU reads them from guest memory at "
                         "CR3 (write the PDPT there instead)")
    raise _bad(num)


def getdesc(vcpu, num):
    if num not in SEGMENTS:
        raise _bad(num)
    vcpu.getstate(_SEGS)
    _, attrib, limit, base = vcpu.state.segs[SEGMENTS[num]].get()
    if num in (R.VM_REG_GUEST_GDTR, R.VM_REG_GUEST_IDTR):
        return SegDesc(base, limit, 0)
    return SegDesc(base, limit, attrib_to_access(attrib))


def setdesc(vcpu, num, desc):
    if num not in SEGMENTS:
        raise _bad(num)
    vcpu.getstate(_SEGS)
    seg = vcpu.state.segs[SEGMENTS[num]]
    sel = seg.selector
    attrib = 0 if num in (R.VM_REG_GUEST_GDTR, R.VM_REG_GUEST_IDTR) else access_to_attrib(desc.access)
    seg.set(sel, attrib, desc.limit, desc.base)
    vcpu.setstate(_SEGS)
