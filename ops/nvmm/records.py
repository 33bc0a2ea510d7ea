"""The records and the error helper of the NVMM API (``ops/nvmm/api.py``, which re-exports every name here).

The debug exit (vmmshim's extension: :data:`NVMM_VCPU_EXIT_DEBUG` and its :class:`ExitDebug` payload), the assist
callbacks (``struct nvmm_assist_callbacks``) and the vCPU confs (``struct nvmm_vcpu_conf_cpuid`` / ``_tpr``), and
:func:`nvmm_error`, the :class:`OSError` every call raises.
"""

import os
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

#: vmmshim's extension exit: a guest-debug event (``Vcpu.debug_exit`` says which); NVMM has none.
NVMM_VCPU_EXIT_DEBUG = 0x3000
DEBUG_BP, DEBUG_STEP, DEBUG_HW = "bp", "step", "hw"


class ExitDebug(NamedTuple):
    """The payload of :data:`NVMM_VCPU_EXIT_DEBUG`: ``kind`` (:data:`DEBUG_BP`: an int3 trapped with RIP at
    it; :data:`DEBUG_STEP`: one instruction done; :data:`DEBUG_HW`: a debug register matched), the linear
    ``pc`` and DR6 (which debug register matched)."""
    kind: str
    pc: int
    dr6: int = 0


IoCallback = Callable[[int, bool, memoryview], None]
MemCallback = Callable[[int, bool, memoryview], None]


def nvmm_error(err, what):
    """An :class:`OSError` carrying an NVMM errno and a one-line explanation."""
    return OSError(err, f"{os.strerror(err)}: {what}")


class AssistCallbacks(NamedTuple):
    """``struct nvmm_assist_callbacks``, the conf of ``NVMM_VCPU_CONF_CALLBACKS``."""
    io: Optional[IoCallback] = None
    mem: Optional[MemCallback] = None


@dataclass
class ConfCpuid:
    """``struct nvmm_vcpu_conf_cpuid``: for ``leaf``, AND out ``del_`` then OR in ``set`` (each
    ``(eax, ebx, ecx, edx)``) after the provider's own filtering; with ``exit`` the CPUID instruction exits
    with ``NVMM_VCPU_EXIT_CPUID`` instead."""
    leaf: int
    mask: bool = False
    exit: bool = False
    set: tuple = (0, 0, 0, 0)
    del_: tuple = (0, 0, 0, 0)


@dataclass
class ConfTpr:
    """``struct nvmm_vcpu_conf_tpr``."""
    exit_changed: bool = False
