"""The bus-0 PCI host: function registry, configuration mechanism 1, ECAM, BAR placement and INTx routing
(bhyve's ``pci_emul.c`` host side and ``pci_irq.c``).

Specs: PCI Local Bus 3.0 section 3.2.2.3.2 (configuration mechanism #1: CONFIG_ADDRESS at 0xCF8, enable bit 31,
bus 23:16, device 15:11, function 10:8, register 7:2; CONFIG_DATA at 0xCFC-0xCFF); PCI Firmware 3.x section
4.1.2 and PCI Express Base 3.x section 7.2.2 (ECAM: bus << 20 | device << 15 | function << 12 | register, here
at 0xE0000000, 1 MiB for bus 0); a function nobody implements reads all-ones (the master abort value).

BAR windows, as bhyve places them: I/O from 0x2000 (to 0xFFFF); 32-bit memory from ``mem32_base`` (the lowmem
limit) to below ``mem32_limit`` (0xE0000000, the ECAM window); MEM64 BARs larger than 32 MiB at
0xD000000000-0xFD00000000 (flagged prefetchable as bhyve does), smaller ones in the 32-bit window. Each BAR is
aligned to its size.

INTx (``pci_irq.c``): the function's pin (INTA#-INTD#, Interrupt Pin register) of slot ``s`` is swizzled to
PIRQ ``(s + pin - 1) % 8`` (PIRQ A-H) and that PIRQ is IOAPIC pin ``16 + pirq``. The first use of a PIRQ picks
the least-used ISA IRQ not reserved (0, 1, 2, 3, 4, 8, 9, 12, 13 by default: timer, keyboard, cascade, COM2,
COM1, RTC, SCI, mouse, FPU) and stores it in the PIRQ routing register the LPC bridge exposes (bit 7 = disabled);
that IRQ is made level-triggered in the 8259 ELCR through ``isa_level_trigger(irq)``. Asserting INTx raises the
IOAPIC pin through ``ioapic_irq(pin, level)`` and, while the PIRQ is routed, the 8259 input through
``isa_irq(irq, level)``; lines shared by several functions are wire-ORed here. :meth:`PciHost.route` gives
``(pirq, ioapic_pin, isa_irq)`` for the _PRT and the MP table.

Not supported: buses other than 0 (reads all-ones), bridges, hot plug, AMD's extended register bits 27:24 of
CONFIG_ADDRESS, PIC-mode _PRT link devices, releasing BAR space (removing a function).

Snapshot (:mod:`bhyve_devices.snapshot`): the host's own state is CONFIG_ADDRESS; each function saves its own, the
LPC bridge the PIRQ routing registers. The BAR allocator and the routes follow from the configuration (the same
functions added in the same order).
"""

import threading
from typing import NamedTuple

from bhyve_devices import snapshot as S
from bhyve_devices.pci import config as C
from bhyve_devices.pci.device import BarKind

CONF1_ADDR_PORT = 0xCF8
CONF1_DATA_PORT = 0xCFC
CONF1_ENABLE = 0x80000000
ECAM_BASE = 0xE0000000
ECAM_BUS_SIZE = 1 << 20
IO_BASE = 0x2000
IO_LIMIT = 0x10000
MEM32_BASE = 0xC0000000
MEM32_LIMIT = 0xE0000000
MEM64_BASE = 0xD000000000
MEM64_LIMIT = 0xFD00000000
MEM64_HIGH_MIN = 32 << 20         # bhyve puts smaller MEM64 BARs below 4 GiB
NPIRQ = 8
IOAPIC_PCI_PIN0 = 16
PIRQ_DIS = 0x80
PIRQ_IRQ = 0x0F
DEFAULT_RESERVED_ISA = (0, 1, 2, 3, 4, 8, 9, 12, 13)


class PciRoute(NamedTuple):
    slot: int
    func: int
    pin: int          # 1 = INTA# .. 4 = INTD#
    pirq: int         # 0 = PIRQ A .. 7 = PIRQ H
    ioapic_pin: int   # GSI 16-23
    isa_irq: int      # None when the PIRQ is not routed to the 8259


class PciHostInfo(NamedTuple):
    """What the firmware tables need from the host."""
    ecam_base: int
    bus_min: int
    bus_max: int
    io_window: tuple          # (base, limit) inclusive
    mem32_window: tuple
    mem64_window: tuple
    routes: list              # [PciRoute]
    slots: list               # populated (slot, func)


class PirqRouter:
    """bhyve's ``pci_irq.c``: the 8 PIRQ routing registers, their use counts and the wire-OR of INTx lines."""

    def __init__(self, ioapic_irq=None, isa_irq=None, isa_level_trigger=None, reserved=DEFAULT_RESERVED_ISA):
        self._lock = threading.RLock()
        self._ioapic_irq, self._isa_irq, self._level = ioapic_irq, isa_irq, isa_level_trigger
        self.regs = [PIRQ_DIS] * NPIRQ
        self.use_count = [0] * NPIRQ
        self.active = [0] * NPIRQ
        self._irq_use = {i: 0 for i in range(16) if i not in reserved}
        self._pin_active = [0] * 24

    def isa_irq_of(self, pirq):
        r = self.regs[pirq]
        return None if r & PIRQ_DIS or not (r & PIRQ_IRQ) else r & PIRQ_IRQ

    def reserve(self, irq):
        self._irq_use.pop(irq, None)

    def alloc(self, pirq):
        """Counts one more function on ``pirq``; the first use picks an ISA IRQ (bhyve's pirq_alloc_pin)."""
        with self._lock:
            self.use_count[pirq] += 1
            if self.regs[pirq] & PIRQ_DIS and self._irq_use:
                irq = min(self._irq_use, key=lambda i: (self._irq_use[i], i))
                self._irq_use[irq] += 1
                self.regs[pirq] = irq
                if self._level is not None:
                    self._level(irq)

    def read(self, pirq):
        return self.regs[pirq]

    def write(self, pirq, value):
        """A guest write of a routing register (the LPC bridge's 0x60-0x63 / 0x68-0x6B)."""
        with self._lock:
            value &= PIRQ_DIS | PIRQ_IRQ
            if value == self.regs[pirq]:
                return
            old = self.isa_irq_of(pirq)
            self.regs[pirq] = value
            new = self.isa_irq_of(pirq)
            if self.active[pirq] and self._isa_irq is not None:
                if old is not None:
                    self._isa_irq(old, False)
                if new is not None:
                    self._isa_irq(new, True)

    def set_level(self, pirq, ioapic_pin, level):
        with self._lock:
            if level:
                self.active[pirq] += 1
                self._pin_active[ioapic_pin] += 1
                first_pirq, first_pin = self.active[pirq] == 1, self._pin_active[ioapic_pin] == 1
            else:
                if not self.active[pirq]:
                    return
                self.active[pirq] -= 1
                self._pin_active[ioapic_pin] -= 1
                first_pirq, first_pin = self.active[pirq] == 0, self._pin_active[ioapic_pin] == 0
            isa = self.isa_irq_of(pirq)
            if first_pin and self._ioapic_irq is not None:
                self._ioapic_irq(ioapic_pin, level)
            if first_pirq and isa is not None and self._isa_irq is not None:
                self._isa_irq(isa, level)


class _IntxLine:
    """The IrqLine a function's INTx drives (level only)."""

    def __init__(self, router, route):
        self._router, self._route, self._level = router, route, False

    def set_level(self, level):
        level = bool(level)
        if level != self._level:
            self._level = level
            self._router.set_level(self._route.pirq, self._route.ioapic_pin, level)

    def pulse(self):
        self.set_level(True)
        self.set_level(False)


class Conf1Addr:
    """CONFIG_ADDRESS (port 0xCF8, dword accesses only, as bhyve)."""

    def __init__(self, host):
        self.host = host

    def read(self, offset, size):
        if offset != 0 or size != 4:
            return (1 << (8 * size)) - 1
        return self.host.conf1_addr

    def write(self, offset, size, value):
        if offset == 0 and size == 4:
            self.host.conf1_addr = value & 0x80FFFFFC


class Conf1Data:
    """CONFIG_DATA (ports 0xCFC-0xCFF): offset ``n`` reaches register ``(CONFIG_ADDRESS & 0xFC) + n``."""

    def __init__(self, host):
        self.host = host

    def _target(self, offset):
        a = self.host.conf1_addr
        if not a & CONF1_ENABLE:
            return None
        return (a >> 16) & 0xFF, (a >> 11) & 0x1F, (a >> 8) & 7, (a & 0xFC) + offset

    def read(self, offset, size):
        t = self._target(offset)
        return (1 << (8 * size)) - 1 if t is None else self.host.cfgread(*t, size)

    def write(self, offset, size, value):
        t = self._target(offset)
        if t is not None:
            self.host.cfgwrite(*t, size, value)


class Conf1:
    """Ports 0xCF8-0xCFF as one Device (offset 0 = CONFIG_ADDRESS, 4-7 = CONFIG_DATA). On a port bus map
    :meth:`PciHost.conf1_ranges` instead: port 0xCF9 is the reset control register (``pm``)."""

    def __init__(self, host):
        self._addr, self._data = Conf1Addr(host), Conf1Data(host)

    def read(self, offset, size):
        return self._data.read(offset - 4, size) if offset >= 4 else self._addr.read(offset, size)

    def write(self, offset, size, value):
        if offset >= 4:
            self._data.write(offset - 4, size, value)
        else:
            self._addr.write(offset, size, value)


class Ecam:
    """The ECAM window (MMIO, 1 MiB for bus 0). 8-byte accesses are split into two dwords."""

    def __init__(self, host):
        self.host = host

    def read(self, offset, size):
        if size == 8:
            return self.read(offset, 4) | (self.read(offset + 4, 4) << 32)
        return self.host.cfgread(offset >> 20, (offset >> 15) & 0x1F, (offset >> 12) & 7, offset & 0xFFF, size)

    def write(self, offset, size, value):
        if size == 8:
            self.write(offset, 4, value & 0xFFFFFFFF)
            self.write(offset + 4, 4, value >> 32)
            return
        self.host.cfgwrite(offset >> 20, (offset >> 15) & 0x1F, (offset >> 12) & 7, offset & 0xFFF, size, value)


class PciHost:
    """Bus 0: ``add(slot, func, dev)``, configuration access, BAR placement and INTx routing.

    ``msi(addr, data)``, ``bar_changed(dev, idx, kind, old, new, size, enabled)`` are passed to every function;
    ``ioapic_irq(pin, level)``, ``isa_irq(irq, level)`` and ``isa_level_trigger(irq)`` drive the interrupt
    controllers (see the module docstring)."""

    snapshot_version = 1

    def __init__(self, mem32_base=MEM32_BASE, mem32_limit=MEM32_LIMIT, io_base=IO_BASE, io_limit=IO_LIMIT,
                 mem64_base=MEM64_BASE, mem64_limit=MEM64_LIMIT, ecam_base=ECAM_BASE, msi=None,
                 bar_changed=None, ioapic_irq=None, isa_irq=None, isa_level_trigger=None,
                 reserved_isa_irqs=DEFAULT_RESERVED_ISA):
        if not mem32_base < mem32_limit <= 1 << 32:
            raise ValueError("bad 32-bit MMIO window")
        self._lock = threading.RLock()
        self.functions = {}                     # (slot, func) -> PciDevice
        self.routes = {}                        # (slot, func) -> PciRoute
        self.msi, self.bar_changed = msi, bar_changed
        self.windows = {"io": [io_base, io_limit], "mem32": [mem32_base, mem32_limit],
                        "mem64": [mem64_base, mem64_limit]}
        self._next = {k: v[0] for k, v in self.windows.items()}
        self.ecam_base = ecam_base
        self.router = PirqRouter(ioapic_irq, isa_irq, isa_level_trigger, reserved_isa_irqs)
        self.conf1_addr = 0
        self.conf1 = Conf1(self)
        self.ecam = Ecam(self)

    def snapshot(self):
        return dict(S.header(self), conf1_addr=self.conf1_addr)

    def restore(self, state, shift_ns):
        S.check(self, state, ("conf1_addr",))
        v = state["conf1_addr"]
        if not isinstance(v, int) or v & ~0x80FFFFFC:
            raise S.SnapshotError(f"PciHost: CONFIG_ADDRESS {v!r} is not a value it can hold")
        self.conf1_addr = v

    # -- registry -----------------------------------------------------------------------------------------
    def add(self, slot, func, dev):
        """Adds ``dev`` at 0:slot.func; places its BARs, routes its INTx pin. Refuses a taken slot/function."""
        if not (0 <= slot < 32 and 0 <= func < 8):
            raise ValueError(f"bad PCI slot {slot}:{func}")
        with self._lock:
            if (slot, func) in self.functions:
                raise ValueError(f"PCI 0:{slot}.{func} is taken by {self.functions[(slot, func)].name}")
            self.functions[(slot, func)] = dev
            dev.bus, dev.slot, dev.func = 0, slot, func
            dev.msi, dev.bar_changed = self.msi, self.bar_changed
            if hasattr(dev, "attach_router"):
                dev.attach_router(self.router)
            same = [d for (s, f), d in self.functions.items() if s == slot]
            for d in same:
                d.set_multifunction(len(same) > 1)
            pin = dev.get_cfg(C.INTR_PIN, 1)
            if 1 <= pin <= 4:
                pirq = (slot + pin - 1) % NPIRQ
                self.router.alloc(pirq)
                r = PciRoute(slot, func, pin, pirq, IOAPIC_PCI_PIN0 + pirq, None)
                self.routes[(slot, func)] = r
                irq = self.router.isa_irq_of(pirq)
                dev.set_cfg(C.INTR_LINE, 1, irq if irq is not None else 0xFF)
                dev.intx_line = _IntxLine(self.router, r)
        try:
            addrs = [(idx, self.allocate(dev, idx, b.kind, b.size)) for idx, b in enumerate(dev.bars)
                     if b.kind in (BarKind.IO, BarKind.MEM32, BarKind.MEM64)]
        except ValueError:
            with self._lock:
                del self.functions[(slot, func)]
                self.routes.pop((slot, func), None)
            raise
        for idx, addr in addrs:
            dev.place_bar(idx, addr)
        dev.bar_allocator = self.allocate
        return dev

    def allocate(self, dev, idx, kind, size):
        """Address for a new BAR (bhyve's pci_emul_alloc_resource); ValueError when the window is full."""
        if kind == BarKind.IO:
            win = "io"
        elif kind == BarKind.MEM64 and size > MEM64_HIGH_MIN:
            win = "mem64"
            dev.bars[idx].prefetch = True
        else:
            win = "mem32"
        with self._lock:
            addr = (self._next[win] + size - 1) & ~(size - 1)
            if addr + size > self.windows[win][1]:
                raise ValueError(f"PCI {win} window full for {dev.name} BAR {idx} ({size:#x} bytes)")
            self._next[win] = addr + size
            return addr

    def function(self, slot, func):
        return self.functions.get((slot, func))

    def route(self, dev):
        """``(pirq, ioapic_pin, isa_irq)`` of ``dev``'s INTx pin, or None when it has none."""
        r = self.routes.get((dev.slot, dev.func))
        if r is None or self.functions.get((dev.slot, dev.func)) is not dev:
            return None
        return r.pirq, r.ioapic_pin, self.router.isa_irq_of(r.pirq)

    def all_routes(self):
        return [r._replace(isa_irq=self.router.isa_irq_of(r.pirq)) for _, r in sorted(self.routes.items())]

    def info(self):
        io, m32, m64 = (self.windows[k] for k in ("io", "mem32", "mem64"))
        return PciHostInfo(self.ecam_base, 0, 0, (io[0], io[1] - 1), (m32[0], m32[1] - 1), (m64[0], m64[1] - 1),
                           self.all_routes(), sorted(self.functions))

    # -- configuration access ----------------------------------------------------------------------------
    def cfgread(self, bus, slot, func, off, size):
        dev = self.functions.get((slot, func)) if bus == 0 else None
        if dev is None:
            return (1 << (8 * size)) - 1
        return dev.cfgread(off, size)

    def cfgwrite(self, bus, slot, func, off, size, value):
        dev = self.functions.get((slot, func)) if bus == 0 else None
        if dev is not None:
            dev.cfgwrite(off, size, value)

    def conf1_ranges(self):
        """``[(port, length, device)]`` for the port bus: CONFIG_ADDRESS at 0xCF8 (one port, so 0xCF9 stays
        free for the reset register) and CONFIG_DATA at 0xCFC-0xCFF."""
        return [(CONF1_ADDR_PORT, 1, self.conf1._addr), (CONF1_DATA_PORT, 4, self.conf1._data)]

    def ecam_range(self):
        """``(base, size, device)`` for the MMIO bus."""
        return self.ecam_base, ECAM_BUS_SIZE, self.ecam
