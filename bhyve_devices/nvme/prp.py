"""A command's data pointer as buffers in guest RAM (NVM Express Base Specification 1.4, 4.3 Physical Region Page
entry and list, 4.4 Scatter Gather List).

:func:`data_buffers` turns the DPTR of a submission entry (PRP1/PRP2, or the first SGL descriptor in the same 16
bytes) and the transfer length into a list of memoryviews of guest RAM, ready for ``preadv``/``pwritev``; pages that
follow each other in guest-physical memory become one buffer. Everything the guest gave is read once and checked; a
PRP list is checked and sliced with whole-list operations (:func:`_list_views`); what breaks the rules raises
:class:`~bhyve_devices.nvme.regs.NvmeError` with the status the specification names:

- PRPs (4.3): PRP1 dword aligned, every later entry page aligned, a list pointer qword aligned (PRP Offset
  Invalid); a list fills its page and its last entry points to the next list page when more entries follow (as
  Linux's ``nvme_pci_setup_prps`` chains them); an entry or list outside guest RAM: Data Transfer Error.
- SGLs (4.4): Data Block descriptors (address subtype), Segment and Last Segment descriptors (a Segment only as
  the last descriptor of a segment, none inside a Last Segment: Invalid SGL Segment Descriptor; a segment length
  that is not a multiple of 16: Invalid Number of SGL Descriptors, as is a list of more than
  :data:`MAX_SGL_DESCRIPTORS`); any other type or subtype: SGL Descriptor Type Invalid; data blocks that add up to
  another length than the transfer: Data SGL Length Invalid; a block or segment outside guest RAM: Data Transfer
  Error.

Not supported: SGL Bit Bucket, keyed and transport data blocks, offset subtypes, SGLs longer than the transfer
(SGLS bit 18), metadata SGLs (PSDT 10b is refused by the caller), memory pages other than 4 KiB.
"""

import operator
import struct

from .layouts import SGL_DATA_BLOCK, SGL_DESC, SGL_LAST_SEGMENT, SGL_SEGMENT, SGL_SUBTYPE_ADDRESS
from .regs import (DATA_TRANSFER_ERROR, PAGE_SIZE, PRP_OFFSET_INVALID, SC_DATA_SGL_LENGTH, SC_INVALID_SGL_COUNT,
                   SC_INVALID_SGL_SEGMENT, SC_SGL_TYPE_INVALID, NvmeError, status)

PAGE_MASK = PAGE_SIZE - 1
PRP_ENTRY = 8
PRPS_PER_PAGE = PAGE_SIZE // PRP_ENTRY
MAX_SGL_DESCRIPTORS = 1024
SGL_LENGTH_INVALID = status(SC_DATA_SGL_LENGTH)
SGL_SEGMENT_INVALID = status(SC_INVALID_SGL_SEGMENT)
SGL_COUNT_INVALID = status(SC_INVALID_SGL_COUNT)
SGL_TYPE_INVALID = status(SC_SGL_TYPE_INVALID)


def _views(mem, extents):
    """``[(gpa, length)]`` in order -> memoryviews, neighbours merged; Data Transfer Error outside RAM."""
    out = []
    start, size = extents[0]
    try:
        for gpa, n in extents[1:]:
            if gpa == start + size:
                size += n
                continue
            out.append(mem.view(start, size))
            start, size = gpa, n
        out.append(mem.view(start, size))
    except (OSError, ValueError, OverflowError):
        raise NvmeError(DATA_TRANSFER_ERROR) from None
    return out


def _list_views(mem, addrs, lens):
    """:func:`_views` of a PRP list's extents with whole-list operations: where the memory has a ``ram`` view
    covering them all and no two are neighbours (a 1 MiB request is 257 scattered pages; a Python step per entry
    cost more than the read in the nested lab), sliced from it; else the general path, which merges neighbours."""
    ends = list(map(operator.add, addrs, lens))
    ram = getattr(mem, "ram", None)
    if ram is None or max(ends) > len(ram) or any(map(operator.eq, addrs[1:], ends)):
        return _views(mem, list(zip(addrs, lens)))
    return [ram[a:e] for a, e in zip(addrs, ends)]


def _read(mem, gpa, size):
    try:
        return bytes(mem.view(gpa, size))
    except (OSError, ValueError, OverflowError):
        raise NvmeError(DATA_TRANSFER_ERROR) from None


def prp_entries(mem, pointer, count):
    """The ``count`` data entries of the PRP list at ``pointer``, following chained list pages."""
    out = []
    for _ in range(count + 1):          # each list page gives at least one entry, or the list loops
        if pointer & 0x7:
            raise NvmeError(PRP_OFFSET_INVALID)
        room = (PAGE_SIZE - (pointer & PAGE_MASK)) // PRP_ENTRY
        if count <= room:
            out.extend(struct.unpack(f"<{count}Q", _read(mem, pointer, count * PRP_ENTRY)))
            return out
        got = struct.unpack(f"<{room}Q", _read(mem, pointer, room * PRP_ENTRY))
        out.extend(got[:-1])
        count -= room - 1
        pointer = got[-1]
    raise NvmeError(DATA_TRANSFER_ERROR)


def prp_buffers(mem, prp1, prp2, length):
    """The buffers PRP1/PRP2 describe for a transfer of ``length`` bytes (4.3)."""
    if prp1 & 0x3:
        raise NvmeError(PRP_OFFSET_INVALID)
    first = min(length, PAGE_SIZE - (prp1 & PAGE_MASK))
    extents = [(prp1, first)]
    rest = length - first
    if rest > PAGE_SIZE:
        pages = (rest + PAGE_MASK) >> 12
        entries = prp_entries(mem, prp2, pages)
        if any(map(PAGE_MASK.__and__, entries)):
            raise NvmeError(PRP_OFFSET_INVALID)
        lens = [PAGE_SIZE] * pages
        lens[-1] = rest - ((pages - 1) << 12)
        return _list_views(mem, [prp1] + entries, [first] + lens)
    elif rest > 0:
        if prp2 & PAGE_MASK:
            raise NvmeError(PRP_OFFSET_INVALID)
        extents.append((prp2, rest))
    return _views(mem, extents)


def _segment(mem, address, length):
    """The descriptors of one SGL segment, as ``(address, length, type, subtype)`` tuples."""
    if length == 0 or length % SGL_DESC.size:
        raise NvmeError(SGL_COUNT_INVALID)
    raw = _read(mem, address, length)
    return [(a, n, ident >> 4, ident & 0xF) for a, n, ident in SGL_DESC.iter_unpack(raw)]


def sgl_buffers(mem, prp1, prp2, length):
    """The buffers of the SGL whose first descriptor is the DPTR field (``prp1``: its address, ``prp2``: length,
    reserved bytes and identifier) for a transfer of ``length`` bytes (4.4)."""
    pending = [(prp1, prp2 & 0xFFFFFFFF, prp2 >> 60, (prp2 >> 56) & 0xF)]
    extents, total, seen, last = [], 0, 0, False
    while pending:
        address, n, kind, subtype = pending.pop(0)
        seen += 1
        if seen > MAX_SGL_DESCRIPTORS:
            raise NvmeError(SGL_COUNT_INVALID)
        if subtype != SGL_SUBTYPE_ADDRESS:
            raise NvmeError(SGL_TYPE_INVALID)
        if kind == SGL_DATA_BLOCK:
            if n:
                extents.append((address, n))
                total += n
            continue
        if kind not in (SGL_SEGMENT, SGL_LAST_SEGMENT):
            raise NvmeError(SGL_TYPE_INVALID)
        if last or pending:         # inside a Last Segment, or a Segment descriptor that is not the last one
            raise NvmeError(SGL_SEGMENT_INVALID)
        last = kind == SGL_LAST_SEGMENT
        pending = _segment(mem, address, n)
        if last and any(d[2] in (SGL_SEGMENT, SGL_LAST_SEGMENT) for d in pending):
            raise NvmeError(SGL_SEGMENT_INVALID)
    if total != length:
        raise NvmeError(SGL_LENGTH_INVALID)
    return _views(mem, extents) if extents else []


def data_buffers(mem, sgl, prp1, prp2, length):
    """The buffers of a transfer of ``length`` bytes (0: none) described by PRPs, or an SGL when ``sgl``."""
    if length <= 0:
        return []
    if sgl:
        return sgl_buffers(mem, prp1, prp2, length)
    return prp_buffers(mem, prp1, prp2, length)


def copy_out(buffers, data):
    """Writes ``data`` across ``buffers`` (the controller's data to the host), zeros after its end."""
    off = 0
    for m in buffers:
        n = len(m)
        chunk = data[off:off + n]
        m[:len(chunk)] = chunk
        if len(chunk) < n:
            m[len(chunk):] = bytes(n - len(chunk))
        off += n


def copy_in(buffers):
    """The bytes in ``buffers`` (the host's data to the controller), read once."""
    return b"".join(bytes(m) for m in buffers)
