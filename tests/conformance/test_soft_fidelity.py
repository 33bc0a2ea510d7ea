"""The soft CPU as the regression baseline (issue 24): guests that once behaved differently there than on KVM,
run on every provider, which must agree. This file: an AP started by INIT-SIPI in real mode that does port I/O
and MSR accesses (the whole VM through ``vmmshim -c 2`` too), IPI rounds with such an AP after its trampoline took
it to long mode, the TPR in CR8 masking an interrupt, and the single-step trap (RFLAGS.TF, Intel SDM vol. 3B
17.3.1.4) after instructions that exit. ``test_soft_fidelity_cpu.py`` holds the instruction-set ones."""

import os
import struct
import subprocess
import sys

from tests.guests.asm import assemble, multiboot_elf
from tests.guests.vmboot import boot64, gate, idt
from vmmshim.vm import EXIT_HALT

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULT = 0x8800                 # results the guests leave (below the trampoline's page and above the GDT)
TRAMPOLINE = 0x8000             # SIPI vector 0x08: the AP starts at 0800:0000 in real mode
SIPI = 0x00004608
INIT = 0x00004500
LAPIC = 0xFEE00000
COM = 0x3F8
LSR_THRE = 0x20
MSR_APIC_BASE = 0x1B
APIC_BASE_BSP, APIC_BASE_ENABLE = 1 << 8, 1 << 11
EXIT_STATUS_HALT = 2            # bhyve's exit status when every vCPU halted


def results(vm, n):
    return struct.unpack_from(f"<{n}I", vm.view(RESULT, 4 * n))


class Uart:
    """The transmit side of a 16550 as a test device: LSR says the holding register is empty, THR bytes kept."""

    def __init__(self):
        self.out = bytearray()

    def read(self, offset, size):
        return LSR_THRE if offset == 5 else 0

    def write(self, offset, size, value):
        if offset == 0:
            self.out.append(value & 0xFF)


def start_ap(vector_word=SIPI):
    """BSP code: INIT then SIPI to APIC id 1."""
    return f"""
  mov ${LAPIC}, %esi
  movl $0x01000000, 0x310(%rsi)
  movl ${INIT}, 0x300(%rsi)
  movl ${vector_word}, 0x300(%rsi)
"""


# The AP's real-mode code, linked at the trampoline with DS = 0 (CS = 0800h, IP from 0, so CS's base is not 0):
# it reads IA32_APIC_BASE (an MSR exit on every provider), polls the LSR (IN) and writes a line (OUT), then halts.
REAL_MODE_AP = f"""
.code16
  cli
  xor %ax, %ax
  mov %ax, %ds
  mov ${MSR_APIC_BASE}, %ecx
  rdmsr
  mov %eax, {RESULT}
  mov $msg, %si
1: lodsb
  test %al, %al
  jz 3f
  mov %al, %bl
  mov ${COM + 5}, %dx
2: in %dx, %al
  test ${LSR_THRE}, %al
  jz 2b
  mov ${COM}, %dx
  mov %bl, %al
  out %al, %dx
  jmp 1b
3: movl $1, {RESULT + 4}
  cli
  hlt
msg: .asciz "AP in real mode\\n"
"""


def test_ap_started_in_real_mode_does_port_io_and_halts(make_vm):
    vm = make_vm(ncpus=2)
    uart = Uart()
    vm.add_port_device(COM, 8, uart, "uart")
    vm.load(TRAMPOLINE, assemble(REAL_MODE_AP, TRAMPOLINE))
    boot64(vm, start_ap() + "  cli\n  hlt\n")
    assert vm.run(timeout=60) == EXIT_HALT, vm.error
    apic_base, done = results(vm, 2)
    assert bytes(uart.out) == b"AP in real mode\n"
    assert done == 1
    assert apic_base & (APIC_BASE_BSP | APIC_BASE_ENABLE) == APIC_BASE_ENABLE, hex(apic_base)


# The same as a whole VM: a multiboot kernel that prints from the BSP, starts the AP with INIT-SIPI and lets it
# print from real mode; both halt, so the VM ends with status 2.
SMP_KERNEL = rf"""
.code32
.section .text
.globl _start
.align 4
  .long 0x1BADB002, 0x3, -(0x1BADB002 + 0x3)
_start:
  mov $0x200000, %esp
  mov $bsp_msg, %esi
  call puts
  mov $ap, %esi                  # the AP's code goes to the trampoline page
  mov ${TRAMPOLINE}, %edi
  mov $(ap_end - ap), %ecx
  rep movsb
  mov ${LAPIC}, %esi
  movl $0x01000000, 0x310(%esi)
  movl ${INIT}, 0x300(%esi)
  movl ${SIPI}, 0x300(%esi)
  cli
  hlt
puts:
  lodsb
  test %al, %al
  jz 2f
  mov %al, %cl
  mov ${COM + 5}, %dx
1: in %dx, %al
  test ${LSR_THRE}, %al
  jz 1b
  mov ${COM}, %dx
  mov %cl, %al
  out %al, %dx
  jmp puts
2: ret
bsp_msg: .asciz "smp guest: BSP\n"
ap:
.code16
  mov %cs, %ax
  mov %ax, %ds
  mov $(ap_msg - ap), %si
3: lodsb
  test %al, %al
  jz 5f
  mov %al, %cl
  mov ${COM + 5}, %dx
4: in %dx, %al
  test ${LSR_THRE}, %al
  jz 4b
  mov ${COM}, %dx
  mov %cl, %al
  out %al, %dx
  jmp 3b
5: cli
  hlt
ap_msg: .asciz "smp guest: AP\n"
ap_end:
"""


def test_smp_multiboot_guest_ap_prints_and_the_vm_halts(provider, tmp_path):
    kernel = multiboot_elf(SMP_KERNEL, str(tmp_path))
    p = subprocess.run([sys.executable, "-m", "vmmshim", "-c", "2", "-o", f"vmmshim.provider={provider.name}",
                        "-m", "64M", "-l", "com1,stdio", "-f", f"multiboot,{kernel}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert p.stdout.splitlines() == ["smp guest: BSP", "smp guest: AP"], p.stderr
    assert p.returncode == EXIT_STATUS_HALT, p.stderr


# A trampoline as an OS has one: real mode (with a POST-code OUT, an exit), protected mode, then long mode on the
# page tables boot64 built, and a far jump into the 64-bit program at {ap64}.
TRAMPOLINE_TO_LONG_MODE = """
.code16
  cli
  xor %ax, %ax
  mov %ax, %ds
  mov $0x11, %al
  out %al, $0x80
  lgdtl gdtr
  mov %cr0, %eax
  or $1, %eax
  mov %eax, %cr0
  ljmpl $0x18, $pm32
.code32
pm32:
  mov $0x10, %ax
  mov %ax, %ds
  mov %ax, %es
  mov %ax, %ss
  mov %cr4, %eax
  or $0x20, %eax                 # PAE
  mov %eax, %cr4
  mov $0x1000, %eax              # boot64's PML4
  mov %eax, %cr3
  mov $0xc0000080, %ecx
  rdmsr
  or $0x100, %eax                # EFER.LME
  wrmsr
  mov %cr0, %eax
  or $0x80000000, %eax
  mov %eax, %cr0
  ljmp $0x08, ${ap64}
.align 8
gdt:
  .quad 0, 0x00AF9A000000FFFF, 0x00CF92000000FFFF, 0x00CF9A000000FFFF
gdtr:
  .word 31
  .long gdt
"""
ROUNDS = 20


def test_ipi_rounds_with_an_ap_from_a_real_mode_trampoline(make_vm):
    vm = make_vm(ncpus=2)
    sym = boot64(vm, gate(0x50, "pong") + gate(0x51, "ping") + gate(0x52, "wake") + start_ap() + f"""
  lidt idtr
  movl $0x1ff, 0xF0(%rsi)
  xor %ebx, %ebx
1: cli
  cmpl $1, {RESULT + 8}           # the AP is up
  je 2f
  sti
  pause
  jmp 1b
2: movl $0x01000000, 0x310(%rsi)
  movl $0x00004051, 0x300(%rsi)  # ping the AP
3: cmpl %ebx, {RESULT}            # wait for its pong: STI; HLT opens the window only at the HLT
  jne 4f
  sti
  hlt
  cli
  jmp 3b
4: mov {RESULT}, %ebx
  cmp ${ROUNDS}, %ebx
  jb 2b
  movl $1, {RESULT + 12}
  movl $0x00004052, 0x300(%rsi)  # wake the AP to stop
  cli
  hlt
.globl ap64
ap64:
  mov $0xA000, %rsp
  lidt idtr
  mov ${LAPIC}, %esi
  movl $0x1ff, 0xF0(%rsi)
  movl $1, {RESULT + 8}
5: cli
  cmpl $1, {RESULT + 12}
  je 6f
  sti
  hlt
  jmp 5b
6: hlt
ping:
  incl {RESULT + 4}
  movl $0, 0x310(%rsi)
  movl $0x00004050, 0x300(%rsi)  # pong to the BSP
  movl $0, 0xB0(%rsi)
  iretq
pong:
  incl {RESULT}
  movl $0, 0xB0(%rsi)
  iretq
wake:
  movl $0, 0xB0(%rsi)
  iretq
""" + idt(0x53))
    vm.load(TRAMPOLINE, assemble(TRAMPOLINE_TO_LONG_MODE.replace("{ap64}", hex(sym["ap64"])), TRAMPOLINE))
    assert vm.run(timeout=60) == EXIT_HALT, vm.error
    pongs, pings, up, _ = results(vm, 4)
    assert (pings, pongs, up) == (ROUNDS, ROUNDS, 1)


def test_tpr_in_cr8_masks_an_interrupt(make_vm):
    """CR8 is the TPR's priority class (Intel SDM vol. 3A 10.8.6.1): with CR8 = 15 a fixed interrupt of class 5
    waits in the IRR; with CR8 = 0 it is taken. The LAPIC's TPR register and CR8 are one register."""
    vm = make_vm()
    boot64(vm, gate(0x50, "handler") + f"""
  lidt idtr
  mov ${LAPIC}, %esi
  movl $0x1ff, 0xF0(%rsi)
  mov $15, %eax
  mov %rax, %cr8
  mov %cr8, %rax
  mov %eax, {RESULT + 4}
  mov 0x80(%rsi), %eax           # the TPR register after a CR8 write
  mov %eax, {RESULT + 8}
  movl $0x00044050, 0x300(%rsi)  # self IPI, vector 0x50 (class 5)
  sti
  nop
  mov $0x10, %eax                # more instructions with IF = 1
  cli
  mov {RESULT}, %eax
  mov %eax, {RESULT + 12}        # taken while masked: 0
  movl $0x30, 0x80(%rsi)         # TPR class 3 through the register
  mov %cr8, %rax
  mov %eax, {RESULT + 16}
  xor %eax, %eax
  mov %rax, %cr8
  sti
  hlt                            # woken by the interrupt, now deliverable
  cli
  mov {RESULT}, %eax
  mov %eax, {RESULT + 20}
  hlt
handler:
  incl {RESULT}
  movl $0, 0xB0(%rsi)
  iretq
""" + idt(0x51))
    assert vm.run(timeout=60) == EXIT_HALT, vm.error
    _, cr8, tpr, masked, cr8_from_tpr, taken = results(vm, 6)
    assert cr8 == 15, "CR8 did not keep its value"
    assert tpr == 0xF0, f"the TPR register does not follow CR8: {tpr:#x}"
    assert masked == 0, "the interrupt was delivered although the TPR masks it"
    assert cr8_from_tpr == 3, f"CR8 does not follow the TPR register: {cr8_from_tpr}"
    assert taken == 1


#: The instructions single-stepped (an OUT is left out: kvm_pvm, whose OUT exits come with RIP already past the
#: instruction, gives no trap after it; the soft provider's unit tests step one).
STEPPED = ("nop", "xor %eax, %eax", "cpuid", "in $0x80, %al", f"mov ${MSR_APIC_BASE}, %ecx",
           "rdmsr", "mov 0x30(%rsi), %ebx", "wrmsr", "mov $1, %ebx")


def test_single_step_traps_after_exiting_instructions(make_vm):
    """With TF set, a #DB trap follows every instruction, also those the hypervisor completes (CPUID, IN,
    RDMSR/WRMSR of IA32_APIC_BASE, an MMIO read of the LAPIC); DR6.BS says why."""
    vm = make_vm()
    steps = "".join(f"  {insn}\n.globl s{i}\ns{i}:\n" for i, insn in enumerate(STEPPED))
    sym = boot64(vm, gate(1, "db") + f"""
  lidt idtr
  mov ${LAPIC}, %esi
  pushfq
  orq $0x100, (%rsp)
  popfq                          # the first trap comes after the instruction after POPF
""" + steps + f"""
  cli
  hlt
db:
  push %rax
  push %rbx
  mov {RESULT}, %eax
  mov 16(%rsp), %rbx             # the return RIP: the instruction after the one that trapped
  mov %ebx, {RESULT + 8}(,%rax,4)
  mov %dr6, %rbx
  and $0x4000, %ebx              # DR6.BS
  or %ebx, {RESULT + 4}
  xor %ebx, %ebx
  mov %rbx, %dr6
  incl {RESULT}
  pop %rbx
  pop %rax
  iretq
""" + idt(2))
    assert vm.run(timeout=60) == EXIT_HALT, vm.error
    n, bs, *rips = results(vm, 2 + 2 * len(STEPPED))
    want = [sym[f"s{i}"] for i in range(len(STEPPED))]
    assert rips[:len(want)] == want, [hex(r) for r in rips[:n]]
    assert bs == 0x4000, "DR6.BS not set by the single-step trap"
