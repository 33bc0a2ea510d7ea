"""virtio-console with one port and no multiport (VIRTIO 1.1 section 5.3), ``-s N,virtio-console[,BACKEND]``.

Queue 0 is ``receiveq`` (host to guest: the guest posts device-writable buffers), queue 1 ``transmitq`` (guest to
host). Output goes to ``backend.write(bytes)``; input comes through :meth:`VirtioConsole.enqueue_input` (the same
call :class:`bhyve_devices.uart16550.UART16550` takes, so the char backends (``vmmshim/backends/uart.py``) drive
either: their ``start(console)`` feeds it), which keeps up to ``backlog`` bytes until the guest posts receive
buffers and returns how many bytes it took (the backend retries the rest). The guest sees the port as
``/dev/hvc0``.

Features offered: VIRTIO_CONSOLE_F_EMERG_WRITE (a byte written to ``emerg_wr`` goes to the backend at once).
Configuration space (5.3.4): ``cols`` u16, ``rows`` u16, ``max_nr_ports`` u32, ``emerg_wr`` u32.

Not supported: MULTIPORT (the control queues, more ports, port names), F_SIZE (console resize).
"""

import collections
import threading

from construct import Int16ul, Int32ul, Struct

from .device import VIRTIO_ID_CONSOLE, VirtioDevice, bit
from .virtqueue import gather, scatter, split_segments

VIRTIO_CONSOLE_F_SIZE = 0
VIRTIO_CONSOLE_F_MULTIPORT = 1
VIRTIO_CONSOLE_F_EMERG_WRITE = 2

CONSOLE_CONFIG = Struct("cols" / Int16ul, "rows" / Int16ul, "max_nr_ports" / Int32ul, "emerg_wr" / Int32ul)

RXQ, TXQ = 0, 1


class NullSink:
    def write(self, data):
        pass


class VirtioConsole(VirtioDevice):
    name = "virtio-console"
    device_type = VIRTIO_ID_CONSOLE
    num_queues = 2
    queue_size = 64
    features = bit(VIRTIO_CONSOLE_F_EMERG_WRITE)
    config_size = CONSOLE_CONFIG.sizeof()

    def __init__(self, backend=None, backlog=65536):
        super().__init__()
        self.backend = backend if backend is not None else NullSink()
        self.backlog = backlog
        self._input = collections.deque()
        self._pending = 0
        self._rx_lock = threading.Lock()
        self._tx_lock = threading.Lock()

    def config_bytes(self):
        return CONSOLE_CONFIG.build(dict(cols=0, rows=0, max_nr_ports=1, emerg_wr=0))

    def config_write(self, off, size, value):
        if off == 8 and self.has_feature(VIRTIO_CONSOLE_F_EMERG_WRITE):
            self._out(bytes([value & 0xFF]))

    def _out(self, data):
        try:
            self.backend.write(data)
        except OSError:
            pass

    # ---- host to guest ----------------------------------------------------------------------------------------------
    def enqueue_input(self, data):
        """Queues input for the guest; returns how many bytes were taken (the rest: retry later)."""
        with self._rx_lock:
            room = max(self.backlog - self._pending, 0)
            take = bytes(data[:room])
            if take:
                self._input.append(take)
                self._pending += len(take)
            self._deliver_locked()
        return len(take)

    def pending_input(self):
        return self._pending

    def _deliver_locked(self):
        if not self.queues:
            return
        q = self.queues[RXQ]
        served = 0
        while self._input:
            chain = q.get_chain()
            if chain is None:
                break
            n = 0
            if not chain.readable:
                rest = chain.writable
                while self._input and rest:
                    piece = self._input[0]
                    k = scatter(rest, piece)
                    n += k
                    self._pending -= k
                    rest = split_segments(rest, k)[1]
                    if k < len(piece):
                        self._input[0] = piece[k:]
                        break
                    self._input.popleft()
            q.put_used(chain.head, n)
            served += 1
        if served:
            self.notify_used(q)

    # ---- guest to host ----------------------------------------------------------------------------------------------
    def queue_notify(self, qidx, queue):
        if qidx == RXQ:
            with self._rx_lock:
                self._deliver_locked()
            return
        with self._tx_lock:
            served = 0
            while True:
                chain = queue.get_chain()
                if chain is None:
                    break
                data = gather(chain.readable)
                if data:
                    self._out(data)
                queue.put_used(chain.head, 0)
                served += 1
            if served:
                self.notify_used(queue, used_all_avail=True)

    def reset(self):
        with self._rx_lock, self._tx_lock:
            super().reset()
