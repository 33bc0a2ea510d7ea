"""A virtio-net backend on a stream socket speaking QEMU's ``-netdev stream`` framing (QEMU ``net/stream.c``; the
protocol of ``passt --socket``): each Ethernet frame goes as a 4-byte big-endian length and the frame, in both
directions. A :class:`bhyve_devices.backends.NetBackend` carrying plain frames (the device adds and strips the
virtio-net header).

``-s 2,virtio-net,stream=unix:PATH`` or ``stream=tcp:HOST:PORT`` (``tcp:[V6ADDR]:PORT``) connects there when the
backend is opened (a refused connection is an ``OSError`` naming the address); with QEMU's ``server=on`` the
backend listens there instead and takes one peer at a time (another vmmshim, QEMU, a switch): a second connection
while one is up is accepted and closed at once, and when the peer leaves the next one is let in. A ``unix:``
server replaces only a stale socket and removes its socket when closed. So two VMs connect with
``stream=unix:/tmp/l,server=on`` and ``stream=unix:/tmp/l``, and a VM reaches passt's network with
``passt --socket /tmp/p`` and ``stream=unix:/tmp/p``.

One thread per backend (``net-stream``) does all the socket I/O: it reads only while the device says the guest
has posted receive buffers and the frames read before are delivered (the peer is held back by the socket's own
flow control), and writes the frames the device's transmit queued. Transmit flow control is
:mod:`.netqueue`'s: a full queue (:data:`TX_QUEUE_FRAMES`, :data:`TX_QUEUE_BYTES`) holds the device's transmit up
to :data:`TX_WAIT_S`, then the frame is dropped; frames sent while no peer is connected are dropped
(``stats['tx_dropped']``), as on a link that is down. A length above :data:`MAX_FRAME` is a broken stream: the
connection is closed (``stats['rx_errors']``). A client whose peer leaves reports the end to the device (no more
frames); a server waits for the next peer.

Not supported: QEMU's ``reconnect``, ``addr.type=fd``, the datagram (``-netdev dgram``) and vhost-user protocols,
several peers at once.
"""

import collections
import errno
import os
import select
import socket
import struct
import threading

from bhyve_devices.virtio.chain import scatter

from .netqueue import FrameQueue, ThreadedFrameBackend, WakePipe
from .uart_sockets import _remove_stale_socket

TX_QUEUE_FRAMES = 256
TX_QUEUE_BYTES = 4 << 20
TX_WAIT_S = 0.1
RECV_CHUNK = 256 << 10          # bytes read from the peer per call
SEND_BATCH = 256 << 10          # queued frames packed into one write
MAX_FRAME = 65536 + 14 + 4      # a 64 KiB packet plus the Ethernet and VLAN headers (virtio-net's MAX_FRAME)
CONNECT_S = 5                   # seconds a connect may take when the backend is opened
LISTEN_BACKLOG = 1
OPTIONS = ("stream", "server")
ADDRESS_FORM = "unix:PATH or tcp:HOST:PORT"
_LEN = struct.Struct(">I")
_TRUE, _FALSE = ("on", "true", "yes", "1"), ("off", "false", "no", "0")


def parse_address(spec):
    """``unix:PATH`` -> (AF_UNIX, PATH); ``tcp:HOST:PORT`` / ``tcp:[V6]:PORT`` -> (AF_INET or AF_INET6, (HOST,
    PORT)). A bad one is a ``ValueError`` naming it."""
    kind, sep, rest = spec.partition(":")
    if kind == "unix" and sep and rest:
        return socket.AF_UNIX, rest
    if kind == "tcp" and sep:
        if rest.startswith("["):
            host, close, port = rest[1:].partition("]")
            ok, port, family = close and port.startswith(":"), port[1:], socket.AF_INET6
        else:
            host, colon, port = rest.rpartition(":")
            ok, family = colon and ":" not in host, socket.AF_INET
        if ok and host and port.isdigit() and int(port) <= 0xFFFF:
            return family, (host, int(port))
    raise ValueError(f"stream={spec}: expected {ADDRESS_FORM}")


def parse_options(options):
    """A dict of the ``-s`` options (:data:`OPTIONS`) -> (address spec, server)."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"stream: unknown option {unknown[0]!r} (stream takes {', '.join(OPTIONS)})")
    spec = str(options.get("stream", ""))
    server = str(options.get("server", "off")).lower()
    if server not in _TRUE + _FALSE:
        raise ValueError(f"stream: server={options['server']}: expected on or off")
    parse_address(spec)
    return spec, server in _TRUE


class StreamBackend(ThreadedFrameBackend):
    """See the module docstring. ``address``: the socket's address (a server's TCP port as bound)."""

    def __init__(self, spec, server=False):
        family, addr = parse_address(spec)
        self.spec, self.server = spec, server
        self.stats = dict(tx_frames=0, tx_dropped=0, rx_frames=0, rx_errors=0, peers=0)
        self._txq = FrameQueue(TX_QUEUE_FRAMES, TX_QUEUE_BYTES)
        self._wake = WakePipe()
        self._ready, self._receive = (lambda: False), None
        self._conn = self._listener = None
        self._made = None
        self._in, self._out = bytearray(), bytearray()
        self._frames = collections.deque()
        self._eof = self._eof_told = False
        self._stop = False
        try:
            if server:
                self._listen(family, addr)
            else:
                self._connect(family, addr)
        except BaseException:
            self._wake.close()
            raise
        self._thread = threading.Thread(target=self._loop, name="net-stream", daemon=True)
        self._thread.start()

    def _listen(self, family, addr):
        if family == socket.AF_UNIX:
            _remove_stale_socket(addr)
        s = socket.socket(family, socket.SOCK_STREAM)
        try:
            if family != socket.AF_UNIX:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(addr)
            s.listen(LISTEN_BACKLOG)
            if family == socket.AF_UNIX:
                st = os.lstat(addr)
                self._made = (addr, st.st_dev, st.st_ino)
        except OSError as e:
            s.close()
            raise OSError(e.errno or errno.EINVAL, f"stream={self.spec}: cannot listen: {e.strerror or e}") from None
        s.setblocking(False)
        self._listener = s
        self.address = s.getsockname()

    def _connect(self, family, addr):
        s = socket.socket(family, socket.SOCK_STREAM)
        s.settimeout(CONNECT_S)
        try:
            s.connect(addr)
        except OSError as e:
            s.close()
            raise OSError(e.errno or errno.ECONNREFUSED,
                          f"stream={self.spec}: cannot connect: {e.strerror or e}") from None
        self.address = s.getpeername()
        self._attach(s)

    def _attach(self, s):
        s.setblocking(False)
        if s.family in (socket.AF_INET, socket.AF_INET6):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._conn = s
        self.stats["peers"] += 1

    @property
    def connected(self):
        return self._conn is not None

    # ---- the NetBackend Protocol --------------------------------------------------------------------------------------
    def send(self, segs):
        self._queue_frame(b"".join(segs), TX_WAIT_S, open_=self._conn is not None)

    def recv_into(self, segs):
        if self._frames:
            return scatter(segs, self._frames.popleft())
        if self._eof and not self._frames:
            self._eof_told = True
            return 0
        return None

    def close(self):
        if not self._stop_thread():
            return
        self._thread = None
        for s in (self._conn, self._listener):
            if s is not None:
                s.close()
        self._conn = self._listener = None
        self._wake.close()
        if self._made is not None:
            path, dev, ino = self._made
            try:
                st = os.lstat(path)
                if (st.st_dev, st.st_ino) == (dev, ino):
                    os.unlink(path)
            except OSError:
                pass

    # ---- the thread ---------------------------------------------------------------------------------------------------
    def _drop_peer(self):
        self._conn.close()
        self._conn = None
        self._in.clear()
        self._out.clear()
        while self._txq.get() is not None:
            self.stats["tx_dropped"] += 1
        if not self.server:
            self._eof = True

    def _accept(self):
        try:
            s, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        if self._conn is not None:
            s.close()           # one peer at a time
        else:
            self._attach(s)

    def _read(self):
        try:
            data = self._conn.recv(RECV_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop_peer()
            return
        buf = self._in
        buf += data
        at = 0
        while len(buf) - at >= _LEN.size:
            (n,) = _LEN.unpack_from(buf, at)
            if n > MAX_FRAME:
                self.stats["rx_errors"] += 1
                self._drop_peer()
                return
            if len(buf) - at - _LEN.size < n:
                break
            if n:
                self._frames.append(bytes(buf[at + _LEN.size:at + _LEN.size + n]))
                self.stats["rx_frames"] += 1
            at += _LEN.size + n
        del buf[:at]

    def _write(self):
        while len(self._out) < SEND_BATCH:
            frame = self._txq.get()
            if frame is None:
                break
            self._out += _LEN.pack(len(frame))
            self._out += frame
        if not self._out:
            return
        try:
            n = self._conn.send(self._out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop_peer()
            return
        del self._out[:n]

    def _deliver(self):
        while (self._receive is not None and (self._frames or (self._eof and not self._eof_told))
               and self._ready()):
            before = (len(self._frames), self._eof_told)
            self._receive()
            if (len(self._frames), self._eof_told) == before:
                break           # the device took nothing: it waits for buffers (rx_kick)

    def _loop(self):
        wake_r = self._wake.r
        while not self._stop:
            self._deliver()
            conn = self._conn
            poller = select.poll()
            poller.register(wake_r, select.POLLIN)
            if self._listener is not None:
                poller.register(self._listener, select.POLLIN)
            ev = 0
            if conn is not None:
                ev = select.POLLIN if not self._frames and self._ready() else 0
                if self._out or len(self._txq):
                    ev |= select.POLLOUT
                if ev:
                    poller.register(conn, ev)
            events = dict(poller.poll())
            if events.get(wake_r):
                self._wake.drain()
            if self._listener is not None and events.get(self._listener.fileno()):
                self._accept()
            if conn is not None and self._conn is conn:
                rev = events.get(conn.fileno(), 0)
                if rev & select.POLLIN or (rev & (select.POLLHUP | select.POLLERR) and ev & select.POLLIN):
                    self._read()
                if self._conn is conn and (self._out or len(self._txq)):
                    self._write()
