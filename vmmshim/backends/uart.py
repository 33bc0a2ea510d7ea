"""Host ends for :class:`bhyve_devices.uart16550.UART16550` and virtio-console, as
:class:`bhyve_devices.backends.CharBackend` s (bhyve ``uart_backend.c``; xhyve/bhyve ``-l com1,stdio``,
``com2,autopty``, ``com1,/dev/ttyX``, ``com1,tcp=127.0.0.1:1234`` (``uart_tcp_backend``); plus ``file:PATH`` and
``unix:PATH``).

A backend is the device's ``sink`` (``write(bytes)``) and, once :meth:`start` is given the device (or any
``enqueue_input(bytes) -> int`` callable), runs one daemon reader thread that feeds input, retrying the bytes the
UART has no room for. :meth:`close` writes what is buffered, stops the thread and restores what it changed (the
tty mode of stdin).

Output is written as the guest sends it, unless :meth:`_Backend.buffer_lines` gave the backend a timer service:
then it is written a line at a time (a polling console sends a byte per port write, and a system call per byte
was most of what a console byte cost in the nested lab), a partial line (a prompt) at most ``FLUSH_NS`` after its
first byte, and at once past ``BUFFER_MAX`` bytes.
:func:`open_backend` turns a bhyve option string into a backend; a spec it cannot open is an ``OSError`` whose
one-line ``strerror`` names the path or address.

The socket backends (``tcp=``, ``unix:``) take one client at a time, as bhyve's TCP backend does: a second
connection while one is active is accepted and closed at once, output while no client is connected is dropped,
and a client that disconnects lets the next one in. ``unix:PATH`` replaces only a stale socket (one that refuses
connections); any other file there is left alone and refused.

Not supported: bhyve's ``ttyS`` capsicum rights, telnet negotiation on ``tcp=``, hot-plugging a pty reader
(output written while no one has the pty open stays in the kernel's pty buffer and may block, so output to a
full pty is dropped instead).
"""

import atexit
import errno
import os
import selectors
import socket
import stat
import sys
import threading
import time

from .escape import EscapeFilter

RETRY_S = 0.005
FLUSH_NS = 5_000_000        # a partial line waits at most this long
BUFFER_MAX = 4096
READ_CHUNK = 4096           # input bytes read per system call
PTY_REOPEN_S = 0.1          # a pty without a reader is looked at again after this long
JOIN_S = 2                  # seconds close() waits for the reader thread
LISTEN_BACKLOG = 1          # bhyve's uart_tcp_backend listen(2) backlog
STALE_PROBE_S = 1           # seconds a connect() to an existing unix: socket may take before it counts as live
TCP_PREFIX = "tcp="
UNIX_PREFIX = "unix:"
FILE_PREFIX = "file:"


class _Backend:
    def __init__(self):
        self._thread = None
        self._stop_r, self._stop_w = os.pipe()
        self._closed = False
        self._feed = None
        self._timers = None
        self._obuf = bytearray()
        self._out_lock = threading.Lock()
        self._flush_armed = False

    # the sink
    def write(self, data):
        if self._timers is None:
            self._emit(data)
            return
        with self._out_lock:
            self._obuf += data
            if b"\n" in data or len(self._obuf) >= BUFFER_MAX:
                self._flush_locked()
            elif not self._flush_armed:
                self._flush_armed = True
                self._timers.arm(self._timers.now_ns() + FLUSH_NS, self.flush)

    def _emit(self, data):
        raise NotImplementedError

    def buffer_lines(self, timers):
        """Writes output a line at a time from now on; ``timers`` (``now_ns``/``arm``) flushes a partial line."""
        self._timers = timers

    def flush(self):
        with self._out_lock:
            self._flush_armed = False
            self._flush_locked()

    def _flush_locked(self):
        if self._obuf:
            data = bytes(self._obuf)
            self._obuf.clear()
            self._emit(data)            # under the lock: flushes from two threads stay in order

    def start(self, uart):
        self._feed = uart.enqueue_input if hasattr(uart, "enqueue_input") else uart
        fd = self._input_fd()
        if fd is None:
            return self
        self._thread = threading.Thread(target=self._reader, name=f"uart-{type(self).__name__}", daemon=True)
        self._thread.start()
        return self

    def _input_fd(self):
        return None

    def _wait_readable(self, fd, timeout=None):
        """True when ``fd`` is readable, False when :meth:`close` was called."""
        with selectors.DefaultSelector() as sel:
            try:
                sel.register(fd, selectors.EVENT_READ, "fd")
            except PermissionError:      # a regular file or /dev/null: epoll refuses it, it is always readable
                return not self._closed
            sel.register(self._stop_r, selectors.EVENT_READ, "stop")
            for key, _ in sel.select(timeout):
                if key.data == "stop":
                    return False
            return True

    def _deliver(self, data):
        while data and not self._closed:
            n = self._feed(data)
            data = data[n:]
            if data:
                time.sleep(RETRY_S)

    def _reader(self):
        fd = self._input_fd()
        while not self._closed:
            if not self._wait_readable(fd):
                return
            try:
                data = os.read(fd, READ_CHUNK)
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.EINTR):
                    continue
                if e.errno == errno.EIO:   # a pty whose other end is closed: wait for a new opener
                    time.sleep(PTY_REOPEN_S)
                    continue
                return
            if not data:
                if not self._on_eof():
                    return
                continue
            self._deliver(data)

    def _on_eof(self):
        return False

    def close(self):
        if self._closed:
            return
        self.flush()
        self._closed = True
        os.write(self._stop_w, b"x")
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=JOIN_S)
        os.close(self._stop_r)
        os.close(self._stop_w)


class StdioBackend(_Backend):
    """Output to stdout; input from stdin, in raw mode when stdin is a tty (restored by :meth:`close`), where
    :meth:`set_escape` takes the console escape keys out of the input (``escape.py``)."""

    def __init__(self, stdin_fd=0, stdout_fd=1):
        super().__init__()
        self._in, self._out = stdin_fd, stdout_fd
        self._saved = None
        self._escape = self._on_key = None
        if os.isatty(stdin_fd):
            import termios
            import tty
            self._saved = termios.tcgetattr(stdin_fd)
            tty.setraw(stdin_fd)

    @property
    def raw_tty(self):
        """True while stdin is a tty this backend set raw."""
        return self._saved is not None

    def set_escape(self, on_key):
        """``on_key(key)`` gets each ``Ctrl-A KEY`` typed on a tty stdin; False where stdin is no tty (no escape:
        Ctrl-C there is a signal)."""
        if self._saved is None:
            return False
        self._escape, self._on_key = EscapeFilter(), on_key
        return True

    def _deliver(self, data):
        if self._escape is not None:
            data, keys = self._escape.feed(data)
            for key in keys:
                self._on_key(key)
        super()._deliver(data)

    def _emit(self, data):
        try:
            os.write(self._out, data)
        except OSError:
            pass

    def _input_fd(self):
        return self._in

    def close(self):
        super().close()
        if self._saved is not None:
            import termios
            termios.tcsetattr(self._in, termios.TCSADRAIN, self._saved)
            self._saved = None


class FileBackend(_Backend):
    """Output appended to a file; no input."""

    def __init__(self, path):
        super().__init__()
        try:
            self._f = open(path, "ab", buffering=0)
        except OSError as e:
            raise OSError(e.errno, f"{path}: {e.strerror}") from None

    def _emit(self, data):
        self._f.write(data)

    def close(self):
        super().close()
        self._f.close()


class TtyBackend(_Backend):
    """A host character device (``/dev/ttyX`` or a pty slave) for both directions, set raw."""

    def __init__(self, path):
        super().__init__()
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        except OSError as e:
            raise OSError(e.errno, f"{path}: {e.strerror}") from None
        if os.isatty(self._fd):
            import tty
            tty.setraw(self._fd)

    def _emit(self, data):
        try:
            os.write(self._fd, data)
        except OSError:
            pass

    def _input_fd(self):
        return self._fd

    def close(self):
        super().close()
        os.close(self._fd)


class PtyBackend(_Backend):
    """``autopty``: a new pseudo-terminal; the guest is the master side and ``path`` names the slave, which is
    printed to ``announce`` (stderr) so that a user can ``screen``/``cu`` it."""

    def __init__(self, announce=sys.stderr):
        super().__init__()
        import tty
        self._master, slave = os.openpty()
        tty.setraw(slave)
        self.path = os.ttyname(slave)
        self._slave = slave             # kept open so that the master never sees EIO between readers
        os.set_blocking(self._master, False)
        if announce is not None:
            print(f"vmmshim: com port on {self.path}", file=announce, flush=True)

    def _emit(self, data):
        try:
            os.write(self._master, data)
        except OSError:
            pass                        # full: nobody is reading the pty

    def _input_fd(self):
        return self._master

    def close(self):
        super().close()
        os.close(self._master)
        os.close(self._slave)


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


def open_backend(spec):
    """``stdio``, ``autopty``, ``file:PATH`` (created or appended to), ``unix:PATH`` (listen there),
    ``tcp=ADDR:PORT`` (listen there), or an existing path: a character device is opened as a tty, anything else
    is a file the output is appended to. A path that does not exist is an ``OSError`` (ENOENT) naming it."""
    if spec == "stdio":
        return StdioBackend()
    if spec == "autopty":
        return PtyBackend()
    if spec.startswith(FILE_PREFIX):
        return FileBackend(spec[len(FILE_PREFIX):])
    if spec.startswith(UNIX_PREFIX):
        return UnixSocketBackend(spec[len(UNIX_PREFIX):])
    if spec.startswith(TCP_PREFIX):
        return TcpBackend(spec[len(TCP_PREFIX):])
    try:
        mode = os.stat(spec).st_mode
    except FileNotFoundError:
        raise OSError(errno.ENOENT, f"{spec}: No such file or directory") from None
    if stat.S_ISCHR(mode):
        return TtyBackend(spec)
    return FileBackend(spec)
