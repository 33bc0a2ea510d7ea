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

The socket backends (``tcp=``, ``unix:``) are in :mod:`.uart_sockets` (one client at a time, as bhyve's TCP
backend), the common base in :mod:`.charbase`; both are re-exported here.

Not supported: bhyve's ``ttyS`` capsicum rights, telnet negotiation on ``tcp=``, hot-plugging a pty reader
(output written while no one has the pty open stays in the kernel's pty buffer and may block, so output to a
full pty is dropped instead).
"""

import errno
import os
import stat
import sys

from .charbase import BUFFER_MAX, FLUSH_NS, Backend as _Backend  # noqa: F401 (BUFFER_MAX, FLUSH_NS re-exported)
from .escape import EscapeFilter
from .uart_sockets import TcpBackend, UnixSocketBackend, parse_tcp_address  # noqa: F401 (re-exported)

TCP_PREFIX = "tcp="
UNIX_PREFIX = "unix:"
FILE_PREFIX = "file:"


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

