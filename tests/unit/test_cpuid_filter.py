"""The CPUID table a KVM vCPU gets: NVMM's default filter, the hypervisor leaf, APIC ids and the masks."""

import struct

from ops.nvmm.api import ConfCpuid
from ops.nvmm.kvm import cpuid as K

SUPPORTED = [
    [0x0, 0, 0, 0xD, 0x68747541, 0x444D4163, 0x69746E65],
    [0x1, 0, 0, 0x00A00F11, 0x05800800, 0xFFFFFFFF, 0xFFFFFFFF],
    [0x5, 0, 0, 0x40, 0x40, 3, 0x11],
    [0xB, 0, 0, 1, 2, 0x100, 7],
    [0x40000001, 0, 0, 1, 2, 3, 4],
    [0x80000001, 0, 0, 0, 0, 0xFFFFFFFF, 0xFFFFFFFF],
]


def leaf(table, fn):
    return next(e for e in table if e[0] == fn)


def test_nvmm_filter_hides_what_nvmm_hides():
    t = K.filtered(SUPPORTED, apic_id=3, masks={})
    ecx, edx = leaf(t, 1)[5], leaf(t, 1)[6]
    for bit in (K.L1_ECX_X2APIC, K.L1_ECX_TSC_DEADLINE, K.L1_ECX_MONITOR, K.L1_ECX_VMX, K.L1_ECX_PDCM):
        assert not ecx & bit
    for bit in (K.L1_EDX_MCE, K.L1_EDX_MCA, K.L1_EDX_MTRR):
        assert not edx & bit
    assert ecx & K.L1_ECX_HYPERVISOR
    assert not leaf(t, 0x80000001)[5] & K.EXT1_ECX_SVM
    assert all(e[0] != K.MWAIT_LEAF for e in t), "MONITOR/MWAIT leaf left visible"
    assert all(e[0] != 0x40000001 for e in t), "the host hypervisor's own leaves leak through"


def test_hypervisor_leaf_and_apic_ids():
    t = K.filtered(SUPPORTED, apic_id=3, masks={})
    hv = leaf(t, K.HYPERVISOR_LEAF)
    assert struct.pack("<3I", *hv[4:7]) == b"___ NVMM ___"
    assert leaf(t, 1)[4] >> 24 == 3 and leaf(t, 0xB)[6] == 3


def test_masks_apply_after_the_filter():
    masks = {1: ConfCpuid(leaf=1, mask=True, set=(0, 0, K.L1_ECX_X2APIC, 0), del_=(0, 0, 1, 0))}
    t = K.filtered(SUPPORTED, apic_id=0, masks=masks)
    assert leaf(t, 1)[5] & K.L1_ECX_X2APIC, "a vlapic offering x2APIC can set the bit back"
    assert not leaf(t, 1)[5] & 1
    assert K.filtered(SUPPORTED, 0, {})[1] == SUPPORTED[1][:4] + [SUPPORTED[1][4] & 0xFFFFFF] + \
        leaf(K.filtered(SUPPORTED, 0, {}), 1)[5:], "filter is a pure function of its inputs"


def test_masks_on_absent_hypervisor_leaves_add_them():
    """The host KVM's own 0x40000001 is dropped; a mask on 0x40000101 (the ops layer's paravirtual clock)
    makes an entry, as NVMM's kernel ORs ``set`` into its zero answer."""
    masks = {0x40000100: ConfCpuid(leaf=0x40000100, mask=True, set=(0x40000101, 1, 2, 3)),
             0x40000101: ConfCpuid(leaf=0x40000101, mask=True, set=(8, 0, 0, 0)),
             0x40000200: ConfCpuid(leaf=0x40000200, exit=True)}
    t = K.filtered(SUPPORTED, apic_id=0, masks=masks)
    assert leaf(t, 0x40000100)[3:] == [0x40000101, 1, 2, 3]
    assert leaf(t, 0x40000101)[3:] == [8, 0, 0, 0]
    assert all(e[0] not in (0x40000001, 0x40000200) for e in t)


EXT = [[0x80000001, 0, 0, 0, 0, 0, K.EXT1_EDX_FFXSR | (1 << 29)],
       [0x80000008, 0, 0, 0x3030, K.EXT8_EBX_CLZERO | K.EXT8_EBX_PSFD | (1 << 14), 0, 0]]


def test_a_kind_hides_what_it_cannot_run():
    pvm = K.filtered(EXT, apic_id=0, masks={}, kind="kvm_pvm")
    assert not leaf(pvm, 0x80000001)[6] & K.EXT1_EDX_FFXSR and leaf(pvm, 0x80000001)[6] & (1 << 29)
    assert not leaf(pvm, 0x80000008)[4] & K.EXT8_EBX_CLZERO
    other = K.filtered(EXT, apic_id=0, masks={}, kind="kvm_intel")
    assert leaf(other, 0x80000001)[6] & K.EXT1_EDX_FFXSR and leaf(other, 0x80000008)[4] & K.EXT8_EBX_CLZERO


def test_psfd_goes_with_spec_ctrl():
    assert leaf(K.filtered(EXT, 0, {}), 0x80000008)[4] & K.EXT8_EBX_PSFD, "AMD IBRS makes the MSR: PSFD stays"
    no_msr = [EXT[0], [0x80000008, 0, 0, 0x3030, K.EXT8_EBX_PSFD, 0, 0]]
    assert not leaf(K.filtered(no_msr, 0, {}), 0x80000008)[4] & K.EXT8_EBX_PSFD
