"""KVM's PV EOI (``ops/kvm_para.py``) on every provider, with a real guest: LAPIC timer interrupts whose handler
ends them as Linux's ``kvm_guest_apic_eoi_write`` does (clear bit 0 of the PV EOI word with one instruction;
write the APIC's EOI register only when the bit was not set). The next interrupt of the same vector can only
arrive if the ops layer did the EOI the guest signalled in memory. Bad PV EOI addresses #GP, as in KVM."""

import struct

import pytest

from ops import kvm_para
from ops.nvmm import constants as C
from tests.guests.vmboot import boot64, gate, idt
from vmmshim.vm import EXIT_HALT

OUT, WORD = 0x8000, 0x8400
TICKS = 4

TIMER_GUEST = gate(0x40, "timer_handler") + f"""
  lidt idtr
  mov ${kvm_para.MSR_KVM_PV_EOI_EN:#x}, %ecx
  mov ${WORD | kvm_para.KVM_MSR_ENABLED:#x}, %eax
  xor %edx, %edx
  wrmsr
  mov $0xFEE00000, %esi
  movl $0x1ff, 0xF0(%rsi)       # SVR: APIC software enabled
  movl $0x0b, 0x3E0(%rsi)       # divide by 1
  movl $0x40, 0x320(%rsi)       # LVT timer: one-shot, vector 0x40 (edge)
  movl $0x20000, 0x380(%rsi)
wait:
  sti
  hlt
  cli
  cmpl ${TICKS}, {OUT}
  jb wait
  hlt
timer_handler:
  incl {OUT}
  btrl $0, {WORD}               # the guest's PV EOI: test and clear in one instruction
  jc 1f
  incl {OUT + 8}                # the bit was not set: a real EOI
  movl $0, 0xB0(%rsi)
  jmp 2f
1:
  incl {OUT + 4}
2:
  cmpl ${TICKS}, {OUT}
  jae 3f
  movl $0x20000, 0x380(%rsi)    # the next one-shot
3:
  iretq
""" + idt(0x41)


def test_pv_eoi_ends_interrupts_without_apic_writes(make_vm):
    vm = make_vm(kvm_pv=True, pv_eoi=True)
    boot64(vm, TIMER_GUEST)
    assert vm.run(timeout=30) == EXIT_HALT, vm.error
    ticks, pv, apic = struct.unpack_from("<3I", vm.view(OUT, 12))
    assert ticks == TICKS, "an interrupt ended in memory kept the vector in service"
    assert pv == TICKS and apic == 0, "each lone edge-triggered interrupt is offered PV EOI"
    assert struct.unpack_from("<I", vm.view(WORD, 4))[0] == 0
    ctx = vm.vmi.vcpus[0]
    assert ctx.vlapic.read(0x100 + 0x10 * (0x40 >> 5), 4) == 0, "nothing left in service"


def test_the_apic_shows_an_interrupt_ended_in_memory_as_ended(make_vm):
    """Right after its PV EOI the handler reads the in-service register of its vector through the APIC page
    (an exit): it must read 0, as KVM syncs the PV EOI word on every exit."""
    vm = make_vm(kvm_pv=True, pv_eoi=True)
    isr_0x40 = 0x100 + 0x10 * (0x40 >> 5)
    boot64(vm, TIMER_GUEST.replace(f"  incl {OUT + 4}\n",
                                   f"  incl {OUT + 4}\n  mov {isr_0x40:#x}(%rsi), %eax\n  or %eax, {OUT + 12}\n"))
    assert vm.run(timeout=30) == EXIT_HALT, vm.error
    ticks, pv, apic, isr_seen = struct.unpack_from("<4I", vm.view(OUT, 16))
    assert (ticks, pv, apic) == (TICKS, TICKS, 0)
    assert isr_seen == 0, "the APIC still showed the vector in service after the guest's PV EOI"


@pytest.mark.parametrize("opts", [dict(kvm_pv=False), dict(kvm_pv=True)])
def test_without_pv_eoi_the_guest_writes_the_apic(make_vm, opts):
    """With the interface off, or PV EOI not asked for (the default), the MSR #GPs (skipped here) and every
    EOI is an APIC write."""
    vm = make_vm(**opts)
    boot64(vm, TIMER_GUEST.replace("  wrmsr\n", "  nop\n", 1))
    assert vm.run(timeout=30) == EXIT_HALT, vm.error
    ticks, pv, apic = struct.unpack_from("<3I", vm.view(OUT, 12))
    assert (ticks, pv, apic) == (TICKS, 0, TICKS)


@pytest.mark.parametrize("value", [WORD | 2 | 1, 0x8402 | 1, (1 << 40) | 1])
def test_bad_pv_eoi_words_gp(make_vm, value):
    """Reserved bit 1, a misaligned word, a word outside RAM: #GP (KVM refuses these writes)."""
    vm = make_vm(kvm_pv=True, pv_eoi=True)
    boot64(vm, gate(13, "gp_handler") + f"""
  lidt idtr
  mov ${kvm_para.MSR_KVM_PV_EOI_EN:#x}, %ecx
  mov ${value & 0xFFFFFFFF:#x}, %eax
  mov ${value >> 32:#x}, %edx
  wrmsr
  movl $1, {OUT}
  cli
  hlt
gp_handler:
  movl $0xbad6, {OUT}
  cli
  hlt
""" + idt(14))
    assert vm.run(timeout=30) == EXIT_HALT, vm.error
    assert struct.unpack_from("<I", vm.view(OUT, 4))[0] == 0xBAD6


def test_pv_eoi_msr_reads_back(make_vm):
    vm = make_vm(kvm_pv=True, pv_eoi=True)
    boot64(vm, f"""
  mov ${kvm_para.MSR_KVM_PV_EOI_EN:#x}, %ecx
  mov ${WORD | 1:#x}, %eax
  xor %edx, %edx
  wrmsr
  xor %eax, %eax
  rdmsr
  mov %eax, {OUT}
  cli
  hlt
""")
    assert vm.run(timeout=30) == EXIT_HALT, vm.error
    assert struct.unpack_from("<I", vm.view(OUT, 4))[0] == WORD | 1
    assert vm.vmi.vcpus[0].exits[C.NVMM_VCPU_EXIT_WRMSR & 0xFFFF] == 1
