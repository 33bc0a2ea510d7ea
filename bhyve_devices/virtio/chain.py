"""Descriptor chains as a device sees them (VIRTIO 1.1 sections 2.6.4 and 2.6.5): the :class:`Chain` a virtqueue
hands out, helpers over its lists of guest-memory segments, and the whole-list check of an indirect table.

VIRTIO 1.1 2.6.4 "Message Framing": a device makes no assumption about how a message is split across
descriptors, so device code works on lists of memoryviews (:func:`split_segments`, :func:`split_tail`,
:func:`scatter`, :func:`gather`) rather than on descriptors. 2.6.4.2: readable descriptors come before writable
ones. 2.6.5.3 "Indirect Descriptors": :func:`indirect_in_order` recognises the table Linux builds (entry ``i``
chained to ``i + 1``, readable then writable, the last without NEXT) and slices it with whole-list operations
instead of a Python step per descriptor (docs/lab.md, "Serving at HLT", has what the walk cost per request);
any other table goes back to the entry-by-entry walk of :meth:`bhyve_devices.virtio.virtqueue.Virtqueue.get_chain`,
which checks and reports it. Every name stays importable from :mod:`bhyve_devices.virtio.virtqueue`.

Not supported: chains whose buffers are not in guest RAM as one host mapping per segment (each segment is one
memoryview), copying helpers that skip into the middle of a segment list without splitting it first.
"""

import operator
from bisect import bisect_left
from itertools import accumulate

from .vring import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE

_NEXT_ONLY, _NEXT_WRITE = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE
_SUCCESSORS = {}        # table size -> [1, 2, ..., size - 1]: the ``next`` fields of a table walked in order


def indirect_in_order(table, tsize, ram, ram_end):
    """The common indirect table (what Linux builds): entry ``i`` chains to ``i + 1``, readable entries then
    writable ones, the last without NEXT, every buffer in ``ram``. Checked and sliced with whole-list
    operations (the table's fields read as strided arrays) instead of a Python step per descriptor (a 1 MiB
    block request is 258 of them): returns ``(readable, writable)``, or None for any other table, which the
    general walk then checks entry by entry (and reports, if it is bad)."""
    u16 = table.cast("H")
    flags = u16[6::8].tolist()                  # VIRTQ_DESC: addr u64, len u32, flags u16, next u16
    last = tsize - 1
    tail = flags[last]
    try:
        nread = flags.index(_NEXT_WRITE)
    except ValueError:
        nread = last
    if tail == VIRTQ_DESC_F_WRITE:
        expect = [_NEXT_ONLY] * nread + [_NEXT_WRITE] * (last - nread) + [tail]
    elif tail == 0 and nread == last:
        expect, nread = [_NEXT_ONLY] * last + [0], tsize
    else:
        return None
    succ = _SUCCESSORS.get(tsize)
    if succ is None:
        succ = _SUCCESSORS[tsize] = list(range(1, tsize))
    if flags != expect or u16[7:8 * last:8].tolist() != succ:
        return None
    addrs = table.cast("Q")[0::2].tolist()
    ends = list(map(operator.add, addrs, table.cast("I")[2::4].tolist()))
    if max(ends) > ram_end:
        return None
    views = [ram[a:e] for a, e in zip(addrs, ends)]
    return views[:nread], views[nread:]


class Chain:
    """One descriptor chain: ``head`` (the index to hand back to :meth:`Virtqueue.put_used`), ``readable`` and
    ``writable`` (lists of memoryviews into guest RAM, in chain order)."""

    __slots__ = ("head", "readable", "writable")

    def __init__(self, head, readable, writable):
        self.head = head
        self.readable = readable
        self.writable = writable

    @property
    def readable_len(self):
        return sum(len(m) for m in self.readable)

    @property
    def writable_len(self):
        return sum(len(m) for m in self.writable)

    def read_bytes(self, limit=None):
        """The readable bytes (a copy; for small headers and tests), at most ``limit``."""
        segs = self.readable if limit is None else split_segments(self.readable, limit)[0]
        return b"".join(bytes(m) for m in segs)

    def write_bytes(self, data):
        """Scatters ``data`` over the writable segments; returns how many bytes fitted."""
        return scatter(self.writable, data)

    def __repr__(self):
        return (f"Chain(head={self.head}, readable={[len(m) for m in self.readable]}, "
                f"writable={[len(m) for m in self.writable]})")


def split_segments(segs, n):
    """Splits a list of memoryviews after ``n`` bytes: ``(first, rest)`` (views of views, no copy). ``first``
    holds fewer than ``n`` bytes if the segments are shorter. Found with whole-list operations (running lengths,
    a bisection), not a Python step per segment: a 512 KiB 9P read is a hundred segments, split twice."""
    segs = segs if isinstance(segs, list) else list(segs)
    if n <= 0 or not segs:
        return [], segs
    m = segs[0]
    k = len(m)
    if n <= k:                          # within the first segment: a request's header, mostly
        return ([m], segs[1:]) if n == k else ([m[:n]], [m[n:]] + segs[1:])
    ends = list(accumulate(map(len, segs)))
    i = bisect_left(ends, n)            # the segment in which byte n - 1 lies
    if i == len(segs):
        return segs, []
    over = ends[i] - n                  # its bytes past the split
    if over == 0:
        return segs[:i + 1], segs[i + 1:]
    m = segs[i]
    cut = len(m) - over
    return segs[:i] + [m[:cut]], [m[cut:]] + segs[i + 1:]


def split_tail(segs, n):
    """Splits off the last ``n`` bytes: ``(head_segs, tail_segs)``."""
    total = sum(len(m) for m in segs)
    return split_segments(segs, max(total - n, 0))


def scatter(segs, data):
    """Copies ``data`` into the segments in order; returns the number of bytes copied."""
    data = memoryview(data).cast("B") if not isinstance(data, memoryview) else data.cast("B")
    done = 0
    for m in segs:
        if done >= len(data):
            break
        k = min(len(m), len(data) - done)
        m[:k] = data[done:done + k]
        done += k
    return done


def gather(segs, limit=None):
    """Concatenates the segments (a copy), at most ``limit`` bytes."""
    if limit is not None:
        segs = split_segments(segs, limit)[0]
    return b"".join(bytes(m) for m in segs)
