"""The soft CPU's CPUID: what unicorn's CPU model answers, filtered as NVMM's kernel filters it and cut down to
what unicorn emulates.

NVMM's filtering is the KVM provider's (``ops/nvmm/kvm/cpuid.py``): leaf 1 hides monitor/VMX/SMX/thermal/PCID
style bits and sets the hypervisor bit and the initial APIC id, leaf 5 (MONITOR) is empty, leaves 0xB/0x1F carry
the x2APIC id, SVM is hidden, 0x40000000 is NVMM's signature. Then the soft CPU's own cut (issue 24: "it
emulates what its CPUID offers or does not offer it"): unicorn 2's CPU model (QEMU 5's TCG, a Haswell without
AVX) offers the AVX state component in leaf 0xD although TCG decodes no 256-bit VEX form and runs 128-bit VEX
forms as their legacy SSE versions, so the XSAVE leaf offers x87 and SSE state only (Intel SDM vol. 1 13.2:
sub-leaf 0 EAX/EDX are the XCR0 bits XSETBV accepts, EBX/ECX the area sizes, sub-leaves 2-62 the components) and
XSETBV refuses the rest (``sysinsn.py``). The BMI1/BMI2 VEX forms (leaf 7) are emulated and stay offered.

Not supported: XSAVES supervisor state (IA32_XSS), CPUID faulting.
"""

import struct

#: XCR0 bits the soft CPU implements: x87 and SSE state.
XCR0_SUPPORTED = 0x3
#: Size of the XSAVE area with only those: the 512-byte legacy region and the 64-byte header.
XSAVE_LEGACY_SIZE = 512 + 64

L1_ECX_HIDE = (1 << 2) | (1 << 3) | (1 << 4) | (1 << 5) | (1 << 6) | (1 << 7) | (1 << 8) | (1 << 14) | \
    (1 << 15) | (1 << 21) | (1 << 24)
L1_EDX_HIDE = (1 << 7) | (1 << 12) | (1 << 14) | (1 << 21) | (1 << 22) | (1 << 29) | (1 << 31)
L1_ECX_HYPERVISOR = 1 << 31
EXT1_ECX_SVM = 1 << 2
HYPERVISOR_LEAF = 0x40000000
XSAVE_LEAF = 0xD
NVMM_SIGNATURE = struct.unpack("<3I", b"___ NVMM ___")


def _xsave_leaf(subleaf, a, b, c, d):
    """Leaf 0xD with only the components in XCR0_SUPPORTED."""
    if subleaf == 0:
        return a & XCR0_SUPPORTED, XSAVE_LEGACY_SIZE, XSAVE_LEGACY_SIZE, 0
    if subleaf == 1:        # XSAVEOPT and friends; no supervisor components
        return a, (XSAVE_LEGACY_SIZE if b else 0), 0, 0
    return 0, 0, 0, 0


def filter_cpuid(leaf, regs, apic_id, masks, subleaf=0):
    """The soft CPU's ``(eax, ebx, ecx, edx)`` for ``leaf``/``subleaf`` from what unicorn answered (``regs``),
    then the VMM's ``masks`` (``NVMM_VCPU_CONF_CPUID``) applied as NVMM applies them."""
    a, b, c, d = regs
    if leaf == 0x1:
        c = (c & ~L1_ECX_HIDE) | L1_ECX_HYPERVISOR
        d &= ~L1_EDX_HIDE
        b = (b & 0x00FFFFFF) | ((apic_id & 0xFF) << 24)
    elif leaf == 0x5:
        a = b = c = d = 0
    elif leaf in (0xB, 0x1F):
        d = apic_id
    elif leaf == XSAVE_LEAF:
        a, b, c, d = _xsave_leaf(subleaf, a, b, c, d)
    elif leaf == 0x80000001:
        c &= ~EXT1_ECX_SVM
    elif leaf == HYPERVISOR_LEAF:
        a, (b, c, d) = HYPERVISOR_LEAF, NVMM_SIGNATURE
    elif HYPERVISOR_LEAF < leaf < 0x80000000:
        a = b = c = d = 0
    out = [a, b, c, d]
    conf = masks.get(leaf)
    if conf is not None and conf.mask:
        for r in range(4):
            out[r] = (out[r] & ~conf.del_[r] & 0xFFFFFFFF) | conf.set[r]
    return out
