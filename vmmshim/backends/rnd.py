"""virtio-rnd's host side: the host's ``/dev/urandom`` (bhyve's ``pci_virtio_rnd.c`` opens ``/dev/random``, which
on FreeBSD never blocks once seeded; on Linux ``/dev/urandom`` is that device), read with ``readv`` straight into
the guest's buffers.

Not supported: a rate limit, another entropy device (``egd``).
"""

import os

URANDOM = "/dev/urandom"


class UrandomSource:
    """An ``EntropySource`` (``bhyve_devices/backends.py``) over ``/dev/urandom``."""

    def __init__(self, path=URANDOM):
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def fill(self, segs):
        return os.readv(self._fd, segs)

    def close(self):
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
