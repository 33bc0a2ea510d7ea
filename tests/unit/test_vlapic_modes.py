"""vlapic (issue 24): LINT0/LINT1 of an APIC that is not enabled, CR8 and the TPR, the mode transitions with the
timer and TSC-deadline across them, a broadcast SIPI's hook calls, and one APIC version in the register and the
MP table."""

import pytest

from bhyve_devices import vlapic_regs as R
from bhyve_devices.apicbus import ApicBus
from bhyve_devices.base import ManualTimers
from bhyve_devices.tables.mptable import PROCESSOR, build_mptable
from bhyve_devices.vlapic import LVT_LINT0, LVT_LINT1, LVT_TIMER, ApicGP, Vlapic

XAPIC = 0xFEE00000 | R.APICBASE_ENABLED
X2APIC = XAPIC | R.APICBASE_X2APIC
DISABLED = 0xFEE00000
TSC_HZ = 1_000_000_000             # 1 GHz: TSC ticks are nanoseconds of the manual clock


def rd(v, off):
    return v.read(off, 4)


def wr(v, off, val):
    v.write(off, 4, val)


# -- LINT0 / LINT1 while the APIC is not enabled (bhyve's vlapic_trigger_lvt, SDM 10.4.7.2, 10.5.1) -------------

@pytest.mark.parametrize("off", ["reset", "software", "hardware"])
def test_lint0_is_the_intr_pin_while_the_apic_is_off(off):
    kicks = []
    v = Vlapic(0, ManualTimers(), ApicBus(kick=kicks.append))
    if off == "software":
        wr(v, R.SVR, 0x1FF)
        wr(v, R.SVR, 0xFF)
    elif off == "hardware":
        v.set_apicbase(DISABLED | R.APICBASE_BSP)
    assert rd(v, R.LVT_LINT0) & R.LVT_MASKED or off == "hardware"
    v.set_lint0_level(True)
    assert v.lint0_pending() and kicks == [0]
    v.set_lint0_level(False)
    assert not v.lint0_pending()


def test_lint0_follows_its_lvt_once_enabled():
    v = Vlapic(0, ManualTimers())
    v.set_lint0_level(True)
    assert v.lint0_pending()
    wr(v, R.SVR, 0x1FF)                        # enabled, LINT0 still masked: nothing passes
    assert not v.lint0_pending()
    wr(v, R.LVT_LINT0, R.DELMODE_EXTINT << 8)
    assert v.lint0_pending()


def test_trigger_lvt_while_off_is_extint_and_nmi():
    nmis = []
    v = Vlapic(0, ManualTimers(), ApicBus(on_nmi=nmis.append))
    assert not v.trigger_lvt(LVT_TIMER) and v.pending_intr() is None
    v.trigger_lvt(LVT_LINT0)
    assert v.lint0_pending()
    v.extint_accepted()
    assert not v.lint0_pending()
    v.trigger_lvt(LVT_LINT1)
    assert nmis == [0]


# -- CR8 (SDM 10.8.6.1) -----------------------------------------------------------------------------------------

def test_cr8_is_tpr_high_nibble():
    v = Vlapic(0, ManualTimers())
    wr(v, R.SVR, 0x1FF)
    v.set_cr8(0xF)
    assert rd(v, R.TPR) == 0xF0 and rd(v, R.PPR) == 0xF0
    v.set_intr_ready(0x40)
    assert v.pending_intr() is None            # masked by CR8
    wr(v, R.TPR, 0x35)
    assert v.get_cr8() == 3 and v.pending_intr() == 0x40
    v.set_cr8(0x1F)                            # CR8[3:0] only; TPR[3:0] cleared
    assert rd(v, R.TPR) == 0xF0


# -- mode transitions (SDM 10.12.5, figure 10-27) ---------------------------------------------------------------

@pytest.mark.parametrize("start,value,gp", [
    (X2APIC, XAPIC, True), (X2APIC, DISABLED | R.APICBASE_X2APIC, True), (X2APIC, DISABLED, False),
    (DISABLED, X2APIC, True), (DISABLED, DISABLED | R.APICBASE_X2APIC, True), (DISABLED, XAPIC, False),
    (XAPIC, X2APIC, False), (XAPIC, DISABLED | R.APICBASE_X2APIC, True), (XAPIC, DISABLED, False),
    (X2APIC, X2APIC, False), (XAPIC, XAPIC, False),
])
def test_each_transition(start, value, gp):
    v = Vlapic(1, ManualTimers(), x2apic_allowed=True)
    if start == X2APIC:
        v.set_apicbase(X2APIC)
    elif start == DISABLED:
        v.set_apicbase(DISABLED)
    if gp:
        with pytest.raises(ApicGP):
            v.wrmsr(R.MSR_APICBASE, value)
        assert v.get_apicbase() == start
    else:
        v.wrmsr(R.MSR_APICBASE, value)
        assert v.get_apicbase() == value
    assert v.cpuid_features()["apic"] == bool(v.get_apicbase() & R.APICBASE_ENABLED)


def test_reenabled_apic_is_reset_in_xapic_mode():
    v = Vlapic(2, ManualTimers(), x2apic_enabled=True)
    v.wrmsr(0x80F, 0x1FF)
    v.wrmsr(0x808, 0x40)
    v.wrmsr(0x832, 0x20041)                    # periodic timer, vector 0x41
    v.wrmsr(0x838, 1000)
    v.set_intr_ready(0x50)
    v.set_apicbase(DISABLED)
    assert v.read(R.VER, 4) == 0xFFFFFFFF and v.pending_intr() is None and not v.timer.running
    wr(v, R.SVR, 0x1FF)                        # the page is no device while disabled: dropped
    v.set_apicbase(XAPIC)
    assert not v.x2apic_mode
    assert (rd(v, R.ID), rd(v, R.SVR), rd(v, R.TPR), rd(v, R.LVT_TIMER)) == (2 << 24, 0xFF, 0, R.LVT_MASKED)
    assert rd(v, R.IRR0 + 0x20) == 0


def test_self_ipi_and_timer_in_each_mode_after_reenable():
    t = ManualTimers()
    v = Vlapic(0, t, ApicBus(), x2apic_allowed=True)
    for base in (DISABLED, XAPIC, X2APIC, DISABLED, XAPIC):
        v.set_apicbase(base | R.APICBASE_BSP)
        if not base & R.APICBASE_ENABLED:
            continue
        if v.x2apic_mode:
            v.wrmsr(0x80F, 0x1FF)
            v.wrmsr(0x83F, 0x40)               # SELF IPI
            v.wrmsr(0x832, 0x41)
            v.wrmsr(0x838, 100)
        else:
            wr(v, R.SVR, 0x1FF)
            wr(v, R.ICR_LO, (R.SHORTHAND_SELF << R.ICR_SHORTHAND_SHIFT) | R.ICR_LEVEL_ASSERT | 0x40)
            wr(v, R.LVT_TIMER, 0x41)
            wr(v, R.TIMER_ICR, 100)
        assert v.pending_intr() == 0x40, base
        t.advance(10_000)
        v.intr_accepted(0x41)
        v.intr_accepted(0x40)
        assert v.isr == (1 << 0x40) | (1 << 0x41), base    # the timer fired too
        v.eoi()
        v.eoi()


def test_tsc_deadline_across_mode_changes():
    t = ManualTimers()
    v = Vlapic(0, t, x2apic_allowed=True, tsc_hz=TSC_HZ)
    wr(v, R.SVR, 0x1FF)
    wr(v, R.LVT_TIMER, (R.TIMER_TSC_DEADLINE << R.TIMER_MODE_SHIFT) | 0x42)
    v.wrmsr(R.MSR_TSC_DEADLINE, 5000)
    v.set_apicbase(X2APIC)                     # xAPIC -> x2APIC keeps the armed deadline
    assert v.rdmsr(R.MSR_TSC_DEADLINE) == 5000
    t.advance(5000)
    assert v.pending_intr() == 0x42 and v.rdmsr(R.MSR_TSC_DEADLINE) == 0
    v.wrmsr(R.MSR_TSC_DEADLINE, 20000)
    v.set_apicbase(DISABLED)                   # disabling resets the timer: nothing fires
    v.set_apicbase(XAPIC)
    t.advance(30000)
    assert v.pending_intr() is None and v.read_tsc_deadline() == 0 and rd(v, R.LVT_TIMER) == R.LVT_MASKED
    wr(v, R.SVR, 0x1FF)
    wr(v, R.LVT_TIMER, (R.TIMER_TSC_DEADLINE << R.TIMER_MODE_SHIFT) | 0x43)
    v.wrmsr(R.MSR_TSC_DEADLINE, 40000)
    t.advance(10000)
    assert v.pending_intr() == 0x43


# -- a broadcast SIPI names its sender once per AP ---------------------------------------------------------------

def test_broadcast_sipi_calls_the_hook_per_ap_with_the_sender():
    sipis = []
    bus = ApicBus(on_sipi=lambda ap, vec, src: sipis.append((ap, vec, src)))
    vs = [Vlapic(i, ManualTimers(), bus) for i in range(5)]
    lo = (R.SHORTHAND_ALL_EXCL << R.ICR_SHORTHAND_SHIFT) | R.ICR_LEVEL_ASSERT
    wr(vs[0], R.ICR_LO, lo | (R.DELMODE_INIT << 8))
    wr(vs[0], R.ICR_LO, lo | (R.DELMODE_STARTUP << 8) | 0x0C)
    wr(vs[0], R.ICR_LO, lo | (R.DELMODE_STARTUP << 8) | 0x0C)      # the second SIPI finds them started
    assert sipis == [(i, 0x0C, 0) for i in range(1, 5)]


# -- one version --------------------------------------------------------------------------------------------------

def test_mp_table_says_the_version_the_register_reads():
    ver = rd(Vlapic(0, ManualTimers()), R.VER) & 0xFF
    assert ver == R.VERSION == 0x14
    table = dict(build_mptable(2, []))
    body = table[0xF0010]
    first = PROCESSOR.parse(body[44:])       # the entries follow the 44-byte configuration table header
    assert first.apic_version == ver


def test_kvm_reports_a_lowered_cr8_as_tpr_changed():
    """KVM without an in-kernel LAPIC exits with KVM_EXIT_SET_TPR when the guest lowers CR8: NVMM's TPR_CHANGED
    (the engine then takes the new CR8 into the TPR), not an unknown exit that would stop the VM."""
    from ops.nvmm import constants as C
    from ops.nvmm.kvm import ioctls as K
    from ops.nvmm.kvm import vcpu as kvm_vcpu
    assert kvm_vcpu._EXIT_MAP[K.KVM_EXIT_SET_TPR] == C.NVMM_VCPU_EXIT_TPR_CHANGED
