"""The fast paths' wiring (``vmmshim/fastpaths.py``) with a provider that has none of them (a ``VmmApi`` double
listing no features): a doorbell write that exits still reaches its device's own thread (software doorbells), a
BAR unmapped takes its doorbells along, and posted runs reach a device through the port bus; and with a double
that answers MMIO reads: a memory BAR's published registers follow the BAR and are taken back with it."""

import threading
import types

from bhyve_devices.base import Doorbells as DoorbellDevice, ManualTimers, PostedWrites
from vmmshim.bus import Bus
from vmmshim.doorbells import HOST_HAS_EVENTFD
from vmmshim.fastpaths import FastPaths

import pytest

from .recording_ops import RecordingOps


class BellDevice:
    """One doorbell at offset 0x10 of BAR 0; a write through the bus rings it as a virtio transport does."""

    def __init__(self):
        self.ring = None
        self.served = []
        self.done = threading.Event()

    def doorbells(self, bar):
        return [(0x10, 2, None, self.serve)] if bar == 0 else []

    def ring_with(self, ring):
        self.ring = ring

    def serve(self):
        self.served.append(threading.current_thread().name)
        self.done.set()

    def guest_write(self):
        if self.ring is not None:
            self.ring(0, 0)
        else:
            self.serve()


def fake_vm(**config):
    cfg = dict(doorbells=True, halt_serve=True, answer_io=True, answer_mmio=True, posted_io=True)
    cfg.update(config)
    return types.SimpleNamespace(ops=RecordingOps(), vmi="vmi", config=types.SimpleNamespace(**cfg),
                                 timers=ManualTimers(), pio=Bus("port", is_port_bus=True), log=print, status=None)


def test_a_bell_device_is_a_doorbells_device():
    assert isinstance(BellDevice(), DoorbellDevice) and not isinstance(object(), DoorbellDevice)


@pytest.mark.skipif(not HOST_HAS_EVENTFD, reason="software doorbells need eventfd and epoll")
def test_a_write_that_exits_is_served_on_the_device_thread():
    vm = fake_vm()
    fp = FastPaths(vm)
    dev, window = BellDevice(), object()
    try:
        fp.bar_mapped(window, dev, 0, 0x1000, True, "bell")
        assert dev.ring is not None and fp.doorbells.active == 1 and fp.doorbells.hardware == 0
        dev.guest_write()
        assert dev.done.wait(5)
        assert dev.served == ["vmmshim-doorbells bell"]
        fp.bar_unmapped(window)
        assert dev.ring is None and fp.doorbells.active == 0
        dev.guest_write()                                   # unmapped: the write is served where it was made
        assert dev.served[-1] == threading.current_thread().name
    finally:
        fp.close()


def test_a_device_named_in_exit_notify_keeps_its_writes_as_exits():
    """``-o vmmshim.exit_notify``: no doorbell, so the write is served in the writing vCPU's exit."""
    vm = fake_vm(exit_notify=frozenset({"bell"}))
    fp = FastPaths(vm)
    dev, other = BellDevice(), BellDevice()
    try:
        fp.bar_mapped(object(), dev, 0, 0x1000, False, "bell")
        fp.bar_mapped(object(), other, 0, 0x2000, False, "other")
        assert dev.ring is None and not any(c[0] == "vm_doorbell" and c[1] == 0x1010 for c in vm.ops.calls)
        dev.guest_write()
        assert dev.served == [threading.current_thread().name]
        if HOST_HAS_EVENTFD:
            assert other.ring is not None and fp.doorbells.active == 1      # a device not named keeps its own
    finally:
        fp.close()


@pytest.mark.skipif(not HOST_HAS_EVENTFD, reason="software doorbells need eventfd and epoll")
def test_a_halting_vcpu_serves_a_software_doorbell(monkeypatch):
    """The idle hook is the doorbells' poll, and it serves a ring that exited (the device thread kept idle)."""
    from vmmshim import doorbells
    monkeypatch.setattr(doorbells._Group, "_loop", lambda self: None)
    vm = fake_vm()
    fp = FastPaths(vm)
    assert [c[1] for c in vm.ops.calls if c[0] == "vm_idle_hook"] == [fp.doorbells.poll_idle]
    dev = BellDevice()
    try:
        fp.bar_mapped(object(), dev, 0, 0x1000, True, "bell")
        dev.guest_write()
        assert fp.doorbells.poll_idle() == 1 and dev.served == [threading.current_thread().name]
    finally:
        fp.close()


def test_no_idle_poll_with_halt_serve_off():
    vm = fake_vm(halt_serve=False)
    FastPaths(vm).close()
    assert not [c for c in vm.ops.calls if c[0] == "vm_idle_hook"]


def test_no_doorbells_for_a_device_that_offers_none():
    vm = fake_vm()
    fp = FastPaths(vm)
    fp.bar_mapped(object(), object(), 0, 0x1000, True, "plain")
    assert fp.doorbells.active == 0
    fp.close()


def test_no_posting_and_no_publishing_without_the_features():
    vm = fake_vm()
    fp = FastPaths(vm)

    class Uartish:
        posted_writes = ((0, 1),)

        def posted_run(self, offset, data):
            pass

        def publish_reads(self, fn):
            raise AssertionError("published without the answered-io feature")
    fp.port_device(0x3F8, Uartish())
    assert fp.posted_ports == [] and not [c for c in vm.ops.calls if c[0] in ("vm_post_io", "vm_answer_io")]
    fp.close()


class StatusBar:
    """A PublishedMmioReads device: BAR 0 publishes registers 0x8 and 0xC."""

    def __init__(self):
        self.pub = None

    def publish_mmio_reads(self, bar, fn):
        if bar == 0:
            self.pub = fn
            if fn is not None:
                fn(0x8, 1)
                fn(0xC, 2)


def answering_vm(refuse=()):
    vm = fake_vm()
    vm.ops.vm_features = lambda vmi: frozenset({"answered-mmio"})
    answered = {}

    def answer(vmi, gpa, value):
        vm.ops.calls.append(("vm_answer_mmio", gpa, value))
        if gpa in refuse:
            return False
        answered[gpa] = value
        return True
    vm.ops.vm_answer_mmio = answer
    return vm, answered


def test_a_mapped_bar_publishes_at_its_address_and_takes_it_back_when_unmapped():
    vm, answered = answering_vm()
    fp = FastPaths(vm)
    dev, window = StatusBar(), object()
    fp.bar_mapped(window, dev, 0, 0xE000_0000, False, "status")
    assert answered == {0xE000_0008: 1, 0xE000_000C: 2}
    dev.pub(0x8, 5)
    dev.pub(0xC, None)
    assert answered == {0xE000_0008: 5, 0xE000_000C: None}
    pub = dev.pub
    fp.bar_unmapped(window)
    assert dev.pub is None and answered == {0xE000_0008: None, 0xE000_000C: None}
    pub(0x8, 7)                                 # a device thread's late call: nothing at the old address
    assert answered[0xE000_0008] is None
    fp.bar_mapped(window, dev, 0, 0xF000_0000, False, "status")      # moved
    assert answered[0xF000_0008] == 1 and answered[0xE000_0008] is None
    fp.close()


def test_no_mmio_publishing_for_port_bars_without_the_feature_or_when_off():
    off, _ = answering_vm()
    off.config.answer_mmio = False
    # a port BAR; a provider without the feature (fake_vm's ops list none); the switch off
    for vm, pio in ((answering_vm()[0], True), (fake_vm(), False), (off, False)):
        fp = FastPaths(vm)
        dev = StatusBar()
        fp.bar_mapped(object(), dev, 0, 0x1000, pio, "status")
        assert dev.pub is None and not [c for c in vm.ops.calls if c[0] == "vm_answer_mmio"]
        fp.close()


def test_a_register_the_provider_refuses_is_not_withdrawn_later():
    vm, answered = answering_vm(refuse={0x1000C})
    fp = FastPaths(vm)
    dev, window = StatusBar(), object()
    fp.bar_mapped(window, dev, 0, 0x10000, False, "status")
    pub = dev.pub
    assert pub.refused and pub.offsets == {0x8}
    fp.bar_unmapped(window)
    assert [c for c in vm.ops.calls if c[0] == "vm_answer_mmio"][-1] == ("vm_answer_mmio", 0x10008, None)
    fp.close()


def test_posted_runs_reach_the_device_through_the_port_bus():
    class Runs:
        posted_writes = ((0, 1),)

        def __init__(self):
            self.got = []

        def posted_run(self, offset, data):
            self.got.append((offset, bytes(data)))

        def read(self, offset, size):
            return 0

        def write(self, offset, size, value):
            self.got.append(("w", offset, value))

    class Plain(Runs):
        posted_run = None

    bus = Bus("port", is_port_bus=True)
    runs, plain = Runs(), Plain()
    assert isinstance(runs, PostedWrites)
    bus.insert(0x3F8, 8, runs, "runs")
    bus.insert(0x2F8, 8, plain, "plain")
    bus.posted_run(0x3F8, b"abc")
    bus.posted_run(0x2F9, b"xy")
    assert runs.got == [(0, b"abc")]
    assert plain.got == [("w", 1, ord("x")), ("w", 1, ord("y"))]


def test_posted_flush_runs_only_while_a_vcpu_may_run():
    """PostedFlush with manual timers: it drains every period while a vCPU runs, goes off when the last vCPU
    about to sleep in HLT cancels it (no timer left armed), and a wake starts it again."""
    from vmmshim.fastpaths import POSTED_FLUSH_NS, PostedFlush
    t = ManualTimers()
    drained, asleep = [], [False]
    f = PostedFlush(t, lambda: drained.append(t.now_ns()), lambda: asleep[0], lambda: True)
    f.start()
    t.advance(3 * POSTED_FLUSH_NS)
    assert len(drained) == 3
    f.idle()                                   # another vCPU still runs: the flush stays on
    t.advance(POSTED_FLUSH_NS)
    assert len(drained) == 4
    asleep[0] = True
    f.idle()                                   # the last vCPU halts: off, nothing armed
    t.advance(10 * POSTED_FLUSH_NS)
    assert len(drained) == 4 and t.pending() == 0
    asleep[0] = False
    f.woke()
    f.woke()                                   # a second wake arms nothing more
    t.advance(POSTED_FLUSH_NS)
    assert len(drained) == 5 and t.pending() == 1


def test_posted_flush_on_the_run_loops_wake_timer():
    """PostedFlush on the KVM run loop's wake timer (a real timerfd, the real timer thread): it drains while a
    vCPU runs, goes off when the last one sleeps, and comes back when the loop starts the timer at a wake
    (``vmmshim_waketimer_arm``, what ``fasthalt.c`` calls when a sleep ends), with no call into the flush."""
    import time
    from ops.nvmm.kvm import intwin
    from vmmshim.fastpaths import PostedFlush
    from vmmshim.timers import TimerThread
    period = 20_000_000
    wt = intwin.make_waketimer(period)
    if wt is None:
        pytest.skip("the compiled run loop does not build here")
    timers = TimerThread()
    drained, asleep = [], [False]
    try:
        assert timers.can_watch
        f = PostedFlush(timers, lambda: drained.append(time.monotonic()), lambda: asleep[0], lambda: True,
                        wake_timer=wt)
        f.start()
        time.sleep(0.2)
        assert len(drained) >= 3 and wt.struct.armed == 1
        asleep[0] = True
        f.idle()                                   # the last vCPU sleeps: off
        assert wt.struct.armed == 0
        n = len(drained)
        time.sleep(0.15)
        assert len(drained) == n, "the flush ran while every vCPU slept"
        asleep[0] = False
        wt.arm()                                   # the run loop: a sleep ended
        wt.arm()                                   # a second arm while set changes nothing
        time.sleep(0.2)
        assert len(drained) >= n + 3
        asleep[0] = True                           # the next fire finds every vCPU asleep: off by itself
        time.sleep(0.1)
        assert wt.struct.armed == 0
        n = len(drained)
        time.sleep(0.1)
        assert len(drained) == n
    finally:
        timers.close()
        wt.close()
