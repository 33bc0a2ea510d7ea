"""KVM's structures and ioctl numbers: sizes from the construct declarations, numbers from _IOC, offsets of
kvm_run, and the register conversions between KVM's and NVMM's orders."""

from hypothesis import given, strategies as st

from ops.nvmm import constants as C
from ops.nvmm import state as S
from ops.nvmm.kvm import ioctls as K
from ops.nvmm.kvm import layouts as L


def test_ioctl_numbers_match_linux_headers():
    # values printed by a C program including <linux/kvm.h> on x86_64
    assert K.KVM_GET_API_VERSION == 0xAE00 and K.KVM_CREATE_VM == 0xAE01 and K.KVM_RUN == 0xAE80
    assert K.KVM_SET_USER_MEMORY_REGION == 0x4020AE46
    assert K.KVM_GET_REGS == 0x8090AE81 and K.KVM_SET_REGS == 0x4090AE82
    assert K.KVM_GET_SREGS == 0x8138AE83 and K.KVM_SET_SREGS == 0x4138AE84
    assert K.KVM_INTERRUPT == 0x4004AE86 and K.KVM_SET_CPUID2 == 0x4008AE90
    assert K.KVM_GET_SUPPORTED_CPUID == 0xC008AE05
    assert K.KVM_GET_VCPU_EVENTS == 0x8040AE9F and K.KVM_SET_VCPU_EVENTS == 0x4040AEA0
    assert K.KVM_ENABLE_CAP == 0x4068AEA3 and K.KVM_X86_SET_MSR_FILTER == 0x4188AEC6
    assert K.KVM_GET_XSAVE == 0x9000AEA4 and K.KVM_GET_MSRS == 0xC008AE88
    assert K.KVM_REGISTER_COALESCED_MMIO == 0x4010AE67 and K.KVM_UNREGISTER_COALESCED_MMIO == 0x4010AE68


@given(st.integers(0, 2**64 - 1), st.integers(0, 8), st.integers(0, 1), st.binary(min_size=8, max_size=8))
def test_coalesced_ring_entry_round_trip(addr, n, pio, data):
    """The ring entry the provider unpacks with a struct format is the construct layout, field for field."""
    raw = L.KVM_COALESCED_MMIO.build(dict(phys_addr=addr, len=n, pio=pio, data=data))
    assert L.RING_ENTRY_FMT.unpack(raw) == (addr, n, pio, data)
    assert L.KVM_COALESCED_MMIO.parse(L.RING_ENTRY_FMT.pack(addr, n, pio, data)).phys_addr == addr
    assert L.KVM_COALESCED_MMIO_ZONE.sizeof() == 16 and L.RING_HDR_FMT.size == 8


def test_kvm_run_offsets():
    hdr = L.KVM_RUN_HEADER
    offs, pos = {}, 0
    for sub in hdr.subcons:
        if sub.name:
            offs[sub.name] = pos
        pos += sub.sizeof()
    assert offs["exit_reason"] == L.RUN_EXIT_REASON and offs["cr8"] == L.RUN_CR8
    assert offs["u"] == L.RUN_U and offs["kvm_valid_regs"] == L.RUN_VALID_REGS
    assert offs["s"] == L.RUN_S_REGS and L.RUN_S_SREGS == 304 + 144 and L.RUN_S_EVENTS == 304 + 144 + 312


@given(st.lists(st.integers(0, 2**64 - 1), min_size=18, max_size=18))
def test_gprs_conversion_round_trip(values):
    state = S.State()
    L.regs_to_gprs(values, state.gprs)
    assert state.gprs[C.NVMM_X64_GPR_RBX] == values[1] and state.gprs[C.NVMM_X64_GPR_RSP] == values[6]
    assert L.gprs_to_regs(state.gprs) == values


@given(st.integers(0, 0xFFF))
def test_segment_attrib_round_trip(attrib):
    assert L.kvm_seg_to_attrib(*L.attrib_to_kvm_seg(attrib)) == attrib


def test_unusable_segment_is_not_present():
    assert not L.kvm_seg_to_attrib(3, 1, 0, 1, 1, 0, 1, 0, 1) & S.ATTRIB_P
    assert L.attrib_to_kvm_seg(0x93)[-1] == 0 and L.attrib_to_kvm_seg(0x13)[-1] == 1


def test_sregs_state_round_trip():
    sregs = list(range(1, L.SREGS_FMT.size))[:len(L.SREGS_FMT.unpack(bytes(L.SREGS_FMT.size)))]
    sregs = [v & 0xFF for v in sregs]
    state = S.State()
    L.sregs_to_state(sregs, state)
    back = L.state_to_sregs(state, [0] * len(sregs))
    # every field NVMM keeps comes back (the padding-free fields of the segments, descriptors and CRs)
    for j in range(8):
        base, limit, sel = back[12 * j:12 * j + 3]
        assert (base, limit, sel) == tuple(sregs[12 * j:12 * j + 3])
    assert back[96:100] == [sregs[96], sregs[97] & 0xFFFF, sregs[98], sregs[99] & 0xFFFF]
    assert back[100:105] == sregs[100:105]
