"""A KVM vCPU's CPUID (a mixin of :class:`ops.nvmm.kvm.vcpu.KvmVcpu`): NVMM's ``NVMM_VCPU_CONF_CPUID`` masks, the
table set with ``KVM_SET_CPUID2`` (KVM API, ``Documentation/virt/kvm/api.rst``) at the first run, and what the
guest's CPUID instruction answers.

The table is set at the first run, with the MSRs it refuses added to the VM's MSR filter; ``guest_cpuid`` answers
what the guest's CPUID instruction does (vmmshim's extension, the MSR policy's input:
``ops/nvmm/x86/msr_policy.py``). KVM derives CPUID.1:EDX.APIC from its own IA32_APIC_BASE.EN, which a leaf 1 mask
on that bit sets after the first run.

Not supported (see ``capability().limits``): CPUID exits to userland, another table after the first run (KVM
refuses it) beyond leaf 1's APIC bit.
"""

import errno
import fcntl

from .. import api
from .. import constants as C
from ..x86 import msr_policy
from . import cpuid as cpuidmod
from . import ioctls as K

_IOCTL = fcntl.ioctl
CPUID_1_EDX_APIC = 1 << 9
APICBASE_EN = 1 << 11


class VcpuCpuidMixin:
    """Expects KvmVcpu's ``fd``, ``cpuid``, ``machine``, ``get_msrs``/``set_msrs`` and the ``_cpuid_masks``,
    ``_cpuid_applied``, ``_cpuid_view`` it initializes."""

    def _configure(self, op, conf):
        if op == C.NVMM_VCPU_CONF_CPUID:
            if not isinstance(conf, api.ConfCpuid):
                raise api.nvmm_error(errno.EINVAL, "NVMM_VCPU_CONF_CPUID takes a ConfCpuid")
            if conf.exit:
                raise api.nvmm_error(errno.ENOTSUP, "KVM cannot make CPUID exit to userland (limit "
                                     f"{api.LIMIT_CPUID_EXIT!r})")
            old = self._cpuid_masks.get(conf.leaf)
            self._cpuid_masks[conf.leaf] = conf
            self._cpuid_view = None
            if self._cpuid_applied and not self._apic_bit_only(old, conf):
                self._apply_cpuid()
            return
        raise api.nvmm_error(errno.EINVAL, f"vCPU configuration op {op} is not supported on KVM")

    def _apic_bit_only(self, old, conf):
        """KVM derives CPUID.1:EDX.APIC from its own copy of IA32_APIC_BASE.EN (the vlapic that owns the MSR is
        in userland). After the first run, when KVM refuses a new table, a leaf 1 mask that changes only that bit
        is made by setting EN in KVM's copy (a host write, past the MSR filter). True if that was all."""
        if conf.leaf != 1:
            return False
        old = old or api.ConfCpuid(leaf=1)
        keep = (0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF & ~CPUID_1_EDX_APIC)
        if any((a ^ b) & k for a, b, k in zip(old.set + old.del_, conf.set + conf.del_, keep + keep)):
            return False
        on = bool(conf.set[3] & CPUID_1_EDX_APIC or not conf.del_[3] & CPUID_1_EDX_APIC)
        base, = self.get_msrs([C.MSR_APICBASE])
        self.set_msrs([(C.MSR_APICBASE, base | APICBASE_EN if on else base & ~APICBASE_EN)])
        return True

    def _apply_cpuid(self):
        """``KVM_SET_CPUID2``, then the MSR filter: the MSRs this guest's CPUID refuses must exit, since KVM
        answers some of them whatever the table says (``ops/nvmm/x86/msr_policy.py``)."""
        table = self.machine.provider.cpuid_table(self.cpuid, self._cpuid_masks)
        try:
            _IOCTL(self.fd, K.KVM_SET_CPUID2, bytearray(cpuidmod.pack_entries(table)))
        except OSError as exc:
            raise api.nvmm_error(exc.errno, "KVM refused the CPUID table (changing it after the first run "
                                 f"is limit {api.LIMIT_CPUID_LATE!r})") from None
        self._cpuid_applied = True
        if not self.machine.probing:
            self.machine.deny_msrs(*msr_policy.refused_msrs(self.guest_cpuid))

    def guest_cpuid(self, leaf, index=0):
        """vmmshim's extension: ``(eax, ebx, ecx, edx)`` the guest's CPUID answers for ``leaf``/``index``: the
        table this vCPU gets, with what this kind of KVM answers itself (``KvmProvider.guest_view``)."""
        view = self._cpuid_view
        if view is None:
            prov = self.machine.provider
            view = self._cpuid_view = prov.guest_view(prov.cpuid_table(self.cpuid, self._cpuid_masks))
        return view(leaf, index)
