"""What the user-space network backends (:mod:`.slirp`, :mod:`.stream`) share: the bounded queue that hands the
guest's frames to the backend's thread, a wake pipe for that thread's ``poll``, and the copy of one frame into the
guest's receive buffers.

Flow control (guest to host): :meth:`FrameQueue.put` waits up to ``wait_s`` for room when the queue holds
``max_frames`` frames or ``max_bytes`` bytes, then drops the frame (``put`` returns 0), so a guest that sends faster than
the backend's thread drains is slowed to that pace (its transmit queue fills, as behind a busy link) and nothing
is buffered past the bounds; a frame is dropped only when the backend's thread has not taken a frame for
``wait_s``. One frame is always taken by an empty queue, whatever its size.

Not supported: priorities, several consumers.
"""

import collections
import os
import threading
import time

READ_CHUNK = 4096           # wake-pipe bytes drained per read


class FrameQueue:
    """A FIFO of ``bytes`` frames between producer threads and one consumer, bounded in frames and bytes."""

    def __init__(self, max_frames, max_bytes):
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self._frames = collections.deque()
        self._bytes = 0
        self._cond = threading.Condition()
        self.closed = False
        self.waits = 0              # puts that found the queue full and waited

    def __len__(self):
        return len(self._frames)

    def _full(self, n):
        return self._frames and (len(self._frames) >= self.max_frames or self._bytes + n > self.max_bytes)

    def put(self, frame, wait_s=0.0):
        """Queues ``frame``; returns the frames queued after it went in (1: the queue was empty, so the consumer
        must be woken), or 0 where it was dropped (still full after ``wait_s``, or closed)."""
        with self._cond:
            if self._full(len(frame)) and wait_s > 0 and not self.closed:
                self.waits += 1
                deadline = time.monotonic() + wait_s
                while self._full(len(frame)) and not self.closed:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            if self.closed or self._full(len(frame)):
                return 0
            self._frames.append(frame)
            self._bytes += len(frame)
            return len(self._frames)

    def get(self):
        """The oldest frame, or None; wakes a producer waiting for room."""
        with self._cond:
            if not self._frames:
                return None
            frame = self._frames.popleft()
            self._bytes -= len(frame)
            self._cond.notify()
            return frame

    def peek(self):
        with self._cond:
            return self._frames[0] if self._frames else None

    def close(self):
        """Drops what is queued; producers stop waiting and every later :meth:`put` fails."""
        with self._cond:
            self.closed = True
            self._frames.clear()
            self._bytes = 0
            self._cond.notify_all()


class WakePipe:
    """A non-blocking pipe: :meth:`wake` from any thread makes the read end readable until :meth:`drain`."""

    def __init__(self):
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC) if hasattr(os, "pipe2") else _pipe_nonblock()

    def wake(self):
        if self.w < 0:
            return
        try:
            os.write(self.w, b"\0")
        except (BlockingIOError, OSError):
            pass            # full: it is readable already

    def drain(self):
        try:
            while os.read(self.r, READ_CHUNK):
                pass
        except (BlockingIOError, OSError):
            pass

    def close(self):
        for fd in (self.r, self.w):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.r = self.w = -1


def _pipe_nonblock():
    r, w = os.pipe()
    for fd in (r, w):
        os.set_blocking(fd, False)
        os.set_inheritable(fd, False)
    return r, w


class ThreadedFrameBackend:
    """What the NetBackends with one thread of their own and plain Ethernet frames (slirp, stream) share: no
    virtio-net header and no offloads (the device adds and strips the header), the receive hooks that wake the
    thread, and stopping it. A subclass sets ``_thread``, ``_txq`` (a :class:`FrameQueue`) and ``_wake`` (a
    :class:`WakePipe`) and runs its loop until ``_stop``."""

    vnet_hdr = False
    offloads = False
    JOIN_S = 5                      # seconds close() waits for the thread

    def set_vnet_hdr_len(self, n):
        pass

    def set_offload(self, features):
        pass

    def start_rx(self, ready, receive):
        self._ready, self._receive = ready, receive
        self._wake.wake()

    def rx_kick(self):
        self._wake.wake()

    def _queue_frame(self, frame, wait_s, open_=True):
        """One guest frame onto the thread's queue (waiting up to ``wait_s`` for room), the thread woken when the
        queue was empty; False (``stats['tx_dropped']``) where it is dropped or ``open_`` is false."""
        n = self._txq.put(frame, wait_s) if open_ and not self._stop else 0
        if not n:
            self.stats["tx_dropped"] += 1
            return False
        self.stats["tx_frames"] += 1
        if n == 1:
            self._wake.wake()
        return True

    def _wake_to_stop(self):
        """Gets the thread to see ``_stop``: its queue closed (a waiting producer gives up) and its poll woken."""
        self._txq.close()
        self._wake.wake()

    def _stop_thread(self):
        """Stops the thread; False if there was none (closed already). The thread may still be alive after
        ``JOIN_S`` (the caller then keeps what the thread uses)."""
        if self._thread is None:
            return False
        self._stop = True
        self._wake_to_stop()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=self.JOIN_S)
        return True

