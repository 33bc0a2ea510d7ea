"""Virtio devices (bhyve's ``virtio.c`` and ``pci_virtio_*.c``): split virtqueues over guest memory
(:mod:`.virtqueue`), the device interface (:mod:`.device`), the transitional PCI transport (:mod:`.transport`) and
the devices: :mod:`.blk`, :mod:`.net`, :mod:`.rnd`, :mod:`.console`. See ``docs/porting.md`` for how a bhyve
device model maps onto these. Nothing here imports ``ops`` or ``vmmshim``.
"""

try:   # register the emulations by name when the PCI registry is there
    from . import pci as _pci  # noqa: F401
    from . import p9 as _p9  # noqa: F401
except ImportError as _e:
    if _e.name != "bhyve_devices.pci.registry":
        raise
