"""The 9P2000.L session of one virtio-9p device: framing of a request over guest memory, the fid table, qids,
and the answer to everything, well-formed (9P2000.L as :mod:`.messages` cites; bhyve's is lib9p's
``lib9p/request.c`` and ``connection.c``).

:meth:`P9Server.serve` takes one request as the device sees it, the device-readable segments holding the
T-message and the device-writable ones for the R-message (memoryviews of guest RAM), and returns how many bytes of
reply it wrote there. It never raises and always answers when the writable part can hold an Rlerror (11 bytes):

- the header (``size[4] type[1] tag[2]``) is read first; a ``size`` below 7, beyond the readable bytes or beyond
  the negotiated msize, a body that does not parse (a string, list or count running past ``size``): Rlerror
  EPROTO (EMSGSIZE past msize); a type the server does not serve (9P2000/9P2000.u forms, an R-message): Rlerror
  EOPNOTSUPP; the tag is echoed (NOTAG when there was none to read);
- an OSError from the file system is Rlerror with its errno; a ValueError/OverflowError from a host call (a NUL
  in a name, an offset past 2^63) EINVAL; anything else is a server bug: Rlerror EIO, recorded in
  :attr:`P9Server.errors`;
- Twrite's data is written from the readable segments where it lies (after the 23-byte header), Tread's and
  Treaddir's go straight into the writable segments after the 11-byte Rread header: no copy of file data.

Fids (at most ``max_fids``, ENFILE past it) hold a node of the backend, and once opened its open file (or the
empty attribute list of an xattr walk). Tversion starts the session over: every fid is clunked, msize is the
client's, at most :data:`MAX_MSIZE` (bhyve's 128 pages) and at least :data:`MIN_MSIZE`. A qid's path is the inode
number with a 16-bit prefix per host file system (the share's is 0); its version is always 0 (Linux's v9fs
compares versions to match inodes, so a version that moved with every write would look like a new file).

Requests are served one at a time (the device's lock); a Tflush finds nothing in flight and is answered at once.

A backend with a compiled Tread/Twrite (:class:`CompiledReadWrite`, ``vmmshim/backends/p9fast.py``) is told of
every file the server opens for a fid (``bind_fid``, after Tlopen and Tlcreate; the backend forgets the fid when
the file is closed), and :meth:`P9Server.serve_compiled` hands it a request whose chain is one indirect table: it
answers a Tread or Twrite on such a fid exactly as :meth:`P9Server.serve` would, or gives it back untouched.

Not supported: Tauth (EOPNOTSUPP: no authentication), 9P2000 and 9P2000.u, attaching anywhere but the share's root
(``aname`` is ignored), several sessions.
"""

import errno
import stat
import struct
from typing import Optional, Protocol, runtime_checkable

from bhyve_devices.virtio.chain import gather, scatter, split_segments

from . import messages as M
from .ops import MIN_MSIZE, Fid, Operations  # noqa: F401 (re-exported)

MAX_MSIZE = 128 * 4096          # bhyve's lc_msize: L9P_MAX_IOV pages
MAX_FIDS = 32768
QPATH_INO_BITS = 48
_QPATH_INO_MASK = (1 << QPATH_INO_BITS) - 1
_MAX_DEV_PREFIX = 0xFFFF
_U32 = struct.Struct("<I")


@runtime_checkable
class CompiledReadWrite(Protocol):
    """What a backend offers to serve Tread and Twrite itself (the share of ``vmmshim/backends/p9fs.py``)."""

    compiled: bool      #: :meth:`serve_compiled` may serve requests (else it always returns None)

    def bind_fid(self, fid: int, handle: object) -> None:
        """``fid`` was just opened as ``handle``; the backend forgets it when it closes ``handle``."""

    def serve_compiled(self, ram: memoryview, table: int, tsize: int, msize: int) -> Optional[int]:
        """The Tread/Twrite whose chain is the indirect table at ``table`` (``tsize`` entries) in ``ram``: the
        used length with the R-message written, or None with nothing read or written."""

    def serve_queue(self, ram: memoryview, ring: tuple, msize: int, max_n: int) -> Optional[tuple]:
        """The available chains of the virtqueue ``ring`` (``Virtqueue.ring_state``) served as
        :meth:`serve_compiled` serves one and put in its used ring, up to ``max_n``, stopping at the first one it
        gives back: ``(served, last_avail, used_idx)``, or None (the rings are not in ``ram``)."""


class P9Server(Operations):
    """One 9P2000.L session over ``fs`` (a :class:`~bhyve_devices.backends.P9Filesystem`); see the module
    docstring."""

    def __init__(self, fs, max_fids=MAX_FIDS, max_msize=MAX_MSIZE):
        self.fs = fs
        self.readonly = bool(fs.readonly)
        self.max_fids = max_fids
        self.max_msize = max(max_msize, MIN_MSIZE)
        self.msize = self.max_msize
        self.fids = {}
        self.errors = []            # server bugs: what was raised where an errno was expected
        self.stats = dict(requests=0, lerrors=0)
        self._devs = {}             # st_dev -> qid path prefix
        self._wr = ()
        self._room = 0
        self._handlers = self.handlers()
        self.compiled = isinstance(fs, CompiledReadWrite) and bool(fs.compiled)

    # ---- one request --------------------------------------------------------------------------------------------
    def serve(self, readable, writable):
        """Serves the T-message in ``readable``; returns the length of the R-message written to ``writable``."""
        self.stats["requests"] += 1
        room = sum(map(len, writable))
        if room < M.IOHDRSZ:
            return 0                # not even an Rlerror fits: nothing can be said
        tag = M.NOTAG
        try:
            head = gather(readable, M.TWRITE_HDRSZ)
            if len(head) < M.HEADER_SIZE:
                raise M.ProtocolError("no header")
            size, mtype, tag = M.HDR.unpack_from(head)
            return self._request(readable, writable, room, head, size, mtype, tag)
        except OSError as exc:
            code = exc.errno if isinstance(exc.errno, int) and 0 < exc.errno < 1 << 32 else errno.EIO
        except M.ProtocolError:
            code = errno.EPROTO
        except (ValueError, OverflowError):
            code = errno.EINVAL
        except Exception as exc:  # a server bug must not take the device down: the guest gets EIO
            self.errors.append(repr(exc))
            code = errno.EIO
        self.stats["lerrors"] += 1
        return scatter(writable, M.message(M.RLERROR, tag, _U32.pack(code)))

    def _request(self, readable, writable, room, head, size, mtype, tag):
        avail = sum(map(len, readable))
        if size < M.HEADER_SIZE or size > avail:
            raise M.ProtocolError(f"size {size}")
        if size > self.msize:
            raise OSError(errno.EMSGSIZE, "message larger than msize")
        handler = self._handlers.get(mtype)
        if handler is None:
            raise OSError(errno.EOPNOTSUPP, f"message type {mtype}")
        codec = M.CODECS[mtype]
        if mtype == M.TWRITE:
            if size < M.TWRITE_HDRSZ:
                raise M.ProtocolError("Twrite too short")
            fid, offset, count = codec.head.unpack_from(head, M.HEADER_SIZE)
            if count > size - M.TWRITE_HDRSZ:
                raise M.ProtocolError("Twrite count runs past the message")
            data = split_segments(readable, M.TWRITE_HDRSZ)[1]
            if count < size - M.TWRITE_HDRSZ or size < avail:
                data = split_segments(data, count)[0]
            res = handler(fid, offset, count, data)
        else:
            buf = head if size <= len(head) else gather(readable, size)
            args = codec.decode(buf, M.HEADER_SIZE, size)
            self._wr, self._room = writable, room
            try:
                res = handler(*args)
            finally:
                self._wr = ()
        body, extra = res if isinstance(res, tuple) else (res, 0)
        out = M.HDR.pack(M.HEADER_SIZE + len(body) + extra, mtype + 1, tag) + body
        if len(out) + extra > room:
            raise OSError(errno.EMSGSIZE, "the reply does not fit the buffers")
        scatter(writable, out)
        return len(out) + extra

    def serve_compiled(self, ram, table, tsize):
        """The request whose chain is the indirect table at ``table`` in ``ram`` through the backend's compiled
        Tread/Twrite: the reply's length, or None (nothing done) where :meth:`serve` must answer it."""
        used = self.fs.serve_compiled(ram, table, tsize, self.msize)
        if used is not None:
            self.stats["requests"] += 1
        return used

    def serve_queue(self, queue, max_n):
        """The queue's available chains through the backend's queue pass (see :class:`CompiledReadWrite`): how
        many it served, or None where it cannot look at this queue (its rings not in RAM, no indirect
        descriptors)."""
        ring = queue.ring_state()
        if ring is None:
            return None
        got = self.fs.serve_queue(queue.mem.ram, ring, self.msize, max_n)
        if got is None:
            return None
        n, last_avail, used_idx = got
        if not n:
            return 0
        queue.advance(n, last_avail, used_idx)
        self.stats["requests"] += n
        return n

    def data_segments(self, count):
        """The writable segments after the Rread/Rreaddir header, cut to what ``count`` may fill: ``(segs,
        count)`` with ``count`` bounded by msize and by the room there is."""
        room = self._room - M.IOHDRSZ
        count = max(0, min(count, room, self.msize - M.IOHDRSZ))
        segs = split_segments(self._wr, M.IOHDRSZ)[1]
        return (segs if count == room else split_segments(segs, count)[0]), count

    # ---- fids and qids --------------------------------------------------------------------------------------------
    def fid(self, fid):
        f = self.fids.get(fid)
        if f is None:
            raise OSError(errno.EBADF, f"no fid {fid}")
        return f

    def opened(self, fid, handle):
        """``fid`` now stands for the open file ``handle`` (Tlopen, Tlcreate)."""
        if self.compiled:
            self.fs.bind_fid(fid, handle)

    def check_new(self, fid):
        if fid == M.NOFID or fid in self.fids:
            raise OSError(errno.EINVAL, f"fid {fid} is in use")
        if len(self.fids) >= self.max_fids:
            raise OSError(errno.ENFILE, "the guest's fids are all in use")

    def clunk(self, fid):
        f = self.fids.pop(fid, None)
        if f is None:
            raise OSError(errno.EBADF, f"no fid {fid}")
        try:
            if f.handle is not None:
                self.fs.close_file(f.handle)
        finally:
            self.fs.release(f.node)

    def qpath(self, dev, ino):
        prefix = self._devs.get(dev)
        if prefix is None:
            prefix = self._devs[dev] = min(len(self._devs), _MAX_DEV_PREFIX)
        return prefix << QPATH_INO_BITS | ino & _QPATH_INO_MASK

    def qid(self, st):
        m = st.st_mode
        qtype = M.QTDIR if stat.S_ISDIR(m) else M.QTSYMLINK if stat.S_ISLNK(m) else M.QTFILE
        return M.QID_STRUCT.pack(qtype, 0, self.qpath(st.st_dev, st.st_ino))

    def reset(self):
        """Clunks every fid (a device reset, a Tversion, closing)."""
        for fid in list(self.fids):
            try:
                self.clunk(fid)
            except OSError:
                pass
        self.msize = self.max_msize
