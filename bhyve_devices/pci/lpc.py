"""bhyve's ``pci_lpc.c``: the ``lpc`` PCI-to-ISA bridge (function 0:31.0 by convention).

PCI Local Bus 3.0 chapter 6 (type-0 header, class 06h subclass 01h "ISA bridge"); the PIRQ route control
registers follow the Intel 82371SB (PIIX3) datasheet section 2.2.9 "PIRQRC[A:D]": one byte per PIRQ, bit 7 =
routing disabled, bits 3:0 = the ISA IRQ; PIRQA-D at 0x60-0x63 and, as in ICH parts and bhyve, PIRQE-H at
0x68-0x6B. IDs as bhyve: vendor 0x8086, device 0x7000 (the 82371SB ISA bridge).

The registers are views of the host's :class:`~bhyve_devices.pci.host.PirqRouter` (attached by
:meth:`PciHost.add`): a write re-routes an asserted PIRQ from its old ISA IRQ to the new one, as bhyve's
``pirq_write``. ELCR: a PIRQ is a shared, level-triggered, active-low line, so the ISA IRQ it routes to must be
level-triggered in the 8259's Edge/Level Control Register (ports 0x4D0/0x4D1); the router marks the IRQ it
allocates level through ``isa_level_trigger`` at routing time (bhyve's ``vm_isa_set_irq_trigger``), and a guest
that re-routes a PIRQ programs the ELCR itself (Linux's ``pirq_piix_set`` path leaves it to ``elcr_set_level_irq``).

The bridge does not own the UARTs, the RTC, the PIT, the PIC or the HPET (the VM maps them on its buses);
:meth:`Lpc.legacy_devices` says which of them sit behind it for the DSDT: COM1 0x3F8 IRQ4, COM2 0x2F8 IRQ3 (those
configured), RTC, PIT, PIC and HPET.

Not supported: the bootrom (``-l bootrom``), other PIIX/ICH configuration registers (they read 0 and drop
writes), LPC I/O decode ranges, more than one LPC bridge per host.

Snapshot: the generic PCI state plus ``pirq``, the eight routing registers as the guest sees them (the router's,
or the config bytes when no host is attached); restore writes them as the guest would, so a PIRQ asserted at the
time follows its ISA IRQ.
"""

from typing import NamedTuple

from bhyve_devices import snapshot as S
from bhyve_devices.pci.device import PciDevice
from bhyve_devices.pci.registry import register

PIRQ_REGS = {0x60: 0, 0x61: 1, 0x62: 2, 0x63: 3, 0x68: 4, 0x69: 5, 0x6A: 6, 0x6B: 7}


class LegacyDevice(NamedTuple):
    """One ISA device for the DSDT: ``io`` is ``[(base, length)]``, ``mem`` ``[(base, length)]``."""
    name: str
    hid: str
    uid: int
    io: tuple
    irqs: tuple
    mem: tuple = ()


UARTS = {
    "com1": LegacyDevice("COM1", "PNP0501", 1, ((0x3F8, 8),), (4,)),
    "com2": LegacyDevice("COM2", "PNP0501", 2, ((0x2F8, 8),), (3,)),
}
PLATFORM = (
    LegacyDevice("PIC", "PNP0000", 0, ((0x20, 2), (0xA0, 2)), (2,)),
    LegacyDevice("TIMR", "PNP0100", 0, ((0x40, 4),), (0,)),
    LegacyDevice("RTC", "PNP0B00", 0, ((0x70, 2),), (8,)),
    LegacyDevice("HPET", "PNP0103", 0, (), (), ((0xFED00000, 0x400),)),
)


@register("lpc")
class Lpc(PciDevice):
    """``Lpc(opts)``: ``opts["uarts"]`` lists the COM ports the VM wires (default ``("com1", "com2")``)."""

    def __init__(self, opts=None):
        opts = opts or {}
        super().__init__("lpc", 0x8086, 0x7000, 0x06, 0x01)
        self.uarts = tuple(u for u in opts.get("uarts", ("com1", "com2")) if u in UARTS)
        self.router = None
        for off in PIRQ_REGS:
            self.set_cfg(off, 1, 0x80)

    def attach_router(self, router):
        """Called by :meth:`PciHost.add`; the COM IRQs are kept out of the PCI IRQ pool."""
        self.router = router
        for u in self.uarts:
            for irq in UARTS[u].irqs:
                router.reserve(irq)

    def cfgread_hook(self, off, size):
        if self.router is None or not any(o in PIRQ_REGS for o in range(off, off + size)):
            return None
        v = 0
        for i in range(size):
            o = off + i
            b = self.router.read(PIRQ_REGS[o]) if o in PIRQ_REGS else self.get_cfg(o, 1)
            v |= b << (8 * i)
        return v

    def cfgwrite_hook(self, off, size, value):
        if not any(o in PIRQ_REGS for o in range(off, off + size)):
            return False
        for i in range(size):
            o, b = off + i, (value >> (8 * i)) & 0xFF
            if o in PIRQ_REGS:
                if self.router is not None:
                    self.router.write(PIRQ_REGS[o], b)
                else:
                    self.set_cfg(o, 1, b & 0x8F)
        return True

    def snapshot(self):
        state = super().snapshot()
        state["pirq"] = [self.cfgread(o, 1) for o in PIRQ_REGS]
        return state

    def restore(self, state, shift_ns):
        S.check(self, state, self.snapshot_keys + ("pirq",))
        regs = state["pirq"]
        if not (isinstance(regs, list) and len(regs) == len(PIRQ_REGS)
                and all(isinstance(r, int) and 0 <= r <= 0xFF for r in regs)):
            raise S.SnapshotError(f"lpc: {regs!r:.60} is not the {len(PIRQ_REGS)} PIRQ routing registers")
        super().restore(state, shift_ns)
        for off, value in zip(PIRQ_REGS, regs):
            self.cfgwrite(off, 1, value)

    def legacy_devices(self):
        """The ISA devices behind this bridge, for the DSDT (:class:`LegacyDevice`)."""
        return [UARTS[u] for u in self.uarts] + list(PLATFORM)
