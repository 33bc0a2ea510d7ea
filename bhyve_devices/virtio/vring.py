"""The split virtqueue's layouts in guest memory (VIRTIO 1.1 section 2.6), and the fence its handshakes need.

VIRTIO 1.1: 2.6.2 "Legacy Interfaces: A Note on Virtqueue Layout" (:func:`legacy_layout`, the 4 KiB alignment of
virtio 0.9.5's ``vring_init``), 2.6.5 "The Virtqueue Descriptor Table" (:data:`VIRTQ_DESC`, 16 bytes), 2.6.6 "The
Virtqueue Available Ring" (:func:`avail_ring`, ``used_event`` trailing), 2.6.8 "The Virtqueue Used Ring"
(:func:`used_ring`, ``avail_event`` trailing), 2.6.7 and 2.6.10 the notification suppression
(:func:`need_event`, bhyve's and Linux's ``vring_need_event``; :func:`full_fence`). The construct layouts document
and round-trip the structures; the device's hot path uses the ``struct`` formats of the same sizes
(:data:`DESC_FMT`, :data:`U16_FMT`, :data:`ELEM_FMT`). :mod:`bhyve_devices.virtio.virtqueue` imports all of it
and keeps every name importable from there.

Not supported: the packed virtqueue (2.7, ``VIRTIO_F_RING_PACKED``), ``VIRTIO_F_IN_ORDER``, legacy alignments other
than a power of two.
"""

import struct
import threading

from construct import Array, Int16ul, Int32ul, Int64ul, Struct

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

VIRTIO_F_NOTIFY_ON_EMPTY = 24
VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29

MAX_QUEUE_SIZE = 32768
LEGACY_ALIGN = 4096

# ---- layouts (construct) -----------------------------------------------------------------------------------------
VIRTQ_DESC = Struct("addr" / Int64ul, "len" / Int32ul, "flags" / Int16ul, "next" / Int16ul)
VIRTQ_AVAIL_HDR = Struct("flags" / Int16ul, "idx" / Int16ul)
VIRTQ_USED_HDR = Struct("flags" / Int16ul, "idx" / Int16ul)
VIRTQ_USED_ELEM = Struct("id" / Int32ul, "len" / Int32ul)


def avail_ring(size):
    """The whole driver area of a queue of ``size`` entries (``used_event`` is the trailing field)."""
    return Struct("flags" / Int16ul, "idx" / Int16ul, "ring" / Array(size, Int16ul), "used_event" / Int16ul)


def used_ring(size):
    """The whole device area of a queue of ``size`` entries (``avail_event`` is the trailing field)."""
    return Struct("flags" / Int16ul, "idx" / Int16ul, "ring" / Array(size, VIRTQ_USED_ELEM),
                  "avail_event" / Int16ul)


# ---- hot-path formats (the same sizes as the construct layouts) ---------------------------------------------------
DESC_FMT = struct.Struct("<QIHH")       # VIRTQ_DESC
U16_FMT = struct.Struct("<H")           # an index, a flags word, an avail ring entry
ELEM_FMT = struct.Struct("<II")         # VIRTQ_USED_ELEM
DESC_SIZE = DESC_FMT.size


def avail_size(size):
    return 6 + 2 * size


def used_size(size):
    return 6 + 8 * size


def legacy_layout(pfn, size, align=LEGACY_ALIGN):
    """(desc, avail, used) guest addresses of a legacy queue at page frame ``pfn`` (virtio 0.9.5 vring_init)."""
    desc = pfn * align
    avail = desc + DESC_SIZE * size
    used = (avail + avail_size(size) + align - 1) & ~(align - 1)
    return desc, avail, used


def need_event(event, new, old):
    """vring_need_event: whether moving the index from ``old`` to ``new`` crosses ``event`` (all mod 2**16)."""
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


_FENCE = threading.Lock()


def full_fence():
    """A full memory barrier between this thread's stores to guest memory and its next loads (bhyve's
    ``atomic_thread_fence_seq_cst``, QEMU's ``smp_mb``): x86 lets a load pass an earlier store to another
    address, and both notification-suppression handshakes (2.6.7, 2.6.10) are store-then-load on each side --
    the device stores the used index (or ``avail_event``) then loads ``used_event``/flags (or the avail index),
    the driver the reverse. Without it both may read the old value: the device skips an interrupt the driver
    waits for (or misses a request it was not kicked for). Taking an uncontended lock does it: the lock's
    atomic read-modify-write (LOCK-prefixed on x86) drains the store buffer."""
    with _FENCE:
        pass
