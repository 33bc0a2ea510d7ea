"""Virtio devices (bhyve's ``virtio.c`` and ``pci_virtio_*.c``): split virtqueues over guest memory
(:mod:`.virtqueue`), the device interface (:mod:`.device`), the transitional PCI transport (:mod:`.transport`) and
the devices: :mod:`.blk`, :mod:`.net`, :mod:`.rnd`, :mod:`.console`. See ``docs/porting.md`` for how a bhyve
device model maps onto these. Nothing here imports ``ops`` or ``vmmshim``.
"""
