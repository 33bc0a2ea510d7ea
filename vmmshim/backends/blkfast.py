"""virtio-blk's compiled request (``blkfast.c``), beside the block backend (``vmmshim/backends/block.py``) that
carries it for its image (``FileBlockBackend(..., accel=accelerator())``, ``serve_compiled``).

``VirtioBlock`` offers its backend a request first when the chain is one indirect table (``take_indirect``); the
compiled request serves it when it is in the order Linux's driver writes it (a header, the data buffers, the
status byte), the request is a read or a write within the image, and every buffer lies in the first RAM area: the
C code checks the table and every buffer against RAM, builds the ``iovec`` array straight from the descriptors and
makes the ``preadv``/``pwritev`` itself, with the GIL released (cffi's ABI mode does). The Python walk of a large
request's indirect table is a sizable share of a request where Python runs slowly (the nested lab's figures:
``docs/lab.md``, "Threads, the GIL and a compiled request"). Any other chain, or a request it would answer with an error status, falls back to the
device's Python path before anything is read or written, so the guest sees the same answers either way
(``tests/unit/test_virtio_blk_compiled.py`` compares the two).

The library is built and cached by ``ops/native.py``. :func:`accelerator` returns ``None`` (and :func:`unavailable`
says why) when it cannot be built; with ``-o vmmshim.blk_compiled=false`` the VM attaches none. The device then
serves every request in Python.

Not supported: flush, get-id, discard and write-zeroes (Python serves them), chains in highmem.
"""

import pathlib

from ops import native

SOURCE = (pathlib.Path(__file__).with_name("blkfast.c"), pathlib.Path(__file__).with_name("fastpath.h"))
CDEF = """
struct vmmshim_blk_out {
    uint32_t type;
    uint32_t status;
    uint64_t bytes;
    int32_t error;
};
int64_t vmmshim_blk_indirect(uint8_t *ram, uint64_t ram_len, uint64_t table, uint32_t tsize, int fd,
                             uint64_t capacity, int readonly, struct vmmshim_blk_out *out);
"""
_library = native.LazyLibrary(SOURCE, "blkfast", CDEF)


def unavailable():
    """Why :func:`accelerator` returns ``None`` (``None`` when it does not)."""
    _library.get()
    return _library.why


class Accelerator:
    """``serve(ram, table, tsize, fd, capacity, readonly)``: one request, as the block backend's ``serve_compiled``
    passes it on for ``VirtioBlock``. Returns ``(used_len, type, status, nbytes)`` with the status byte written,
    or None where the Python path must serve the request. ``ram`` is the guest's first RAM area
    (``GuestMemory.ram``), ``table`` the indirect table's address in it, ``capacity`` the image's size in bytes
    (whole sectors)."""

    def __init__(self, ffi, lib):
        self._ffi = ffi
        self._fn = lib.vmmshim_blk_indirect
        self._out = ffi.new("struct vmmshim_blk_out *")
        self.served = 0

    def serve(self, ram, table, tsize, fd, capacity, readonly):
        out = self._out
        # the buffer is exported for the call only: an export kept in a cycle of objects (device, transport) made
        # the garbage collector free the memory under it
        ptr = self._ffi.from_buffer("uint8_t[]", ram, require_writable=True)
        try:
            used = self._fn(ptr, len(ram), table, tsize, fd, capacity, 1 if readonly else 0, out)
        finally:
            self._ffi.release(ptr)
        if used < 0:
            return None
        self.served += 1
        return used, out.type, out.status, out.bytes


def accelerator():
    """A new :class:`Accelerator` (one per device: it keeps its own result buffer), or ``None``."""
    loaded = _library.get()
    return Accelerator(*loaded) if loaded else None
