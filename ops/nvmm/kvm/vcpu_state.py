"""The KVM vCPU's register state: NVMM's ``nvmm_x64_state`` categories over ``kvm_run``'s sync-regs area.

Linux KVM API (``Documentation/virt/kvm/api.rst``), ``KVM_CAP_SYNC_REGS`` and section 5, "The kvm_run structure"
(``kvm_valid_regs``, ``kvm_dirty_regs``, ``s.regs``): with ``kvm_valid_regs`` set, KVM copies ``kvm_regs``,
``kvm_sregs`` and ``kvm_vcpu_events`` into the ``kvm_run`` page at every exit and reloads those named in
``kvm_dirty_regs`` at the next ``KVM_RUN``. :class:`KvmStateCache` is the half of :class:`ops.nvmm.kvm.vcpu.KvmVcpu`
that turns them into NVMM's state: ``getstate`` of GPRS, SEGS, CRS and INTR converts from memory with no system call
(XCR0 needs ``KVM_GET_XCRS`` only while CR4.OSXSAVE is set) and remembers what it converted until the next exit;
``setstate`` only marks categories; :meth:`KvmStateCache._commit_state` writes them back before the next entry
through ``kvm_dirty_regs`` (regs, sregs, events: no system call) or, for DRS, the MSRS other than EFER, XCR0 and
FPU, with ``KVM_SET_DEBUGREGS``, ``KVM_SET_MSRS``, ``KVM_SET_XCRS`` and ``KVM_SET_XSAVE``. An RDMSR/WRMSR completed
the NVMM way (RAX/RDX and RIP = npc) becomes KVM's completion (``kvm_run.msr.data``/``msr.error``) here too.

Not supported: XCRs other than XCR0, the XSAVE components beyond the legacy x87/SSE area (FPU state is the 512-byte
FXSAVE image), the pending-exception and SMM parts of ``kvm_vcpu_events``, MSRs outside NVMM's MSRS category.
"""

import errno
import fcntl
import struct

from .. import api
from .. import constants as C
from ..state import INTR_EVT_PENDING, INTR_INT_SHADOW, INTR_INT_WINDOW_EXITING
from .exit import MSR_INSN_LEN as _MSR_INSN_LEN
from . import ioctls as K
from . import layouts as L

MSR_IA32_TSC = 0x10
_TSC_MSRS = struct.Struct("<I4xI4xQ")    # struct kvm_msrs with one struct kvm_msr_entry: nmsrs, index, data
_U64 = struct.Struct("<Q")

_GPRS, _SEGS, _CRS, _DRS, _MSRS, _INTR, _FPU = (C.NVMM_X64_STATE_GPRS, C.NVMM_X64_STATE_SEGS,
                                                C.NVMM_X64_STATE_CRS, C.NVMM_X64_STATE_DRS,
                                                C.NVMM_X64_STATE_MSRS, C.NVMM_X64_STATE_INTR,
                                                C.NVMM_X64_STATE_FPU)
_IOCTL = fcntl.ioctl
# kvm_vcpu_events, up to nmi.injected: exception (injected, nr, has_error_code, pending, error_code),
# interrupt (injected, nr, soft, shadow), nmi.injected
_EVENTS = struct.Struct("<BBBBIBBBBB")


class KvmStateCache:
    """NVMM's state categories over the synced ``kvm_run`` area. Needs ``self.mm`` (the ``kvm_run`` mapping),
    ``self.fd``, ``self.state`` and the ``_cached``/``_commit``/``_xcr0``/``_msr_pending``/``_slow``/``_tsc_buf``
    fields that :class:`ops.nvmm.kvm.vcpu.KvmVcpu` sets up."""

    # -- state -------------------------------------------------------------------------------------------------
    def _sregs(self):
        return L.SREGS_FMT.unpack_from(self.mm, L.RUN_S_SREGS)

    def getstate(self, flags):
        need = flags & ~self._cached
        if not need:
            return
        st = self.state
        if need & _GPRS:
            L.regs_to_gprs(L.REGS_FMT.unpack_from(self.mm, L.RUN_S_REGS), st.gprs)
        if need & (_SEGS | _CRS | _MSRS):
            sregs = self._sregs()
            L.sregs_to_state(sregs, st, segs=bool(need & _SEGS), crs=bool(need & _CRS))
            if need & _CRS:
                if st.crs[C.NVMM_X64_CR_CR4] & C.CR4_OSXSAVE:
                    self._xcr0 = self._get_xcr0()
                st.crs[C.NVMM_X64_CR_XCR0] = self._xcr0
            if need & _MSRS:
                st.msrs[C.NVMM_X64_MSR_EFER] = L.sregs_efer(sregs)
                for idx, value in zip((i for i, _ in L.MSRS_VIA_IOCTL),
                                      self.get_msrs([m for _, m in L.MSRS_VIA_IOCTL])):
                    st.msrs[idx] = value
        if need & _DRS:
            buf = bytearray(L.KVM_DEBUGREGS.sizeof())
            _IOCTL(self.fd, K.KVM_GET_DEBUGREGS, buf)
            db0, db1, db2, db3, dr6, dr7 = L.DEBUGREGS_FMT.unpack_from(buf)[:6]
            st.drs[0:6] = memoryview(struct.pack("<6Q", db0, db1, db2, db3, dr6, dr7)).cast("Q")
        if need & _INTR:
            st.intr = self.intr_bits()
        if need & _FPU:
            st.fpu[:] = self._get_xsave()[:L.XSAVE_LEGACY_SIZE]
        self._cached |= need

    def setstate(self, flags):
        self._commit |= flags
        self._cached |= flags
        self._slow = True

    def intr_bits(self):
        """NVMM's ``nvmm_x64_state_intr`` word from the synced events and our window request."""
        exc_inj, _, _, _, _, irq_inj, _, _, shadow, nmi_inj = _EVENTS.unpack_from(self.mm, L.RUN_S_EVENTS)
        bits = INTR_INT_SHADOW if shadow else 0
        if self.mm[L.RUN_REQUEST_IRQ_WINDOW]:
            bits |= INTR_INT_WINDOW_EXITING
        if exc_inj or irq_inj or nmi_inj:
            bits |= INTR_EVT_PENDING
        return bits

    def queued_event(self):
        """The event KVM holds for the next entry (``kvm_vcpu_events``: ``interrupt.injected`` from
        ``KVM_INTERRUPT``, ``exception.injected``, ``nmi.injected``/``nmi.pending``), read with
        ``KVM_GET_VCPU_EVENTS`` unless events written here wait in ``kvm_dirty_regs``. A software interrupt KVM
        re-delivers (``interrupt.soft``) cannot be injected again from user space: ENOTSUP."""
        if struct.unpack_from("<Q", self.mm, L.RUN_DIRTY_REGS)[0] & K.KVM_SYNC_X86_EVENTS:
            events = bytes(self.mm[L.RUN_S_EVENTS:L.RUN_S_EVENTS + _EVENTS.size + 1])
        else:
            events = bytearray(L.KVM_VCPU_EVENTS.sizeof())
            _IOCTL(self.fd, K.KVM_GET_VCPU_EVENTS, events)
        exc_inj, exc_nr, has_error, _, error, irq_inj, irq_nr, soft, _, nmi_inj = _EVENTS.unpack_from(events)
        nmi_pending = events[_EVENTS.size]
        if exc_inj:
            return C.NVMM_VCPU_EVENT_EXCP, exc_nr, error if has_error else None
        if nmi_inj or nmi_pending:
            return C.NVMM_VCPU_EVENT_INTR, C.X86_EXC_NMI, None
        if irq_inj:
            if soft:
                raise api.nvmm_error(errno.ENOTSUP, f"software interrupt {irq_nr:#x} in delivery")
            return C.NVMM_VCPU_EVENT_INTR, irq_nr, None
        return None

    def _get_xsave(self):
        buf = bytearray(L.KVM_XSAVE.sizeof())
        _IOCTL(self.fd, K.KVM_GET_XSAVE, buf)
        return buf

    def _get_xcr0(self):
        buf = bytearray(L.KVM_XCRS.sizeof())
        _IOCTL(self.fd, K.KVM_GET_XCRS, buf)
        nr, = struct.unpack_from("<I", buf, 0)
        for i in range(nr):
            xcr, value = struct.unpack_from("<I4xQ", buf, 8 + 16 * i)
            if xcr == 0:
                return value
        return self._xcr0

    def get_msrs(self, indexes):
        buf = bytearray(struct.pack("<II", len(indexes), 0) +
                        b"".join(struct.pack("<IIQ", i, 0, 0) for i in indexes))
        n = _IOCTL(self.fd, K.KVM_GET_MSRS, buf)
        if n != len(indexes):
            raise api.nvmm_error(errno.EINVAL, f"KVM read {n} of {len(indexes)} MSRs")
        return [struct.unpack_from("<Q", buf, 8 + 16 * i + 8)[0] for i in range(n)]

    def set_msrs(self, pairs):
        buf = bytearray(struct.pack("<II", len(pairs), 0) +
                        b"".join(struct.pack("<IIQ", i, 0, v) for i, v in pairs))
        n = _IOCTL(self.fd, K.KVM_SET_MSRS, buf)
        if n != len(pairs):
            raise api.nvmm_error(errno.EINVAL, f"KVM refused MSR {pairs[n][0]:#x}={pairs[n][1]:#x}")

    def _commit_state(self):
        flags, self._commit = self._commit, 0
        st, mm = self.state, self.mm
        dirty = 0
        if flags & _GPRS:
            if self._msr_pending is not None:
                self._complete_msr()
            L.REGS_FMT.pack_into(mm, L.RUN_S_REGS, *L.gprs_to_regs(st.gprs))
            dirty |= K.KVM_SYNC_X86_REGS
        if flags & (_SEGS | _CRS | _MSRS):
            sregs = list(self._sregs())
            L.state_to_sregs(st, sregs, segs=bool(flags & _SEGS), crs=bool(flags & _CRS),
                             efer=st.msrs[C.NVMM_X64_MSR_EFER] if flags & _MSRS else None)
            sregs[-4:] = [0, 0, 0, 0]   # interrupt_bitmap: never re-queue an interrupt through sregs
            if flags & _CRS:           # without an in-kernel LAPIC, KVM reloads CR8 from kvm_run.cr8 on entry
                struct.pack_into("<Q", mm, L.RUN_CR8, st.crs[C.NVMM_X64_CR_CR8])
            L.SREGS_FMT.pack_into(mm, L.RUN_S_SREGS, *sregs)
            dirty |= K.KVM_SYNC_X86_SREGS
        if flags & _CRS and st.crs[C.NVMM_X64_CR_XCR0] != self._xcr0:
            buf = bytearray(L.KVM_XCRS.sizeof())
            struct.pack_into("<II I4xQ", buf, 0, 1, 0, 0, st.crs[C.NVMM_X64_CR_XCR0])
            _IOCTL(self.fd, K.KVM_SET_XCRS, buf)
            self._xcr0 = st.crs[C.NVMM_X64_CR_XCR0]
        if flags & _MSRS:
            self.set_msrs([(m, st.msrs[i]) for i, m in L.MSRS_VIA_IOCTL])
        if flags & _DRS:
            buf = bytearray(L.KVM_DEBUGREGS.sizeof())
            struct.pack_into("<6Q", buf, 0, *st.drs[0:6])
            _IOCTL(self.fd, K.KVM_SET_DEBUGREGS, buf)
        if flags & _INTR:
            bits = st.intr
            mm[L.RUN_REQUEST_IRQ_WINDOW] = 1 if bits & INTR_INT_WINDOW_EXITING else 0
            shadow_off = L.RUN_S_EVENTS + 11
            want = K.KVM_X86_SHADOW_INT_STI if bits & INTR_INT_SHADOW else 0
            if bool(mm[shadow_off]) != bool(want):
                mm[shadow_off] = want
                self._events_flags(K.KVM_VCPUEVENT_VALID_SHADOW)
                dirty |= K.KVM_SYNC_X86_EVENTS
        if flags & _FPU:
            xsave = self._get_xsave()      # KVM_SET_FPU drops MXCSR on some kernels: go through XSAVE
            xsave[:L.XSAVE_LEGACY_SIZE] = st.fpu
            bv, = struct.unpack_from("<Q", xsave, L.XSAVE_XSTATE_BV)
            struct.pack_into("<Q", xsave, L.XSAVE_XSTATE_BV, bv | L.XSTATE_FP_SSE)
            _IOCTL(self.fd, K.KVM_SET_XSAVE, xsave)
        if dirty:
            struct.pack_into("<Q", mm, L.RUN_DIRTY_REGS,
                             struct.unpack_from("<Q", mm, L.RUN_DIRTY_REGS)[0] | dirty)

    def _events_flags(self, flags):
        off = L.RUN_S_EVENTS + 20
        struct.pack_into("<I", self.mm, off, flags)

    def complete_msr(self, npc, value=None):
        """KVM completes a user-space MSR exit itself at the next ``KVM_RUN`` (``kvm_run.msr``: error 0, the data
        of a RDMSR), RIP included: no GPR traffic, unless the GPRs were changed in this exit already."""
        pend = self._msr_pending
        if pend is None or self._commit & _GPRS or npc != pend[1] + _MSR_INSN_LEN \
                or pend[0] != (value is not None):
            return api.Vcpu.complete_msr(self, npc, value)
        self._msr_pending = None
        if value is not None:
            _U64.pack_into(self.mm, L.MSR_DATA, value & 0xFFFFFFFFFFFFFFFF)
        self.mm[L.MSR_ERROR] = 0

    def guest_tsc(self):
        """IA32_TSC alone through ``KVM_GET_MSRS`` (one entry, its buffer kept): the TSC-deadline timer reads it at
        every deadline the guest writes, where the whole MSR state would cost eleven."""
        buf = self._tsc_buf
        if buf is None:
            buf = self._tsc_buf = bytearray(_TSC_MSRS.pack(1, MSR_IA32_TSC, 0))
        if _IOCTL(self.fd, K.KVM_GET_MSRS, buf) != 1:
            raise api.nvmm_error(errno.EINVAL, "KVM did not read IA32_TSC")
        return _TSC_MSRS.unpack_from(buf)[2]

    def _complete_msr(self):
        """Turn an NVMM-style MSR completion (RIP = npc, RAX/RDX for RDMSR) into KVM's."""
        is_rd, rip = self._msr_pending
        self._msr_pending = None
        gprs = self.state.gprs
        if gprs[C.NVMM_X64_GPR_RIP] == rip + _MSR_INSN_LEN:
            gprs[C.NVMM_X64_GPR_RIP] = rip      # KVM skips the instruction itself
        if is_rd:
            struct.pack_into("<Q", self.mm, L.MSR_DATA, (gprs[C.NVMM_X64_GPR_RDX] & 0xFFFFFFFF) << 32 |
                             (gprs[C.NVMM_X64_GPR_RAX] & 0xFFFFFFFF))
        self.mm[L.MSR_ERROR] = 0

    def paging_regs(self):
        sregs = self._sregs()
        cr = L._CR0
        return sregs[cr], sregs[cr + 2], sregs[cr + 3], sregs[cr + 5]
