"""Instructions the software CPU completes itself because unicorn gets them wrong, and the checks unicorn skips
for the instructions the code hook takes from it.

Unicorn 2 replaces SYSCALL and SYSENTER by a call to its instruction hooks (the guest goes on at the next
instruction), keeps no TPR behind CR8 and lets XSETBV enable state components its CPU model lists but its
translator cannot run; the provider does these as the Intel SDM says:

- SYSCALL (vol. 2B): #UD outside 64-bit mode or with IA32_EFER.SCE clear; RCX := the next RIP, R11 := RFLAGS,
  RFLAGS &= ~IA32_FMASK (and RF), CS := IA32_STAR[47:32] & ~3 and SS := that + 8 as flat ring-0 segments (CS a
  64-bit code segment), RIP := IA32_LSTAR;
- SYSENTER (vol. 2B): #GP(0) in real mode or with IA32_SYSENTER_CS[15:2] = 0; VM, IF and RF cleared; CS :=
  IA32_SYSENTER_CS & ~3 (64-bit code in IA-32e mode, else 32-bit), SS := that + 8, RSP/RIP :=
  IA32_SYSENTER_ESP/EIP (their low halves outside IA-32e mode);
- XSETBV (vol. 2B): #GP(0) for a bit of XCR0 the CPUID does not offer (``cpuid.XCR0_SUPPORTED``); unicorn does
  the rest and keeps XCR0;
- MOV to/from CR8 (vol. 3A 10.8.6.1): CR8 is the provider's (NVMM_X64_CR_CR8, the exit state's cr8); a write of
  bits 63:4 or at CPL > 0 is #GP(0); with ``NVMM_VCPU_CONF_TPR`` (``exit_changed``) a write ends the run with
  ``NVMM_VCPU_EXIT_TPR_CHANGED``;
- a VEX-encoded AVX instruction is #UD, as on a CPU without AVX (vol. 2A 2.3.12);
- LGDT, LIDT, LLDT and LTR (vol. 2A, 2B; vol. 3A 3.4.5, 7.2.3): unicorn executes them and does every check but
  one, the loaded base's canonical form (48 bits, 57 with 5-level paging offered: ``msr_policy.linear_width``),
  which the provider makes after it: a non-canonical base puts GDTR/IDTR/LDTR/TR back as they were (and the TSS
  descriptor's busy bit LTR set) and raises #GP(0) for LGDT/LIDT, #GP(selector) for LLDT/LTR;
- I/O at CPL > IOPL consults the TSS's I/O permission bitmap (vol. 1 19.5.2): #GP(0) unless every bit of the
  ports touched is clear and inside the TSS limit.

Not supported: SYSCALL from compatibility or legacy mode (AMD's CSTAR/STAR[31:0] forms are #UD, as on Intel),
SYSENTER's checks on the target selectors' descriptors (flat segments are loaded as the SDM says, the GDT is not
read), the I/O bitmap of a 16-bit TSS, the canonical check of a descriptor-table load whose operand or descriptor
is in MMIO (a MEMORY exit; ``assist_mem`` completes it unchecked).
"""

from unicorn import UcError
from unicorn import x86_const as X

from .. import constants as C
from ..state import EXIT_MEM_FMT
from ..x86 import msr_policy
from . import hooks as H
from . import ucstate as U
from .cpuid import XCR0_SUPPORTED
from .delivery import DeliveryFault, GuestMemory

MSR_STAR, MSR_LSTAR, MSR_FMASK = 0xC0000081, 0xC0000082, 0xC0000084
MSR_SYSENTER_CS, MSR_SYSENTER_ESP, MSR_SYSENTER_EIP = 0x174, 0x175, 0x176
RFLAGS_RF, RFLAGS_VM = 1 << 16, 1 << 17
CR4_OSXSAVE = 1 << 18
CR8_MASK = 0xF
#: NVMM attribute words of the flat segments SYSCALL/SYSENTER load (type, S, DPL 0, P, L or D/B, G).
ATTR_CODE64 = 0xB | 0x10 | 0x80 | 0x200 | 0x800
ATTR_CODE32 = 0xB | 0x10 | 0x80 | 0x400 | 0x800
ATTR_STACK = 0x3 | 0x10 | 0x80 | 0x400 | 0x800
FLAT_LIMIT = 0xFFFFFFFF
_CS, _SS = U.ENV_SEGS + 24, U.ENV_SEGS + 48


def _load_flat(vcpu, cs_sel, cs_attrib, rflags):
    """CS and SS (selector + 8) as flat ring-0 segments, CPL 0, the translation flags recomputed."""
    uc = vcpu.uc
    img = vcpu.img.load()
    img.set_seg(_CS, cs_sel, 0, FLAT_LIMIT, U.attrib_to_flags(cs_attrib))
    img.set_seg(_SS, cs_sel + 8, 0, FLAT_LIMIT, U.attrib_to_flags(ATTR_STACK))
    img.recompute_hflags(uc.reg_read(X.UC_X86_REG_CR0), img.efer, rflags)
    img.store()


def syscall(vcpu, insn, rip, hf):
    uc = vcpu.uc
    if not hf & U.HF_CS64 or not U.rdmsr(uc, U.MSR_EFER) & C.EFER_SCE:
        return H.UD
    rflags = uc.reg_read(X.UC_X86_REG_RFLAGS)
    star, lstar, fmask = (U.rdmsr(uc, m) for m in (MSR_STAR, MSR_LSTAR, MSR_FMASK))
    new_rflags = rflags & ~fmask & ~RFLAGS_RF | C.RFLAGS_RESERVED1
    _load_flat(vcpu, (star >> 32) & 0xFFFC, ATTR_CODE64, new_rflags)
    uc.reg_write_batch([(X.UC_X86_REG_RCX, H.next_ip(rip, insn.length, hf)),
                        (X.UC_X86_REG_R11, rflags & ~RFLAGS_RF), (X.UC_X86_REG_RFLAGS, new_rflags),
                        (X.UC_X86_REG_RIP, lstar)])
    return None


def sysenter(vcpu, insn, rip, hf):
    uc = vcpu.uc
    cs = U.rdmsr(uc, MSR_SYSENTER_CS) & 0xFFFF
    if not hf & U.HF_PE or not cs & 0xFFFC:
        return H.GP0
    long_mode = bool(hf & U.HF_LMA)
    rflags = uc.reg_read(X.UC_X86_REG_RFLAGS) & ~(RFLAGS_VM | C.RFLAGS_IF | RFLAGS_RF)
    _load_flat(vcpu, cs & 0xFFFC, ATTR_CODE64 if long_mode else ATTR_CODE32, rflags)
    mask = 0xFFFFFFFFFFFFFFFF if long_mode else 0xFFFFFFFF
    uc.reg_write_batch([(X.UC_X86_REG_RFLAGS, rflags),
                        (X.UC_X86_REG_RSP, U.rdmsr(uc, MSR_SYSENTER_ESP) & mask),
                        (X.UC_X86_REG_RIP, U.rdmsr(uc, MSR_SYSENTER_EIP) & mask)])
    return None


def xsetbv(vcpu, insn, rip, hf):
    uc = vcpu.uc
    value = (uc.reg_read(X.UC_X86_REG_EDX) & 0xFFFFFFFF) << 32 | uc.reg_read(X.UC_X86_REG_EAX) & 0xFFFFFFFF
    if (not hf & U.HF_CPL_MASK and uc.reg_read(X.UC_X86_REG_CR4) & CR4_OSXSAVE
            and not uc.reg_read(X.UC_X86_REG_ECX) & 0xFFFFFFFF and value & ~XCR0_SUPPORTED):
        return H.GP0
    return vcpu.step_insn()           # unicorn checks CPL, CR4.OSXSAVE, ECX and x87, and keeps XCR0


def mov_cr8(vcpu, insn, rip, hf):
    if hf & U.HF_CPL_MASK:
        return H.GP0
    uc = vcpu.uc
    reg = U.GPR_REGS[insn.reg]
    npc = H.next_ip(rip, insn.length, hf)
    if insn.in_:
        uc.reg_write_batch([(reg, vcpu._cr8), (X.UC_X86_REG_RIP, npc)])
        return None
    value = uc.reg_read(reg)
    if value & ~CR8_MASK:
        return H.GP0
    vcpu._cr8 = value
    uc.reg_write(X.UC_X86_REG_RIP, npc)
    return C.NVMM_VCPU_EXIT_TPR_CHANGED if vcpu._tpr_exit else None


def vex(vcpu, insn, rip, hf):
    return H.UD


#: The registers LGDT, LIDT, LLDT and LTR load (offsets in unicorn's CPU image).
DT_REGS = {H.LGDT: U.ENV_GDT, H.LIDT: U.ENV_IDT, H.LLDT: U.ENV_LDT, H.LTR: U.ENV_TR}
DESC_TSS_BUSY = 1 << 1          # in byte 5 of a TSS descriptor (type 1011b busy, 1001b available)


def dt_load(vcpu, insn, rip, hf):
    """LGDT, LIDT, LLDT or LTR: unicorn's, then the canonical check of the loaded base it skips."""
    off = DT_REGS[insn.kind]
    old = vcpu.img.load().seg(off)
    try:
        fault = vcpu.step_insn()
    except UcError:
        why = vcpu._why
        if why is None or why[0] != "mem":
            raise
        vcpu.uc.reg_write(X.UC_X86_REG_RIP, rip)
        EXIT_MEM_FMT.pack_into(vcpu.exit.buf, 8, why[2], why[1], 0, bytes(15))
        vcpu._mem_access = why
        return C.NVMM_VCPU_EXIT_MEMORY
    if fault is not None:
        return fault
    img = vcpu.img.load()
    sel, base = img.seg(off)[:2]
    if msr_policy.canonical(base, msr_policy.linear_width(vcpu.guest_cpuid)):
        return None
    img.set_seg(off, *old)
    img.store()
    if insn.kind in (H.LGDT, H.LIDT):
        return H.GP0
    if insn.kind == H.LTR:          # unicorn marked the descriptor busy; the CPU checks before it does
        _, gdt_base, _, _ = img.seg(U.ENV_GDT)
        mem = GuestMemory(vcpu)
        at = gdt_base + (sel & ~7) + 5
        try:
            mem.write(at, bytes([mem.read(at, 1)[0] & ~DESC_TSS_BUSY]))
        except DeliveryFault:
            pass
    return H.Fault(C.X86_EXC_GP, sel & 0xFFFC)


EMULATE = {H.SYSCALL: syscall, H.SYSENTER: sysenter, H.XSETBV: xsetbv, H.MOV_CR8: mov_cr8, H.VEX: vex,
           H.LGDT: dt_load, H.LIDT: dt_load, H.LLDT: dt_load, H.LTR: dt_load}
