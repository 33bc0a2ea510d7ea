"""The argument of ``KVM_X86_SET_MSR_FILTER`` (Linux KVM API 4.97, ``struct kvm_msr_filter``): which MSR accesses
KVM must not answer itself. With ``KVM_MSR_EXIT_REASON_FILTER`` enabled a denied access exits to userland
(``KVM_EXIT_X86_RDMSR``/``WRMSR``), where the ops layer answers it or raises #GP.

A range covers up to ``RANGE_MAX_MSRS`` MSRs from its base, for reads, writes or both; a set bit of its bitmap
allows the MSR, a clear bit denies it; an MSR no range covers is allowed (``KVM_MSR_FILTER_DEFAULT_ALLOW``). The
denied MSRs are grouped into as few ranges as fit, one per direction where the two bitmaps differ.

Not supported: more than ``KVM_MSR_FILTER_MAX_RANGES`` ranges (``E2BIG``), ``KVM_MSR_FILTER_DEFAULT_DENY``.
"""

import ctypes
import errno

from .. import api
from . import ioctls as K
from . import layouts as L

#: The most MSRs one range covers (KVM_MSR_FILTER_MAX_BITMAP_SIZE, 0x600 bytes of bitmap).
RANGE_MAX_MSRS = 0x600 * 8
#: KVM copies a bitmap in whole longs.
BITMAP_ALIGN = 8
BOTH = K.KVM_MSR_FILTER_READ | K.KVM_MSR_FILTER_WRITE


def windows(msrs):
    """``(first, last)`` spans of the sorted ``msrs``, each at most ``RANGE_MAX_MSRS`` wide."""
    out = []
    for m in msrs:
        if out and m - out[-1][0] < RANGE_MAX_MSRS:
            out[-1][1] = m
        else:
            out.append([m, m])
    return [tuple(w) for w in out]


def allow_bitmap(first, count, denied):
    """The bitmap of a range over ``[first, first + count)``: every bit set except the ``denied`` MSRs'."""
    size = -(-count // 8)
    size += -size % BITMAP_ALIGN
    bits = bytearray(b"\xff" * size)
    for m in denied:
        if first <= m < first + count:
            bits[(m - first) // 8] &= ~(1 << ((m - first) % 8))
    return bytes(bits)


def ranges(userland, reads, writes):
    """``[(flags, base, nmsrs, bitmap bytes)]``: ``userland`` ``(first, count)`` spans denied both ways, then
    ``reads`` denied to RDMSR and ``writes`` to WRMSR."""
    reads, writes = set(reads), set(writes)
    for first, count in userland:
        reads.update(range(first, first + count))
        writes.update(range(first, first + count))
    out = []
    for first, last in windows(sorted(reads | writes)):
        n = last - first + 1
        rd, wr = allow_bitmap(first, n, reads), allow_bitmap(first, n, writes)
        if rd == wr:
            out.append((BOTH, first, n, rd))
        else:
            out += [(K.KVM_MSR_FILTER_READ, first, n, rd), (K.KVM_MSR_FILTER_WRITE, first, n, wr)]
    return out


def build(userland, reads, writes):
    """``(argument bytes, bitmaps)``: keep the bitmaps alive until the ioctl has returned."""
    spans = ranges(userland, reads, writes)
    if len(spans) > K.KVM_MSR_FILTER_MAX_RANGES:
        raise api.nvmm_error(errno.E2BIG, f"the MSR filter needs {len(spans)} ranges")
    bitmaps, entries = [], []
    for flags, base, n, bits in spans:
        bitmap = ctypes.create_string_buffer(bits, len(bits))
        bitmaps.append(bitmap)
        entries.append(dict(flags=flags, nmsrs=n, base=base, bitmap=ctypes.addressof(bitmap)))
    entries += [dict(flags=0, nmsrs=0, base=0, bitmap=0)] * (K.KVM_MSR_FILTER_MAX_RANGES - len(entries))
    return L.KVM_MSR_FILTER.build(dict(flags=K.KVM_MSR_FILTER_DEFAULT_ALLOW, ranges=entries)), bitmaps
