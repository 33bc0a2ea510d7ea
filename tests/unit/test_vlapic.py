"""vlapic registers, priorities, EOI, APIC_BASE / x2APIC MSRs, LINT0 ExtINT and the construct page layout."""

import pytest
from hypothesis import given, settings, strategies as st

from bhyve_devices import vlapic_regs as R
from bhyve_devices.apicbus import ApicBus
from bhyve_devices.base import ManualTimers
from bhyve_devices.vlapic import LVT_LINT0, LVT_LINT1, ApicGP, Vlapic


def make(vcpu=0, **kw):
    bus = ApicBus()
    v = Vlapic(vcpu, ManualTimers(), bus, **kw)
    v.write(R.SVR, 4, 0x1FF)
    return v


def rd(v, off):
    return v.read(off, 4)


def wr(v, off, val):
    v.write(off, 4, val)


# -- registers ----------------------------------------------------------------------------------------------

def test_reset_values():
    v = Vlapic(1, ManualTimers())
    assert rd(v, R.ID) == 1 << 24
    assert rd(v, R.VER) == 0x00060014
    assert rd(v, R.SVR) == 0xFF
    assert rd(v, R.DFR) == 0xFFFFFFFF
    for off in R.LVT_OFFSETS:
        assert rd(v, off) == R.LVT_MASKED
    assert v.get_apicbase() == 0xFEE00000 | R.APICBASE_ENABLED
    assert Vlapic(0, ManualTimers()).get_apicbase() == 0xFEE00000 | R.APICBASE_ENABLED | R.APICBASE_BSP


@pytest.mark.parametrize("off,val,expect", [
    (R.TPR, 0x12345678, 0x78),
    (R.LDR, 0x12345678, 0x12000000),
    (R.DFR, 0x0, 0x0FFFFFFF),
    (R.SVR, 0xFFFFFFFF, 0x3FF),
    (R.ICR_HI, 0xFFFFFFFF, 0xFF000000),
    (R.ICR_LO, 0xFFFFF8FF, 0x000CC8FF),   # logical, no one addressed
    (R.LVT_TIMER, 0xFFFFFFFF, 0x000100FF),  # mode 3 is reserved: mode bits kept
    (R.LVT_TIMER, 0x000400FF, 0x000000FF),  # TSC-deadline without tsc_hz: kept one-shot
    (R.LVT_TIMER, 0x000600FF, 0x000000FF),
    (R.LVT_TIMER, 0x000200FF, 0x000200FF),  # periodic
    (R.LVT_LINT0, 0xFFFFFFFF, 0x0001A7FF),
    (R.LVT_LINT1, 0xFFFFFFFF, 0x0001A7FF),
    (R.LVT_ERROR, 0xFFFFFFFF, 0x000100FF),
    (R.LVT_THERMAL, 0xFFFFFFFF, 0x000107FF),
    (R.LVT_PMC, 0xFFFFFFFF, 0x000107FF),
    (R.LVT_CMCI, 0xFFFFFFFF, 0x000107FF),
    (R.TIMER_DCR, 0xFFFFFFFF, 0xB),
])
def test_writable_masks(off, val, expect):
    v = make()
    if off == R.ICR_LO:
        wr(v, R.ICR_HI, 0)
    wr(v, off, val)
    assert rd(v, off) == expect


def test_read_only_registers_ignore_writes():
    v = make()
    for off in (R.ID, R.VER, R.PPR, R.ISR0, R.IRR0 + 0x70, R.TMR0, R.TIMER_CCR, R.RRD, R.APR):
        before = rd(v, off)
        wr(v, off, 0xFFFFFFFF)
        assert rd(v, off) == before


def test_sub_dword_reads_and_dropped_writes():
    v = make()
    wr(v, R.TPR, 0xA5)
    assert v.read(R.TPR, 1) == 0xA5
    assert v.read(R.TPR + 1, 1) == 0
    assert v.read(R.ID + 3, 1) == 0
    assert v.read(R.SVR, 2) == 0x1FF
    v.write(R.TPR, 1, 0x11)
    assert rd(v, R.TPR) == 0xA5
    assert v.read(0x800, 4) == 0


def test_isr_irr_tmr_words():
    v = make()
    v.set_intr_ready(0x31, True)
    v.set_intr_ready(0xE5, False)
    assert rd(v, R.IRR0 + 0x10) == 1 << 17
    assert rd(v, R.IRR0 + 0x70) == 1 << 5
    assert rd(v, R.TMR0 + 0x10) == 1 << 17
    assert rd(v, R.TMR0 + 0x70) == 0
    v.intr_accepted(0xE5)
    assert rd(v, R.ISR0 + 0x70) == 1 << 5 and rd(v, R.IRR0 + 0x70) == 0


def test_esr_write_then_read():
    v = make()
    v.set_intr_ready(3)                    # receive illegal vector
    assert rd(v, R.ESR) == 0               # not visible until a write
    wr(v, R.ESR, 0)
    assert rd(v, R.ESR) == R.ESR_RECV_ILLEGAL_VECTOR
    wr(v, R.ESR, 0)
    assert rd(v, R.ESR) == 0


def test_error_lvt_fires():
    v = make()
    wr(v, R.LVT_ERROR, 0xFE)
    v.set_intr_ready(2)
    assert v.pending_intr() == 0xFE


def test_construct_layout_round_trip():
    assert R.LAPIC_PAGE.sizeof() == 4096
    d = {name: (off * 0x01010101) & 0xFFFFFFFF for off, name in R.REG_NAMES.items()}
    page = R.LAPIC_PAGE.build(d)
    assert len(page) == 4096
    for off, name in R.REG_NAMES.items():
        assert int.from_bytes(page[off:off + 4], "little") == d[name]
    parsed = R.LAPIC_PAGE.parse(page)
    assert {k: parsed[k] for k in d} == d
    assert R.LAPIC_PAGE.build(parsed) == page


def test_export_import_page():
    v = make()
    wr(v, R.TPR, 0x20)
    wr(v, R.LDR, 0x04000000)
    wr(v, R.LVT_LINT0, 0x700)
    wr(v, R.TIMER_DCR, 0xB)
    v.set_intr_ready(0x80, True)
    v.intr_accepted(0x80)
    v.set_intr_ready(0x41)
    page = v.export_page()
    p = R.LAPIC_PAGE.parse(page)
    assert p.tpr == 0x20 and p.ppr == 0x80 and p.id == 0 and p.version == 0x00060014
    assert p.isr4 == 1 and p.tmr4 == 1 and p.irr2 == 2 and p.lvt_lint0 == 0x700
    w = Vlapic(0, ManualTimers())
    w.import_page(page)
    assert w.export_page() == page
    # the raw page offsets agree with the MMIO view
    for off in R.REG_NAMES:
        if off not in (R.TIMER_CCR,):
            assert int.from_bytes(page[off:off + 4], "little") == rd(v, off)


# -- priorities ---------------------------------------------------------------------------------------------

def test_ppr_from_tpr_and_isrv():
    v = make()
    wr(v, R.TPR, 0x35)
    assert rd(v, R.PPR) == 0x35                # no ISR: PPR = TPR
    v.set_intr_ready(0x52)
    v.intr_accepted(0x52)
    assert rd(v, R.PPR) == 0x50                # ISRV class above TPR class: ISRV[7:4]:0
    wr(v, R.TPR, 0x5A)
    assert rd(v, R.PPR) == 0x5A                # equal classes: TPR
    wr(v, R.TPR, 0x61)
    assert rd(v, R.PPR) == 0x61


def test_tpr_masks_by_class():
    v = make()
    v.set_intr_ready(0x45)
    wr(v, R.TPR, 0x40)
    assert v.pending_intr() is None            # same class as TPR: blocked
    wr(v, R.TPR, 0x3F)
    assert v.pending_intr() == 0x45
    v.set_cr8(4)
    assert rd(v, R.TPR) == 0x40 and v.get_cr8() == 4
    assert v.pending_intr() is None
    v.set_cr8(0)
    assert v.pending_intr() == 0x45


def test_highest_irr_first_and_isr_blocks_same_class():
    v = make()
    for vec in (0x31, 0x92, 0x61):
        v.set_intr_ready(vec)
    assert v.pending_intr() == 0x92
    v.intr_accepted(0x92)
    assert v.pending_intr() is None            # 0x61 is below the in-service class 9
    v.set_intr_ready(0x95)
    assert v.pending_intr() is None            # same class as in service
    v.set_intr_ready(0xA0)
    assert v.pending_intr() == 0xA0            # higher class nests
    v.intr_accepted(0xA0)
    wr(v, R.EOI, 0)                            # EOI pops 0xA0 (highest ISR)
    assert rd(v, R.ISR0 + 0x50) == 0 and rd(v, R.ISR0 + 0x40) == 1 << 18
    assert v.pending_intr() is None            # 0x95 still blocked by 0x92 in service
    wr(v, R.EOI, 0)
    assert v.pending_intr() == 0x95
    v.intr_accepted(0x95)
    wr(v, R.EOI, 0)
    assert v.pending_intr() == 0x61


def test_eoi_level_callback_only_for_tmr():
    seen = []
    v = make(eoi_level=seen.append)
    v.set_intr_ready(0x40, True)
    v.set_intr_ready(0x50, False)
    assert v.pending_intr() == 0x50
    v.intr_accepted(0x50)
    v.intr_accepted(0x40)                      # as if taken before 0x50 arrived: nested
    wr(v, R.EOI, 0)
    assert seen == []                          # 0x50 (highest ISR) was edge
    wr(v, R.EOI, 0)
    assert seen == [0x40]
    wr(v, R.EOI, 0)                            # EOI with nothing in service is harmless
    assert seen == [0x40]


def test_software_disable_masks_and_drops():
    v = make()
    wr(v, R.LVT_TIMER, 0x40)
    wr(v, R.SVR, 0xFF)
    assert rd(v, R.LVT_TIMER) & R.LVT_MASKED
    wr(v, R.LVT_LINT0, 0x700)
    assert rd(v, R.LVT_LINT0) & R.LVT_MASKED   # cannot unmask while disabled
    assert not v.set_intr_ready(0x40)
    assert v.pending_intr() is None


def test_kick_after_pending():
    kicks = []
    bus = ApicBus(kick=kicks.append)
    v = Vlapic(2, ManualTimers(), bus)
    wr(v, R.SVR, 0x1FF)
    v.set_intr_ready(0x40)
    assert kicks == [2]


# -- LINT0 / ExtINT -----------------------------------------------------------------------------------------

def test_lint0_extint():
    v = make()
    v.set_lint0_level(True)
    assert not v.lint0_pending()               # masked
    wr(v, R.LVT_LINT0, 0x700)
    assert v.lint0_pending()
    v.set_lint0_level(False)
    assert not v.lint0_pending()
    assert v.trigger_lvt(LVT_LINT0)
    assert v.lint0_pending()
    v.extint_accepted()
    assert not v.lint0_pending()


def test_lint1_nmi_and_fixed_lint0():
    nmis = []
    bus = ApicBus(on_nmi=nmis.append)
    v = Vlapic(0, ManualTimers(), bus)
    wr(v, R.SVR, 0x1FF)
    wr(v, R.LVT_LINT1, 0x400)
    assert v.trigger_lvt(LVT_LINT1)
    assert nmis == [0]
    wr(v, R.LVT_LINT0, 0x33)
    v.set_lint0_level(True)
    assert v.pending_intr() == 0x33


def test_hw_disabled_lint0_is_intr():
    v = make(vcpu=0)
    v.set_apicbase(0xFEE00000)
    v.set_lint0_level(True)
    assert v.lint0_pending()
    assert v.read(R.ID, 4) == 0xFFFFFFFF
    assert not v.set_intr_ready(0x40)


# -- APIC_BASE, x2APIC --------------------------------------------------------------------------------------

def test_apicbase_transitions():
    v = make(vcpu=1)
    with pytest.raises(ApicGP):
        v.set_apicbase(0xFEE00000 | R.APICBASE_ENABLED | R.APICBASE_X2APIC)   # not offered
    with pytest.raises(ApicGP):
        v.set_apicbase(0xFED00000 | R.APICBASE_ENABLED)                       # relocation
    w = make(vcpu=1, x2apic_allowed=True)
    with pytest.raises(ApicGP):
        w.set_apicbase(0xFEE00000 | R.APICBASE_X2APIC)                        # EXTD without EN
    with pytest.raises(ApicGP):
        w.rdmsr(0x802)                                                        # xAPIC mode
    w.wrmsr(R.MSR_APICBASE, 0xFEE00000 | R.APICBASE_ENABLED | R.APICBASE_X2APIC)
    assert w.x2apic_mode
    assert w.rdmsr(0x802) == 1
    assert w.read(R.ID, 4) == 0xFFFFFFFF                                      # MMIO gone
    with pytest.raises(ApicGP):
        w.set_apicbase(0xFEE00000 | R.APICBASE_ENABLED)                       # x2APIC -> xAPIC
    w.set_apicbase(0xFEE00000)                                                # -> disabled
    with pytest.raises(ApicGP):
        w.set_apicbase(0xFEE00000 | R.APICBASE_ENABLED | R.APICBASE_X2APIC)   # disabled -> x2APIC
    w.set_apicbase(0xFEE00000 | R.APICBASE_ENABLED)
    assert rd(w, R.SVR) == 0xFF                                               # reset on disable


def test_x2apic_msrs():
    v = Vlapic(0x23, ManualTimers(), ApicBus(), x2apic_enabled=True)
    assert v.rdmsr(0x802) == 0x23
    assert v.rdmsr(0x803) == 0x00060014
    assert v.rdmsr(0x80D) == (2 << 16) | (1 << 3)                             # derived LDR
    v.wrmsr(0x80F, 0x1FF)
    v.wrmsr(0x808, 0x30)
    assert v.rdmsr(0x80A) == 0x30
    for bad in (0x809, 0x80C, 0x80E, 0x831, 0x804, 0x8FF):
        with pytest.raises(ApicGP):
            v.rdmsr(bad)
    for ro in (0x802, 0x803, 0x80A, 0x80D, 0x810, 0x839):
        with pytest.raises(ApicGP):
            v.wrmsr(ro, 0)
    for wo in (0x80B, 0x83F):
        with pytest.raises(ApicGP):
            v.rdmsr(wo)
    with pytest.raises(ApicGP):
        v.wrmsr(0x80B, 1)
    v.wrmsr(0x83F, 0x77)                                                      # SELF IPI
    assert v.pending_intr() == 0x77
    v.intr_accepted(0x77)
    assert v.rdmsr(0x813) == 1 << 23
    v.wrmsr(0x80B, 0)
    assert v.rdmsr(0x813) == 0
    v.wrmsr(0x830, (0x23 << 32) | 0x66)                                       # 64-bit ICR to itself
    assert v.rdmsr(0x830) == (0x23 << 32) | 0x66
    assert v.pending_intr() == 0x66


def test_cpuid_features():
    v = Vlapic(0, ManualTimers(), x2apic_allowed=True, tsc_hz=1_000_000_000)
    assert v.cpuid_features() == {"apic": True, "x2apic": True, "tsc_deadline": True}
    ecx, edx = v.cpuid_leaf1(0, 0)
    assert ecx == (1 << 21) | (1 << 24) and edx == 1 << 9
    w = Vlapic(0, ManualTimers())
    assert w.cpuid_leaf1(0xFFFFFFFF, 0) == (0xFFFFFFFF & ~((1 << 21) | (1 << 24)), 1 << 9)


def test_tsc_deadline_msr_needs_cpuid_bit():
    v = make()
    with pytest.raises(ApicGP):
        v.rdmsr(R.MSR_TSC_DEADLINE)
    with pytest.raises(ApicGP):
        v.wrmsr(R.MSR_TSC_DEADLINE, 5)
    v.write_tsc_deadline(5)
    assert v.read_tsc_deadline() == 0
    assert Vlapic.handles_msr(0x1B) and Vlapic.handles_msr(0x6E0) and Vlapic.handles_msr(0x8FF)
    assert not Vlapic.handles_msr(0x900)
    with pytest.raises(ValueError):
        v.rdmsr(0x10)


def test_init_reset_keeps_id():
    v = make(vcpu=3)
    wr(v, R.TPR, 0x40)
    v.set_intr_ready(0x50)
    v.reset()
    assert rd(v, R.TPR) == 0 and rd(v, R.ID) == 3 << 24 and v.pending_intr() is None


# -- robustness ---------------------------------------------------------------------------------------------

@settings(max_examples=400, deadline=None)
@given(ops=st.lists(st.tuples(st.integers(0, 0xFFF), st.sampled_from([1, 2, 4, 8]),
                              st.integers(0, 2**64 - 1), st.booleans()), max_size=40))
def test_mmio_never_raises(ops):
    v = make()
    for off, size, val, is_write in ops:
        if is_write:
            v.write(off, size, val & ((1 << (8 * size)) - 1))
        else:
            assert 0 <= v.read(off, size) < 1 << (8 * size)
        v.pending_intr()


@settings(max_examples=300, deadline=None)
@given(ops=st.lists(st.tuples(st.integers(0x800, 0x8FF), st.integers(0, 2**64 - 1), st.booleans()),
                    max_size=30), x2=st.booleans())
def test_msr_only_raises_apicgp(ops, x2):
    v = Vlapic(0, ManualTimers(), ApicBus(), x2apic_enabled=x2, tsc_hz=10**9)
    for msr, val, is_write in ops:
        try:
            if is_write:
                v.wrmsr(msr, val)
            else:
                v.rdmsr(msr)
        except ApicGP:
            pass
        v.pending_intr()


# -- merged interrupts (issue 24 item 5) ---------------------------------------------------------------------

def test_set_intr_ready_reports_a_vector_already_requested_as_merged():
    v = make()
    assert v.set_intr_ready(0x40) is True                       # the plain contract: accepted
    assert v.set_intr_ready(0x40) is True                       # still True without the keyword
    v.intr_accepted(0x40)                                       # IRR -> ISR: the next one is new again
    assert v.set_intr_ready(0x40, report_merged=True) == (True, False)
    assert v.set_intr_ready(0x40, report_merged=True) == (True, True)   # the guest will take it once
    assert v.set_intr_ready(0x41, True, report_merged=True) == (True, False)
    assert v.set_intr_ready(0x41, True, report_merged=True) == (True, True)
    assert v.set_intr_ready(3, report_merged=True) == (False, False)     # illegal vector: refused
    wr(v, R.SVR, 0xFF)
    assert v.set_intr_ready(0x40, report_merged=True) == (False, False)  # software-disabled: refused
