"""A virtual local APIC (bhyve's vlapic): the xAPIC page at 0xFEE00000 and the x2APIC MSRs 0x800-0x8FF.

Intel SDM vol. 3A chapter 10 (chapter 11 in newer editions) "Advanced Programmable Interrupt Controller":
10.4.4 "Local APIC Status and Location" (IA32_APIC_BASE), 10.5.1 "Local Vector Table", 10.5.3 "Error Handling"
(ESR is write-then-read: a write copies the errors collected since the last write into the readable ESR),
10.5.4 "APIC Timer" (:mod:`bhyve_devices.vlapic_timer`), 10.6 "Issuing Interprocessor Interrupts" (ICR; the
routing is :class:`bhyve_devices.apicbus.ApicBus`), 10.8.3.1 "Task and Processor Priorities" (PPR = TPR if
TPR[7:4] >= ISRV[7:4] else ISRV[7:4]:0), 10.8.4 "Interrupt Acceptance for Fixed Interrupts" (a vector is
delivered when its class is above the PPR class), 10.8.5 "Signaling Interrupt Servicing Completion" (EOI clears
the highest ISR bit; a level-triggered vector, TMR set, is broadcast to the IOAPIC through ``eoi_level``),
10.9 "Spurious Interrupt" (SVR software enable), 10.12 "Extended XAPIC (x2APIC)" (MSR map, 64-bit ICR,
derived read-only LDR, SELF IPI, APIC_BASE state transitions of figure 10-27), 10.8.6.1 "Interaction of Task
Priorities between CR8 and APIC" (CR8 is TPR[7:4]; :meth:`Vlapic.set_cr8` / :meth:`Vlapic.get_cr8`, kept in step
with the guest's CR8 by the ops layer).

VER reads 0x00060014: bhyve's version 0x14 with max LVT index 6 (the CMCI LVT exists); no EOI-broadcast
suppression. The page layout is :data:`bhyve_devices.vlapic_regs.LAPIC_PAGE`; the MSR side (APIC_BASE, x2APIC
MSRs, IA32_TSC_DEADLINE), CPUID and page export live in :mod:`bhyve_devices.vlapic_msr`, where :class:`ApicGP` is
defined (re-exported here); LINT0/LINT1 and ExtINT (the plain INTR and NMI pins while the APIC is not enabled, as
bhyve's) in :mod:`bhyve_devices.vlapic_lint`; acceptance by a hypervisor's run loop outside Python in
:mod:`bhyve_devices.vlapic_accept`.

Locking: a timer thread and vCPU threads touch a vlapic, so every public method runs under a per-vlapic RLock.
Callbacks that reach other objects (IPIs to the bus, ``eoi_level`` to the vioapic, ``kick``, NMI) run after the
lock is released, so two vlapics sending each other IPIs cannot deadlock.

Not supported: relocating the APIC page (an APIC_BASE write changing the address raises :class:`ApicGP`, as
bhyve refuses it); SMI, INIT-level-de-assert and remote-read IPIs; focus-processor checking; the illegal-register
ESR bit; the x2APIC #GP on reserved bits (they are masked, only writes to read-only registers, reads of
write-only registers, absent registers and a non-zero EOI/ESR write raise :class:`ApicGP`); sub-dword and
unaligned MMIO writes (dropped) and reads (the bytes of the 16-byte slot, register in bytes 0-3, zero elsewhere).
"""

import threading

from . import vlapic_regs as R
from .vlapic_regs import APIC_SIZE, DEFAULT_APIC_BASE  # noqa: F401 (the xAPIC page: part of this module's API)
from .vlapic_msr import VlapicMsrMixin, ApicGP  # noqa: F401  (ApicGP is part of this module's API)
from .vlapic_lint import (VlapicLintMixin, LVT_LINT0, LVT_LINT1, LVT_TIMER, LVT_ERROR, LVT_PMC,  # noqa: F401
                          LVT_THERMAL, LVT_CMCI)          # the LVT indices of trigger_lvt: this module's API
from .vlapic_timer import ApicTimer
from .vlapic_accept import VlapicAcceptMixin
from . import vlapic_state

__all__ = ["Vlapic", "ApicGP", "LVT_LINT0", "LVT_LINT1", "LVT_TIMER", "LVT_ERROR", "LVT_PMC", "LVT_THERMAL",
           "LVT_CMCI"]


_M32 = 0xFFFFFFFF


class _Guard:
    __slots__ = ("v",)

    def __init__(self, v):
        self.v = v

    def __enter__(self):
        v = self.v
        v._lock.acquire()
        v._depth += 1
        v.changed = True
        if v.on_change is not None:
            v.on_change()           # what the owner published from the old state (a tick's plan) is void

    def __exit__(self, *exc):
        v = self.v
        v._depth -= 1
        post = None
        if v._depth == 0 and v._post:
            post, v._post = v._post, []
        v._lock.release()
        if post:
            for fn in post:
                fn()
        return False


class Vlapic(VlapicLintMixin, VlapicMsrMixin, VlapicAcceptMixin):
    snapshot_version = 1

    def __init__(self, vcpu_id, timers, bus=None, *, apic_id=None, x2apic_allowed=False, x2apic_enabled=False,
                 eoi_level=None, tsc_hz=None, tsc_now=None, tsc_deadline=None):
        """``timers``: a TimerService. ``bus``: an ApicBus (the vlapic registers itself). ``x2apic_allowed``: the VM
        offers x2APIC (CPUID bit, APIC_BASE bit 10 writable); ``x2apic_enabled``: start in x2APIC mode (bhyve's
        X2APIC_ENABLED). ``eoi_level(vector)``: called on EOI of a level-triggered vector. ``tsc_hz``: enables
        TSC-deadline mode; ``tsc_now()`` gives the guest TSC (default: the timer clock scaled to ``tsc_hz``);
        ``tsc_deadline`` keeps IA32_TSC_DEADLINE outside Python (``vlapic_timer.py``), whose owner calls
        :meth:`on_deadline` when it falls due."""
        self.vcpu_id = vcpu_id
        self.apic_id = vcpu_id if apic_id is None else apic_id
        self.x2apic_allowed = bool(x2apic_allowed or x2apic_enabled)
        self.eoi_level = eoi_level
        self._lock = threading.RLock()
        self.on_reset = None            # called when the state is reset (the owner's plans outside Python are void)
        self._depth = 0
        self._post = []
        self._guard = _Guard(self)
        self.timer = ApicTimer(timers, self._on_timer, tsc_hz, tsc_now, deadline=tsc_deadline)
        self.apicbase = R.DEFAULT_APIC_BASE | R.APICBASE_ENABLED | (R.APICBASE_BSP if vcpu_id == 0 else 0)
        if x2apic_enabled:
            self.apicbase |= R.APICBASE_X2APIC
        self.lint0_level = False
        self.bus = None
        self._reset_state()
        if bus is not None:
            bus.add(self)

    # -- state ----------------------------------------------------------------------------------------------
    def _reset_state(self):
        self.timer.stop()
        self.timer.set_mode(R.TIMER_ONESHOT)
        self.timer.icr = 0
        self.timer.write_dcr(0)
        self.tpr = 0
        self.ldr = 0
        self.dfr = _M32
        self.svr = 0xFF
        self.esr = 0
        self.esr_pending = 0
        self._esr_firing = False
        self.icr_lo = 0
        self.icr_hi = 0
        self.irr = self.isr = self.tmr = 0
        self._repeat = 0
        self.lvt = {off: R.LVT_RESET for off in R.LVT_OFFSETS}
        self._extint = False
        self.changed = True
        if self.on_reset is not None:
            self.on_reset()         # an INIT from another vCPU: what was planned outside is void

    def snapshot(self):
        """The guest-visible state (:mod:`bhyve_devices.snapshot`; what is saved: :mod:`bhyve_devices.vlapic_state`)."""
        with self._guard:
            return vlapic_state.save(self)

    def restore(self, state, shift_ns):
        """Takes :meth:`snapshot`'s state, its times moved by ``shift_ns``; the timer is re-armed if it was."""
        with self._guard:
            vlapic_state.load(self, state, shift_ns)

    def reset(self):
        """INIT (or power-up) reset of the register state; the APIC ID and IA32_APIC_BASE are kept (10.4.7.3)."""
        with self._guard:
            self._reset_state()

    @property
    def hw_enabled(self):
        return bool(self.apicbase & R.APICBASE_ENABLED)

    @property
    def x2apic_mode(self):
        return bool(self.apicbase & R.APICBASE_X2APIC) and self.hw_enabled

    @property
    def sw_enabled(self):
        return bool(self.svr & R.SVR_ENABLE)

    @property
    def enabled(self):
        """Hardware- and software-enabled (bhyve's ``vlapic_enabled``): else LINT0/LINT1 are INTR/NMI pins."""
        return bool(self.apicbase & R.APICBASE_ENABLED and self.svr & R.SVR_ENABLE)

    def _kick(self):
        if self.bus is not None:
            self._post.append(lambda: self.bus.kick(self.vcpu_id))

    def _x2_ldr(self):
        return ((self.apic_id >> 4) << 16) | (1 << (self.apic_id & 0xF))

    # -- priorities -----------------------------------------------------------------------------------------
    def get_ppr(self):
        isrv = self.isr.bit_length() - 1 if self.isr else 0
        if (self.tpr & 0xF0) >= (isrv & 0xF0):
            return self.tpr
        return isrv & 0xF0

    def set_cr8(self, value):
        """A guest write of CR8 (10.8.6.1): TPR[7:4] = CR8[3:0], TPR[3:0] = 0. An interrupt its lower class lets
        through is the caller's to look at (the ops layer checks before the next entry)."""
        with self._guard:
            self.tpr = (value & 0xF) << 4

    def get_cr8(self):
        """What the guest's CR8 reads: TPR[7:4]."""
        return self.tpr >> 4

    def set_intr_ready(self, vector, level_triggered=False, *, report_merged=False):
        """Makes ``vector`` pending (IRR, and TMR for level); returns False if not accepted, else True. Vectors
        below 16 set the receive-illegal-vector ESR bit; a software-disabled APIC drops fixed interrupts (bhyve).
        With ``report_merged`` it returns ``(accepted, merged)`` instead: ``merged`` is True when the vector was
        already requested in the IRR, so this interrupt merged with that one (one IRR bit per vector: the
        guest takes it once)."""
        with self._guard:
            vector &= 0xFF
            if vector < 16:
                self._set_error(R.ESR_RECV_ILLEGAL_VECTOR)
                return (False, False) if report_merged else False
            if not self.hw_enabled or not self.sw_enabled:
                return (False, False) if report_merged else False
            bit = 1 << vector
            merged = bool(self.irr & bit) and self._merged_or_repeat(vector, bit)
            self.irr |= bit
            if level_triggered:
                self.tmr |= bit
            else:
                self.tmr &= ~bit
            if not merged:              # a merged request changes nothing the CPU looks at: its first one kicked
                self._kick()
            return (True, merged) if report_merged else True

    def pending_intr(self):
        """The highest IRR vector whose priority class is above the PPR's, or None."""
        with self._lock:            # a reader: posts nothing, so not the guard
            if not self.irr or not self.hw_enabled:
                return None
            v = self.irr.bit_length() - 1
            return v if (v & 0xF0) > (self.get_ppr() & 0xF0) else None

    def intr_accepted(self, vector):
        """The CPU took ``vector``: IRR -> ISR (the PPR follows)."""
        with self._guard:
            bit = 1 << (vector & 0xFF)
            self.irr &= ~bit
            self.isr |= bit

    def eoi(self):
        """Ends the highest interrupt in service, as a write of the EOI register does (for a paravirtual EOI)."""
        with self._guard:
            self._eoi()

    def edge_in_service_before(self):
        """Whether the guest may end the interrupt in service through memory (PV EOI): None unless exactly one
        vector is in service and it is edge-triggered (its EOI has no effect but clearing it; KVM's condition,
        which also wants nothing requested), else whether a requested vector waits for just that EOI (its class
        is above the TPR's, so the EOI alone makes it deliverable)."""
        with self._lock:            # a reader: posts nothing, so not the guard
            isr = self.isr
            if isr == 0 or isr & (isr - 1) or self.tmr & isr:
                return None
            return bool(self.irr) and ((self.irr.bit_length() - 1) & 0xF0) > (self.tpr & 0xF0)

    def _eoi(self, kick=True):
        if not self.isr:
            return
        v = self.isr.bit_length() - 1
        self.isr &= ~(1 << v)
        if (self.tmr >> v) & 1 and self.eoi_level is not None:
            cb = self.eoi_level
            self._post.append(lambda: cb(v))
        if self.irr and kick:
            self._kick()

    # -- errors and LVTs ------------------------------------------------------------------------------------
    def _set_error(self, bits):
        new = bits & ~self.esr_pending
        self.esr_pending |= bits
        if new and not self._esr_firing:
            self._esr_firing = True
            try:
                self._fire_lvt(R.LVT_ERROR)
            finally:
                self._esr_firing = False

    def _fire_lvt(self, off):
        if not self.hw_enabled:
            return False
        lvt = self.lvt[off]
        if lvt & R.LVT_MASKED:
            return False
        mode = R.DELMODE_FIXED if off in (R.LVT_TIMER, R.LVT_ERROR) else (lvt >> 8) & 7
        if mode == R.DELMODE_FIXED:
            return self.set_intr_ready(lvt & 0xFF, False)
        if mode == R.DELMODE_NMI:
            if self.bus is not None:
                self._post.append(lambda: self.bus.nmi(self.vcpu_id))
            return True
        if mode == R.DELMODE_EXTINT and off == R.LVT_LINT0:
            self._extint = True
            self._kick()
            return True
        return False

    def _on_timer(self, generation):
        with self._guard:
            if self.timer.expired(generation):
                self._fire_lvt(R.LVT_TIMER)

    def on_deadline(self):
        """The timer's outside deadline (``tsc_deadline``) fell due and was taken."""
        with self._guard:
            if self.timer.deadline_expired():
                self._fire_lvt(R.LVT_TIMER)

    # -- registers ------------------------------------------------------------------------------------------
    def _reg_read(self, off):
        x2 = self.x2apic_mode
        if off == R.ID:
            return self.apic_id if x2 else (self.apic_id & 0xFF) << 24
        if off == R.VER:
            return R.VER_VALUE
        if off == R.TPR:
            return self.tpr
        if off == R.PPR:
            return self.get_ppr()
        if off == R.LDR:
            return self._x2_ldr() if x2 else self.ldr
        if off == R.DFR:
            return self.dfr
        if off == R.SVR:
            return self.svr
        if R.ISR0 <= off < R.ESR:
            which, i = divmod(off - R.ISR0, 0x80)
            return ((self.isr, self.tmr, self.irr)[which] >> (32 * (i >> 4))) & _M32
        if off == R.ESR:
            return self.esr
        if off == R.ICR_LO:
            return self.icr_lo | (self.icr_hi << 32 if x2 else 0)
        if off == R.ICR_HI:
            return self.icr_hi
        if off in self.lvt:
            return self.lvt[off]
        if off == R.TIMER_ICR:
            return self.timer.icr
        if off == R.TIMER_CCR:
            return self.timer.ccr()
        if off == R.TIMER_DCR:
            return self.timer.dcr
        return 0

    def _reg_write(self, off, value):
        x2 = self.x2apic_mode
        v = value & _M32
        if off == R.TPR:
            self.tpr = v & 0xFF
        elif off == R.EOI:
            self._eoi()
        elif off == R.TIMER_ICR:            # with EOI, what a tickless guest writes most
            self.timer.write_icr(v)
        elif off == R.LDR and not x2:
            self.ldr = v & R.LDR_XAPIC_WRITABLE
        elif off == R.DFR and not x2:
            self.dfr = (v & R.DFR_WRITABLE) | 0x0FFFFFFF
        elif off == R.SVR:
            self._write_svr(v)
        elif off == R.ESR:
            self.esr, self.esr_pending = self.esr_pending, 0
        elif off == R.ICR_LO:
            if x2:
                self.icr_hi = (value >> 32) & _M32
            self.icr_lo = v & R.ICR_LO_WRITABLE
            self._send_ipi()
        elif off == R.ICR_HI and not x2:
            self.icr_hi = v & 0xFF000000
        elif off in self.lvt:
            self._write_lvt(off, v)
        elif off == R.TIMER_DCR:
            self.timer.write_dcr(v)
        elif off == R.SELF_IPI and x2:
            self.set_intr_ready(v & 0xFF, False)

    def _write_svr(self, v):
        was = self.sw_enabled
        self.svr = v & R.SVR_WRITABLE
        if was and not self.sw_enabled:
            for off in self.lvt:
                self.lvt[off] |= R.LVT_MASKED
            self.timer.stop()
        elif not was and self.sw_enabled:
            self.timer.restart_periodic()

    def _write_lvt(self, off, v):
        writable = R.LVT_WRITABLE[off]
        if off == R.LVT_TIMER:
            mode = (v & R.TIMER_MODE_MASK) >> R.TIMER_MODE_SHIFT
            if mode == 3 or (mode == R.TIMER_TSC_DEADLINE and not self.timer.tsc_hz):
                writable &= ~R.TIMER_MODE_MASK
        new = (self.lvt[off] & ~writable) | (v & writable)
        if not self.sw_enabled:
            new |= R.LVT_MASKED
        self.lvt[off] = new
        if off == R.LVT_TIMER:
            self.timer.set_mode((new & R.TIMER_MODE_MASK) >> R.TIMER_MODE_SHIFT)
        elif off == R.LVT_LINT0 and self.lint0_level and not new & R.LVT_MASKED:
            self._kick()

    def _send_ipi(self):
        lo, x2 = self.icr_lo, self.x2apic_mode
        vec, mode = lo & 0xFF, (lo >> R.ICR_DELMODE_SHIFT) & 7
        shorthand = (lo >> R.ICR_SHORTHAND_SHIFT) & 3
        if mode in (R.DELMODE_FIXED, R.DELMODE_LOWPRI) and vec < 16:
            self._set_error(R.ESR_SEND_ILLEGAL_VECTOR)
            return
        dest = self.icr_hi if x2 else self.icr_hi >> 24
        args = (self.vcpu_id, dest, bool(lo & R.ICR_LOGICAL), mode, vec, bool(lo & R.ICR_LEVEL_ASSERT),
                bool(lo & R.ICR_TRIGGER_LEVEL), shorthand)
        if self.bus is not None:
            bus = self.bus
            self._post.append(lambda: bus.deliver(*args))
        elif shorthand in (R.SHORTHAND_SELF, R.SHORTHAND_ALL_INCL) and mode == R.DELMODE_FIXED:
            self.set_intr_ready(vec, args[6])

    # -- MMIO (Device) --------------------------------------------------------------------------------------
    def read(self, offset, size):
        """xAPIC MMIO read; all-ones in x2APIC mode or when hardware-disabled (the page is not there)."""
        mask = (1 << (8 * size)) - 1
        with self._guard:
            if self.x2apic_mode or not self.hw_enabled:
                return mask
            slot, byte = offset & 0xFF0, offset & 0xF
            if offset >= 0x400 or offset < 0:
                return 0
            val = self._reg_read(slot) & _M32 if byte < 4 else 0
            return (val >> (8 * byte)) & mask

    def write(self, offset, size, value):
        """xAPIC MMIO write: only 32-bit (or 64-bit, low half used) aligned writes at a slot start count."""
        with self._guard:
            if self.x2apic_mode or not self.hw_enabled or size < 4 or offset & 0xF or not 0 <= offset < 0x400:
                return
            self._reg_write(offset, value & _M32)
