"""The small interfaces every device model is built from (rust-vmm ``vm-superio`` style).

- :class:`Device`: ``read(offset, size) -> int`` and ``write(offset, size, value)`` relative to the start of the
  range the bus maps it at; ``size`` is 1, 2, 4 or 8. A device never raises on a guest access: an access it does
  not implement reads as all-ones (or zero where the hardware says so) and a write to it is dropped.
- :class:`IrqLine`: what a device raises. ``set_level(True/False)`` for level-triggered lines, ``pulse()`` for an
  edge. The VM wires it to a vatpic/vioapic pin; tests wire it to a recorder.
- :class:`TimerService`: ``now_ns()``, ``arm(deadline_ns, fn) -> handle``, ``cancel(handle)``; the VM runs one
  timer thread with a deadline heap, tests use :class:`ManualTimers` and move time by hand.
- :class:`GuestMemory`: ``view(gpa, size) -> memoryview`` of guest RAM, raising ``OSError(EFAULT)`` for any
  byte outside RAM, so a guest-supplied address never reaches other host memory. It may also have ``ram``: one
  memoryview of the RAM from guest-physical 0 (every ``[gpa, gpa+size)`` with ``gpa + size <= len(ram)`` is RAM),
  which a hot loop may slice itself instead of calling ``view`` per buffer (virtqueue descriptors); None if not.

The fast paths a device may offer the VMM (``vmmshim/fastpaths.py`` takes them up where the hypervisor can, and the
device answers the same when it cannot). Each is a small Protocol, checked with ``isinstance``, never a ``getattr``
of an attribute name:

- :class:`PostedWrites`: registers whose writes need no answer (a UART's transmit register); the VMM may buffer
  them in the hypervisor and hand them over later, in order, as runs (``posted_run``).
- :class:`PublishedReads`: one-byte registers whose reads have no side effect (a UART's line status); the device
  publishes their value whenever it changes and the VMM may answer the reads without an exit.
- :class:`PublishedMmioReads`: the same for 32-bit registers in a memory BAR (AHCI's interrupt status and issued
  slots), published while the BAR is mapped.
- :class:`Doorbells`: registers whose writes only say "look at your queue" (virtio's queue notify); the VMM may
  have them signal a thread of the device's own instead of exiting, and rings the same thread itself for a write
  that did exit (``ring_with``), so the device's work runs on one thread whichever way the write came.

Not here: bus registration (``vmmshim.bus``) and the PCI configuration-space helpers (``bhyve_devices.pci``).
"""

import heapq
import itertools
import operator
from typing import Callable, Optional, Protocol, runtime_checkable


class Device(Protocol):
    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...


class IrqLine(Protocol):
    def set_level(self, level: bool) -> None: ...

    def pulse(self) -> Optional[bool]:
        """An edge. False when it merged with an edge still pending at the interrupt controller (the PIT then
        sends it again, ``vatpit.py``); True or None: delivered, or not reported."""


class TimerService(Protocol):
    def now_ns(self) -> int: ...

    def arm(self, deadline_ns: int, fn: Callable[[], None]) -> object: ...

    def cancel(self, handle: object) -> None: ...


class GuestMemory(Protocol):
    ram: "memoryview | None"

    def view(self, gpa: int, size: int) -> memoryview: ...


#: One doorbell: ``(offset, size, datamatch, fn)``: a write of ``size`` bytes (0: any size) at ``offset`` in a BAR,
#: of the value ``datamatch`` only unless None, rings it; the VMM then calls ``fn()`` on the device's thread.
Doorbell = tuple


@runtime_checkable
class PostedWrites(Protocol):
    #: ``(offset, size)`` ranges whose writes may be posted.
    posted_writes: tuple

    def posted_run(self, offset: int, data: bytes) -> None:
        """Posted writes to one register, one byte each, in guest order (a run of ``len(data)`` writes)."""


@runtime_checkable
class PublishedReads(Protocol):
    def publish_reads(self, fn: Callable[[int, Optional[int]], None]) -> None:
        """From now on call ``fn(offset, value)`` whenever a one-byte read at ``offset`` would return something
        else (``None``: no longer answerable without asking the device)."""


@runtime_checkable
class PublishedMmioReads(Protocol):
    def publish_mmio_reads(self, bar: int, fn: Optional[Callable[[int, Optional[int]], None]]) -> None:
        """BAR ``bar`` is mapped: call ``fn(offset, value)`` now for each aligned 32-bit register whose reads have
        no side effect, and from then on whenever a read of it would return something else (``None``: no longer
        answerable without asking the device); ``fn`` None: the BAR is no longer mapped, stop calling."""


def published(name, reg):
    """A register attribute for a PublishedMmioReads device: reading it is a plain attribute read (kept as
    ``_name``); assigning it also calls the instance's ``publish(reg, value)`` when the value changed and
    ``publish`` is not None (a class attribute ``publish = None`` until the BAR is mapped)."""
    key = "_" + name

    def assign(self, value):
        d = self.__dict__
        if d.get(key) != value:
            d[key] = value
            pub = self.publish
            if pub is not None:
                pub(reg, value)
    return property(operator.attrgetter(key), assign)


@runtime_checkable
class Doorbells(Protocol):
    def doorbells(self, bar: int) -> list:
        """The doorbells in BAR ``bar`` (a list of :data:`Doorbell`)."""

    def ring_with(self, ring: Optional[Callable[[int, int], None]]) -> None:
        """A guest write that reaches the device through the bus and matches doorbell ``i`` of BAR ``bar`` calls
        ``ring(bar, i)`` instead of the doorbell's ``fn`` (None: ``fn`` at once, on the writing thread)."""


class NullLine:
    """An interrupt line connected to nothing."""

    def set_level(self, level):
        pass

    def pulse(self):
        pass


class RecordingLine:
    """An interrupt line that records what was done to it (for tests): ``level``, ``pulses``, ``history``."""

    def __init__(self):
        self.level = False
        self.pulses = 0
        self.history = []

    def set_level(self, level):
        self.level = bool(level)
        self.history.append(("level", self.level))

    def pulse(self):
        self.pulses += 1
        self.history.append(("pulse",))


class CallbackLine:
    """An interrupt line that calls ``fn(level)`` (``pulse`` is a rise then a fall)."""

    def __init__(self, fn):
        self._fn = fn

    def set_level(self, level):
        self._fn(bool(level))

    def pulse(self):
        self._fn(True)
        self._fn(False)


class ManualTimers:
    """A :class:`TimerService` whose clock moves only when ``advance(ns)`` or ``set_time(ns)`` is called; due
    timers fire in deadline order from inside that call."""

    def __init__(self, start_ns=0):
        self._now = start_ns
        self._heap = []
        self._seq = itertools.count()
        self._cancelled = set()

    def now_ns(self):
        return self._now

    def arm(self, deadline_ns, fn):
        handle = next(self._seq)
        heapq.heappush(self._heap, (deadline_ns, handle, fn))
        return handle

    def cancel(self, handle):
        if handle is not None:
            self._cancelled.add(handle)

    def pending(self):
        return sum(1 for _, h, _ in self._heap if h not in self._cancelled)

    def set_time(self, ns):
        while self._heap and self._heap[0][0] <= ns:
            deadline, handle, fn = heapq.heappop(self._heap)
            if handle in self._cancelled:
                self._cancelled.discard(handle)
                continue
            self._now = max(self._now, deadline)
            fn()
        self._now = max(self._now, ns)

    def advance(self, ns):
        self.set_time(self._now + ns)


class LateTimers(ManualTimers):
    """A timer thread that wakes late: ``wake_at(ns)`` moves the clock to ``ns`` first and only then runs the
    callbacks due by then (one armed for a time already past is due in the same wake), so a callback reads a
    ``now_ns`` after its deadline, as on a loaded host."""

    def next_deadline(self):
        return min((d for d, h, _ in self._heap if h not in self._cancelled), default=None)

    def wake_at(self, ns):
        self._now = max(self._now, ns)
        while self._heap and self._heap[0][0] <= self._now:
            _, h, fn = heapq.heappop(self._heap)
            if h not in self._cancelled:
                fn()

    def run_on_time_until(self, ns):
        """A timer thread that is never late, up to ``ns``."""
        while (d := self.next_deadline()) is not None and d <= ns:
            self.wake_at(d)
        self._now = max(self._now, ns)


class BytesMemory:
    """A :class:`GuestMemory` over a bytearray starting at guest-physical ``base`` (for tests and loaders)."""

    def __init__(self, size, base=0):
        import errno
        self._errno = errno
        self.base = base
        self.buf = bytearray(size)
        self._mv = memoryview(self.buf)
        self.ram = self._mv if base == 0 else None

    def view(self, gpa, size):
        off = gpa - self.base
        if size < 0 or off < 0 or off + size > len(self.buf):
            raise OSError(self._errno.EFAULT, f"gpa {gpa:#x}+{size:#x} is outside guest RAM")
        return self._mv[off:off + size]
