"""What a KVM guest's CPUID instruction really answers, found by running one: kvm_pvm answers some registers of
leaves 1, 7 and 0xD.1 itself, from the host, whatever ``KVM_SET_CPUID2`` said (``docs/msr.md``); the MSR policy and
the features a guest is told about must follow those answers, not the table we set.

One tiny guest per process (the host does not change under it): real mode, ``cpuid`` for each probed leaf, the
four registers stored in RAM, ``hlt``. Hand-assembled (16-bit encodings, SDM vol. 2): ``mov di, imm16`` (BF iw),
``mov eax/ecx, imm32`` (66 B8/B9 id), ``cpuid`` (0F A2), ``mov [di+d8], r32`` (66 89 /r), ``add di, imm8``
(83 /0 ib), ``hlt`` (F4).

Not supported: per-vCPU answers (the APIC id in leaf 1 EBX is the table's), the dynamic bits (OSXSAVE, the XSAVE
sizes that follow XCR0).
"""

import ctypes
import errno
import mmap
import struct
import threading

from .. import api
from .. import constants as C
from ..x86.cpuid_bits import EAX, EBX, ECX, EDX

#: (leaf, index) -> the registers kvm_pvm answers itself there (measured: docs/msr.md).
PVM_OWN_REGISTERS = {(0x1, 0): (ECX, EDX), (0x7, 0): (EBX, ECX, EDX), (0x7, 1): (EAX,), (0xD, 1): (EAX,)}
PROBE_RAM = 0x10000
CODE, RESULTS = 0x0, 0x1000
ATTR_CODE16, ATTR_DATA16 = 0xB | 0x10 | 0x80, 0x3 | 0x10 | 0x80
REAL_MODE_LIMIT = 0xFFFF
MAX_EXITS = 64
_STORE = (b"\x66\x89\x05", b"\x66\x89\x5d\x04", b"\x66\x89\x4d\x08", b"\x66\x89\x55\x0c")   # eax, ebx, ecx, edx
_cache = {}
_lock = threading.Lock()                # two vCPU threads at their first run probe once


def _code(leaves):
    out = bytearray(b"\xbf" + struct.pack("<H", RESULTS))
    for leaf, index in leaves:
        out += b"\x66\xb8" + struct.pack("<I", leaf) + b"\x66\xb9" + struct.pack("<I", index) + b"\x0f\xa2"
        out += b"".join(_STORE) + b"\x83\xc7\x10"
    return bytes(out + b"\xf4")


def probe(provider, leaves=tuple(PVM_OWN_REGISTERS)):
    """``{(leaf, index): (eax, ebx, ecx, edx)}`` as a guest of ``provider`` sees them (cached per process)."""
    key = tuple(leaves)
    with _lock:
        if key not in _cache:
            _cache[key] = _run(provider, key)
        return _cache[key]


def _run(provider, leaves):
    mm = mmap.mmap(-1, PROBE_RAM, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    code = _code(leaves)
    mm[CODE:CODE + len(code)] = code
    anchor = ctypes.c_char.from_buffer(mm)
    machine = provider.machine_create()
    machine.probing = True                   # its vCPU applies no MSR policy (which would ask for this probe)
    try:
        hva = ctypes.addressof(anchor)
        machine.hva_map(hva, PROBE_RAM)
        machine.gpa_map(hva, 0, PROBE_RAM, C.NVMM_PROT_ALL)
        vcpu = machine.vcpu_create(0)
        vcpu.getstate(C.NVMM_X64_STATE_ALL)
        s = vcpu.state
        for i in (C.NVMM_X64_SEG_ES, C.NVMM_X64_SEG_SS, C.NVMM_X64_SEG_DS, C.NVMM_X64_SEG_FS, C.NVMM_X64_SEG_GS):
            s.segs[i].set(0, ATTR_DATA16, REAL_MODE_LIMIT, 0)
        s.segs[C.NVMM_X64_SEG_CS].set(0, ATTR_CODE16, REAL_MODE_LIMIT, 0)
        s.gprs[C.NVMM_X64_GPR_RIP] = CODE
        s.gprs[C.NVMM_X64_GPR_RFLAGS] = C.RFLAGS_RESERVED1
        vcpu.setstate(C.NVMM_X64_STATE_SEGS | C.NVMM_X64_STATE_GPRS)
        for _ in range(MAX_EXITS):
            if vcpu.run().reason == C.NVMM_VCPU_EXIT_HALTED:
                break
        else:
            raise api.nvmm_error(errno.EIO, "the CPUID probe guest did not halt")
        out = {lf: struct.unpack_from("<4I", mm, RESULTS + 16 * i) for i, lf in enumerate(leaves)}
    finally:
        machine.destroy()
        del anchor
        mm.close()
    return out


def overlay(cpuid, answers, own=PVM_OWN_REGISTERS):
    """``cpuid`` with the registers ``own`` names replaced by the probed ``answers``."""
    def view(leaf, index=0):
        regs = cpuid(leaf, index)
        regs_own = own.get((leaf, index))
        if regs_own is None:
            return regs
        got, regs = answers[(leaf, index)], list(regs)
        for r in regs_own:
            regs[r] = got[r]
        return tuple(regs)
    return view
