"""One timer thread with a deadline heap, the ``TimerService`` every timer device is built on
(``bhyve_devices.base.TimerService``: ``now_ns``, ``arm``, ``cancel``).

The thread sleeps on a condition variable until the earliest deadline or until an earlier timer is armed, so an
idle guest costs no host CPU (no tick, no polling). Callbacks run on the timer thread; a device callback raises
an interrupt line, which kicks the vCPU concerned.

Not supported: timer slack or coalescing (a device that wants it, like the PIT, coalesces itself).
"""

import heapq
import itertools
import threading
import time


class TimerThread:
    def __init__(self, clock=time.monotonic_ns, name="vmmshim-timers", on_error=None):
        self._clock = clock
        self.on_error = on_error          # called with the exception when a callback raises
        self._heap = []
        self._seq = itertools.count()
        self._cancelled = set()
        self._cond = threading.Condition()
        self._stop = False
        self.errors = []
        self.fired = 0                    # callbacks run (a debugging counter)
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def now_ns(self):
        return self._clock()

    def arm(self, deadline_ns, fn):
        with self._cond:
            handle = next(self._seq)
            heapq.heappush(self._heap, (deadline_ns, handle, fn))
            if self._heap[0][1] == handle:
                self._cond.notify()
            return handle

    def cancel(self, handle):
        if handle is None:
            return
        with self._cond:
            self._cancelled.add(handle)

    def _loop(self):
        while True:
            with self._cond:
                while not self._stop:
                    if self._heap:
                        deadline, handle, fn = self._heap[0]
                        if handle in self._cancelled:
                            heapq.heappop(self._heap)
                            self._cancelled.discard(handle)
                            continue
                        delay = deadline - self._clock()
                        if delay <= 0:
                            heapq.heappop(self._heap)
                            break
                        self._cond.wait(delay / 1e9)
                    else:
                        self._cond.wait()
                if self._stop:
                    return
            self.fired += 1
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - a device bug must not kill every timer silently
                self.errors.append(exc)
                if self.on_error is not None:
                    self.on_error(exc)

    def snapshot(self):
        """Pending timers, the earliest deadline from now (ms), callbacks run, errors, thread alive (debugging)."""
        with self._cond:
            live = [d for d, h, _ in self._heap if h not in self._cancelled]
        first = (min(live) - self._clock()) / 1e6 if live else None
        return {"pending": len(live), "next_ms": None if first is None else round(first, 3), "fired": self.fired,
                "errors": len(self.errors), "alive": self._thread.is_alive()}

    def close(self):
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(5)
