"""Doorbells: device registers whose guest writes signal an eventfd instead of exiting, served by one thread per VM.

A device names them (``doorbells(bar)`` of a PCI device: ``(offset, size, datamatch, fn)``; the virtio transport's
queue-notify registers); the VM registers each where the BAR is mapped, through the provider's
``Machine.doorbell`` extension (KVM's ioeventfd, KVM API 4.59), and removes it when the BAR moves. A write then
costs the guest no exit to user space: KVM signals the eventfd and the guest runs on, while this module's thread
(``vmmshim-doorbells``), waiting on every eventfd with epoll, calls the doorbell's ``fn()``. Rings that arrive
before the thread reads the eventfd count as one: a doorbell says "look at your queue", not how often.

Where the provider has none (NVMM, the soft CPU) or ``-o vmmshim.doorbells=false``, the writes exit and reach
the device through the bus as before, so a device answers the same either way. A doorbell removed with a ring
not yet served is served by the caller of :meth:`Doorbells.remove` before it returns.

Not supported: doorbells that carry data (``fn`` gets no value: a register whose value matters is registered
once per value with ``datamatch``), reads.
"""

import os
import select
import threading


class Doorbells:
    """The VM's doorbells. ``register``/``unregister(addr, size, pio, datamatch, fd)`` are the provider's
    (through the ops table); ``register`` returns False where the provider cannot. ``on_error(exc)`` gets an
    exception a doorbell's function raised (the thread goes on)."""

    def __init__(self, register, unregister, on_error=None):
        self._register, self._unregister = register, unregister
        self._on_error = on_error or (lambda exc: None)
        self._lock = threading.Lock()
        self._bells = {}            # eventfd -> (fn, key)
        self._closing = []          # eventfds removed, closed by the thread after its current round
        self._ep = None
        self._stop_fd = None
        self._thread = None
        self._stopping = False
        self.rings = 0

    def add(self, addr, size, pio, datamatch, fn):
        """Registers one doorbell; returns its key for :meth:`remove`, or None where the provider refused it
        (the writes keep exiting)."""
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        key = (addr, size, pio, datamatch, fd)
        try:
            ok = self._register(*key)
        except OSError:
            ok = False
        if not ok:
            os.close(fd)
            return None
        with self._lock:
            if self._thread is None:
                self._start()
            self._bells[fd] = (fn, key)
            self._ep.register(fd, select.EPOLLIN)
        return key

    def remove(self, key):
        """Unregisters a doorbell (its writes exit again); a ring it still holds is served here."""
        fd = key[4]
        with self._lock:
            entry = self._bells.pop(fd, None)
            if entry is None:
                return
            try:
                self._ep.unregister(fd)
            except (OSError, ValueError):
                pass
        try:
            self._unregister(*key)
        except OSError:
            pass                    # the machine is gone: nothing rings any more
        if self._take(fd):
            self._call(entry[0])
        with self._lock:
            self._closing.append(fd)
        self._wake()

    def close(self):
        """Removes every doorbell and stops the thread (before the machine is destroyed)."""
        for fd in list(self._bells):
            entry = self._bells.get(fd)
            if entry is not None:
                self.remove(entry[1])
        thread = self._thread
        if thread is None:
            return
        self._stopping = True
        self._wake()
        if thread is not threading.current_thread():
            thread.join(5)
        if not thread.is_alive():
            for fd in self._closing:
                os.close(fd)
            self._closing = []
            os.close(self._stop_fd)
            self._ep.close()
            self._thread = None

    @property
    def active(self):
        return len(self._bells)

    # ---- the thread --------------------------------------------------------------------------------------------------
    def _start(self):
        self._ep = select.epoll()
        self._stop_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._ep.register(self._stop_fd, select.EPOLLIN)
        self._thread = threading.Thread(target=self._loop, name="vmmshim-doorbells", daemon=True)
        self._thread.start()

    def _wake(self):
        if self._stop_fd is not None:
            os.eventfd_write(self._stop_fd, 1)

    @staticmethod
    def _take(fd):
        try:
            return os.eventfd_read(fd) > 0
        except BlockingIOError:
            return False

    def _call(self, fn):
        self.rings += 1
        try:
            fn()
        except Exception as exc:    # a device's bug must not end the doorbell thread
            self._on_error(exc)

    def _loop(self):
        ep, stop_fd, bells = self._ep, self._stop_fd, self._bells
        while not self._stopping:
            try:
                events = ep.poll()
            except InterruptedError:
                continue
            for fd, _ in events:
                if fd == stop_fd:
                    self._take(fd)
                    continue
                entry = bells.get(fd)
                if entry is not None and self._take(fd):
                    self._call(entry[0])
            if self._closing:
                with self._lock:
                    closing, self._closing = self._closing, []
                for fd in closing:
                    os.close(fd)
