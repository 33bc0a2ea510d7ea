"""``struct nvmm_capability`` (NetBSD 10 ``nvmm.h``) and what vmmshim adds to it: ``limits``, the named things a
provider cannot do (tests cite them when they skip), and ``features``, the named extensions it has (as crosvm's
``VmCap``: a VMM asks for an extension only where the provider lists it, ``vmmshim/fastpaths.py``).

Not here: ``nvmm_ctl`` capabilities (administration).
"""

from dataclasses import dataclass, field

from . import constants as C
from .state import STATE_SIZE


@dataclass
class CapMd:
    """``struct nvmm_cap_md`` (x86)."""
    mach_conf_support: int = 0
    vcpu_conf_support: int = 0
    xcr0_mask: int = 0
    mxcsr_mask: int = 0
    conf_cpuid_maxops: int = 0


@dataclass
class Capability:
    """``struct nvmm_capability``, plus ``limits``: named things this provider cannot do, and ``features``: the
    extensions it has (both vmmshim's)."""
    version: int = C.NVMM_KERN_VERSION
    state_size: int = STATE_SIZE
    max_machines: int = 0
    max_vcpus: int = 0
    max_ram: int = 0
    arch: CapMd = field(default_factory=CapMd)
    limits: frozenset = frozenset()
    features: frozenset = frozenset()


# Named provider features a capability may list (vmmshim's, as crosvm's ``VmCap``): the extensions a VMM may ask of
# :class:`Machine` only where the provider lists them (``vmmshim/fastpaths.py`` asks once, here).
FEATURE_POSTED_IO = "posted-io"            # Machine.post_io: OUTs buffered without an exit (KVM coalesced PIO)
FEATURE_ANSWERED_IO = "answered-io"        # Machine.answer_io: published one-byte IN values answered inside
FEATURE_ANSWERED_MMIO = "answered-mmio"    # Machine.answer_mmio: published 32-bit MMIO register values, the same
FEATURE_DOORBELL = "doorbell"              # Machine.doorbell: writes signal an eventfd (KVM ioeventfd)
FEATURE_KERNEL_PVCLOCK = "kernel-pvclock"  # Machine.kernel_pvclock: the hypervisor's own kvmclock
FEATURE_DEBUG_STEP = "debug-step"          # Vcpu.set_guest_debug(step=True): exit after one instruction
FEATURE_DEBUG_BP = "debug-bp"              # Vcpu.set_guest_debug(sw_bp=True): int3 exits (and Vcpu.inject_bp)
FEATURE_DEBUG_HW = "debug-hw"              # Vcpu.set_guest_debug(hw=...): execute breakpoints in debug registers
FEATURE_DEBUG_WATCH = "debug-watch"        # ... and data breakpoints (watchpoints) in them


# Named provider limits a capability may list (tests cite them by name).
LIMIT_CPUID_EXIT = "cpuid-exit"          # CPUID never exits to userland
LIMIT_NMI_WINDOW = "nmi-window"          # no NMI_READY exits
LIMIT_TPR_EXIT = "tpr-exit"              # no TPR_CHANGED exits
LIMIT_PAGING32 = "paging32"              # cannot run 32-bit or PAE paging
LIMIT_CPUID_MASK_1_7 = "cpuid-mask-1-7"  # CPUID leaves 1 and 7 ignore masks
LIMIT_CPUID_LATE = "cpuid-after-run"     # CPUID configuration refused after the first run
LIMIT_SOFT_INT = "int-n"                 # guest `int n`/`int3` fail
LIMIT_IRQ_WINDOW_LATE = "irq-window-late"  # INT_READY comes at the next exit after the window opens
LIMIT_TSC_WRITE = "tsc-write"            # the guest TSC cannot be moved (IA32_TSC, IA32_TSC_ADJUST, MSR state)
LIMIT_TSC_RATE = "tsc-rate"              # the guest TSC's rate is not known (Vcpu.tsc_frequency() is None): no
                                         # emulated kvmclock, no TSC-deadline mode offered
LIMIT_GUEST_DEBUG = "guest-debug"       # no single-step, int3 trap or debug-register exits (KVM_SET_GUEST_DEBUG)
LIMIT_GUEST_DEBUG_INT3 = "guest-debug-int3"     # int3 cannot be trapped (a debugger's breakpoints use DR0-3)
LIMIT_GUEST_DEBUG_WATCH = "guest-debug-watch"   # data breakpoints (watchpoints) never fire
#: Prefix of the limits naming a feature CPUID offers (in registers the provider cannot mask) that the guest
#: cannot use: ``limit_unusable("xsave")``; feature names as ``ops/nvmm/x86/cpuid_bits.py``.
LIMIT_UNUSABLE_PREFIX = "offered-unusable:"


def limit_unusable(feature):
    return LIMIT_UNUSABLE_PREFIX + feature
