"""Guest-virtual to guest-physical translation, as ``nvmm_gva_to_gpa`` does it (libnvmm ``libnvmm_x86.c``).

Follows the Intel SDM vol. 3A chapter 4 (paging): no paging when CR0.PG is clear; 32-bit paging (two levels of
4-byte entries, 4 MiB pages with CR4.PSE); PAE paging (a four-entry PDPT, 2 MiB pages); 4-level paging (with
EFER.LMA: canonical check, 1 GiB and 2 MiB pages). The protection starts as read, write, execute and user and is
narrowed by each level's R/W, U/S and (with EFER.NXE) XD bits. Every table must lie in guest RAM.
Any failure is ``OSError(EFAULT)``, as in libnvmm.

Not supported (as in libnvmm): 5-level paging (CR4.LA57), PSE-36 high address bits of 4 MiB pages, setting the
accessed and dirty bits, protection keys, SMEP/SMAP checks.
"""

import errno
import os
import struct

from .. import constants as C

PAGE_SIZE = 4096
PTE_P = 1 << 0
PTE_W = 1 << 1
PTE_U = 1 << 2
PTE_PS = 1 << 7
PTE_NX = 1 << 63
ADDR_4K = 0x000FFFFFFFFFF000      # physical address bits 51:12
ADDR_2M = 0x000FFFFFFFE00000
ADDR_1G = 0x000FFFFFC0000000
ADDR_4M_32 = 0xFFC00000


def _fault(gva, why):
    return OSError(errno.EFAULT, f"{os.strerror(errno.EFAULT)}: gva {gva:#x}: {why}")


def gva_to_gpa(read_phys, cr0, cr3, cr4, efer, gva):
    """``(gpa, prot)`` for ``gva``; ``read_phys(gpa, size) -> bytes`` reads guest RAM or raises ``EFAULT``."""
    if not cr0 & C.CR0_PG:
        return gva & 0xFFFFFFFFFFFFFFFF, C.NVMM_PROT_ALL
    nxe = bool(efer & C.EFER_NXE)
    if efer & C.EFER_LMA:
        if not cr4 & C.CR4_PAE:
            raise _fault(gva, "long mode without PAE")
        if cr4 & C.CR4_LA57:
            raise _fault(gva, "5-level paging is not supported")
        return _walk64(read_phys, cr3, nxe, gva)
    gva &= 0xFFFFFFFF
    if cr4 & C.CR4_PAE:
        return _walk_pae(read_phys, cr3, nxe, gva)
    return _walk32(read_phys, cr3, bool(cr4 & C.CR4_PSE), gva)


def _entry64(read_phys, gpa):
    return struct.unpack("<Q", read_phys(gpa, 8))[0]


def _narrow(prot, pte, nxe):
    if not pte & PTE_W:
        prot &= ~C.NVMM_PROT_WRITE
    if not pte & PTE_U:
        prot &= ~C.NVMM_PROT_USER
    if nxe and pte & PTE_NX:
        prot &= ~C.NVMM_PROT_EXEC
    return prot


def _walk64(read_phys, cr3, nxe, gva):
    top = gva >> 47
    if top not in (0, 0x1FFFF):
        raise _fault(gva, "not canonical")
    prot = C.NVMM_PROT_ALL
    table = cr3 & ADDR_4K
    # (shift, large-page address mask or None when a PS bit is invalid at that level)
    for level, (shift, large) in enumerate(((39, None), (30, ADDR_1G), (21, ADDR_2M), (12, None))):
        pte = _entry64(read_phys, table + ((gva >> shift) & 0x1FF) * 8)
        if not pte & PTE_P:
            raise _fault(gva, f"level {4 - level} entry not present")
        prot = _narrow(prot, pte, nxe)
        if shift == 12:
            return (pte & ADDR_4K) | (gva & 0xFFF), prot
        if pte & PTE_PS:
            if large is None:
                raise _fault(gva, "PS bit set in a PML4 entry")
            return (pte & large) | (gva & ((1 << shift) - 1)), prot
        table = pte & ADDR_4K
    raise AssertionError("unreachable")


def _walk_pae(read_phys, cr3, nxe, gva):
    prot = C.NVMM_PROT_ALL
    pdpte = _entry64(read_phys, (cr3 & 0xFFFFFFE0) + ((gva >> 30) & 3) * 8)
    if not pdpte & PTE_P:
        raise _fault(gva, "PDPT entry not present")
    if pdpte & PTE_PS:
        raise _fault(gva, "PS bit set in a PDPT entry")
    pde = _entry64(read_phys, (pdpte & ADDR_4K) + ((gva >> 21) & 0x1FF) * 8)
    if not pde & PTE_P:
        raise _fault(gva, "page-directory entry not present")
    prot = _narrow(prot, pde, nxe)
    if pde & PTE_PS:
        return (pde & ADDR_2M) | (gva & 0x1FFFFF), prot
    pte = _entry64(read_phys, (pde & ADDR_4K) + ((gva >> 12) & 0x1FF) * 8)
    if not pte & PTE_P:
        raise _fault(gva, "page-table entry not present")
    return (pte & ADDR_4K) | (gva & 0xFFF), _narrow(prot, pte, nxe)


def _walk32(read_phys, cr3, pse, gva):
    prot = C.NVMM_PROT_ALL
    pde = struct.unpack("<I", read_phys((cr3 & 0xFFFFF000) + (gva >> 22) * 4, 4))[0]
    if not pde & PTE_P:
        raise _fault(gva, "page-directory entry not present")
    prot = _narrow(prot, pde, False)
    if pde & PTE_PS:
        if not pse:
            raise _fault(gva, "4 MiB page without CR4.PSE")
        return (pde & ADDR_4M_32) | (gva & 0x3FFFFF), prot
    pte = struct.unpack("<I", read_phys((pde & 0xFFFFF000) + ((gva >> 12) & 0x3FF) * 4, 4))[0]
    if not pte & PTE_P:
        raise _fault(gva, "page-table entry not present")
    return (pte & 0xFFFFF000) | (gva & 0xFFF), _narrow(prot, pte, False)
