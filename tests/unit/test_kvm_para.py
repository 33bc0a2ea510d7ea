"""``ops/kvm_para.py`` as pure logic over a bytearray: the CPUID leaves, PV EOI arming and syncing, and the
vlapic's condition for offering it (one edge-triggered vector in service, nothing requested)."""

import struct

import pytest

from bhyve_devices.vlapic import Vlapic
from ops import kvm_para as K


def test_cpuid_leaves_carry_the_kvm_signature_and_features():
    leaves = K.cpuid_leaves(K.KVM_FEATURE_PV_EOI)
    eax, *sig = leaves[K.KVM_CPUID_SIGNATURE]
    assert eax == K.KVM_CPUID_FEATURES and struct.pack("<3I", *sig) == b"KVMKVMKVM\0\0\0"
    assert leaves[K.KVM_CPUID_FEATURES] == (K.KVM_FEATURE_PV_EOI, 0, 0, 0)


class Ram:
    def __init__(self):
        self.buf = bytearray(0x1000)
        self.eois = 0

    def view(self, gpa, size):
        if gpa < 0 or gpa + size > len(self.buf):
            raise OSError(14, "outside")
        return memoryview(self.buf)[gpa:gpa + size]

    def eoi(self):
        self.eois += 1

    def word(self, gpa=0x100):
        return struct.unpack_from("<I", self.buf, gpa)[0]


def test_arm_sync_cycle():
    ram = Ram()
    pv = K.PvEoi(ram.view, ram.eoi)
    pv.wrmsr(K.MSR_KVM_PV_EOI_EN, 0x100 | 1)
    struct.pack_into("<I", ram.buf, 0x100, 0xF0)         # the guest's other bits are never touched
    pv.arm()
    assert ram.word() == 0xF1 and pv.armed
    pv.sync()                                             # the guest did not end it: disarmed, no EOI
    assert ram.word() == 0xF0 and not pv.armed and ram.eois == 0
    pv.arm()
    struct.pack_into("<I", ram.buf, 0x100, 0xF0)          # the guest's btr
    pv.sync()
    assert ram.eois == 1 and not pv.armed


def test_rewriting_the_msr_while_armed_does_not_swallow_an_eoi():
    ram = Ram()
    pv = K.PvEoi(ram.view, ram.eoi)
    pv.wrmsr(K.MSR_KVM_PV_EOI_EN, 0x100 | 1)
    pv.arm()
    pv.wrmsr(K.MSR_KVM_PV_EOI_EN, 0)
    assert ram.word() == 0 and not pv.armed and pv.word is None and pv.rdmsr(0) == 0


@pytest.mark.parametrize("value", [0x102 | 1, 0x101 | 2, 0x1000 | 1, (1 << 63) | 1])
def test_bad_words_are_refused(value):
    ram = Ram()
    pv = K.PvEoi(ram.view, ram.eoi)
    with pytest.raises(K.PvEoiGP):
        pv.wrmsr(K.MSR_KVM_PV_EOI_EN, value)
    assert pv.word is None and pv.msr_value == 0


class NoTimers:
    def add(self, *a, **k):
        return None

    def cancel(self, *a, **k):
        pass


def test_vlapic_offers_pv_eoi_only_for_a_lone_edge_vector():
    vl = Vlapic(0, NoTimers())
    vl.write(0xF0, 4, 0x1FF)                  # software enabled
    assert vl.edge_in_service_before() is None      # nothing in service
    vl.set_intr_ready(0x40)
    vl.intr_accepted(0x40)
    assert vl.edge_in_service_before() is False     # alone, nothing requested
    vl.set_intr_ready(0x30)                   # a lower one requested: it waits for this EOI
    assert vl.edge_in_service_before() is True
    vl.write(0x80, 4, 0x30)                   # TPR at its class: the EOI alone would not deliver it
    assert vl.edge_in_service_before() is False
    vl.write(0x80, 4, 0)
    vl.intr_accepted(0x30)                    # two in service
    assert vl.edge_in_service_before() is None
    vl.eoi()
    vl.eoi()
    vl.set_intr_ready(0x50, level_triggered=True)
    vl.intr_accepted(0x50)
    assert vl.edge_in_service_before() is None, "a level-triggered vector needs its EOI broadcast at once"
    vl.eoi()
    assert vl.read(0x100 + 0x10 * (0x50 >> 5), 4) == 0
