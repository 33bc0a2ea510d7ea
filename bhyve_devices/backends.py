"""The host backends a device model is written against, as small Protocols: the device gets an opened backend
object and never touches the host itself (the VM opens them: ``vmmshim/backends/``).

- :class:`BlockBackend`: a disk image for virtio-blk, after bhyve's ``block_if.h`` (``blockif_size``,
  ``blockif_is_ro``, ``blockif_candelete``, ``blockif_read``/``write``/``flush``/``delete``), with full
  scatter-gather transfers and the compiled request hook (``serve_compiled``).
- :class:`NetBackend`: a frame transport for virtio-net, after bhyve's ``net_backends.h`` (``netbe_send``,
  ``netbe_recv``, ``netbe_rx_enable``, ``netbe_set_cap`` with the vnet header length and the negotiated offloads;
  ``netbe_init``'s callback is :meth:`NetBackend.start_rx`).
- :class:`CharBackend`: a character stream for the 16550 UART and virtio-console, after bhyve's ``uart_backend``
  (``uart_rxfifo_*`` feeding, ``uart_backend_write``): ``write`` for output, and input fed to a
  :class:`ConsoleInput` (the device's ``enqueue_input``) once :meth:`CharBackend.start` is given it.

:class:`MemoryBlockBackend` is a :class:`BlockBackend` over a ``bytearray`` (no host I/O) for tests of the device
logic.

Not supported: bhyve's asynchronous ``blockif_req`` queue (a backend call returns when the transfer is done; the
caller chooses the thread), ``netbe_peek_recvlen``, several char backends on one device, backends chosen by the
device itself.
"""

import errno
from typing import Callable, Optional, Protocol, Sequence, runtime_checkable

#: A scatter-gather list: writable (reads) or readable (writes) buffers, in order.
Segments = Sequence[memoryview]


@runtime_checkable
class BlockBackend(Protocol):
    path: str           #: names the image (virtio-blk's GET_ID serial is made from it)
    size: int           #: bytes
    readonly: bool      #: opened read-only (asked for, or a read-write open was refused)
    candelete: bool     #: :meth:`discard` and :meth:`write_zeroes` may be used
    compiled: bool      #: :meth:`serve_compiled` may serve requests (else it always returns None)

    def preadv_full(self, segs: Segments, offset: int, total: Optional[int] = None) -> int:
        """Fills all of ``segs`` from ``offset`` (``total``: their length, if counted); returns the bytes read.
        Raises OSError (EIO at the end of the image)."""

    def pwritev_full(self, segs: Segments, offset: int, total: Optional[int] = None) -> int:
        """Writes all of ``segs`` at ``offset``; returns the bytes written. Raises OSError."""

    def flush(self) -> None:
        """Everything written so far is on stable storage."""

    def discard(self, offset: int, length: int) -> None:
        """The range may be deallocated; reads of it return zeros afterwards."""

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        """The range reads as zeros afterwards; ``unmap``: it may be deallocated."""

    def serve_compiled(self, ram: memoryview, table: int, tsize: int) -> Optional[tuple]:
        """One virtio-blk request whose chain is the indirect table at ``table`` (``tsize`` bytes) in ``ram``, if
        the backend's compiled request serves it: ``(used_len, type, status, nbytes)`` with the status byte
        written; None, with nothing read or written, where the device's Python path must serve it."""

    def close(self) -> None: ...


@runtime_checkable
class NetBackend(Protocol):
    vnet_hdr: bool      #: frames carry the virtio-net header (then :meth:`set_vnet_hdr_len` follows the driver)
    offloads: bool      #: takes partially checksummed and GSO frames; :meth:`set_offload` says which it may give

    def send(self, segs: Segments) -> None:
        """One frame; dropped when the backend is full (as a NIC would). Raises OSError on a backend error."""

    def recv_into(self, segs: Segments) -> Optional[int]:
        """One waiting frame into ``segs``: its length; None when none is waiting; 0 when the peer is gone."""

    def set_vnet_hdr_len(self, n: int) -> None: ...

    def set_offload(self, features: int) -> None:
        """The virtio-net features the driver accepted (0: none): the offloaded frames their GUEST_* bits allow
        may be handed over from now on."""

    def start_rx(self, ready: Callable[[], bool], receive: Callable[[], object]) -> None:
        """Calls ``receive()`` (on a thread of the backend's own) whenever frames are waiting and ``ready()``
        says the guest has room for them; ``ready()`` is asked again after each :meth:`rx_kick`."""

    def rx_kick(self) -> None:
        """The guest posted receive buffers: ask ``ready()`` again."""

    def close(self) -> None: ...


class ConsoleInput(Protocol):
    def enqueue_input(self, data: bytes) -> int:
        """Input for the guest; returns how many bytes were taken (the backend retries the rest later)."""


@runtime_checkable
class CharBackend(Protocol):
    def write(self, data: bytes) -> None:
        """Output from the guest."""

    def start(self, console: ConsoleInput) -> object:
        """Feeds input to ``console`` from now on."""

    def close(self) -> None: ...


@runtime_checkable
class EntropySource(Protocol):
    """virtio-rnd's host side (bhyve's ``pci_virtio_rnd.c`` reads ``/dev/random``)."""

    def fill(self, segs: list) -> int:
        """Fills the buffers ``segs`` (writable memoryviews, in order) with entropy; returns the bytes written."""

    def close(self) -> None: ...


class MemoryBlockBackend:
    """A :class:`BlockBackend` over ``data`` (a ``bytearray``, kept): no host I/O, for tests."""

    compiled = False

    def __init__(self, data, path="memory", readonly=False):
        self.data = data
        self.path = path
        self.size = len(data)
        self.readonly = readonly
        self.candelete = not readonly
        self.flushes = 0

    def _range(self, offset, length):
        if offset < 0 or offset + length > self.size:
            raise OSError(errno.EIO, "past the end of the image")

    def preadv_full(self, segs, offset, total=None):
        n = 0
        for m in segs:
            self._range(offset + n, len(m))
            m[:] = self.data[offset + n:offset + n + len(m)]
            n += len(m)
        return n

    def pwritev_full(self, segs, offset, total=None):
        if self.readonly:
            raise OSError(errno.EBADF, "read-only image")
        n = 0
        for m in segs:
            self._range(offset + n, len(m))
            self.data[offset + n:offset + n + len(m)] = m
            n += len(m)
        return n

    def flush(self):
        self.flushes += 1

    def discard(self, offset, length):
        self.write_zeroes(offset, length, True)

    def write_zeroes(self, offset, length, unmap):
        self._range(offset, length)
        self.data[offset:offset + length] = bytes(length)

    def serve_compiled(self, ram, table, tsize):
        return None

    def close(self):
        pass
