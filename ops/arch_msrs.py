"""The architectural MSRs the ops layer answers after the kernel devices (bhyve keeps them in ``vmm.c``/``vmx.c``):
the MSR policy of ``ops/nvmm/x86/msr_policy.py`` applied to the CPUID table this vCPU's guest sees, and the MSRs
that policy gives the ops layer to emulate.

- An MSR whose feature the guest's CPUID does not offer, a value with bits the offered features do not define,
  a non-canonical base, and an MSR the provider keeps in its own state (one that reaches here was refused
  there): #GP (:class:`MsrGP`), whatever ``-w`` says, since none of them is unknown.
- IA32_TSC_ADJUST and IA32_TSC as SDM vol. 3A 17.17.3 says, per vCPU: a write to IA32_TSC_ADJUST moves the TSC
  by the difference, a write to IA32_TSC moves IA32_TSC_ADJUST by the difference (the TSC itself through the
  provider's state, NVMM's ``msrs[NVMM_X64_MSR_TSC]``).
- IA32_SPEC_CTRL (its value, the defined bits only), IA32_PRED_CMD and IA32_FLUSH_CMD (write-only commands, which
  the host's own mitigations make moot here) and IA32_ARCH_CAPABILITIES (reads 0: nothing claimed).
- The rest goes on to userland (``vm_exit`` RDMSR/WRMSR, ``vmmshim/msr.py``).

The table comes from the provider (``Vcpu.guest_cpuid(leaf, index)``, vmmshim's extension); a provider without
it (libnvmm) gets no CPUID-derived refusals here: its kernel's own checks stand.

Not supported: the TSC's rate (only offsets move), IA32_TSC_ADJUST on a provider that cannot move its guest's TSC
(KVM's kvm_pvm: limit ``tsc-write``).
"""

from bhyve_devices.vlapic import ApicGP

from .nvmm import constants as C
from .nvmm.x86 import msr_policy as P

_MASK64 = (1 << 64) - 1


class MsrGP(ApicGP):
    """The access must raise #GP. A kind of the vlapic's ``ApicGP``, so the run loop's #GP path for the kernel
    MSRs (``VmmOpsNvmm._msr``) takes it as it takes the APIC's."""


class ArchMsrs:
    """One vCPU's architectural MSRs (:meth:`access`), over its NVMM vCPU ``nv``."""

    def __init__(self, nv):
        self.nv = nv
        self.tsc_adjust = 0
        self.spec_ctrl = 0

    def cpuid(self):
        """The guest's CPUID as a ``cpuid(leaf, index)`` function, or None where the provider cannot tell."""
        return getattr(self.nv, "guest_cpuid", None)

    def access(self, msr, value=None):
        """RDMSR (``value`` None) or WRMSR: ``(True, value read)`` when done here, ``(False, None)`` for userland.
        Raises :class:`MsrGP`."""
        rule = P.rule(msr)
        if rule is None:
            return False, None
        cpuid = self.cpuid()
        if cpuid is None:
            return False, None
        if P.refused(cpuid, msr, value) or rule.keeper == P.KERNEL:
            raise MsrGP(f"{'wr' if value is not None else 'rd'}msr {msr:#x} ({rule.name})")
        if rule.keeper == P.USER:
            return False, None
        if value is None:
            return True, self._read(msr)
        self._write(msr, value & _MASK64)
        return True, None

    # -- the MSRs emulated here ------------------------------------------------------------------------------------
    def _read(self, msr):
        if msr == P.MSR_TSC:
            return self._tsc()
        if msr == P.MSR_TSC_ADJUST:
            return self.tsc_adjust
        if msr == P.MSR_SPEC_CTRL:
            return self.spec_ctrl
        return 0                            # IA32_ARCH_CAPABILITIES: nothing claimed

    def _write(self, msr, value):
        if msr == P.MSR_TSC:
            self.tsc_adjust = (self.tsc_adjust + value - self._tsc()) & _MASK64
            self._set_tsc(value)
        elif msr == P.MSR_TSC_ADJUST:
            self._set_tsc(self._tsc() + value - self.tsc_adjust)
            self.tsc_adjust = value
        elif msr == P.MSR_SPEC_CTRL:
            self.spec_ctrl = value
        # IA32_PRED_CMD, IA32_FLUSH_CMD: commands with nothing to keep

    def _tsc(self):
        nv = self.nv
        nv.getstate(C.NVMM_X64_STATE_MSRS)
        return nv.state.msrs[C.NVMM_X64_MSR_TSC]

    def _set_tsc(self, value):
        nv = self.nv
        nv.getstate(C.NVMM_X64_STATE_MSRS)
        nv.state.msrs[C.NVMM_X64_MSR_TSC] = value & _MASK64
        nv.setstate(C.NVMM_X64_STATE_MSRS)
