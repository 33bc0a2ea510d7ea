"""Guest-side pieces shared by the MSR-policy and canonical-address conformance tests: a #GP/#UD handler that
records the vector and resumes at a label, the CPUID leaves a guest reads (stored in RAM, so a test judges by what
the guest itself was told, never by the provider's word), and the table built from them."""

import struct

from ops.nvmm.x86.cpuid_bits import table_lookup
from tests.guests.vmboot import gate

#: Leaves the guest reads and stores (leaf, index), 16 bytes each at ``CPUID_AT``.
LEAVES = ((0x0, 0), (0x1, 0), (0x7, 0), (0x7, 1), (0xD, 1), (0x80000000, 0), (0x80000001, 0), (0x80000008, 0))
CPUID_AT = 0xA000
RESULTS_AT = 0xB000
GP, UD = 13, 6

#: Handlers for #GP (13) and #UD (6): record the vector in %r15 and the error code in %r13, resume at %r14.
#: Needs ``idt(14)`` and ``lidt idtr``.
HANDLERS = gate(13, "on_gp") + gate(6, "on_ud")
HANDLER_CODE = """
on_gp:
  pop %r13
  mov %r14, (%rsp)
  mov $13, %r15d
  iretq
on_ud:
  mov %r14, (%rsp)
  mov $6, %r15d
  iretq
"""


def dump_cpuid():
    """Guest code storing the ``LEAVES`` at ``CPUID_AT`` (clobbers rax, rbx, rcx, rdx, rdi)."""
    out = [f"  mov ${CPUID_AT:#x}, %edi"]
    for leaf, index in LEAVES:
        out += [f"  mov ${leaf:#x}, %eax", f"  mov ${index}, %ecx", "  cpuid", "  mov %eax, (%rdi)",
                "  mov %ebx, 4(%rdi)", "  mov %ecx, 8(%rdi)", "  mov %edx, 12(%rdi)", "  add $16, %rdi"]
    return "\n".join(out) + "\n"


def guest_table(vm):
    """The ``cpuid(leaf, index)`` function the guest's stored answers make (leaf 7 and 0xD by subleaf)."""
    entries = []
    for i, (leaf, index) in enumerate(LEAVES):
        regs = struct.unpack_from("<4I", vm.view(CPUID_AT + 16 * i, 16))
        entries.append([leaf, index, 1, *regs])
    return table_lookup(entries)


def attempt(code, slot):
    """Guest code running ``code`` with the handlers armed, then storing at result ``slot`` (16 bytes each):
    the vector it raised (0: none), the error code, and RAX."""
    return f"""
  xor %r15d, %r15d
  xor %r13d, %r13d
  lea 1f(%rip), %r14
{code}
1:
  mov %r15d, {RESULTS_AT + 16 * slot}
  mov %r13d, {RESULTS_AT + 16 * slot + 4}
  mov %rax, {RESULTS_AT + 16 * slot + 8}
"""


def result(vm, slot):
    """``(vector, error code, rax)`` that :func:`attempt` stored at ``slot``."""
    return struct.unpack_from("<IIQ", vm.view(RESULTS_AT + 16 * slot, 16))


def clear_results(vm, slots):
    vm.load(RESULTS_AT, b"\xee" * 16 * slots)
