"""The I/O privilege check of the soft CPU (Intel SDM vol. 1, 19.5 "Protected-mode I/O": IOPL and the TSS's I/O
permission bitmap), which unicorn does not make: the code hook asks it before it completes an IN or OUT at
CPL > 0.

Not supported: the virtual-8086 mode rules (vmmshim's guests do not run in it).
"""

import struct

from unicorn import x86_const as X

from . import ucstate as U
from .delivery import DeliveryFault, GuestMemory

RFLAGS_IOPL_SHIFT = 12
TSS_IOMAP_BASE = 0x66          # the I/O map base field of a 32- or 64-bit TSS


def io_allowed(vcpu, port, size, hf):
    """Whether I/O to ``size`` bytes at ``port`` may go ahead: in real mode, at CPL <= IOPL, or where the TSS's
    I/O permission bitmap clears every bit it touches."""
    cpl = hf & U.HF_CPL_MASK
    if not cpl or not hf & U.HF_PE:
        return True
    uc = vcpu.uc
    if cpl <= (uc.reg_read(X.UC_X86_REG_RFLAGS) >> RFLAGS_IOPL_SHIFT) & 3:
        return True
    _, base, limit, _ = vcpu.img.load().seg(U.ENV_TR)
    if limit < TSS_IOMAP_BASE + 1:
        return False
    first, last = port >> 3, (port + size - 1) >> 3
    try:
        mem = GuestMemory(vcpu)
        iomap = struct.unpack("<H", mem.read(base + TSS_IOMAP_BASE, 2))[0]
        if iomap + last > limit:
            return False
        bits = int.from_bytes(mem.read(base + iomap + first, last - first + 1), "little") >> (port & 7)
    except DeliveryFault:
        return False
    return not bits & ((1 << size) - 1)
