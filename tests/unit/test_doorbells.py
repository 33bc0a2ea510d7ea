"""The VM's doorbell thread (vmmshim/doorbells.py) over real eventfds, with the provider's registration faked:
a ring reaches its function on the doorbell thread, rings before a read count once, a refused doorbell is
reported as such, a removed doorbell's pending ring is served by the remover, and close() stops the thread."""

import os
import threading
import time

from vmmshim.doorbells import Doorbells


class FakeProvider:
    def __init__(self, accept=True):
        self.accept, self.live = accept, {}

    def register(self, addr, size, pio, datamatch, fd):
        if self.accept:
            self.live[(addr, pio, datamatch)] = fd
        return self.accept

    def unregister(self, addr, size, pio, datamatch, fd):
        assert self.live.pop((addr, pio, datamatch)) == fd

    def ring(self, addr, pio=False, datamatch=None):
        os.eventfd_write(self.live[(addr, pio, datamatch)], 1)


def wait_for(cond, timeout=5):
    end = time.monotonic() + timeout
    while not cond() and time.monotonic() < end:
        time.sleep(0.005)
    return cond()


def test_a_ring_calls_the_function_on_the_doorbell_thread():
    prov = FakeProvider()
    db = Doorbells(prov.register, prov.unregister)
    seen = []
    key = db.add(0x3000, 0, False, None, lambda: seen.append(threading.current_thread().name))
    assert key is not None and db.active == 1
    prov.ring(0x3000)
    assert wait_for(lambda: seen == ["vmmshim-doorbells shared"])
    threads = db.threads
    db.close()
    assert prov.live == {} and db.threads == [] and not threads[0].is_alive()


def test_rings_before_the_read_count_once_and_later_rings_again():
    prov = FakeProvider()
    db = Doorbells(prov.register, prov.unregister)
    gate, calls = threading.Event(), []

    def fn():
        calls.append(1)
        gate.wait(5)
    db.add(0x10, 2, True, 1, fn)
    prov.ring(0x10, True, 1)
    assert wait_for(lambda: len(calls) == 1)
    for _ in range(5):                       # while the function runs: one more call, not five
        prov.ring(0x10, True, 1)
    gate.set()
    assert wait_for(lambda: len(calls) == 2)
    time.sleep(0.05)
    assert len(calls) == 2 and db.rings == 2
    db.close()


def test_a_refused_doorbell_is_none_and_starts_nothing():
    prov = FakeProvider(accept=False)
    db = Doorbells(prov.register, prov.unregister)
    assert db.add(0x3000, 0, False, None, lambda: None) is None
    assert db.active == 0 and db.threads == []
    db.close()


def test_each_group_has_its_own_thread():
    """A device that works in its doorbell function (virtio-blk serves its queue there) does not hold up
    another device's doorbells."""
    prov = FakeProvider()
    db = Doorbells(prov.register, prov.unregister)
    block, seen = threading.Event(), []
    db.add(0x20, 0, False, None, lambda: block.wait(5), group="blk", name="blk")
    db.add(0x30, 0, False, None, lambda: seen.append(threading.current_thread().name), group="net", name="net")
    prov.ring(0x20)
    time.sleep(0.05)
    prov.ring(0x30)
    assert wait_for(lambda: seen == ["vmmshim-doorbells net"])
    block.set()
    assert len(db.threads) == 2
    db.close()


def test_remove_serves_a_pending_ring_and_stops_the_rest():
    prov = FakeProvider()
    db = Doorbells(prov.register, prov.unregister)
    calls = []
    block = threading.Event()
    db.add(0x20, 0, False, None, lambda: block.wait(5))     # keeps the thread busy
    key = db.add(0x30, 0, False, None, lambda: calls.append(threading.current_thread().name))
    prov.ring(0x20)
    time.sleep(0.05)
    prov.ring(0x30)                                          # the thread is busy: the ring waits
    db.remove(key)
    assert calls == [threading.current_thread().name]        # served by the remover
    block.set()
    time.sleep(0.05)
    assert calls == [threading.current_thread().name] and (0x30, False, None) not in prov.live
    db.close()


def test_an_exception_in_a_function_is_reported_and_the_thread_goes_on():
    prov = FakeProvider()
    errors, calls = [], []
    db = Doorbells(prov.register, prov.unregister, on_error=errors.append)
    db.add(0x40, 0, False, None, lambda: 1 / 0)
    db.add(0x50, 0, False, None, lambda: calls.append(1))
    prov.ring(0x40)
    assert wait_for(lambda: len(errors) == 1) and isinstance(errors[0], ZeroDivisionError)
    prov.ring(0x50)
    assert wait_for(lambda: calls == [1])
    db.close()


def test_a_host_without_eventfd_declines_every_doorbell(monkeypatch):
    """NetBSD has neither eventfd nor epoll: no doorbell is offered to the provider, the writes keep exiting."""
    import vmmshim.doorbells as mod
    monkeypatch.setattr(mod, "HOST_HAS_EVENTFD", False)
    prov = FakeProvider()
    db = Doorbells(prov.register, prov.unregister)
    assert db.add(0x3000, 0, False, None, lambda: None) is None and prov.live == {} and db.threads == []
    db.close()


def test_poll_idle_serves_a_ring_on_the_calling_thread(monkeypatch):
    """A halting vCPU's poll (the VM's idle hook) calls the function of a doorbell that rang, on its own thread;
    with no ring it calls nothing. The group's thread is kept from running so that the poll, not the thread,
    takes the ring."""
    from vmmshim import doorbells
    monkeypatch.setattr(doorbells._Group, "_loop", lambda self: None)
    prov = FakeProvider()
    db = Doorbells(prov.register, prov.unregister)
    seen = []
    db.add(0x3000, 0, False, None, lambda: seen.append(threading.get_ident()), group="blk")
    assert db.poll_idle() == 0 and seen == []
    prov.ring(0x3000)
    prov.ring(0x3000)
    assert db.poll_idle() == 1 and seen == [threading.get_ident()], "two rings before the poll count once"
    assert db.poll_idle() == 0 and db.idle_served == 1 and db.rings == 1
    db.close()
    assert db.poll_idle() == 0, "a closed set serves nothing"


def test_poll_idle_leaves_a_group_busy_on_its_thread_to_that_thread():
    """A group's function never runs on two threads at once: while its thread serves one ring, the poll leaves
    the next ring alone, and the thread takes it afterwards."""
    prov = FakeProvider()
    db = Doorbells(prov.register, prov.unregister)
    gate, calls = threading.Event(), []

    def fn():
        calls.append(threading.current_thread().name)
        gate.wait(5)
    db.add(0x10, 2, True, 1, fn, group="dev", name="dev")
    prov.ring(0x10, True, 1)
    assert wait_for(lambda: len(calls) == 1)
    prov.ring(0x10, True, 1)
    assert db.poll_idle() == 0 and len(calls) == 1
    gate.set()
    assert wait_for(lambda: len(calls) == 2)
    assert calls == ["vmmshim-doorbells dev"] * 2 and db.idle_served == 0
    db.close()
