"""Named CPUID feature bits and how to ask whether a CPUID table offers one (Intel SDM vol. 2A, CPUID; AMD APM
vol. 3, appendix E). Shared by the MSR policy (``msr_policy.py``), the providers' CPUID filters and the tests
that probe what a guest is offered.

A table is any ``cpuid(leaf, index) -> (eax, ebx, ecx, edx)`` function: what the guest's CPUID instruction
answers. :func:`offers` reads a feature only below the range's maximum leaf (leaf 0 or 0x80000000 EAX), as a
guest must: an Intel CPU answers a leaf beyond the maximum with the last basic leaf's data.

Not supported: leaves whose meaning depends on the vendor beyond the bits named here, the dynamic bits
(OSXSAVE, OSPKE), which follow CR4 and say nothing about what is offered.
"""

from typing import NamedTuple

EAX, EBX, ECX, EDX = range(4)
BASIC_MAX_LEAF, EXT_MAX_LEAF = 0x0, 0x80000000
HYPERVISOR_FIRST, HYPERVISOR_END = 0x40000000, 0x80000000


class Feature(NamedTuple):
    name: str
    leaf: int
    index: int
    reg: int
    bit: int

    @property
    def mask(self):
        return 1 << self.bit


def _f(name, leaf, index, reg, bit):
    return Feature(name, leaf, index, reg, bit)


#: Every feature the MSR policy or the tests name. Leaf 1 and 0x80000001 have no subleaf (index 0).
FEATURES = {f.name: f for f in (
    # leaf 1 EDX / ECX
    _f("vme", 0x1, 0, EDX, 1), _f("de", 0x1, 0, EDX, 2), _f("tsc", 0x1, 0, EDX, 4), _f("mce", 0x1, 0, EDX, 7),
    _f("mtrr", 0x1, 0, EDX, 12), _f("pge", 0x1, 0, EDX, 13), _f("mca", 0x1, 0, EDX, 14),
    _f("pat", 0x1, 0, EDX, 16), _f("fxsr", 0x1, 0, EDX, 24), _f("sse", 0x1, 0, EDX, 25),
    _f("pcid", 0x1, 0, ECX, 17), _f("x2apic", 0x1, 0, ECX, 21), _f("movbe", 0x1, 0, ECX, 22),
    _f("popcnt", 0x1, 0, ECX, 23), _f("tsc_deadline", 0x1, 0, ECX, 24), _f("xsave", 0x1, 0, ECX, 26),
    _f("avx", 0x1, 0, ECX, 28), _f("rdrand", 0x1, 0, ECX, 30),
    # leaf 7 subleaf 0
    _f("fsgsbase", 0x7, 0, EBX, 0), _f("tsc_adjust", 0x7, 0, EBX, 1), _f("smep", 0x7, 0, EBX, 7),
    _f("invpcid", 0x7, 0, EBX, 10), _f("smap", 0x7, 0, EBX, 20), _f("clflushopt", 0x7, 0, EBX, 23),
    _f("clwb", 0x7, 0, EBX, 24), _f("umip", 0x7, 0, ECX, 2), _f("pku", 0x7, 0, ECX, 3),
    _f("la57", 0x7, 0, ECX, 16), _f("rdpid", 0x7, 0, ECX, 22),
    _f("ibrs_ibpb", 0x7, 0, EDX, 26), _f("stibp", 0x7, 0, EDX, 27), _f("l1d_flush", 0x7, 0, EDX, 28),
    _f("arch_capabilities", 0x7, 0, EDX, 29), _f("ssbd", 0x7, 0, EDX, 31),
    # leaf 0xD subleaf 1
    _f("xsaveopt", 0xD, 1, EAX, 0), _f("xsaves", 0xD, 1, EAX, 3),
    # extended leaves
    _f("lahf_lm", 0x80000001, 0, ECX, 0), _f("svm", 0x80000001, 0, ECX, 2),
    _f("prefetchw", 0x80000001, 0, ECX, 8), _f("syscall", 0x80000001, 0, EDX, 11),
    _f("nx", 0x80000001, 0, EDX, 20), _f("ffxsr", 0x80000001, 0, EDX, 25), _f("rdtscp", 0x80000001, 0, EDX, 27),
    _f("lm", 0x80000001, 0, EDX, 29),
    _f("clzero", 0x80000008, 0, EBX, 0), _f("amd_ibpb", 0x80000008, 0, EBX, 12),
    _f("amd_ibrs", 0x80000008, 0, EBX, 14), _f("amd_stibp", 0x80000008, 0, EBX, 15),
    _f("amd_ssbd", 0x80000008, 0, EBX, 24), _f("virt_ssbd", 0x80000008, 0, EBX, 25),
    _f("amd_psfd", 0x80000008, 0, EBX, 28),
)}


def max_leaf_of(leaf):
    """The leaf whose EAX bounds ``leaf``'s range (None for the hypervisor range, which has no common bound)."""
    if leaf >= EXT_MAX_LEAF:
        return EXT_MAX_LEAF
    if HYPERVISOR_FIRST <= leaf < HYPERVISOR_END:
        return None
    return BASIC_MAX_LEAF


def offers(cpuid, name):
    """Whether the table ``cpuid`` offers feature ``name`` (a key of :data:`FEATURES`)."""
    f = FEATURES[name]
    bound = max_leaf_of(f.leaf)
    if bound is not None and cpuid(bound, 0)[EAX] < f.leaf:
        return False
    return bool(cpuid(f.leaf, f.index)[f.reg] & f.mask)


def offers_any(cpuid, names):
    return any(offers(cpuid, n) for n in names)


def table_lookup(entries):
    """A ``cpuid(leaf, index)`` function over KVM-style entries ``[function, index, flags, eax, ebx, ecx, edx]``
    (``flags`` bit 0: the index is significant). A leaf the table lacks answers zeros."""
    by_key = {}
    for e in entries:
        by_key[(e[0], e[1] if e[2] & 1 else None)] = tuple(e[3:7])

    def cpuid(leaf, index=0):
        regs = by_key.get((leaf, index))
        if regs is None:
            regs = by_key.get((leaf, None), (0, 0, 0, 0))
        return regs
    return cpuid
