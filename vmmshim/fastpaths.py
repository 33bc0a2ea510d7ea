"""The fast paths, in one place: where a device offers one (``bhyve_devices/base.py``'s :class:`PostedWrites`,
:class:`PublishedReads`, :class:`Doorbells` Protocols) and the provider has it (``Capability.features``, asked
once through ``vm_features``), the VM takes it up here; everywhere else the guest's access exits and reaches the
device through the bus, and the device answers the same.

- **Posted writes** (``posted-io``; KVM's coalesced PIO): a PostedWrites device's registers stop exiting; the
  provider hands their writes over, in guest order, before the next exit is handled, and a flush timer hands them
  over every :data:`POSTED_FLUSH_NS` for a guest that writes and then runs on without exiting (while some vCPU is
  out of HLT: :class:`PostedFlush`). Either way they reach
  the device through the port bus (``Bus.posted_run``), the one way a port write gets to a device.
- **Published reads** (``answered-io``; the KVM provider's compiled run loop, the soft CPU's hook): a
  PublishedReads device's values are answered without an exit. And (``answered-mmio``; the compiled run loop) a
  PublishedMmioReads device's 32-bit registers in a memory BAR, while the BAR is mapped (``-o
  vmmshim.answer_mmio``).
- **Doorbells** (``doorbell``; KVM's ioeventfd): a Doorbells device's registers signal an eventfd that a thread of
  the device's own serves (``vmmshim/doorbells.py``). Where the provider refuses one, or ``-o
  vmmshim.doorbells=false``, the write exits and the device rings the same eventfd (``ring_with``), so a virtio
  queue's work always runs on its device's thread (or on a halting vCPU, below), never on the vCPU that wrote;
  except for a device named in ``-o vmmshim.exit_notify`` (virtio-9p by default), which gets no doorbells: its
  writes exit and the writing vCPU serves them there.
- **The idle poll**: a vCPU about to sleep in HLT serves the doorbells that rang (``-o vmmshim.halt_serve``).

Not supported: doorbells on hosts without eventfd and epoll (NetBSD): the device then does its work on the vCPU
that wrote; posted writes wider than the provider's ring entries.
"""

import os
import threading

from bhyve_devices.base import Doorbells as DoorbellDevice, PostedWrites, PublishedMmioReads, PublishedReads
from ops.nvmm.api import FEATURE_ANSWERED_IO, FEATURE_ANSWERED_MMIO, FEATURE_DOORBELL, FEATURE_POSTED_IO

from .doorbells import Doorbells

POSTED_FLUSH_NS = 50_000_000      # posted port writes reach their device within this even with no exit


class FastPaths:
    """The VM's fast paths. ``vm`` gives ``ops``, ``vmi``, ``config``, ``timers``, ``pio`` (the port bus),
    ``log`` and ``status`` (None while it runs)."""

    def __init__(self, vm):
        self.vm = vm
        ops, vmi, config = vm.ops, vm.vmi, vm.config
        self.features = ops.vm_features(vmi)
        self.hardware_doorbells = config.doorbells and FEATURE_DOORBELL in self.features
        self.doorbells = Doorbells(lambda *k: ops.vm_doorbell(vmi, *k), lambda *k: ops.vm_remove_doorbell(vmi, *k),
                                   on_error=lambda exc: vm.log(f"vmmshim: doorbell: {exc!r}"))
        if config.halt_serve:
            ops.vm_idle_hook(vmi, self.doorbells.poll_idle, self.doorbells.idle_fd)
        self.posted_ports = []      # (port, size) ranges whose writes the provider posts
        self._bar_bells = {}        # a BAR's window -> (device, BAR index, keys of its doorbells)
        self._bar_reads = {}        # a BAR's window -> (device, BAR index, its MmioPublisher)
        self.answer_mmio = config.answer_mmio and FEATURE_ANSWERED_MMIO in self.features

    # -- port devices: posted writes and published reads ---------------------------------------------------------
    def port_device(self, base, device):
        """Takes up the fast paths of a device just mapped at port ``base``."""
        vm = self.vm
        ops, vmi, config = vm.ops, vm.vmi, vm.config
        if config.answer_io and FEATURE_ANSWERED_IO in self.features and isinstance(device, PublishedReads):
            device.publish_reads(lambda offset, value: ops.vm_answer_io(vmi, base + offset, value))
        if config.posted_io and FEATURE_POSTED_IO in self.features and isinstance(device, PostedWrites):
            for off, n in device.posted_writes:
                cb = vm.pio.posted_run if n == 1 else _wide(vm.pio.io)
                if ops.vm_post_io(vmi, base + off, n, cb):
                    if not self.posted_ports:
                        self._arm_flush()
                    self.posted_ports.append((base + off, n))

    def _arm_flush(self):
        """Starts the posted writes' flush (:class:`PostedFlush`) and hooks it to the vCPUs' HLT sleeps."""
        vm = self.vm
        ops, vmi = vm.ops, vm.vmi
        # the provider's run loop may sleep in HLT and start the flush again on its own (Machine.wake_timer);
        # where the timer thread cannot watch that timer, the flush never goes off
        watch = vm.timers.can_watch
        wt = ops.vm_wake_timer(vmi, POSTED_FLUSH_NS) if watch else None
        flush = PostedFlush(vm.timers, lambda: ops.vm_drain_posted(vmi),
                            (lambda: ops.vm_all_asleep(vmi)) if watch else (lambda: False),
                            lambda: vm.status is None, wake_timer=wt)
        flush.start()
        ops.vm_wake_hook(vmi, flush.woke)
        if vm.config.halt_serve:
            poll = self.doorbells.poll_idle

            def idle():
                poll()
                flush.idle()
            ops.vm_idle_hook(vmi, idle, self.doorbells.idle_fd)
        else:
            ops.vm_idle_hook(vmi, flush.idle)

    # -- doorbells ----------------------------------------------------------------------------------------------
    def add_doorbells(self, base, pio, bells, group=None, name=None, software=False):
        """Registers doorbells (``(offset, size, datamatch, fn)``) at ``base`` in the port (``pio``) or memory
        space, served by ``group``'s thread; returns the keys of those taken (by the provider; with ``software``
        also those it refused, rung by the device itself), for :meth:`remove_doorbells`."""
        out = []
        for off, size, match, fn in bells:
            key = self.doorbells.add(base + off, size, pio, match, fn, group, name,
                                     hardware=self.hardware_doorbells, software=software)
            if key is not None:
                out.append(key)
        return out

    def remove_doorbells(self, keys):
        for k in keys:
            self.doorbells.remove(k)

    def bar_mapped(self, window, dev, idx, base, pio, name=None):
        """BAR ``idx`` of ``dev`` is decoded at ``base`` (``window`` is what the bus maps there): its doorbells are
        registered there, and writes that still exit ring the same threads (``ring_with``); its published
        registers are answered there."""
        if self.answer_mmio and not pio and isinstance(dev, PublishedMmioReads):
            ops, vmi = self.vm.ops, self.vm.vmi
            pub = MmioPublisher(base, lambda gpa, value: ops.vm_answer_mmio(vmi, gpa, value))
            self._bar_reads[window] = (dev, idx, pub)
            dev.publish_mmio_reads(idx, pub)
        if not isinstance(dev, DoorbellDevice):
            return
        if name in getattr(self.vm.config, "exit_notify", ()):
            return      # its notifications stay exits, served by the writing vCPU (-o vmmshim.exit_notify)
        keys = [self.doorbells.add(base + off, size, pio, match, fn, dev, name, hardware=self.hardware_doorbells,
                                   software=True) for off, size, match, fn in dev.doorbells(idx)]
        if any(k is not None for k in keys):
            self._bar_bells[window] = (dev, idx, keys)
            self._route(dev)

    def bar_unmapped(self, window):
        reads = self._bar_reads.pop(window, None)
        if reads is not None:
            dev, idx, pub = reads
            dev.publish_mmio_reads(idx, None)
            pub.withdraw()
        entry = self._bar_bells.pop(window, None)
        if entry is not None:
            self.remove_doorbells(k for k in entry[2] if k is not None)
            self._route(entry[0])

    def _route(self, dev):
        """Gives ``dev`` a ring for the doorbells of its BARs that are mapped (None when there are none)."""
        fds = {(idx, i): key[4] for d, idx, keys in self._bar_bells.values() if d is dev
               for i, key in enumerate(keys) if key is not None}
        if not fds:
            dev.ring_with(None)
            return

        def ring(bar, i):
            fd = fds.get((bar, i))
            if fd is None:                  # not a doorbell here: the notification at once
                dev.doorbells(bar)[i][3]()
            else:
                os.eventfd_write(fd, 1)
        dev.ring_with(ring)

    def close(self):
        self.doorbells.close()


class MmioPublisher:
    """What a PublishedMmioReads device calls, ``pub(offset, value)``, for its BAR mapped at ``base``: the value
    goes to the provider (``answer(gpa, value)``) until :meth:`withdraw`, which takes back everything published
    (the BAR moved or was turned off); a call racing with it publishes nothing at the old address."""

    def __init__(self, base, answer):
        self.base, self._answer = base, answer
        self._lock = threading.Lock()
        self._live = True
        self.offsets = set()        # registers published now (withdrawn at the end)
        self.refused = False        # the provider had no room: those reads exit

    def __call__(self, offset, value):
        with self._lock:
            if not self._live:
                return
            if self._answer(self.base + offset, value) and value is not None:
                self.offsets.add(offset)
            else:
                self.offsets.discard(offset)
                self.refused |= value is not None

    def withdraw(self):
        with self._lock:
            self._live = False
            for off in self.offsets:
                self._answer(self.base + off, None)
            self.offsets.clear()


def _wide(io):
    """A posted write to a range wider than one port: one write of ``len(data)`` bytes, through the port bus."""
    return lambda port, data: io(port, False, data)


class PostedFlush:
    """A guest that writes and then runs on without exiting (a panic's busy loop with interrupts off) would leave
    its last posted bytes in the provider's buffer: the timer thread hands them over (``drain``) every
    :data:`POSTED_FLUSH_NS` while a vCPU may run. Each HLT exit drained the buffer, so while every vCPU sleeps in
    HLT (``all_asleep``) the flush is off: the halting vCPU cancels it (:meth:`idle`, before it sleeps) and the
    first vCPU to wake starts it again (:meth:`woke`). An idle guest then wakes no host thread for it (each wake
    is a thread switch and the GIL: milliseconds in the nested lab). ``_lock`` orders the three, so a wake after
    the flush was found unneeded always finds it off and starts it.

    Where the provider's run loop sleeps in HLT (``wake_timer``, the provider's ``Machine.wake_timer``), the flush
    is that timer instead: the timer thread watches its fd, and a vCPU that leaves its sleep in the loop starts it
    with no Python at all. Stopping it is done before the look at the vCPUs (:meth:`_fire_wt`), so a sleep that
    ends after the look starts it again."""

    def __init__(self, timers, drain, all_asleep, running, wake_timer=None):
        self._timers, self._drain, self._all_asleep, self._running = timers, drain, all_asleep, running
        self._lock = threading.Lock()
        self._handle = None         # the armed flush's timer, None while it is off
        self._wt = wake_timer       # the provider's wake timer (started by its run loop), or None

    def start(self):
        wt = self._wt
        if wt is not None:
            self._timers.watch(wt.fd, self._fire_wt)
            wt.arm()
            return
        with self._lock:
            self._arm()

    def _fire_wt(self):
        """The wake timer fired (the timer thread): as :meth:`_fire`. Off first, then the look at the vCPUs: a
        vCPU whose sleep in the run loop ends after the look finds it off and starts it (``fasthalt.c``)."""
        wt = self._wt
        wt.off()
        if not self._running():
            return
        self._drain()
        if not self._all_asleep():
            wt.arm()

    def _arm(self):
        t = self._timers
        self._handle = t.arm(t.now_ns() + POSTED_FLUSH_NS, self._fire)

    def _fire(self):
        if not self._running():
            return
        self._drain()
        with self._lock:
            if self._all_asleep():
                self._handle = None
            else:
                self._arm()

    def woke(self):
        """A vCPU's HLT sleep ended: it may run without exiting from here on."""
        if self._wt is not None:
            self._wt.arm()
            return
        if self._handle is None:
            with self._lock:
                if self._handle is None and self._running():
                    self._arm()

    def idle(self):
        """A vCPU is about to sleep in HLT: the flush goes off when every vCPU sleeps."""
        wt = self._wt
        if wt is not None:
            if self._all_asleep():
                wt.off()
                if not self._all_asleep():
                    wt.arm()
            return
        with self._lock:
            if self._handle is not None and self._all_asleep():
                self._timers.cancel(self._handle)
                self._handle = None
