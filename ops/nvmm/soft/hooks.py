"""Which guest instructions the software CPU must turn into NVMM exits or complete itself, and their decoding.

Unicorn's instruction hooks for IN/OUT and CPUID run in the middle of a translation block (the block goes on after
``emu_stop``) and it has none for RDMSR/WRMSR or HLT, so the provider looks at every instruction *before* it
executes (a ``UC_HOOK_CODE`` hook; unicorn stops before the hooked instruction) and stops in front of the ones
NVMM's kernel sends to userland or that unicorn gets wrong. :func:`decode` reads the legacy prefixes (F2/F3, 66,
67, segment overrides, F0) and REX as the SDM vol. 2A chapter 2 lays them out and classifies the opcode: IN/OUT/
INS/OUTS (E4-E7, EC-EF, 6C-6F), HLT (F4), CPUID (0F A2), RDMSR (0F 32), WRMSR (0F 30), MONITOR/MWAIT (0F 01
C8/C9), the instructions that leave an interrupt shadow (STI, MOV SS, POP SS), and those ``sysinsn.py`` emulates:
SYSCALL (0F 05) and SYSENTER (0F 34), which unicorn only reports to hooks, XSETBV (0F 01 D1), MOV to/from CR8
(0F 20/22 with REX.R), which unicorn has no TPR for, LGDT/LIDT (0F 01 /2, /3 with a memory operand) and
LLDT/LTR (0F 00 /2, /3), whose loaded base unicorn does not check for a canonical form, and VEX-encoded AVX
instructions (C4/C5, vol. 2A 2.3), which the CPUID does not offer (``cpuid.py``) and which are #UD. The exit's
``npc`` is the instruction pointer (not the linear address unicorn's hook reports: CS's base is not 0 for an AP
started by SIPI) plus the length, wrapped to the code segment's size.

An instruction the CPU would refuse faults before it exits, as SDM vol. 2 and 3A say: HLT, RDMSR/WRMSR, XSETBV
and MOV CR8 at CPL > 0 (#GP), I/O at CPL > IOPL unless the TSS's I/O permission bitmap allows every port it
touches (vol. 1 19.5.2; #GP).

Not supported: prefixes beyond 14 bytes, HLT or I/O with redundant prefixes counted differently from the CPU's
limit of 15 bytes, the I/O bitmap in virtual-8086 mode (treated as protected mode).
"""

from typing import NamedTuple, Optional

from unicorn import Uc, UC_ARCH_X86, UC_MODE_64
from unicorn import x86_const as X

from .. import constants as C
from ..state import EXIT_IO_FMT, EXIT_RDMSR_FMT, EXIT_WRMSR_FMT
from ..x86 import msr_policy
from . import ucstate as U
from .iopriv import io_allowed
from .cpuid import filter_cpuid  # noqa: F401 (the code hook's and guest_cpuid's filter)

MSR_FS_BASE, MSR_GS_BASE, MSR_TSC_AUX = 0xC0000100, 0xC0000101, 0xC0000103
#: MSRs the emulated CPU keeps itself (NVMM's msrs[], FS/GS base, and IA32_TSC_AUX for the RDTSCP the CPUID
#: offers, as NVMM's kernel keeps it); every other RDMSR/WRMSR exits.
KERNEL_MSRS = frozenset(U.MSR_NUMBERS) | {MSR_FS_BASE, MSR_GS_BASE, MSR_TSC_AUX}
#: MSRs NVMM's kernel answers without exiting (anchors (b)): BIOS_SIGN, PLATFORM_ID read 0, MISC_ENABLE.
KERNEL_CONST_MSRS = {0x8B: 0, 0x17: 0, 0x1A0: 1}

IO, HLT, CPUID, RDMSR, WRMSR, MONITOR, MWAIT, SHADOW, SYSCALL, SYSENTER, XSETBV, MOV_CR8, VEX = range(1, 14)
LGDT, LIDT, LLDT, LTR = range(14, 18)
#: The kinds ``sysinsn.py`` completes.
EMULATED = frozenset({SYSCALL, SYSENTER, XSETBV, MOV_CR8, VEX, LGDT, LIDT, LLDT, LTR})
SEG_PREFIX = {0x26: C.NVMM_X64_SEG_ES, 0x2E: C.NVMM_X64_SEG_CS, 0x36: C.NVMM_X64_SEG_SS,
              0x3E: C.NVMM_X64_SEG_DS, 0x64: C.NVMM_X64_SEG_FS, 0x65: C.NVMM_X64_SEG_GS}
PREFIXES = frozenset((0xF0, 0xF2, 0xF3, 0x66, 0x67) + tuple(SEG_PREFIX))
VEX2, VEX3 = 0xC5, 0xC4
#: VEX opcodes of BMI1/BMI2 (general-purpose registers; emulated, offered by CPUID leaf 7): map 0F38 ANDN, the
#: BLSR/BLSMSK/BLSI group, BZHI/PDEP/PEXT, MULX, BEXTR/SHLX/SARX/SHRX; map 0F3A RORX.
VEX_MAP_0F38, VEX_MAP_0F3A = 2, 3
VEX_BMI = {VEX_MAP_0F38: frozenset({0xF2, 0xF3, 0xF5, 0xF6, 0xF7}), VEX_MAP_0F3A: frozenset({0xF0})}
#: First bytes that may start an instruction of interest (the code hook's quick filter).
INTERESTING = frozenset(PREFIXES | {0xE4, 0xE5, 0xE6, 0xE7, 0xEC, 0xED, 0xEE, 0xEF, 0x6C, 0x6D, 0x6E, 0x6F,
                                   0xF4, 0x0F, 0xFB, 0x8E, 0x17, VEX2, VEX3} | set(range(0x40, 0x50)))


#: First bytes whose meaning a stale non-64-bit mode would get wrong (REX; VEX for LES/LDS): decoded again in the
#: instruction's own mode even when the first decoding found nothing.
MODE_SENSITIVE = frozenset(set(range(0x40, 0x50)) | {VEX2, VEX3})


class Insn(NamedTuple):
    kind: int
    length: int
    in_: bool = False               # IN/INS; for MOV_CR8: a read of CR8
    port: Optional[int] = None      # None: the port is in DX
    operand_size: int = 0
    address_size: int = 0
    rep: bool = False
    str_: bool = False
    seg: int = -1
    reg: int = -1                   # MOV_CR8: the general-purpose register (NVMM's GPR order)


class Fault(NamedTuple):
    """An exception the instruction raises instead of completing (``error`` None: no error code)."""
    vector: int
    error: Optional[int] = None


GP0 = Fault(C.X86_EXC_GP, 0)
UD = Fault(C.X86_EXC_UD)


def _vex(code, i, mode64, prot):
    """The kind of the C4/C5 instruction at ``code[i]``: VEX for an AVX form, None for BMI or LES/LDS."""
    n = len(code)
    if i + 1 >= n or not (mode64 or (prot and code[i + 1] >= 0xC0)):
        return None                 # LES/LDS (outside 64-bit mode a VEX prefix has ModRM.mod = 11b)
    vmap, at = (1, i + 2) if code[i] == VEX2 else (code[i + 1] & 0x1F, i + 3)
    if at < n and code[at] in VEX_BMI.get(vmap, ()):
        return None
    return Insn(VEX, 0)


def decode(code, mode64, cs_db, prot=True):
    """An :class:`Insn` for the instruction at the start of ``code``, or ``None`` when it is none of ours."""
    i, rep, opsz, adsz, seg, rex = 0, False, False, False, -1, 0
    n = len(code)
    while i < n:
        c = code[i]
        if mode64 and 0x40 <= c <= 0x4F:
            rex = c
            i += 1
            continue
        if c in (0xF2, 0xF3):
            rep = True
        elif c == 0x66:
            opsz = True
        elif c == 0x67:
            adsz = True
        elif c in SEG_PREFIX:
            seg = SEG_PREFIX[c]
        elif c != 0xF0:
            break
        rex = 0                     # a REX prefix counts only right before the opcode
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
    if op in (VEX2, VEX3):
        return _vex(code, i, mode64, prot)
    if op == 0x0F and i + 1 < n:
        op2 = code[i + 1]
        kind = _OPCODES_0F.get(op2)
        if kind is not None:
            return Insn(kind, i + 2)
        if op2 == 0x01 and i + 2 < n and code[i + 2] in _OPCODES_0F01:
            return Insn(_OPCODES_0F01[code[i + 2]], i + 3)
        if op2 in (0x00, 0x01) and i + 2 < n:
            modrm = code[i + 2]
            reg = (modrm >> 3) & 7
            if reg in (2, 3) and (op2 == 0x00 or modrm >> 6 != 3):
                kind = (LLDT, LTR) if op2 == 0x00 else (LGDT, LIDT)
                return Insn(kind[reg - 2], _modrm_end(code, i + 2, asize))
        if op2 in (0x20, 0x22) and i + 2 < n:
            modrm = code[i + 2]
            if (modrm >> 3) & 7 == 0 and rex & 0x4:         # CR8 (REX.R with ModRM.reg 0)
                return Insn(MOV_CR8, i + 3, op2 == 0x20, reg=(modrm & 7) | (rex & 1) << 3)
    return None


def _modrm_end(code, at, asize):
    """The offset just past the ModRM byte at ``code[at]``, its SIB byte and its displacement (SDM vol. 2A 2.1.5,
    tables 2-1 to 2-3; ``asize`` the address size in bytes)."""
    modrm = code[at]
    mod, rm = modrm >> 6, modrm & 7
    at += 1
    if mod == 3:
        return at
    if asize == 2:
        return at + (2 if mod == 2 or (mod == 0 and rm == 6) else mod)
    if rm == 4:                     # SIB; base 101b with mod 00 takes a 32-bit displacement
        sib_base = code[at] & 7 if at < len(code) else 0
        at += 1
        if mod == 0 and sib_base == 5:
            return at + 4
    elif mod == 0 and rm == 5:      # disp32 (RIP-relative in 64-bit mode)
        return at + 4
    return at + (0, 1, 4)[mod]


_OPCODES_0F = {0xA2: CPUID, 0x32: RDMSR, 0x30: WRMSR, 0x05: SYSCALL, 0x34: SYSENTER}
_OPCODES_0F01 = {0xC8: MONITOR, 0xC9: MWAIT, 0xD1: XSETBV}


def next_ip(rip, length, hf):
    """The instruction pointer after an instruction of ``length`` bytes at ``rip``, wrapped as the code segment
    wraps it."""
    npc = rip + length
    if hf & U.HF_CS64:
        return npc
    return npc & (0xFFFFFFFF if hf & U.HF_CS32 else 0xFFFF)


# -- the guest's CPUID outside a guest instruction, and the MSR policy on the MSRs the emulated CPU keeps ----------
SCRATCH_PAGE = 0x1000
CPUID_INSN = b"\x0f\xa2"
L1_ECX_OSXSAVE = 1 << 27
_CPUID_REGS = (X.UC_X86_REG_RAX, X.UC_X86_REG_RBX, X.UC_X86_REG_RCX, X.UC_X86_REG_RDX)
_model_answers = {}


def model_cpuid(leaf, index):
    """What unicorn's CPU model answers for ``leaf``/``index`` before NVMM's filter: one CPUID on a scratch engine
    (the model is the same for every engine; cached)."""
    key = (leaf, index)
    if key not in _model_answers:
        uc = Uc(UC_ARCH_X86, UC_MODE_64)
        uc.mem_map(SCRATCH_PAGE, SCRATCH_PAGE)
        uc.mem_write(SCRATCH_PAGE, CPUID_INSN)
        uc.reg_write_batch([(X.UC_X86_REG_RAX, leaf), (X.UC_X86_REG_RCX, index)])
        uc.emu_start(SCRATCH_PAGE, SCRATCH_PAGE + len(CPUID_INSN))
        regs = [v & 0xFFFFFFFF for v in uc.reg_read_batch(_CPUID_REGS)]
        if leaf == 0x1:
            regs[2] &= ~L1_ECX_OSXSAVE          # follows the guest's CR4, not the scratch engine's
        _model_answers[key] = tuple(regs)
    return _model_answers[key]


def kept_wrmsr_refused(vcpu, msr, rip):
    """Whether the WRMSR at ``rip`` of an MSR the emulated CPU keeps (``KERNEL_MSRS``) must raise #GP instead
    (unicorn stores any value; the MSR policy refuses a non-canonical FS/GS/KERNEL_GS base); if so the vCPU's
    stop reason is that #GP."""
    uc = vcpu.uc
    value = (uc.reg_read(X.UC_X86_REG_EDX) << 32) | uc.reg_read(X.UC_X86_REG_EAX)
    if not msr_policy.refused(vcpu.guest_cpuid, msr, value):
        return False
    vcpu._why = ("exc", C.X86_EXC_GP, 0, False, rip)
    return True


def insn_exit(vcpu, insn, rip, hf):
    """The NVMM exit for ``insn`` at ``rip`` (the code hook stopped before it; ``hf`` the translation flags
    there), ``None`` when the provider completed it itself (CPUID without exit, published port reads, the MSRs
    NVMM's kernel answers) and the run goes on, or the :class:`Fault` it raises instead."""
    uc, buf = vcpu.uc, vcpu.exit.buf
    npc = next_ip(rip, insn.length, hf)
    kind = insn.kind
    if kind == IO:
        port = insn.port if insn.port is not None else uc.reg_read(X.UC_X86_REG_DX) & 0xFFFF
        if hf & U.HF_CPL_MASK:
            if not io_allowed(vcpu, port, insn.operand_size, hf):
                return GP0
        if insn.in_ and insn.operand_size == 1 and not insn.str_:
            value = vcpu.machine.answers.get(port)
            if value is not None:           # a published read (Machine.answer_io): AL, and the run goes on
                vcpu.answered += 1
                al = uc.reg_read(X.UC_X86_REG_RAX) & ~0xFF
                uc.reg_write_batch([(X.UC_X86_REG_RAX, al | value), (X.UC_X86_REG_RIP, npc)])
                return None
        EXIT_IO_FMT.pack_into(buf, 8, insn.in_, port, insn.seg, insn.address_size, insn.operand_size,
                              insn.rep, insn.str_, npc)
        return C.NVMM_VCPU_EXIT_IO
    if kind == CPUID:
        leaf = uc.reg_read(X.UC_X86_REG_EAX) & 0xFFFFFFFF
        conf = vcpu._cpuid_masks.get(leaf)
        if conf is not None and conf.exit:
            buf[8:16] = npc.to_bytes(8, "little")
            return C.NVMM_VCPU_EXIT_CPUID
        subleaf = uc.reg_read(X.UC_X86_REG_ECX) & 0xFFFFFFFF
        vcpu.step()
        regs = (X.UC_X86_REG_RAX, X.UC_X86_REG_RBX, X.UC_X86_REG_RCX, X.UC_X86_REG_RDX)
        vals = filter_cpuid(leaf, [v & 0xFFFFFFFF for v in uc.reg_read_batch(regs)], vcpu.cpuid,
                            vcpu._cpuid_masks, subleaf)
        uc.reg_write_batch(list(zip(regs, vals)))
        return None
    if kind in (MONITOR, MWAIT):            # the VMM makes them #UD
        buf[8:16] = npc.to_bytes(8, "little")
        return C.NVMM_VCPU_EXIT_MONITOR if kind == MONITOR else C.NVMM_VCPU_EXIT_MWAIT
    if hf & U.HF_CPL_MASK:                  # HLT, RDMSR and WRMSR are ring 0's
        return GP0
    if kind == HLT:
        uc.reg_write(X.UC_X86_REG_RIP, npc)
        img = vcpu.img.load()
        if img.hflags & U.HF_INHIBIT_IRQ:     # the HLT after STI ends the shadow
            img.hflags &= ~U.HF_INHIBIT_IRQ
            img.store()
        return C.NVMM_VCPU_EXIT_HALTED
    msr = uc.reg_read(X.UC_X86_REG_ECX) & 0xFFFFFFFF
    if msr in KERNEL_CONST_MSRS:
        if kind == RDMSR:
            v = KERNEL_CONST_MSRS[msr]
            uc.reg_write_batch([(X.UC_X86_REG_RAX, v & 0xFFFFFFFF), (X.UC_X86_REG_RDX, v >> 32)])
        uc.reg_write(X.UC_X86_REG_RIP, npc)
        return None
    if kind == RDMSR:
        EXIT_RDMSR_FMT.pack_into(buf, 8, msr, npc)
        return C.NVMM_VCPU_EXIT_RDMSR
    val = (uc.reg_read(X.UC_X86_REG_EDX) << 32) | uc.reg_read(X.UC_X86_REG_EAX)
    EXIT_WRMSR_FMT.pack_into(buf, 8, msr, val, npc)
    return C.NVMM_VCPU_EXIT_WRMSR
