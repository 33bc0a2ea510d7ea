"""The base of every UART and virtio-console host backend (:mod:`vmmshim.backends.uart`,
:mod:`vmmshim.backends.uart_sockets`): the device's ``sink`` with optional line buffering, and one daemon reader
thread that feeds input to the device, retrying the bytes it has no room for.

Not supported: flow control towards the host side (input the device refuses is retried every ``RETRY_S``).
"""

import errno
import os
import selectors
import threading
import time

RETRY_S = 0.005
FLUSH_NS = 5_000_000        # a partial line waits at most this long
BUFFER_MAX = 4096
READ_CHUNK = 4096           # input bytes read per system call
PTY_REOPEN_S = 0.1          # a pty without a reader is looked at again after this long
JOIN_S = 2                  # seconds close() waits for the reader thread


class Backend:
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
