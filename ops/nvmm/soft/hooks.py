"""Which guest instructions the software CPU must turn into NVMM exits, and their decoding.

Unicorn's instruction hooks for IN/OUT and CPUID run in the middle of a translation block (the block goes on after
``emu_stop``) and it has none for RDMSR/WRMSR or HLT, so the provider looks at every instruction *before* it
executes (a ``UC_HOOK_CODE`` hook; unicorn stops before the hooked instruction) and stops in front of the ones
NVMM's kernel sends to userland. :func:`decode` reads the legacy prefixes (F2/F3, 66, 67, segment overrides, F0)
and REX as the SDM vol. 2A chapter 2 lays them out and classifies the opcode: IN/OUT/INS/OUTS (E4-E7, EC-EF,
6C-6F), HLT (F4), CPUID (0F A2), RDMSR (0F 32), WRMSR (0F 30), MONITOR/MWAIT (0F 01 C8/C9), and the instructions
that leave an interrupt shadow (STI, MOV SS, POP SS). CPUID answers are filtered as NVMM's kernel filters them
(:func:`filter_cpuid`, the same hidden bits as ``ops/nvmm/kvm/cpuid.py``).

Not supported: prefixes beyond 14 bytes, VEX/EVEX-encoded forms (none of the instructions above has one), HLT
or I/O with redundant prefixes counted differently from the CPU's limit of 15 bytes.
"""

import struct
from typing import NamedTuple, Optional

from unicorn import x86_const as X

from .. import constants as C
from ..state import EXIT_IO_FMT, EXIT_RDMSR_FMT, EXIT_WRMSR_FMT
from . import ucstate as U

#: MSRs the emulated CPU keeps itself (NVMM's msrs[] plus FS/GS base); every other RDMSR/WRMSR exits.
KERNEL_MSRS = frozenset(U.MSR_NUMBERS) | {0xC0000100, 0xC0000101}
#: MSRs NVMM's kernel answers without exiting (anchors (b)): BIOS_SIGN, PLATFORM_ID read 0, MISC_ENABLE.
KERNEL_CONST_MSRS = {0x8B: 0, 0x17: 0, 0x1A0: 1}

IO, HLT, CPUID, RDMSR, WRMSR, MONITOR, MWAIT, SHADOW = range(1, 9)
SEG_PREFIX = {0x26: C.NVMM_X64_SEG_ES, 0x2E: C.NVMM_X64_SEG_CS, 0x36: C.NVMM_X64_SEG_SS,
              0x3E: C.NVMM_X64_SEG_DS, 0x64: C.NVMM_X64_SEG_FS, 0x65: C.NVMM_X64_SEG_GS}
PREFIXES = frozenset((0xF0, 0xF2, 0xF3, 0x66, 0x67) + tuple(SEG_PREFIX))
#: First bytes that may start an instruction of interest (the code hook's quick filter).
INTERESTING = frozenset(PREFIXES | {0xE4, 0xE5, 0xE6, 0xE7, 0xEC, 0xED, 0xEE, 0xEF, 0x6C, 0x6D, 0x6E, 0x6F,
                                   0xF4, 0x0F, 0xFB, 0x8E, 0x17} | set(range(0x40, 0x50)))


class Insn(NamedTuple):
    kind: int
    length: int
    in_: bool = False
    port: Optional[int] = None      # None: the port is in DX
    operand_size: int = 0
    address_size: int = 0
    rep: bool = False
    str_: bool = False
    seg: int = -1


def decode(code, mode64, cs_db):
    """An :class:`Insn` for the instruction at the start of ``code``, or ``None`` when it is none of ours."""
    i, rep, opsz, adsz, seg = 0, False, False, False, -1
    n = len(code)
    while i < n:
        c = code[i]
        if c in (0xF2, 0xF3):
            rep = True
        elif c == 0x66:
            opsz = True
        elif c == 0x67:
            adsz = True
        elif c in SEG_PREFIX:
            seg = SEG_PREFIX[c]
        elif c == 0xF0 or (mode64 and 0x40 <= c <= 0x4F):
            pass
        else:
            break
        i += 1
    if i >= n:
        return None
    op = code[i]
    if mode64:
        asize = 4 if adsz else 8
    else:
        asize = (2 if adsz else 4) if cs_db else (4 if adsz else 2)
    wide = (2 if opsz else 4) if (mode64 or cs_db) else (4 if opsz else 2)
    if op in (0xE4, 0xE5, 0xE6, 0xE7):
        return Insn(IO, i + 2, op in (0xE4, 0xE5), code[i + 1] if i + 1 < n else 0, 1 if op & 1 == 0 else wide,
                    asize)
    if op in (0xEC, 0xED, 0xEE, 0xEF):
        return Insn(IO, i + 1, op in (0xEC, 0xED), None, 1 if op & 1 == 0 else wide, asize)
    if op in (0x6C, 0x6D, 0x6E, 0x6F):
        in_ = op in (0x6C, 0x6D)
        return Insn(IO, i + 1, in_, None, 1 if op & 1 == 0 else wide, asize, rep, True,
                    C.NVMM_X64_SEG_ES if in_ else seg)
    if op == 0xF4:
        return Insn(HLT, i + 1)
    if op == 0xFB or op == 0x17 and not mode64:
        return Insn(SHADOW, i + 1)
    if op == 0x8E and i + 1 < n and (code[i + 1] >> 3) & 7 == 2:
        return Insn(SHADOW, i + 2)
    if op == 0x0F and i + 1 < n:
        op2 = code[i + 1]
        if op2 == 0xA2:
            return Insn(CPUID, i + 2)
        if op2 == 0x32:
            return Insn(RDMSR, i + 2)
        if op2 == 0x30:
            return Insn(WRMSR, i + 2)
        if op2 == 0x01 and i + 2 < n and code[i + 2] in (0xC8, 0xC9):
            return Insn(MONITOR if code[i + 2] == 0xC8 else MWAIT, i + 3)
    return None


# -- CPUID as NVMM's kernel filters it ------------------------------------------------------------------------------
L1_ECX_HIDE = (1 << 2) | (1 << 3) | (1 << 4) | (1 << 5) | (1 << 6) | (1 << 7) | (1 << 8) | (1 << 14) | \
    (1 << 15) | (1 << 21) | (1 << 24)
L1_EDX_HIDE = (1 << 7) | (1 << 12) | (1 << 14) | (1 << 21) | (1 << 22) | (1 << 29) | (1 << 31)
L1_ECX_HYPERVISOR = 1 << 31
EXT1_ECX_SVM = 1 << 2
HYPERVISOR_LEAF = 0x40000000
NVMM_SIGNATURE = struct.unpack("<3I", b"___ NVMM ___")


def filter_cpuid(leaf, regs, apic_id, masks):
    """NVMM's view of ``regs`` (eax, ebx, ecx, edx) that the emulated CPU answered for ``leaf``."""
    a, b, c, d = regs
    if leaf == 0x1:
        c = (c & ~L1_ECX_HIDE) | L1_ECX_HYPERVISOR
        d &= ~L1_EDX_HIDE
        b = (b & 0x00FFFFFF) | ((apic_id & 0xFF) << 24)
    elif leaf == 0x5:
        a = b = c = d = 0
    elif leaf in (0xB, 0x1F):
        d = apic_id
    elif leaf == 0x80000001:
        c &= ~EXT1_ECX_SVM
    elif leaf == HYPERVISOR_LEAF:
        a, (b, c, d) = HYPERVISOR_LEAF, NVMM_SIGNATURE
    elif HYPERVISOR_LEAF < leaf < 0x80000000:
        a = b = c = d = 0
    out = [a, b, c, d]
    conf = masks.get(leaf)
    if conf is not None and conf.mask:
        for r in range(4):
            out[r] = (out[r] & ~conf.del_[r] & 0xFFFFFFFF) | conf.set[r]
    return out


def insn_exit(vcpu, insn, rip):
    """The NVMM exit for ``insn`` at ``rip`` (the code hook stopped before it), or ``None`` when the provider
    completed it itself (CPUID without exit, the MSRs NVMM's kernel answers) and the run goes on."""
    uc, buf = vcpu.uc, vcpu.exit.buf
    npc = rip + insn.length
    if insn.kind == IO:
        port = insn.port if insn.port is not None else uc.reg_read(X.UC_X86_REG_DX) & 0xFFFF
        if insn.in_ and insn.operand_size == 1 and not insn.str_:
            value = vcpu.machine.answers.get(port)
            if value is not None:           # a published read (Machine.answer_io): AL, and the run goes on
                vcpu.answered += 1
                al = uc.reg_read(X.UC_X86_REG_RAX) & ~0xFF
                uc.reg_write_batch([(X.UC_X86_REG_RAX, al | value), (X.UC_X86_REG_RIP, npc)])
                return None
        EXIT_IO_FMT.pack_into(buf, 8, insn.in_, port, insn.seg, insn.address_size, insn.operand_size,
                              insn.rep, insn.str_, npc)
        vcpu._io_rip = rip
        return C.NVMM_VCPU_EXIT_IO
    if insn.kind == HLT:
        uc.reg_write(X.UC_X86_REG_RIP, npc)
        img = vcpu.img.load()
        if img.hflags & U.HF_INHIBIT_IRQ:     # the HLT after STI ends the shadow
            img.hflags &= ~U.HF_INHIBIT_IRQ
            img.store()
        return C.NVMM_VCPU_EXIT_HALTED
    if insn.kind in (MONITOR, MWAIT):
        buf[8:16] = npc.to_bytes(8, "little")
        return C.NVMM_VCPU_EXIT_MONITOR if insn.kind == MONITOR else C.NVMM_VCPU_EXIT_MWAIT
    if insn.kind == CPUID:
        leaf = uc.reg_read(X.UC_X86_REG_EAX) & 0xFFFFFFFF
        conf = vcpu._cpuid_masks.get(leaf)
        if conf is not None and conf.exit:
            buf[8:16] = npc.to_bytes(8, "little")
            return C.NVMM_VCPU_EXIT_CPUID
        vcpu.step()
        regs = (X.UC_X86_REG_RAX, X.UC_X86_REG_RBX, X.UC_X86_REG_RCX, X.UC_X86_REG_RDX)
        vals = filter_cpuid(leaf, [v & 0xFFFFFFFF for v in uc.reg_read_batch(regs)], vcpu.cpuid,
                            vcpu._cpuid_masks)
        uc.reg_write_batch(list(zip(regs, vals)))
        return None
    msr = uc.reg_read(X.UC_X86_REG_ECX) & 0xFFFFFFFF
    if msr in KERNEL_CONST_MSRS:
        if insn.kind == RDMSR:
            v = KERNEL_CONST_MSRS[msr]
            uc.reg_write_batch([(X.UC_X86_REG_RAX, v & 0xFFFFFFFF), (X.UC_X86_REG_RDX, v >> 32)])
        uc.reg_write(X.UC_X86_REG_RIP, npc)
        return None
    if insn.kind == RDMSR:
        EXIT_RDMSR_FMT.pack_into(buf, 8, msr, npc)
        return C.NVMM_VCPU_EXIT_RDMSR
    val = (uc.reg_read(X.UC_X86_REG_EDX) << 32) | uc.reg_read(X.UC_X86_REG_EAX)
    EXIT_WRMSR_FMT.pack_into(buf, 8, msr, val, npc)
    return C.NVMM_VCPU_EXIT_WRMSR
