"""Base Address Registers: the BAR kinds (bhyve's ``enum pcibar_type``), one BAR's state and the window the VM
maps for it.

PCI Local Bus Specification 3.0, section 6.2.5.1: a BAR decodes I/O space or memory space, a memory BAR is 32 or
64 bits wide (a 64-bit BAR takes the next BAR slot for its upper half) and may be prefetchable. Shared by
:mod:`bhyve_devices.pci.device` (:class:`~bhyve_devices.pci.device.PciDevice`) and :mod:`bhyve_devices.pci.msi`
(the MSI-X table BAR); both import it, it imports neither.

Not supported: expansion ROM BARs, memory BARs below 1 MiB (the "Type 01" encoding), I/O BARs above 64 KiB.
"""

import enum


class BarKind(enum.IntEnum):
    NONE = 0
    IO = 1
    MEM32 = 2
    MEM64 = 3
    MEM64_HI = 4    # the upper half of a MEM64 pair (bhyve's PCIBAR_MEMHI64)


IO = BarKind.IO
MEM32 = BarKind.MEM32
MEM64 = BarKind.MEM64


class Bar:
    __slots__ = ("kind", "size", "addr", "prefetch", "placed")

    def __init__(self, kind=BarKind.NONE, size=0, addr=0, prefetch=False):
        self.kind, self.size, self.addr, self.prefetch = kind, size, addr, prefetch
        self.placed = False     # given an address by the host or the guest; decoded only then

    def __repr__(self):
        return f"Bar({self.kind.name}, size={self.size:#x}, addr={self.addr:#x}, prefetch={self.prefetch})"


class BarWindow:
    """The :class:`~bhyve_devices.base.Device` the VM maps for one BAR (offsets relative to the BAR)."""

    def __init__(self, dev, idx):
        self.dev, self.idx = dev, idx

    def read(self, offset, size):
        return self.dev.bar_access_read(self.idx, offset, size)

    def write(self, offset, size, value):
        self.dev.bar_access_write(self.idx, offset, size, value)
