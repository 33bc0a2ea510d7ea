"""The APIC bus of one VM: holds every vCPU's :class:`~bhyve_devices.vlapic.Vlapic` and routes interrupts.

Intel SDM vol. 3A 10.6.2 "Determining IPI Destination" (physical: APIC ID, 0xFF / 0xFFFFFFFF broadcast; logical:
flat model ``MDA & LDR[31:24] != 0``, cluster model ``MDA[7:4] == LDR[31:28] and MDA[3:0] & LDR[27:24]``, x2APIC
``MDA[31:16] == LDR[31:16] and MDA[15:0] & LDR[15:0]``; shorthands self, all-including-self,
all-excluding-self), 10.6.2.4 "Lowest Priority Delivery Mode", 10.6.1 INIT / START-UP (8.4.4 MP initialization:
INIT puts an AP in wait-for-SIPI, the first SIPI starts it, later SIPIs are ignored). IOAPIC and MSI messages
arrive through :meth:`ApicBus.deliver_intr` in the 8-bit xAPIC destination format, as bhyve's
``vlapic_deliver_intr``.

The VM injects its hooks: ``on_init(vcpu_id)`` (after the target vlapic was INIT-reset; the VM resets the vCPU),
``on_sipi(vcpu_id, vector, src_id)`` (start the AP at ``vector << 12``; called once for every AP a START-UP message
reaches, with the sender, so a broadcast SIPI starts each AP it names), ``on_nmi(vcpu_id)`` and ``kick(vcpu_id)``,
called after an interrupt was made pending so a halted or running vCPU looks at its vlapic. Hooks run with no
vlapic lock held.

Not supported: SMI, remote read and ExtINT messages (dropped); the INIT level de-assert message (ignored, as on
Pentium 4 and later); focus-processor checking in lowest-priority arbitration (the target is the lowest processor
priority class, ties broken round-robin); the x2APIC extended destination ID in MSI.
"""

import threading

from . import vlapic_regs as R
from .snapshot import SnapshotError, check, header


def _nop(*_):
    pass


class Delivered(list):
    """What :meth:`ApicBus.deliver` returns: the vCPU ids a message reached, and ``merged``: True when it was a
    fixed or lowest-priority interrupt that every vlapic it reached already had requested in its IRR (it
    merged with that request; an edge that the guest will take once, not twice)."""

    merged = False


class ApicBus:
    snapshot_version = 1

    def __init__(self, on_init=None, on_sipi=None, on_nmi=None, kick=None):
        self.on_init = on_init or _nop
        self.on_sipi = on_sipi or _nop
        self.on_nmi = on_nmi or _nop
        self._kick = kick or _nop
        self.vlapics = {}
        self._ordered = ()          # the vlapics in vCPU order (every message looks at them)
        self._wait_sipi = set()
        self._rr = 0
        self._lock = threading.Lock()

    def add(self, vlapic):
        """Registers a vlapic (done by its constructor); every AP starts in wait-for-SIPI."""
        self.vlapics[vlapic.vcpu_id] = vlapic
        self._ordered = tuple(v for _, v in sorted(self.vlapics.items()))
        vlapic.bus = self
        if vlapic.vcpu_id != 0:
            self._wait_sipi.add(vlapic.vcpu_id)

    def get(self, vcpu_id):
        return self.vlapics[vcpu_id]

    def kick(self, vcpu_id):
        self._kick(vcpu_id)

    def nmi(self, vcpu_id):
        self.on_nmi(vcpu_id)
        self._kick(vcpu_id)

    def waiting_for_sipi(self, vcpu_id):
        return vcpu_id in self._wait_sipi

    # -- snapshot (issue 23) --------------------------------------------------------------------------------
    def snapshot(self):
        """The vCPUs waiting for a START-UP IPI and the lowest-priority round-robin pointer (each vlapic saves its
        own registers)."""
        with self._lock:
            d = header(self)
            d.update(wait_sipi=sorted(self._wait_sipi), rr=self._rr)
            return d

    def restore(self, state, shift_ns):
        """Takes :meth:`snapshot`'s state (no times)."""
        check(self, state, ("wait_sipi", "rr"))
        ws, rr = state["wait_sipi"], state["rr"]
        if (not isinstance(ws, list) or not all(type(i) is int and i >= 0 for i in ws)
                or type(rr) is not int or rr < 0):
            raise SnapshotError("ApicBus: wait_sipi is not a list of vCPU ids or rr is not one")
        with self._lock:
            self._wait_sipi = set(ws)
            self._rr = rr

    # -- destination ----------------------------------------------------------------------------------------
    def targets(self, src_id, dest, logical, shorthand=R.SHORTHAND_NONE, x2_format=None):
        """The vlapics (hardware-enabled) a message reaches, in vCPU order."""
        if x2_format is None:
            src = self.vlapics.get(src_id)
            x2_format = bool(src is not None and src.x2apic_mode)
        if not logical and shorthand == R.SHORTHAND_NONE and dest != (0xFFFFFFFF if x2_format else 0xFF):
            return [v for v in self._ordered if v.apic_id == dest and v.hw_enabled]     # the common MSI
        all_ = [v for v in self._ordered if v.hw_enabled]
        if shorthand == R.SHORTHAND_SELF:
            return [v for v in all_ if v.vcpu_id == src_id]
        if shorthand == R.SHORTHAND_ALL_INCL:
            return all_
        if shorthand == R.SHORTHAND_ALL_EXCL:
            return [v for v in all_ if v.vcpu_id != src_id]
        if dest == (0xFFFFFFFF if x2_format else 0xFF):
            return all_
        if not logical:
            return [v for v in all_ if v.apic_id == dest]
        return [v for v in all_ if self._logical_match(v, dest)]

    @staticmethod
    def _logical_match(v, dest):
        if v.x2apic_mode:
            ldr = v._x2_ldr()
            return (dest >> 16) == (ldr >> 16) and bool(dest & ldr & 0xFFFF)
        ldr = (v.ldr >> 24) & 0xFF
        dest &= 0xFF
        if (v.dfr >> 28) == R.DFR_FLAT:
            return bool(dest & ldr)
        return (dest >> 4) == (ldr >> 4) and bool(dest & ldr & 0xF)

    def _lowest(self, targets):
        if not targets:
            return []
        n = max(self.vlapics) + 1
        with self._lock:
            start = self._rr
            best = min(targets, key=lambda v: ((v.get_ppr() >> 4), (v.vcpu_id - start) % n))
            self._rr = (best.vcpu_id + 1) % n
        return [best]

    # -- delivery -------------------------------------------------------------------------------------------
    def deliver(self, src_id, dest, dest_mode_logical, delivery_mode, vector, level=True, trigger=False,
                shorthand=R.SHORTHAND_NONE, x2_format=None):
        """An IPI (from an ICR write of vCPU ``src_id``) or a message from an IOAPIC/MSI (``src_id`` None).
        ``trigger`` True is level-triggered. Returns the vCPU ids it was delivered to, as a :class:`Delivered`
        list whose ``merged`` says whether a fixed (or lowest-priority) interrupt merged with one already
        requested: every vlapic that accepted it had the vector in its IRR (False when none accepted it)."""
        targets = self.targets(src_id, dest, dest_mode_logical, shorthand, x2_format)
        mode = delivery_mode & 7
        if mode == R.DELMODE_LOWPRI:
            targets = self._lowest(targets)
            mode = R.DELMODE_FIXED
        done = Delivered()
        if mode == R.DELMODE_FIXED:
            merged = []
            for v in targets:
                accepted, was_pending = v.set_intr_ready(vector, trigger, report_merged=True)
                if accepted:
                    done.append(v.vcpu_id)
                    merged.append(was_pending)
            done.merged = bool(merged) and all(merged)
        elif mode == R.DELMODE_NMI:
            for v in targets:
                self.nmi(v.vcpu_id)
                done.append(v.vcpu_id)
        elif mode == R.DELMODE_INIT:
            if trigger and not level:
                return done  # INIT level de-assert
            for v in targets:
                v.reset()
                with self._lock:
                    self._wait_sipi.add(v.vcpu_id)
                self.on_init(v.vcpu_id)
                self._kick(v.vcpu_id)
                done.append(v.vcpu_id)
        elif mode == R.DELMODE_STARTUP:
            for v in targets:
                with self._lock:
                    if v.vcpu_id not in self._wait_sipi:
                        continue
                    self._wait_sipi.discard(v.vcpu_id)
                self.on_sipi(v.vcpu_id, vector & 0xFF, src_id)
                self._kick(v.vcpu_id)
                done.append(v.vcpu_id)
        return done

    def deliver_intr(self, dest, phys, delmode, vector, level_trigger):
        """IOAPIC / MSI delivery (bhyve's ``vlapic_deliver_intr``): fixed, lowest priority, NMI and INIT; the
        destination is the 8-bit xAPIC format (0xFF broadcast). Returns the vCPU ids reached (a
        :class:`Delivered`, with ``merged``)."""
        if delmode & 7 not in (R.DELMODE_FIXED, R.DELMODE_LOWPRI, R.DELMODE_NMI, R.DELMODE_INIT):
            return Delivered()
        return self.deliver(None, dest, not phys, delmode, vector, True, bool(level_trigger), R.SHORTHAND_NONE,
                            x2_format=False)
