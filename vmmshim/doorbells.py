"""Doorbells: device registers whose guest writes signal an eventfd instead of exiting, served by one thread per VM.

A device names them (``doorbells(bar)`` of a ``bhyve_devices.base.Doorbells`` device: ``(offset, size, datamatch,
fn)``; the virtio transport's queue-notify registers); the VM's fast paths (``vmmshim/fastpaths.py``) register each
where the BAR is mapped, through the provider's ``Machine.doorbell`` extension (KVM's ioeventfd, KVM API 4.59),
and remove it when the BAR moves. A write then costs the guest no exit to user space: KVM signals the eventfd and the guest runs on, while a doorbell thread,
waiting on its eventfds with epoll, calls the doorbell's ``fn()``. There is one thread per *group* (a device:
``vmmshim-doorbells <name>``), so a device may do its work in ``fn`` itself (virtio-blk serves its queue there)
without holding up another device's doorbells, and a request costs no hand-off to a worker. Rings that arrive
before the thread reads the eventfd count as one: a doorbell says "look at your queue", not how often.

Where the provider has none (NVMM, the soft CPU) or ``-o vmmshim.doorbells=false``, a doorbell may still be kept
in *software* (``add(..., software=True)``): the write exits, and the device rings the eventfd itself
(``vmmshim/fastpaths.py``), so its work runs on the same thread either way. Hosts without eventfd and epoll
(NetBSD) have no doorbells at all: the device works on the thread that wrote. A doorbell removed with a ring not
yet served is served by the caller of :meth:`Doorbells.remove` before it returns.

A vCPU about to sleep in HLT serves the doorbells that rang first (:meth:`Doorbells.poll_idle`, the VM's idle
hook): a driver that kicks a queue and then idles (a block request at queue depth 1) has its request served and
its interrupt pending before the vCPU would sleep, instead of a hand-off to the doorbell thread and a wake-up back
(two thread switches a request; what they cost in the nested lab: ``docs/lab.md``, "Serving at HLT"). A group's function
never runs on two threads at once (``_Group.busy``): a halting vCPU skips a group its thread is serving. The cost:
while it serves, that vCPU takes no interrupt (it would have slept); ``-o vmmshim.halt_serve=false`` leaves every
ring to the threads.

A device named in ``-o vmmshim.exit_notify`` (``vmmshim/fastpaths.py``; virtio-9p by default) gets none: its
writes exit, and the writing vCPU serves them in that exit. Its driver waits for each request, so a doorbell would
only move the work to that vCPU's HLT, after the guest's idle entry (in the nested lab, 9p's reads went from about
0.6x QEMU's to about QEMU's when its requests stopped going through the idle entry and the HLT).

Not supported: doorbells that carry data (``fn`` gets no value: a register whose value matters is registered
once per value with ``datamatch``), reads.
"""

import contextlib
import os
import select
import threading

HOST_HAS_EVENTFD = hasattr(os, "eventfd") and hasattr(select, "epoll")      # Linux


class Doorbells:
    """The VM's doorbells. ``register``/``unregister(addr, size, pio, datamatch, fd)`` are the provider's
    (through the ops table); ``register`` returns False where the provider cannot. ``on_error(exc)`` gets an
    exception a doorbell's function raised (the thread goes on)."""

    def __init__(self, register, unregister, on_error=None):
        self._register, self._unregister = register, unregister
        self._on_error = on_error or (lambda exc: None)
        self._lock = threading.Lock()
        self._groups = {}           # group -> _Group
        self._keys = {}             # eventfd -> (key, _Group); the function is the group's
        self.rings = 0
        self.hardware = 0           # doorbells the provider signals (the others are rung by their device)
        self.idle_served = 0        # rings a halting vCPU served (poll_idle)
        self._idle_ep = select.epoll() if HOST_HAS_EVENTFD else None    # every doorbell, for poll_idle

    def add(self, addr, size, pio, datamatch, fn, group=None, name=None, hardware=True, software=False):
        """Registers one doorbell, served by ``group``'s thread; returns its key for :meth:`remove` (its eventfd is
        ``key[4]``), or None. With ``hardware`` the provider is asked to signal it; where it refuses (or without
        ``hardware``) the doorbell is kept only with ``software``: its writes exit, and whoever handles them rings
        the eventfd (``vmmshim/fastpaths.py``)."""
        if not HOST_HAS_EVENTFD:
            return None
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        key = (addr, size, pio, datamatch, fd)
        ok = False
        if hardware:
            try:
                ok = self._register(*key)
            except OSError:
                ok = False
        if not ok and not software:
            os.close(fd)
            return None
        with self._lock:
            g = self._groups.get(group)
            if g is None:
                g = self._groups[group] = _Group(self, name or (str(group) if group is not None else "shared"))
            self._keys[fd] = (key, g, ok)
            if ok:
                self.hardware += 1
            g.add(fd, fn)
            self._idle_ep.register(fd, select.EPOLLIN)
        return key

    def remove(self, key):
        """Unregisters a doorbell (its writes exit again); a ring it still holds is served here."""
        fd = key[4]
        with self._lock:
            entry = self._keys.pop(fd, None)
        if entry is None:
            return
        _, g, registered = entry
        try:
            self._idle_ep.unregister(fd)
        except (OSError, ValueError):
            pass
        fn = g.forget(fd)
        if registered:
            self.hardware -= 1
            try:
                self._unregister(*key)
            except OSError:
                pass                # the machine is gone: nothing rings any more
        with g.busy:                # not beside a halting vCPU that serves the group
            if fn is not None and _take(fd):
                self._call(fn)
        g.close_later(fd)

    def close(self):
        """Removes every doorbell and stops the threads (before the machine is destroyed)."""
        for key, _, _ in list(self._keys.values()):
            self.remove(key)
        with self._lock:
            groups, self._groups = list(self._groups.values()), {}
        for g in groups:
            g.stop()
        if self._idle_ep is not None:
            self._idle_ep.close()

    def poll_idle(self):
        """Serves, on the calling thread, the doorbells that have rung (a vCPU about to sleep in HLT; see the
        module docstring); returns how many it served. Never waits: a group busy on its own thread is left to it."""
        ep = self._idle_ep
        if ep is None or not self._keys:
            return 0
        try:
            ready = ep.poll(0)
        except (OSError, ValueError):
            return 0                # closed under us: the VM is going away
        served = 0
        for fd, _ in ready:
            entry = self._keys.get(fd)
            if entry is None:
                continue
            g = entry[1]
            if not g.busy.acquire(False):
                continue
            try:
                fn = g.fns.get(fd)
                if fn is not None and _take(fd):
                    self._call(fn)
                    served += 1
            finally:
                g.busy.release()
        self.idle_served += served
        return served

    @contextlib.contextmanager
    def held(self):
        """No doorbell function runs inside (a checkpoint reads the devices' states): waits for those running,
        keeps the rest out until the end (their rings wait in the eventfds)."""
        with self._lock:
            groups = list(self._groups.values())
        with contextlib.ExitStack() as stack:
            for g in groups:
                stack.enter_context(g.busy)
            yield

    def ring_all(self):
        """Rings every doorbell once (a restored VM: a notification the checkpoint left unserved is served)."""
        with self._lock:
            fds = list(self._keys)
        for fd in fds:
            os.eventfd_write(fd, 1)

    @property
    def idle_fd(self):
        """An fd readable while a doorbell has rung that :meth:`poll_idle` would serve (None without epoll)."""
        return self._idle_ep.fileno() if self._idle_ep is not None else None

    @property
    def active(self):
        return len(self._keys)

    @property
    def threads(self):
        return [g.thread for g in self._groups.values()]

    def _call(self, fn):
        self.rings += 1
        try:
            fn()
        except Exception as exc:    # a device's bug must not end a doorbell thread
            self._on_error(exc)


def _take(fd):
    try:
        return os.eventfd_read(fd) > 0
    except BlockingIOError:
        return False


class _Group:
    """One doorbell thread and its epoll set."""

    def __init__(self, owner, name):
        self.owner = owner
        self.ep = select.epoll()
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.ep.register(self.wake_fd, select.EPOLLIN)
        self.fns = {}               # eventfd -> fn
        self.closing = []           # eventfds removed, closed by the thread after its current round
        self.lock = threading.Lock()
        self.busy = threading.RLock()   # held while one of the group's functions runs, on any thread
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name=f"vmmshim-doorbells {name}", daemon=True)
        self.thread.start()

    def add(self, fd, fn):
        self.fns[fd] = fn
        self.ep.register(fd, select.EPOLLIN)

    def forget(self, fd):
        """Stops waiting on ``fd``; returns its function."""
        fn = self.fns.pop(fd, None)
        try:
            self.ep.unregister(fd)
        except (OSError, ValueError):
            pass
        return fn

    def close_later(self, fd):
        with self.lock:
            self.closing.append(fd)
        os.eventfd_write(self.wake_fd, 1)

    def stop(self):
        self.stopping = True
        os.eventfd_write(self.wake_fd, 1)
        if self.thread is not threading.current_thread():
            self.thread.join(5)
        if not self.thread.is_alive():
            self._close_pending()
            os.close(self.wake_fd)
            self.ep.close()

    def _close_pending(self):
        with self.lock:
            closing, self.closing = self.closing, []
        for fd in closing:
            os.close(fd)

    def _loop(self):
        ep, wake_fd, fns, call = self.ep, self.wake_fd, self.fns, self.owner._call
        while not self.stopping:
            try:
                events = ep.poll()
            except InterruptedError:
                continue
            for fd, _ in events:
                if fd == wake_fd:
                    _take(fd)
                    continue
                with self.busy:
                    fn = fns.get(fd)
                    if fn is not None and _take(fd):
                        call(fn)
            if self.closing:
                self._close_pending()
