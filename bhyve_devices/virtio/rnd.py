"""virtio-rnd: the entropy device (VIRTIO 1.1 section 5.4; bhyve ``pci_virtio_rnd.c``), ``-s N,virtio-rnd``.

One queue (``requestq``) of device-writable buffers; each is filled from the host's entropy source and returned
with the number of bytes written. The source is the ``EntropySource`` the VM gives (``vmmshim/backends/rnd.py``:
``/dev/urandom`` read with ``os.readv`` straight into the guest buffers), or any ``source(n) -> bytes`` callable
(``os.urandom`` by default). A request
is served on the notifying vCPU, as bhyve does; at most ``max_request`` bytes (64 KiB) per buffer, so a guest
asking for a gigabyte does not stall its vCPU (the used length tells it how much it got).

A chain with device-readable buffers (5.4.6.1: the driver MUST NOT) is returned with length 0.
No configuration space, no feature bits.
"""

import os

from bhyve_devices.backends import EntropySource

from .device import VIRTIO_ID_RNG, VirtioDevice
from .virtqueue import scatter, split_segments


class VirtioRnd(VirtioDevice):
    name = "virtio-rnd"
    device_type = VIRTIO_ID_RNG
    num_queues = 1
    queue_size = 64
    max_request = 65536

    def __init__(self, source=None):
        super().__init__()
        self._source = source if source is not None else os.urandom

    def _fill(self, segs):
        if isinstance(self._source, EntropySource):
            try:
                return self._source.fill(segs) if segs else 0
            except OSError:
                return 0
        want = sum(len(m) for m in segs)
        return scatter(segs, self._source(want))

    def queue_notify(self, qidx, queue):
        served = 0
        while True:
            chain = queue.get_chain()
            if chain is None:
                break
            n = 0
            if not chain.readable:
                segs = split_segments(chain.writable, self.max_request)[0]
                n = self._fill(segs)
            queue.put_used(chain.head, n)
            served += 1
        if served:
            self.notify_used(queue, used_all_avail=True)

    def close(self):
        if isinstance(self._source, EntropySource):
            self._source.close()
