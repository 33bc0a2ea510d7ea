"""Split virtqueues (VIRTIO 1.1 section 2.6) over guest memory, the device side.

A :class:`Virtqueue` is the device's view of one queue: the descriptor table, the available ring (the driver
area) and the used ring (the device area), each a memoryview straight into guest RAM obtained once through
``GuestMemory.view`` when the queue is enabled. :meth:`Virtqueue.get_chain` pops the next available descriptor
chain and returns a :class:`Chain` whose ``readable`` and ``writable`` lists are memoryviews of the guest buffers
(no copy: ``os.preadv(fd, chain.writable, off)`` reads a disk straight into guest RAM);
:meth:`Virtqueue.put_used` returns it with the number of bytes written; :meth:`Virtqueue.needs_notify` says
whether the driver wants an interrupt now (``VRING_AVAIL_F_NO_INTERRUPT`` or, with ``VIRTIO_F_EVENT_IDX``,
``used_event``, section 2.6.7.2). With EVENT_IDX the queue publishes ``avail_event`` (the index it will look at
next) every time it finds the ring empty, so the driver notifies exactly when there is new work (2.6.8.2).

Mapping onto bhyve's ``virtio.c``: ``vq_getchain`` -> :meth:`get_chain`, ``vq_relchain`` -> :meth:`put_used`,
``vq_endchains`` -> :meth:`needs_notify` (then the transport's interrupt), ``vq_retchains`` -> :meth:`unget`,
``vq_has_descs`` -> :meth:`has_chain`.

Every value the guest supplies is checked before use, and read exactly once (each descriptor is unpacked into
locals, so a driver changing the ring under us cannot make a checked value unchecked):

- the avail index may be at most ``size`` ahead of the device's ``last_avail`` (more is a bad index);
- a head or ``next`` index must be below the table size (``size``, or the entry count of an indirect table);
- a chain may hold at most ``size`` descriptors (direct) or table-size descriptors (indirect): a longer chain,
  which is what a loop looks like, is rejected;
- an INDIRECT descriptor needs ``VIRTIO_RING_F_INDIRECT_DESC``, a non-zero length that is a multiple of 16 and
  no NEXT flag (2.6.5.3.1); an INDIRECT flag inside an indirect table is an error;
- a device-readable descriptor after a device-writable one is an error (2.6.4.2);
- every buffer address/length and the rings themselves must lie in guest RAM (``GuestMemory.view`` raises
  ``OSError(EFAULT)`` otherwise);
- the queue size must be a power of two between 1 and 32768 and the rings suitably aligned (2.6).

Any violation is reported once through ``on_error(message)`` (the transport sets DEVICE_NEEDS_RESET and raises a
configuration interrupt, 2.1.2) and the queue is *broken*: it serves nothing until the driver resets the device.
No exception leaves :meth:`get_chain`, :meth:`put_used` or :meth:`needs_notify`.

Layouts are declared with construct (:data:`VIRTQ_DESC`, :data:`VIRTQ_AVAIL_HDR`, :data:`VIRTQ_USED_ELEM`...)
and the hot path uses ``struct`` formats of the same sizes (checked by the unit tests); both live in
:mod:`bhyve_devices.virtio.vring`. :class:`Chain` and the segment helpers live in :mod:`bhyve_devices.virtio.chain`,
with the check of an indirect table in the order Linux writes it, sliced with whole-list operations
(:func:`_indirect_in_order`) because a 1 MiB request's table of 258 entries walked one Python step per entry
was a visible part of the request in the nested lab (docs/lab.md, "Serving at HLT"). Every one of those names is
importable from here. The hand-offs to a device's compiled path (a lone INDIRECT chain popped, the rings' state
for a compiled pass and its report back) are :mod:`bhyve_devices.virtio.vq_handoff`'s.

Snapshot (:mod:`bhyve_devices.snapshot`): :meth:`Virtqueue.snapshot_state` / :meth:`Virtqueue.restore_state` save
the queue's configuration (size, ring addresses, ready, MSI-X vector, the negotiated ring features), its progress
(``last_avail``, ``used_idx``, ``signalled_used``; ``avail_event`` and ``used_event`` live in guest memory) and
whether the driver broke it; a ready queue maps its rings again at restore and goes on from the saved indices.

Not supported: the packed virtqueue (2.7), ``VIRTIO_F_IN_ORDER``, a descriptor chain split over more than one
indirect table.
"""

from bhyve_devices.snapshot import SnapshotError, int_in

from .chain import Chain, gather, scatter, split_segments, split_tail  # noqa: F401 (re-exported)
from .chain import indirect_in_order as _indirect_in_order
from .vring import (DESC_SIZE, LEGACY_ALIGN, MAX_QUEUE_SIZE, VIRTIO_F_NOTIFY_ON_EMPTY,  # noqa: F401 (re-exported)
                    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_AVAIL_HDR,
                    VIRTQ_DESC, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_USED_ELEM,
                    VIRTQ_USED_F_NO_NOTIFY, VIRTQ_USED_HDR, avail_ring, avail_size, full_fence, legacy_layout,
                    need_event, used_ring, used_size)
from .vring import DESC_FMT as _DESC, ELEM_FMT as _ELEM, U16_FMT as _U16

from .vq_handoff import GUEST_ERRORS as _GUEST_ERRORS, VirtqueueHandoff


class VirtqueueError(Exception):
    """A driver error in a queue (internal; never raised out of the public methods)."""


class Virtqueue(VirtqueueHandoff):
    """The device side of one split virtqueue.

    The transport owns the queue object for the whole life of the device: it sets ``size`` (at most
    ``max_size``), the three ring addresses and ``msix_vector``, calls :meth:`enable` (modern ``queue_enable`` or
    a legacy PFN write) and :meth:`reset`. ``on_error(msg)`` is called once when the driver breaks the queue.
    A queue is used by one thread at a time (the vCPU that notified, or the device's worker).
    """

    def __init__(self, mem, index, max_size, on_error=None):
        if not 1 <= max_size <= MAX_QUEUE_SIZE or max_size & (max_size - 1):
            raise ValueError(f"queue size {max_size} is not a power of two in [1, 32768]")
        self.mem = mem
        self.index = index
        self.max_size = max_size
        self.on_error = on_error
        self.msix_vector = 0xFFFF
        self.reset()

    # ---- configuration (transport) ------------------------------------------------------------------------------
    def reset(self):
        self.size = self.max_size
        self.desc_addr = self.avail_addr = self.used_addr = 0
        self.ready = False
        self.broken = False
        self.error = None
        self.event_idx = False
        self.indirect = False
        self.notify_on_empty = False
        self.last_avail = 0
        self.used_idx = 0
        self.signalled_used = 0
        self.msix_vector = 0xFFFF
        self._desc = self._avail = self._used = None
        self.chains = 0

    def set_features(self, features):
        self.event_idx = bool(features >> VIRTIO_RING_F_EVENT_IDX & 1)
        self.indirect = bool(features >> VIRTIO_RING_F_INDIRECT_DESC & 1)
        self.notify_on_empty = bool(features >> VIRTIO_F_NOTIFY_ON_EMPTY & 1)

    def enable(self):
        """Maps the rings (``size`` and the addresses are set); returns False (and reports) if they are bad."""
        self.ready = False
        size = self.size
        try:
            if not 1 <= size <= MAX_QUEUE_SIZE or size & (size - 1):
                raise VirtqueueError(f"queue size {size} is not a power of two in [1, 32768]")
            if self.mem is None:
                raise VirtqueueError("no guest memory attached")
            if self.desc_addr & 15 or self.avail_addr & 1 or self.used_addr & 3:
                raise VirtqueueError("misaligned ring addresses "
                                     f"{self.desc_addr:#x}/{self.avail_addr:#x}/{self.used_addr:#x}")
            self._desc = self.mem.view(self.desc_addr, DESC_SIZE * size)
            self._avail = self.mem.view(self.avail_addr, avail_size(size))
            self._used = self.mem.view(self.used_addr, used_size(size))
        except (VirtqueueError,) + _GUEST_ERRORS as exc:
            self._desc = self._avail = self._used = None
            self._fail(f"cannot map the rings: {exc}")
            return False
        self.ready = True
        self.broken = False
        self.last_avail = self.used_idx = self.signalled_used = 0
        return True

    def enable_legacy(self, pfn, align=LEGACY_ALIGN):
        self.size = self.max_size
        self.desc_addr, self.avail_addr, self.used_addr = legacy_layout(pfn, self.size, align)
        return self.enable()

    SNAP_INTS = ("size", "desc_addr", "avail_addr", "used_addr", "last_avail", "used_idx", "signalled_used",
                 "msix_vector")
    SNAP_BOOLS = ("ready", "broken", "event_idx", "indirect", "notify_on_empty")

    def snapshot_state(self):
        s = {n: getattr(self, n) for n in self.SNAP_INTS + self.SNAP_BOOLS}
        s["error"] = self.error
        return s

    def restore_state(self, s):
        """Takes :meth:`snapshot_state`'s dict into a reset queue (SnapshotError when it does not fit)."""
        where = f"queue {self.index}"
        if not isinstance(s, dict):
            raise SnapshotError(f"{where}: not a saved queue")
        for n in self.SNAP_INTS + self.SNAP_BOOLS + ("error",):
            if n not in s:
                raise SnapshotError(f"{where}: no {n}")
        limit = dict(desc_addr=1 << 64, avail_addr=1 << 64, used_addr=1 << 64)
        for n in self.SNAP_INTS:
            v = s[n]
            if not int_in(v, 0, limit.get(n, 1 << 16) - 1):
                raise SnapshotError(f"{where}: {n} = {v!r:.40}")
        for n in self.SNAP_BOOLS:
            if not isinstance(s[n], bool):
                raise SnapshotError(f"{where}: {n} = {s[n]!r:.40}")
        if not isinstance(s["error"], (str, type(None))):
            raise SnapshotError(f"{where}: error = {s['error']!r:.40}")
        size = s["size"]
        if s["ready"] and (not 1 <= size <= self.max_size or size & (size - 1)):
            raise SnapshotError(f"{where}: size {size} (at most {self.max_size}, a power of two)")
        views = None
        if s["ready"]:
            if self.mem is None:
                raise SnapshotError(f"{where}: no guest memory attached")
            try:
                views = (self.mem.view(s["desc_addr"], DESC_SIZE * size),
                         self.mem.view(s["avail_addr"], avail_size(size)),
                         self.mem.view(s["used_addr"], used_size(size)))
            except _GUEST_ERRORS as exc:
                raise SnapshotError(f"{where}: cannot map the rings: {exc}") from exc
        for n in self.SNAP_INTS + self.SNAP_BOOLS + ("error",):
            setattr(self, n, s[n])
        self._desc, self._avail, self._used = views or (None, None, None)

    def disable(self):
        self.ready = False
        self._desc = self._avail = self._used = None

    @property
    def usable(self):
        return self.ready and not self.broken

    def _fail(self, msg):
        self.broken = True
        if self.error is None:
            self.error = f"queue {self.index}: {msg}"
            if self.on_error is not None:
                try:
                    self.on_error(self.error)
                except Exception:  # the transport's problem; never out of a queue operation
                    pass

    # ---- device side ----------------------------------------------------------------------------------------------
    def _avail_idx(self):
        return _U16.unpack_from(self._avail, 2)[0]

    def has_chain(self):
        """Whether the driver has made a chain available that :meth:`get_chain` has not returned yet."""
        if not self.usable:
            return False
        try:
            return self._avail_idx() != self.last_avail
        except _GUEST_ERRORS:
            return False

    def avail_index(self):
        """The driver's avail index now (None when the queue is not usable or its ring cannot be read)."""
        if not self.usable:
            return None
        try:
            return self._avail_idx()
        except _GUEST_ERRORS:
            return None

    def ask_for_more(self, seen):
        """A device that needs more chains than are posted (virtio-net holding a frame for mergeable buffers): with
        EVENT_IDX ``avail_event`` becomes ``seen`` (the avail index it looked at), so the driver's next chain
        notifies. Returns whether chains came meanwhile (look again before waiting)."""
        if not self.usable or not self.event_idx:
            return False
        try:
            _U16.pack_into(self._used, 4 + 8 * self.size, seen)
            full_fence()
            return self._avail_idx() != seen
        except _GUEST_ERRORS:
            return False

    def _publish_avail_event(self):
        if self.event_idx:
            _U16.pack_into(self._used, 4 + 8 * self.size, self.last_avail)

    def get_chain(self):
        """Pops the next available chain, or returns None (ring empty, queue not ready, or broken: see
        ``broken``/``error``). With EVENT_IDX an empty ring publishes ``avail_event`` and is checked again."""
        if not self.usable:
            return None
        try:
            return self._get_chain()
        except VirtqueueError as exc:
            self._fail(str(exc))
        except _GUEST_ERRORS as exc:
            self._fail(f"guest memory: {exc}")
        except Exception as exc:  # defensive: a device must never raise on a guest's rings
            self._fail(f"internal error: {exc!r}")
        return None

    def _get_chain(self):
        size = self.size
        last = self.last_avail
        idx = self._avail_idx()
        pending = (idx - last) & 0xFFFF
        if pending == 0:
            if not self.event_idx:
                return None
            self._publish_avail_event()
            full_fence()
            idx = self._avail_idx()
            pending = (idx - last) & 0xFFFF
            if pending == 0:
                return None
        if pending > size:
            raise VirtqueueError(f"avail index {idx} is {pending} ahead of {last} (queue size {size})")
        head = _U16.unpack_from(self._avail, 4 + 2 * (last % size))[0]
        if head >= size:
            raise VirtqueueError(f"avail ring entry {last % size}: head {head} >= queue size {size}")
        chain = self._walk(head)
        self._popped(last)
        return chain

    def _popped(self, last):
        """The chain at ring index ``last`` is taken: the next index, and ``avail_event`` with EVENT_IDX."""
        self.last_avail = (last + 1) & 0xFFFF
        self.chains += 1
        if self.event_idx:
            self._publish_avail_event()

    def _walk(self, head):
        """The chain from ``head``: the direct table, then at most one indirect table. The hot loop slices the
        memory's first RAM area (``GuestMemory.ram``, when it has one) itself instead of calling ``view`` per
        descriptor: a 1 MiB block request is 256 descriptors."""
        mem = self.mem
        table = self._desc
        tsize = self.size
        readable = []
        writable = []
        ram = getattr(mem, "ram", None)
        ram_end = len(ram) if ram is not None else -1
        view = mem.view
        unpack = _DESC.unpack_from
        n = 0
        i = head
        in_indirect = False
        while True:
            addr, length, flags, nxt = unpack(table, DESC_SIZE * i)
            n += 1
            if flags & VIRTQ_DESC_F_INDIRECT:
                if in_indirect:
                    raise VirtqueueError(f"descriptor {i}: INDIRECT inside an indirect table")
                if not self.indirect:
                    raise VirtqueueError(f"descriptor {i}: INDIRECT without VIRTIO_RING_F_INDIRECT_DESC")
                if flags & VIRTQ_DESC_F_NEXT:
                    raise VirtqueueError(f"descriptor {i}: INDIRECT with NEXT")
                if length == 0 or length % DESC_SIZE:
                    raise VirtqueueError(f"descriptor {i}: indirect table length {length}")
                tsize = length // DESC_SIZE
                if tsize > MAX_QUEUE_SIZE:
                    raise VirtqueueError(f"descriptor {i}: indirect table of {tsize} entries")
                table = view(addr, length)
                if ram is not None and not readable and not writable:
                    fast = _indirect_in_order(table, tsize, ram, ram_end)
                    if fast is not None:
                        return Chain(head, *fast)
                in_indirect = True
                n = 0
                i = 0
                continue
            if n > tsize:
                raise VirtqueueError(f"chain from head {head} is longer than its table ({tsize}): a loop?")
            end = addr + length
            buf = ram[addr:end] if end <= ram_end else view(addr, length)
            if flags & VIRTQ_DESC_F_WRITE:
                writable.append(buf)
            elif writable:
                raise VirtqueueError(f"chain from head {head}: readable descriptor after a writable one")
            else:
                readable.append(buf)
            if not flags & VIRTQ_DESC_F_NEXT:
                return Chain(head, readable, writable)
            if nxt >= tsize:
                raise VirtqueueError(f"descriptor {i}: next {nxt} >= table size {tsize}")
            i = nxt

    def unget(self, n=1):
        """Gives back the last ``n`` chains returned by :meth:`get_chain` (bhyve's ``vq_retchains``): they will
        be returned again. Used by a receive path that found too little buffer space."""
        self.last_avail = (self.last_avail - n) & 0xFFFF
        self.chains -= n

    def put_used(self, head, written_len):
        """Returns chain ``head`` with ``written_len`` bytes written into its writable part."""
        if not self.usable:
            return
        try:
            size = self.size
            slot = self.used_idx % size
            _ELEM.pack_into(self._used, 4 + 8 * slot, head & 0xFFFFFFFF, written_len & 0xFFFFFFFF)
            self.used_idx = (self.used_idx + 1) & 0xFFFF
            _U16.pack_into(self._used, 2, self.used_idx)
        except Exception as exc:
            self._fail(f"cannot write the used ring: {exc!r}")

    def needs_notify(self, used_all_avail=False):
        """Whether the driver wants an interrupt for the chains put since the last call (bhyve ``vq_endchains``).
        Call once after a batch of :meth:`put_used`; a True answer is consumed (the transport then interrupts)."""
        if not self.usable:
            return False
        try:
            old = self.signalled_used
            new = self.used_idx
            self.signalled_used = new
            full_fence()        # the used index stored by put_used before used_event / flags are read
            if self.event_idx:
                if new == old:
                    return False
                used_event = _U16.unpack_from(self._avail, 4 + 2 * self.size)[0]
                return need_event(used_event, new, old)
            if new == old and not used_all_avail:
                return False
            if self.notify_on_empty and used_all_avail and self._avail_idx() == self.last_avail:
                return True
            return not _U16.unpack_from(self._avail, 0)[0] & VIRTQ_AVAIL_F_NO_INTERRUPT
        except Exception as exc:
            self._fail(f"cannot read the avail ring: {exc!r}")
            return False

    def suppress_notifications(self, suppress):
        """Sets or clears VIRTQ_USED_F_NO_NOTIFY (only meaningful without EVENT_IDX; a hint to the driver)."""
        if self.usable and not self.event_idx:
            try:
                _U16.pack_into(self._used, 0, VIRTQ_USED_F_NO_NOTIFY if suppress else 0)
            except Exception:
                pass
