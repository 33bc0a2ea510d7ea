"""PCI emulation (bhyve's ``pci_emul.c`` family): configuration space, BARs, MSI/MSI-X, INTx routing, the bus-0
host (mechanism 1 and ECAM), ``hostbridge``/``amd_hostbridge``/``lpc`` and the emulation-name registry.

Modules: :mod:`.config` (layouts), :mod:`.bar` (BAR kinds), :mod:`.device` (:class:`PciDevice`), :mod:`.msi`,
:mod:`.host` (:class:`PciHost`), :mod:`.hostbridge`, :mod:`.lpc`, :mod:`.registry`. Nothing here imports ``ops``
or ``vmmshim``.
"""

from bhyve_devices.pci.bar import IO, MEM32, MEM64, Bar, BarKind
from bhyve_devices.pci.device import PciDevice

__all__ = ["IO", "MEM32", "MEM64", "Bar", "BarKind", "PciDevice"]
