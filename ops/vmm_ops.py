"""bhyve's ``vmm_ops`` table and the enums and structures it speaks (FreeBSD ``sys/amd64/include/vmm.h``, the
14/15-era header; xhyve ``include/xhyve/vmm/vmm.h`` for the member names).

:class:`VmmOps` is the interface, with xhyve's member names and signatures rendered in Python: the ``vmi`` cookie
returned by ``vm_init`` comes first, a vCPU is named by its id, and where C returns an error number with an out
parameter, Python returns the value and raises ``OSError(errno)`` (``EINVAL`` for a bad register or descriptor,
``ENOENT`` for an unknown capability, as bhyve). ``vmrun`` returns a :class:`VmExit`. ``vcpu_interrupt`` takes the
``vmi`` too (xhyve's takes only the vCPU id because its VM is a global).

The enums are current FreeBSD's: ``vm_reg_name`` (with DR0-3, DR6, FS/GS/KGS base and TPR), ``vm_cap_type``,
``vm_exitcode``, ``vm_suspend_how``, and ``seg_desc`` with VMX access rights (bit 16 set when the segment is
unusable). Exits carry no bytes: a table completes port and MMIO exits itself, its provider's assist calling the
VM's port or MMIO callback (``ops/vmm_api.py``'s ``VmSpec``), so ``INOUT`` and ``INST_EMUL`` are declared here for
bhyve's numbering but never reach a VM from ``vmm_ops_nvmm`` (``docs/design.md``).

Not here: ``vmspace_alloc``/``vmspace_free`` (no nested-paging address space in userspace), snapshot and
suspend/resume hooks.
"""

import enum
from dataclasses import dataclass
from typing import Any, Optional, Protocol


class VmRegName(enum.IntEnum):
    """``enum vm_reg_name``."""
    VM_REG_GUEST_RAX = 0
    VM_REG_GUEST_RBX = enum.auto()
    VM_REG_GUEST_RCX = enum.auto()
    VM_REG_GUEST_RDX = enum.auto()
    VM_REG_GUEST_RSI = enum.auto()
    VM_REG_GUEST_RDI = enum.auto()
    VM_REG_GUEST_RBP = enum.auto()
    VM_REG_GUEST_R8 = enum.auto()
    VM_REG_GUEST_R9 = enum.auto()
    VM_REG_GUEST_R10 = enum.auto()
    VM_REG_GUEST_R11 = enum.auto()
    VM_REG_GUEST_R12 = enum.auto()
    VM_REG_GUEST_R13 = enum.auto()
    VM_REG_GUEST_R14 = enum.auto()
    VM_REG_GUEST_R15 = enum.auto()
    VM_REG_GUEST_CR0 = enum.auto()
    VM_REG_GUEST_CR3 = enum.auto()
    VM_REG_GUEST_CR4 = enum.auto()
    VM_REG_GUEST_DR7 = enum.auto()
    VM_REG_GUEST_RSP = enum.auto()
    VM_REG_GUEST_RIP = enum.auto()
    VM_REG_GUEST_RFLAGS = enum.auto()
    VM_REG_GUEST_ES = enum.auto()
    VM_REG_GUEST_CS = enum.auto()
    VM_REG_GUEST_SS = enum.auto()
    VM_REG_GUEST_DS = enum.auto()
    VM_REG_GUEST_FS = enum.auto()
    VM_REG_GUEST_GS = enum.auto()
    VM_REG_GUEST_LDTR = enum.auto()
    VM_REG_GUEST_TR = enum.auto()
    VM_REG_GUEST_IDTR = enum.auto()
    VM_REG_GUEST_GDTR = enum.auto()
    VM_REG_GUEST_EFER = enum.auto()
    VM_REG_GUEST_CR2 = enum.auto()
    VM_REG_GUEST_PDPTE0 = enum.auto()
    VM_REG_GUEST_PDPTE1 = enum.auto()
    VM_REG_GUEST_PDPTE2 = enum.auto()
    VM_REG_GUEST_PDPTE3 = enum.auto()
    VM_REG_GUEST_INTR_SHADOW = enum.auto()
    VM_REG_GUEST_DR0 = enum.auto()
    VM_REG_GUEST_DR1 = enum.auto()
    VM_REG_GUEST_DR2 = enum.auto()
    VM_REG_GUEST_DR3 = enum.auto()
    VM_REG_GUEST_DR6 = enum.auto()
    VM_REG_GUEST_ENTRY_INST_LENGTH = enum.auto()
    VM_REG_GUEST_FS_BASE = enum.auto()
    VM_REG_GUEST_GS_BASE = enum.auto()
    VM_REG_GUEST_KGS_BASE = enum.auto()
    VM_REG_GUEST_TPR = enum.auto()
    VM_REG_LAST = enum.auto()


globals().update(VmRegName.__members__)

#: Registers that are segments (``vmgetdesc``/``vmsetdesc`` take them; ``vmgetreg`` of one is its selector).
SEGMENT_REGS = frozenset({VmRegName.VM_REG_GUEST_ES, VmRegName.VM_REG_GUEST_CS, VmRegName.VM_REG_GUEST_SS,
                          VmRegName.VM_REG_GUEST_DS, VmRegName.VM_REG_GUEST_FS, VmRegName.VM_REG_GUEST_GS,
                          VmRegName.VM_REG_GUEST_LDTR, VmRegName.VM_REG_GUEST_TR, VmRegName.VM_REG_GUEST_IDTR,
                          VmRegName.VM_REG_GUEST_GDTR})


class VmCapType(enum.IntEnum):
    """``enum vm_cap_type``."""
    VM_CAP_HALT_EXIT = 0
    VM_CAP_MTRAP_EXIT = 1
    VM_CAP_PAUSE_EXIT = 2
    VM_CAP_UNRESTRICTED_GUEST = 3
    VM_CAP_ENABLE_INVPCID = 4
    VM_CAP_BPT_EXIT = 5
    VM_CAP_RDPID = 6
    VM_CAP_RDTSCP = 7
    VM_CAP_IPI_EXIT = 8
    VM_CAP_MASK_HWINTR = 9
    VM_CAP_RFLAGS_TF = 10
    VM_CAP_MAX = 11


globals().update(VmCapType.__members__)


class VmExitCode(enum.IntEnum):
    """``enum vm_exitcode``."""
    VM_EXITCODE_INOUT = 0
    VM_EXITCODE_VMX = 1
    VM_EXITCODE_BOGUS = 2
    VM_EXITCODE_RDMSR = 3
    VM_EXITCODE_WRMSR = 4
    VM_EXITCODE_HLT = 5
    VM_EXITCODE_MTRAP = 6
    VM_EXITCODE_PAUSE = 7
    VM_EXITCODE_PAGING = 8
    VM_EXITCODE_INST_EMUL = 9
    VM_EXITCODE_SPINUP_AP = 10
    VM_EXITCODE_DEPRECATED1 = 11
    VM_EXITCODE_RENDEZVOUS = 12
    VM_EXITCODE_IOAPIC_EOI = 13
    VM_EXITCODE_SUSPENDED = 14
    VM_EXITCODE_INOUT_STR = 15
    VM_EXITCODE_TASK_SWITCH = 16
    VM_EXITCODE_MONITOR = 17
    VM_EXITCODE_MWAIT = 18
    VM_EXITCODE_SVM = 19
    VM_EXITCODE_REQIDLE = 20
    VM_EXITCODE_DEBUG = 21
    VM_EXITCODE_VMINSN = 22
    VM_EXITCODE_BPT = 23
    VM_EXITCODE_IPI = 24
    VM_EXITCODE_DB = 25
    VM_EXITCODE_MAX = 26


globals().update(VmExitCode.__members__)


class VmSuspendHow(enum.IntEnum):
    """``enum vm_suspend_how``; bhyve's process exit status follows it (0 reset ... 3 triple fault)."""
    VM_SUSPEND_NONE = 0
    VM_SUSPEND_RESET = 1
    VM_SUSPEND_POWEROFF = 2
    VM_SUSPEND_HALT = 3
    VM_SUSPEND_TRIPLEFAULT = 4


globals().update(VmSuspendHow.__members__)

# seg_desc.access: VMX access rights (SDM vol. 3C, table 24-2)
SEG_ACCESS_TYPE_MASK = 0xF
SEG_ACCESS_S = 1 << 4
SEG_ACCESS_DPL_SHIFT = 5
SEG_ACCESS_P = 1 << 7
SEG_ACCESS_AVL = 1 << 12
SEG_ACCESS_L = 1 << 13
SEG_ACCESS_DB = 1 << 14
SEG_ACCESS_G = 1 << 15
SEG_ACCESS_UNUSABLE = 1 << 16


@dataclass
class SegDesc:
    """``struct seg_desc``: the hidden part of a segment register."""
    base: int = 0
    limit: int = 0
    access: int = SEG_ACCESS_UNUSABLE


# -- vm_exit payloads (``struct vm_exit``'s union) ------------------------------------------------------------
@dataclass
class InOut:
    bytes: int
    in_: bool
    string: bool
    rep: bool
    port: int
    eax: int = 0


@dataclass
class InstEmul:
    gpa: int
    gla: int = -1
    cs_base: int = 0
    cs_d: int = 0


@dataclass
class Paging:
    gpa: int
    fault_type: int


@dataclass
class Msr:
    code: int
    wval: int = 0


@dataclass
class SpinupAp:
    vcpu: int
    rip: int


@dataclass
class Hlt:
    rflags: int
    intr_status: int = 0


@dataclass
class IoapicEoi:
    vector: int


@dataclass
class Suspended:
    how: int


@dataclass
class Vmx:
    status: int
    exit_reason: int
    exit_qualification: int = 0
    inst_type: int = 0
    inst_error: int = 0


class VmExit:
    """``struct vm_exit``: ``exitcode``, ``inst_length``, ``rip`` and the payload ``u`` (one of the classes
    above, or ``None``). The ops layer reuses one object per vCPU, so a handler copies what it keeps."""

    __slots__ = ("exitcode", "inst_length", "rip", "u")

    def __init__(self):
        self.exitcode = VmExitCode.VM_EXITCODE_BOGUS
        self.inst_length = 0
        self.rip = 0
        self.u = None

    def __repr__(self):
        try:
            name = VmExitCode(self.exitcode).name
        except ValueError:
            name = str(self.exitcode)
        return f"<vm_exit {name} rip={self.rip:#x} {self.u}>"


class VmmOps(Protocol):
    """``struct vmm_ops`` (xhyve member names). Every provider-backed table implements all of it."""

    def init(self) -> int: ...

    def cleanup(self) -> int: ...

    def vm_init(self, spec: Any) -> Any: ...

    def vcpu_init(self, vmi: Any, vcpu: int) -> int: ...

    def vmrun(self, vmi: Any, vcpu: int, rip: int, rendezvous_cookie: Any = None,
              suspend_cookie: Any = None) -> VmExit: ...

    def vm_cleanup(self, vmi: Any) -> None: ...

    def vcpu_cleanup(self, vmi: Any, vcpu: int) -> None: ...

    def vmgetreg(self, vmi: Any, vcpu: int, num: int) -> int: ...

    def vmsetreg(self, vmi: Any, vcpu: int, num: int, val: int) -> None: ...

    def vmgetdesc(self, vmi: Any, vcpu: int, num: int) -> SegDesc: ...

    def vmsetdesc(self, vmi: Any, vcpu: int, num: int, desc: SegDesc) -> None: ...

    def vmgetcap(self, vmi: Any, vcpu: int, num: int) -> int: ...

    def vmsetcap(self, vmi: Any, vcpu: int, num: int, val: int) -> None: ...

    def vlapic_init(self, vmi: Any, vcpu: int) -> Any: ...

    def vlapic_cleanup(self, vmi: Any, vlapic: Any) -> None: ...

    def vcpu_interrupt(self, vmi: Any, vcpu: int) -> None: ...


#: The members of the table, in xhyve's order (for checks that an implementation is complete).
VMM_OPS_MEMBERS = ("init", "cleanup", "vm_init", "vcpu_init", "vmrun", "vm_cleanup", "vcpu_cleanup", "vmgetreg",
                   "vmsetreg", "vmgetdesc", "vmsetdesc", "vmgetcap", "vmsetcap", "vlapic_init", "vlapic_cleanup",
                   "vcpu_interrupt")


def missing_members(ops) -> list:
    return [m for m in VMM_OPS_MEMBERS if not callable(getattr(ops, m, None))]


def exit_name(code: Optional[int]) -> str:
    try:
        return VmExitCode(code).name
    except (ValueError, TypeError):
        return f"VM_EXITCODE_{code}"
