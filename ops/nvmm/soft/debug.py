"""Guest debugging on the soft CPU (vmmshim's ``Vcpu.set_guest_debug``, as KVM's ``KVM_SET_GUEST_DEBUG`` in
``Documentation/virt/kvm/api.rst``), with unicorn's hooks: the code hook that runs before every instruction
ends a single-stepping run before its second instruction, and the interrupt hook turns an int3 into an exit
with RIP at the int3 (where KVM leaves it); :func:`inject_bp` gives the guest its own #BP instead.

Not supported: debug-register breakpoints and watchpoints (``hw``: ENOTSUP, the provider does not list
``debug-hw``), the guest's own DR7 (unicorn ignores it), a step that ends inside a REP string batch.
"""

import errno

from unicorn import x86_const as X

from .. import api

X86_EXC_BP = 3
INT3_LENGTH = 1


class DebugState:
    """What ``set_guest_debug`` asked of one vCPU, and the step in progress."""

    def __init__(self):
        self.step = False
        self.sw_bp = False
        self.seen = 0               # instructions the code hook saw this run, while stepping
        self.done_at = None         # RIP an exit's instruction completes to: the step ends there
        self.inject_bp = False      # inject_bp() was asked: #BP before the next instruction

    def configure(self, step, sw_bp, hw):
        if hw:
            raise api.nvmm_error(errno.ENOTSUP, "the soft CPU has no debug-register breakpoints")
        self.step, self.sw_bp, self.seen, self.done_at = bool(step), bool(sw_bp), 0, None


def code_hook(vcpu, uc):
    """Called first by the code hook: True when the run must stop here (the step's instruction is done)."""
    dbg = vcpu.dbg
    if not dbg.step:
        return False
    dbg.seen += 1
    if dbg.seen < 2:
        return False
    vcpu._why = ("debug", api.DEBUG_STEP, uc.reg_read(X.UC_X86_REG_RIP))
    uc.emu_stop()
    return True


def intr_hook(vcpu, uc, intno):
    """Called first by the interrupt hook: an int3 with ``sw_bp`` becomes an exit with RIP at the int3."""
    if intno != X86_EXC_BP or not vcpu.dbg.sw_bp:
        return False
    rip = uc.reg_read(X.UC_X86_REG_RIP) - INT3_LENGTH
    uc.reg_write(X.UC_X86_REG_RIP, rip)
    vcpu._why = ("debug", api.DEBUG_BP, rip)
    uc.emu_stop()
    return True


def before_run(vcpu, uc):
    """At a run's start: the #BP :func:`inject_bp` asked for, or the end of a step whose instruction was an
    exit the VMM completed (RIP at its ``npc``). Returns an ExitDebug to report at once, or None."""
    dbg = vcpu.dbg
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
    done, dbg.done_at = dbg.done_at, None
    if dbg.step and done is not None and rip == done:
        return api.ExitDebug(api.DEBUG_STEP, rip)
    return None
