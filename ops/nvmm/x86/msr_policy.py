"""Which MSR accesses a CPU offering a given CPUID table allows: the one MSR policy every provider and the ops layer
follow (``docs/msr.md`` lists it).

Intel SDM vol. 4 (table 2-2, the architectural MSRs, each with the CPUID bit that makes it exist), vol. 3A 17.17.3
(IA32_TSC_ADJUST), vol. 3A 4.1.1 and 3.4.5 (canonical addresses; with 5-level paging offered the checks on MSRs
holding linear addresses use 57 bits whatever CR4.LA57 says, as the CPUs do), vol. 2B WRMSR; AMD APM vol. 2,
appendix A (SPEC_CTRL, PRED_CMD and VIRT_SPEC_CTRL from CPUID Fn8000_0008_EBX) and the "Speculative Store Bypass"
and "Predictive Store Forwarding" notes. An access to an MSR whose feature the table does not offer raises #GP,
as on a CPU without the feature; so does a write of bits the offered features do not define, and a non-canonical
linear address written to IA32_FS_BASE, IA32_GS_BASE or IA32_KERNEL_GS_BASE.

Each rule also says who answers a legal access (:data:`KERNEL`: the provider keeps the MSR in its own state, so
one that reaches the ops layer was refused there; :data:`OPS`: the ops layer emulates it, ``ops/arch_msrs.py``;
:data:`USER`: userland's table, ``vmmshim/msr.py``). An MSR with no rule is *unknown*: userland's table decides,
and bhyve's ``-w`` reads it as 0.

Not supported: MSRs gated by bits of other MSRs beyond IA32_TSX_CTRL (refused unless IA32_ARCH_CAPABILITIES is
offered), the performance-monitoring MSRs (no PMU is offered), SGX, CET, PKS, AMX, the x2APIC range (the vlapic
decides it).
"""

from typing import NamedTuple

from .cpuid_bits import offers, offers_any

# Architectural MSR numbers (SDM vol. 4 table 2-2, APM vol. 2 appendix A).
MSR_TSC = 0x10
MSR_TSC_ADJUST = 0x3B
MSR_SPEC_CTRL = 0x48
MSR_PRED_CMD = 0x49
MSR_MTRRCAP = 0xFE
MSR_ARCH_CAPABILITIES = 0x10A
MSR_FLUSH_CMD = 0x10B
MSR_TSX_CTRL = 0x122
MSR_SYSENTER_CS, MSR_SYSENTER_ESP, MSR_SYSENTER_EIP = 0x174, 0x175, 0x176
MSR_MCG_CAP, MSR_MCG_STATUS = 0x179, 0x17A
MSR_MTRR_FIRST, MSR_MTRR_LAST = 0x200, 0x26F      # variable ranges and the fixed-range registers
MSR_PAT = 0x277
MSR_MTRR_DEF_TYPE = 0x2FF
MSR_XSS = 0xDA0
MSR_EFER, MSR_STAR, MSR_LSTAR, MSR_CSTAR, MSR_SFMASK = 0xC0000080, 0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084
MSR_FS_BASE, MSR_GS_BASE, MSR_KERNEL_GS_BASE, MSR_TSC_AUX = 0xC0000100, 0xC0000101, 0xC0000102, 0xC0000103
MSR_VM_HSAVE_PA = 0xC0010117
MSR_VIRT_SPEC_CTRL = 0xC001011F

# IA32_SPEC_CTRL bits and the features that define them (Intel leaf 7 EDX, AMD Fn8000_0008 EBX).
SPEC_CTRL_IBRS, SPEC_CTRL_STIBP, SPEC_CTRL_SSBD, SPEC_CTRL_PSFD = 1 << 0, 1 << 1, 1 << 2, 1 << 7
SPEC_CTRL_BITS = ((SPEC_CTRL_IBRS, ("ibrs_ibpb", "amd_ibrs")), (SPEC_CTRL_STIBP, ("stibp", "amd_stibp")),
                  (SPEC_CTRL_SSBD, ("ssbd", "amd_ssbd")), (SPEC_CTRL_PSFD, ("amd_psfd",)))
PRED_CMD_IBPB = 1 << 0
FLUSH_CMD_L1D = 1 << 0

LINEAR_WIDTH_4LEVEL, LINEAR_WIDTH_5LEVEL = 48, 57

# Who answers a legal access.
KERNEL, OPS, USER = "kernel", "ops", "user"
#: A rule's gate that needs no feature.
ALWAYS = ("*",)
#: A rule's gate that no feature opens.
NEVER = ()

SPEC_CTRL_FEATURES = ("ibrs_ibpb", "stibp", "ssbd", "amd_ibrs", "amd_stibp", "amd_ssbd")
IBPB_FEATURES = ("ibrs_ibpb", "amd_ibpb")


class Rule(NamedTuple):
    name: str
    read: tuple          # features any of which allows RDMSR (ALWAYS, NEVER)
    write: tuple         # the same for WRMSR
    keeper: str          # KERNEL, OPS or USER
    canonical: bool = False    # a written value is a linear address


def _rules():
    out = {}

    def add(msrs, name, read, write, keeper, canonical=False):
        for m in msrs:
            out[m] = Rule(name, read, write, keeper, canonical)
    add((MSR_TSC,), "IA32_TSC", ALWAYS, ALWAYS, OPS)
    add((MSR_TSC_ADJUST,), "IA32_TSC_ADJUST", ("tsc_adjust",), ("tsc_adjust",), OPS)
    add((MSR_SPEC_CTRL,), "IA32_SPEC_CTRL", SPEC_CTRL_FEATURES, SPEC_CTRL_FEATURES, OPS)
    add((MSR_PRED_CMD,), "IA32_PRED_CMD", NEVER, IBPB_FEATURES, OPS)
    add((MSR_FLUSH_CMD,), "IA32_FLUSH_CMD", NEVER, ("l1d_flush",), OPS)
    add((MSR_ARCH_CAPABILITIES,), "IA32_ARCH_CAPABILITIES", ("arch_capabilities",), NEVER, OPS)
    add((MSR_TSX_CTRL,), "IA32_TSX_CTRL", ("arch_capabilities",), ("arch_capabilities",), KERNEL)
    add((MSR_MCG_CAP,), "IA32_MCG_CAP", ("mca",), NEVER, USER)
    add((MSR_MCG_STATUS,), "IA32_MCG_STATUS", ("mca",), ("mca",), USER)
    add((MSR_MTRRCAP,), "IA32_MTRRCAP", ("mtrr",), NEVER, USER)
    add(range(MSR_MTRR_FIRST, MSR_MTRR_LAST + 1), "IA32_MTRR_*", ("mtrr",), ("mtrr",), USER)
    add((MSR_MTRR_DEF_TYPE,), "IA32_MTRR_DEF_TYPE", ("mtrr",), ("mtrr",), USER)
    add((MSR_XSS,), "IA32_XSS", ("xsaves",), ("xsaves",), KERNEL)
    add((MSR_TSC_AUX,), "IA32_TSC_AUX", ("rdtscp", "rdpid"), ("rdtscp", "rdpid"), KERNEL)
    add((MSR_FS_BASE, MSR_GS_BASE, MSR_KERNEL_GS_BASE), "IA32_FS_BASE/GS_BASE/KERNEL_GS_BASE", ("lm",), ("lm",),
        KERNEL, canonical=True)
    add((MSR_EFER, MSR_STAR, MSR_LSTAR, MSR_CSTAR, MSR_SFMASK, MSR_SYSENTER_CS, MSR_SYSENTER_ESP,
         MSR_SYSENTER_EIP, MSR_PAT), "NVMM state MSRs", ALWAYS, ALWAYS, KERNEL)
    add((MSR_VM_HSAVE_PA,), "VM_HSAVE_PA", ("svm",), ("svm",), KERNEL)
    add((MSR_VIRT_SPEC_CTRL,), "VIRT_SPEC_CTRL", ("virt_ssbd",), ("virt_ssbd",), KERNEL)
    return out


RULES = _rules()


def rule(msr):
    """The :class:`Rule` of ``msr``, or None for an MSR the policy does not know."""
    return RULES.get(msr)


def _gate_open(cpuid, gate):
    if gate == ALWAYS:
        return True
    return offers_any(cpuid, gate)


def linear_width(cpuid):
    """Bits of a canonical linear address: 57 with 5-level paging offered, else 48."""
    return LINEAR_WIDTH_5LEVEL if offers(cpuid, "la57") else LINEAR_WIDTH_4LEVEL


def canonical(addr, width):
    """Whether ``addr`` (64-bit) sign-extends bit ``width - 1`` through bit 63."""
    top = addr >> (width - 1)
    return top == 0 or top == (1 << (65 - width)) - 1


def spec_ctrl_bits(cpuid):
    """The IA32_SPEC_CTRL bits the offered features define."""
    return sum(bit for bit, names in SPEC_CTRL_BITS if offers_any(cpuid, names))


def allowed_value(cpuid, msr, value):
    """Whether WRMSR may write ``value`` to ``msr`` (the MSR itself is legal): defined bits, canonical bases."""
    r = RULES.get(msr)
    if r is None:
        return True
    if r.canonical:
        return canonical(value, linear_width(cpuid))
    if msr == MSR_SPEC_CTRL:
        return not value & ~spec_ctrl_bits(cpuid)
    if msr == MSR_PRED_CMD:
        return not value & ~PRED_CMD_IBPB
    if msr == MSR_FLUSH_CMD:
        return not value & ~FLUSH_CMD_L1D
    return True


def refused(cpuid, msr, value=None):
    """Whether a CPU offering the table ``cpuid`` raises #GP for RDMSR (``value`` None) or WRMSR of ``value``."""
    r = RULES.get(msr)
    if r is None:
        return False
    if value is None:
        return not _gate_open(cpuid, r.read)
    return not _gate_open(cpuid, r.write) or not allowed_value(cpuid, msr, value)


def refused_msrs(cpuid):
    """``(reads, writes)``: the sets of known MSRs whose RDMSR / WRMSR the table refuses whatever the value (what
    a provider that answers MSRs itself must send to the ops layer, e.g. through KVM's MSR filter)."""
    reads, writes = set(), set()
    for msr, r in RULES.items():
        if not _gate_open(cpuid, r.read):
            reads.add(msr)
        if not _gate_open(cpuid, r.write):
            writes.add(msr)
    return reads, writes
