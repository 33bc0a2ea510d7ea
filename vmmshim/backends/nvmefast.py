"""NVMe's compiled I/O queue pass (``nvmefast.c``), carried by the block backend (``vmmshim/backends/block.py``:
``FileBlockBackend(..., nvme_accel=accelerator())``, ``serve_nvme``) for the controller of
``bhyve_devices/nvme/``.

The controller offers each I/O submission queue with new entries to the backend first (``NvmCommands._drain_compiled``
in ``bhyve_devices/nvme/io.py``). The C pass serves the leading run of reads and writes that Linux's driver sends
(PRPs, namespace 1, no FUA, no protection information, within the namespace and MDTS, every list page and buffer
in the first RAM area): it builds the ``iovec`` array straight from the PRP list, makes the ``preadv``/``pwritev``
with the GIL released (cffi's ABI mode does), and posts each completion with its phase tag. It stops at the first
entry that is anything else, which the Python path then serves, so the guest sees the same answers either way
(``tests/unit/test_nvme_compiled.py`` compares the two). In the nested lab, Python's walk of a 1 MiB request's
257-entry PRP list and the completion took a sizable share of the request (``docs/lab.md``).

The library is built and cached by ``ops/native.py``; :func:`accelerator` returns ``None`` (and :func:`unavailable`
says why) when it cannot be built; with ``-o vmmshim.blk_compiled=false`` the VM attaches none.

Not supported: the admin queue, Flush, Write Zeroes, Dataset Management, SGLs, queues or buffers in highmem.
"""

import pathlib

from ops import native

SOURCE = (pathlib.Path(__file__).with_name("nvmefast.c"), pathlib.Path(__file__).with_name("fastpath.h"))
CDEF = """
struct vmmshim_nvme_q {
    uint64_t sq_base; uint32_t sq_size; uint32_t sq_head; uint32_t sq_tail; uint32_t sqid;
    uint64_t cq_base; uint32_t cq_size; uint32_t cq_head; uint32_t cq_tail; uint32_t cq_phase;
    uint32_t max_n;
};
struct vmmshim_nvme_disk {
    int32_t fd; int32_t readonly; uint64_t nsze; uint32_t lba_shift; uint32_t max_transfer;
};
struct vmmshim_nvme_out {
    uint64_t reads; uint64_t writes; uint64_t bytes_read; uint64_t bytes_written;
};
int32_t vmmshim_nvme_drain(uint8_t *ram, uint64_t ram_len, struct vmmshim_nvme_q *q,
                           const struct vmmshim_nvme_disk *d, struct vmmshim_nvme_out *out);
"""
_library = native.LazyLibrary(SOURCE, "nvmefast", CDEF)


def unavailable():
    """Why :func:`accelerator` returns ``None`` (``None`` when it does not)."""
    _library.get()
    return _library.why


class Accelerator:
    """One controller's queue pass (it keeps its own argument and result structures: one controller serves under
    its lock, one pass at a time). :meth:`drain` as ``FileBlockBackend.serve_nvme`` passes it on."""

    def __init__(self, ffi, lib):
        self._ffi = ffi
        self._fn = lib.vmmshim_nvme_drain
        self._q = ffi.new("struct vmmshim_nvme_q *")
        self._d = ffi.new("struct vmmshim_nvme_disk *")
        self._out = ffi.new("struct vmmshim_nvme_out *")
        self.served = 0

    def drain(self, ram, fd, readonly, sq, cq, max_n, nsze, lba_shift, max_transfer):
        """``sq``: ``(base, size, head, tail, sqid)``; ``cq``: ``(base, size, head, tail, phase)``. Returns
        ``(served, sq_head, cq_tail, cq_phase, reads, writes, bytes_read, bytes_written)``, or None when the
        queues are not in ``ram`` (the guest's first RAM area: ``GuestMemory.ram``)."""
        q, d, out = self._q, self._d, self._out
        q.sq_base, q.sq_size, q.sq_head, q.sq_tail, q.sqid = sq
        q.cq_base, q.cq_size, q.cq_head, q.cq_tail, q.cq_phase = cq
        q.max_n = max_n
        d.fd, d.readonly, d.nsze, d.lba_shift, d.max_transfer = fd, 1 if readonly else 0, nsze, lba_shift, \
            max_transfer
        out.reads = out.writes = out.bytes_read = out.bytes_written = 0
        # the buffer is exported for the call only (see blkfast.Accelerator.serve)
        ptr = self._ffi.from_buffer("uint8_t[]", ram, require_writable=True)
        try:
            n = self._fn(ptr, len(ram), q, d, out)
        finally:
            self._ffi.release(ptr)
        if n < 0:
            return None
        self.served += n
        return n, q.sq_head, q.cq_tail, q.cq_phase, out.reads, out.writes, out.bytes_read, out.bytes_written


def accelerator():
    """A new :class:`Accelerator` (one per controller), or ``None``."""
    loaded = _library.get()
    return Accelerator(*loaded) if loaded else None
