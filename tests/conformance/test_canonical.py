"""Canonical addresses and the CPUID a guest can trust (issue 24 item 8), on every provider.

- A non-canonical value written to IA32_FS_BASE, IA32_GS_BASE or IA32_KERNEL_GS_BASE raises #GP and leaves the
  base as it was (SDM vol. 2B WRMSR; vol. 3A 3.4.5): 48 bits, 57 where CPUID offers 5-level paging, with ``-w``
  too. So does a non-canonical base loaded into GDTR or IDTR (LGDT/LIDT, #GP(0)) or, from a 16-byte system
  descriptor, into TR or LDTR (LTR/LLDT, #GP(selector)).
- Every feature the guest's CPUID offers that has an enable bit (CR4, EFER, XCR0) or an instruction can be
  enabled and used without "the CPU could not run the guest" or a fault; what a provider offers and cannot run
  where it cannot hide it is a named limit (``offered-unusable:<feature>``).
"""

import struct

import pytest

from ops.nvmm.capability import limit_unusable
from ops.nvmm.x86.cpuid_bits import FEATURES as CPUID_FEATURES, offers
from tests.conftest import requires
from tests.conformance.cpuid_guest import (GP, HANDLER_CODE, HANDLERS, attempt, clear_results, dump_cpuid,
                                           guest_table, result)
from tests.guests.vmboot import PML4, boot64, idt
from vmmshim.vm import EXIT_HALT

MSR_FS_BASE, MSR_GS_BASE, MSR_KERNEL_GS_BASE = 0xC0000100, 0xC0000101, 0xC0000102
NONCANON_48 = 1 << 47                 # canonical with 57-bit linear addresses only
NONCANON_57 = 1 << 56
CANON_HIGH = 0xFFFF800000001000
TSS_SEL, LDT_SEL = 0x18, 0x28
PML5 = 0x5000                         # above boot64's tables: one entry, its PML4
PTE_PW = 0x3
CR4_PAE, CR4_LA57 = 1 << 5, 1 << 12
SGDT_AT, SIDT_AT = 0xC000, 0xC010


def run(make_vm, body, slots, ignore=False, extra="", five_level=False):
    """Runs ``body`` after the CPUID dump, with the #GP/#UD handlers; returns the VM and the guest's symbols."""
    vm = make_vm(ignore_msrs=ignore)
    sym = boot64(vm, HANDLERS + "  lidt idtr\n" + dump_cpuid() + body + "  cli\n  hlt\n" + HANDLER_CODE + extra +
                 idt(14))
    if five_level:
        vm.load(PML5, struct.pack("<Q", PML4 | PTE_PW))
        vm.set_boot_state(0, regs={"cr4": CR4_PAE | CR4_LA57, "cr3": PML5})
    clear_results(vm, slots)
    assert vm.run(timeout=60) == EXIT_HALT, vm.error
    return vm, sym


def wrmsr(msr, value):
    return f"  mov ${msr:#x}, %ecx\n  mov ${value & 0xFFFFFFFF:#x}, %eax\n  mov ${value >> 32:#x}, %edx\n  wrmsr\n"


def rdmsr(msr):
    return f"  mov ${msr:#x}, %ecx\n  rdmsr\n  shl $32, %rdx\n  or %rdx, %rax\n"


@pytest.mark.parametrize("msr", [MSR_FS_BASE, MSR_GS_BASE, MSR_KERNEL_GS_BASE], ids=["fs", "gs", "kgs"])
@pytest.mark.parametrize("ignore", [False, True], ids=["strict", "w"])
def test_a_non_canonical_base_msr_write_raises_gp(make_vm, msr, ignore):
    body = attempt(wrmsr(msr, CANON_HIGH), 0) + attempt(wrmsr(msr, NONCANON_57), 1) + \
        attempt(wrmsr(msr, NONCANON_48), 2) + attempt(rdmsr(msr), 3)
    vm, _ = run(make_vm, body, 4, ignore)
    five_level = offers(guest_table(vm), "la57")
    assert result(vm, 0)[0] == 0, "a canonical base is taken"
    assert result(vm, 1)[0] == GP, "bit 56 set, bits 63:57 clear: non-canonical at any width"
    assert result(vm, 2)[0] == (0 if five_level else GP), f"bit 47 alone (5-level paging offered: {five_level})"
    assert result(vm, 3)[2] == (NONCANON_48 if five_level else CANON_HIGH), "a refused write leaves the base"


DESCRIPTORS = f"""
.align 16
gdt64:
  .quad 0, 0x00AF9A000000FFFF, 0x00CF92000000FFFF
  .quad 0x0000890000000067, {NONCANON_57 >> 32:#x}       # 64-bit TSS, available, base {NONCANON_57:#x}
  .quad 0x0000820000000067, {NONCANON_57 >> 32:#x}       # LDT, base {NONCANON_57:#x}
gdt64_end:
gdtr64:
  .word gdt64_end - gdt64 - 1
  .quad gdt64
bad_dtr:
  .word 0xfff
  .quad {NONCANON_57:#x}
"""


def test_a_non_canonical_descriptor_table_base_raises_gp(make_vm):
    body = "  lgdt gdtr64\n" + attempt("  lgdt bad_dtr\n", 0) + attempt("  lidt bad_dtr\n", 1) + \
        attempt(f"  mov ${TSS_SEL}, %ax\n  ltr %ax\n", 2) + attempt(f"  mov ${LDT_SEL}, %ax\n  lldt %ax\n", 3) + \
        attempt(f"  sgdt {SGDT_AT}\n  sidt {SIDT_AT}\n", 4)
    vm, sym = run(make_vm, body, 5, extra=DESCRIPTORS)
    got = [result(vm, s)[:2] for s in range(4)]
    assert got == [(GP, 0), (GP, 0), (GP, TSS_SEL), (GP, LDT_SEL)], \
        "LGDT, LIDT, LTR, LLDT of a non-canonical base: #GP(0), #GP(0), #GP(selector), #GP(selector)"
    gdt_base = struct.unpack_from("<Q", vm.view(SGDT_AT + 2, 8))[0]
    idt_base = struct.unpack_from("<Q", vm.view(SIDT_AT + 2, 8))[0]
    assert (gdt_base, idt_base) == (sym["gdt64"], sym["idt"]), "the refused loads left GDTR and IDTR"


def cr4_set(bit):
    return f"  mov %cr4, %rax\n  bts ${bit}, %rax\n  mov %rax, %cr4\n"


def efer_set(bit):
    return f"  mov $0xC0000080, %ecx\n  rdmsr\n  bts ${bit}, %eax\n  wrmsr\n"


XSAVE_ON = cr4_set(18) + "  xor %ecx, %ecx\n  xor %edx, %edx\n  mov $3, %eax\n  xsetbv\n"
SYSCALL_USE = """  mov $0xC0000082, %ecx
  lea 5f(%rip), %rax
  mov %rax, %rdx
  shr $32, %rdx
  wrmsr
  mov $0xC0000081, %ecx
  xor %eax, %eax
  mov $0x00100008, %edx
  wrmsr
  syscall
  movl $0x77, %r15d               # not reached: SYSCALL goes to IA32_LSTAR
5:
"""
#: feature (``cpuid_bits`` name) -> (guest code enabling it, guest code using it); ``xbuf`` is 4 KiB, 64-aligned.
FEATURES = {
    "vme": (cr4_set(0), "  nop\n"), "de": (cr4_set(3), "  nop\n"), "tsc": (cr4_set(2), "  rdtsc\n"),
    "mce": (cr4_set(6), "  nop\n"), "pge": (cr4_set(7), "  nop\n"),
    "fxsr": (cr4_set(9), "  fxsave xbuf\n  fxrstor xbuf\n"),
    "sse": (cr4_set(9) + cr4_set(10), "  xorps %xmm0, %xmm0\n  movaps %xmm0, xbuf\n"),
    "umip": (cr4_set(11), "  sgdt xbuf\n"), "fsgsbase": (cr4_set(16), "  rdfsbase %rax\n  wrfsbase %rax\n"),
    "pcid": (cr4_set(17), "  mov %cr3, %rax\n  mov %rax, %cr3\n"),
    "xsave": (XSAVE_ON, "  xor %ecx, %ecx\n  xgetbv\n  mov $3, %eax\n  xor %edx, %edx\n  xsave xbuf\n"
              "  xrstor xbuf\n"),
    "xsaveopt": (XSAVE_ON, "  mov $3, %eax\n  xor %edx, %edx\n  xsaveopt xbuf\n"),
    "avx": (cr4_set(18) + "  xor %ecx, %ecx\n  xor %edx, %edx\n  mov $7, %eax\n  xsetbv\n",
            "  vxorps %ymm0, %ymm0, %ymm0\n"),
    "smep": (cr4_set(20), "  nop\n"), "smap": (cr4_set(21), "  stac\n  clac\n"),
    "pku": (cr4_set(22), "  xor %ecx, %ecx\n  rdpkru\n  xor %edx, %edx\n  wrpkru\n"),
    "syscall": (efer_set(0), SYSCALL_USE), "nx": (efer_set(11), "  nop\n"), "ffxsr": (efer_set(14), "  nop\n"),
    "rdtscp": ("  nop\n", "  rdtscp\n"), "rdpid": ("  nop\n", "  rdpid %rax\n"),
    "lahf_lm": ("  nop\n", "  lahf\n  sahf\n"), "prefetchw": ("  nop\n", "  prefetchw xbuf\n"),
    "movbe": ("  nop\n", "  movbe xbuf, %eax\n"), "popcnt": ("  nop\n", "  popcnt %eax, %eax\n"),
    "rdrand": ("  nop\n", "  rdrand %eax\n"), "clflushopt": ("  nop\n", "  clflushopt xbuf\n"),
    "clwb": ("  nop\n", "  clwb xbuf\n"), "clzero": ("  nop\n", "  lea xbuf(%rip), %rax\n  clzero\n"),
}
XBUF = "\n.align 64\nxbuf:\n  .skip 4096\n"


@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_an_offered_feature_can_be_used(make_vm, provider, feature):
    """The guest reads the feature's CPUID bit itself (below the range's maximum leaf) and, where offered,
    enables the feature and uses it: no fault, no VMX exit ("the CPU could not run the guest")."""
    requires(provider, limit_unusable(feature))
    enable, use = FEATURES[feature]
    vm = make_vm()
    boot64(vm, HANDLERS + "  lidt idtr\n" + dump_cpuid() + _only_if_offered(feature, enable, use) +
           "  cli\n  hlt\n" + HANDLER_CODE + XBUF + idt(14))
    clear_results(vm, 2)
    assert vm.run(timeout=60) == EXIT_HALT, f"{feature}: {vm.error}"
    if not offers(guest_table(vm), feature):
        pytest.skip(f"{feature} is not offered by provider {provider.name}")
    assert result(vm, 0)[0] == 0, f"enabling {feature}: vector {result(vm, 0)[0]}"
    assert result(vm, 1)[0] == 0, f"using {feature}: vector {result(vm, 1)[0]}"


def _only_if_offered(feature, enable, use):
    f = CPUID_FEATURES[feature]
    reg = ("%eax", "%ebx", "%ecx", "%edx")[f.reg]
    bound = 0x80000000 if f.leaf >= 0x80000000 else 0
    return f"""
  mov ${bound:#x}, %eax
  cpuid
  cmp ${f.leaf:#x}, %eax
  jb 3f
  mov ${f.leaf:#x}, %eax
  mov ${f.index}, %ecx
  cpuid
  bt ${f.bit}, {reg}
  jnc 3f
""" + attempt(enable, 0) + attempt(use, 1) + "3:\n"


def test_5_level_paging_where_offered(make_vm):
    """With LA57 offered the guest runs on 5-level paging (CR4.LA57 set at boot: it cannot change in long mode)
    and bit 47 alone makes a canonical FS base."""
    vm, _ = run(make_vm, "", 1)
    if not offers(guest_table(vm), "la57"):
        pytest.skip("5-level paging is not offered here (the 48-bit checks above apply)")
    body = attempt("  mov %cr4, %rax\n", 0) + attempt(wrmsr(MSR_FS_BASE, NONCANON_48), 1)
    vm, _ = run(make_vm, body, 2, five_level=True)
    assert result(vm, 0)[2] & CR4_LA57 and result(vm, 1)[0] == 0
