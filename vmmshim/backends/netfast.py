"""virtio-net's compiled data path over a Linux tap (``netfast.c``), carried by the tap backend
(``TapBackend.accel``, ``vmmshim/backends/net.py``) for ``VirtioNet`` (``bhyve_devices/virtio/net.py``).

Per frame the Python path pops a chain, slices its buffers, makes one ``readv``/``writev`` and returns the chain:
in the nested lab that is most of a millisecond per frame, several thousand times per 8 MiB sent (``docs/lab.md``,
"Network beside QEMU"). The compiled path serves a batch of chains in one call, with the GIL released (cffi's ABI
mode does): transmit pops every available chain and writes each frame to the tap; receive reads each waiting frame
straight into the next posted chain, going on into further chains from a spill buffer when the frame is larger
(``VIRTIO_NET_F_MRG_RXBUF``, with ``num_buffers`` set). A frame for which the driver has not posted enough
buffers yet is held whole in the spill buffer (``held``) and goes first once it has (as QEMU queues it), instead
of being dropped: a dropped segment cost the guest's TCP a retransmission. It keeps EVENT_IDX's ``avail_event`` as the Python queue
does; the interrupt stays with the device (``notify_used`` after the batch).

A chain the C code does not serve (a bad index or descriptor, a buffer outside the first RAM area, an INDIRECT that
is not the head's, a writable buffer in a transmit chain) ends the batch before it is popped, and the device's
Python path takes it from there, so the guest sees the same answers either way
(``tests/unit/test_virtio_net_compiled.py`` compares the two). With ``-o vmmshim.net_compiled=false``, or where
no C compiler can build the library (:func:`unavailable` says why), the tap carries none.

The compiled slirp backend (``slirp_fast.py``) carries one too: its frames move through socketpairs that read and
write as a tap with the header does.

Not supported: taps without the virtio-net header (NetBSD's tap, the Python slirp backend's and stream's frames go
through Python), rings or buffers in highmem (Python serves them).
"""

import pathlib

from ops import native

SOURCE = (pathlib.Path(__file__).with_name("netfast.c"), pathlib.Path(__file__).with_name("fastpath.h"))
#: A queue's rings and indices as the compiled virtio paths take them (``fastpath.h``; p9fast.py declares it too).
VQ_CDEF = """
struct vmmshim_vq {
    uint64_t desc, avail, used;
    uint32_t size;
    uint32_t flags;
    uint32_t last_avail;
    uint32_t used_idx;
};
"""
CDEF = VQ_CDEF + """
struct vmmshim_net_out {
    uint64_t chains;
    uint64_t frames;
    uint64_t bytes;
    uint64_t dropped;
    int32_t stop;
    int32_t error;
    uint64_t held;
};
int vmmshim_net_tx(uint8_t *ram, uint64_t ram_len, struct vmmshim_vq *q, int fd, uint32_t hdr_len, uint32_t limit,
                   struct vmmshim_net_out *out);
int vmmshim_net_rx(uint8_t *ram, uint64_t ram_len, struct vmmshim_vq *q, int fd, uint32_t hdr_len, int mrg,
                   uint8_t *spill, uint64_t spill_len, uint64_t held, uint32_t limit, struct vmmshim_net_out *out);
"""
_library = native.LazyLibrary(SOURCE, "netfast", CDEF)

VQ_EVENT_IDX = 1
VQ_INDIRECT = 2
#: Why a batch ended (``Result.stop``), as netfast.c's STOP_* say.
STOP_EMPTY, STOP_PYTHON, STOP_LIMIT, STOP_NO_FRAME, STOP_EOF, STOP_WAIT = range(6)


def unavailable():
    """Why :func:`accelerator` returns ``None`` (``None`` when it does not)."""
    _library.get()
    return _library.why


class Result:
    """One batch: ``chains`` put in the used ring, ``frames`` moved, their ``bytes`` (without the header),
    ``dropped`` frames, ``stop`` (``STOP_*``), for a failed read its ``error``, and the length of the frame
    ``held`` in the spill buffer (0: none)."""

    __slots__ = ("chains", "frames", "bytes", "dropped", "stop", "error", "held")

    def __init__(self, out):
        self.chains, self.frames, self.bytes = out.chains, out.frames, out.bytes
        self.dropped, self.stop, self.error, self.held = out.dropped, out.stop, out.error, out.held

    @property
    def empty(self):
        """The ring was empty when the batch ended (transmit: nothing is left for the Python path)."""
        return self.stop == STOP_EMPTY

    @property
    def more(self):
        """Whether the Python path may go on: the batch ended at a chain left for it."""
        return self.stop == STOP_PYTHON

    @property
    def eof(self):
        """The tap read end of file or failed: its peer is gone."""
        return self.stop == STOP_EOF


class Accelerator:
    """The compiled batches for one tap (``fileno()`` gives its fd, -1 once closed). ``tx``/``rx`` take the
    guest's first RAM area (``GuestMemory.ram``) and the queue (a ``Virtqueue``, whose ``last_avail``, ``used_idx``
    and ``chains`` they move on) and return a :class:`Result`, or None where the rings are not in that RAM area (the
    Python path serves the queue). One transmit and one receive may run at once (two threads)."""

    def __init__(self, ffi, lib, fileno, tx_fileno=None):
        self._ffi, self._lib, self._fileno = ffi, lib, fileno
        self._tx_fileno = tx_fileno or fileno
        # one queue and result pair per direction: transmit (a doorbell, a vCPU) and receive (the tap's thread)
        # run at once, each under its own device lock, and the C call runs without the GIL
        self._tx = (ffi.new("struct vmmshim_vq *"), ffi.new("struct vmmshim_net_out *"))
        self._rx = (ffi.new("struct vmmshim_vq *"), ffi.new("struct vmmshim_net_out *"))
        self.batches = 0

    @staticmethod
    def _load(vq, q):
        vq.desc, vq.avail, vq.used, vq.size = q.desc_addr, q.avail_addr, q.used_addr, q.size
        vq.flags = (VQ_EVENT_IDX if q.event_idx else 0) | (VQ_INDIRECT if q.indirect else 0)
        vq.last_avail, vq.used_idx = q.last_avail, q.used_idx

    def _done(self, pair, q, r):
        if r < 0:
            return None
        vq, out = pair
        q.last_avail, q.used_idx = vq.last_avail & 0xFFFF, vq.used_idx & 0xFFFF
        q.chains += out.chains
        self.batches += 1
        return Result(out)

    def tx(self, ram, q, hdr_len, limit):
        fd = self._tx_fileno()
        if fd < 0:
            return None
        vq, out = pair = self._tx
        self._load(vq, q)
        # the buffer is exported for the call only (as blkfast.py does: an export kept in a cycle of objects
        # made the garbage collector free the memory under it)
        ptr = self._ffi.from_buffer("uint8_t[]", ram, require_writable=True)
        try:
            r = self._lib.vmmshim_net_tx(ptr, len(ram), vq, fd, hdr_len, limit, out)
        finally:
            self._ffi.release(ptr)
        return self._done(pair, q, r)

    def rx(self, ram, q, hdr_len, mrg, spill, held, limit):
        fd = self._fileno()
        if fd < 0:
            return None
        vq, out = pair = self._rx
        self._load(vq, q)
        ptr = self._ffi.from_buffer("uint8_t[]", ram, require_writable=True)
        sp = self._ffi.from_buffer("uint8_t[]", spill, require_writable=True)
        try:
            r = self._lib.vmmshim_net_rx(ptr, len(ram), vq, fd, hdr_len, 1 if mrg else 0, sp, len(spill),
                                         held, limit, out)
        finally:
            self._ffi.release(sp)
            self._ffi.release(ptr)
        return self._done(pair, q, r)


def accelerator(fileno, tx_fileno=None):
    """A new :class:`Accelerator` for the tap whose fd ``fileno()`` returns, or ``None``. ``tx_fileno()``: another
    fd for the transmitted frames (the compiled slirp backend's socketpair, ``slirp_fast.py``)."""
    loaded = _library.get()
    return Accelerator(*loaded, fileno, tx_fileno) if loaded else None
