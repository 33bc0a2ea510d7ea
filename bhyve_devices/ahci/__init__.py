"""AHCI (Serial ATA AHCI 1.3.1) with disks and a CD/DVD drive: bhyve's ``pci_ahci.c`` as ``ahci``, ``ahci-hd`` and
``ahci-cd`` (registered with :mod:`bhyve_devices.pci.registry` on import).

- :mod:`.layouts`: the registers, command list, command table, PRDT and FIS layouts (``construct``) and the
  ``struct`` formats the command path uses;
- :mod:`.hba`: the generic host control registers and the interrupts; :mod:`.port`: a port's registers and its
  command engine (command slots, NCQ, FISes; a thread per port); :mod:`.command`: one fetched command and its
  data buffers in guest memory;
- :mod:`.ata` and :mod:`.identify`: the disk's ATA commands; :mod:`.atapi`: the CD's ATAPI and SCSI/MMC commands;
- :mod:`.options`: the ports from bhyve's options; :mod:`.pci`: the PCI function; :mod:`.snap`: the HBA's state
  in a checkpoint (issue 23);
- :mod:`.testdriver`: a guest-side driver for tests (it programs the HBA as a guest's driver does).

Not supported: what each module lists; in short port multipliers, FIS-based switching, hot plug, power management
states, writable optical media, MSI-X.
"""

from . import pci  # noqa: F401  (registers the emulations)
