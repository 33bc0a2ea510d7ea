"""The MSR policy (``ops/nvmm/x86/msr_policy.py``) against hand-made CPUID tables, the ops layer's architectural
MSRs over a fake vCPU (IA32_TSC_ADJUST both ways, per vCPU), and KVM's MSR filter argument (``msr_filter.py``)."""

import struct

import pytest

from ops.arch_msrs import ArchMsrs, MsrGP
from ops.nvmm import constants as C
from ops.nvmm.kvm import msr_filter
from ops.nvmm.kvm import ioctls as K
from ops.nvmm.kvm.cpuid_probe import overlay
from ops.nvmm.x86 import msr_policy as P
from ops.nvmm.x86.cpuid_bits import EBX, ECX, EDX, FEATURES, offers, table_lookup

NONCANON_48 = 1 << 47                  # canonical only with 57-bit linear addresses
NONCANON_57 = 1 << 56
UNKNOWN_MSR = 0x12345


def table(*features, max_basic=0xD, max_ext=0x80000008):
    """A CPUID function offering ``features`` (names of ``cpuid_bits.FEATURES``)."""
    regs = {(0x0, 0): [max_basic, 0, 0, 0], (0x80000000, 0): [max_ext, 0, 0, 0]}
    for name in features:
        f = FEATURES[name]
        regs.setdefault((f.leaf, f.index), [0, 0, 0, 0])[f.reg] |= f.mask
    return lambda leaf, index=0: tuple(regs.get((leaf, index), (0, 0, 0, 0)))


def test_offers_reads_below_the_maximum_leaf_only():
    assert offers(table("tsc_adjust"), "tsc_adjust")
    assert not offers(table("tsc_adjust", max_basic=6), "tsc_adjust"), "leaf 7 above the maximum is not there"
    assert not offers(table("amd_ibrs", max_ext=0x80000001), "amd_ibrs")


@pytest.mark.parametrize("msr,write,value,features", [
    (P.MSR_SPEC_CTRL, False, None, ("ibrs_ibpb",)), (P.MSR_SPEC_CTRL, True, 0, ("amd_ssbd",)),
    (P.MSR_PRED_CMD, True, P.PRED_CMD_IBPB, ("amd_ibpb",)), (P.MSR_FLUSH_CMD, True, P.FLUSH_CMD_L1D, ("l1d_flush",)),
    (P.MSR_ARCH_CAPABILITIES, False, None, ("arch_capabilities",)), (P.MSR_TSC_ADJUST, True, 5, ("tsc_adjust",)),
    (P.MSR_MTRRCAP, False, None, ("mtrr",)), (P.MSR_MCG_CAP, False, None, ("mca",)),
    (P.MSR_TSC_AUX, False, None, ("rdpid",)), (P.MSR_XSS, True, 0, ("xsaves",)),
    (P.MSR_VIRT_SPEC_CTRL, False, None, ("virt_ssbd",)),
])
def test_an_msr_exists_only_with_its_feature(msr, write, value, features):
    v = value if write else None
    assert P.refused(table(), msr, v), "no feature, no MSR: #GP"
    assert not P.refused(table(*features), msr, v)


def test_command_and_read_only_msrs():
    t = table("ibrs_ibpb", "l1d_flush", "arch_capabilities")
    assert P.refused(t, P.MSR_PRED_CMD) and P.refused(t, P.MSR_FLUSH_CMD), "write-only commands"
    assert P.refused(t, P.MSR_ARCH_CAPABILITIES, 0), "read-only"
    assert P.refused(t, P.MSR_PRED_CMD, 2) and P.refused(t, P.MSR_FLUSH_CMD, 2), "undefined command bits"


def test_spec_ctrl_bits_follow_the_features():
    assert P.spec_ctrl_bits(table("ibrs_ibpb")) == P.SPEC_CTRL_IBRS
    t = table("amd_stibp", "amd_ssbd")
    assert not P.refused(t, P.MSR_SPEC_CTRL, P.SPEC_CTRL_STIBP | P.SPEC_CTRL_SSBD)
    assert P.refused(t, P.MSR_SPEC_CTRL, P.SPEC_CTRL_IBRS)
    assert P.refused(table("amd_psfd"), P.MSR_SPEC_CTRL), "PSFD alone does not make the MSR"


@pytest.mark.parametrize("msr", [P.MSR_FS_BASE, P.MSR_GS_BASE, P.MSR_KERNEL_GS_BASE])
def test_bases_must_be_canonical_with_the_offered_width(msr):
    four, five = table("lm"), table("lm", "la57")
    assert P.linear_width(four) == 48 and P.linear_width(five) == 57
    assert P.refused(four, msr, NONCANON_48) and not P.refused(five, msr, NONCANON_48)
    assert P.refused(five, msr, NONCANON_57)
    for ok in (0, 0x7FFFFFFFF000, 0xFFFF800000000000):
        assert not P.refused(four, msr, ok)


def test_unknown_msrs_are_not_the_policys():
    assert P.rule(UNKNOWN_MSR) is None and not P.refused(table(), UNKNOWN_MSR)


def test_refused_msrs_is_what_a_filter_must_deny():
    reads, writes = P.refused_msrs(table("lm", "mtrr", "mca"))
    assert P.MSR_SPEC_CTRL in reads and P.MSR_SPEC_CTRL in writes
    assert P.MSR_PRED_CMD in reads and P.MSR_PRED_CMD in writes
    assert P.MSR_MTRRCAP not in reads and P.MSR_MTRRCAP in writes
    assert P.MSR_FS_BASE not in writes, "value checks are the kernel's (or the ops layer's)"


class FakeVcpu:
    """The NVMM vCPU ArchMsrs talks to: a TSC in ``state.msrs`` and a CPUID function."""

    def __init__(self, cpuid, tsc=1000):
        self.guest_cpuid = cpuid
        self.state = type("S", (), {"msrs": [0] * C.NVMM_X64_NMSR})()
        self.state.msrs[C.NVMM_X64_MSR_TSC] = tsc
        self.committed = 0

    def getstate(self, flags):
        pass

    def setstate(self, flags):
        self.committed |= flags

    @property
    def tsc(self):
        return self.state.msrs[C.NVMM_X64_MSR_TSC]


def test_tsc_adjust_moves_the_tsc_and_a_tsc_write_moves_tsc_adjust():
    nv = FakeVcpu(table("tsc_adjust"))
    arch = ArchMsrs(nv)
    assert arch.access(P.MSR_TSC_ADJUST) == (True, 0)
    arch.access(P.MSR_TSC_ADJUST, 500)
    assert nv.tsc == 1500 and nv.committed & C.NVMM_X64_STATE_MSRS
    arch.access(P.MSR_TSC_ADJUST, 200)
    assert nv.tsc == 1200, "moved by the difference"
    nv.state.msrs[C.NVMM_X64_MSR_TSC] = 5000           # time passes
    arch.access(P.MSR_TSC, 4000)
    assert nv.tsc == 4000 and arch.access(P.MSR_TSC_ADJUST) == (True, (200 - 1000) & (2**64 - 1))
    assert arch.access(P.MSR_TSC) == (True, 4000)


def test_tsc_adjust_is_per_vcpu():
    a, b = FakeVcpu(table("tsc_adjust")), FakeVcpu(table("tsc_adjust"))
    ArchMsrs(a).access(P.MSR_TSC_ADJUST, 7)
    assert ArchMsrs(b).access(P.MSR_TSC_ADJUST) == (True, 0) and b.tsc == 1000


def test_refused_kernel_kept_and_user_msrs():
    arch = ArchMsrs(FakeVcpu(table("lm", "mtrr")))
    for msr, value in ((P.MSR_SPEC_CTRL, None), (P.MSR_TSC_ADJUST, 1), (P.MSR_FS_BASE, NONCANON_48),
                       (P.MSR_EFER, 0), (P.MSR_LSTAR, None)):
        with pytest.raises(MsrGP):
            arch.access(msr, value)
    assert arch.access(P.MSR_MTRRCAP) == (False, None), "userland's table answers it"
    assert arch.access(UNKNOWN_MSR) == (False, None)


def test_spec_ctrl_keeps_its_value_when_offered():
    arch = ArchMsrs(FakeVcpu(table("ibrs_ibpb", "ssbd", "arch_capabilities")))
    arch.access(P.MSR_SPEC_CTRL, P.SPEC_CTRL_SSBD)
    assert arch.access(P.MSR_SPEC_CTRL) == (True, P.SPEC_CTRL_SSBD)
    assert arch.access(P.MSR_PRED_CMD, P.PRED_CMD_IBPB) == (True, None)
    assert arch.access(P.MSR_ARCH_CAPABILITIES) == (True, 0)
    with pytest.raises(MsrGP):
        arch.access(P.MSR_SPEC_CTRL, P.SPEC_CTRL_STIBP)


def test_no_cpuid_view_no_refusal():
    arch = ArchMsrs(object())
    assert arch.access(P.MSR_SPEC_CTRL) == (False, None)


def test_filter_groups_denials_into_ranges():
    userland = ((0x1B, 1), (0x800, 0x100))
    spans = msr_filter.ranges(userland, {0x48, 0x49}, {0x48, 0x49, 0xFE})
    assert len(spans) == 2, "one window, the two directions differ"
    flags = {s[0]: s for s in spans}
    _, base, n, rd = flags[K.KVM_MSR_FILTER_READ]
    _, _, _, wr = flags[K.KVM_MSR_FILTER_WRITE]
    assert base == 0x1B and n == 0x8FF - 0x1B + 1 and len(rd) % msr_filter.BITMAP_ALIGN == 0

    def allowed(bits, msr):
        return bool(bits[(msr - base) // 8] >> ((msr - base) % 8) & 1)
    assert not allowed(rd, 0x48) and not allowed(rd, 0x1B) and allowed(rd, 0xFE) and not allowed(wr, 0xFE)
    assert allowed(rd, 0x3B) and allowed(wr, 0x3B)


def test_filter_merges_equal_directions_and_splits_far_msrs():
    spans = msr_filter.ranges((), {0x48, 0xC0000103}, {0x48, 0xC0000103})
    assert [(s[0], s[1], s[2]) for s in spans] == [(msr_filter.BOTH, 0x48, 1), (msr_filter.BOTH, 0xC0000103, 1)]
    buf, bitmaps = msr_filter.build((), {0x48}, {0x48})
    assert len(bitmaps) == 1 and struct.unpack_from("<I", buf, 0)[0] == K.KVM_MSR_FILTER_DEFAULT_ALLOW


def test_probe_overlay_replaces_only_the_registers_the_kernel_answers():
    base = table_lookup([[0x7, 0, 1, 1, 0x1, 0x2, 0x3], [0x1, 0, 0, 0x11, 0x22, 0x33, 0x44]])
    view = overlay(base, {(0x7, 0): (9, 9, 9, 9), (0x1, 0): (8, 8, 8, 8)},
                   own={(0x7, 0): (EBX, ECX, EDX), (0x1, 0): (ECX,)})
    assert view(0x7, 0) == (1, 9, 9, 9) and view(0x1, 0) == (0x11, 0x22, 8, 0x44)
    assert view(0x7, 1) == (0, 0, 0, 0), "an absent subleaf answers zeros"
