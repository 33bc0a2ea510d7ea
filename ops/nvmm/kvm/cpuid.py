"""CPUID for KVM vCPUs, filtered as NVMM filters it.

KVM answers CPUID in the kernel from the table given with ``KVM_SET_CPUID2``. We start from
``KVM_GET_SUPPORTED_CPUID`` and hide what NVMM's kernel hides by default (anchors (b): x2APIC, TSC-deadline,
MONITOR/MWAIT, VMX/SVM, SMX, MCE/MCA/MTRR, PDCM, EST/TM2, the debug-store and thermal bits), set the hypervisor
bit and NVMM's signature leaf (the other hypervisor leaves answer zeros, as in NVMM, unless masks set bits),
put each vCPU's APIC id in leaves 1 and 0xB, then apply the vCPU's
``NVMM_VCPU_CONF_CPUID`` masks (AND out ``del``, OR in ``set``), as NVMM does after its own filtering.

Features a kind of KVM offers in ``KVM_GET_SUPPORTED_CPUID`` but cannot run are hidden too (``HIDE_BY_KIND``,
measured: ``docs/msr.md``), and the Predictive Store Forwarding bit goes with IA32_SPEC_CTRL (it names a bit of that
MSR: offered without the MSR it would promise a #GP). kvm_pvm answers some registers of leaves 1, 7 and 0xD.1 itself
(``cpuid_probe.py``); what it offers there and cannot run is named in ``UNUSABLE_BY_KIND`` (the provider lists
them as limits).

Not supported: CPUID exits (KVM never sends CPUID to userland; ``capability().limits`` says ``cpuid-exit``), and
changing the table after the first run where the kernel refuses it (Linux >= 5.16).
"""

import struct

from . import layouts as L

# leaf 1 ECX / EDX bits (SDM vol. 2A, CPUID)
L1_ECX_DTES64, L1_ECX_MONITOR, L1_ECX_DS_CPL, L1_ECX_VMX = 1 << 2, 1 << 3, 1 << 4, 1 << 5
L1_ECX_SMX, L1_ECX_EST, L1_ECX_TM2, L1_ECX_XTPR, L1_ECX_PDCM = 1 << 6, 1 << 7, 1 << 8, 1 << 14, 1 << 15
L1_ECX_X2APIC, L1_ECX_TSC_DEADLINE, L1_ECX_HYPERVISOR = 1 << 21, 1 << 24, 1 << 31
L1_EDX_MCE, L1_EDX_MTRR, L1_EDX_MCA, L1_EDX_DS = 1 << 7, 1 << 12, 1 << 14, 1 << 21
L1_EDX_ACPI, L1_EDX_TM, L1_EDX_PBE = 1 << 22, 1 << 29, 1 << 31
EXT1_ECX_SVM = 1 << 2
EXT1_EDX_FFXSR = 1 << 25
EXT8_EBX_CLZERO, EXT8_EBX_PSFD = 1 << 0, 1 << 28
MWAIT_LEAF = 0x5
HYPERVISOR_LEAF = 0x40000000
#: NVMM's hypervisor signature (EBX, ECX, EDX of leaf 0x40000000).
NVMM_SIGNATURE = b"___ NVMM ___"

HIDE = {
    (0x1, "ecx"): L1_ECX_DTES64 | L1_ECX_MONITOR | L1_ECX_DS_CPL | L1_ECX_VMX | L1_ECX_SMX | L1_ECX_EST |
    L1_ECX_TM2 | L1_ECX_XTPR | L1_ECX_PDCM | L1_ECX_X2APIC | L1_ECX_TSC_DEADLINE,
    (0x1, "edx"): L1_EDX_MCE | L1_EDX_MTRR | L1_EDX_MCA | L1_EDX_DS | L1_EDX_ACPI | L1_EDX_TM | L1_EDX_PBE,
    (0x80000001, "ecx"): EXT1_ECX_SVM,
}
#: Per kind of /dev/kvm: bits it offers and cannot run, hidden (kvm_pvm refuses EFER.FFXSR with #GP and stops the
#: guest at CLZERO with an emulation failure).
HIDE_BY_KIND = {
    "kvm_pvm": {(0x80000001, "edx"): EXT1_EDX_FFXSR, (0x80000008, "ebx"): EXT8_EBX_CLZERO},
}
#: Per kind: offered features (``ops/nvmm/x86/cpuid_bits.py`` names) in registers it answers itself, so they cannot
#: be hidden, whose use stops the guest ("the CPU could not run the guest") or raises #UD: kvm_pvm's instruction
#: emulator, which runs guest supervisor code, lacks XSAVE/XGETBV, XSAVEOPT, VEX (AVX), STAC/CLAC, SSE arithmetic,
#: POPCNT, MOVBE (#UD) and CLWB.
UNUSABLE_BY_KIND = {
    "kvm_pvm": ("xsave", "xsaveopt", "avx", "smap", "sse", "popcnt", "movbe", "clwb"),
}
#: Leaf 7 EDX and 0x80000008 EBX bits any of which makes IA32_SPEC_CTRL exist (Intel and AMD).
L7_EDX_SPEC_CTRL = (1 << 26) | (1 << 27) | (1 << 31)
EXT8_EBX_SPEC_CTRL = (1 << 14) | (1 << 15) | (1 << 24)
_REG = {"eax": 3, "ebx": 4, "ecx": 5, "edx": 6}
_ENTRY = struct.Struct("<7I12x")
assert _ENTRY.size == L.KVM_CPUID_ENTRY2.sizeof()


def parse_entries(buf, nent):
    """``[[function, index, flags, eax, ebx, ecx, edx], ...]`` from a kvm_cpuid2 entry array."""
    return [list(_ENTRY.unpack_from(buf, L.KVM_CPUID2_HDR.sizeof() + i * _ENTRY.size)) for i in range(nent)]


def pack_entries(entries):
    hdr = struct.pack("<II", len(entries), 0)
    return hdr + b"".join(_ENTRY.pack(*e) for e in entries)


def filtered(supported, apic_id, masks, kind=None):
    """The table one vCPU gets: ``supported`` filtered as NVMM does, with ``masks`` (``{leaf: ConfCpuid}``);
    ``kind`` (``provider.hardware_kind()``) adds what that kind cannot run (``HIDE_BY_KIND``)."""
    out = []
    hide = list(HIDE.items()) + list(HIDE_BY_KIND.get(kind, {}).items())
    for e in supported:
        e = list(e)
        fn = e[0]
        if fn == MWAIT_LEAF:
            continue
        for (leaf, reg), bits in hide:
            if fn == leaf:
                e[_REG[reg]] &= ~bits
        if fn == 0x1:
            e[_REG["ecx"]] |= L1_ECX_HYPERVISOR
            e[_REG["ebx"]] = (e[_REG["ebx"]] & 0x00FFFFFF) | ((apic_id & 0xFF) << 24)
        elif fn in (0xB, 0x1F):
            e[_REG["edx"]] = apic_id
        if fn < HYPERVISOR_LEAF or fn >= 0x80000000:
            out.append(e)
    sig = struct.unpack("<3I", NVMM_SIGNATURE)
    out.append([HYPERVISOR_LEAF, 0, 0, HYPERVISOR_LEAF, *sig])
    present = {e[0] for e in out}
    for leaf in sorted(masks):        # a masked hypervisor leaf NVMM answers with zeros gets its own entry
        if HYPERVISOR_LEAF < leaf < 0x80000000 and leaf not in present and masks[leaf].mask:
            out.append([leaf, 0, 0, 0, 0, 0, 0])
    for e in out:
        conf = masks.get(e[0])
        if conf is not None and conf.mask:
            for r, name in enumerate(("eax", "ebx", "ecx", "edx")):
                e[_REG[name]] = (e[_REG[name]] & ~conf.del_[r] & 0xFFFFFFFF) | conf.set[r]
    _psfd_follows_spec_ctrl(out)
    return out


def _psfd_follows_spec_ctrl(table):
    spec = any(e[0] == 0x7 and e[1] == 0 and e[_REG["edx"]] & L7_EDX_SPEC_CTRL for e in table) or \
        any(e[0] == 0x80000008 and e[_REG["ebx"]] & EXT8_EBX_SPEC_CTRL for e in table)
    if not spec:
        for e in table:
            if e[0] == 0x80000008:
                e[_REG["ebx"]] &= ~EXT8_EBX_PSFD
