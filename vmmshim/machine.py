"""PCI devices (``-s``) and firmware tables (``-A`` ACPI, else the MP table unless ``-Y``) for a VM.

Filled in as the PCI host lands; until then a VM with ``-s`` devices is refused with a clear error.
"""

from .config import ConfigError


def build_pci_and_tables(vm, cfg, platform):
    slots = cfg.pci_slots()
    if slots:
        raise ConfigError("PCI devices (-s) are not wired into the VM yet")
    return None
