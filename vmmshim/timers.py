"""One timer thread with a deadline heap, the ``TimerService`` every timer device is built on
(``bhyve_devices.base.TimerService``: ``now_ns``, ``arm``, ``cancel``).

The thread sleeps until the earliest live deadline, so an idle guest costs no host CPU (no tick, no polling).
Callbacks run on the timer thread; a device callback raises an interrupt line, which kicks the vCPU concerned.

How it sleeps:

- On Linux, in a ``read`` of a ``timerfd`` (CLOCK_MONOTONIC, ``timerfd_create(2)``) set to the earliest live
  deadline: arming a timer sets the timerfd and does not wake the thread. A guest's LAPIC timer is armed again
  at every tick and at every idle entry and exit; with a condition variable each of those woke the thread only to
  sleep again (in the nested lab more wake-ups than timers fired per virtio-blk request, each extra one a thread
  switch and a GIL hand-off on L1's single TCG CPU: docs/lab.md, "Serving at HLT").
- Elsewhere (NetBSD's ``timerfd`` constants are not written down here), or with ``VMMSHIM_TIMERFD=0``, on a
  condition variable that an earlier deadline notifies.

Other file descriptors may be watched on the same thread (:meth:`TimerThread.watch`, timerfd mode only): a vCPU's
IA32_TSC_DEADLINE timerfd, which the compiled run loop sets (``ops/nvmm/kvm/tscdeadline.py``). The thread then
sleeps in ``epoll_wait`` on the heap's timerfd and those.

Cancelled timers stay in the heap until they reach its top, where arming drops them (so a cancelled deadline does
not wake the thread) and the thread skips them.

``run_lock`` is held around every callback: a checkpoint (``vmmshim/snapshot/``) takes it so that no device
timer fires while the devices' states are read; callbacks due meanwhile run when it is released.

Not supported: timer slack or coalescing (a device that wants it, like the PIT, coalesces itself).
"""

import ctypes
import heapq
import itertools
import os
import select
import sys
import threading
import time

NS_PER_S = 1_000_000_000
CLOCK_MONOTONIC = 1         # Linux <time.h>
TFD_CLOEXEC = os.O_CLOEXEC
TFD_TIMER_ABSTIME = 1


class _Itimerspec(ctypes.Structure):
    """``struct itimerspec`` (two ``struct timespec``: interval, then value), Linux x86-64 and aarch64."""
    _fields_ = [("interval_sec", ctypes.c_long), ("interval_nsec", ctypes.c_long),
                ("value_sec", ctypes.c_long), ("value_nsec", ctypes.c_long)]


class _TimerFd:
    """A CLOCK_MONOTONIC timerfd set to absolute deadlines (``time.monotonic_ns`` is that clock on Linux)."""

    def __init__(self):
        # PyDLL: the call keeps the GIL. timerfd_settime never blocks, and a GIL released and taken back at every
        # arming (a vCPU's TMICT write) let the other threads' Python in between on L1's one CPU
        libc = ctypes.PyDLL(None, use_errno=True)
        self._settime = libc.timerfd_settime
        self._settime.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
        create = libc.timerfd_create
        create.argtypes = [ctypes.c_int, ctypes.c_int]
        fd = create(CLOCK_MONOTONIC, TFD_CLOEXEC)
        if fd < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        self.fd = fd
        self._spec = _Itimerspec()
        self._ref = ctypes.addressof(self._spec)

    def set(self, deadline_ns):
        """Expires at ``deadline_ns`` (at once if it has passed); None disarms."""
        s = self._spec
        if deadline_ns is None:
            s.value_sec = s.value_nsec = 0
        else:
            s.value_sec, s.value_nsec = divmod(max(deadline_ns, 1), NS_PER_S)
        if self._settime(self.fd, TFD_TIMER_ABSTIME, self._ref, None) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))


def _make_timerfd():
    if not sys.platform.startswith("linux") or os.environ.get("VMMSHIM_TIMERFD", "1") == "0":
        return None
    try:
        return _TimerFd()
    except (OSError, AttributeError):
        return None


class TimerThread:
    def __init__(self, clock=time.monotonic_ns, name="vmmshim-timers", on_error=None, use_timerfd=True):
        self.on_error = on_error          # called with the exception when a callback raises
        self._heap = []
        self._seq = itertools.count()
        self._cancelled = set()
        self._cond = threading.Condition()
        self.run_lock = threading.Lock()  # held around each callback; a checkpoint holds it to keep them out
        self._stop = False
        self.errors = []
        self.fired = 0                    # callbacks run (a debugging counter)
        self.wakes = 0                    # times the thread woke up (a debugging counter)
        # the timerfd sleeps on CLOCK_MONOTONIC: only with that clock
        self._tfd = _make_timerfd() if use_timerfd and clock is time.monotonic_ns else None
        self._epoll = None
        self._watched = {}                # fd -> fn, called on this thread when the fd is readable
        if self._tfd is not None:
            os.set_blocking(self._tfd.fd, False)
            self._epoll = select.epoll()
            self._epoll.register(self._tfd.fd, select.EPOLLIN)
        self._clock = clock
        loop = self._loop_timerfd if self._tfd is not None else self._loop
        self._thread = threading.Thread(target=loop, name=name, daemon=True)
        self._thread.start()

    @property
    def sleeps_on(self):
        return "timerfd" if self._tfd is not None else "condition"

    def now_ns(self):
        return self._clock()

    @property
    def can_watch(self):
        """Whether :meth:`watch` works here (the thread sleeps on a timerfd)."""
        return self._epoll is not None

    def watch(self, fd, fn):
        """Calls ``fn()`` (under ``run_lock``, as a timer callback) whenever ``fd`` is readable; ``fn`` must make it
        unreadable (read it). False where this thread cannot (no timerfd: it sleeps on a condition)."""
        if self._epoll is None:
            return False
        self._watched[fd] = fn
        self._epoll.register(fd, select.EPOLLIN)
        return True

    def unwatch(self, fd):
        if self._watched.pop(fd, None) is not None:
            try:
                self._epoll.unregister(fd)
            except (OSError, ValueError):
                pass

    def arm(self, deadline_ns, fn):
        with self._cond:
            handle = next(self._seq)
            heapq.heappush(self._heap, (deadline_ns, handle, fn))
            if self._tfd is not None:
                if self._heap[0][1] == handle or self._drop_cancelled_top():
                    self._tfd.set(self._heap[0][0])
            elif self._heap[0][1] == handle:
                self._cond.notify()
            return handle

    def cancel(self, handle):
        """The timer will not fire. When it was the earliest, the timerfd moves to the next live deadline, so the
        thread does not wake for it (a wake costs a thread switch and the GIL: milliseconds in the nested lab)."""
        if handle is None:
            return
        with self._cond:
            self._cancelled.add(handle)
            if self._tfd is not None and self._heap and self._heap[0][1] == handle:
                self._drop_cancelled_top()
                self._tfd.set(self._heap[0][0] if self._heap else None)

    def _drop_cancelled_top(self):
        """Pops cancelled timers off the top (under the lock); True if any was."""
        heap, cancelled = self._heap, self._cancelled
        dropped = False
        while heap and heap[0][1] in cancelled:
            cancelled.discard(heapq.heappop(heap)[1])
            dropped = True
        return dropped

    def _loop(self):
        while True:
            with self._cond:
                while not self._stop:
                    self._drop_cancelled_top()
                    if self._heap:
                        deadline, _, fn = self._heap[0]
                        delay = deadline - self._clock()
                        if delay <= 0:
                            heapq.heappop(self._heap)
                            break
                        self._cond.wait(delay / 1e9)
                    else:
                        self._cond.wait()
                    self.wakes += 1
                if self._stop:
                    return
            self._run(fn)

    def _loop_timerfd(self):
        fd, heap, poll, watched = self._tfd.fd, self._heap, self._epoll.poll, self._watched
        while True:
            ready = poll()                # until the deadline the timerfd is set to, or a watched fd (PEP 475)
            self.wakes += 1
            if self._stop:
                return
            for rfd, _ in ready:
                if rfd != fd:
                    fn = watched.get(rfd)
                    if fn is not None:
                        self._run(fn)
            try:
                os.read(fd, 8)
            except BlockingIOError:
                continue                  # moved to a later deadline meanwhile
            due = []
            with self._cond:
                if self._stop:
                    return
                now = self._clock()
                while True:
                    self._drop_cancelled_top()
                    if not heap or heap[0][0] > now:
                        break
                    due.append(heapq.heappop(heap)[2])
                self._tfd.set(heap[0][0] if heap else None)
            for fn in due:
                self._run(fn)

    def _run(self, fn):
        self.fired += 1
        try:
            with self.run_lock:
                fn()
        except Exception as exc:  # noqa: BLE001 - a device bug must not kill every timer silently
            self.errors.append(exc)
            if self.on_error is not None:
                self.on_error(exc)

    def snapshot(self):
        """Pending timers, the earliest deadline from now (ms), callbacks run, wake-ups, errors, thread alive."""
        with self._cond:
            live = [d for d, h, _ in self._heap if h not in self._cancelled]
        first = (min(live) - self._clock()) / 1e6 if live else None
        return {"pending": len(live), "next_ms": None if first is None else round(first, 3), "fired": self.fired,
                "wakes": self.wakes, "errors": len(self.errors), "alive": self._thread.is_alive()}

    def close(self):
        with self._cond:
            self._stop = True
            self._cond.notify()
            if self._tfd is not None:
                self._tfd.set(1)          # long past: the read returns at once
        self._thread.join(5)
        if self._tfd is not None and not self._thread.is_alive():
            self._epoll.close()
            os.close(self._tfd.fd)
            self._tfd = None
