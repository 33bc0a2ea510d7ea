"""KVM's paravirtual interface as the ops layer offers it on every provider: the signature and feature leaves, and
paravirtual end of interrupt (PV EOI). The clock MSRs are ``ops/pvclock.py``.

Follows Linux's ``Documentation/virt/kvm/x86/cpuid.rst`` and ``msr.rst``:

- CPUID ``0x40000100`` answers ``"KVMKVMKVM\\0\\0\\0"`` and the last KVM leaf in EAX; ``0x40000101`` EAX holds the
  features. Linux looks for the KVM signature every 0x100 leaves from 0x40000000, so NVMM's own signature stays at
  0x40000000 for guests that look for NVMM. Offered: ``KVM_FEATURE_NOP_IO_DELAY`` (port 0x80 delays are not
  needed), ``KVM_FEATURE_PV_EOI`` and ``KVM_FEATURE_CLOCKSOURCE2``: the hypervisor's own kvmclock where the
  provider has one (KVM: ``Machine.kernel_pvclock()``, with ``KVM_FEATURE_CLOCKSOURCE_STABLE_BIT``, as QEMU offers
  it), else ``ops/pvclock.py``'s when the provider knows its TSC rate.
- ``MSR_KVM_PV_EOI_EN`` (0x4b564d04): the guest gives a 4-byte aligned word of its RAM (bit 0 enables). When the
  ops layer injects an interrupt that needs nothing but the EOI (the only vector in service, nothing else
  requested, edge-triggered), it sets bit 0 of that word (:meth:`PvEoi.arm`); the guest then ends the interrupt
  by clearing the bit with one instruction instead of writing the APIC's EOI register, which would exit. The
  ops layer notices the cleared bit before it next decides an injection or sleeps in HLT
  (:meth:`PvEoi.sync`), and does the EOI on the vlapic then; it also syncs before the guest reaches its local
  APIC through an exit (the APIC page or the x2APIC MSRs), so ISR and PPR never show an interrupt the guest has
  ended, as KVM syncs on every exit. A misaligned word or one outside RAM is a #GP, as in KVM. Offered with the
  VM's ``pv_eoi`` option, on by default in the command line (``-o x86.pv_eoi=false`` withdraws it), as QEMU
  offers ``kvm-pv-eoi``: in the nested lab a virtio-blk 4 KiB request cost 2.3 EOI exits and took 7.2 ms
  without it, 0.7 and 5.7 ms with it. An earlier session saw one SMP virtio run triple-fault with it on; the
  same triple fault was also seen with it off, and is not understood.

Not supported: the other KVM features (steal time, async page faults, PV IPIs, PV TLB flush, PV unhalt, poll
control, MSI extended destination ids).
"""

import struct

KVM_CPUID_SIGNATURE = 0x40000100
KVM_CPUID_FEATURES = 0x40000101
KVM_SIGNATURE = b"KVMKVMKVM\0\0\0"
KVM_FEATURE_NOP_IO_DELAY = 1 << 1
KVM_FEATURE_CLOCKSOURCE2 = 1 << 3
KVM_FEATURE_CLOCKSOURCE_STABLE_BIT = 1 << 24
KVM_FEATURE_PV_EOI = 1 << 6

MSR_KVM_PV_EOI_EN = 0x4B564D04
KVM_MSR_ENABLED = 1 << 0
KVM_PV_EOI_BIT = 1 << 0
_U32 = struct.Struct("<I")


def cpuid_leaves(features):
    """``{leaf: (eax, ebx, ecx, edx)}``: the exact values of KVM's signature and feature leaves."""
    sig = struct.unpack("<3I", KVM_SIGNATURE)
    return {KVM_CPUID_SIGNATURE: (KVM_CPUID_FEATURES, *sig), KVM_CPUID_FEATURES: (features, 0, 0, 0)}


class PvEoiGP(Exception):
    """The MSR write is refused: #GP."""


class PvEoi:
    """One vCPU's PV EOI word. ``view(gpa, size)`` is a bounds-checked view of guest RAM; ``eoi()`` ends the
    highest interrupt in service on the vCPU's vlapic. The methods are called on the vCPU's thread while the
    vCPU is out of the guest."""

    __slots__ = ("view", "eoi", "msr_value", "word", "armed")

    def __init__(self, view, eoi):
        self.view, self.eoi, self.msr_value, self.word, self.armed = view, eoi, 0, None, False

    @staticmethod
    def handles_msr(msr):
        return msr == MSR_KVM_PV_EOI_EN

    def rdmsr(self, msr):
        return self.msr_value

    def wrmsr(self, msr, value):
        value &= (1 << 64) - 1
        word = None
        if value & KVM_MSR_ENABLED:
            gpa = value & ~KVM_MSR_ENABLED
            if gpa % 4:                     # reserved bit 1 set makes it misaligned too, as in KVM
                raise PvEoiGP(f"PV EOI word {gpa:#x} is not 4-byte aligned")
            try:
                word = self.view(gpa, 4)
            except (OSError, ValueError):
                raise PvEoiGP(f"PV EOI word {gpa:#x} is outside guest RAM") from None
        self.sync()                 # an armed bit left behind would swallow the guest's next EOI
        self.msr_value, self.word = value, word

    def arm(self):
        """Lets the guest end the interrupt just injected by clearing bit 0."""
        w = self.word
        _U32.pack_into(w, 0, _U32.unpack_from(w, 0)[0] | KVM_PV_EOI_BIT)
        self.armed = True

    def sync(self):
        """Disarms, if armed: does the EOI when the guest ended the interrupt meanwhile (it cleared the bit), else
        clears the bit, so the guest's EOI goes to the APIC again."""
        if not self.armed:
            return
        self.armed = False
        w = self.word
        v = _U32.unpack_from(w, 0)[0]
        if v & KVM_PV_EOI_BIT:
            _U32.pack_into(w, 0, v & ~KVM_PV_EOI_BIT)
        else:
            self.eoi()
