"""The host backends a device model is written against, as small Protocols: the device gets an opened backend
object and never touches the host itself (the VM opens them: ``vmmshim/backends/``).

- :class:`BlockBackend`: a disk image for virtio-blk, after bhyve's ``block_if.h`` (``blockif_size``,
  ``blockif_is_ro``, ``blockif_candelete``, ``blockif_read``/``write``/``flush``/``delete``), with full
  scatter-gather transfers and the compiled request hook (``serve_compiled``). An optional method, not part of the
  Protocol (a backend without it serves every AHCI command in Python): ``serve_ahci(ram, cmdlist, slot, sectors,
  sector_size)``, AHCI's compiled data command for an ATA disk port (``vmmshim/backends/block.py``; the disk's
  ``AtaDisk.serve_compiled`` calls it and documents what it returns).
- :class:`NetBackend`: a frame transport for virtio-net, after bhyve's ``net_backends.h`` (``netbe_send``,
  ``netbe_recv``, ``netbe_rx_enable``, ``netbe_set_cap`` with the vnet header length and the negotiated offloads;
  ``netbe_init``'s callback is :meth:`NetBackend.start_rx`).
- :class:`CharBackend`: a character stream for the 16550 UART and virtio-console, after bhyve's ``uart_backend``
  (``uart_rxfifo_*`` feeding, ``uart_backend_write``): ``write`` for output, and input fed to a
  :class:`ConsoleInput` (the device's ``enqueue_input``) once :meth:`CharBackend.start` is given it.
- :class:`P9Filesystem`: the shared directory of virtio-9p, after lib9p's ``struct l9p_backend`` (bhyve's
  ``backend/fs.c``): nodes walked one name at a time, files opened from them, the 9P2000.L operations on them.

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


@runtime_checkable
class P9Filesystem(Protocol):
    """virtio-9p's host side (``vmmshim/backends/p9fs.py``), written against by :mod:`bhyve_devices.p9`.

    A *node* is a file of the share the backend hands out (opaque to the caller, counted: :meth:`walk`,
    :meth:`root` and :meth:`dup` give a reference that :meth:`release` gives back); an *open file* is what
    :meth:`open` and :meth:`create` return (:meth:`close_file` gives it back). ``name`` arguments are one path
    component as bytes; the backend refuses ``/``, NUL, an empty name and, where a name is created or removed,
    ``.`` and ``..``. Nothing is reached outside the share: a symlink is a node of its own and never followed,
    ``..`` of the root is the root. Errors are OSError with the errno the guest gets; a read-only backend refuses
    every change with EROFS. ``stat`` results are ``os.stat_result``-like (``st_mode``, ``st_ino``, ``st_dev``,
    ``st_nlink``, ``st_uid``, ``st_gid``, ``st_rdev``, ``st_size``, ``st_blksize``, ``st_blocks`` and the
    ``*_ns`` times), of the node itself (lstat). One caller at a time. Not supported: lib9p's per-request
    credentials (the backend acts as the VMM's own user).
    """

    readonly: bool

    def root(self) -> tuple:
        """``(node, stat)`` of the share's root."""

    def walk(self, node: object, name: bytes) -> tuple:
        """``(child, stat)``: ``name`` in the directory ``node`` (``..`` its parent, ``.`` itself)."""

    def dup(self, node: object) -> object: ...

    def release(self, node: object) -> None: ...

    def getattr(self, node: object): ...

    def setattr(self, node: object, handle: Optional[object], mode: Optional[int] = None,
                uid: Optional[int] = None, gid: Optional[int] = None, size: Optional[int] = None,
                atime_ns: Optional[int] = None, mtime_ns: Optional[int] = None) -> None:
        """Changes what is not None; a time of -1 is now. ``handle``: the node opened for writing, if it is."""

    def open(self, node: object, flags: int) -> tuple:
        """``(handle, stat)``: the node opened with ``os.O_*`` ``flags`` (access mode, O_TRUNC, O_APPEND,
        O_SYNC, O_DSYNC); only regular files and directories (read-only) open."""

    def create(self, node: object, name: bytes, flags: int, mode: int) -> tuple:
        """``(child, handle, stat)``: a new regular file ``name`` in the directory ``node``, opened."""

    def close_file(self, handle: object) -> None: ...

    def fstat(self, handle: object): ...

    def read(self, handle: object, segs: Segments, offset: int) -> int: ...

    def write(self, handle: object, segs: Segments, offset: int) -> int: ...

    def fsync(self, handle: object, datasync: bool) -> None: ...

    def readdir(self, handle: object, offset: int) -> Sequence[tuple]:
        """``(next_offset, name, ino, dtype)`` of the directory's entries from ``offset`` (0: the first; a
        listing is taken then and later offsets index into it), ``.`` and ``..`` first."""

    def mkdir(self, node: object, name: bytes, mode: int): ...

    def symlink(self, node: object, name: bytes, target: bytes): ...

    def mknod(self, node: object, name: bytes, mode: int): ...

    def link(self, node: object, target: object, name: bytes) -> None: ...

    def readlink(self, node: object) -> bytes: ...

    def unlink(self, node: object, name: bytes, rmdir: bool) -> None: ...

    def rename(self, olddir: object, oldname: bytes, newdir: object, newname: bytes) -> None: ...

    def remove(self, node: object) -> None: ...

    def rename_node(self, node: object, newdir: object, newname: bytes) -> None: ...

    def statfs(self, node: object): ...

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
