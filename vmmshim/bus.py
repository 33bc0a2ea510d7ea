"""Port and MMIO buses: sorted, non-overlapping ranges mapped to devices (Firecracker ``vstate/bus.rs`` style).

``insert(base, size, device, name)`` refuses an empty range and any overlap (:class:`BusError`); ``lookup(addr)``
finds ``(base, device)``; ``remove(base)`` unmaps. :meth:`Bus.access` is the callback the NVMM assists call,
``(addr, is_write_or_in, data)``: it turns the memoryview into the device's ``read(offset, size)`` /
``write(offset, size, value)``. An access no device claims reads all-ones and drops writes, unless the bus is
strict (bhyve ``-e`` / ``x86.strictio``), where it is recorded in ``unhandled`` and ``on_unhandled`` is called
(the VM stops with an error). A device that raises is a VMM bug: the exception propagates, no guest access is
silently lost. :meth:`Bus.posted_run` delivers a run of posted one-byte writes to one port (``vmmshim/fastpaths.py``):
to the device's ``posted_run`` where it is a ``PostedWrites`` device, else one ``write`` per byte.

Not supported: accesses that span two devices (each goes to the device at its first byte, as in bhyve).
"""

import bisect

from bhyve_devices.base import PostedWrites


class BusError(ValueError):
    pass


class Bus:
    def __init__(self, name, strict=False, on_unhandled=None, is_port_bus=False):
        self.name = name
        self.strict = strict
        self.on_unhandled = on_unhandled
        self._starts, self._ranges = [], []     # sorted starts; (start, end, device, name)
        self._cache = {}                          # addr -> (start, device), for port buses
        self._posted = {}                         # port -> its posted-run function
        self._cacheable = is_port_bus
        self.unhandled = []
        self.trace = None           # a file: every access is logged there (debugging aid, MMIO path only)
        self.io = self._make_io()

    def insert(self, base, size, device, name=None):
        if size <= 0:
            raise BusError(f"{self.name}: empty range at {base:#x}")
        end = base + size
        i = bisect.bisect_left(self._starts, base)
        for s, e, _, n in self._ranges[max(i - 1, 0):i + 1]:
            if base < e and s < end:
                raise BusError(f"{self.name}: {name or device!r} at {base:#x}-{end - 1:#x} overlaps {n} at "
                               f"{s:#x}-{e - 1:#x}")
        self._starts.insert(i, base)
        self._ranges.insert(i, (base, end, device, name or type(device).__name__))
        self._cache.clear()
        self._posted.clear()

    def remove(self, base):
        i = bisect.bisect_left(self._starts, base)
        if i == len(self._starts) or self._starts[i] != base:
            raise BusError(f"{self.name}: nothing mapped at {base:#x}")
        del self._starts[i], self._ranges[i]
        self._cache.clear()
        self._posted.clear()

    def lookup(self, addr):
        """``(base, device)`` of the range holding ``addr``, or ``None``."""
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0:
            s, e, dev, _ = self._ranges[i]
            if addr < e:
                return s, dev
        return None

    def ranges(self):
        return [(s, e - s, n) for s, e, _, n in self._ranges]

    def access(self, addr, is_write, data):
        """The assist callback. For a port bus ``is_write`` is "not IN"; see :meth:`io`."""
        hit = self._cache.get(addr) if self._cacheable else None
        if hit is None:
            hit = self.lookup(addr)
            if hit is None:
                return self._unhandled(addr, is_write, data)
            if self._cacheable:
                self._cache[addr] = hit
        base, dev = hit
        n = len(data)
        if is_write:
            dev.write(addr - base, n, int.from_bytes(data, "little"))
        else:
            data[:] = (dev.read(addr - base, n) & ((1 << (8 * n)) - 1)).to_bytes(n, "little")
        if self.trace is not None:
            print(f"[{self.name}] {'W' if is_write else 'R'} {addr:#x}/{n} = {int.from_bytes(data, 'little'):#x}",
                  file=self.trace, flush=True)

    def posted_run(self, port, data):
        """Posted one-byte writes to ``port``, in guest order (the provider's callback for a posted port)."""
        fn = self._posted.get(port)
        if fn is None:
            fn = self._posted[port] = self._posted_fn(port)
        fn(data)

    def _posted_fn(self, port):
        hit = self.lookup(port)
        if hit is None:
            return lambda data: [self._unhandled(port, True, bytes((b,))) for b in data]
        base, dev = hit
        off = port - base
        if isinstance(dev, PostedWrites):
            return lambda data: dev.posted_run(off, data)
        return lambda data: [dev.write(off, 1, b) for b in data]

    def _make_io(self):
        """The NVMM io callback ``(port, is_in, data)`` as a closure over the port cache (the hot path)."""
        cache, lookup, unhandled, from_bytes = self._cache, self.lookup, self._unhandled, int.from_bytes

        def io(port, is_in, data):
            hit = cache.get(port)
            if hit is None:
                hit = lookup(port)
                if hit is None:
                    return unhandled(port, not is_in, data)
                cache[port] = hit
            base, dev = hit
            n = len(data)
            if is_in:
                data[:] = (dev.read(port - base, n) & ((1 << (8 * n)) - 1)).to_bytes(n, "little")
            else:
                dev.write(port - base, n, from_bytes(data, "little"))
        return io

    def _unhandled(self, addr, is_write, data):
        if not is_write:
            data[:] = b"\xff" * len(data)
        if self.strict:
            self.unhandled.append((addr, is_write, bytes(data)))
            if self.on_unhandled is not None:
                self.on_unhandled(self.name, addr, is_write, len(data))
