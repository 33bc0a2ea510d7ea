"""The PC platform seen from a real guest (64-bit, through the ops table, the VM and the devices): PCI config
space through 0xCF8/0xCFC, the ACPI RSDP, the RTC, PIT interrupts through the vioapic and through the 8259
(ExtINT on LINT0), and a fixed IPI from one vCPU to another."""

import struct

import pytest

from tests.guests.vmboot import boot64, gate, idt, long_mode
from vmmshim.config import Config, parse_slot
from vmmshim.machine import build_pci_and_tables
from vmmshim.platform import Platform
from vmmshim.vm import EXIT_HALT

RESULT = 0x8000


@pytest.fixture
def platform_vm(make_vm):
    made = []

    def make(ncpus=1, acpi=False, slots=("0:0,hostbridge", "31,lpc")):
        vm = make_vm(ncpus=ncpus, memsize=32 << 20)
        cfg = Config()
        cfg.set("acpi_tables", "true" if acpi else "false")
        cfg.set("cpus", str(ncpus))
        for s in slots:
            parse_slot(s, cfg)
        plat = Platform(vm, utc=True)
        build_pci_and_tables(vm, cfg, plat)
        made.append(plat)
        return vm
    yield make
    for plat in made:
        plat.close()


def results(vm, n):
    return struct.unpack_from(f"<{n}I", vm.view(RESULT, 4 * n))


IDT = idt(0x60)


def test_pci_config_space_through_mechanism_1(platform_vm):
    vm = platform_vm()
    boot64(vm, f"""
  mov $0xcf8, %dx
  mov $0x80000000, %eax        # bus 0, slot 0, function 0, register 0
  out %eax, %dx
  mov $0xcfc, %dx
  in %dx, %eax
  mov %eax, {RESULT}
  mov $0xcf8, %dx
  mov $0x8000f808, %eax        # slot 31: class/revision
  out %eax, %dx
  mov $0xcfc, %dx
  in %dx, %eax
  mov %eax, {RESULT + 4}
  mov $0xcf8, %dx
  mov $0x8000f800, %eax        # slot 31: vendor/device
  out %eax, %dx
  mov $0xcfc, %dx
  in %dx, %eax
  mov %eax, {RESULT + 8}
  mov $0xcf8, %dx
  mov $0x80002000, %eax        # slot 4: nothing there
  out %eax, %dx
  mov $0xcfc, %dx
  in %dx, %eax
  mov %eax, {RESULT + 12}
  cli
  hlt
""")
    assert vm.run(timeout=60) == EXIT_HALT, vm.error
    hb, lpc_class, lpc_id, absent = results(vm, 4)
    assert hb == 0x12751275
    assert lpc_class >> 16 == 0x0601 and lpc_id == 0x70008086
    assert absent == 0xFFFFFFFF


def test_acpi_tables_are_in_guest_memory(platform_vm):
    vm = platform_vm(ncpus=2, acpi=True)
    rsdp = bytes(vm.view(0xF2400, 36))
    assert rsdp[:8] == b"RSD PTR " and sum(rsdp[:20]) % 256 == 0 and sum(rsdp) % 256 == 0
    xsdt = struct.unpack_from("<Q", rsdp, 24)[0]
    assert bytes(vm.view(xsdt, 4)) == b"XSDT"


def test_guest_reads_the_rtc(platform_vm):
    vm = platform_vm()
    boot64(vm, f"""
  mov $0x0b, %al
  out %al, $0x70
  in $0x71, %al
  mov %eax, {RESULT}
  mov $0x00, %al               # seconds
  out %al, $0x70
  in $0x71, %al
  mov %eax, {RESULT + 4}
  mov $0x32, %al               # century (CMOS 0x32)
  out %al, $0x70
  in $0x71, %al
  mov %eax, {RESULT + 8}
  cli
  hlt
""")
    assert vm.run(timeout=60) == EXIT_HALT, vm.error
    reg_b, sec, century = (v & 0xFF for v in results(vm, 3))
    if not reg_b & 0x04:                     # BCD unless DM is set
        assert sec >> 4 <= 5 and sec & 0xF <= 9
        assert century == 0x20
    else:
        assert sec < 60 and century == 20


PIT_AND_HANDLER = """
  mov $0x34, %al               # PIT channel 0, lobyte/hibyte, mode 2
  out %al, $0x43
  mov $0x9c, %al               # count 1193182 / 100 = 11932 (0x2e9c): 100 Hz
  out %al, $0x40
  mov $0x2e, %al
  out %al, $0x40
  sti
1:cmpl $3, {result}
  jb 1b
  cli
  hlt
pit_handler:
  incl {result}
  {eoi}
  iretq
"""


def test_pit_interrupt_through_the_ioapic(platform_vm):
    vm = platform_vm()
    boot64(vm, gate(0x30, "pit_handler") + """
  lidt idtr
  mov $0xFEE00000, %esi
  movl $0x1ff, 0xF0(%rsi)      # LAPIC software enabled
  mov $0xFEC00000, %edi
  movl $0x14, (%rdi)           # IOREGSEL: redirection entry for pin 2, low word
  movl $0x30, 0x10(%rdi)       # vector 0x30, fixed, edge, unmasked
  movl $0x15, (%rdi)
  movl $0x0, 0x10(%rdi)        # destination APIC 0
""" + PIT_AND_HANDLER.format(result=RESULT, eoi="movl $0, 0xB0(%rsi)") + IDT)
    assert vm.run(timeout=60) == EXIT_HALT, vm.error
    assert results(vm, 1)[0] >= 3


def test_pit_interrupt_through_the_8259(platform_vm):
    vm = platform_vm()
    boot64(vm, gate(0x20, "pit_handler") + """
  lidt idtr
  mov $0xFEE00000, %esi
  movl $0x1ff, 0xF0(%rsi)      # LAPIC on
  movl $0x700, 0x350(%rsi)     # LVT LINT0: ExtINT, unmasked
  mov $0x11, %al               # ICW1: edge, cascade, ICW4 follows
  out %al, $0x20
  mov $0x20, %al               # ICW2: vectors 0x20-0x27
  out %al, $0x21
  mov $0x04, %al               # ICW3: slave on IRQ2
  out %al, $0x21
  mov $0x01, %al               # ICW4: 8086 mode
  out %al, $0x21
  mov $0xfe, %al               # OCW1: only IRQ0 unmasked
  out %al, $0x21
""" + PIT_AND_HANDLER.format(result=RESULT, eoi="mov $0x20, %al\n  out %al, $0x20") + IDT)
    assert vm.run(timeout=60) == EXIT_HALT, vm.error
    assert results(vm, 1)[0] >= 3


def test_fixed_ipi_to_another_vcpu(platform_vm):
    vm = platform_vm(ncpus=2)
    sym = boot64(vm, gate(0x50, "ipi_handler") + f"""
  lidt idtr
  mov $0xFEE00000, %esi
  movl $0x1ff, 0xF0(%rsi)
1:cmpl $1, {RESULT + 4}         # wait until the AP is ready
  jne 1b
  movl $0x01000000, 0x310(%rsi) # destination APIC id 1
  movl $0x00004050, 0x300(%rsi) # fixed, vector 0x50
2:cmpl $1, {RESULT}
  jne 2b
  cli
  hlt
.globl ap_start
ap_start:
  lidt idtr
  mov $0xFEE00000, %esi
  movl $0x1ff, 0xF0(%rsi)
  movl $1, {RESULT + 4}
  sti
3:cmpl $1, {RESULT}
  jne 3b
  cli
  hlt
ipi_handler:
  movl $1, {RESULT}
  movl $0, 0xB0(%rsi)
  iretq
""" + IDT)
    long_mode(vm, 1, sym["ap_start"], rsp=0xA000)     # the AP starts in long mode on the same tables
    vm._start_vcpu(1, None)
    assert vm.run(timeout=60) == EXIT_HALT, vm.error
    assert results(vm, 2) == (1, 1)
