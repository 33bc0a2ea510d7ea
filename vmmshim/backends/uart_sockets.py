"""The UART and virtio-console backends that listen on a socket: bhyve's ``tcp=ADDR:PORT``
(``uart_tcp_backend``) and vmmshim's ``unix:PATH`` (:func:`vmmshim.backends.uart.open_backend` opens them).

One client at a time, as bhyve's TCP backend does: a second connection while one is active is accepted and
closed at once, output while no client is connected is dropped, and a client that disconnects lets the next one
in. ``unix:PATH`` replaces only a stale socket (one that refuses connections); any other file there is left alone
and refused, and the socket is removed at close (or at exit, if the process ends without closing it).

Not supported: telnet negotiation on ``tcp=``, several clients at once.
"""

import atexit
import errno
import os
import selectors
import socket
import stat
import threading

from .charbase import READ_CHUNK, Backend as _Backend

LISTEN_BACKLOG = 1          # bhyve's uart_tcp_backend listen(2) backlog
STALE_PROBE_S = 1           # seconds a connect() to an existing unix: socket may take before it counts as live


class _ListenBackend(_Backend):
    """A listening stream socket; one client at a time gets the output and sends input. A connection while a
    client is active is accepted and closed at once; output while no client is connected is dropped.
    ``on_client``, where set, is called from the reader thread with True when a client connects and False when
    it goes (virtio-console's PORT_OPEN)."""

    on_client = None

    def __init__(self, lsock):
        super().__init__()
        self._lsock = lsock
        self._lsock.listen(LISTEN_BACKLOG)
        self._client = None
        self._clock = threading.Lock()

    def _emit(self, data):
        with self._clock:
            c = self._client
        if c is not None:
            try:
                c.sendall(data)
            except OSError:
                pass

    def _input_fd(self):
        return self._lsock.fileno()

    def _accept(self):
        try:
            conn, _ = self._lsock.accept()
        except OSError:
            return
        with self._clock:
            if self._client is None:
                self._client = conn
                return
        conn.close()                    # bhyve: a second client is accepted and dropped

    def _drop_client(self):
        with self._clock:
            c, self._client = self._client, None
        if c is not None:
            c.close()
            self._client_changed(False)

    def _client_changed(self, up):
        if self.on_client is not None:
            self.on_client(up)

    def _reader(self):
        with selectors.DefaultSelector() as sel:
            sel.register(self._stop_r, selectors.EVENT_READ, "stop")
            sel.register(self._lsock.fileno(), selectors.EVENT_READ, "listen")
            try:
                while not self._closed:
                    events = sorted(sel.select(), key=lambda ev: ev[0].data == "listen")  # a hang-up first
                    for key, _ in events:
                        if key.data == "stop":
                            return
                        if key.data == "listen":
                            had = self._client
                            self._accept()
                            if had is None and self._client is not None:
                                sel.register(self._client.fileno(), selectors.EVENT_READ, "client")
                                self._client_changed(True)
                            continue
                        try:
                            data = self._client.recv(READ_CHUNK)
                        except OSError:
                            data = b""
                        if data:
                            self._deliver(data)
                        else:
                            sel.unregister(key.fd)
                            self._drop_client()
            finally:
                self._drop_client()

    def close(self):
        super().close()
        self._lsock.close()


class UnixSocketBackend(_ListenBackend):
    """``unix:PATH``: a listening Unix stream socket at ``path``. Only a stale socket there (nobody listening)
    is replaced; any other file is an ``OSError`` naming the path, and is left alone. :meth:`close` removes the
    socket (only if the file at ``path`` is still the one it made); a process that ends without closing it
    (an error while the VM is set up) closes it at exit (``atexit``)."""

    def __init__(self, path):
        self.path = path
        _remove_stale_socket(path)
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            lsock.bind(path)
            st = os.lstat(path)
        except OSError as e:
            lsock.close()
            raise OSError(e.errno or errno.EINVAL, f"{path}: {e.strerror or e}") from None
        self._made = (st.st_dev, st.st_ino)
        super().__init__(lsock)
        atexit.register(self.close)

    def close(self):
        if self._closed:
            return
        atexit.unregister(self.close)
        super().close()
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._made:
                os.unlink(self.path)
        except OSError:
            pass


def _remove_stale_socket(path):
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(errno.EEXIST, f"{path}: exists and is not a socket (left alone)")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(STALE_PROBE_S)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)                 # stale: its listener has gone
        return
    except OSError as e:
        raise OSError(e.errno or errno.EEXIST, f"{path}: socket not replaced ({e.strerror or e})") from None
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"{path}: a live socket is listening there (left alone)")


class TcpBackend(_ListenBackend):
    """bhyve's ``tcp=ADDR:PORT`` (``uart_tcp_backend``): listens on ``ADDR:PORT`` (IPv4, or IPv6 as
    ``[ADDR]:PORT``) with ``SO_REUSEADDR``; :attr:`address` is where it listens (port 0 picks a free port)."""

    def __init__(self, spec):
        host, port = parse_tcp_address(spec)
        try:
            infos = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0,
                                       socket.AI_PASSIVE | socket.AI_NUMERICSERV)
        except socket.gaierror as e:
            raise OSError(errno.EINVAL, f"tcp={spec}: {e.strerror}") from None
        family, stype, proto, _, sockaddr = infos[0]
        lsock = socket.socket(family, stype, proto)
        try:
            lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            lsock.bind(sockaddr)
        except OSError as e:
            lsock.close()
            raise OSError(e.errno, f"tcp={spec}: {e.strerror}") from None
        self.address = lsock.getsockname()[:2]
        super().__init__(lsock)


def parse_tcp_address(spec):
    """``"127.0.0.1:1234"`` / ``"[::1]:1234"`` -> (host, port); a bad one is a ``ValueError``."""
    if spec.startswith("["):
        host, sep, rest = spec[1:].partition("]")
        ok = sep and rest.startswith(":")
        port = rest[1:]
    else:
        host, sep, port = spec.rpartition(":")
        ok = sep and ":" not in host
    if not ok or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"tcp={spec}: expected tcp=ADDR:PORT (IPv6 as tcp=[ADDR]:PORT)")
    return host, int(port)
