"""NVMM exit payloads decoded from KVM's ``kvm_run`` page on access (``Vcpu.exit`` of the KVM provider).

The exit reason is set by the run loop; the payloads (``io``, ``mem``, ``rdmsr``, ``wrmsr``, ``insn``, ``inv``,
``exitstate``) are read from ``kvm_run`` only when asked for, so the per-exit path decodes nothing.

Not supported: an exact ``npc`` for IO exits (KVM does not report the instruction length; it is decoded from
guest memory, and on kvm_pvm an OUT exit already has RIP past the instruction).
"""

import struct

from .. import constants as C
from ..state import (ExitInsn, ExitInvalid, ExitIo, ExitMemory, ExitRdmsr, ExitState, ExitWrmsr,
                     INTR_EVT_PENDING, INTR_INT_SHADOW, INTR_INT_WINDOW_EXITING, Exit)
from . import ioctls as K
from . import layouts as L

MSR_INSN_LEN = 2   # rdmsr 0F 32 / wrmsr 0F 30
_U64 = struct.Struct("<Q")
_RFLAGS = L.RUN_S_REGS + 17 * 8     # kvm_regs.rflags in the synced registers


class KvmExit(Exit):
    """NVMM's exit payloads decoded from the ``kvm_run`` page on access."""

    __slots__ = ("vcpu", "kvm_reason", "rip")

    def __init__(self, vcpu):
        super().__init__()
        self.vcpu = vcpu
        self.kvm_reason = 0
        self.rip = 0      # RIP of the exiting instruction, where KVM leaves it

    @property
    def io(self):
        v = self.vcpu
        direction, size, port, count, _ = L.IO_FMT.unpack_from(v.mm, L.RUN_U)
        rep, str_, length, addr_size = v.decode_io_insn()
        return ExitIo(direction == K.KVM_EXIT_IO_IN, port, -1, addr_size, size, rep or count > 1,
                      str_ or count > 1, self.rip + length)

    @property
    def mem(self):
        mm = self.vcpu.mm
        gpa, = struct.unpack_from("<Q", mm, L.MMIO_GPA)
        prot = C.NVMM_PROT_WRITE if mm[L.MMIO_IS_WRITE] else C.NVMM_PROT_READ
        return ExitMemory(prot, gpa, 0, bytes(15))

    @property
    def mem_gpa(self):
        return _U64.unpack_from(self.vcpu.mm, L.MMIO_GPA)[0]

    @property
    def rdmsr(self):
        return ExitRdmsr(struct.unpack_from("<I", self.vcpu.mm, L.MSR_INDEX)[0], self.rip + MSR_INSN_LEN)

    @property
    def wrmsr(self):
        mm = self.vcpu.mm
        return ExitWrmsr(struct.unpack_from("<I", mm, L.MSR_INDEX)[0], struct.unpack_from("<Q", mm, L.MSR_DATA)[0],
                         self.rip + MSR_INSN_LEN)

    @property
    def insn(self):
        return ExitInsn(self.rip)

    @property
    def inv(self):
        mm = self.vcpu.mm
        if self.kvm_reason == K.KVM_EXIT_FAIL_ENTRY:
            return ExitInvalid(struct.unpack_from("<Q", mm, L.RUN_U)[0])
        if self.kvm_reason == K.KVM_EXIT_INTERNAL_ERROR:
            return ExitInvalid(L.INTERNAL_FMT.unpack_from(mm, L.RUN_U)[0])
        if self.kvm_reason == K.KVM_EXIT_UNKNOWN:
            return ExitInvalid(struct.unpack_from("<Q", mm, L.RUN_U)[0])
        return ExitInvalid(self.kvm_reason)

    @property
    def cr8(self):
        return _U64.unpack_from(self.vcpu.mm, L.RUN_CR8)[0]

    @property
    def exitstate(self):
        v = self.vcpu
        bits = v.intr_bits()
        mm = v.mm
        return ExitState(_U64.unpack_from(mm, _RFLAGS)[0], _U64.unpack_from(mm, L.RUN_CR8)[0],
                         bool(bits & INTR_INT_SHADOW), bool(bits & INTR_INT_WINDOW_EXITING), False,
                         bool(bits & INTR_EVT_PENDING))
