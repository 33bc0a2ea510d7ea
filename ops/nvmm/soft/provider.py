"""The NVMM primitives on a software CPU: the provider and the machine (guest memory shared by the vCPUs).

Follows libnvmm(3) for the machine calls and the KVM provider (``ops/nvmm/kvm/provider.py``) for the shape. Each
vCPU is one unicorn engine; guest RAM is the caller's host memory, mapped into every engine with
``uc.mem_map_ptr`` so all vCPUs and the VMM see the same bytes. ``prot`` becomes ``UC_PROT_*``: a mapping without
write permission makes guest writes stop with a MEMORY exit (prot WRITE) and leaves the memory unchanged; a
page that is not mapped (MMIO) makes every access a MEMORY exit.

Not supported: more than ``MAX_VCPUS`` vCPUs, guest-physical addresses above 2^48, mappings whose host memory
moves (hva ranges must stay mapped while gpa-mapped, as with libnvmm).
"""

import errno

import unicorn

from .. import api
from .. import constants as C
from .. import ProviderUnavailable
from . import ucstate
from ..capability import LIMIT_TSC_RATE
from .cpuid import XCR0_SUPPORTED
from .ucstate import uc_prot  # noqa: F401 (its old home)

MAX_VCPUS = 64
MAX_RAM = 1 << 40
#: What this provider cannot do (api.LIMIT_* plus the soft ones below).
LIMIT_NMI_BLOCKING = "nmi-blocking"      # NMIs are delivered without blocking further NMIs until IRET
LIMIT_TASK_GATES = "task-gates"          # events through task gates (and hardware task switches) fail
LIMIT_SMC_IN_RUN = "smc-within-run"      # host writes to guest code are seen at the next run, not during one
LIMITS = frozenset({api.LIMIT_NMI_WINDOW, LIMIT_NMI_BLOCKING, LIMIT_TASK_GATES, LIMIT_SMC_IN_RUN,
                    LIMIT_TSC_RATE})


#: the answered port reads, and guest debugging by the hooks (debug.py): single steps, int3 exits, and
#: debug-register breakpoints and watchpoints
FEATURES = frozenset({api.FEATURE_ANSWERED_IO, api.FEATURE_DEBUG_STEP, api.FEATURE_DEBUG_BP, api.FEATURE_DEBUG_HW,
                      api.FEATURE_DEBUG_WATCH})


class SoftProvider(api.Provider):
    name = "soft"

    def __init__(self):
        major = unicorn.uc_version()[0]
        if major < 2:
            raise ProviderUnavailable(errno.ENOTSUP, f"unicorn {major}.x is too old for the soft provider (need 2)")
        why = ucstate.probe_layout()
        if why:
            raise ProviderUnavailable(errno.ENOTSUP, why)

    def capability(self):
        return api.Capability(
            max_machines=128, max_vcpus=MAX_VCPUS, max_ram=MAX_RAM,
            arch=api.CapMd(vcpu_conf_support=C.NVMM_CAP_ARCH_VCPU_CONF_CPUID | C.NVMM_CAP_ARCH_VCPU_CONF_TPR,
                           xcr0_mask=XCR0_SUPPORTED,
                           mxcsr_mask=0xFFBF, conf_cpuid_maxops=256),
            limits=LIMITS, features=FEATURES)

    def machine_create(self):
        return SoftMachine(self)


class SoftMachine(api.Machine):
    """Guest memory as a list of areas that every vCPU's engine maps; published port reads (``answer_io``) are
    answered by the instruction hook (``hooks.insn_exit``) without an exit."""

    def __init__(self, provider):
        super().__init__(provider)
        self.answers = {}           # port -> the value a one-byte IN reads

    def _answer_io(self, port, value):
        if value is None:
            self.answers.pop(port, None)
        else:
            self.answers[port] = value
        return True

    def _gpa_map(self, hva, gpa, size, prot):
        for vcpu in self.vcpus.values():
            vcpu.map_area(gpa, size, prot, hva)

    def _gpa_unmap(self, area):
        for vcpu in self.vcpus.values():
            vcpu.unmap_area(area.start, area.size)

    def _vcpu_create(self, cpuid):
        from .vcpu import SoftVcpu
        vcpu = SoftVcpu(self, cpuid)
        for a in self._gpa:
            vcpu.map_area(a.start, a.size, a.prot, a.hva)
        return vcpu
