"""getstate/setstate round trips of every NVMM state category, on every provider present.

Each category is written with ``setstate``, committed by a run (the guest only executes ``hlt``), read back
after the exit with ``getstate``, and compared.
"""

import pytest

from ops.nvmm import constants as C
from tests.guests.asm import assemble
from tests.guests.harness import CODE

HLT = assemble(".code64\nhlt\n", CODE)


def _fresh(guest_factory):
    g = guest_factory()
    g.load(CODE, HLT)
    g.setup_long64(CODE, large=True)
    return g


def _run_hlt(g):
    ex = g.vcpu.run()
    assert ex.reason == C.NVMM_VCPU_EXIT_HALTED, ex


def test_gprs_round_trip(guest_factory):
    g = _fresh(guest_factory)
    v = g.vcpu
    v.getstate(C.NVMM_X64_STATE_GPRS)
    values = {i: 0x1111111111111111 * (i + 1) & 0xFFFFFFFFFFFFFFFF for i in range(16) if i != C.NVMM_X64_GPR_RSP}
    for i, val in values.items():
        v.state.gprs[i] = val
    v.setstate(C.NVMM_X64_STATE_GPRS)
    _run_hlt(g)
    v.getstate(C.NVMM_X64_STATE_GPRS)
    for i, val in values.items():
        assert v.state.gprs[i] == val, f"gpr {i}"
    assert v.state.gprs[C.NVMM_X64_GPR_RIP] == CODE + 1      # past the hlt
    assert v.state.gprs[C.NVMM_X64_GPR_RFLAGS] & C.RFLAGS_RESERVED1


def test_segs_round_trip(guest_factory):
    g = _fresh(guest_factory)
    v = g.vcpu
    v.getstate(C.NVMM_X64_STATE_SEGS)
    s = v.state
    s.segs[C.NVMM_X64_SEG_FS].set(0x10, 0x3 | 0x10 | 0x80 | 0x400 | 0x800, 0xFFFFFFFF, 0x123456789000)
    s.segs[C.NVMM_X64_SEG_GS].set(0x10, 0x3 | 0x10 | 0x80 | 0x400 | 0x800, 0xFFFFFFFF, 0xFFFF800000001000)
    s.segs[C.NVMM_X64_SEG_GDT].set(0, 0, 0x7F, 0x9000)
    s.segs[C.NVMM_X64_SEG_IDT].set(0, 0, 0xFFF, 0xA000)
    s.segs[C.NVMM_X64_SEG_LDT].set(0x28, 0x2 | 0x80, 0xFF, 0xB000)
    v.setstate(C.NVMM_X64_STATE_SEGS)
    _run_hlt(g)
    v.getstate(C.NVMM_X64_STATE_SEGS)
    assert s.segs[C.NVMM_X64_SEG_FS].base == 0x123456789000
    assert s.segs[C.NVMM_X64_SEG_GS].base == 0xFFFF800000001000
    assert s.segs[C.NVMM_X64_SEG_GDT].get()[2:] == (0x7F, 0x9000)
    assert s.segs[C.NVMM_X64_SEG_IDT].get()[2:] == (0xFFF, 0xA000)
    sel, attrib, limit, base = s.segs[C.NVMM_X64_SEG_LDT].get()
    assert (sel, attrib & 0xFF, limit, base) == (0x28, 0x82, 0xFF, 0xB000)
    sel, attrib, limit, base = s.segs[C.NVMM_X64_SEG_CS].get()
    assert sel == 0x08 and attrib & 0x200, "CS keeps its long-mode L bit"


def test_crs_round_trip(guest_factory):
    g = _fresh(guest_factory)
    v = g.vcpu
    v.getstate(C.NVMM_X64_STATE_CRS)
    v.state.crs[C.NVMM_X64_CR_CR2] = 0xDEADBEEF000
    v.state.crs[C.NVMM_X64_CR_CR8] = 5
    v.setstate(C.NVMM_X64_STATE_CRS)
    _run_hlt(g)
    v.getstate(C.NVMM_X64_STATE_CRS)
    crs = v.state.crs
    assert crs[C.NVMM_X64_CR_CR2] == 0xDEADBEEF000
    assert crs[C.NVMM_X64_CR_CR8] == 5
    assert crs[C.NVMM_X64_CR_CR3] == 0x3000
    assert crs[C.NVMM_X64_CR_CR0] & (C.CR0_PG | C.CR0_PE) == C.CR0_PG | C.CR0_PE
    assert crs[C.NVMM_X64_CR_CR4] & C.CR4_PAE
    assert crs[C.NVMM_X64_CR_XCR0] & 1, "XCR0.x87 is always set"


def test_drs_round_trip(guest_factory):
    g = _fresh(guest_factory)
    v = g.vcpu
    v.getstate(C.NVMM_X64_STATE_DRS)
    for i, val in enumerate((0x1000, 0x2000, 0x3000, 0x4000)):
        v.state.drs[i] = val
    v.setstate(C.NVMM_X64_STATE_DRS)
    _run_hlt(g)
    v.getstate(C.NVMM_X64_STATE_DRS)
    assert list(v.state.drs[0:4]) == [0x1000, 0x2000, 0x3000, 0x4000]
    assert v.state.drs[C.NVMM_X64_DR_DR7] & 0x400, "DR7 bit 10 reads as one"


def test_msrs_round_trip(guest_factory):
    g = _fresh(guest_factory)
    v = g.vcpu
    v.getstate(C.NVMM_X64_STATE_MSRS)
    m = v.state.msrs
    m[C.NVMM_X64_MSR_STAR] = 0x0023001000000000
    m[C.NVMM_X64_MSR_LSTAR] = 0xFFFFFFFF81000000
    m[C.NVMM_X64_MSR_SFMASK] = 0x47700
    m[C.NVMM_X64_MSR_KERNELGSBASE] = 0xFFFF888000000000
    m[C.NVMM_X64_MSR_SYSENTER_CS] = 0x10
    m[C.NVMM_X64_MSR_PAT] = 0x0007040600070406
    v.setstate(C.NVMM_X64_STATE_MSRS)
    _run_hlt(g)
    v.getstate(C.NVMM_X64_STATE_MSRS)
    assert m[C.NVMM_X64_MSR_STAR] == 0x0023001000000000
    assert m[C.NVMM_X64_MSR_LSTAR] == 0xFFFFFFFF81000000
    assert m[C.NVMM_X64_MSR_SFMASK] == 0x47700
    assert m[C.NVMM_X64_MSR_KERNELGSBASE] == 0xFFFF888000000000
    assert m[C.NVMM_X64_MSR_SYSENTER_CS] == 0x10
    assert m[C.NVMM_X64_MSR_PAT] == 0x0007040600070406
    assert m[C.NVMM_X64_MSR_EFER] & (C.EFER_LME | C.EFER_LMA) == C.EFER_LME | C.EFER_LMA


def test_fpu_round_trip(guest_factory):
    g = _fresh(guest_factory)
    v = g.vcpu
    v.getstate(C.NVMM_X64_STATE_FPU)
    fpu = v.state.fpu
    pattern = bytes(range(16))
    fpu[160:176] = pattern                     # XMM0
    fpu[24:28] = (0x1F80 | 0x6000).to_bytes(4, "little")   # MXCSR with round-toward-zero
    v.setstate(C.NVMM_X64_STATE_FPU)
    _run_hlt(g)
    v.getstate(C.NVMM_X64_STATE_FPU)
    assert bytes(fpu[160:176]) == pattern
    assert int.from_bytes(fpu[24:28], "little") == 0x1F80 | 0x6000


def test_intr_window_flag_round_trip(guest_factory):
    g = _fresh(guest_factory)
    v = g.vcpu
    v.getstate(C.NVMM_X64_STATE_INTR)
    assert v.state.intr & 0x2 == 0
    v.state.intr = v.state.intr | 0x2          # int_window_exiting
    v.setstate(C.NVMM_X64_STATE_INTR)
    v.getstate(C.NVMM_X64_STATE_INTR)
    assert v.state.intr & 0x2


@pytest.mark.parametrize("flag", [C.NVMM_X64_STATE_SEGS, C.NVMM_X64_STATE_GPRS, C.NVMM_X64_STATE_CRS,
                                  C.NVMM_X64_STATE_DRS, C.NVMM_X64_STATE_MSRS, C.NVMM_X64_STATE_INTR,
                                  C.NVMM_X64_STATE_FPU])
def test_set_without_change_keeps_guest_running(guest_factory, flag):
    """getstate then setstate of an unchanged category must not disturb the guest (read-modify-write)."""
    g = guest_factory()
    g.load(CODE, assemble(".code64\nmov $0x11, %eax\nout %al, $0x70\nhlt\n", CODE))
    g.setup_long64(CODE, large=True)
    v = g.vcpu
    v.getstate(flag)
    v.setstate(flag)
    ex = g.run()
    assert ex.reason == C.NVMM_VCPU_EXIT_HALTED
    assert g.io_log == [(0x70, False, b"\x11")]
