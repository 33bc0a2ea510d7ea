"""Event delivery for the software CPU: what the processor does when an interrupt or exception is taken.

Unicorn never delivers an interrupt or exception through the guest's tables (it reports them to a hook and
stops), so the provider does it, following the Intel SDM vol. 3A, section 6.12 ("Exception and interrupt
handling") and vol. 3B 20.1.4 (real-address mode):

- real mode: the IVT entry ``CS:IP`` at ``IDTR.base + 4 * vector``; FLAGS, CS, IP are pushed (16 bits each),
  IF, TF and AC are cleared;
- protected mode: a 16- or 32-bit interrupt or trap gate; the new CS comes from the GDT/LDT; a move to a more
  privileged ring switches to ``SSn:ESPn`` of the 32-bit TSS and pushes the old SS:ESP; then EFLAGS, CS, EIP and
  the error code; an interrupt gate clears IF; TF, NT, RF and VM are cleared;
- long mode: a 64-bit gate (16 bytes); RSP from the IST slot or ``RSPn`` of the 64-bit TSS on a privilege change,
  aligned down to 16; SS:RSP, RFLAGS, CS, RIP and the error code are pushed as 8-byte values.

A fault while delivering (a gate outside the IDT limit or not present, a stack outside RAM ...) raises
:class:`DeliveryFault`; the vCPU turns it into #DF and a fault while delivering #DF into a SHUTDOWN exit (a triple
fault), as the CPU does.

Not supported: task gates and hardware task switches, virtual-8086 mode, NMI blocking until IRET, setting RF in
the pushed flags, segment-limit and canonical checks on the pushed stack, conforming-code-segment subtleties.
"""

import struct

from unicorn import x86_const as X

from .. import constants as C
from ..x86 import mmu
from .ucstate import (ENV_GDT, ENV_IDT, ENV_SEGS, ENV_TR, ENV_LDT, HF_INHIBIT_IRQ, HF_CPL_MASK)

RFLAGS_NT, RFLAGS_RF, RFLAGS_VM, RFLAGS_AC = 1 << 14, 1 << 16, 1 << 17, 1 << 18
_CS, _SS = ENV_SEGS + 24, ENV_SEGS + 48
DESC_P, DESC_S, DESC_W, DESC_A, DESC_B = 1 << 15, 1 << 12, 1 << 9, 1 << 8, 1 << 22


class DeliveryFault(Exception):
    """Delivery of an event faulted (the vCPU escalates to #DF, then to a triple fault)."""


class GuestMemory:
    """Linear-address reads and writes of guest RAM for delivery (supervisor, no permission checks)."""

    def __init__(self, vcpu):
        self.vcpu = vcpu
        self.regs = vcpu.paging_regs()

    def _gpa(self, la):
        try:
            return mmu.gva_to_gpa(self.vcpu.machine.read_phys, *self.regs, la)[0]
        except OSError:
            raise DeliveryFault(f"linear address {la:#x} does not translate") from None

    def read(self, la, n):
        out = b""
        while n:
            k = min(n, 4096 - (la & 0xFFF))
            try:
                out += bytes(self.vcpu.machine.gpa_view(self._gpa(la), k))
            except OSError:
                raise DeliveryFault(f"linear address {la:#x} is not RAM") from None
            la, n = la + k, n - k
        return out

    def write(self, la, data):
        data = memoryview(bytes(data))
        while data:
            k = min(len(data), 4096 - (la & 0xFFF))
            try:
                view = self.vcpu.machine.gpa_view(self._gpa(la), k)
            except OSError:
                raise DeliveryFault(f"linear address {la:#x} is not RAM") from None
            view[:] = data[:k]
            la, data = la + k, data[k:]


def _descriptor(img, mem, sel):
    """``(base, limit, flags)`` of the code/data descriptor ``sel`` from the GDT or LDT."""
    table = img.seg(ENV_LDT) if sel & 4 else img.seg(ENV_GDT)
    _, tbase, tlimit, _ = table
    idx = sel & ~7
    if idx == 0 and not sel & 4:
        raise DeliveryFault("null code selector in a gate")
    if idx + 7 > tlimit:
        raise DeliveryFault(f"selector {sel:#x} outside the descriptor table")
    lo, hi = struct.unpack("<II", mem.read(tbase + idx, 8))
    base = (lo >> 16) | ((hi & 0xFF) << 16) | (hi & 0xFF000000)
    limit = (lo & 0xFFFF) | (hi & 0xF0000)
    if hi & (1 << 23):
        limit = (limit << 12) | 0xFFF
    if not hi & DESC_P:
        raise DeliveryFault(f"selector {sel:#x} not present")
    return base, limit, hi & 0x00F0FF00


def deliver(vcpu, vector, error=None, soft=False):
    """Delivers ``vector`` to the vCPU (its unicorn engine), pushing ``error`` when not ``None``. ``soft``: an
    ``INT n``/``INT3``/``INTO`` from the guest (gate DPL checked; RIP already points after the instruction)."""
    uc, img = vcpu.uc, vcpu.img
    rflags = uc.reg_read(X.UC_X86_REG_RFLAGS)
    rip = uc.reg_read(X.UC_X86_REG_RIP)
    rsp = uc.reg_read(X.UC_X86_REG_RSP)
    cr0 = uc.reg_read(X.UC_X86_REG_CR0)
    efer = uc.reg_read(X.UC_X86_REG_MSR, 0xC0000080)
    img.load()
    mem = GuestMemory(vcpu)
    _, idt_base, idt_limit, _ = img.seg(ENV_IDT)
    cs_sel, cs_base, _, _ = img.seg(_CS)
    ss_sel, ss_base, ss_limit, ss_flags = img.seg(_SS)
    cpl = img.hflags & HF_CPL_MASK
    if not cr0 & C.CR0_PE:
        if vector * 4 + 3 > idt_limit:
            raise DeliveryFault(f"vector {vector} outside the IVT")
        ip, seg = struct.unpack("<HH", mem.read(idt_base + vector * 4, 4))
        sp = rsp & 0xFFFF
        frame = struct.pack("<HHH", rip & 0xFFFF, cs_sel, rflags & 0xFFFF)
        sp = (sp - 6) & 0xFFFF
        mem.write(ss_base + sp, frame)
        img.set_seg(_CS, seg, seg << 4, 0xFFFF, img.seg(_CS)[3])
        new_rsp = (rsp & ~0xFFFF) | sp
        new_rflags = rflags & ~(C.RFLAGS_IF | C.RFLAGS_TF | RFLAGS_AC)
        new_rip = ip
    else:
        long_mode = bool(efer & C.EFER_LMA)
        gsize = 16 if long_mode else 8
        if vector * gsize + gsize - 1 > idt_limit:
            raise DeliveryFault(f"vector {vector} outside the IDT")
        gate = mem.read(idt_base + vector * gsize, gsize)
        lo, hi = struct.unpack_from("<II", gate)
        gtype, gdpl = (hi >> 8) & 0xF, (hi >> 13) & 3
        if not hi & DESC_P:
            raise DeliveryFault(f"IDT gate {vector} not present")
        if gtype not in ((0xE, 0xF) if long_mode else (0x6, 0x7, 0xE, 0xF)):
            raise DeliveryFault(f"IDT gate {vector} has type {gtype:#x} (task gates are not supported)")
        if soft and gdpl < cpl:
            raise DeliveryFault(f"software interrupt {vector} through a DPL {gdpl} gate at CPL {cpl}")
        target = (lo & 0xFFFF) | (hi & 0xFFFF0000)
        if long_mode:
            target |= struct.unpack_from("<I", gate, 8)[0] << 32
        sel = lo >> 16
        nbase, nlimit, nflags = _descriptor(img, mem, sel)
        dpl = (nflags >> 13) & 3
        if nflags & (1 << 10):      # conforming: stays at CPL
            dpl = cpl
        _, tr_base, _, _ = img.seg(ENV_TR)
        push = []
        new_ss = None
        if long_mode:
            ist = struct.unpack_from("<B", gate, 4)[0] & 7
            if ist:
                sp = struct.unpack("<Q", mem.read(tr_base + 36 + 8 * (ist - 1), 8))[0]
            elif dpl < cpl:
                sp = struct.unpack("<Q", mem.read(tr_base + 4 + 8 * dpl, 8))[0]
            else:
                sp = rsp
            sp &= ~0xF
            if dpl < cpl:
                new_ss = (dpl, 0, 0xFFFFFFFF, DESC_P | DESC_S | DESC_W | DESC_A | DESC_B | (dpl << 13))
            push = [ss_sel, rsp, rflags, cs_sel, rip]
            width, fmt = 8, "<Q"
        else:
            width, fmt = (4, "<I") if gtype >= 0xE else (2, "<H")
            if dpl < cpl:
                sp, ss0 = struct.unpack("<IH", mem.read(tr_base + 4 + 8 * dpl, 6))
                sbase, slimit, sflags = _descriptor(img, mem, ss0)
                new_ss = (ss0, sbase, slimit, sflags)
                push = [ss_sel, rsp & 0xFFFFFFFF]
                stack_base = sbase
            else:
                sp = rsp & (0xFFFFFFFF if ss_flags & DESC_B else 0xFFFF)
                stack_base = ss_base
            push += [rflags & 0xFFFFFFFF, cs_sel, rip & 0xFFFFFFFF]
        if error is not None:
            push.append(error)
        for value in push:
            sp -= width
            addr = sp if long_mode else stack_base + (sp & 0xFFFFFFFF)
            mem.write(addr, struct.pack(fmt, value & ((1 << (8 * width)) - 1)))
        if new_ss is not None:
            img.set_seg(_SS, *new_ss)
        cs_sel_new = (sel & ~3) | dpl
        img.set_seg(_CS, cs_sel_new, nbase, nlimit, nflags)
        new_rsp = sp if long_mode or new_ss is not None else (rsp & ~0xFFFFFFFF) | (sp & 0xFFFFFFFF)
        new_rflags = rflags & ~(C.RFLAGS_TF | RFLAGS_NT | RFLAGS_RF | RFLAGS_VM)
        if gtype in (0x6, 0xE):
            new_rflags &= ~C.RFLAGS_IF
        new_rip = target
    img.hflags = img.hflags & ~HF_INHIBIT_IRQ
    img.recompute_hflags(cr0, efer, new_rflags)
    img.store()
    uc.reg_write(X.UC_X86_REG_RFLAGS, new_rflags)
    uc.reg_write(X.UC_X86_REG_RSP, new_rsp)
    uc.reg_write(X.UC_X86_REG_RIP, new_rip)
