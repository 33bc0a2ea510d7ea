"""LINT0 and LINT1 of a :class:`~bhyve_devices.vlapic.Vlapic` (a mixin): the 8259's INTR wire, ExtINT and the
LVTs fired from outside (bhyve's ``vlapic_trigger_lvt`` and ``vm_inject_extint``).

Intel SDM vol. 3A 10.5.1 "Local Vector Table" (LINT0 in ExtINT mode: the 8259 answers the INTA cycle; fixed and
NMI modes fire on a rising edge), 10.4.7.2 "Local APIC State After It Has Been Software Disabled" and 10.4.3
(global disable). While the APIC is not enabled (hardware-disabled, or software-disabled as after reset) LINT0 is
the plain INTR pin and LINT1 the NMI pin, whatever their masked LVTs say, as in bhyve: a ``nolapic`` or
firmware-less (kexec) guest gets the 8259's interrupts that way.

Not supported: level-triggered LINT0/LINT1 (remote IRR is never set); the polarity bit (levels are logical).
"""

from . import vlapic_regs as R

# LVT indices for trigger_lvt, in bhyve's APIC_LVT_* order.
LVT_LINT0, LVT_LINT1, LVT_TIMER, LVT_ERROR, LVT_PMC, LVT_THERMAL, LVT_CMCI = range(7)
_LVT_OFF = (R.LVT_LINT0, R.LVT_LINT1, R.LVT_TIMER, R.LVT_ERROR, R.LVT_PMC, R.LVT_THERMAL, R.LVT_CMCI)


class VlapicLintMixin:
    """LINT0/LINT1 methods; expects the attributes and helpers of Vlapic (``_guard``, ``_fire_lvt``, ``enabled``)."""

    def trigger_lvt(self, idx):
        """Fires LVT ``idx`` (LVT_LINT0 ... LVT_CMCI): fixed, NMI and (LINT0) ExtINT. Returns True if delivered.
        While the APIC is not enabled LINT0 is an ExtINT and LINT1 an NMI, the other LVTs nothing (bhyve)."""
        with self._guard:
            if not self.enabled:
                if idx == LVT_LINT0:
                    self._extint = True
                    self._kick()
                elif idx == LVT_LINT1 and self.bus is not None:
                    self._post.append(lambda: self.bus.nmi(self.vcpu_id))
                return False
            return self._fire_lvt(_LVT_OFF[idx])

    def set_lint0_level(self, level):
        """The 8259's INTR wire into LINT0: in ExtINT mode, or while the APIC is not enabled (LINT0 is then the
        INTR pin), it makes :meth:`lint0_pending` true while high; in fixed or NMI mode a rising edge fires the
        LVT."""
        with self._guard:
            rising = level and not self.lint0_level
            self.lint0_level = bool(level)
            if not self.enabled or ((self.lvt[R.LVT_LINT0] >> 8) & 7) == R.DELMODE_EXTINT:
                if level:
                    self._kick()
            elif rising:
                self._fire_lvt(R.LVT_LINT0)

    def lint0_pending(self):
        """True if an ExtINT is pending through LINT0 (or through an APIC that is not enabled, hardware or
        software, where LINT0 is the plain INTR pin): the caller runs the 8259 INTA (vatpic.intr_accepted),
        injects that vector and calls :meth:`extint_accepted`. ExtINT is not subject to the PPR."""
        with self._lock:            # a reader: posts nothing, so not the guard
            if not self.enabled:
                return self.lint0_level or self._extint
            lvt = self.lvt[R.LVT_LINT0]
            if lvt & R.LVT_MASKED or ((lvt >> 8) & 7) != R.DELMODE_EXTINT:
                return False
            return self.lint0_level or self._extint

    def extint_accepted(self):
        with self._guard:
            self._extint = False
