"""Why the CPU could not run a guest, in words: the sentence a ``VM_EXITCODE_VMX`` exit (bhyve's "vm exit ...
reason VMX" report in ``vmexit_vmx``) ends the VM with, instead of a Python repr.

:func:`describe_failure` reads the vCPU's mode registers (``vm_reg_name``), fetches the instruction bytes at
RIP through the guest's page tables (``ops/nvmm/x86/mmu.py``) and, where the provider declares a limit
(``Capability.limits``, ``ops/nvmm/capability.py``) that the guest's state or instruction runs into, names it:
32-bit or PAE paging on a provider with ``paging32``, ``int n``/``int3``/``into`` on one with ``int-n``.

Not supported: decoding the instruction beyond its opcode byte, naming limits other than those two (the message
then gives the state and the bytes, and says no declared limit matched).
"""

import errno

from ops.nvmm.capability import LIMIT_PAGING32, LIMIT_SOFT_INT
from ops.nvmm.constants import CR0_PE, CR0_PG, CR4_PAE, EFER_LMA
from ops.nvmm.x86.mmu import gva_to_gpa

from .vmm_ops import VmRegName as R

CS_L = 1 << 13                      # the code segment's long-mode bit in the access word
INSN_BYTES = 8                      # bytes shown (an x86 instruction is at most 15)
OPCODE_INT3, OPCODE_INT_N, OPCODE_INTO = 0xCC, 0xCD, 0xCE
PREFIXES = frozenset({0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65, 0x66, 0x67, 0xF0, 0xF2, 0xF3})
REX_FIRST, REX_LAST = 0x40, 0x4F


def cpu_mode(cr0, efer, cs_long):
    """The processor mode as the SDM names it (vol. 3A 2.2)."""
    if not cr0 & CR0_PE:
        return "real mode"
    if efer & EFER_LMA:
        return "64-bit mode" if cs_long else "compatibility mode"
    return "protected mode"


def paging_mode(cr0, cr4, efer):
    if not cr0 & CR0_PG:
        return "no paging"
    if efer & EFER_LMA:
        return "4-level paging"
    return "PAE paging" if cr4 & CR4_PAE else "32-bit paging"


def first_opcode(code, long_mode):
    """The opcode byte after the legacy (and, in 64-bit mode, REX) prefixes of ``code``; None if none."""
    for b in code:
        if b in PREFIXES or (long_mode and REX_FIRST <= b <= REX_LAST):
            continue
        return b
    return None


def matching_limits(limits, cr0, cr4, efer, opcode):
    """The declared limits the state or the opcode runs into (see the module docstring)."""
    hit = []
    if LIMIT_PAGING32 in limits and cr0 & CR0_PG and not efer & EFER_LMA:
        hit.append(f"{LIMIT_PAGING32} ({paging_mode(cr0, cr4, efer)})")
    if LIMIT_SOFT_INT in limits and opcode in (OPCODE_INT3, OPCODE_INT_N, OPCODE_INTO):
        hit.append(f"{LIMIT_SOFT_INT} (the instruction is {_INT_NAMES[opcode]})")
    return hit


_INT_NAMES = {OPCODE_INT3: "int3", OPCODE_INT_N: "int n", OPCODE_INTO: "into"}


def describe_failure(getreg, getdesc, read_phys, provider_name, limits, vcpu, exit_reason):
    """The sentence for ``vcpu``'s failed run: ``getreg(R)`` and ``getdesc(R)`` (a ``SegDesc``) read the vCPU, ``read_phys(gpa, n)`` guest RAM (raising OSError outside it), ``limits`` the provider's declared ones;
    ``exit_reason`` is the hardware's code for the failure."""
    cr0, cr3, cr4, efer = (getreg(r) for r in (R.VM_REG_GUEST_CR0, R.VM_REG_GUEST_CR3, R.VM_REG_GUEST_CR4,
                                               R.VM_REG_GUEST_EFER))
    rip = getreg(R.VM_REG_GUEST_RIP)
    cs = getreg(R.VM_REG_GUEST_CS)
    desc = getdesc(R.VM_REG_GUEST_CS)
    cs_base, cs_access = desc.base, desc.access
    long_mode = bool(efer & EFER_LMA and cs_access & CS_L)
    gva = rip if long_mode else (cs_base + rip) & 0xFFFFFFFF
    try:
        gpa = gva_to_gpa(read_phys, cr0, cr3, cr4, efer, gva)[0]
        code = bytes(read_phys(gpa, INSN_BYTES))
        insn = "instruction bytes " + " ".join(f"{b:02x}" for b in code)
    except OSError as exc:
        code = b""
        insn = f"instruction not readable ({errno.errorcode.get(exc.errno, exc.errno)})"
    hit = matching_limits(limits, cr0, cr4, efer, first_opcode(code, long_mode))
    why = (f"provider {provider_name} declares the limit {', '.join(hit)}" if hit else
           f"no limit provider {provider_name} declares matches")
    return (f"vcpu{vcpu}: the CPU could not run the guest (hardware exit reason {exit_reason:#x}) at "
            f"{cs:#06x}:{rip:#x} in {cpu_mode(cr0, efer, cs_access & CS_L)} with {paging_mode(cr0, cr4, efer)} "
            f"(CR0 {cr0:#x}, CR4 {cr4:#x}, EFER {efer:#x}), {insn}: {why}")
