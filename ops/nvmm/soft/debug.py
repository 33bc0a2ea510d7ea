"""Guest debugging on the soft CPU (vmmshim's ``Vcpu.set_guest_debug``, as KVM's ``KVM_SET_GUEST_DEBUG`` in
``Documentation/virt/kvm/api.rst``), with unicorn's hooks: the code hook that runs before every instruction
ends a single-stepping run before its second instruction, and the interrupt hook turns an int3 into an exit
with RIP at the int3 (where KVM leaves it); :func:`inject_bp` gives the guest its own #BP instead.

Debug-register breakpoints (``hw``: up to four ``(addr, type, len)`` slots, DR0-DR3 with DR7's R/W and LEN as the
Intel SDM vol. 3B 18.2 defines them) match linear addresses, as the hardware's do: unicorn's code hook is given
CS.base + RIP and its memory hooks the linear address of the access.

* Execute (type 0): the code hook stops *before* the instruction at the address (a fault, as the hardware's),
  an exit ``DEBUG_HW`` with DR6.Bn of the slot, RIP at the instruction. The next run does not match that same
  address again as its first instruction (the hardware's RFLAGS.RF, which a debugger resumes with).
* Write (type 1) and read/write (type 3), length 1, 2, 4 or 8 (aligned): a ``UC_HOOK_MEM_WRITE`` (and
  ``UC_HOOK_MEM_READ``) hook bounded to the watched bytes (from 7 bytes below them: unicorn bounds an access by
  its first byte) notes the slot of any access overlapping them; the code hook of the next instruction stops,
  so the exit comes *after* the accessing instruction completed (a trap, as data breakpoints are), RIP at the
  next instruction; with a step in progress DR6.BS is set too. With no watchpoint no memory hook exists, and
  unicorn's memory fast path stays.

The unicorn hooks change on the vCPU's own thread, at the next run's start (:func:`before_run`): ``configure``
may be called from the debugger's thread while the vCPU is parked.

Not supported: the guest's own DR7 (unicorn ignores it), a step that ends inside a REP string batch, I/O
breakpoints (type 2: EINVAL), accesses the provider makes itself (event delivery, emulated system instructions,
the assists' MMIO) never match a watchpoint.
"""

import errno

from unicorn import UC_HOOK_MEM_READ, UC_HOOK_MEM_WRITE
from unicorn import x86_const as X

from .. import api

X86_EXC_BP = 3
INT3_LENGTH = 1
MAX_SLOTS = 4                       # DR0-DR3
HW_EXEC, HW_WRITE, HW_ACCESS = 0, 1, 3          # DR7.R/Wn
HW_LENGTHS = (1, 2, 4, 8)                       # DR7.LENn
MAX_ACCESS = 8                      # the widest access unicorn reports at once (wider ones come in pieces)
DR6_BS = 1 << 14                    # DR6.BS: a single-step trap
WATCH_HOOKS = {HW_WRITE: UC_HOOK_MEM_WRITE, HW_ACCESS: UC_HOOK_MEM_READ | UC_HOOK_MEM_WRITE}


class DebugState:
    """What ``set_guest_debug`` asked of one vCPU, and the step or match in progress."""

    def __init__(self):
        self.step = False
        self.sw_bp = False
        self.hooked = False         # the code hook must call code_hook (a step, a breakpoint or a watchpoint)
        self.seen = 0               # instructions the code hook saw this run, while hooked
        self.done_at = None         # RIP an exit's instruction completes to: the step ends there
        self.inject_bp = False      # inject_bp() was asked: #BP before the next instruction
        self.slots = ()             # the (addr, type, len) slots asked for
        self.applied = None         # the slots the unicorn hooks are installed for (None: none yet)
        self.handles = []           # those hooks
        self.exec_at = {}           # linear address -> DR6 bits of the execute slots there
        self.hit = 0                # DR6 bits of the watchpoints the last instruction matched
        self.resume_at = None       # linear address of the last execute match: the next run starts past it

    def configure(self, step, sw_bp, hw):
        hw = tuple(tuple(s) for s in hw)
        if len(hw) > MAX_SLOTS:
            raise api.nvmm_error(errno.ENOSPC, "at most four debug-register breakpoints")
        for addr, type_, length in hw:
            if type_ not in (HW_EXEC, *WATCH_HOOKS) or length not in HW_LENGTHS or addr % length or \
                    (type_ == HW_EXEC and length != 1):
                raise api.nvmm_error(errno.EINVAL, f"no debug register matches type {type_} len {length} at "
                                     f"{addr:#x}")
        self.step, self.sw_bp, self.seen, self.done_at = bool(step), bool(sw_bp), 0, None
        self.slots = hw
        self.hooked = self.step or bool(hw)


def _sync_hooks(vcpu, uc):
    """Installs the memory hooks of the watchpoints ``configure`` asked for (on the vCPU's thread)."""
    dbg = vcpu.dbg
    if dbg.applied == dbg.slots:
        return
    for handle in dbg.handles:
        uc.hook_del(handle)
    dbg.handles, dbg.exec_at, dbg.hit = [], {}, 0
    for i, (addr, type_, length) in enumerate(dbg.slots):
        bit = 1 << i
        if type_ == HW_EXEC:
            dbg.exec_at[addr] = dbg.exec_at.get(addr, 0) | bit
            continue
        dbg.handles.append(uc.hook_add(WATCH_HOOKS[type_], _watch_hook, (dbg, addr, addr + length, bit),
                                       begin=max(0, addr - MAX_ACCESS + 1), end=addr + length - 1))
    dbg.applied = dbg.slots


def _watch_hook(_uc, _access, address, size, _value, arg):
    """A read or write near a watched range: notes the slot when the access overlaps it."""
    dbg, start, end, bit = arg
    if address < end and address + size > start:
        dbg.hit |= bit


def _exit(vcpu, uc, kind, dr6=0):
    vcpu._why = ("debug", kind, uc.reg_read(X.UC_X86_REG_RIP), dr6)
    uc.emu_stop()
    return True


def code_hook(vcpu, uc, addr):
    """Called first by the code hook (before the instruction at linear ``addr``) while ``hooked``: True when
    the run must stop here (a watchpoint matched by the previous instruction, the step's instruction done, or
    an execute breakpoint at ``addr``)."""
    dbg = vcpu.dbg
    dbg.seen += 1
    if dbg.hit:
        hit, dbg.hit = dbg.hit, 0
        return _exit(vcpu, uc, api.DEBUG_HW, hit | (DR6_BS if dbg.step and dbg.seen >= 2 else 0))
    if dbg.step and dbg.seen >= 2:
        return _exit(vcpu, uc, api.DEBUG_STEP)
    bits = dbg.exec_at.get(addr)
    if dbg.seen == 1:
        resume, dbg.resume_at = dbg.resume_at, None
        if addr == resume:
            return False                # RF: the instruction the last match stopped before runs now
    if bits is None:
        return False
    dbg.resume_at = addr
    return _exit(vcpu, uc, api.DEBUG_HW, bits)


def intr_hook(vcpu, uc, intno):
    """Called first by the interrupt hook: an int3 with ``sw_bp`` becomes an exit with RIP at the int3."""
    if intno != X86_EXC_BP or not vcpu.dbg.sw_bp:
        return False
    uc.reg_write(X.UC_X86_REG_RIP, uc.reg_read(X.UC_X86_REG_RIP) - INT3_LENGTH)
    return _exit(vcpu, uc, api.DEBUG_BP)


def before_run(vcpu, uc):
    """At a run's start: the watchpoint hooks brought up to date, then the #BP :func:`inject_bp` asked for, a
    watchpoint match no instruction reported yet, or the end of a step whose instruction was an exit the VMM
    completed (RIP at its ``npc``). Returns an ExitDebug to report at once, or None."""
    dbg = vcpu.dbg
    _sync_hooks(vcpu, uc)
    dbg.seen = 0
    rip = uc.reg_read(X.UC_X86_REG_RIP)
    if dbg.inject_bp:
        dbg.inject_bp = False
        uc.reg_write(X.UC_X86_REG_RIP, rip + INT3_LENGTH)
        if not vcpu._deliver(X86_EXC_BP, None, True):
            return None
        if dbg.step:
            return api.ExitDebug(api.DEBUG_STEP, uc.reg_read(X.UC_X86_REG_RIP))
        return None
    if dbg.hit:
        hit, dbg.hit = dbg.hit, 0
        return api.ExitDebug(api.DEBUG_HW, rip, hit)
    done, dbg.done_at = dbg.done_at, None
    if dbg.step and done is not None and rip == done:
        return api.ExitDebug(api.DEBUG_STEP, rip)
    return None
