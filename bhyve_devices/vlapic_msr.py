"""IA32_APIC_BASE, IA32_TSC_DEADLINE and the x2APIC MSRs of a :class:`~bhyve_devices.vlapic.Vlapic` (a mixin).

Intel SDM vol. 3A 10.4.4 "Local APIC Status and Location" (IA32_APIC_BASE: BSP bit 8, EXTD bit 10, EN bit 11),
10.12.1.2 "x2APIC Register Address Space" (table 10-6: MSR 0x800 + offset/16; APR, RRD, DFR and ICR high do not
exist; reads of write-only and writes of read-only registers #GP), 10.12.5 "x2APIC State Transitions"
(figure 10-27: EXTD without EN, x2APIC -> xAPIC and disabled -> x2APIC are invalid and #GP; clearing EN resets the
APIC), 10.5.4.1 "TSC-Deadline Mode" (IA32_TSC_DEADLINE, MSR 0x6E0). Also what CPUID leaf 1 should report and the
export/import of the register state as a :data:`~bhyve_devices.vlapic_regs.LAPIC_PAGE`.

Not supported: relocating the APIC page (:class:`ApicGP`, as bhyve refuses it); the #GP on reserved bits of x2APIC
registers (they are masked instead); the TSC_ADJUST MSR. Without ``tsc_hz`` (CPUID's TSC-deadline bit clear)
RDMSR/WRMSR of IA32_TSC_DEADLINE raise :class:`ApicGP`, while :meth:`read_tsc_deadline` reads 0 and
:meth:`write_tsc_deadline` is ignored.
"""

from . import vlapic_regs as R


class ApicGP(Exception):
    """The access must #GP in the guest: the caller (ops layer) injects #GP(0) instead of completing the RDMSR or
    WRMSR. Raised for x2APIC MSRs while not in x2APIC mode, invalid x2APIC accesses and bad APIC_BASE writes."""


_X2_ABSENT = frozenset((R.APR, R.RRD, R.DFR, R.ICR_HI))
_X2_READ_ONLY = frozenset([R.ID, R.VER, R.PPR, R.LDR, R.TIMER_CCR]
                          + [b + 16 * i for b in (R.ISR0, R.TMR0, R.IRR0) for i in range(8)])
_X2_WRITE_ONLY = frozenset((R.EOI, R.SELF_IPI))
_X2_VALID = frozenset(R.REG_NAMES) - _X2_ABSENT
_M32 = 0xFFFFFFFF


class VlapicMsrMixin:
    """MSR, APIC_BASE, CPUID and page-export methods; expects the attributes and helpers of Vlapic."""

    # -- MSRs -----------------------------------------------------------------------------------------------
    @staticmethod
    def handles_msr(msr):
        return msr in (R.MSR_APICBASE, R.MSR_TSC_DEADLINE) or R.MSR_X2APIC_FIRST <= msr <= R.MSR_X2APIC_LAST

    def _tsc_deadline_offered(self):
        if not self.timer.tsc_hz:
            raise ApicGP("IA32_TSC_DEADLINE: CPUID does not offer TSC-deadline")

    def _x2_off(self, msr, write):
        if not self.x2apic_mode:
            raise ApicGP(f"x2APIC MSR {msr:#x} accessed outside x2APIC mode")
        off = (msr - R.MSR_X2APIC_FIRST) << 4
        if off not in _X2_VALID or (write and off in _X2_READ_ONLY) or (not write and off in _X2_WRITE_ONLY):
            raise ApicGP(f"x2APIC MSR {msr:#x} {'write' if write else 'read'} not allowed")
        return off

    def rdmsr(self, msr):
        with self._guard:
            if msr == R.MSR_APICBASE:
                return self.apicbase
            if msr == R.MSR_TSC_DEADLINE:
                self._tsc_deadline_offered()
                return self.timer.read_tsc_deadline()
            if not R.MSR_X2APIC_FIRST <= msr <= R.MSR_X2APIC_LAST:
                raise ValueError(f"MSR {msr:#x} is not an APIC MSR")
            return self._reg_read(self._x2_off(msr, False))

    def wrmsr(self, msr, value):
        with self._guard:
            if msr == R.MSR_APICBASE:
                return self.set_apicbase(value)
            if msr == R.MSR_TSC_DEADLINE:
                self._tsc_deadline_offered()
                return self.write_tsc_deadline(value)
            if not R.MSR_X2APIC_FIRST <= msr <= R.MSR_X2APIC_LAST:
                raise ValueError(f"MSR {msr:#x} is not an APIC MSR")
            off = self._x2_off(msr, True)
            if off in (R.EOI, R.ESR) and value:
                raise ApicGP(f"non-zero write to x2APIC {'EOI' if off == R.EOI else 'ESR'}")
            self._reg_write(off, value & 0xFFFFFFFFFFFFFFFF)

    def get_apicbase(self):
        return self.apicbase

    def set_apicbase(self, value):
        """IA32_APIC_BASE write (10.4.4, 10.12.5 figure 10-27). BSP is read-only; the address cannot change."""
        with self._guard:
            allowed = R.APICBASE_BSP | R.APICBASE_X2APIC | R.APICBASE_ENABLED | R.APICBASE_ADDR
            if value & ~allowed or (value & R.APICBASE_ADDR) != (self.apicbase & R.APICBASE_ADDR):
                raise ApicGP(f"APIC_BASE write {value:#x}: reserved bits or relocation")
            en, x2 = bool(value & R.APICBASE_ENABLED), bool(value & R.APICBASE_X2APIC)
            if x2 and not self.x2apic_allowed:
                raise ApicGP("x2APIC not offered to this VM")
            if x2 and not en:
                raise ApicGP("APIC_BASE: EXTD without EN is invalid")
            if self.x2apic_mode and en and not x2:
                raise ApicGP("APIC_BASE: x2APIC -> xAPIC directly is invalid")
            if not self.hw_enabled and x2:
                raise ApicGP("APIC_BASE: disabled -> x2APIC directly is invalid")
            if self.hw_enabled and not en:
                self._reset_state()
            self.apicbase = (self.apicbase & (R.APICBASE_BSP | R.APICBASE_ADDR)) | (value & (
                R.APICBASE_X2APIC | R.APICBASE_ENABLED))

    def write_tsc_deadline(self, value):
        """IA32_TSC_DEADLINE write; ignored unless the timer LVT is in TSC-deadline mode."""
        with self._guard:
            if self.timer.write_tsc_deadline(value):
                self._fire_lvt(R.LVT_TIMER)

    def read_tsc_deadline(self):
        with self._guard:
            return self.timer.read_tsc_deadline()

    # -- CPUID and state export ----------------------------------------------------------------------------
    def cpuid_features(self):
        """What CPUID should say: leaf 1 EDX.APIC[9] (clear while hardware-disabled), ECX.x2APIC[21] and
        ECX.TSC-deadline[24]."""
        return {"apic": self.hw_enabled, "x2apic": self.x2apic_allowed, "tsc_deadline": bool(self.timer.tsc_hz)}

    def cpuid_leaf1(self, ecx, edx):
        f = self.cpuid_features()
        ecx = (ecx & ~((1 << 21) | (1 << 24))) | (f["x2apic"] << 21) | (f["tsc_deadline"] << 24)
        edx = (edx & ~(1 << 9)) | (f["apic"] << 9)
        return ecx, edx

    def export_page(self):
        """The register state as a 4 KiB page in :data:`LAPIC_PAGE` layout (ICR low word only)."""
        with self._guard:
            d = {name: self._reg_read(off) & _M32 for off, name in R.REG_NAMES.items()}
            return R.LAPIC_PAGE.build(d)

    def import_page(self, data):
        """Loads the writable state from a page (ID, VER, PPR and CCR are derived); the timer restarts from ICR."""
        with self._guard:
            p = R.LAPIC_PAGE.parse(data)
            self.tpr, self.svr = p.tpr & 0xFF, p.svr & R.SVR_WRITABLE
            self.ldr, self.dfr = p.ldr & R.LDR_XAPIC_WRITABLE, (p.dfr & R.DFR_WRITABLE) | 0x0FFFFFFF
            self.esr, self.icr_lo, self.icr_hi = p.esr & 0xFF, p.icr_lo & R.ICR_LO_WRITABLE, p.icr_hi
            for name in ("isr", "tmr", "irr"):
                setattr(self, name, sum(p[f"{name}{i}"] << (32 * i) for i in range(8)))
            for off in R.LVT_OFFSETS:
                self._write_lvt(off, p[R.REG_NAMES[off]])
            self.timer.write_dcr(p.dcr_timer)
            self.timer.write_icr(p.icr_timer)
