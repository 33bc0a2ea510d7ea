"""Guest debugging on KVM (vmmshim's ``Vcpu.set_guest_debug``): ``KVM_SET_GUEST_DEBUG`` and its ``KVM_EXIT_DEBUG``
exit (Linux ``Documentation/virt/kvm/api.rst``, sections 4.52 "KVM_SET_GUEST_DEBUG" and 5 "kvm_run": ``debug``),
with the debug-register layout of the Intel SDM vol. 3B 18.2 (DR6, DR7).

SINGLESTEP ends a run after one instruction (DR6.BS); USE_SW_BP makes an int3 a debug exit with RIP at it;
USE_HW_BP loads DR0-3 and DR7 from ``debugreg`` (matches report DR6.B0-B3); INJECT_BP, set right after an int3
exit, queues that int3's #BP for the guest (the guest's own int3, not a debugger's).

Not supported: the guest's own use of the debug registers while a debugger holds them (KVM gives them to the
debugger). kvm_pvm: no USE_SW_BP exits and no data breakpoints (``ops/nvmm/kvm/provider.py``'s
``GUEST_DEBUG_BY_KIND``).
"""

import errno
import fcntl

from .. import api
from . import ioctls as K
from . import layouts as L

DR6_BS = 1 << 14            # DR6.BS: a single-step trap
DR6_B0_3 = 0xF              # DR6.B0-B3: which debug register matched
DR7_LE_GE = 3 << 8          # DR7.LE|GE: exact breakpoints
DR7_LEN_BITS = {1: 0, 2: 1, 8: 2, 4: 3}
MAX_SLOTS = 4
X86_EXC_BP = 3


def set_guest_debug(vcpu, step, sw_bp, hw):
    control = K.KVM_GUESTDBG_ENABLE if step or sw_bp or hw else 0
    control |= (K.KVM_GUESTDBG_SINGLESTEP if step else 0) | (K.KVM_GUESTDBG_USE_SW_BP if sw_bp else 0)
    control |= K.KVM_GUESTDBG_USE_HW_BP if hw else 0
    vcpu._debug = (control, tuple(hw))
    _ioctl(vcpu, control, hw)


def inject_bp(vcpu):
    control, hw = vcpu._debug
    _ioctl(vcpu, control | K.KVM_GUESTDBG_ENABLE | K.KVM_GUESTDBG_INJECT_BP, hw)


def _ioctl(vcpu, control, hw):
    if len(hw) > MAX_SLOTS:
        raise api.nvmm_error(errno.ENOSPC, "at most four debug-register breakpoints")
    dr = [0] * 8
    dr7 = DR7_LE_GE if hw else 0
    for i, (addr, type_, length) in enumerate(hw):
        dr[i] = addr
        dr7 |= (2 << (2 * i)) | ((type_ | DR7_LEN_BITS[length] << 2) << (16 + 4 * i))    # G<i>, R/W<i>, LEN<i>
    dr[7] = dr7
    if vcpu._commit:
        vcpu._commit_state()           # registers set since the exit reach KVM before it looks at RFLAGS
    try:
        fcntl.ioctl(vcpu.fd, K.KVM_SET_GUEST_DEBUG, L.GUEST_DEBUG_FMT.pack(control, 0, *dr))
    except OSError as exc:
        raise api.nvmm_error(exc.errno, f"KVM refused KVM_SET_GUEST_DEBUG (limit {api.LIMIT_GUEST_DEBUG!r})") \
            from None
    vcpu._cached = 0


def decode_exit(vcpu):
    """The ``ExitDebug`` of a ``KVM_EXIT_DEBUG``."""
    exc, _, pc, dr6, _ = L.DEBUG_EXIT_FMT.unpack_from(vcpu.mm, L.RUN_U)
    if exc == X86_EXC_BP:
        kind = api.DEBUG_BP
    elif dr6 & DR6_B0_3 and not (vcpu._debug[0] & K.KVM_GUESTDBG_SINGLESTEP and dr6 & DR6_BS):
        kind = api.DEBUG_HW
    else:
        kind = api.DEBUG_STEP
    return api.ExitDebug(kind, pc, dr6)
