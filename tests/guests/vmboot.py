"""A VM's boot vCPU put straight into 64-bit long mode (identity 2 MiB pages over the first GiB and over
3-4 GiB, where the LAPIC, IOAPIC and an MMIO window live), for guest programs run through the ops table and
the VM: the vmm_ops tests and the exit benchmark."""

import struct

from tests.guests.asm import assemble, symbols

CODE = 0x10000
GDT = 0x7000
PML4, PDPT, PD_LOW, PD_HIGH = 0x1000, 0x2000, 0x3000, 0x4000
FLAT_CODE64 = (0x08, 0, 0xFFFFFFFF, 0xA09B)
FLAT_DATA = (0x10, 0, 0xFFFFFFFF, 0xC093)


def boot64(vm, source, vcpu=0):
    """A 64-bit program at CODE, with identity 2 MiB pages over the first GiB and 3-4 GiB (the LAPIC, IOAPIC
    and the MMIO window), a GDT, and the vCPU in long mode pointing at it (kvm_pvm runs 64-bit guests best)."""
    src = ".code64\n.globl start\nstart:\n" + source
    vm.load(CODE, assemble(src, CODE))
    vm.load(GDT, struct.pack("<3Q", 0, 0x00AF9A000000FFFF, 0x00CF92000000FFFF))
    vm.load(PML4, struct.pack("<Q", PDPT | 3))
    vm.load(PDPT, struct.pack("<4Q", PD_LOW | 3, 0, 0, PD_HIGH | 3))
    vm.load(PD_LOW, b"".join(struct.pack("<Q", (i << 21) | 0x83) for i in range(512)))
    vm.load(PD_HIGH, b"".join(struct.pack("<Q", (3 << 30) + (i << 21) | 0x83) for i in range(512)))
    long_mode(vm, vcpu, CODE)
    return symbols(src, CODE)


def long_mode(vm, vcpu, rip, rsp=0x9000):
    """Puts ``vcpu`` in 64-bit mode on the tables :func:`boot64` wrote, at ``rip``."""
    vm.set_boot_state(vcpu, regs={"cr0": 0x80000031, "cr4": 0x20, "efer": 0x500, "cr3": PML4, "rip": rip,
                                  "rflags": 2, "rsp": rsp},
                      segs={"cs": FLAT_CODE64, **{s: FLAT_DATA for s in ("ds", "es", "ss", "fs", "gs")},
                            "tr": (0, 0, 0xFFFF, 0x8B), "ldtr": (0, 0, 0, 0x82)},
                      gdtr=(GDT, 23), idtr=(0, 0xFFFF))




def gate(vec, handler):
    """Guest code that fills 64-bit interrupt gate ``vec`` of the table at label ``idt`` with ``handler`` at run
    time (GNU as cannot split a relocatable label's address into the gate's fields)."""
    return f"""
  mov ${handler}, %eax
  mov %ax, idt + {vec} * 16
  movw $0x08, idt + {vec} * 16 + 2
  movw $0x8e00, idt + {vec} * 16 + 4
  shr $16, %eax
  mov %ax, idt + {vec} * 16 + 6
"""


def idt(entries):
    """An IDT of ``entries`` 16-byte gates at label ``idt`` and its ``idtr`` (for ``lidt idtr``)."""
    return f"""
.align 16
idt:
  .skip {entries} * 16
idtr:
  .word {entries} * 16 - 1
  .quad idt
"""
