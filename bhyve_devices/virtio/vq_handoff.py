"""The hand-offs of a :class:`~bhyve_devices.virtio.virtqueue.Virtqueue` to a device's compiled path (a mixin):
a lone INDIRECT chain popped for a compiled request (:meth:`VirtqueueHandoff.take_indirect`, virtio-blk's and
virtio-9p's), and the rings' addresses and indices for a compiled pass that serves them itself and reports back
(:meth:`VirtqueueHandoff.ring_state`, :meth:`VirtqueueHandoff.advance`: virtio-9p's queue pass). VIRTIO 1.1
sections 2.6.5.3 (indirect descriptors) and 2.6.6 (the available ring). Every guest value read here is checked
as in the queue's own walk.

Not supported: chains of several descriptors or a table outside the memory's first RAM area (the queue's own
:meth:`~bhyve_devices.virtio.virtqueue.Virtqueue.get_chain` serves those).
"""

import struct

from .vring import DESC_FMT as _DESC, DESC_SIZE, MAX_QUEUE_SIZE, U16_FMT as _U16, VIRTQ_DESC_F_INDIRECT

#: what a bad guest value raises while a ring is read (turned into "not this chain" or a broken queue)
GUEST_ERRORS = (OSError, ValueError, OverflowError, IndexError, TypeError, struct.error)


class VirtqueueHandoff:
    """Expects the queue's ``usable``, ``indirect``, ``mem``, ``last_avail``, ``used_idx``, ``size``, ``chains``,
    ring addresses and views, ``event_idx``, ``_avail_idx`` and ``_popped``."""

    def take_indirect(self):
        """Pops the next available chain if it is a lone INDIRECT descriptor whose table lies in the memory's
        first RAM area (``GuestMemory.ram``): returns ``(head, table_address, entries)`` for a device that serves
        such a table itself (virtio-blk's compiled request), which then returns it with :meth:`put_used`, or
        gives it back with :meth:`unget` for :meth:`get_chain` to walk. Returns None, and pops nothing, for any
        other chain or an empty ring (whose problems :meth:`get_chain` then reports)."""
        if not self.usable or not self.indirect:
            return None
        ram = getattr(self.mem, "ram", None)
        if ram is None:
            return None
        try:
            last = self.last_avail
            size = self.size
            pending = (self._avail_idx() - last) & 0xFFFF
            if pending == 0 or pending > size:
                return None
            head = _U16.unpack_from(self._avail, 4 + 2 * (last % size))[0]
            if head >= size:
                return None
            addr, length, flags, _ = _DESC.unpack_from(self._desc, DESC_SIZE * head)
        except GUEST_ERRORS:
            return None
        if flags != VIRTQ_DESC_F_INDIRECT or not length or length % DESC_SIZE or addr + length > len(ram):
            return None
        tsize = length // DESC_SIZE
        if tsize > MAX_QUEUE_SIZE:
            return None
        self._popped(last)
        return head, addr, tsize

    def ring_state(self):
        """``(desc_addr, avail_addr, used_addr, size, last_avail, used_idx, event_idx)`` for a device whose
        compiled pass serves the rings itself (lone INDIRECT chains in the memory's first RAM area, as
        :meth:`take_indirect` returns them) and then reports with :meth:`advance`; None when the queue is not
        usable, has no indirect descriptors or the memory no ``ram``."""
        if not self.usable or not self.indirect or getattr(self.mem, "ram", None) is None:
            return None
        return (self.desc_addr, self.avail_addr, self.used_addr, self.size, self.last_avail, self.used_idx,
                1 if self.event_idx else 0)

    def advance(self, n, last_avail, used_idx):
        """A compiled pass took ``n`` chains and put them in the used ring (its index and ``avail_event``
        written): the queue goes on from ``last_avail`` and ``used_idx``."""
        self.last_avail, self.used_idx = last_avail & 0xFFFF, used_idx & 0xFFFF
        self.chains += n
