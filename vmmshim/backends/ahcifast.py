"""AHCI's compiled data command (``ahcifast.c``), beside the block backend (``vmmshim/backends/block.py``) that
carries it for a disk port's image (``FileBlockBackend(..., accel=accelerator())``, ``serve_ahci``).

Serial ATA AHCI 1.3.1 sections 4.2.2 (the command header), 4.2.3 (the command table and its PRDT) and 5.6 (data
transfers), for the ACS-3 commands READ/WRITE DMA (C8h/CAh), READ/WRITE DMA EXT (25h/35h) and READ/WRITE FPDMA
QUEUED (60h/61h). A port's engine (``bhyve_devices/ahci/port.py``) offers its disk (``AtaDisk.serve_compiled``) each
issued slot first; the compiled command reads the header, the command FIS and the PRDT from the first RAM area (each
once, checked against RAM without overflow), and when the command is one of those, within the image, allowed (no
write to a read-only image) and the PRDT covers it, makes the ``preadv``/``pwritev`` straight between the image and
guest memory itself, with the GIL released (cffi's ABI mode does): a DMA command at once, an NCQ command in a second
call (``finish``) once the port has accepted it, in the Python path's order. The Python fetch and PRDT walk of a
1 MiB command (256 entries) is a sizable share of a command where Python runs slowly (the nested lab). Any other slot
falls back to the port's Python path before anything is read or written, so the guest sees the same answers either
way (a host I/O error is handed back, and the disk answers ABORT as Python does); the endings (PRDBC, the FISes,
PxTFD/PxCI/PxSACT/PxIS, the interrupt) and the flush of FUA or a disabled write cache are always Python's
(``tests/unit/test_ahci_compiled.py`` compares the two paths).

The library is built and cached by ``ops/native.py``. :func:`accelerator` returns ``None`` (and :func:`unavailable`
says why) when it cannot be built; with ``-o vmmshim.blk_compiled=false`` the VM attaches none, and a CD's port
never gets one. The port then serves every command in Python.

Not supported: ATAPI commands, the PIO reads and writes, TRIM, FLUSH and the other non-data commands (Python serves
them), command tables and buffers in highmem, more than 1024 PRDT buffers in one command.
"""

import pathlib

from ops import native

SOURCE = (pathlib.Path(__file__).with_name("ahcifast.c"), pathlib.Path(__file__).with_name("fastpath.h"))
CDEF = """
struct vmmshim_ahci_out {
    uint8_t cfis[20];
    uint16_t flags;
    uint16_t prdtl;
    uint32_t queued;
    int32_t error;
};
size_t vmmshim_ahci_state_size(void);
int32_t vmmshim_ahci_transfer(void *state);
int64_t vmmshim_ahci_slot(uint8_t *ram, uint64_t ram_len, uint64_t cmdlist, uint32_t slot, int fd,
                          uint64_t sectors, uint32_t sector_size, int readonly, void *state,
                          struct vmmshim_ahci_out *out);
"""
_library = native.LazyLibrary(SOURCE, "ahcifast", CDEF)
WORD = 8                        #: the state buffer is allocated in words (its iovecs are word-aligned)


def unavailable():
    """Why :func:`accelerator` returns ``None`` (``None`` when it does not)."""
    _library.get()
    return _library.why


class Accelerator:
    """``serve_slot(ram, cmdlist, slot, fd, sectors, sector_size, readonly)``: one AHCI command slot, as the block
    backend's ``serve_ahci`` passes it on for an ATA disk port. Returns None where the Python path must serve the
    slot (nothing read or written), else ``(nbytes, flags, prdtl, cfis, error, finish)``: the bytes the command
    moves, the header's flags and PRDTL, the 20-byte command FIS as it was read, and either ``finish`` None with
    the transfer done (``error``: 0 or its errno), or, for an NCQ command, ``finish``, which moves the data once
    the caller has accepted the command and returns 0 or the errno. ``ram`` is the guest's first RAM area
    (``GuestMemory.ram``), ``cmdlist`` the port's command list address in it (PxCLB/PxCLBU as latched),
    ``sectors`` the image's size in sectors of ``sector_size`` bytes. ``served`` counts the slots served. One
    command at a time (a port's); not virtio-blk's accelerator: it has no ``serve``."""

    def __init__(self, ffi, lib):
        self._ffi = ffi
        self._fn = lib.vmmshim_ahci_slot
        self._transfer = lib.vmmshim_ahci_transfer
        self._out = ffi.new("struct vmmshim_ahci_out *")
        self._cfis = ffi.buffer(self._out.cfis)
        self._state = ffi.new("uint64_t[]", -(-lib.vmmshim_ahci_state_size() // WORD))
        self._held = None           # the export of guest RAM while an NCQ command waits for finish
        self.served = 0

    def serve_slot(self, ram, cmdlist, slot, fd, sectors, sector_size, readonly):
        out = self._out
        self._release()
        # exported for the command only (as blkfast.py: an export kept alive in a cycle freed the memory under it)
        ptr = self._ffi.from_buffer("uint8_t[]", ram, require_writable=True)
        try:
            moved = self._fn(ptr, len(ram), cmdlist, slot, fd, sectors, sector_size, 1 if readonly else 0,
                             self._state, out)
            if moved >= 0 and out.queued:
                self._held, ptr = ptr, None
        finally:
            if ptr is not None:
                self._ffi.release(ptr)
        if moved < 0:
            return None
        self.served += 1
        return moved, out.flags, out.prdtl, self._cfis[:], out.error, self.finish if out.queued else None

    def finish(self):
        """The accepted NCQ command's transfer: 0, or its errno."""
        try:
            return self._transfer(self._state)
        finally:
            self._release()

    def _release(self):
        held, self._held = self._held, None
        if held is not None:
            self._ffi.release(held)


def accelerator():
    """A new :class:`Accelerator` (one per port's backend: it keeps its own result buffer), or ``None``."""
    loaded = _library.get()
    return Accelerator(*loaded) if loaded else None
