"""The guest page walk (``ops.nvmm.x86.mmu``) on page tables built in the test: no paging, 32-bit paging with
4 KiB and 4 MiB pages, PAE with 2 MiB pages, 4-level with 1 GiB/2 MiB/4 KiB pages, protections and faults.
(32-bit and PAE paging cannot run on kvm_pvm, so they are checked here against the SDM's formats.)"""

import errno
import struct

import pytest

from ops.nvmm import constants as C
from ops.nvmm.x86 import mmu

P, W, U, PS, NX = 1, 2, 4, 0x80, 1 << 63
RWXU = C.NVMM_PROT_ALL


class Mem:
    def __init__(self, size=1 << 22):
        self.buf = bytearray(size)

    def q(self, gpa, v):
        struct.pack_into("<Q", self.buf, gpa, v)

    def d(self, gpa, v):
        struct.pack_into("<I", self.buf, gpa, v)

    def read(self, gpa, size):
        if gpa + size > len(self.buf):
            raise OSError(errno.EFAULT, "outside RAM")
        return bytes(self.buf[gpa:gpa + size])


def walk(m, cr0, cr3, cr4, efer, gva):
    return mmu.gva_to_gpa(m.read, cr0, cr3, cr4, efer, gva)


def fault(m, *args):
    with pytest.raises(OSError) as err:
        walk(m, *args)
    assert err.value.errno == errno.EFAULT


def test_no_paging_is_identity():
    assert walk(Mem(), C.CR0_PE, 0, 0, 0, 0xFFFFF123) == (0xFFFFF123, RWXU)


def test_32bit_paging():
    m = Mem()
    m.d(0x1000 + 4 * 1, 0x2000 | P | W | U)          # PDE 1 -> PT at 0x2000 (covers 4..8 MiB)
    m.d(0x2000 + 4 * 3, 0x9000 | P | U)               # PTE 3: read-only user page
    m.d(0x1000 + 4 * 2, 0x00C00000 | P | W | PS)      # PDE 2: a 4 MiB supervisor page
    cr0 = C.CR0_PE | C.CR0_PG
    assert walk(m, cr0, 0x1000, 0, 0, 0x403ABC) == (0x9ABC, RWXU & ~C.NVMM_PROT_WRITE)
    assert walk(m, cr0, 0x1000, C.CR4_PSE, 0, 0x812345) == (0xC12345, RWXU & ~C.NVMM_PROT_USER)
    fault(m, cr0, 0x1000, 0, 0, 0x812345)              # PS without CR4.PSE
    fault(m, cr0, 0x1000, 0, 0, 0x404000)              # PTE not present


def test_pae_paging():
    m = Mem()
    m.q(0x1000 + 8 * 2, 0x2000 | P)                   # PDPTE 2 (2..3 GiB)
    m.q(0x2000 + 8 * 5, 0x00A00000 | P | W | PS | NX)  # 2 MiB page, no-execute
    m.q(0x2000 + 8 * 6, 0x3000 | P | W)
    m.q(0x3000 + 8 * 7, 0x5000 | P | W | U)
    cr0, cr4 = C.CR0_PE | C.CR0_PG, C.CR4_PAE
    gva = 0x80000000 + 5 * 0x200000 + 0x1234
    assert walk(m, cr0, 0x1000, cr4, C.EFER_NXE, gva) == (0xA01234, RWXU & ~C.NVMM_PROT_USER & ~C.NVMM_PROT_EXEC)
    assert walk(m, cr0, 0x1000, cr4, 0, gva)[1] & C.NVMM_PROT_EXEC, "XD ignored without EFER.NXE"
    assert walk(m, cr0, 0x1000, cr4, 0, 0x80000000 + 6 * 0x200000 + 7 * 0x1000 + 8) == (0x5008,
                                                                                        RWXU & ~C.NVMM_PROT_USER)
    m.q(0x1000 + 8 * 3, 0x4000 | P | PS)
    fault(m, cr0, 0x1000, cr4, 0, 0xC0000000)         # PS is invalid in a PDPTE
    fault(m, cr0, 0x1000, cr4, 0, 0x0)                # PDPTE 0 not present


def test_4level_paging():
    m = Mem()
    lma = C.EFER_LME | C.EFER_LMA
    cr0, cr4 = C.CR0_PE | C.CR0_PG, C.CR4_PAE
    m.q(0x1000 + 8 * 511, 0x2000 | P | W)             # PML4[511]: the top of the address space
    m.q(0x2000 + 8 * 510, 0x40000000 | P | W | PS)    # a 1 GiB page
    m.q(0x2000 + 8 * 511, 0x3000 | P | W)
    m.q(0x3000 + 8 * 0, 0x200000 | P | PS)            # a 2 MiB read-only page
    m.q(0x3000 + 8 * 1, 0x4000 | P | W | U)
    m.q(0x4000 + 8 * 2, 0x7000 | P | W | U | NX)
    top = 0xFFFF800000000000 | (511 << 39)
    assert walk(m, cr0, 0x1000, cr4, lma, top | (510 << 30) | 0x12345678) == (0x52345678,
                                                                               RWXU & ~C.NVMM_PROT_USER)
    assert walk(m, cr0, 0x1000, cr4, lma, top | (511 << 30) | 0x1234)[1] == RWXU & ~C.NVMM_PROT_USER & \
        ~C.NVMM_PROT_WRITE
    assert walk(m, cr0, 0x1000, cr4, lma | C.EFER_NXE, top | (511 << 30) | 0x200000 | 0x2ABC) == \
        (0x7ABC, RWXU & ~C.NVMM_PROT_USER & ~C.NVMM_PROT_EXEC)
    fault(m, cr0, 0x1000, cr4, lma, 0x0000800000000000)       # not canonical
    fault(m, cr0, 0x1000, 0, lma, top)                         # long mode without PAE
    fault(m, cr0, 0x1000, cr4 | C.CR4_LA57, lma, top)          # 5-level paging
    m.q(0x1000, 0x7FFFF000 | P)                                # PML4[0] points outside RAM
    fault(m, cr0, 0x1000, cr4, lma, 0x1000)
    m.q(0x1000, 0x5000 | P | PS)                               # PS in a PML4 entry
    fault(m, cr0, 0x1000, cr4, lma, 0x1000)
