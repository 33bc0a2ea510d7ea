"""virtio-9p's compiled Tread and Twrite (``p9fast.c``), beside the share (``vmmshim/backends/p9fs.py``) that
carries it (``HostShare(..., accel=accelerator())``, ``bind_fid``, ``serve_compiled``).

``Virtio9p`` offers each chain that is one indirect table (``take_indirect``) to its server's compiled path first;
the compiled request serves a 9P2000.L Tread or Twrite laid out as Linux's ``net/9p/trans_virtio.c`` sends them
with zero-copy pages (the T-message readable, then Twrite's data; the room for the R-message writable, then
Tread's pages), on a fid open for that, every buffer in the first RAM area: the C code walks the table, builds the
``iovec`` array straight from the descriptors, makes the one ``preadv``/``pwritev`` and writes the R-message header,
with the GIL released (cffi's ABI mode does). Any other chain or message, or one the Python server would answer
with Rlerror, falls back to the Python path before anything is read or written, so the guest sees the same answers
either way (``tests/unit/test_p9_compiled.py`` compares the two).

The fid table: :data:`FID_SLOTS` entries ``(fid, fd, access)`` in C memory, direct-mapped by ``fid % FID_SLOTS``
(Linux hands out the lowest free fid numbers, so its fids rarely share a slot; a fid that finds its slot taken
replaces the one there, which is then served in Python). The share binds a fid when the server opens a regular
file on it (:meth:`Accelerator.bind`: readable for an ``O_RDONLY``/``O_RDWR`` open, writable for ``O_WRONLY``/
``O_RDWR`` on a share that is not read-only) and unbinds it before it closes that file (clunk, remove, Tversion,
reset, closing the share), so a slot never holds an fd that was closed or that a fid no longer stands for.

The library is built and cached by ``ops/native.py``. :func:`accelerator` returns ``None`` (and :func:`unavailable`
says why) when it cannot be built; with ``-o vmmshim.p9_compiled=false`` the VM attaches none. The device then
serves every request in Python.

The queue pass (:meth:`Accelerator.serve_queue`) serves the queue's available chains one after the other in one
call, the avail and used rings included, until one it does not take: one C call a notification instead of a
Python step per chain.

Not supported: other messages (Python serves them), xattr fids and directories, chains in highmem, more than
IOV_MAX data segments.
"""

import pathlib

from ops import native

from .netfast import VQ_CDEF, VQ_EVENT_IDX, VQ_INDIRECT

SOURCE = (pathlib.Path(__file__).with_name("p9fast.c"), pathlib.Path(__file__).with_name("fastpath.h"))
CDEF = VQ_CDEF + """
struct vmmshim_p9_fid {
    uint32_t fid;
    int32_t fd;
    uint32_t access;
};
struct vmmshim_p9_out {
    uint32_t type;
    uint64_t bytes;
};
int64_t vmmshim_p9_serve(uint8_t *ram, uint64_t ram_len, uint64_t table, uint32_t tsize, uint32_t msize,
                         const struct vmmshim_p9_fid *fids, uint32_t slots, struct vmmshim_p9_out *out);
struct vmmshim_p9_totals {
    uint64_t served; uint64_t bytes_read; uint64_t bytes_written;
};
int32_t vmmshim_p9_queue(uint8_t *ram, uint64_t ram_len, struct vmmshim_vq *q, uint32_t max_n, uint32_t msize,
                         const struct vmmshim_p9_fid *fids, uint32_t slots, struct vmmshim_p9_totals *t);
"""
FID_SLOTS = 4096                # a power of two (the C side checks)
ACCESS_READ = 1
ACCESS_WRITE = 2
TREAD = 116                     # 9P2000.L's Tread (out.type of a served read)
NO_FD = -1

_library = native.LazyLibrary(SOURCE, "p9fast", CDEF)


def unavailable():
    """Why :func:`accelerator` returns ``None`` (``None`` when it does not)."""
    _library.get()
    return _library.why


class Accelerator:
    """The fid table and ``serve(ram, table, tsize, msize)``: one request, as the share's ``serve_compiled`` passes
    it on for the server. Returns the used length with the data moved and the R-message written, or None where
    the Python path must serve the request. ``ram`` is the guest's first RAM area (``GuestMemory.ram``),
    ``table`` the indirect table's address in it, ``msize`` the session's. ``served``, ``bytes_read`` and
    ``bytes_written`` count what it served."""

    def __init__(self, ffi, lib):
        self._ffi = ffi
        self._fn = lib.vmmshim_p9_serve
        self._queue = lib.vmmshim_p9_queue
        self._out = ffi.new("struct vmmshim_p9_out *")
        self._vq = ffi.new("struct vmmshim_vq *")
        self._totals = ffi.new("struct vmmshim_p9_totals *")
        self._fids = ffi.new("struct vmmshim_p9_fid[]", FID_SLOTS)
        for i in range(FID_SLOTS):
            self._fids[i].fd = NO_FD
        self.served = self.bytes_read = self.bytes_written = 0

    def bind(self, fid, fd, readable, writable):
        """``fid`` stands for the open file ``fd`` from now on, to be read and/or written."""
        e = self._fids[fid % FID_SLOTS]
        e.access = 0
        e.fid, e.fd = fid, fd
        e.access = (ACCESS_READ if readable else 0) | (ACCESS_WRITE if writable else 0)

    def unbind(self, fid, fd):
        """``fid`` no longer stands for ``fd`` (called before ``fd`` is closed); a slot another fid took since is
        left alone."""
        e = self._fids[fid % FID_SLOTS]
        if e.fid == fid and e.fd == fd:
            e.access = 0
            e.fd = NO_FD

    def bound(self, fid):
        """``(fd, readable, writable)`` of ``fid`` in the table, or None (for tests and diagnostics)."""
        e = self._fids[fid % FID_SLOTS]
        if e.fid != fid or not e.access:
            return None
        return e.fd, bool(e.access & ACCESS_READ), bool(e.access & ACCESS_WRITE)

    def _call(self, fn, ram, *args):
        # the buffer is exported for the call only (as blkfast.py: an export kept in a cycle of objects made the
        # garbage collector free the memory under it)
        ptr = self._ffi.from_buffer("uint8_t[]", ram, require_writable=True)
        try:
            return fn(ptr, len(ram), *args)
        finally:
            self._ffi.release(ptr)

    def serve(self, ram, table, tsize, msize):
        out = self._out
        used = self._call(self._fn, ram, table, tsize, msize, self._fids, FID_SLOTS, out)
        if used < 0:
            return None
        self.served += 1
        if out.type == TREAD:
            self.bytes_read += out.bytes
        else:
            self.bytes_written += out.bytes
        return used

    def serve_queue(self, ram, ring, msize, max_n):
        """The queue pass: the available chains of the virtqueue ``ring`` (``(desc, avail, used, size,
        last_avail, used_idx, event_idx)``, its guest addresses and indices) served one by one as :meth:`serve`
        serves one and put in the used ring, up to ``max_n``, stopping at the first one :meth:`serve` would give
        back. Returns ``(served, last_avail, used_idx)``, or None when the rings are not in ``ram``."""
        q, t = self._vq, self._totals
        q.desc, q.avail, q.used, q.size, q.last_avail, q.used_idx, event_idx = ring
        q.flags = VQ_INDIRECT | (VQ_EVENT_IDX if event_idx else 0)
        t.served = t.bytes_read = t.bytes_written = 0
        n = self._call(self._queue, ram, q, max_n, msize, self._fids, FID_SLOTS, t)
        if n < 0:
            return None
        self.served += n
        self.bytes_read += t.bytes_read
        self.bytes_written += t.bytes_written
        return n, q.last_avail, q.used_idx


def accelerator():
    """A new :class:`Accelerator` (one per share: it keeps its own fid table), or ``None``."""
    loaded = _library.get()
    return Accelerator(*loaded) if loaded else None
