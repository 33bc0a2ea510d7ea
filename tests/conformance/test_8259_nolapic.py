"""The 8259 with the local APIC off (issue 24, item 4), on every provider: what a Linux guest booted with
``nolapic`` (or a kexec guest, with no firmware to program LINT0) relies on.

Intel SDM vol. 3A 10.4.7.2 "Local APIC State After It Has Been Software Disabled" and 10.5.1 "Local Vector Table",
as bhyve's ``vlapic_trigger_lvt``: while the local APIC is not enabled (hardware-disabled through IA32_APIC_BASE, or
software-disabled as after reset, its LVTs masked) LINT0 is the plain INTR pin, so the 8259's interrupts reach the
CPU; a vCPU halted with interrupts enabled wakes for them. Once the guest enables the APIC, LINT0 follows its LVT:
masked, nothing passes; ExtINT, the 8259's interrupts pass again. The PIT ticks at 1 kHz on IRQ0."""

import pytest

from tests.conformance.test_platform_guest import IDT, RESULT, platform_vm, results  # noqa: F401
from tests.guests.vmboot import boot64, gate
from vmmshim.vm import EXIT_HALT

PIT_COUNT = 1193182 // 1000
TICKS = 5
PIC_VECTOR = 0x20

PIC_AND_PIT = f"""
  mov $0x11, %al               # ICW1: edge, cascade, ICW4 follows
  out %al, $0x20
  mov ${PIC_VECTOR:#x}, %al    # ICW2: vectors 0x20-0x27
  out %al, $0x21
  mov $0x04, %al               # ICW3: slave on IRQ2
  out %al, $0x21
  mov $0x01, %al               # ICW4: 8086 mode
  out %al, $0x21
  mov $0xfe, %al               # OCW1: only IRQ0 unmasked
  out %al, $0x21
  mov $0x34, %al               # PIT channel 0, lobyte/hibyte, mode 2
  out %al, $0x43
  mov ${PIT_COUNT & 0xFF}, %al
  out %al, $0x40
  mov ${PIT_COUNT >> 8}, %al
  out %al, $0x40
"""
WAIT = {
    "sti-hlt": f"""
1:cli
  cmpl ${TICKS}, {RESULT}
  jae 2f
  sti
  hlt
  jmp 1b
2:""",
    "spin": f"""
  sti
1:cmpl ${TICKS}, {RESULT}
  jb 1b
  cli""",
}
HANDLER = f"""
  cli
  hlt
pic_handler:
  incl {RESULT}
  push %rax
  mov $0x20, %al               # non-specific EOI to the master
  out %al, $0x20
  pop %rax
  iretq
"""
APIC_OFF = {
    "software-disabled": "",                   # the reset state: SVR 0xFF, every LVT masked
    "hardware-disabled": """
  mov $0x1b, %ecx
  rdmsr
  and $0xfffff7ff, %eax        # IA32_APIC_BASE.EN clear
  wrmsr""",
}


@pytest.mark.parametrize("wait", sorted(WAIT))
@pytest.mark.parametrize("apic", sorted(APIC_OFF))
def test_8259_interrupts_reach_a_cpu_whose_apic_is_off(platform_vm, apic, wait):   # noqa: F811
    vm = platform_vm()
    boot64(vm, gate(PIC_VECTOR, "pic_handler") + "\n  lidt idtr" + APIC_OFF[apic] + PIC_AND_PIT + WAIT[wait] +
           HANDLER + IDT)
    status = vm.run(timeout=30)
    assert status == EXIT_HALT, (vm.error, results(vm, 1))
    assert results(vm, 1)[0] >= TICKS


def test_lint0_follows_its_lvt_once_the_apic_is_enabled(platform_vm):   # noqa: F811
    """Software-enabled with LINT0 masked, the 8259's ticks do not reach the CPU (the LAPIC timer wakes it after
    20 ms to look); LINT0 set to ExtINT lets them through."""
    vm = platform_vm()
    boot64(vm, gate(PIC_VECTOR, "pic_handler") + gate(0x40, "timer_handler") + """
  lidt idtr
  mov $0xFEE00000, %esi
  movl $0x1ff, 0xF0(%rsi)      # software enabled; LVT LINT0 stays masked
""" + PIC_AND_PIT + f"""
  movl $0xB, 0x3E0(%rsi)       # LAPIC timer: divide by 1, one-shot, 20 ms
  movl $0x40, 0x320(%rsi)
  movl ${128 * 1024 * 1024 // 50}, 0x380(%rsi)
1:cli
  cmpl $1, {RESULT + 4}
  jae 2f
  sti
  hlt
  jmp 1b
2:mov {RESULT}, %eax
  mov %eax, {RESULT + 8}       # the 8259's ticks while LINT0 was masked
  movl $0x700, 0x350(%rsi)     # LVT LINT0: ExtINT, unmasked
  movl $0, {RESULT}""" + WAIT["sti-hlt"] + HANDLER + """
timer_handler:
  incl {timer}
  movl $0, 0xB0(%rsi)
  iretq
""".format(timer=RESULT + 4) + IDT)
    status = vm.run(timeout=30)
    ticks, timer, masked = results(vm, 3)
    assert status == EXIT_HALT, (vm.error, ticks, timer, masked)
    assert masked == 0, "the 8259 reached the CPU through a masked LINT0 of an enabled APIC"
    assert ticks >= TICKS
